"""The heal job's task, in its own module so the job kind registers in every process
(recovery/apps.py imports it) whatever else recovery's tasks do."""

from bridge.jobs import job_task, run_job
from recovery import healing
from recovery.choices import HEAL_JOB_KIND


@job_task(
    kind=HEAL_JOB_KIND,
    title="Self-healing",
    permission="recovery.view_healoperation",
    cancellable=True,
    cancel_permission="recovery.heal_service",
)
def heal_service_task(job_id: int) -> None:
    run_job(job_id, healing.heal_job)
