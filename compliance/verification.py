"""Verifying the hash chain: recompute every sealed event, as a job with progress.

No web thread walks the chain: the API and the console start a verification job and read the
latest finished one; the CLI runs the same job inline to print its progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bridge.choices import JobStatus
from bridge.jobs import Progress, start_job
from bridge.models import Job
from compliance.audit import AuditContext, record_event
from compliance.chain import (
    _EVENT_FIELDS,
    GENESIS_HASH,
    HASH_VERSIONS,
    chain_head,
    event_hash,
    unsealed_count,
)
from compliance.choices import VERIFY_JOB_KIND, AuditAction, VerificationSource
from compliance.models import AuditSeal, AuditVerification

log = logging.getLogger(__name__)

PROGRESS_EVERY = 20_000


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    checked: int
    unsealed: int
    first_broken_id: int | None
    reason: str


def check_chain(*, on_progress: Callable[[int, int], None] | None = None) -> ChainCheck:
    """Recompute every sealed event's hash and link, in seq order, up to the current head.

    `on_progress(checked, total)` is called every PROGRESS_EVERY events.
    """
    head = chain_head()
    head_seq = head.last_seq if head else 0
    head_hash = head.last_hash if head else GENESIS_HASH
    unsealed = unsealed_count()
    expected_seq, prev, checked = 1, GENESIS_HASH, 0
    columns = (
        "seq",
        "prev_hash",
        "hash",
        "hash_version",
        *(f"event__{name}" for name in _EVENT_FIELDS),
    )
    rows = AuditSeal.objects.filter(seq__lte=head_seq).order_by("seq").values_list(*columns)
    for row in rows.iterator(chunk_size=2000):
        seq, prev_hash, stored_hash, version = row[:4]
        fields = dict(zip(_EVENT_FIELDS, row[4:], strict=True))
        fields.update(seq=seq, prev_hash=prev_hash)
        if seq != expected_seq:
            # The removed event's seal is still there (its own table, no foreign key): name the
            # event that is gone, not the one after the gap.
            seals = AuditSeal.objects.filter(seq=expected_seq)
            gone = seals.values_list("event_id", flat=True).first()
            return ChainCheck(
                False,
                checked,
                unsealed,
                gone if gone is not None else fields["id"],
                f"event(s) with seq {expected_seq}..{seq - 1} are missing",
            )
        if prev_hash != prev:
            return ChainCheck(
                False, checked, unsealed, fields["id"], "prev_hash does not match the event before"
            )
        if version not in HASH_VERSIONS:
            return ChainCheck(
                False, checked, unsealed, fields["id"], f"unknown hash_version {version}"
            )
        if event_hash(fields, version) != stored_hash:
            return ChainCheck(
                False, checked, unsealed, fields["id"], "content does not match its hash"
            )
        prev = stored_hash
        expected_seq += 1
        checked += 1
        if on_progress and checked % PROGRESS_EVERY == 0:
            on_progress(checked, head_seq)
    if checked != head_seq or prev != head_hash:
        return ChainCheck(
            False,
            checked,
            unsealed,
            head.last_event_id if head else None,
            f"the chain ends at seq {checked} but its head records seq {head_seq}",
        )
    return ChainCheck(True, checked, unsealed, None, "")


def start_verification(
    *,
    context: AuditContext,
    source: VerificationSource,
    enqueue: bool = True,
    reuse_active: bool = True,
) -> Job:
    """Ask for a verification run (a job); the worker runs `verify_chain_job`.

    One at a time: while a run is pending or running, asking again returns that run, so a
    burst of requests cannot queue a walk of the whole chain each and starve the sealer. The
    command line (`reuse_active=False`) runs its own, to print its progress.
    """
    if reuse_active:
        active = (
            AuditVerification.objects.filter(status__in=(JobStatus.PENDING, JobStatus.RUNNING))
            .order_by("id")
            .first()
        )
        if active is not None:
            return active
    return start_job(
        kind=VERIFY_JOB_KIND, context=context, params={"source": str(source)}, enqueue=enqueue
    )


def verify_chain_job(job: Job, progress: Progress) -> dict:
    """The job's work: check the chain, audit the outcome, return it as the job's result.

    A broken chain is a successful run with `ok: false`, logged at ERROR level and recorded as
    `audit.broken`; a run that could not finish is a failed job.
    """
    head = chain_head()
    progress.update(0, head.last_seq if head else 0, "verifying the hash chain")
    result = check_chain(on_progress=lambda checked, total: progress.update(checked, total))
    record_event(
        action=AuditAction.AUDIT_VERIFIED if result.ok else AuditAction.AUDIT_BROKEN,
        context=AuditContext(actor_id=job.actor_id, actor_username=job.actor_username),
        object_type="bridge.job",
        object_id=job.pk,
        details={**asdict(result), "source": job.params.get("source", "")},
    )
    if not result.ok:
        log.error(
            "AUDIT CHAIN BROKEN at event %s: %s (checked %s)",
            result.first_broken_id,
            result.reason,
            result.checked,
        )
    return asdict(result)


def latest_verification() -> AuditVerification | None:
    """The newest verification that finished (succeeded or failed), or None."""
    return (
        AuditVerification.objects.filter(status__in=(JobStatus.SUCCEEDED, JobStatus.FAILED))
        .order_by("-finished_at", "-id")
        .first()
    )
