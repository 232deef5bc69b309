from celery import shared_task

from bridge.jobs import job_task, run_job
from compliance import chain, checkpoints, verification
from compliance.audit import AuditContext
from compliance.choices import VERIFY_JOB_KIND, VerificationSource


@shared_task
def seal_audit_chain_task(sweep: bool = False) -> int:
    return chain.seal_all_pending(sweep=sweep)


@job_task(
    kind=VERIFY_JOB_KIND,
    title="Audit chain verification",
    permission="compliance.view_auditverification",
    cancellable=True,
    cancel_permission="compliance.cancel_verification",
)
def verify_audit_chain_task(job_id: int) -> None:
    run_job(job_id, verification.verify_chain_job)


@shared_task
def scheduled_verification_task() -> None:
    # Only queues the job: the job id then travels in the message, so a redelivery after a
    # lost worker finds the job taken instead of starting a second walk.
    verification.start_verification(
        context=AuditContext.system(), source=VerificationSource.SCHEDULE
    )


@shared_task
def checkpoint_audit_chain_task() -> int | None:
    # A sink that failed is retried here, every AUDIT_CHECKPOINT_INTERVAL.
    try:
        made = checkpoints.make_checkpoint()
    except checkpoints.CheckpointRefused:
        return None  # recorded and logged; verification names the damage
    return made.number if made else None
