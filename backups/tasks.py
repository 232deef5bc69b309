"""Thin Celery tasks of the backups area: the three job kinds and the beat schedules."""

from __future__ import annotations

import logging

from celery import shared_task

from backups import services
from backups.choices import BACKUP_JOB_KIND, DRILL_JOB_KIND, RESTORE_JOB_KIND, BackupKind
from bridge.jobs import job_task, run_job
from compliance.audit import AuditContext

log = logging.getLogger(__name__)


@job_task(
    kind=BACKUP_JOB_KIND,
    title="Backup",
    permission="backups.view_backup",
)
def backup_task(job_id: int) -> None:
    run_job(job_id, services.run_backup_job)


@job_task(
    kind=RESTORE_JOB_KIND,
    title="Restore",
    permission="backups.view_restorejob",
)
def restore_task(job_id: int) -> None:
    run_job(job_id, services.run_restore_job)


@job_task(
    kind=DRILL_JOB_KIND,
    title="Restore drill",
    permission="backups.view_restorejob",
)
def drill_task(job_id: int) -> None:
    run_job(job_id, services.run_restore_job)


@shared_task
def scheduled_backup_task(kind: str = BackupKind.FULL) -> str:
    """Beat: a full (daily) or an incremental (hourly); an incremental with no full to base it
    on takes a full instead, so a fresh install is protected from its first hour."""
    context = AuditContext.system()
    try:
        backup = services.start_backup(kind=kind, context=context)
    except services.BackupRefused as refused:
        if refused.code == "backups_busy":
            # The previous ones are still at it: this tick is skipped, loudly.
            log.error("scheduled %s backup skipped: %s", kind, refused)
            return ""
        if refused.code != "no_parent":
            raise
        log.warning("scheduled incremental: %s; taking a full backup", refused)
        backup = services.start_backup(kind=BackupKind.FULL, context=context)
    return str(backup.pk)


@shared_task
def cleanup_task() -> int:
    summary = services.cleanup(context=AuditContext.system())
    return len(summary["deleted"])


@shared_task
def scheduled_drill_task() -> int | None:
    try:
        restore = services.start_drill(context=AuditContext.system())
    except services.BackupRefused as refused:
        log.error("scheduled restore drill not run: %s", refused)
        return None
    return restore.pk


@shared_task
def reap_task() -> int:
    return services.reap_backups()
