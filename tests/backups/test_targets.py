"""Backup targets: a copy becomes visible only once its read-back SHA-256 matches, on the local
file system, a real SFTP server (offsite) and the generic Storage API; an offsite outage is
retried with back-off, counted by the retry statistics and the circuit breaker, and survives a
server that comes back; a target's password never shows in an error."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import InMemoryStorage

from backups import targets
from backups.targets import TargetError
from recovery import breaker, retry
from recovery.models import BreakerState
from security.models import StoredSecret

pytestmark = pytest.mark.django_db

FS = "django.core.files.storage.FileSystemStorage"
FAST_RETRY = {"max_retries": 3, "base_delay": 0.02, "cap": 0.05, "deadline": 20.0}
PASSWORD = "Pa55-word-never-shown-7c1e"


def fs_spec(path: Path, **extra) -> dict:
    return {
        "backend": FS,
        "options": {"location": str(path)},
        "media": "disk",
        "offsite": False,
        **extra,
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unique(prefix: str) -> str:
    # Breakers live in Redis when it is configured, beyond the test's transaction: a name per
    # test keeps one test's breaker out of another's way.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(targets.TEMP_PREFIX)]


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """Each test's breakers and retry counters are written to its own database (and this
    process forgets them after), so nothing is published after the test database is gone."""
    breaker._clear_registry()
    yield
    retry.flush()
    breaker._clear_registry()


@pytest.fixture
def local(settings, tmp_path):
    settings.BACKUP_TARGETS = {"local": fs_spec(tmp_path / "local")}
    return targets.get_target("local")


# --- The local file system ----------------------------------------------------------------------


def test_a_local_copy_is_invisible_until_committed_then_identical(local, tmp_path):
    # given
    data = os.urandom(3 * 1024 * 1024 + 123)
    root = tmp_path / "local"
    # when
    upload = local.begin("b1/database-default")
    upload.file.write(data[:1000])
    upload.file.write(data[1000:])
    upload.file.flush()
    # then: nothing under the final name, only a private temporary file beside it
    assert not local.exists("b1/database-default")
    assert local.listdir("") == []
    [temporary] = temporaries(root)
    assert temporary.parent == root / "b1"
    assert stat.S_IMODE(temporary.stat().st_mode) == 0o600
    upload.commit(sha256=sha(data))
    assert local.exists("b1/database-default")
    assert local.listdir("") == ["b1/database-default"] == local.listdir("b1")
    assert local.open("b1/database-default").read() == data
    assert local.sha256("b1/database-default") == sha(data)
    assert local.size("b1/database-default") == len(data)
    assert local.local_path("b1/database-default") == root / "b1" / "database-default"
    assert stat.S_IMODE((root / "b1" / "database-default").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "b1").stat().st_mode) == 0o700
    assert temporaries(root) == []


def test_put_uploads_a_finished_file_and_reports_progress(local, tmp_path):
    source = tmp_path / "artifact"
    data = os.urandom(2_500_000)
    source.write_bytes(data)
    seen = []
    local.put(source, "b2/uploads", sha256=sha(data), on_bytes=seen.append)
    assert sum(seen) == len(data)
    assert (tmp_path / "local" / "b2" / "uploads").read_bytes() == data


def test_a_temporary_copy_corrupted_on_disk_before_commit_is_refused_and_removed(local, tmp_path):
    # given: a copy written, then one bit of it flipped on the disk
    data = os.urandom(1024 * 1024)
    upload = local.begin("b3/redis")
    upload.file.write(data)
    upload.file.flush()
    [temporary] = temporaries(tmp_path / "local")
    with temporary.open("r+b") as handle:
        handle.seek(4242)
        byte = handle.read(1)
        handle.seek(4242)
        handle.write(bytes([byte[0] ^ 0x10]))
    # when / then
    with pytest.raises(TargetError, match=r"target local: b3/redis: the copy read back has SHA"):
        upload.commit(sha256=sha(data))
    assert temporaries(tmp_path / "local") == []
    assert not local.exists("b3/redis")


def test_a_put_with_the_wrong_checksum_leaves_nothing_behind(local, tmp_path):
    source = tmp_path / "artifact"
    source.write_bytes(b"payload")
    with pytest.raises(TargetError, match="discarded"):
        local.put(source, "b4/config", sha256=sha(b"other"))
    assert not local.exists("b4/config")
    assert list((tmp_path / "local").rglob("*")) == []  # the emptied directory went too


def test_an_upload_left_without_commit_is_aborted_and_stale_ones_are_purged(local, tmp_path):
    with local.begin("b5/config") as upload:
        upload.file.write(b"abandoned")
    assert temporaries(tmp_path / "local") == []
    # A worker killed mid-copy leaves its temporary file: purged once old enough.
    died = local.begin("b6/config")
    died.file.write(b"x" * 10)
    died.file.flush()
    [temporary] = temporaries(tmp_path / "local")
    assert local.purge_temporaries(older_than=3600) == []
    os.utime(temporary, (time.time() - 7200, time.time() - 7200))
    assert local.purge_temporaries(older_than=3600) == [f"b6/{temporary.name}"]
    assert not temporary.exists()


def test_delete_open_and_size_of_a_missing_copy(local):
    local.delete("nope/never")  # missing is fine
    for call in (local.open, local.size, local.sha256):
        with pytest.raises(TargetError, match="target local: nope/never: not found"):
            call("nope/never")
    assert local.exists("nope/never") is False


@pytest.mark.parametrize("location", ["", "/etc/passwd", "../x", "a//b", "a/./b", "a/.tmp-x"])
def test_locations_outside_the_target_or_temporary_names_are_refused(local, location):
    with pytest.raises(ValueError, match="not a valid backup location"):
        local.begin(location)


def test_targets_follow_the_settings_and_refuse_bad_specs(settings, tmp_path):
    settings.BACKUP_TARGETS = {"a": fs_spec(tmp_path / "a"), "b": fs_spec(tmp_path / "b")}
    first = targets.configured_targets()
    assert [t.name for t in first] == ["a", "b"] and targets.configured_targets()[0] is first[0]
    assert [t.remote for t in first] == [False, False]
    settings.BACKUP_TARGETS = {"c": fs_spec(tmp_path / "c", offsite=True, media="nfs")}
    [target] = targets.configured_targets()
    assert (target.name, target.media, target.offsite, target.remote) == ("c", "nfs", True, True)
    with pytest.raises(TargetError, match="target a: not configured"):
        targets.get_target("a")
    for bad in ({"x y": fs_spec(tmp_path)}, {"x": {"options": {}}}, {"x": fs_spec(tmp_path, z=1)}):
        settings.BACKUP_TARGETS = bad
        with pytest.raises(ImproperlyConfigured, match="BACKUP_TARGETS"):
            targets.configured_targets()


# --- The generic Storage API ----------------------------------------------------------------


class LeakyStorage(InMemoryStorage):
    """A storage whose errors quote its password, as some clients' do."""

    def __init__(self, password: str = "", fail: bool = False, **options) -> None:
        super().__init__(**options)
        self.password, self.fail = password, fail

    def _save(self, name, content):
        if self.fail:
            raise ConnectionError(f"login rejected for user=backup password={self.password}")
        return super()._save(name, content)


def test_a_generic_storage_copy_is_saved_verified_and_renamed_by_copy(settings):
    settings.BACKUP_TARGETS = {
        "memory": {"backend": "django.core.files.storage.InMemoryStorage", "media": "memory"}
    }
    target = targets.get_target("memory")
    data = os.urandom(300_000)
    with target.begin("b7/uploads") as upload:
        upload.file.write(data)
        upload.commit(sha256=sha(data))
    assert target.remote and target.listdir("") == ["b7/uploads"]
    assert target.open("b7/uploads").read() == data and target.sha256("b7/uploads") == sha(data)
    with pytest.raises(TargetError, match="discarded"), target.begin("b7/config") as upload:
        upload.file.write(b"abc")
        upload.commit(sha256=sha(b"abd"))
    assert target.listdir("") == ["b7/uploads"]


def test_a_stored_secret_never_shows_in_an_error_even_when_the_client_quotes_it(
    settings, caplog, tmp_path
):
    # given: a storage whose failure message contains its password (from a StoredSecret)
    StoredSecret.objects.create(name="leaky-password", value=PASSWORD)
    name = unique("leaky")
    settings.BACKUP_TARGETS = {
        name: {
            "backend": f"{__name__}.LeakyStorage",
            "options": {"fail": True},
            "secret": "leaky-password",
            "media": "memory",
            "offsite": True,
            "retry": {**FAST_RETRY, "max_retries": 1},
        }
    }
    caplog.set_level(logging.DEBUG)
    # when
    with pytest.raises(TargetError) as failure:
        source = tmp_path / "artifact"
        source.write_bytes(b"data")
        targets.get_target(name).put(source, "b8/config", sha256=sha(b"data"))
    # then
    text = str(failure.value)
    assert f"target {name}: upload " in text and "ConnectionError" in text
    assert "[REDACTED]" in text and PASSWORD not in text
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in str(exc) for exc in _chain(failure.value))


def _chain(exc: BaseException | None) -> list[BaseException]:
    found = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


# --- SFTP (a real OpenSSH server) ---------------------------------------------------------------


def test_an_sftp_copy_round_trips_byte_for_byte(settings, sftp_target, tmp_path):
    # given: a few segments' worth of data
    name = unique("offsite")
    settings.BACKUP_TARGETS = {name: sftp_target.spec(retry=FAST_RETRY)}
    target = targets.get_target(name)
    data = os.urandom(targets.SEGMENT * 2 + 777_777)
    source = tmp_path / "artifact"
    source.write_bytes(data)
    # when
    seen = []
    target.put(source, "b9/database-default", sha256=sha(data), on_bytes=seen.append)
    # then: on the server's disk, whole, private, under its final name only
    stored = sftp_target.root / "b9" / "database-default"
    assert stored.read_bytes() == data and sum(seen) == len(data)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert temporaries(sftp_target.root) == []
    assert target.sha256("b9/database-default") == sha(data)
    with target.open("b9/database-default") as stream:
        assert stream.read() == data
    assert target.size("b9/database-default") == len(data)
    assert target.listdir("") == ["b9/database-default"] and target.local_path("x") is None
    # and a streamed upload, then a delete that leaves no empty directory
    with target.begin("b9/redis") as upload:
        upload.file.write(data[:5000])
        assert not target.exists("b9/redis")
        upload.commit(sha256=sha(data[:5000]))
    assert (sftp_target.root / "b9" / "redis").read_bytes() == data[:5000]
    target.delete("b9/redis")
    target.delete("b9/database-default")
    assert list(sftp_target.root.iterdir()) == []


def test_an_sftp_copy_corrupted_before_commit_is_refused_and_removed(settings, sftp_target):
    name = unique("offsite")
    settings.BACKUP_TARGETS = {name: sftp_target.spec(retry=FAST_RETRY)}
    target = targets.get_target(name)
    data = os.urandom(100_000)
    upload = target.begin("b10/config")
    upload.file.write(data)
    upload.file.flush()
    # The server writes what it was sent on its own schedule: corrupt the file only once all of
    # it has landed, or a late write would repair it.
    deadline = time.monotonic() + 10
    while True:
        found = temporaries(sftp_target.root)
        if found and found[0].stat().st_size == len(data):
            break
        assert time.monotonic() < deadline, "the upload never reached the server's disk"
        time.sleep(0.05)
    [temporary] = found
    temporary.write_bytes(b"X" + data[1:])
    with pytest.raises(TargetError, match="the copy read back has SHA-256"):
        upload.commit(sha256=sha(data))
    assert temporaries(sftp_target.root) == [] and not target.exists("b10/config")


def test_a_connection_lost_mid_transfer_resumes_at_its_segment(settings, sftp_target):
    # given: an upload one segment in, then the server restarted (every session cut)
    settings.BREAKER_MIN_CALLS = 100
    name = unique("offsite")
    settings.BACKUP_TARGETS = {name: sftp_target.spec(retry=FAST_RETRY)}
    target = targets.get_target(name)
    data = os.urandom(targets.SEGMENT * 2 + 1000)
    upload = target.begin("b14/database-default")
    upload.file.write(data[: targets.SEGMENT])
    sftp_target.stop()
    sftp_target.start()
    # when
    upload.file.write(data[targets.SEGMENT :])
    upload.commit(sha256=sha(data))
    # then: whole, and read back across another cut
    assert (sftp_target.root / "b14" / "database-default").read_bytes() == data
    with target.open("b14/database-default") as stream:
        first = stream.read(1000)
        sftp_target.stop()
        sftp_target.start()
        assert first + stream.read() == data
    # Three connections: the first, one after each cut (found dead, or failed and retried).
    assert target.generation == 3
    [stats] = retry.stats(service=target.service)
    assert stats["exhausted"] == 0


def test_remote_targets_with_an_address_are_offered_to_the_monitor(settings, tmp_path):
    settings.BACKUP_TARGETS = {
        "local": fs_spec(tmp_path / "a"),
        "offsite": {
            "backend": "storages.backends.sftpstorage.SFTPStorage",
            "options": {"host": "backup.example.net", "params": {"port": 2222}},
            "media": "sftp",
            "offsite": True,
        },
    }
    assert targets.monitored_services() == {
        "backup-target-offsite": ("tcp", "backup.example.net:2222")
    }


def test_an_offsite_outage_is_retried_then_fails_and_is_counted(settings, sftp_target, tmp_path):
    # given: the offsite server down, a breaker that will not open yet
    settings.BREAKER_MIN_CALLS = 100
    name = unique("offsite")
    settings.BACKUP_TARGETS = {name: sftp_target.spec(retry=FAST_RETRY)}
    target = targets.get_target(name)
    source = tmp_path / "artifact"
    source.write_bytes(b"x" * 1000)
    sftp_target.stop()
    # when
    started = time.monotonic()
    with pytest.raises(TargetError) as failure:
        target.put(source, "b11/config", sha256=sha(b"x" * 1000))
    # then: four attempts (three retries), the reason named, no host secret involved
    assert str(failure.value).startswith(
        f"target {name}: upload b11/config failed after 4 attempts"
    )
    assert "NoValidConnectionsError" in str(failure.value)
    assert time.monotonic() - started < 15
    [stats] = retry.stats(service=target.service)
    assert stats["exhausted"] >= 1 and stats["attempts"] >= 4 and stats["retries"] >= 3
    assert stats["delay_ms_total"] > 0
    snapshot = breaker.get(target.service).snapshot()
    assert snapshot["state"] == "closed" and snapshot["failure_rate"] == 1.0
    assert snapshot["calls"] >= 4


def test_an_offsite_outage_opens_the_breaker_and_shows_in_recovery_status(
    settings, sftp_target, tmp_path, admin_api
):
    # given: a breaker that opens after three failed calls
    settings.BREAKER_MIN_CALLS = 3
    name = unique("offsite")
    settings.BACKUP_TARGETS = {name: sftp_target.spec(retry=FAST_RETRY)}
    target = targets.get_target(name)
    source = tmp_path / "artifact"
    source.write_bytes(b"y" * 10)
    sftp_target.stop()
    with pytest.raises(TargetError):
        target.put(source, "b12/config", sha256=sha(b"y" * 10))
    # when: the next copy is tried at once
    with pytest.raises(TargetError) as refused:
        target.put(source, "b12/redis", sha256=sha(b"y" * 10))
    # then: refused by the open breaker, which is a real row, and the retries are in the status
    assert f"circuit breaker {target.service} is open" in str(refused.value)
    row = BreakerState.objects.get(name=target.service)
    assert row.state == "open" and row.trips >= 1
    status = admin_api.get("/api/recovery/status")
    assert status.status_code == 200, status.content
    [counted] = [item for item in status.json()["retries"] if item["service"] == target.service]
    # Three failed attempts opened it during the first copy's back-off: the fourth attempt and
    # the second copy were refused without touching the network.
    assert counted["attempts"] >= 3 and counted["rejected_breaker"] >= 2


def test_a_server_back_during_the_back_off_lets_the_copy_succeed(settings, sftp_target, tmp_path):
    # given: the server down, coming back a second later (before the breaker would open)
    settings.BREAKER_MIN_CALLS = 100
    name = unique("offsite")
    policy = {"max_retries": 20, "base_delay": 0.2, "cap": 0.4, "deadline": 30.0}
    settings.BACKUP_TARGETS = {name: sftp_target.spec(retry=policy)}
    target = targets.get_target(name)
    data = os.urandom(200_000)
    source = tmp_path / "artifact"
    source.write_bytes(data)
    target.put(source, "b13/first", sha256=sha(data))  # a live connection, which will break
    sftp_target.stop()
    restart = threading.Timer(1.0, sftp_target.start)
    restart.start()
    # when
    try:
        target.put(source, "b13/second", sha256=sha(data))
    finally:
        restart.join()
    # then
    assert (sftp_target.root / "b13" / "second").read_bytes() == data
    [stats] = retry.stats(service=target.service)
    assert stats["succeeded_after_retry"] >= 1 and stats["retries"] >= 1
    assert stats["exhausted"] == 0


def test_an_sftp_password_from_a_stored_secret_never_shows_in_an_error(
    settings, sftp_target, caplog
):
    # given: a target that logs in with a password the server refuses (keys only)
    StoredSecret.objects.create(name="offsite-password", value=PASSWORD)
    name = unique("offsite")
    settings.BACKUP_TARGETS = {
        name: sftp_target.spec(key=False, secret="offsite-password", retry=FAST_RETRY)
    }
    caplog.set_level(logging.DEBUG)
    target = targets.get_target(name)
    # when
    with pytest.raises(TargetError) as refused:
        target.exists("anything")
    sftp_target.stop()
    with pytest.raises(TargetError) as down:
        target.exists("anything")
    # then: refused at once (a retry would not help), and the password nowhere
    assert "AuthenticationException" in str(refused.value)
    assert "after" not in str(refused.value)
    for failure in (refused, down):
        assert all(PASSWORD not in str(exc) for exc in _chain(failure.value))
    assert PASSWORD not in caplog.text
