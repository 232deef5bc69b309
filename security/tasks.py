"""Thin Celery tasks of the security area: take ids, call a service."""

from celery import shared_task

from bridge.jobs import job_task, run_job
from compliance.audit import AuditContext
from security import rotation, subject_keys
from security.choices import REENCRYPT_JOB_KIND


@job_task(
    kind=REENCRYPT_JOB_KIND,
    title="Re-encryption after a key rotation",
    permission="security.view_datakey",
)
def reencrypt_task(job_id: int) -> None:
    run_job(job_id, rotation.reencrypt_job)


@shared_task
def backup_subject_keys_task() -> dict:
    return subject_keys.backup_subject_keys(context=AuditContext.system())
