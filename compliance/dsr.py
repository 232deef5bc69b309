"""GDPR data-subject requests: the workflow, its deadlines, and the work itself.

received -> verifying (identity being checked: the clock pauses) -> in_progress (the work runs
as a job) -> extended (once, with a reason, before the first deadline passes) -> completed, or
rejected at any open step.

- The due date is one calendar month after receipt (Art. 12(3)); where that day does not exist,
  the month's last day (Jan 31 -> Feb 28 or 29). Whole days spent waiting for proof of
  identity are added when the identity is verified. The extension adds up to two months to the
  due date it replaces.
- Every service here takes keywords, runs in one transaction, changes the status by
  compare-and-swap (a row locked, its status checked, updated only from that status), appends
  `{at, status, actor, note}` to the request's history and records one audit event. Audit
  details name the request, never the subject: the request row holds the subject id.
- The job (`run_dsr_job`, a thin task in compliance/tasks.py): access and portability write a
  ZIP (a JSON and a CSV file per registry source, and a manifest with counts and SHA-256);
  rectification applies the request's corrections through the registry; erasure runs every
  source's erase, destroys the subject's keys and writes an ErasureRecord, which
  `reapply_erasures` runs again after a backup restore. A failure leaves the request in
  progress with the error in its result, loudly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import statistics
import struct
import tempfile
import uuid
import zipfile
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from dateutil.relativedelta import relativedelta
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.jobs import Progress, run_job, start_job
from bridge.models import Job
from compliance import personal_data
from compliance.audit import AuditContext, iso, record_event
from compliance.choices import (
    DSR_JOB_KIND,
    OPEN_DSR_STATUSES,
    AuditAction,
    DsrStatus,
    DsrType,
)
from compliance.models import ConsentEvent, DataSubjectRequest, ErasureRecord
from compliance.proof import canonical_json
from compliance.redaction import redact_text

log = logging.getLogger(__name__)

EXPORT_FORMAT = "bridge.dsr-export/v1"
MANIFEST_NAME = "manifest.json"
# Limits of what a request carries (the API refuses more, naming the field).
DETAILS_MAX_BYTES = 64 * 1024
REASON_MAX_CHARS = 2000
METHOD_MAX_CHARS = 200
EXTENSION_MAX_MONTHS = 2
# Statuses in which the work runs (the job completes the request from either).
WORKING = (DsrStatus.IN_PROGRESS, DsrStatus.EXTENDED)
# Keys of an erase() result that count rows actually changed (the rest count rows kept).
CHANGED_KEYS = ("deleted", "anonymised", "keys_destroyed", "sessions_revoked")
OBJECT_TYPE = "compliance.datasubjectrequest"


class DsrRefused(Exception):
    """A request the workflow cannot honour: `code` for programs; `field` when the input at
    fault is one field (the API answers 400 on it), else the state is wrong (409)."""

    def __init__(self, message: str, code: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


# --- Deadlines --------------------------------------------------------------------------------


def due_date_for(received: date, months: int = 1) -> date:
    """The last day to answer a request received on `received`: `months` calendar months
    later, the month's last day where that day does not exist (Jan 31 + 1 -> Feb 28/29)."""
    return received + relativedelta(months=months)


def _today() -> date:
    return timezone.now().astimezone(UTC).date()


def _utc_date(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def paused_whole_days(paused_at: datetime | None, now: datetime | None = None) -> int:
    """Whole days the clock stood still while identity was being verified."""
    if paused_at is None:
        return 0
    return max(0, ((now or timezone.now()) - paused_at).days)


# --- Input checks -----------------------------------------------------------------------------


def check_subject_id(subject_id: Any) -> str:
    """A subject id as consent and requests share them (compliance.consent's rule)."""
    from compliance.consent import ConsentError
    from compliance.consent import check_subject_id as check

    try:
        subject_id = check(subject_id)
    except ConsentError as refused:
        raise DsrRefused(str(refused), "invalid", "subject_id") from None
    return _encodable(subject_id, "subject_id")


def _encodable(value: str, field: str) -> str:
    # JSON can carry a lone surrogate (\ud800), which no database text column can store.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DsrRefused("Not valid Unicode text.", "invalid", field) from None
    return value


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DsrRefused("May not be blank.", "blank", field)
    value = value.strip()
    if len(value) > limit:
        raise DsrRefused(f"At most {limit} characters.", "too_long", field)
    if "\x00" in value:
        raise DsrRefused("May not contain NUL characters.", "invalid", field)
    return _encodable(value, field)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _check_details(type_: str, details: Any) -> dict:
    if details is None:
        details = {}
    if not isinstance(details, dict):
        raise DsrRefused("An object is required.", "invalid", "details")
    try:
        size = len(canonical_json(details).encode())
    except (TypeError, ValueError, RecursionError):
        # Not JSON, a lone surrogate, or nested too deeply to store.
        raise DsrRefused("Only JSON values are allowed.", "invalid", "details") from None
    if _has_nul(details):
        # PostgreSQL's jsonb refuses NUL characters.
        raise DsrRefused("May not contain NUL characters.", "invalid", "details")
    if size > DETAILS_MAX_BYTES:
        raise DsrRefused(f"At most {DETAILS_MAX_BYTES} bytes of JSON.", "too_long", "details")
    details = dict(details)
    if type_ == DsrType.RECTIFICATION:
        try:
            details["corrections"] = personal_data.check_corrections(details.get("corrections"))
        except ValueError as error:
            raise DsrRefused(f"corrections: {error}", "invalid", "details") from None
    elif "corrections" in details:
        raise DsrRefused("Only a rectification request carries corrections.", "invalid", "details")
    return details


# --- Transitions ------------------------------------------------------------------------------


def _entry(status: str, context: AuditContext, note: str = "") -> dict[str, str]:
    return {
        "at": iso(timezone.now()),
        "status": str(status),
        "actor": context.actor_username or "system",
        "note": note,
    }


def _locked(request: DataSubjectRequest) -> DataSubjectRequest:
    return DataSubjectRequest.objects.select_for_update().get(pk=request.pk)


def _swap(
    current: DataSubjectRequest,
    *,
    to: str,
    context: AuditContext,
    note: str = "",
    only_if: dict[str, Any] | None = None,
    **changes: Any,
) -> None:
    """Move the locked row from its status to `to`, appending the history entry; refused if
    it moved meanwhile (the compare-and-swap touches exactly one row or nothing)."""
    updated = DataSubjectRequest.objects.filter(
        pk=current.pk, status=current.status, **(only_if or {})
    ).update(status=to, history=[*current.history, _entry(to, context, note)], **changes)
    if updated != 1:
        raise DsrRefused("The request changed meanwhile; read it again.", "conflict")


def _refuse_status(
    current: DataSubjectRequest, allowed: Iterable[str], code: str, verb: str
) -> None:
    allowed = tuple(allowed)
    if current.status not in allowed:
        raise DsrRefused(
            f"Cannot {verb} a request that is {current.status} "
            f"(only one that is {' or '.join(allowed)}).",
            code,
        )


def _event(action: str, context: AuditContext, request: DataSubjectRequest, **details: Any) -> None:
    record_event(
        action=action,
        context=context,
        object_type=OBJECT_TYPE,
        object_id=str(request.pk),
        details={"type": request.type, **details},
    )


def create_request(
    *,
    subject_id: str,
    type: str,  # the request field as the API names it (shadows the builtin here only)
    details: dict | None,
    context: AuditContext,
    received_at: datetime | None = None,
) -> DataSubjectRequest:
    """Record a request as received; its due date runs from `received_at` (default now)."""
    subject_id = check_subject_id(subject_id)
    if type not in DsrType.values:
        raise DsrRefused(f"One of {', '.join(DsrType.values)}.", "invalid", "type")
    details = _check_details(type, details)
    now = timezone.now()
    received_at = received_at or now
    if received_at > now + timedelta(minutes=5):
        raise DsrRefused("A request cannot be received in the future.", "invalid", "received_at")
    with transaction.atomic():
        request = DataSubjectRequest.objects.create(
            subject_id=subject_id,
            type=type,
            details=details,
            received_at=received_at,
            due_date=due_date_for(_utc_date(received_at)),
            history=[_entry(DsrStatus.RECEIVED, context)],
            created_by_id=context.actor_id,
        )
        _event(AuditAction.DSR_RECEIVED, context, request, due_date=request.due_date.isoformat())
    return request


def hold_for_verification(
    *, request: DataSubjectRequest, reason: str, context: AuditContext
) -> DataSubjectRequest:
    """Wait for proof of identity: the clock stops until the identity is verified."""
    reason = _text(reason, "reason", REASON_MAX_CHARS)
    with transaction.atomic():
        current = _locked(request)
        _refuse_status(current, (DsrStatus.RECEIVED,), "cannot_hold", "hold")
        _swap(
            current, to=DsrStatus.VERIFYING, context=context, note=reason, paused_at=timezone.now()
        )
        _event(AuditAction.DSR_VERIFYING, context, current, reason=reason)
    return DataSubjectRequest.objects.get(pk=request.pk)


def privileged_account(subject_id: str) -> str | None:
    """Why the subject's Bridge account may not be erased yet (None when it may): an active
    account holding a role, a permission, staff or superuser status. Erasing it would take
    those away and revoke its sessions: done through a data subject request, a compliance
    officer could lock out an administrator (or a fellow officer). An administrator
    deactivates the account first (its data is then erased as any other's)."""
    from security.models import User

    user = User.objects.filter(username=subject_id, is_active=True).first()
    if user is None:
        return None
    held = [
        name
        for name, holds in (
            ("superuser", user.is_superuser),
            ("staff", user.is_staff),
            ("roles", user.groups.exists()),
            ("permissions", user.user_permissions.exists()),
        )
        if holds
    ]
    if not held:
        return None
    return (
        f"{subject_id} is an active Bridge account holding {', '.join(held)}: an "
        "administrator must deactivate it before it is erased"
    )


def _refuse_privileged(current: DataSubjectRequest) -> None:
    if current.type != DsrType.ERASURE:
        return
    why = privileged_account(current.subject_id)
    if why is not None:
        raise DsrRefused(why[0].upper() + why[1:] + ".", "account_active")


def verify_request(
    *,
    request: DataSubjectRequest,
    method: str,
    context: AuditContext,
    enqueue: bool = True,
) -> Job:
    """Record the identity check (who, how) and start the work as a job.

    Whole days the clock stood paused move the due date. Two calls at once start one job: the
    second finds the request in progress and is refused. An erasure of an active account with
    privileges is refused until an administrator deactivates it (`privileged_account`).
    """
    method = _text(method, "method", METHOD_MAX_CHARS)
    with transaction.atomic():
        current = _locked(request)
        _refuse_status(
            current, (DsrStatus.RECEIVED, DsrStatus.VERIFYING), "cannot_verify", "verify"
        )
        _refuse_privileged(current)
        now = timezone.now()
        paused = paused_whole_days(current.paused_at, now)
        due = current.due_date + timedelta(days=paused)
        job = start_job(
            kind=DSR_JOB_KIND,
            context=context,
            params={"request_id": str(current.pk), "type": current.type},
            enqueue=enqueue,
        )
        note = f"identity verified: {method}" + (
            f"; {paused} paused day(s) added" if paused else ""
        )
        _swap(
            current,
            to=DsrStatus.IN_PROGRESS,
            context=context,
            note=note,
            verified_at=now,
            verified_by_id=context.actor_id,
            verification_method=method,
            paused_at=None,
            paused_days=current.paused_days + paused,
            due_date=due,
            job=job,
        )
        _event(
            AuditAction.DSR_VERIFIED,
            context,
            current,
            method=method,
            paused_days=paused,
            due_date=due.isoformat(),
            job=job.pk,
        )
    return job


def extend_request(
    *,
    request: DataSubjectRequest,
    reason: str,
    context: AuditContext,
    months: int = EXTENSION_MAX_MONTHS,
) -> DataSubjectRequest:
    """Extend the deadline once, by up to two months, with a reason (Art. 12(3)): only while
    the work is under way and before the current due date has passed (the subject must be
    told within the first period)."""
    reason = _text(reason, "reason", REASON_MAX_CHARS)
    if isinstance(months, bool) or not isinstance(months, int):
        raise DsrRefused("A whole number of months is required.", "invalid", "months")
    if not 1 <= months <= EXTENSION_MAX_MONTHS:
        raise DsrRefused(
            f"From 1 to {EXTENSION_MAX_MONTHS} months (Art. 12(3)).", "invalid", "months"
        )
    with transaction.atomic():
        current = _locked(request)
        if current.extension_months:
            raise DsrRefused(
                f"The deadline was already extended on {current.extended_at:%Y-%m-%d}; "
                "Art. 12(3) allows one extension.",
                "already_extended",
            )
        _refuse_status(current, (DsrStatus.IN_PROGRESS,), "cannot_extend", "extend")
        if _today() > current.due_date:
            raise DsrRefused(
                f"The due date {current.due_date.isoformat()} has passed: an extension must "
                "be decided (and the subject told) before it.",
                "extension_too_late",
            )
        due = due_date_for(current.due_date, months)
        _swap(
            current,
            to=DsrStatus.EXTENDED,
            context=context,
            note=f"extended by {months} month(s) to {due.isoformat()}: {reason}",
            extended_at=timezone.now(),
            extension_reason=reason,
            extension_months=months,
            due_date=due,
        )
        _event(
            AuditAction.DSR_EXTENDED,
            context,
            current,
            reason=reason,
            months=months,
            previous_due_date=current.due_date.isoformat(),
            due_date=due.isoformat(),
        )
    return DataSubjectRequest.objects.get(pk=request.pk)


def _job_running(current: DataSubjectRequest) -> bool:
    return (
        current.job_id is not None
        and Job.objects.filter(pk=current.job_id, status=JobStatus.RUNNING).exists()
    )


def reject_request(
    *, request: DataSubjectRequest, reason: str, context: AuditContext
) -> DataSubjectRequest:
    """Refuse a request (identity not proven, manifestly unfounded or excessive: Art. 12(5)),
    with the reason the subject is told. Not while its job runs; a job not yet started is
    cancelled."""
    reason = _text(reason, "reason", REASON_MAX_CHARS)
    with transaction.atomic():
        current = _locked(request)
        _refuse_status(current, OPEN_DSR_STATUSES, "cannot_reject", "reject")
        if _job_running(current):
            raise DsrRefused(
                "Its job is running; reject it once the job has finished.", "job_running"
            )
        # A job no worker took yet must not start on a rejected request.
        cancelled = Job.objects.filter(pk=current.job_id, status=JobStatus.PENDING).update(
            status=JobStatus.CANCELLED,
            finished_at=timezone.now(),
            error="the data subject request was rejected",
        )
        _swap(
            current,
            to=DsrStatus.REJECTED,
            context=context,
            note=reason,
            rejected_reason=reason,
            paused_at=None,
        )
        _event(
            AuditAction.DSR_REJECTED, context, current, reason=reason, job_cancelled=bool(cancelled)
        )
    return DataSubjectRequest.objects.get(pk=request.pk)


def retry_request(
    *,
    request: DataSubjectRequest,
    context: AuditContext,
    reason: str = "",
    enqueue: bool = True,
) -> Job:
    """Start the work again after its job failed (the request stayed in progress); `reason`
    says why it should succeed now (the API asks for one)."""
    reason = _text(reason, "reason", REASON_MAX_CHARS) if reason else ""
    with transaction.atomic():
        current = _locked(request)
        _refuse_status(current, WORKING, "cannot_retry", "retry")
        _refuse_privileged(current)
        previous = Job.objects.filter(pk=current.job_id).first() if current.job_id else None
        if previous is not None and (
            not previous.is_final or previous.status == JobStatus.SUCCEEDED
        ):
            raise DsrRefused(
                f"Its job {previous.pk} is {previous.status}; only a failed job is retried.",
                "job_not_failed",
            )
        job = start_job(
            kind=DSR_JOB_KIND,
            context=context,
            params={"request_id": str(current.pk), "type": current.type},
            enqueue=enqueue,
        )
        _swap(
            current,
            to=current.status,
            context=context,
            note=f"processing started again (job {job.pk})" + (f": {reason}" if reason else ""),
            only_if={"job_id": current.job_id},
            job=job,
        )
        _event(
            AuditAction.DSR_RETRIED,
            context,
            current,
            job=job.pk,
            previous_job=previous.pk if previous else None,
            reason=reason,
        )
    return job


# --- The job ----------------------------------------------------------------------------------


def _job_context(job: Job) -> AuditContext:
    return AuditContext(actor_id=job.actor_id, actor_username=job.actor_username)


def run_dsr_job(job: Job, progress: Progress) -> dict:
    """Do what the request asks; completes it, or leaves it in progress with the error."""
    request = DataSubjectRequest.objects.get(pk=job.params["request_id"])
    if request.job_id != job.pk or request.status not in WORKING:
        # Not this job's to do (retried since, or rejected): touch nothing.
        raise DsrRefused(
            f"request {request.pk} is {request.status} with job {request.job_id}, not {job.pk}",
            "not_in_progress",
        )
    context = _job_context(job)
    try:
        if request.type == DsrType.RECTIFICATION:
            return _rectify(request, job, context, progress)
        if request.type == DsrType.ERASURE:
            return _erase(request, job, context, progress)
        return _export(request, job, context, progress)
    except Exception as exc:
        _record_failure(request, job, exc, context)
        raise


def _record_failure(
    request: DataSubjectRequest, job: Job, exc: Exception, context: AuditContext
) -> None:
    error = redact_text(f"{type(exc).__name__}: {exc}")[:2000]
    # Loud: a request with a legal deadline is stuck until someone looks.
    log.error(
        "data subject request %s (%s) failed in job %s and stays in progress: %s",
        request.pk,
        request.type,
        job.pk,
        error,
    )
    with transaction.atomic():
        current = _locked(request)
        if current.job_id != job.pk or current.status not in WORKING:
            return
        DataSubjectRequest.objects.filter(pk=current.pk, job_id=job.pk).update(
            result={"error": error, "failed_at": iso(timezone.now()), "job": job.pk},
            history=[
                *current.history,
                _entry(current.status, context, f"processing failed (job {job.pk}): {error}"),
            ],
        )
        _event(AuditAction.DSR_FAILED, context, current, job=job.pk, error=error)


def _complete(
    request: DataSubjectRequest,
    job: Job,
    context: AuditContext,
    result: dict,
    note: str,
    **changes: Any,
) -> None:
    """Mark the request completed (inside the caller's transaction)."""
    current = _locked(request)
    if current.job_id != job.pk or current.status not in WORKING:
        raise DsrRefused(
            f"request {current.pk} changed while it was processed ({current.status})", "conflict"
        )
    _swap(
        current,
        to=DsrStatus.COMPLETED,
        context=context,
        note=note,
        only_if={"job_id": job.pk},
        completed_at=timezone.now(),
        result=result,
        **changes,
    )
    on_time = _today() <= current.due_date
    _event(AuditAction.DSR_COMPLETED, context, current, job=job.pk, on_time=on_time)


def _export(
    request: DataSubjectRequest, job: Job, context: AuditContext, progress: Progress
) -> dict:
    written = write_export(request=request, progress=progress)
    result = {
        "counts": written["counts"],
        "files": len(written["manifest"]["files"]),
        "export": {
            "name": written["path"].name,
            "sha256": written["sha256"],
            "size": written["size"],
        },
    }
    try:
        with transaction.atomic():
            _complete(
                request,
                job,
                context,
                result,
                f"export ready ({written['size']} bytes)",
                export_path=str(written["path"]),
                export_sha256=written["sha256"],
                export_size=written["size"],
            )
    except BaseException:
        written["path"].unlink(missing_ok=True)
        raise
    return result


def _rectify(
    request: DataSubjectRequest, job: Job, context: AuditContext, progress: Progress
) -> dict:
    corrections = personal_data.check_corrections(request.details.get("corrections"))
    with transaction.atomic():
        changed: dict[str, int] = {}
        for done, (name, fields) in enumerate(corrections.items()):
            progress.update(done, len(corrections), f"rectifying {name}")
            changed[name] = personal_data.get_source(name).rectify(request.subject_id, fields)
        progress.update(len(corrections), len(corrections), "rectified")
        fields = {name: sorted(values) for name, values in corrections.items()}
        # Which fields changed, never their values: the trail is no copy of personal data.
        _event(AuditAction.DSR_RECTIFIED, context, request, fields=fields, rows=changed)
        result = {"rows": changed, "fields": fields}
        _complete(request, job, context, result, f"rectified {sum(changed.values())} row(s)")
    return result


def erase_subject(subject_id: str, progress: Progress | None = None) -> dict[str, dict]:
    """Run every source's erase for the subject (its keys last); counts per source."""
    order = personal_data.erase_order()
    counts: dict[str, dict] = {}
    for done, source in enumerate(order):
        if progress is not None:
            progress.update(done, len(order), f"erasing {source.name}")
        counts[source.name] = personal_data.json_safe(dict(source.erase(subject_id) or {}))
    if progress is not None:
        progress.update(len(order), len(order), "erased")
    return counts


def _changed_rows(counts: dict[str, dict]) -> int:
    return sum(
        int(value)
        for entry in counts.values()
        for key, value in entry.items()
        if key in CHANGED_KEYS and isinstance(value, int)
    )


def _retained(counts: dict[str, dict]) -> dict[str, dict]:
    """The sources that kept rows, with how many and why (Art. 17(3))."""
    kept = {}
    for source in personal_data.sources():
        entry = counts.get(source.name, {})
        if entry.get("retained"):
            kept[source.name] = {
                "rows": entry["retained"],
                "basis": getattr(source, "retention_basis", "") or "not stated by the source",
            }
    return kept


def _erase(
    request: DataSubjectRequest, job: Job, context: AuditContext, progress: Progress
) -> dict:
    subject_id = request.subject_id
    # Checked again here: the account may have been given a role since it was verified.
    _refuse_privileged(request)
    with transaction.atomic():
        counts = erase_subject(subject_id, progress)
        # Earlier access exports of the subject are copies of what was just erased.
        exports = list(
            DataSubjectRequest.objects.filter(subject_id=subject_id)
            .exclude(export_path="")
            .values_list("pk", "export_path")
        )
        DataSubjectRequest.objects.filter(pk__in=[pk for pk, _ in exports]).update(
            export_path="", export_size=None
        )
        # And half-written ones a killed worker left behind (never listed on a row).
        partial = _partial_exports(
            DataSubjectRequest.objects.filter(subject_id=subject_id).values_list("pk", flat=True)
        )
        record = ErasureRecord.objects.create(
            subject_id=subject_id, request=request, erased_at=timezone.now(), counts=counts
        )
        record_event(
            action=AuditAction.DSR_ERASED,
            context=context,
            object_type="compliance.erasurerecord",
            object_id=record.pk,
            details={"request": str(request.pk), "counts": counts},
        )
        result = {
            "counts": counts,
            "rows_changed": _changed_rows(counts),
            "retained": _retained(counts),
            "erasure_record": record.pk,
            "exports_deleted": len(exports),
        }
        _complete(request, job, context, result, f"erased {result['rows_changed']} row(s)")
        transaction.on_commit(lambda: _remove_files([*(path for _, path in exports), *partial]))
    return result


def _remove_files(paths: Iterable[str]) -> None:
    """Delete export files, only ever inside DSR_EXPORT_DIR: the paths come from the database,
    and a path edited there (a checkpoint sink's file, the signing key) must not steer a
    deletion anywhere else."""
    root = Path(settings.DSR_EXPORT_DIR).resolve()
    for path in paths:
        if not path:
            continue
        try:
            if Path(path).resolve().parent != root:
                log.error("not deleting %s: it is not an export in %s", path, root)
                continue
            Path(path).unlink(missing_ok=True)
        except OSError:
            log.exception("could not delete the export %s", path)


# --- The export -------------------------------------------------------------------------------


class _Hashed:
    """Counts and hashes what is written through it."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.target.write(data)
        self.sha256.update(data)
        self.size += len(data)


# Spreadsheets run a cell starting with these as a formula (CSV injection, OWASP), also after
# leading whitespace (which they skip) and in the full-width forms some of them normalise: the
# same set as the compliance reports (compliance.reports.writers.safe_cell).
_FORMULA_START = tuple("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")


def csv_cell(value: Any) -> str:
    """A value as a CSV cell: nested values as JSON, text safe from formula injection."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True, default=_json_default)
    elif not isinstance(value, str | int | float):
        value = personal_data.json_safe(value)
    text = str(value)
    risky = text.startswith(_FORMULA_START) or text.lstrip().startswith(_FORMULA_START)
    if risky and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _json_default(value: Any) -> Any:
    # Only called for what JSON has no type for (dates, UUIDs, decimals...).
    return personal_data.json_safe(value)


# A spooled CSV record: how many cells it has, then how many bytes follow.
_RECORD = struct.Struct("<II")


class _Spool:
    """One source's rows, read once from the source and kept in two unnamed temporary files:
    JSON lines, and CSV rows in the column order known so far. Columns are only ever added at
    the end, so a row written before a column appeared is padded when the CSV is copied out;
    memory stays flat however many rows there are."""

    def __init__(self, directory: Path) -> None:
        self.json = tempfile.TemporaryFile(dir=directory)
        self.csv = tempfile.TemporaryFile(dir=directory)
        self.columns: dict[str, int] = {}
        self.count = 0
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer)

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.json.close()
        self.csv.close()

    def add(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False, sort_keys=True, default=_json_default)
        self.json.write(line.encode() + b"\n")
        columns = self.columns
        for key in row:
            if key not in columns:
                columns[key] = len(columns)
        cells = [""] * len(columns)
        for key, value in row.items():
            cells[columns[key]] = csv_cell(value)
        self._writer.writerow(cells)
        data = self._buffer.getvalue().encode()
        self._buffer.seek(0)
        self._buffer.truncate()
        self.csv.write(_RECORD.pack(len(cells), len(data)) + data)
        self.count += 1

    def write_json(self, out: _Hashed) -> None:
        self.json.seek(0)
        out.write(b"[")
        first = True
        for line in self.json:
            out.write((b"\n" if first else b",\n") + line.rstrip(b"\n"))
            first = False
        out.write(b"]\n" if first else b"\n]\n")

    def write_csv(self, out: _Hashed) -> None:
        total = len(self.columns)
        header = io.StringIO()
        csv.writer(header).writerow(list(self.columns))
        out.write(header.getvalue().encode())
        self.csv.seek(0)
        pending: list[bytes] = []
        while head := self.csv.read(_RECORD.size):
            cells, size = _RECORD.unpack(head)
            data = self.csv.read(size)
            if cells < total:
                # Cells for the columns that appeared after this row was written.
                data = data[:-2] + b"," * (total - max(cells, 1)) + b"\r\n"
            pending.append(data)
            if len(pending) >= 500:
                out.write(b"".join(pending))
                pending.clear()
        out.write(b"".join(pending))


def export_dir() -> Path:
    directory = Path(settings.DSR_EXPORT_DIR)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def write_export(*, request: DataSubjectRequest, progress: Progress | None = None) -> dict:
    """Write the subject's data as a ZIP under DSR_EXPORT_DIR: per source `<name>.json` and
    `<name>.csv`, and `manifest.json` (counts, SHA-256 and size of every file).

    Written to a temporary file (mode 0600) and renamed once complete, so a crash never leaves
    a half export under the final name. Each source is read once, into unnamed temporary files
    in the same private directory (`_Spool`).
    """
    directory = export_dir()
    final = directory / f"dsr-{request.pk}.zip"
    handle, temporary = tempfile.mkstemp(
        prefix=f".dsr-{request.pk}-", suffix=".part", dir=directory
    )
    registry = personal_data.sources()
    counts: dict[str, int] = {}
    files: list[dict[str, Any]] = []
    try:
        with os.fdopen(handle, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for done, source in enumerate(registry):
                    if progress is not None:
                        progress.update(done, len(registry), f"exporting {source.name}")
                    with _Spool(directory) as spool:
                        for row in source.export(request.subject_id):
                            spool.add(row)
                        counts[source.name] = spool.count
                        for suffix, write in (("json", spool.write_json), ("csv", spool.write_csv)):
                            name = f"{source.name}.{suffix}"
                            with archive.open(name, "w") as entry:
                                out = _Hashed(entry)
                                write(out)
                            files.append(
                                {
                                    "name": name,
                                    "source": source.name,
                                    "rows": spool.count,
                                    "bytes": out.size,
                                    "sha256": out.sha256.hexdigest(),
                                }
                            )
                manifest = {
                    "format": EXPORT_FORMAT,
                    "request": str(request.pk),
                    "type": request.type,
                    "subject_id": request.subject_id,
                    "generated_at": iso(timezone.now()),
                    "generator": "Bridge compliance.dsr",
                    "counts": counts,
                    "sources": {
                        source.name: getattr(source, "description", "") for source in registry
                    },
                    "files": files,
                }
                archive.writestr(
                    MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
                )
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if progress is not None:
        progress.update(len(registry), len(registry), "export written")
    digest = hashlib.sha256()
    with final.open("rb") as written:
        for block in iter(lambda: written.read(1024 * 1024), b""):
            digest.update(block)
    return {
        "path": final,
        "sha256": digest.hexdigest(),
        "size": final.stat().st_size,
        "counts": counts,
        "manifest": manifest,
    }


def export_expires_at(request: DataSubjectRequest) -> datetime | None:
    if not request.export_path or request.completed_at is None:
        return None
    return request.completed_at + timedelta(days=settings.DSR_EXPORT_TTL_DAYS)


def export_available(request: DataSubjectRequest) -> bool:
    """Whether the request's ZIP can be downloaded now."""
    expires = export_expires_at(request)
    return expires is not None and timezone.now() < expires and Path(request.export_path).is_file()


def export_file(*, request: DataSubjectRequest, context: AuditContext) -> IO[bytes]:
    """The request's ZIP, opened for reading; the download is audited."""
    request = DataSubjectRequest.objects.get(pk=request.pk)
    if request.status != DsrStatus.COMPLETED or not request.export_path:
        raise DsrRefused("This request has no export to download.", "no_export")
    expires = export_expires_at(request)
    if expires is not None and timezone.now() >= expires:
        raise DsrRefused(
            f"The export expired on {expires:%Y-%m-%d} (DSR_EXPORT_TTL_DAYS).", "export_expired"
        )
    path = Path(request.export_path)
    if path.resolve().parent != export_dir().resolve():
        raise DsrRefused("The export is not where exports are kept.", "export_missing")
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DsrRefused("The export file is gone.", "export_missing") from None
    try:
        # The bytes served are the bytes the job wrote: a file swapped or edited on disk (by
        # whoever can write the export directory) is refused, never handed to the subject.
        # Hashed through the open handle, so a swap after this check changes nothing served.
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
        if digest.hexdigest() != request.export_sha256:
            log.error(
                "the export of data subject request %s does not match its SHA-256 "
                "(recorded %s, on disk %s): not served",
                request.pk,
                request.export_sha256,
                digest.hexdigest(),
            )
            raise DsrRefused(
                "The export file was changed after it was written (its SHA-256 does not match "
                "the one recorded): it is not served. Run the request again.",
                "export_tampered",
            )
        handle.seek(0)
        with transaction.atomic():
            _event(
                AuditAction.DSR_EXPORT_DOWNLOADED,
                context,
                request,
                sha256=request.export_sha256,
                size=request.export_size,
            )
    except BaseException:
        handle.close()
        raise
    return handle


# A half-written export older than this belongs to a worker that died writing it.
PARTIAL_EXPORT_AGE = timedelta(days=1)


def _partial_exports(request_ids: Iterable[Any]) -> list[str]:
    """The half-written export files (`.dsr-<id>-*.part`) of these requests."""
    directory = Path(settings.DSR_EXPORT_DIR)
    if not directory.is_dir():
        return []
    return [str(path) for pk in request_ids for path in directory.glob(f".dsr-{pk}-*.part")]


def delete_expired_exports(*, now: datetime | None = None, dry_run: bool = False) -> int:
    """Delete export files older than DSR_EXPORT_TTL_DAYS, and half-written ones a killed
    worker left (older than PARTIAL_EXPORT_AGE): both are copies of a subject's data. Returns
    how many exports expired (`dry_run`: would expire, nothing deleted)."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.DSR_EXPORT_TTL_DAYS)
    expired = list(
        DataSubjectRequest.objects.exclude(export_path="")
        .filter(completed_at__lt=cutoff)
        .values_list("pk", "export_path")
    )
    if dry_run:
        return len(expired)
    DataSubjectRequest.objects.filter(pk__in=[pk for pk, _ in expired]).update(export_path="")
    _remove_files(path for _, path in expired)
    directory = Path(settings.DSR_EXPORT_DIR)
    if directory.is_dir():
        stale = (now - PARTIAL_EXPORT_AGE).timestamp()
        _remove_files(
            str(path)
            for path in directory.glob(".dsr-*.part")
            if path.is_file() and path.stat().st_mtime < stale
        )
    return len(expired)


# --- After a restore --------------------------------------------------------------------------


def reapply_erasures(*, context: AuditContext) -> int:
    """Run every recorded erasure again (a restored backup brings erased rows back); returns
    how many erasure records were applied. Erasing is idempotent: what is already erased is
    not found again."""
    with transaction.atomic():
        records = list(ErasureRecord.objects.select_for_update().order_by("erased_at", "pk"))
        changed = 0
        for record in records:
            changed += _changed_rows(erase_subject(record.subject_id))
        ErasureRecord.objects.filter(pk__in=[record.pk for record in records]).update(
            reapplied_at=timezone.now(), reapplied_count=F("reapplied_count") + 1
        )
        record_event(
            action=AuditAction.ERASURES_REAPPLIED,
            context=context,
            object_type="compliance.erasurerecord",
            details={"records": len(records), "rows_changed": changed},
        )
    if changed:
        log.warning(
            "erasures applied again: %s row(s) of %s erased subject(s) had come back",
            changed,
            len(records),
        )
    return len(records)


# --- Self-test --------------------------------------------------------------------------------

SELFTEST_PURPOSE = "compliance.selftest"


def _check(checks: list[dict], name: str, ok: bool, detail: str = "") -> bool:
    checks.append({"name": name, "ok": bool(ok), "detail": detail})
    return bool(ok)


def _run_inline(request: DataSubjectRequest, context: AuditContext, jobs: list[int]) -> Job | None:
    job = verify_request(
        request=request, method="synthetic subject", context=context, enqueue=False
    )
    jobs.append(job.pk)
    return run_job(job.pk, run_dsr_job)


def _manifest_checks(path: Path, checks: list[dict]) -> None:
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read(MANIFEST_NAME))
        counts = manifest.get("counts", {})
        expected = {"users": 1, "consent_events": 1, personal_data.SUBJECT_KEYS: 1}
        _check(
            checks,
            "export counts",
            all(counts.get(name) == rows for name, rows in expected.items()),
            json.dumps({name: counts.get(name) for name in expected}),
        )
        bad = [
            entry["name"]
            for entry in manifest.get("files", [])
            if hashlib.sha256(archive.read(entry["name"])).hexdigest() != entry["sha256"]
        ]
        _check(
            checks,
            "export SHA-256",
            bool(manifest.get("files")) and not bad,
            f"{len(manifest.get('files', []))} files" + (f"; mismatched: {bad}" if bad else ""),
        )


def run_synthetic_dsr(*, context: AuditContext) -> dict:
    """Run an access request and an erasure end to end on a synthetic subject (a user, a
    consent, a record encrypted under the subject's key), check the results, and remove what
    was made (the audit events stay)."""
    from security import crypto
    from security.models import SubjectKey, User

    subject_id = f"selftest-{uuid.uuid4().hex[:12]}"
    checks: list[dict] = []
    requests: list[Any] = []
    jobs: list[int] = []
    files: list[str] = []
    user = None
    ciphertext = ""
    try:
        user = User.objects.create_user(
            username=subject_id,
            email=f"{subject_id}@example.invalid",
            first_name="Synthetic",
            last_name="Subject",
        )
        ConsentEvent.objects.create(
            subject_id=subject_id,
            purpose=SELFTEST_PURPOSE,
            granted=True,
            notice_version="selftest",
            notice_sha256=hashlib.sha256(b"selftest").hexdigest(),
            method="api",
            channel="selftest",
            occurred_at=timezone.now(),
        )
        ciphertext = crypto.encrypt(
            b"synthetic record", purpose=SELFTEST_PURPOSE, context="selftest", subject_id=subject_id
        )
        access = create_request(
            subject_id=subject_id, type=DsrType.ACCESS, details={}, context=context
        )
        requests.append(access.pk)
        finished = _run_inline(access, context, jobs)
        access.refresh_from_db()
        if _check(
            checks,
            "access request completed",
            access.status == DsrStatus.COMPLETED,
            access.status if finished is None else f"{access.status}, job {finished.status}",
        ):
            files.append(access.export_path)
            _manifest_checks(Path(access.export_path), checks)
        erasure = create_request(
            subject_id=subject_id, type=DsrType.ERASURE, details={}, context=context
        )
        requests.append(erasure.pk)
        _run_inline(erasure, context, jobs)
        erasure.refresh_from_db()
        _check(checks, "erasure completed", erasure.status == DsrStatus.COMPLETED, erasure.status)
        try:
            crypto.decrypt(ciphertext, context="selftest")
            unreadable, detail = False, "the record still decrypts"
        except crypto.CryptoError as error:
            unreadable, detail = True, str(error)
        _check(checks, "encrypted record unreadable", unreadable, detail)
        user.refresh_from_db()
        _check(
            checks,
            "user anonymised",
            user.username.startswith("erased-") and not user.email and not user.is_active,
            user.username,
        )
        _check(
            checks,
            "consent pseudonymised",
            not ConsentEvent.objects.filter(subject_id=subject_id).exists(),
        )
        _check(
            checks,
            "erasure recorded",
            ErasureRecord.objects.filter(subject_id=subject_id, request=erasure).exists(),
        )
    except Exception as error:
        log.exception("the synthetic data subject request failed")
        _check(checks, "ran to the end", False, redact_text(f"{type(error).__name__}: {error}"))
    finally:
        _clean_synthetic(subject_id, requests, jobs, files, user, SubjectKey)
    return {"ok": bool(checks) and all(check["ok"] for check in checks), "checks": checks}


def _clean_synthetic(
    subject_id: str,
    requests: list[Any],
    jobs: list[int],
    files: list[str],
    user: Any,
    subject_keys: Any,
) -> None:
    # The erasure deletes the access export once it commits; inside an outer transaction
    # (a test, a caller's atomic block) that has not happened yet.
    kept = DataSubjectRequest.objects.filter(pk__in=requests).exclude(export_path="")
    paths = [*files, *kept.values_list("export_path", flat=True)]
    with transaction.atomic():
        ErasureRecord.objects.filter(subject_id=subject_id).delete()
        DataSubjectRequest.objects.filter(pk__in=requests).delete()
        Job.objects.filter(pk__in=jobs).delete()
        ConsentEvent.objects.filter(
            Q(subject_id=subject_id) | Q(subject_id=personal_data.pseudonym(subject_id))
        ).delete()
        subject_keys.objects.filter(subject_id=subject_id).delete()
        if user is not None:
            type(user).objects.filter(pk=user.pk).delete()
    _remove_files(paths)


# --- Metrics ----------------------------------------------------------------------------------


def _closed_at(request: DataSubjectRequest) -> datetime | None:
    if request.completed_at is not None:
        return request.completed_at
    for entry in reversed(request.history or []):
        if entry.get("status") == DsrStatus.REJECTED:
            try:
                return datetime.fromisoformat(entry["at"])
            except (KeyError, ValueError):
                return None
    return None


def dsr_metrics() -> dict:
    """Requests closed on time (completed or rejected by their due date), the median days to
    close, extensions, open and overdue requests."""
    today = _today()
    rows = DataSubjectRequest.objects.only(
        "status", "type", "received_at", "due_date", "completed_at", "history", "extension_months"
    )
    closed = on_time = extensions = open_ = overdue = due_soon = 0
    days: list[float] = []
    by_status: dict[str, int] = {}
    by_type: dict[str, int] = {}
    soon = today + timedelta(days=settings.DSR_REMINDER_DAYS)
    for request in rows.iterator(chunk_size=2000):
        by_status[request.status] = by_status.get(request.status, 0) + 1
        by_type[request.type] = by_type.get(request.type, 0) + 1
        extensions += bool(request.extension_months)
        if request.status in OPEN_DSR_STATUSES:
            open_ += 1
            overdue += request.due_date < today
            due_soon += today <= request.due_date <= soon
            continue
        closed_at = _closed_at(request)
        if closed_at is None:
            continue
        closed += 1
        on_time += _utc_date(closed_at) <= request.due_date
        days.append((closed_at - request.received_at).total_seconds() / 86400)
    return {
        "open": open_,
        "overdue": overdue,
        "due_soon": due_soon,
        "closed": closed,
        "closed_on_time": on_time,
        "on_time_rate": round(on_time / closed, 4) if closed else None,
        "median_days_to_close": round(statistics.median(days), 2) if days else None,
        "extensions": extensions,
        "by_status": by_status,
        "by_type": by_type,
    }
