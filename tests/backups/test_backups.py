"""Backups end to end through the services and the API: real files, real targets, real
restores (components: uploads and config need no server; the database is SQLite or PostgreSQL
as the run is; Redis is tested in test_redis.py)."""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from backups import services
from backups.choices import BackupKind, BackupStatus, CopyStatus, RestoreStatus
from backups.models import Backup, BackupCopy, RestoreJob
from bridge.choices import JobStatus
from bridge.jobs import run_job
from bridge.models import Job
from compliance.audit import AuditContext
from compliance.models import AuditEvent
from recovery.models import Alert

pytestmark = pytest.mark.django_db

SYSTEM = AuditContext.system()


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: its SHA-256 and permission bits."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mode & 0o7777,
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(autouse=True)
def _alerts_by_mail(settings) -> None:
    """Alerts go out by mail (Django's test outbox), so each one is an Alert row."""
    settings.RECOVERY_ALERT_EMAILS = ["ops@example.org"]


@pytest.fixture
def media(settings) -> Path:
    root = Path(settings.MEDIA_ROOT)
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "docs" / "report.pdf").write_bytes(os.urandom(200_000))
    (root / "docs" / "deep" / "notes.txt").write_text("first version\n" * 100)
    (root / "avatar.png").write_bytes(os.urandom(5_000))
    (root / "avatar.png").chmod(0o640)
    (root / "empty").write_bytes(b"")
    return root


def take(kind: str = BackupKind.FULL, **kwargs) -> Backup:
    backup = services.start_backup(kind=kind, context=SYSTEM, enqueue=False, **kwargs)
    run_job(backup.job_id, services.run_backup_job)
    backup.refresh_from_db()
    return backup


def restore(backup: Backup, **kwargs) -> RestoreJob:
    job = services.start_restore(backup=backup, context=SYSTEM, enqueue=False, **kwargs)
    run_job(job.job_id, services.run_restore_job)
    job.refresh_from_db()
    return job


def target_dir(settings, name: str) -> Path:
    return Path(settings.BACKUP_TARGETS[name]["options"]["location"])


def test_full_backup_writes_every_artifact_to_every_target_with_matching_sha256(settings, media):
    backup = take(components=["uploads", "config"])
    assert backup.status == BackupStatus.SUCCEEDED, backup.error
    assert {a.name for a in backup.artifacts.all()} == {"uploads", "config"}
    for copy in BackupCopy.objects.filter(artifact__backup=backup):
        assert copy.status == CopyStatus.COMMITTED
        path = target_dir(settings, copy.target) / copy.location
        assert hashlib.sha256(path.read_bytes()).hexdigest() == copy.sha256
        assert copy.sha256 == copy.artifact.sha256
        # Encrypted: not one source file's bytes appear in the artifact.
        assert b"first version" not in path.read_bytes()
    # Nothing left under a temporary name.
    for name in settings.BACKUP_TARGETS:
        assert not [p for p in target_dir(settings, name).rglob("*") if ".tmp" in p.name]
    assert backup.stored_bytes > 0 and backup.raw_bytes >= 205_000
    assert backup.manifest["uploads"]["state"] == "done"
    assert AuditEvent.objects.filter(action="backup.succeeded", object_id=str(backup.pk)).exists()


def test_unconfigured_component_is_reported_skipped_with_its_reason(settings, media):
    settings.BACKUP_REDIS_URL = ""
    backup = take(components=["redis", "uploads"])
    assert backup.status == BackupStatus.SUCCEEDED
    assert backup.manifest["redis"]["state"] == "skipped"
    assert "REDIS" in backup.manifest["redis"]["reason"]


def test_two_local_targets_violate_3_2_1_and_say_why(settings, media):
    backup = take(components=["uploads"])
    assert backup.rule_321_ok is False
    problems = " ".join(backup.rule_321["problems"])
    assert "2 complete copies" in problems and "offsite" in problems
    assert AuditEvent.objects.filter(action="backup.rule_321_violated").exists()
    report = services.status()
    assert any("3-2-1" in problem for problem in report["problems"])


def test_three_targets_on_two_media_one_offsite_meet_3_2_1(settings, media, tmp_path):
    settings.BACKUP_TARGETS = {
        **settings.BACKUP_TARGETS,
        "vault": {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": str(tmp_path / "vault")},
            "media": "nas",
            "offsite": True,
        },
    }
    backup = take(components=["uploads"])
    assert backup.rule_321_ok is True, backup.rule_321
    assert backup.rule_321["copies"] == 3 and backup.rule_321["offsite"] == ["vault"]


def test_a_missing_target_is_flagged(settings, media, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the target directory should be")
    settings.BACKUP_TARGETS = {
        **settings.BACKUP_TARGETS,
        "vault": {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": str(blocker / "sub")},
            "media": "nas",
            "offsite": True,
        },
    }
    backup = take(components=["uploads"])
    # The two good copies commit; the broken target is a failed copy and a 3-2-1 violation.
    assert backup.status == BackupStatus.SUCCEEDED
    assert backup.rule_321_ok is False
    assert BackupCopy.objects.filter(
        artifact__backup=backup, target="vault", status=CopyStatus.FAILED
    ).exists()
    assert any("vault" in problem for problem in backup.rule_321["problems"])


def test_uploads_restore_byte_for_byte_with_permissions(settings, media):
    before = tree(media)
    backup = take(components=["uploads"])
    (media / "docs" / "report.pdf").write_bytes(b"overwritten")
    (media / "new-file").write_text("added after the backup")
    (media / "avatar.png").unlink()
    job = restore(backup, components=["uploads"])
    assert job.status == RestoreStatus.SUCCEEDED, job.error
    assert tree(media) == before


def test_incremental_chain_restores_the_incremental_state(settings, media):
    full = take(components=["uploads"])
    (media / "docs" / "deep" / "notes.txt").write_text("second version\n")
    (media / "added.bin").write_bytes(os.urandom(1000))
    (media / "empty").unlink()
    incremental = take(BackupKind.INCREMENTAL, components=["uploads"])
    assert incremental.parent_id == full.pk
    # Only what changed was stored.
    assert incremental.stored_bytes < full.stored_bytes / 4
    expected = tree(media)
    (media / "added.bin").unlink()
    (media / "docs" / "report.pdf").write_bytes(b"later change")
    job = restore(incremental, components=["uploads"])
    assert job.status == RestoreStatus.SUCCEEDED, job.error
    assert tree(media) == expected


def test_dry_run_verifies_and_changes_nothing(settings, media):
    backup = take(components=["uploads"])
    (media / "avatar.png").write_bytes(b"changed")
    after_change = tree(media)
    job = restore(backup, components=["uploads"], dry_run=True)
    assert job.status == RestoreStatus.SUCCEEDED
    assert job.result["dry_run"] is True
    assert "uploads" in job.result["would_overwrite"][0]
    assert tree(media) == after_change


def flip_a_bit(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_copy_is_passed_over_for_a_good_one(settings, media):
    before = tree(media)
    backup = take(components=["uploads"])
    flip_a_bit(target_dir(settings, "local") / f"{backup.pk}/uploads")
    (media / "avatar.png").write_bytes(b"changed")
    job = restore(backup, components=["uploads"])
    assert job.status == RestoreStatus.SUCCEEDED, job.error
    assert tree(media) == before


@pytest.mark.parametrize("damage", ["bit_flip", "truncation"])
def test_every_copy_damaged_is_refused_naming_the_artifact_and_nothing_changes(
    settings, media, damage
):
    backup = take(components=["uploads"])
    for name in ("local", "local-mirror"):
        path = target_dir(settings, name) / f"{backup.pk}/uploads"
        if damage == "bit_flip":
            flip_a_bit(path)
        else:
            path.write_bytes(path.read_bytes()[:-5000])
    (media / "avatar.png").write_bytes(b"changed after the backup")
    current = tree(media)
    job = restore(backup, components=["uploads"])
    assert job.status == RestoreStatus.REFUSED
    assert "artifact uploads" in job.error
    assert ("tampered" in job.error) or ("truncated" in job.error)
    assert tree(media) == current
    assert Alert.objects.filter(subject__contains=f"Restore {job.pk}").exists()


def test_wrong_master_key_is_refused_naming_the_artifact(settings, media):
    import base64

    from security import crypto

    backup = take(components=["uploads"])
    settings.BRIDGE_MASTER_KEY = base64.b64encode(os.urandom(32)).decode()
    settings.BRIDGE_MASTER_KEY_PREVIOUS = []
    crypto.forget_keys()
    job = restore(backup, components=["uploads"])
    assert job.status in (RestoreStatus.REFUSED, RestoreStatus.FAILED)
    assert "master key" in job.error or "wrong_key" in job.error


def test_old_backups_restore_after_a_master_key_rotation(settings, media):
    import base64

    from security import crypto, rotation

    old_master = base64.b64encode(os.urandom(32)).decode()
    settings.BRIDGE_MASTER_KEY = old_master
    crypto.forget_keys()
    before = tree(media)
    backup = take(components=["uploads"])
    settings.BRIDGE_MASTER_KEY = base64.b64encode(os.urandom(32)).decode()
    settings.BRIDGE_MASTER_KEY_PREVIOUS = [old_master]
    crypto.forget_keys()
    rotation.rotate_keys(context=SYSTEM, enqueue=False)
    backup.refresh_from_db()
    assert backup.master_key_id == crypto.master_key()[0]
    # The old master key is gone; the catalog's re-wrapped key still opens the backup.
    settings.BRIDGE_MASTER_KEY_PREVIOUS = []
    crypto.forget_keys()
    (media / "avatar.png").write_bytes(b"changed")
    job = restore(backup, components=["uploads"])
    assert job.status == RestoreStatus.SUCCEEDED, job.error
    assert tree(media) == before


def test_restore_drill_restores_into_scratch_and_compares(settings, media):
    backup = take(components=["uploads", "config"])
    live = tree(media)
    drill = services.start_drill(context=SYSTEM, enqueue=False)
    run_job(drill.job_id, services.run_restore_job)
    drill.refresh_from_db()
    assert drill.status == RestoreStatus.SUCCEEDED, drill.error
    assert drill.backup_id == backup.pk
    assert drill.rto_seconds is not None and drill.rto_seconds > 0
    assert drill.result["ok"] is True
    assert set(drill.result["units"]) == {"uploads", "config"}
    assert all(unit["checks"] for unit in drill.result["units"].values())
    # The drill never touched the live files, and left no scratch behind.
    assert tree(media) == live
    assert not any(Path(settings.BACKUP_SCRATCH_DIR).glob("drill-*"))
    backup.refresh_from_db()
    assert backup.verified_at is not None
    assert services.status()["last_drill"]["status"] == "succeeded"


def test_a_drill_of_a_damaged_backup_fails_loudly(settings, media):
    backup = take(components=["uploads"])
    for name in ("local", "local-mirror"):
        flip_a_bit(target_dir(settings, name) / f"{backup.pk}/uploads")
    drill = services.start_drill(context=SYSTEM, enqueue=False)
    run_job(drill.job_id, services.run_restore_job)
    drill.refresh_from_db()
    assert drill.status == RestoreStatus.REFUSED
    assert Job.objects.get(pk=drill.job_id).status == JobStatus.FAILED
    assert "last restore drill refused" in " ".join(services.status()["problems"])
    assert Alert.objects.filter(subject__contains=f"Restore drill {drill.pk}").exists()


def test_a_backup_whose_worker_died_is_failed_and_its_copies_removed(settings, media):
    first = take(components=["uploads"])
    assert first.status == BackupStatus.SUCCEEDED
    dead = services.start_backup(kind=BackupKind.FULL, context=SYSTEM, enqueue=False)
    # What the worker got done before it was killed: running, one copy on disk.
    Backup.objects.filter(pk=dead.pk).update(status=BackupStatus.RUNNING)
    partial = target_dir(settings, "local") / str(dead.pk)
    partial.mkdir(parents=True)
    artifact = dead.artifacts.create(component="uploads", name="uploads", sha256="0" * 64)
    (partial / "uploads").write_bytes(b"half an artifact")
    BackupCopy.objects.create(
        artifact=artifact,
        target="local",
        media="disk",
        location=f"{dead.pk}/uploads",
        status=CopyStatus.COMMITTED,
    )
    # The job reaper failed its job (no heartbeat); the next look at backups fails the backup.
    Job.objects.filter(pk=dead.job_id).update(status=JobStatus.FAILED, error="worker lost")
    assert services.reap_backups() == 1
    dead.refresh_from_db()
    assert dead.status == BackupStatus.FAILED and "worker lost" in dead.error
    assert not (partial / "uploads").exists()
    assert not BackupCopy.objects.filter(artifact__backup=dead, status=CopyStatus.COMMITTED)
    # Partial copies never count, and the next backup succeeds.
    assert services.newest_backup() == first
    after = take(components=["uploads"])
    assert after.status == BackupStatus.SUCCEEDED


def age(backup: Backup, days: float) -> None:
    Backup.objects.filter(pk=backup.pk).update(created_at=timezone.now() - timedelta(days=days))


def test_retention_keeps_chains_whole_and_the_newest_full(settings, media):
    settings.BACKUP_RETENTION_DAYS = 30
    settings.BACKUP_KEEP_DAILY = 1
    settings.BACKUP_KEEP_WEEKLY = 0
    settings.BACKUP_KEEP_MONTHLY = 0
    old_full = take(components=["uploads"])
    old_incremental = take(BackupKind.INCREMENTAL, components=["uploads"])
    lone_old = take(components=["uploads"])
    newest_full = take(components=["uploads"])
    kept_incremental = take(BackupKind.INCREMENTAL, components=["uploads"], parent=old_full)
    age(old_full, 90)
    age(old_incremental, 89)
    age(lone_old, 60)
    age(newest_full, 40)
    age(kept_incremental, 1)
    plan = services.cleanup(context=SYSTEM, dry_run=True)
    deleted = {row["id"] for row in plan["deleted"]}
    kept = {row["id"]: row["reasons"] for row in plan["kept"]}
    assert deleted == {str(old_incremental.pk), str(lone_old.pk)}
    assert any("depends on it" in reason for reason in kept[str(old_full.pk)])
    assert "newest successful full backup" in kept[str(newest_full.pk)]
    assert Backup.objects.count() == 5  # a dry run deletes nothing
    services.cleanup(context=SYSTEM)
    assert set(Backup.objects.values_list("pk", flat=True)) == {
        old_full.pk,
        newest_full.pk,
        kept_incremental.pk,
    }
    assert not (target_dir(settings, "local") / str(lone_old.pk) / "uploads").exists()
    # The chain that was kept still restores.
    job = restore(kept_incremental, components=["uploads"])
    assert job.status == RestoreStatus.SUCCEEDED, job.error


def test_delete_is_refused_for_a_backup_others_depend_on(settings, media):
    full = take(components=["uploads"])
    incremental = take(BackupKind.INCREMENTAL, components=["uploads"])
    with pytest.raises(services.BackupRefused) as refused:
        services.delete_backup(backup=full, context=SYSTEM)
    assert refused.value.code == "has_dependents" and str(incremental.pk) in str(refused.value)
    services.delete_backup(backup=incremental, context=SYSTEM)
    services.delete_backup(backup=full, context=SYSTEM)
    assert not Backup.objects.exists()
    assert not list(target_dir(settings, "local").rglob("uploads"))


@pytest.mark.django_db(transaction=True)
def test_parallel_backups_do_not_corrupt_each_other(settings, media):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite serialises writers; the parallel case is PostgreSQL's")
    settings.BACKUP_MAX_CONCURRENT = 3
    results: list[Backup] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(take(components=["uploads", "config"]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [backup.status for backup in results] == [BackupStatus.SUCCEEDED] * 3
    assert len({backup.key_id for backup in results}) == 3
    before = tree(media)
    for backup in results:
        (media / "avatar.png").write_bytes(b"changed")
        job = restore(backup, components=["uploads"])
        assert job.status == RestoreStatus.SUCCEEDED, job.error
        assert tree(media) == before


def test_an_sftp_offsite_copy_meets_3_2_1_and_restores_when_local_copies_are_damaged(
    settings, media, sftp_target
):
    settings.BACKUP_TARGETS = {**settings.BACKUP_TARGETS, "offsite": sftp_target.spec()}
    before = tree(media)
    backup = take(components=["uploads"])
    assert backup.status == BackupStatus.SUCCEEDED, backup.error
    assert backup.rule_321_ok is True, backup.rule_321
    assert backup.rule_321["media"] == ["disk", "sftp"]
    assert backup.rule_321["offsite"] == ["offsite"]
    remote = BackupCopy.objects.get(artifact__backup=backup, target="offsite")
    assert remote.status == CopyStatus.COMMITTED
    assert (
        remote.sha256
        == hashlib.sha256((sftp_target.root / remote.location).read_bytes()).hexdigest()
    )
    for name in ("local", "local-mirror"):
        flip_a_bit(target_dir(settings, name) / f"{backup.pk}/uploads")
    (media / "avatar.png").write_bytes(b"changed")
    job = restore(backup, components=["uploads"])
    assert job.status == RestoreStatus.SUCCEEDED, job.error
    assert tree(media) == before


def test_an_offsite_outage_is_retried_then_flagged_and_the_local_copies_commit(
    settings, media, sftp_target
):
    settings.BACKUP_TARGETS = {
        **settings.BACKUP_TARGETS,
        "offsite": sftp_target.spec(
            retry={"max_retries": 2, "base_delay": 0.05, "cap": 0.1, "deadline": 5}
        ),
    }
    sftp_target.stop()
    backup = take(components=["uploads"])
    assert backup.status == BackupStatus.SUCCEEDED, backup.error
    failed = BackupCopy.objects.get(artifact__backup=backup, target="offsite")
    assert failed.status == CopyStatus.FAILED and failed.error
    assert backup.rule_321_ok is False
    assert any("offsite" in problem for problem in backup.rule_321["problems"])
    from recovery import retry

    stats = {row["service"]: row for row in retry.stats(service="backup-target-offsite")}
    assert stats, "the outage shows in the retry statistics"


@pytest.mark.django_db(transaction=True)
def test_parallel_starts_beyond_the_limit_are_refused_not_piled_up(settings, media):
    if connection.vendor != "postgresql":
        pytest.skip("the advisory lock is PostgreSQL's; SQLite serialises writers itself")
    settings.BACKUP_MAX_CONCURRENT = 2
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            services.start_backup(kind=BackupKind.FULL, context=SYSTEM, enqueue=False)
            outcomes.append("started")
        except services.BackupRefused as refused:
            outcomes.append(refused.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["backups_busy"] * 4 + ["started"] * 2
    assert Backup.objects.filter(status=BackupStatus.PENDING).count() == 2


def test_an_offsite_target_is_a_monitored_non_critical_service(settings, sftp_target):
    from recovery import monitor
    from recovery.models import Service

    settings.BACKUP_TARGETS = {**settings.BACKUP_TARGETS, "offsite": sftp_target.spec()}
    monitor.ensure_builtin_services()
    service = Service.objects.get(name="backup-target-offsite")
    assert service.builtin and not service.critical
    assert service.target.endswith(f":{sftp_target.port}")
    assert Service.objects.get(name="bridge-workers").critical
    # Taken out of the configuration, it is no longer monitored.
    settings.BACKUP_TARGETS = {
        name: spec for name, spec in settings.BACKUP_TARGETS.items() if name != "offsite"
    }
    monitor.ensure_builtin_services()
    assert not Service.objects.filter(name="backup-target-offsite").exists()
