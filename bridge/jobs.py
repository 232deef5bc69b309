"""Background runs as rows: start, run with progress, cancel, reap (after NetBox's jobs).

The pattern for every long operation:

    job = start_job(kind=..., context=..., params=...)     # the service: a row + the task
    @job_task(kind=..., permission=..., cancellable=True)  # the app's tasks.py, three lines
    def do_thing_task(job_id): run_job(job_id, services.do_thing)
    def do_thing(job, progress): ... progress.update(done, total) ... return {...result...}

The API answers 202 with the job and a Location to poll (/api/jobs/{id}). Every state change
is a compare-and-swap from the expected status, so a job runs at most once even when the
broker redelivers it, and a job the reaper has failed cannot be revived by a late worker.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from compliance.redaction import redact

log = logging.getLogger(__name__)

# Progress is written at most this often (and always at the end): a loop reporting every
# item would otherwise write a row per item.
_PROGRESS_MIN_SECONDS = 0.5


class JobError(Exception):
    """A request about a job that cannot be honoured (not cancellable, already finished)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# BaseException, like asyncio.CancelledError: a job's own `except Exception` around an item
# must not swallow the order to stop.
class JobCancelled(BaseException):
    """Raised inside a job by `Progress.update` once someone asked for it to be cancelled."""


class JobLost(BaseException):
    """The row left `running` under the worker's feet (the reaper failed it): stop working."""


@dataclass(frozen=True)
class JobKind:
    """A registered kind of job: who may see it, whether it stops when asked, which task."""

    name: str
    title: str
    permission: str
    cancellable: bool
    task: Any
    cancel_permission: str


KINDS: dict[str, JobKind] = {}


def job_task(
    *,
    kind: str,
    title: str,
    permission: str,
    cancellable: bool = False,
    cancel_permission: str = "",
) -> Callable[[Callable], Any]:
    """Declare a Celery task as the runner of `kind` (the task takes the job id).

    `permission` lets a user see jobs of the kind; `cancel_permission` (default the same)
    lets them cancel one.
    """

    def register(function: Callable) -> Any:
        task = shared_task(name=f"{function.__module__}.{function.__name__}")(function)
        KINDS[kind] = JobKind(
            kind, title, permission, cancellable, task, cancel_permission or permission
        )
        return task

    return register


def kind_of(job: Job) -> JobKind | None:
    return KINDS.get(job.kind)


def visible_jobs(user: Any) -> QuerySet[Job]:
    """The jobs whose kind the user may see (the kind's permission, checked with has_perm)."""
    kinds = [kind.name for kind in KINDS.values() if user.has_perm(kind.permission)]
    return Job.objects.filter(kind__in=kinds)


class Progress:
    """What a running job reports: done/total and a message, plus the heartbeat."""

    def __init__(self, job: Job, listener: Callable[[Job], None] | None = None) -> None:
        self.job = job
        self._listener = listener
        self._written = 0.0

    def update(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress; raises JobCancelled once a cancel was asked for."""
        job = self.job
        job.progress_done = done
        if total is not None:
            job.progress_total = total
        if message is not None:
            job.progress_message = message[:200]
        now = time.monotonic()
        final = job.progress_total is not None and done >= job.progress_total
        if now - self._written >= _PROGRESS_MIN_SECONDS or final:
            self._written = now
            self._write()
        if self._listener:
            self._listener(job)

    def beat(self) -> None:
        """Heartbeat without progress, for a long step that cannot count."""
        self._write()

    def _write(self) -> None:
        job = self.job
        job.heartbeat_at = timezone.now()
        updated = Job.objects.filter(
            pk=job.pk, status=JobStatus.RUNNING, cancel_requested=False
        ).update(
            progress_done=job.progress_done,
            progress_total=job.progress_total,
            progress_message=job.progress_message,
            heartbeat_at=job.heartbeat_at,
        )
        if updated:
            return
        current = Job.objects.filter(pk=job.pk).values_list("status", "cancel_requested").first()
        if current and current[0] == JobStatus.RUNNING and current[1]:
            raise JobCancelled
        raise JobLost


def _actor_context(job: Job) -> AuditContext:
    return AuditContext(actor_id=job.actor_id, actor_username=job.actor_username)


def start_job(
    *,
    kind: str,
    context: AuditContext,
    params: dict | None = None,
    enqueue: bool = True,
) -> Job:
    """Create a pending job and, once committed, hand it to a worker.

    `enqueue=False` leaves the running to the caller (a command that runs it inline with
    `run_job`, or a scheduled task that is itself the worker).
    """
    spec = KINDS[kind]
    with transaction.atomic():
        job = Job.objects.create(
            kind=kind,
            actor_id=context.actor_id,
            actor_username=context.actor_username,
            # Stored and served by the API: redacted like audit details (a target URL with
            # its password, a token passed by mistake).
            params=redact(params or {}),
        )
        record_event(
            action=AuditAction.JOB_REQUESTED,
            context=context,
            object_type="bridge.job",
            object_id=job.pk,
            details={"kind": kind, "params": params or {}},
        )
        if enqueue:
            transaction.on_commit(lambda: _enqueue(job, spec))
    return job


def _enqueue(job: Job, spec: JobKind) -> None:
    try:
        result = spec.task.apply_async(args=[job.pk])
    except Exception as exc:
        # The broker refused it: say so on the row at once rather than leave it pending.
        _log_failure(job, "could not be queued", exc)
        _finish(job, JobStatus.FAILED, error=f"could not be queued: {type(exc).__name__}")
        return
    Job.objects.filter(pk=job.pk, task_id="").update(task_id=(result.id or "")[:64])


def _log_failure(job: Job, what: str, exc: BaseException) -> str:
    """Log a failure loudly with its stack, and return its text, both with secrets masked.

    An exception's text can carry what it failed on (a connection URL with its password, a
    command line): the message is redacted, and the traceback is logged as frames only, since
    its last line would repeat the unredacted message.
    """
    error = redact(f"{type(exc).__name__}: {exc}")
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("job %s (%s) %s: %s\n%s", job.pk, job.kind, what, error, frames)
    return error


def run_job(
    job_id: int,
    work: Callable[[Job, Progress], dict | None],
    *,
    listener: Callable[[Job], None] | None = None,
) -> Job | None:
    """Claim a pending job and run `work(job, progress)`; record how it ended.

    Returns the finished job, or None when the job was not pending (taken by another worker,
    cancelled before it started, or reaped). Never inside a transaction: progress must commit.
    """
    now = timezone.now()
    claimed = Job.objects.filter(pk=job_id, status=JobStatus.PENDING).update(
        status=JobStatus.RUNNING, started_at=now, heartbeat_at=now
    )
    if not claimed:
        log.info("job %s was not pending; not run again", job_id)
        return None
    from compliance.sox import change_context

    job = Job.objects.get(pk=job_id)
    progress = Progress(job, listener)
    try:
        # Rows a job changes in SOX-audited tables name the person who asked for the job.
        with change_context(actor=_actor_context(job), request_id=f"job-{job.pk}"):
            result = work(job, progress) or {}
    except JobCancelled:
        _finish(job, JobStatus.CANCELLED, error="cancelled on request")
    except JobLost:
        log.warning("job %s was taken from this worker (reaped); stopped", job_id)
        return None
    except Exception as exc:
        error = _log_failure(job, "failed", exc)
        _finish(job, JobStatus.FAILED, error=error[:2000])
    else:
        _finish(job, JobStatus.SUCCEEDED, result=result)
    job.refresh_from_db()
    return job


_FINISH_ACTIONS = {
    JobStatus.SUCCEEDED: AuditAction.JOB_SUCCEEDED,
    JobStatus.FAILED: AuditAction.JOB_FAILED,
    JobStatus.CANCELLED: AuditAction.JOB_CANCELLED,
}


def _finish(
    job: Job,
    status: JobStatus,
    *,
    result: dict | None = None,
    error: str = "",
    expected: tuple[JobStatus, ...] = (JobStatus.RUNNING, JobStatus.PENDING),
    only_if: dict[str, Any] | None = None,
) -> bool:
    with transaction.atomic():
        changes: dict[str, Any] = {"status": status, "finished_at": timezone.now(), "error": error}
        if result is not None:
            changes["result"] = result
        if status == JobStatus.SUCCEEDED and job.progress_total:
            changes["progress_done"] = job.progress_total
        done = Job.objects.filter(pk=job.pk, status__in=expected, **(only_if or {})).update(
            **changes
        )
        if done:
            record_event(
                action=_FINISH_ACTIONS[status],
                context=_actor_context(job),
                object_type="bridge.job",
                object_id=job.pk,
                details={"kind": job.kind, "error": error} if error else {"kind": job.kind},
            )
    return bool(done)


def cancel_job(*, job: Job, context: AuditContext) -> Job:
    """Cancel a pending job at once; ask a running one to stop at its next progress report."""
    spec = kind_of(job)
    if spec is None or not spec.cancellable:
        raise JobError("This kind of job cannot be cancelled.", "not_cancellable")
    with transaction.atomic():
        if Job.objects.filter(pk=job.pk, status=JobStatus.PENDING).update(
            status=JobStatus.CANCELLED, finished_at=timezone.now(), error="cancelled before start"
        ):
            outcome = "cancelled"
        elif Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(cancel_requested=True):
            outcome = "cancel_requested"
        else:
            raise JobError("The job has already finished.", "job_finished")
        record_event(
            action=AuditAction.JOB_CANCEL_REQUESTED,
            context=context,
            object_type="bridge.job",
            object_id=job.pk,
            details={"kind": job.kind, "outcome": outcome},
        )
    job.refresh_from_db()
    return job


def reap_stale_jobs() -> int:
    """Fail running jobs whose worker stopped beating, and pending jobs nobody ever took.

    A worker killed mid-job (OOM, a deploy, a lost host) leaves its row `running` forever;
    this says so on the row, with the last heartbeat, so nobody waits on a dead job.
    """
    now = timezone.now()
    stale = timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT)
    never = timedelta(seconds=settings.JOB_PENDING_TIMEOUT)
    reaped = 0
    for job in Job.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=now - stale):
        reason = (
            f"worker lost: no heartbeat since {job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC "
            f"(limit {settings.JOB_HEARTBEAT_TIMEOUT} s)"
        )
        # Only if it is still silent: a heartbeat written since the SELECT saves the job.
        reaped += _finish(
            job,
            JobStatus.FAILED,
            error=reason,
            expected=(JobStatus.RUNNING,),
            only_if={"heartbeat_at__lt": now - stale},
        )
    for job in Job.objects.filter(status=JobStatus.PENDING, created_at__lt=now - never):
        reason = f"never started: no worker took it within {settings.JOB_PENDING_TIMEOUT} s"
        reaped += _finish(job, JobStatus.FAILED, error=reason, expected=(JobStatus.PENDING,))
    if reaped:
        log.error("reaped %s stale job(s)", reaped)
    return reaped
