"""Point-in-time recovery: WAL archived by `manage.py archive_wal` from a private cluster,
replayed by `restore_to_time` to a second between two writes and to a named restore point;
an archive target that fails keeps PostgreSQL retrying; fetch_wal refuses damaged copies."""

from __future__ import annotations

import struct
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backups import pitr, stream
from backups.models import WalSegment
from backups.targets import configured_targets
from tests.backups.pg_cluster import (  # noqa: F401  (fixtures)
    ArchivingCluster,
    pg_cluster_fixture,
    postgres_python_fixture,
)
from tests.conftest import ROOT

MANAGE = str(ROOT / "manage.py")


# --- Without a cluster ----------------------------------------------------------------------


def test_wal_names_postgresql_archives_are_accepted_and_others_refused():
    for name in (
        "000000010000000000000003",
        "000000010000000000000003.partial",
        "000000010000000000000002.00000028.backup",
        "00000002.history",
    ):
        assert pitr.check_wal_name(name) == name
    for name in ("../etc/passwd", "00000001000000000000000", "000000010000000000000003.tmp", ""):
        with pytest.raises(pitr.PitrError):
            pitr.check_wal_name(name)


def test_the_system_identifier_is_read_from_a_segments_first_page(tmp_path):
    # given: a first page as PostgreSQL writes it (XLP_LONG_HEADER, then sysid, sizes)
    page = struct.pack("=HHIQI4xQII", 0xD110, 0x0002, 1, 0, 0, 7301234567890123456, 1 << 20, 8192)
    segment = tmp_path / "pg_wal" / "000000010000000000000001"
    segment.parent.mkdir()
    segment.write_bytes(page + bytes(1024))
    history = tmp_path / "pg_wal" / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "pg_control").write_bytes(struct.pack("=Q", 42) + bytes(100))

    # then: the segment names its own cluster, a history file the data directory's
    assert pitr.system_identifier_of(segment) == "7301234567890123456"
    assert pitr.system_identifier_of(history) == "42"


def test_the_window_runs_from_the_oldest_base_backup_to_the_newest_archived_wal(db):
    first = datetime(2030, 1, 1, 12, tzinfo=UTC)
    WalSegment.objects.create(name="000000010000000000000005", system_identifier="1", sha256="a")
    window = pitr.wal_window([first + timedelta(hours=1), first], system_identifier="1")
    assert window["base_from"] == first
    assert window["wal_until"] == WalSegment.objects.get().archived_at
    assert pitr.wal_window([], system_identifier="2") == {"base_from": None, "wal_until": None}


def test_a_target_time_outside_the_window_is_refused_before_anything_is_written(db, tmp_path):
    # given: a base backup consistent at `end`, WAL archived up to now
    end = datetime.now(UTC) - timedelta(minutes=5)
    WalSegment.objects.create(name="000000010000000000000005", system_identifier="9", sha256="a")
    manifest = {"system_identifier": "9", "time": end.isoformat()}

    def never_opened():
        raise AssertionError("the base backup must not be read")

    for when, words in (
        (end - timedelta(seconds=1), "before this base backup was consistent"),
        (datetime.now(UTC) + timedelta(minutes=1), "after the newest archived WAL"),
    ):
        with pytest.raises(pitr.PitrError, match=words) as refused:
            pitr.restore_to_time(
                manifest,
                never_opened,
                target_time=when,
                restore_point=None,
                data_dir=tmp_path / "restored",
                on_bytes=lambda count: None,
            )
        assert refused.value.code == "target_time_out_of_window"
    assert not (tmp_path / "restored").exists()


def test_the_base_backup_command_line_never_carries_the_password():
    url, env = pitr._url_without_password("postgres://replicator:s%40cret@db:5432/app?x=1")
    assert url == "postgres://replicator@db:5432/app?x=1"
    assert env == {"PGPASSWORD": "s@cret"}
    assert pitr._url_without_password("postgres://postgres@127.0.0.1/app")[1] == {}


# --- On a private cluster -------------------------------------------------------------------


def _base_backup_artifact(cluster: ArchivingCluster) -> tuple[dict, object]:
    """A base backup through the real pipeline: encrypted, committed to a target after its
    read-back checksum matched; returns its manifest and an opener of its plaintext."""
    target = configured_targets()[0]
    location = "pitr-test/pitr-base"
    key = stream.new_data_key()
    upload = target.begin(location)
    seen = []
    with stream.ArtifactWriter([upload.file], name=location, key=key) as writer:
        manifest = pitr.base_backup(writer, on_bytes=seen.append)
    upload.commit(sha256=writer.info.sha256)
    assert sum(seen) == manifest["bytes"] > 1_000_000
    assert manifest["system_identifier"] == cluster.system_identifier
    assert manifest["start_wal_file"] and manifest["start_lsn"]

    def opener():
        return stream.open_artifact(target.open(location), name=location, key=key)

    return manifest, opener


def _labels(cluster: ArchivingCluster, data_dir: Path) -> list[str]:
    with pitr.PrivateServer(data_dir, env=cluster.env) as restored:
        return [row[0] for row in restored.query("SELECT label FROM t ORDER BY id")]


def _insert(cluster: ArchivingCluster, label: str) -> None:
    cluster.sql("INSERT INTO t (label) VALUES (%s)", (label,))


def _restore(cluster: ArchivingCluster, manifest: dict, opener, name: str, **target) -> dict:
    return pitr.restore_to_time(
        manifest,
        opener,
        target_time=target.get("target_time"),
        restore_point=target.get("restore_point"),
        data_dir=cluster.new_data_dir(name),
        on_bytes=lambda count: None,
        env=cluster.env,
        python=cluster.python,
        timeout=60,
    )


@pytest.mark.servers
def test_restore_to_a_time_between_two_writes_keeps_the_first_and_not_the_second(pg_cluster):
    cluster = pg_cluster
    # given: a table, a base backup, then A; T; then B; a restore point; then C; T2
    cluster.sql("CREATE TABLE t (id serial PRIMARY KEY, label text NOT NULL)")
    manifest, opener = _base_backup_artifact(cluster)
    _insert(cluster, "A")
    time.sleep(1.1)
    target_time = datetime.now(UTC)
    time.sleep(1.1)
    _insert(cluster, "B")
    point = pitr.create_restore_point("after-b")
    _insert(cluster, "C")
    last = cluster.switch_wal()
    after_everything = datetime.now(UTC)  # after the last commit (switch_wal's own)
    cluster.wait_archived(last)
    assert pitr.is_archived(point["wal_file"], cluster.system_identifier)
    archived = WalSegment.objects.filter(system_identifier=cluster.system_identifier)
    assert all(len(segment.copies) == 2 for segment in archived)

    # when: restored to T
    to_time = _restore(cluster, manifest, opener, "to-time", target_time=target_time)

    # then: A is there, B (and C) are not; the replay read WAL from the archive
    assert _labels(cluster, Path(to_time["data_dir"])) == ["A"]
    assert to_time["wal_replayed"] >= 1
    assert to_time["wal_prefetched"] >= 1
    assert "before commit" in to_time["recovered_to"]
    assert to_time["timeline"] == 2

    # when: restored to the named restore point: A and B, not C
    to_point = _restore(cluster, manifest, opener, "to-point", restore_point="after-b")
    assert _labels(cluster, Path(to_point["data_dir"])) == ["A", "B"]
    assert "restore point" in to_point["recovered_to"]

    # when: restored to a time after the last commit (no later commit in the archive to stop
    # at): everything archived is replayed
    to_end = _restore(cluster, manifest, opener, "to-end", target_time=after_everything)
    assert _labels(cluster, Path(to_end["data_dir"])) == ["A", "B", "C"]
    assert to_end["replayed_to_end"]


@pytest.mark.servers
def test_a_damaged_archived_segment_stops_the_replay_instead_of_promoting_early(pg_cluster):
    cluster = pg_cluster
    # given: a base backup, A committed in segment S, then B after T
    cluster.sql("CREATE TABLE t (id serial PRIMARY KEY, label text NOT NULL)")
    manifest, opener = _base_backup_artifact(cluster)
    _insert(cluster, "A")
    damaged = cluster.switch_wal()
    time.sleep(1.1)
    target_time = datetime.now(UTC)
    time.sleep(0.1)
    _insert(cluster, "B")
    cluster.wait_archived(cluster.switch_wal())
    # and every copy of S damaged
    for target in cluster.targets.values():
        copy = target / "wal" / cluster.system_identifier / damaged
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0x01
        copy.write_bytes(bytes(data))

    # when / then: the replay stops at S, names it, and leaves no half-recovered directory
    with pytest.raises(pitr.PitrError, match=damaged) as failed:
        _restore(cluster, manifest, opener, "damaged", target_time=target_time)
    assert "tampered" in str(failed.value)
    assert "could not use" in str(failed.value)
    assert not cluster.new_data_dir("damaged").exists()


def _fetch(cluster: ArchivingCluster, name: str, dest: Path, *extra: str):
    return subprocess.run(
        [cluster.python, MANAGE, "fetch_wal", *extra, name, str(dest)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.servers
def test_an_unwritable_target_keeps_postgresql_retrying_until_it_is_fixed(pg_cluster):
    cluster = pg_cluster
    mirror = cluster.targets["local-mirror"] / "wal"
    cluster.sql("CREATE TABLE t (id serial PRIMARY KEY, label text NOT NULL)")
    failed_before = cluster.archiver()["failed"]
    # given: one of the two targets is not writable
    mirror.chmod(0o555)
    try:
        # when: a segment is closed
        _insert(cluster, "A")
        stuck = cluster.switch_wal()

        # then: archive_wal exits non-zero, PostgreSQL keeps the file and retries
        cluster.wait_for(
            lambda: cluster.archiver()["failed"] >= failed_before + 2,
            "two failed archive attempts",
        )
        assert cluster.archiver()["last_failed"] == stuck
        assert not WalSegment.objects.filter(name=stuck).exists()
        log = cluster.server.log_text()
        assert f"archive_wal {stuck}:" in log
        assert "archive command failed with exit code 1" in log
        assert (cluster.server.data_dir / "pg_wal" / "archive_status" / f"{stuck}.ready").exists()
    finally:
        mirror.chmod(0o755)

    # when: fixed (and the archiver woken by the next segment)
    _insert(cluster, "B")
    cluster.switch_wal()

    # then: the stuck segment is archived, on both targets
    cluster.wait_archived(stuck)
    segment = WalSegment.objects.get(name=stuck)
    assert sorted(copy["target"] for copy in segment.copies) == ["local", "local-mirror"]
    assert (mirror / cluster.system_identifier / stuck).exists()


@pytest.mark.servers
def test_fetch_wal_refuses_a_tampered_segment_and_says_not_archived_for_a_missing_one(
    pg_cluster, tmp_path
):
    cluster = pg_cluster
    cluster.sql("CREATE TABLE t (id serial PRIMARY KEY, label text NOT NULL)")
    _insert(cluster, "A")
    name = cluster.switch_wal()
    cluster.wait_archived(name)
    sysid = cluster.system_identifier
    copies = [path / "wal" / sysid / name for path in cluster.targets.values()]
    original = (cluster.server.data_dir / "pg_wal" / name).read_bytes()

    # a segment that was never archived: exit 1, PostgreSQL's "end of the archive"
    missing = _fetch(
        cluster, "0000000100000000000000FF", tmp_path / "x", "--system-identifier", sysid
    )
    assert missing.returncode == 1, missing.stderr
    assert not (tmp_path / "x").exists()

    # the catalog unreachable (Bridge's own database is what is being recovered): the
    # targets alone are enough, the segment's key unwrapped from its header
    without_catalog = {**cluster.env, "DATABASE_URL": "postgres://postgres@127.0.0.1:9/none"}
    fetched = subprocess.run(
        [cluster.python, MANAGE, "fetch_wal", name, str(tmp_path / "dr")],
        env=without_catalog,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert "catalog is unreachable" in fetched.stderr
    assert (tmp_path / "dr").read_bytes() == original

    # one damaged copy: the other one is used, and the damage reported
    data = bytearray(copies[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    copies[0].write_bytes(bytes(data))
    fetched = _fetch(cluster, name, tmp_path / "one")
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "one").read_bytes() == original
    assert "tampered" in fetched.stderr

    # every copy damaged: refused, naming the segment, nothing written
    data = bytearray(copies[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    copies[1].write_bytes(bytes(data))
    refused = _fetch(cluster, name, tmp_path / "both")
    assert refused.returncode == pitr.FETCH_REFUSED_EXIT
    assert name in refused.stderr and "tampered" in refused.stderr
    assert not (tmp_path / "both").exists()
    assert not (tmp_path / "both.tmp").exists()


@pytest.mark.servers
def test_archiving_the_same_segment_again_succeeds_and_other_content_is_refused(
    pg_cluster, tmp_path
):
    cluster = pg_cluster
    cluster.sql("CREATE TABLE t (id serial PRIMARY KEY, label text NOT NULL)")
    name = cluster.switch_wal()
    cluster.wait_archived(name)
    segment = cluster.server.data_dir / "pg_wal" / name
    before = WalSegment.objects.get(name=name)

    def archive(path: Path):
        return subprocess.run(
            [cluster.python, MANAGE, "archive_wal", str(path), name],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # PostgreSQL retrying after a crash: the same content again is a success, nothing rewritten
    again = archive(segment)
    assert again.returncode == 0, again.stderr
    assert WalSegment.objects.get(name=name).copies == before.copies

    # other content under the same name: refused, the archived copy kept
    other = tmp_path / name
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    other.write_bytes(bytes(data))
    refused = archive(other)
    assert refused.returncode == 1
    assert "refusing to overwrite" in refused.stderr
    assert WalSegment.objects.get(name=name).sha256 == before.sha256
