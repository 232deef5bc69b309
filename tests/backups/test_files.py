"""The uploads and config components on real files: byte-for-byte round trips with modes and
times, incremental chains, all-or-nothing restores, refused tar members, secrets kept out."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from backups.components import ComponentError, Destination, RestoreRefused
from backups.components.config import ConfigHandler
from backups.components.uploads import UploadsHandler

LIVE = Destination(live=True)
OLD_NS = 1_600_000_000_123_456_789  # 2020: far from "racy"


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under root: kind, content hash or link target, mode, mtime_ns."""
    found: dict[str, tuple] = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current) / name
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode), info.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", digest, stat.S_IMODE(info.st_mode), info.st_mtime_ns)
    info = root.stat()
    found["."] = ("dir", stat.S_IMODE(info.st_mode), info.st_mtime_ns)
    return found


def write(root: Path, rel: str, data: bytes, mode: int = 0o644, mtime_ns: int = OLD_NS) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def age_dirs(root: Path) -> None:
    """Directory times far in the past, deepest first (a write into one would change it)."""
    for current, _, _ in sorted(os.walk(root), key=lambda item: -item[0].count(os.sep)):
        os.utime(current, ns=(OLD_NS - 7, OLD_NS - 7))


@pytest.fixture
def media(settings, tmp_path) -> Path:
    root = tmp_path / "site" / "media"
    root.mkdir(parents=True)
    settings.MEDIA_ROOT = root
    settings.BACKUP_SCRATCH_DIR = tmp_path / "scratch"
    write(root, "docs/report.pdf", os.urandom(300_000), 0o640)
    write(root, "docs/deep/nested/notes.txt", b"first version\n" * 100, 0o600, OLD_NS + 1)
    write(root, "avatars/\u00fcn\u00efc\u00f8d\u00e9 \u6587\u4ef6 \U0001f600.png", os.urandom(5000))
    write(root, "empty", b"", 0o444)
    write(root, "bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(root, "odd/back\\slash and\nnewline.txt", b"legal on POSIX", 0o600)
    (root / "empty-dir").mkdir()
    (root / "empty-dir").chmod(0o750)
    os.symlink("../docs/report.pdf", root / "avatars" / "report-link")
    age_dirs(root)
    return root


@pytest.fixture
def uploads() -> UploadsHandler:
    return UploadsHandler()


def unit_of(handler):
    units = handler.units()
    assert isinstance(units, list), units
    return units[0]


def back_up(handler, parent: dict | None = None) -> tuple[dict, bytes, int]:
    out = io.BytesIO()
    read: list[int] = []
    manifest = handler.backup(unit_of(handler), out, parent=parent, on_bytes=read.append)
    return manifest, out.getvalue(), sum(read)


def restore(handler, chain: list[tuple[dict, bytes]], destination: Destination = LIVE) -> dict:
    return handler.restore(
        unit_of(handler),
        [manifest for manifest, _ in chain],
        [lambda data=data: io.BytesIO(data) for _, data in chain],
        destination=destination,
        on_bytes=lambda count: None,
    )


def members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        return [member.name for member in archive]


def leftovers(root: Path) -> list[str]:
    return [name for name in os.listdir(root.parent) if "bridge-" in name]


# --- uploads --------------------------------------------------------------------------------


def test_uploads_are_skipped_with_a_reason_when_media_root_does_not_exist(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "nowhere"
    assert UploadsHandler().units() == f"MEDIA_ROOT {tmp_path / 'nowhere'} does not exist"


def test_uploads_round_trip_byte_for_byte_with_modes_times_and_odd_names(media, uploads):
    # given a tree with nested and empty directories, an empty file, unicode names, a symlink
    before = snapshot(media)
    manifest, data, _ = back_up(uploads)
    assert manifest["count"] == 6
    assert manifest["links"] == {"avatars/report-link": "../docs/report.pdf"}
    assert manifest["files"]["empty"]["size"] == 0
    # when it is damaged every way after the backup
    (media / "docs" / "report.pdf").write_bytes(b"overwritten")
    (media / "bin" / "run.sh").chmod(0o600)
    (media / "empty").unlink()
    (media / "docs" / "deep" / "nested" / "notes.txt").unlink()
    (media / "new-dir").mkdir()
    (media / "new-dir" / "added").write_bytes(b"added after")
    # then the restore rebuilds it exactly
    result = restore(uploads, [(manifest, data)])
    assert snapshot(media) == before
    assert result["files"] == 6
    assert leftovers(media) == []


def test_an_incremental_stores_only_what_changed_and_its_chain_restores_the_final_tree(
    media, uploads
):
    full, full_data, _ = back_up(uploads)
    # one changed, one added, one deleted, one only touched, one only chmodded
    write(media, "docs/deep/nested/notes.txt", b"second version\n", 0o600, OLD_NS + 99)
    write(media, "docs/added.bin", os.urandom(2000), 0o640)
    (media / "avatars" / "\u00fcn\u00efc\u00f8d\u00e9 \u6587\u4ef6 \U0001f600.png").unlink()
    os.utime(media / "docs" / "report.pdf", ns=(OLD_NS + 5, OLD_NS + 5))
    (media / "bin" / "run.sh").chmod(0o700)
    age_dirs(media)
    expected = snapshot(media)

    incremental, inc_data, read = back_up(uploads, parent=full)

    assert incremental["incremental"] is True
    assert incremental["changed"] == ["docs/added.bin", "docs/deep/nested/notes.txt"]
    assert incremental["deleted"] == [
        "avatars/\u00fcn\u00efc\u00f8d\u00e9 \u6587\u4ef6 \U0001f600.png"
    ]
    assert members(inc_data) == [
        "data/docs/added.bin",
        "data/docs/deep/nested/notes.txt",
        "index.json",
    ]
    # The touched report was hashed (its mtime changed) but not stored; run.sh not even read.
    assert read == 300_000 + 2000 + len(b"second version\n")
    assert incremental["files"]["bin/run.sh"]["mode"] == 0o700
    assert incremental["count"] == 6 - 1 + 1
    # when the tree drifts again, the chain brings back the incremental's state
    write(media, "docs/added.bin", b"later")
    (media / "docs" / "report.pdf").unlink()
    restore(uploads, [(full, full_data), (incremental, inc_data)])
    assert snapshot(media) == expected


def test_a_chain_restores_files_that_became_directories_and_back(media, uploads):
    write(media, "shape/was-file", b"a file")
    write(media, "shape/was-dir/inner", b"in a directory")
    age_dirs(media)
    full, full_data, _ = back_up(uploads)
    (media / "shape" / "was-file").unlink()
    write(media, "shape/was-file/now-inside", b"now a directory")
    (media / "shape" / "was-dir" / "inner").unlink()
    (media / "shape" / "was-dir").rmdir()
    write(media, "shape/was-dir", b"now a file")
    age_dirs(media)
    expected = snapshot(media)
    incremental, inc_data, _ = back_up(uploads, parent=full)
    assert incremental["deleted"] == ["shape/was-dir/inner", "shape/was-file"]
    restore(uploads, [(full, full_data), (incremental, inc_data)])
    assert snapshot(media) == expected


def test_a_file_changed_within_the_timestamp_tick_of_a_backup_is_hashed_next_time(media, uploads):
    path = write(media, "fresh.txt", b"aaaa", 0o644, mtime_ns=0)
    os.utime(path)  # now: within the racy window
    full, _, _ = back_up(uploads)
    assert full["files"]["fresh.txt"]["racy"] is True
    # same size, same mtime: only the racy flag makes the next backup read it
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"bbbb")
    os.utime(path, ns=(stamp, stamp))
    incremental, _, _ = back_up(uploads, parent=full)
    assert incremental["changed"] == ["fresh.txt"]


def test_a_media_root_that_is_a_mount_point_has_its_contents_swapped(media, uploads, monkeypatch):
    # given MEDIA_ROOT on a filesystem of its own (a container volume): it cannot be renamed
    from backups.components import uploads as module

    real_ismount, real_swap, swaps = os.path.ismount, module._swap_contents, []
    monkeypatch.setattr(os.path, "ismount", lambda path: path == media or real_ismount(path))
    monkeypatch.setattr(
        module, "_swap_contents", lambda *args: swaps.append(args) or real_swap(*args)
    )
    before = snapshot(media)
    manifest, data, _ = back_up(uploads)
    (media / "docs" / "report.pdf").write_bytes(b"changed")
    write(media, "added", b"after the backup")
    # when it is restored, staging happens inside it and the entries are swapped
    restore(uploads, [(manifest, data)])
    assert len(swaps) == 1
    assert snapshot(media) == before
    assert leftovers(media) == []


def test_a_truncated_artifact_leaves_media_root_exactly_as_it_was(media, uploads):
    full, full_data, _ = back_up(uploads)
    write(media, "docs/deep/nested/notes.txt", b"third version\n")
    incremental, inc_data, _ = back_up(uploads, parent=full)
    (media / "docs" / "report.pdf").write_bytes(b"live change")
    write(media, "live-only", b"written after the backups")
    before = snapshot(media)
    in_index = full_data.rfind(b'"files"') + 10
    for cut in (100, len(full_data) // 2, in_index):
        with pytest.raises(ComponentError, match=r"truncated|damaged"):
            restore(uploads, [(full, full_data[:cut])])
        assert snapshot(media) == before
    with pytest.raises(ComponentError, match=r"truncated|damaged"):
        restore(uploads, [(full, full_data), (incremental, inc_data[:700])])
    assert snapshot(media) == before
    assert leftovers(media) == []


def malicious_tar(member: tarfile.TarInfo, content: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(member, io.BytesIO(content) if member.isreg() else None)
    return out.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, size: int = 4, target: str = ""):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = size if kind == tarfile.REGTYPE else 0
    member.linkname = target
    return member


@pytest.mark.parametrize(
    ("member", "refusal"),
    [
        (entry("data/../../escaped"), "not a relative path"),
        (entry("/etc/escaped"), "not a relative path"),
        (entry("data/a/../../../escaped"), "not a relative path"),
        (entry("data/link", tarfile.SYMTYPE, target="/etc/passwd"), "symlink"),
        (entry("data/hard", tarfile.LNKTYPE, target="/etc/passwd"), "hard link"),
        (entry("data/device", tarfile.CHRTYPE), "device"),
        (entry("data/fifo", tarfile.FIFOTYPE), "FIFO"),
        (entry("data/dir/", tarfile.DIRTYPE), "directory"),
    ],
)
def test_malicious_tar_members_are_refused_and_nothing_is_written(
    media, uploads, tmp_path, member, refusal
):
    manifest, _, _ = back_up(uploads)
    before = snapshot(media)
    data = malicious_tar(member, b"evil")
    with pytest.raises(ComponentError, match=refusal):
        restore(uploads, [(manifest, data)])
    assert snapshot(media) == before
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "site" / "escaped").exists()
    assert leftovers(media) == []


def test_a_manifest_with_paths_out_of_the_tree_is_refused(media, uploads):
    manifest, data, _ = back_up(uploads)
    for bad in (
        {"files": {**manifest["files"], "../x": manifest["files"]["empty"]}},
        {"links": {"escape": "../../etc/passwd"}},
        {"links": {"escape": "/etc/passwd"}},
        {"deleted": ["../../victim"]},
    ):
        with pytest.raises(RestoreRefused):
            restore(uploads, [({**manifest, **bad}, data)])


def test_a_symlink_out_of_media_root_is_skipped_with_a_note(media, uploads, tmp_path):
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", media / "escape")
    os.symlink("../../secret", media / "docs" / "relative-escape")
    manifest, data, _ = back_up(uploads)
    assert {item["path"] for item in manifest["skipped"]} == {"escape", "docs/relative-escape"}
    assert "escape" not in manifest["links"]
    (media / "escape").unlink()
    (media / "docs" / "relative-escape").unlink()
    restore(uploads, [(manifest, data)])
    assert not (media / "escape").exists()


def test_uploads_scratch_restore_checks_out_and_discard_removes_it(media, uploads, tmp_path):
    full, full_data, _ = back_up(uploads)
    write(media, "docs/added.bin", b"new")
    incremental, inc_data, _ = back_up(uploads, parent=full)
    live = snapshot(media)
    drill = Destination(live=False, scratch_dir=tmp_path / "scratch" / "drill-1", tag="1")
    restore(uploads, [(full, full_data), (incremental, inc_data)], drill)
    checked = uploads.check(unit_of(uploads), incremental, destination=drill)
    assert checked["ok"], checked
    assert snapshot(media) == live
    # a drill notices a restored file that differs
    restored = tmp_path / "scratch" / "drill-1" / "uploads"
    os.chmod(restored / "empty", 0o600)
    write(restored, "docs/added.bin", b"NEW")  # same size, mode and mtime: only content
    os.utime(restored / "bin" / "run.sh", ns=(OLD_NS + 3, OLD_NS + 3))
    checked = uploads.check(unit_of(uploads), incremental, destination=drill)
    failed = {item["name"] for item in checked["checks"] if not item["ok"]}
    assert failed == {"sha256", "mode", "mtime"}
    uploads.discard(unit_of(uploads), destination=drill)
    assert not (tmp_path / "scratch" / "drill-1" / "uploads").exists()


def test_an_incremental_of_one_percent_reads_only_the_changed_files(media, uploads):
    for number in range(200):
        write(media, f"bulk/{number:03}.bin", os.urandom(4096))
    full, _, full_read = back_up(uploads)
    for number in (7, 99):
        write(media, f"bulk/{number:03}.bin", os.urandom(4096), mtime_ns=OLD_NS + 1000)
    incremental, data, read = back_up(uploads, parent=full)
    assert read == 2 * 4096
    assert full_read > 100 * read
    assert incremental["archived_bytes"] == 2 * 4096
    assert len(data) < 2 * 4096 + 60_000  # two files and the index


# --- config ---------------------------------------------------------------------------------

SECRET_KEY = "django-insecure-UNIQUE-secret-key-4f1d2c9e8b7a6f5e4d3c2b1a0"
MASTER_KEY = "bWFzdGVyLWtleS1VTklRVUUtMzItYnl0ZXMtbG9uZy0hIQ=="
DB_PASSWORD = "db-UNIQUE-password-81f2"
BROKER_PASSWORD = "broker-UNIQUE-password-11aa"
NESTED_PASSWORD = "nested-UNIQUE-password-77cc"


@pytest.fixture
def config_files(settings, tmp_path) -> list[Path]:
    first = write(tmp_path / "etc", "bridge/bridge.conf", b"[bridge]\nworkers = 4\n", 0o640)
    second = write(tmp_path / "etc", "nginx/site.conf", b"server { listen 443; }\n", 0o600)
    settings.BACKUP_CONFIG_PATHS = [str(first), str(second)]
    settings.BACKUP_SCRATCH_DIR = tmp_path / "scratch"
    settings.SECRET_KEY = SECRET_KEY
    settings.BRIDGE_MASTER_KEY = MASTER_KEY
    settings.BACKUP_DATABASES = [f"postgres://app:{DB_PASSWORD}@db.internal:5432/app"]
    settings.CELERY_BROKER_URL = f"amqp://bridge:{BROKER_PASSWORD}@mq.internal:5672//"
    settings.PAYMENT_GATEWAY = {"url": "https://pay.example", "password": NESTED_PASSWORD}
    return [first, second]


def test_config_round_trip_restores_content_mode_and_mtime(config_files):
    handler = ConfigHandler()
    before = {
        path: (path.read_bytes(), path.stat().st_mode, path.stat().st_mtime_ns)
        for path in config_files
    }
    manifest, data, _ = back_up(handler)
    assert [item["path"] for item in manifest["files"]] == [str(path) for path in config_files]
    config_files[0].write_bytes(b"broken\n")
    config_files[0].chmod(0o666)
    config_files[1].unlink()
    result = restore(handler, [(manifest, data)])
    after = {
        path: (path.read_bytes(), path.stat().st_mode, path.stat().st_mtime_ns)
        for path in config_files
    }
    assert after == before
    assert result["settings_applied"] is False
    assert result["settings"]["BACKUP_CONFIG_PATHS"] == [str(path) for path in config_files]
    assert not [name for name in os.listdir(config_files[0].parent) if "bridge-restore" in name]


def test_secrets_never_reach_the_config_artifact(config_files, settings):
    from django.db import connections

    manifest, data, _ = back_up(ConfigHandler())
    secrets = [SECRET_KEY, MASTER_KEY, DB_PASSWORD, BROKER_PASSWORD, NESTED_PASSWORD]
    secrets += [
        connection.settings_dict.get("PASSWORD")
        for connection in connections.all()
        if connection.settings_dict.get("PASSWORD")
    ]
    for secret in secrets:
        assert secret.encode() not in data
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        for member in archive:
            if member.name == "settings.json":
                document = json.loads(archive.extractfile(member).read())
    assert "SECRET_KEY" not in document
    assert "BRIDGE_MASTER_KEY" not in document
    assert document["BACKUP_DATABASES"] == ["postgres://app:[REDACTED]@db.internal:5432/app"]
    assert "password" not in document["PAYMENT_GATEWAY"]
    assert document["PAYMENT_GATEWAY"]["url"] == "https://pay.example"
    assert manifest["warnings"] == []


def test_a_config_file_holding_a_secret_is_kept_and_named_in_warnings(config_files):
    config_files[0].write_bytes(f"SECRET_KEY={SECRET_KEY}\n".encode())
    manifest, _, _ = back_up(ConfigHandler())
    assert manifest["warnings"] == [
        f"{config_files[0]} holds the value of SECRET_KEY (kept as is, encrypted)"
    ]


def test_a_missing_configured_file_fails_the_backup_naming_it(config_files, settings):
    missing = config_files[0].parent / "gone.conf"
    settings.BACKUP_CONFIG_PATHS = [*settings.BACKUP_CONFIG_PATHS, str(missing)]
    with pytest.raises(ComponentError, match=str(missing)):
        back_up(ConfigHandler())


def test_a_truncated_config_artifact_changes_no_file(config_files):
    handler = ConfigHandler()
    manifest, data, _ = back_up(handler)
    config_files[0].write_bytes(b"changed\n")
    before = {path: path.read_bytes() for path in config_files}
    for cut in (600, len(data) // 2, data.rfind(b'"files"') + 10):
        with pytest.raises(ComponentError, match=r"truncated|damaged"):
            restore(handler, [(manifest, data[:cut])])
        assert {path: path.read_bytes() for path in config_files} == before
    assert not [name for name in os.listdir(config_files[0].parent) if "bridge-restore" in name]


def test_config_scratch_restore_checks_out_and_is_discarded(config_files, tmp_path):
    handler = ConfigHandler()
    manifest, data, _ = back_up(handler)
    config_files[0].write_bytes(b"live\n")
    drill = Destination(live=False, scratch_dir=tmp_path / "scratch" / "d", tag="d")
    restore(handler, [(manifest, data)], drill)
    assert config_files[0].read_bytes() == b"live\n"
    checked = handler.check(unit_of(handler), manifest, destination=drill)
    assert checked["ok"], checked
    handler.discard(unit_of(handler), destination=drill)
    assert not (tmp_path / "scratch" / "d" / "config").exists()


def test_a_symlinked_config_file_is_restored_where_the_link_points(config_files, settings):
    link = config_files[0].parent / "current.conf"
    link.symlink_to(config_files[0].name)
    settings.BACKUP_CONFIG_PATHS = [str(link)]
    handler = ConfigHandler()
    manifest, data, _ = back_up(handler)
    config_files[0].write_bytes(b"drifted\n")
    restore(handler, [(manifest, data)])
    assert link.is_symlink()
    assert config_files[0].read_bytes() == b"[bridge]\nworkers = 4\n"
