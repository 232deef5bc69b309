"""Backups through a real Celery worker on the real broker: one that succeeds end to end, and
one whose worker is killed (SIGKILL) mid-backup: the backup ends failed, its partial copies
never count, and the next backup succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from backups import services
from backups.choices import BackupStatus, CopyStatus
from backups.models import Backup, BackupCopy
from backups.tasks import backup_task
from bridge.jobs import reap_stale_jobs
from bridge.models import Job
from compliance.audit import AuditContext

SYSTEM = AuditContext.system()


@pytest.fixture
def backup_env(settings, tmp_path, monkeypatch) -> Path:
    """The worker process sees the same targets and MEDIA_ROOT as the test (environment)."""
    targets = {
        name: {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": str(tmp_path / name)},
            "media": "disk",
            "offsite": False,
        }
        for name in ("local", "local-mirror")
    }
    media = tmp_path / "media"
    media.mkdir()
    for key, value in {
        "BACKUP_TARGETS": json.dumps(targets),
        "BACKUP_EXTRA_TARGETS": "{}",
        "MEDIA_ROOT": str(media),
        "BACKUP_SCRATCH_DIR": str(tmp_path / "scratch"),
        "BACKUP_REDIS_URL": "",
    }.items():
        monkeypatch.setenv(key, value)
    settings.BACKUP_TARGETS = targets
    settings.MEDIA_ROOT = media
    settings.BACKUP_SCRATCH_DIR = tmp_path / "scratch"
    return media


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start(queue: str) -> Backup:
    backup = services.start_backup(
        kind="full", context=SYSTEM, components=["uploads"], enqueue=False
    )
    backup_task.apply_async(args=[backup.job_id], queue=queue)
    return backup


@pytest.mark.servers
def test_a_worker_killed_mid_backup_leaves_a_failed_backup_and_the_next_succeeds(
    backup_env, worker_queue, settings
):
    media = backup_env
    # Enough incompressible data that the backup is still running when the worker dies.
    for index in range(24):
        (media / f"blob-{index}").write_bytes(os.urandom(16 * 1024 * 1024))
    doomed = start(worker_queue)
    wait_for(
        lambda: Job.objects.get(pk=doomed.job_id).progress_done > 32 * 1024 * 1024,
        "the backup to be under way",
    )
    workers = subprocess.run(
        ["pgrep", "-f", worker_queue], capture_output=True, text=True, check=False
    ).stdout.split()
    assert workers
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    doomed.refresh_from_db()
    assert doomed.status == BackupStatus.RUNNING

    # The job reaper notices the silent worker; the backups reaper then fails the backup.
    settings.JOB_HEARTBEAT_TIMEOUT = 1
    time.sleep(1.5)
    assert reap_stale_jobs() >= 1
    services.reap_backups()
    doomed.refresh_from_db()
    assert doomed.status == BackupStatus.FAILED
    assert "worker lost" in doomed.error
    assert not BackupCopy.objects.filter(artifact__backup=doomed, status=CopyStatus.COMMITTED)
    assert not (
        Path(settings.BACKUP_TARGETS["local"]["options"]["location"]) / str(doomed.pk) / "uploads"
    ).exists()
    assert services.newest_backup() is None

    # The next backup (inline here: the worker is dead) succeeds.
    after = services.start_backup(
        kind="full", context=SYSTEM, components=["uploads"], enqueue=False
    )
    from bridge.jobs import run_job

    run_job(after.job_id, services.run_backup_job)
    after.refresh_from_db()
    assert after.status == BackupStatus.SUCCEEDED, after.error
    assert services.newest_backup() == after


@pytest.mark.servers
def test_a_real_worker_takes_a_backup(backup_env, worker_queue):
    (backup_env / "a.txt").write_text("alpha")
    backup = start(worker_queue)
    wait_for(
        lambda: Backup.objects.get(pk=backup.pk).status == BackupStatus.SUCCEEDED,
        "the backup to succeed",
    )
    backup.refresh_from_db()
    assert backup.artifacts.get().copies.filter(status=CopyStatus.COMMITTED).count() == 2
    assert Job.objects.get(pk=backup.job_id).percent == 100
