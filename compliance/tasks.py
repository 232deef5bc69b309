from celery import shared_task

from bridge.jobs import job_task, run_job
from compliance import chain, checkpoints, dsr, verification
from compliance.audit import AuditContext
from compliance.choices import DSR_JOB_KIND, VERIFY_JOB_KIND, VerificationSource


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


@job_task(
    kind=DSR_JOB_KIND,
    title="Data subject request",
    permission="compliance.view_datasubjectrequest",
)
def data_subject_request_task(job_id: int) -> None:
    run_job(job_id, dsr.run_dsr_job)


# --- Monitoring: rules, alerts and the self-test (compliance/monitoring.py) -----------------
from compliance import monitoring  # noqa: E402
from compliance.choices import COMPLIANCE_TEST_JOB_KIND  # noqa: E402


@shared_task
def evaluate_rules_task() -> dict:
    # Second-approval requests past their expiry are marked expired on the same beat
    # (compliance/approvals.py), so the rules and the console see them as they are.
    from compliance import approvals

    approvals.expire_stale()
    return monitoring.evaluate_rules()


@shared_task
def send_violation_alert_task(violation_id: int) -> None:
    monitoring.send_violation_alert(violation_id)


@job_task(
    kind=COMPLIANCE_TEST_JOB_KIND,
    title="Compliance self-test",
    permission="compliance.run_compliance_test",
)
def compliance_test_task(job_id: int) -> None:
    run_job(job_id, monitoring.compliance_test_job)


# --- Retention: holds, DSR records, reports, audit purges (compliance/retention.py) -------
from django.conf import settings  # noqa: E402

from compliance import retention  # noqa: E402
from compliance.choices import RETENTION_JOB_KIND  # noqa: E402


@job_task(
    kind=RETENTION_JOB_KIND,
    title="Retention run",
    permission="compliance.view_auditpurge",
)
def retention_job_task(job_id: int) -> None:
    run_job(job_id, retention.run_retention_job)


@shared_task
def retention_task() -> int | None:
    # Daily (beat): only starts the job; RETENTION_DRY_RUN makes it report without removing.
    try:
        job = retention.start_retention(
            dry_run=settings.RETENTION_DRY_RUN, context=AuditContext.system(), source="schedule"
        )
    except retention.RetentionBusy:
        return None  # yesterday's run still going: it covers today's due records too
    return job.pk


# --- Reports: signed compliance reports (compliance/reports/) -----------------------------
from compliance import reports  # noqa: E402
from compliance.choices import REPORT_JOB_KIND  # noqa: E402


@job_task(
    kind=REPORT_JOB_KIND,
    title="Compliance report",
    permission="compliance.view_compliancereport",
)
def generate_report_task(job_id: int) -> None:
    run_job(job_id, reports.generate_report_job)
