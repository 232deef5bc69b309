"""What a malicious client, an insider with database rights, a slow target and a racing
retention run would do to backups, each turned into a test."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backups import services
from backups.choices import BackupKind, BackupStatus, RestoreStatus
from backups.models import Artifact, Backup, BackupCopy, RestoreJob, WalSegment
from bridge.choices import JobStatus
from bridge.jobs import reap_stale_jobs, run_job
from bridge.models import Job
from compliance.audit import AuditContext
from tests.backups.test_backups import restore, take, target_dir, tree

pytestmark = pytest.mark.django_db
SYSTEM = AuditContext.system()


@pytest.fixture
def media(settings) -> Path:
    root = Path(settings.MEDIA_ROOT)
    root.mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "b.bin").write_bytes(bytes(range(256)) * 100)
    return root


def test_a_backup_failed_by_the_reaper_while_it_ran_stays_failed(media, monkeypatch):
    backup = services.start_backup(
        kind="full", context=SYSTEM, enqueue=False, components=["uploads"]
    )
    real_check = services.check_321

    def reaped_meanwhile(row: Backup) -> dict:
        # The reaper's verdict lands just before the worker's own.
        services._mark_failed(row, "worker lost: no heartbeat (test)")
        return real_check(row)

    monkeypatch.setattr(services, "check_321", reaped_meanwhile)
    run_job(backup.job_id, services.run_backup_job)
    backup.refresh_from_db()
    assert backup.status == BackupStatus.FAILED
    assert "worker lost" in backup.error
    assert Job.objects.get(pk=backup.job_id).status == JobStatus.FAILED


@pytest.mark.django_db(transaction=True)
def test_a_long_silent_step_keeps_its_job_alive(settings):
    settings.JOB_HEARTBEAT_TIMEOUT = 1
    job = Job.objects.create(kind="backups.backup", status=JobStatus.RUNNING)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=30))
    with services._heartbeat(job):
        time.sleep(1.6)  # an upload through retries, a transaction: no progress to report
        assert reap_stale_jobs() == 0
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert timezone.now() - job.heartbeat_at < timedelta(seconds=1)


def test_retention_deletes_a_drilled_backup_and_keeps_the_drill_record(settings, media):
    settings.BACKUP_KEEP_DAILY = settings.BACKUP_KEEP_WEEKLY = settings.BACKUP_KEEP_MONTHLY = 0
    old = take(components=["uploads"])
    drill = services.start_drill(context=SYSTEM, enqueue=False)
    run_job(drill.job_id, services.run_restore_job)
    newer = take(components=["uploads"])
    Backup.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=400))
    summary = services.cleanup(context=SYSTEM)
    assert [row["id"] for row in summary["deleted"]] == [str(old.pk)]
    assert not summary["failed"]
    assert not Backup.objects.filter(pk=old.pk).exists()
    assert not (target_dir(settings, "local") / str(old.pk)).exists()
    record = RestoreJob.objects.get(pk=drill.pk)
    assert record.backup_id is None and record.backup_ref == str(old.pk)
    assert record.status == RestoreStatus.SUCCEEDED
    assert Backup.objects.filter(pk=newer.pk).exists()


def test_a_deletion_rechecks_that_nothing_started_depending_on_the_backup(media):
    parent = take(components=["uploads"])
    take(BackupKind.INCREMENTAL, components=["uploads"], parent=parent)
    # A retention plan made before the incremental existed would have deleted the parent.
    with pytest.raises(services.BackupRefused) as refused:
        services._delete(parent)
    assert refused.value.code == "has_dependents"
    assert Backup.objects.filter(pk=parent.pk).exists()


def test_a_misspelt_field_is_refused_not_read_as_restore_everything(operator_api, media):
    backup = take(components=["uploads"])
    for body in ({"componentz": ["uploads"]}, {"dryRun": True}, {"target_tme": "2026-01-01"}):
        response = operator_api.post(f"/api/backup/restore/{backup.pk}", body, format="json")
        assert response.status_code == 400, body
        assert set(response.json()) == set(body)
    assert not RestoreJob.objects.exists()


def test_a_catalog_row_pointed_at_another_backups_artifact_is_refused(settings, media):
    monday = take(components=["uploads"])
    (media / "a.txt").write_text("tuesday")
    tuesday = take(components=["uploads"])
    # An insider rewrites Tuesday's catalog rows to Monday's authentic artifact and key.
    Backup.objects.filter(pk=tuesday.pk).update(
        key_id=monday.key_id,
        master_key_id=monday.master_key_id,
        wrapped_key=monday.wrapped_key,
        manifest=monday.manifest,
    )
    source = monday.artifacts.get()
    Artifact.objects.filter(backup=tuesday).update(sha256=source.sha256)
    BackupCopy.objects.filter(artifact__backup=tuesday).update(location=f"{monday.pk}/uploads")
    job = restore(Backup.objects.get(pk=tuesday.pk), components=["uploads"])
    assert job.status == RestoreStatus.REFUSED
    assert f"belongs to backup {monday.pk}" in job.error
    assert (media / "a.txt").read_text() == "tuesday"


def test_deleting_a_backup_whose_location_was_edited_spares_the_other_backup(settings, media):
    keep = take(components=["uploads"])
    victim = target_dir(settings, "local") / f"{keep.pk}/uploads"
    doomed = take(components=["uploads"])
    BackupCopy.objects.filter(artifact__backup=doomed).update(location=f"{keep.pk}/uploads")
    services.delete_backup(backup=doomed, context=SYSTEM)
    assert victim.exists()
    assert not (target_dir(settings, "local") / str(doomed.pk)).exists()


def test_one_live_restore_at_a_time_and_no_backup_during_it(media):
    backup = take(components=["uploads"])
    first = services.start_restore(backup=backup, context=SYSTEM, enqueue=False)
    with pytest.raises(services.BackupRefused) as second:
        services.start_restore(backup=backup, context=SYSTEM, enqueue=False)
    assert second.value.code == "restore_in_progress"
    with pytest.raises(services.BackupRefused) as during:
        services.start_backup(kind="full", context=SYSTEM, enqueue=False)
    assert during.value.code == "restore_in_progress"
    # A dry run and a drill only read: they may run meanwhile.
    services.start_restore(backup=backup, context=SYSTEM, enqueue=False, dry_run=True)
    services.start_drill(context=SYSTEM, enqueue=False)
    run_job(first.job_id, services.run_restore_job)
    assert services.start_backup(kind="full", context=SYSTEM, enqueue=False)


def test_wal_retention_is_per_server(media):
    def base(server: str, first: str, days: int) -> Backup:
        backup = Backup.objects.create(
            kind=BackupKind.FULL,
            status=BackupStatus.SUCCEEDED,
            manifest={
                "database": {
                    "state": "done",
                    "units": {
                        services.PITR_BASE_UNIT: {
                            "manifest": {"system_identifier": server, "start_wal_file": first}
                        }
                    },
                }
            },
        )
        Artifact.objects.create(backup=backup, component="database", name="pitr-base", sha256="0")
        Backup.objects.filter(pk=backup.pk).update(created_at=timezone.now() - timedelta(days=days))
        return backup

    old_server, new_server = "7000000000000000001", "7000000000000000002"
    base(old_server, "0000000100000000000000A0", 1)
    base(new_server, "000000010000000000000003", 0)
    for server, names in {
        old_server: ["00000001000000000000009F", "0000000100000000000000A0"],
        new_server: [
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
        ],
    }.items():
        for name in names:
            WalSegment.objects.create(name=name, system_identifier=server, sha256="0")
    summary = services.cleanup(context=SYSTEM)
    left = set(WalSegment.objects.values_list("system_identifier", "name"))
    assert summary["wal"]["deleted"] == 2
    assert (old_server, "00000001000000000000009F") not in left
    assert (new_server, "000000010000000000000002") not in left
    assert (new_server, "000000010000000000000003") in left
    assert (new_server, "000000010000000000000004") in left
    assert (old_server, "0000000100000000000000A0") in left


def test_an_edited_wrapped_key_is_refused_naming_the_backup(media):
    backup = take(components=["uploads"])
    before = tree(media)
    Backup.objects.filter(pk=backup.pk).update(wrapped_key="AAAA" + backup.wrapped_key[4:])
    (media / "a.txt").write_text("changed")
    job = restore(Backup.objects.get(pk=backup.pk), components=["uploads"])
    assert job.status == RestoreStatus.REFUSED
    assert f"data key of backup {backup.pk}" in job.error
    assert tree(media) != before and (media / "a.txt").read_text() == "changed"


def test_progress_past_a_short_estimate_is_still_written_twice_a_second_at_most():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from bridge.jobs import Progress

    job = Job.objects.create(kind="backups.backup", status=JobStatus.RUNNING)
    meter = services._Meter(Progress(job), total=1024)
    with CaptureQueriesContext(connection) as queries:
        for _ in range(500):
            meter(1024 * 1024)  # far past the estimate: 500 MiB read of "1 KiB"
    updates = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) <= 3
    job.refresh_from_db()
    assert job.progress_total > job.progress_done > 0
    assert job.percent < 100
