"""Compliance reports: asking for one, generating it as a job, verifying and downloading it.

A report covers whole UTC days: `date_from` 00:00 up to (not including) the day after
`date_to`, so an event at 23:59:59.999 on the last day is in. Generating one seals pending
audit events and signs a checkpoint first, then streams the type's rows into the chosen format
(a temporary file renamed once complete), writes the manifest (parameters, counts, the file's
SHA-256, the checkpoint it was checked against) and signs it with the audit signing key.
Every step is audited: report.requested, report.generated or report.failed, report.downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.jobs import Progress, run_job, start_job
from bridge.models import Job
from compliance import proof
from compliance.audit import AuditContext, iso, record_event
from compliance.choices import (
    REPORT_JOB_KIND,
    AuditAction,
    CheckpointStatus,
    ReportFormat,
    ReportStatus,
    ReportType,
)
from compliance.models import AuditCheckpoint, ComplianceReport
from compliance.redaction import redact_text
from compliance.reports import signing, verify
from compliance.reports.sources import SOURCES, SourceError, filter_specs
from compliance.reports.verify import MANIFEST_FORMAT, Verdict
from compliance.reports.writers import WRITERS, ReportContent, RowStream

log = logging.getLogger(__name__)

__all__ = [
    "ReportRefused",
    "ReportTampered",
    "Verdict",
    "generate_inline",
    "generate_report_job",
    "open_report_file",
    "read_companion",
    "reap_reports",
    "record_download",
    "report_files",
    "report_path",
    "start_report",
    "verify_report_file",
]

EARLIEST = date(1970, 1, 1)
# The period ends the day after `to`, which must exist.
LATEST = date.max - timedelta(days=1)
_OBJECT_TYPE = "compliance.compliancereport"


class ReportRefused(Exception):
    """A report asked for with invalid parameters; `field` names the one at fault."""

    def __init__(self, message: str, code: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class ReportFailed(Exception):
    """Generating a report could not go on."""


# --- Files ------------------------------------------------------------------------------------


def report_dir() -> Path:
    directory = Path(settings.REPORT_DIR)
    # Reports hold personal data: readable by Bridge's user only.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def report_path(report: ComplianceReport) -> Path:
    """The report's file: always `<REPORT_DIR>/<id>.<format>`, never a path read from the row
    (a row changed in the database cannot make a download serve another file)."""
    return Path(settings.REPORT_DIR) / f"{report.pk}.{report.format}"


def report_files(report: ComplianceReport) -> list[Path]:
    """The report file, its manifest and its signature (what retention deletes together)."""
    manifest, signature = verify.companion_paths(report_path(report))
    return [report_path(report), manifest, signature]


def _private_file(path: Path) -> None:
    """Create `path` empty, readable by its owner only (writers then open it for writing and
    keep its mode)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(descriptor)


def _write_json_file(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _private_file(tmp)
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=2, sort_keys=True, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- Asking for a report ------------------------------------------------------------------


def clean_filters(report_type: str, filters: Any) -> dict[str, Any]:
    """The filters, checked against what the report type accepts; ReportRefused names any
    unknown filter (a misspelt one must not be read as "no filter")."""
    if filters is None:
        return {}
    if not isinstance(filters, dict):
        raise ReportRefused("Filters must be a JSON object.", "invalid_filters", "filters")
    specs = filter_specs(report_type)
    unknown = sorted(str(name)[:64] for name in filters if name not in specs)
    if unknown:
        known = ", ".join(specs) or "none"
        raise ReportRefused(
            f"Unknown filter(s) for a {report_type} report: {', '.join(unknown[:20])}. "
            f"Known: {known}.",
            "unknown_filter",
            "filters",
        )
    cleaned: dict[str, Any] = {}
    for name, value in filters.items():
        spec = specs[name]
        if spec.kind == "bool":
            if not isinstance(value, bool):
                raise ReportRefused(f"Filter {name!r} must be true or false.", "invalid", "filters")
        elif spec.kind == "choice":
            if not isinstance(value, str) or value not in spec.choices:
                raise ReportRefused(
                    f"Filter {name!r} must be one of: {', '.join(spec.choices)}.",
                    "invalid",
                    "filters",
                )
        elif (
            not isinstance(value, str)
            or not value.strip()
            or len(value) > spec.max_length
            or "\x00" in value
            or not _encodable(value)
        ):
            raise ReportRefused(
                f"Filter {name!r} must be a non-blank string of at most {spec.max_length} "
                "characters.",
                "invalid",
                "filters",
            )
        cleaned[name] = value
    return cleaned


def _encodable(value: str) -> bool:
    # JSON can carry a lone surrogate (\ud800), which no database column can store.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(
    report_type: Any, report_format: Any, date_from: Any, date_to: Any, filters: Any
) -> dict[str, Any]:
    if report_type not in ReportType.values:
        raise ReportRefused(
            f"Unknown report type {str(report_type)[:40]!r}: one of "
            f"{', '.join(ReportType.values)}.",
            "unknown_type",
            "type",
        )
    if report_format not in ReportFormat.values:
        raise ReportRefused(
            f"Unknown format {str(report_format)[:40]!r}: one of {', '.join(ReportFormat.values)}.",
            "unknown_format",
            "format",
        )
    for name, value in (("from", date_from), ("to", date_to)):
        if isinstance(value, datetime) or not isinstance(value, date):
            raise ReportRefused("A date (YYYY-MM-DD) is required.", "invalid_date", name)
        if not EARLIEST <= value <= LATEST:
            raise ReportRefused(
                f"Must be between {EARLIEST} and {LATEST}.", "date_out_of_range", name
            )
    if date_from > date_to:
        raise ReportRefused(
            f"'from' ({date_from}) is after 'to' ({date_to}): the period would be empty.",
            "bad_range",
            "to",
        )
    return clean_filters(report_type, filters)


def period_of(date_from: date, date_to: date) -> tuple[datetime, datetime]:
    """[from 00:00 UTC, the day after `to` 00:00 UTC): the whole last day is in."""
    return (
        datetime.combine(date_from, time.min, tzinfo=UTC),
        datetime.combine(date_to + timedelta(days=1), time.min, tzinfo=UTC),
    )


def start_report(
    *,
    type: str,  # the API's and the model's name for it
    format: str,
    date_from: date,
    date_to: date,
    filters: dict[str, Any] | None,
    context: AuditContext,
    user: Any = None,
    enqueue: bool = True,
) -> ComplianceReport:
    """Record a pending report and hand its job to a worker (enqueue=False: to the caller).

    ReportRefused (a 400, naming the field) for an unknown type or format, a date that is not
    one, `from` after `to`, or an unknown or invalid filter.
    """
    cleaned = _clean(type, format, date_from, date_to, filters)
    period_from, period_to = period_of(date_from, date_to)
    if user is None and context.actor_id is not None:
        user = get_user_model().objects.filter(pk=context.actor_id).first()
    with transaction.atomic():
        report = ComplianceReport.objects.create(
            type=type,
            format=format,
            status=ReportStatus.PENDING,
            period_from=period_from,
            period_to=period_to,
            filters=cleaned,
            created_by=user,
            created_at=timezone.now(),
        )
        asked = {
            "type": type,
            "format": format,
            "from": date_from.isoformat(),
            "to": date_to.isoformat(),
            "filters": cleaned,
        }
        job = start_job(
            kind=REPORT_JOB_KIND,
            context=context,
            params={"report_id": str(report.pk), **asked},
            enqueue=enqueue,
        )
        report.job = job
        report.save(update_fields=["job"])
        record_event(
            action=AuditAction.REPORT_REQUESTED,
            context=context,
            object_type=_OBJECT_TYPE,
            object_id=report.pk,
            details={**asked, "job": job.pk},
        )
    return report


def generate_inline(
    *,
    type: str,
    format: str,
    date_from: date,
    date_to: date,
    filters: dict[str, Any] | None = None,
    context: AuditContext,
    user: Any = None,
) -> ComplianceReport:
    """`start_report`, then run its job in this process (the compliance self-test, commands).

    Returns the report as it ended: `succeeded`, or `failed` with its `error`."""
    report = start_report(
        type=type,
        format=format,
        date_from=date_from,
        date_to=date_to,
        filters=filters,
        context=context,
        user=user,
        enqueue=False,
    )
    run_job(report.job_id, generate_report_job)
    report.refresh_from_db()
    return report


# --- Generating it ------------------------------------------------------------------------


def generator_name() -> str:
    return f"Bridge {settings.SPECTACULAR_SETTINGS.get('VERSION', '')}".strip()


def checkpoint_evidence() -> dict[str, Any]:
    """Seal waiting events, sign a checkpoint, and name the newest published checkpoint whose
    signature a trusted key made (the chain up to it verified when it was signed: a new
    checkpoint is refused when the range since the last one does not connect).

    A refused checkpoint or a failed sealing does not stop the report: it is stated in the
    manifest as `problem`, with the newest good checkpoint before it.
    """
    from compliance import chain, checkpoints
    from compliance.sinks import configured_sinks
    from security.keys import trusted_keys

    problems = []
    try:
        # The events waiting right now (one batch): a backlog is the sealer's work, and what
        # stays unsealed is counted in the manifest rather than delaying the report.
        chain.seal_pending_events()
    except Exception as exc:  # the database or the sealer's lock: stated, not fatal
        problems.append(f"sealing pending events failed: {redact_text(str(exc))}")
    try:
        checkpoints.make_checkpoint()
    except checkpoints.CheckpointRefused as exc:
        problems.append(f"a new checkpoint was refused: {exc}")
    sinks = configured_sinks()
    ring = trusted_keys(checkpoints.sink_rotations(sinks))
    chosen = None
    published = AuditCheckpoint.objects.filter(status=CheckpointStatus.PUBLISHED)
    for candidate in published.order_by("-number")[:20]:
        try:
            record = candidate.record_data
        except ValueError:
            continue
        columns = (candidate.number, candidate.seq, candidate.hash)
        if isinstance(record, dict) and checkpoints.signed_by(record, ring):
            if (record.get("number"), record.get("seq"), record.get("hash")) == columns:
                chosen = (candidate, record)
                break
        problems.append(f"checkpoint #{candidate.number} in the database does not verify")
    head = chain.chain_head()
    head_seq = head.last_seq if head else 0
    if chosen is None:
        return {
            "number": None,
            "head_seq": head_seq,
            "problem": "; ".join(problems) or "no audit checkpoint is published yet",
        }
    candidate, record = chosen
    return {
        "number": candidate.number,
        "seq": candidate.seq,
        "hash": candidate.hash,
        "key_id": candidate.key_id,
        "time": record.get("time"),
        "signature": candidate.signature,
        "published_at": iso(candidate.published_at) if candidate.published_at else None,
        "sinks": list(candidate.sinks_written),
        "head_seq": head_seq,
        "covers_head": candidate.seq == head_seq,
        "problem": "; ".join(problems),
    }


def _verification_evidence() -> dict[str, Any] | None:
    from compliance.verification import latest_verification

    run = latest_verification()
    if run is None:
        return None
    return {
        "job": run.pk,
        "ok": run.ok,
        "finished_at": iso(run.finished_at) if run.finished_at else None,
        "checked": run.checked,
        "reason": run.reason,
    }


def _header(
    report: ComplianceReport, source: Any, now: datetime, job: Job, checkpoint: dict
) -> dict[str, Any]:
    last_day = (report.period_to - timedelta(days=1)).date()
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "report": {
            "id": str(report.pk),
            "type": report.type,
            "title": source.title,
            "format": report.format,
        },
        "parameters": {
            "from": report.period_from.date().isoformat(),
            "to": last_day.isoformat(),
            "period_from": iso(report.period_from),
            "period_to": iso(report.period_to),
            "period_to_exclusive": True,
            "filters": report.filters,
        },
        "generated_at": iso(now),
        "generator": generator_name(),
        "requested_by": job.actor_username,
        "columns": list(source.columns),
        "max_rows": settings.REPORT_MAX_ROWS,
        "checkpoint": checkpoint,
        "verification": _verification_evidence(),
    }


def _counts(stream: RowStream) -> dict[str, Any]:
    return {chart.title: dict(sorted(chart.counts.items())) for chart in stream.charts}


def generate_report_job(job: Job, progress: Progress) -> dict[str, Any]:
    """The job's work: generate the report named in its params, sign it, record the outcome.

    A failure marks the report failed (with the error, audited as report.failed) and fails
    the job; its partial files are removed."""
    report_id = job.params.get("report_id")
    claimed = ComplianceReport.objects.filter(pk=report_id, status=ReportStatus.PENDING).update(
        status=ReportStatus.RUNNING
    )
    if not claimed:
        raise ReportFailed(f"report {report_id} is not pending (already run, or gone)")
    report = ComplianceReport.objects.get(pk=report_id)
    context = AuditContext(actor_id=job.actor_id, actor_username=job.actor_username)
    try:
        return _generate(report, job, progress, context)
    except BaseException as exc:  # a cancel or a lost job too: the report must not stay running
        _fail(report, exc, context)
        raise


def _generate(
    report: ComplianceReport, job: Job, progress: Progress, context: AuditContext
) -> dict[str, Any]:
    now = timezone.now()
    directory = report_dir()
    progress.update(0, None, "sealing and signing a checkpoint of the audit trail")
    checkpoint = checkpoint_evidence()
    source = SOURCES[report.type](
        period_from=report.period_from,
        period_to=report.period_to,
        filters=report.filters,
        checkpoint=checkpoint,
        now=now,
        json_text=report.format == ReportFormat.CSV,
    )
    limit = settings.REPORT_MAX_ROWS
    estimate = source.estimate()
    total = min(estimate, limit) if estimate is not None else None
    progress.update(0, total, "reading rows")

    def on_progress(done: int) -> None:
        progress.update(done, max(total, done) if total is not None else None)

    stream = RowStream(source.rows(), limit=limit, charts=source.charts(), on_progress=on_progress)
    header = _header(report, source, now, job, checkpoint)

    def summary() -> dict[str, Any]:
        return {"counts": _counts(stream), "evidence": source.evidence()}

    content = ReportContent(source.title, header, source.columns, stream, summary, source.widths)
    final = report_path(report)
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        _private_file(tmp)
        written = WRITERS[report.format](tmp, content)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    progress.update(stream.count, stream.count, "signing the manifest")
    sha256, size = verify.file_digest(final)
    manifest = {
        **header,
        "rows": stream.count,
        "rows_in_file": written.rows_in_file,
        "truncated": stream.truncated,
        "caps": written.caps,
        **summary(),
        "file": {
            "name": final.name,
            "media_type": written.media_type,
            "size": size,
            "sha256": sha256,
        },
        "signing_key_id": signing.signing_key_id(),
    }
    # JSON-safe (times as text, no NaN): what is signed must read back as the same document.
    manifest = json.loads(proof.canonical_json(_json_ready(manifest)))
    signature = signing.sign(manifest)
    manifest_path, signature_path = verify.companion_paths(final)
    _write_json_file(manifest_path, manifest)
    _write_json_file(signature_path, signature)
    with transaction.atomic():
        done = ComplianceReport.objects.filter(pk=report.pk, status=ReportStatus.RUNNING).update(
            status=ReportStatus.SUCCEEDED,
            file_path=str(final),
            size=size,
            sha256=sha256,
            rows=stream.count,
            truncated=stream.truncated,
            manifest=manifest,
            signature=signature["signature"],
            key_id=signature["key_id"],
            checkpoint_number=checkpoint.get("number"),
            error="",
            finished_at=timezone.now(),
        )
        if not done:
            raise ReportFailed(f"report {report.pk} stopped running meanwhile (reaped?)")
        record_event(
            action=AuditAction.REPORT_GENERATED,
            context=context,
            object_type=_OBJECT_TYPE,
            object_id=report.pk,
            details={
                "type": report.type,
                "format": report.format,
                "rows": stream.count,
                "truncated": stream.truncated,
                "sha256": sha256,
                "size": size,
                "key_id": signature["key_id"],
                "checkpoint": checkpoint.get("number"),
            },
        )
    if stream.truncated:
        log.warning("report %s truncated at %s rows (REPORT_MAX_ROWS)", report.pk, limit)
    return {
        "report_id": str(report.pk),
        "rows": stream.count,
        "truncated": stream.truncated,
        "sha256": sha256,
        "size": size,
        "checkpoint": checkpoint.get("number"),
        "caps": written.caps,
    }


def _json_ready(value: Any) -> Any:
    """`value` with what JSON cannot hold (times, UUIDs, decimals) as text and non-finite
    numbers as null: the manifest must read back as exactly the document that was signed."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _fail(report: ComplianceReport, exc: BaseException, context: AuditContext) -> None:
    text = (
        str(exc) if isinstance(exc, SourceError | ReportFailed) else f"{type(exc).__name__}: {exc}"
    )
    error = redact_text(text)[:2000]
    for path in report_files(report):
        path.unlink(missing_ok=True)
    with transaction.atomic():
        failed = ComplianceReport.objects.filter(
            pk=report.pk, status__in=(ReportStatus.PENDING, ReportStatus.RUNNING)
        ).update(status=ReportStatus.FAILED, error=error, finished_at=timezone.now())
        if failed:
            record_event(
                action=AuditAction.REPORT_FAILED,
                context=context,
                object_type=_OBJECT_TYPE,
                object_id=report.pk,
                details={"type": report.type, "format": report.format, "error": error},
            )
    log.error("compliance report %s (%s) failed: %s", report.pk, report.type, error)


def reap_reports() -> int:
    """Fail reports whose job ended without them (a worker lost mid-report, a cancel, a queue
    refusal): a report never stays pending or running behind a finished job."""
    stale = ComplianceReport.objects.filter(
        status__in=(ReportStatus.PENDING, ReportStatus.RUNNING),
        job__status__in=(JobStatus.FAILED, JobStatus.CANCELLED),
    ).select_related("job")
    reaped = 0
    for report in stale:
        job = report.job
        error = f"its job {job.pk} {job.status}: {job.error}"[:2000]
        with transaction.atomic():
            if ComplianceReport.objects.filter(
                pk=report.pk, status__in=(ReportStatus.PENDING, ReportStatus.RUNNING)
            ).update(status=ReportStatus.FAILED, error=error, finished_at=timezone.now()):
                reaped += 1
                record_event(
                    action=AuditAction.REPORT_FAILED,
                    context=AuditContext.system(),
                    object_type=_OBJECT_TYPE,
                    object_id=report.pk,
                    details={"type": report.type, "format": report.format, "error": error},
                )
    return reaped


# --- Reading it ---------------------------------------------------------------------------


class ReportTampered(Exception):
    """A report's file (or its manifest or signature) on disk is not what was generated."""


def open_report_file(report: ComplianceReport) -> Any:
    """The report's file opened for reading, after checking its bytes are those generated:
    the SHA-256 and size recorded on the row when the report was signed. A file swapped or
    edited on disk (another report's validly signed file, say) raises ReportTampered and is
    never served. Hashed through the open handle, so a swap after the check serves nothing.
    FileNotFoundError when the file is gone."""
    # Returned open: the caller (a FileResponse) closes it.
    handle = open(report_path(report), "rb")
    try:
        digest = hashlib.sha256()
        size = 0
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
        if digest.hexdigest() != report.sha256 or size != report.size:
            log.error(
                "report %s: the file on disk (%s bytes, SHA-256 %s) is not the one generated "
                "(%s bytes, SHA-256 %s): not served",
                report.pk,
                size,
                digest.hexdigest(),
                report.size,
                report.sha256,
            )
            raise ReportTampered(
                f"The file of report {report.pk} was changed after it was generated (its "
                "SHA-256 does not match the one recorded): it is not served."
            )
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return handle


def read_companion(report: ComplianceReport, index: int) -> dict[str, Any]:
    """The report's manifest (0) or signature file (1) as stored beside it, after checking it
    is the one recorded on the row when the report was signed (ReportTampered otherwise);
    FileNotFoundError when it is gone."""
    path = verify.companion_paths(report_path(report))[index]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if index == 0:
        intact = data == report.manifest
    else:
        intact = (
            isinstance(data, dict)
            and data.get("signature") == report.signature
            and data.get("key_id") == report.key_id
        )
    if not intact:
        log.error("report %s: %s on disk is not the one recorded: not served", report.pk, path)
        raise ReportTampered(
            f"The {path.name} of report {report.pk} was changed after the report was signed: "
            "it is not served."
        )
    return data


def record_download(*, report: ComplianceReport, context: AuditContext) -> None:
    """Audit a download of the report file (before it is served)."""
    record_event(
        action=AuditAction.REPORT_DOWNLOADED,
        context=context,
        object_type=_OBJECT_TYPE,
        object_id=report.pk,
        details={
            "type": report.type,
            "format": report.format,
            "rows": report.rows,
            "sha256": report.sha256,
            "size": report.size,
        },
    )


def verify_report_file(
    path: str | Path,
    signature_path: str | Path | None = None,
    manifest_path: str | Path | None = None,
    public_keys: list[Any] | None = None,
) -> Verdict:
    """Check a report file against its manifest and the manifest's signature.

    Without `public_keys`, against the keys Bridge trusts (its audit signing key and the
    keys rotation records link to it); with them, against those alone (a pinned key).
    The manifest and signature default to `<id>.manifest.json` and `<id>.sig` beside it."""
    ring_for = verify.pinned_ring(public_keys) if public_keys else signing.trusted_ring
    return verify.verify_report(
        Path(path),
        ring_for=ring_for,
        manifest_path=Path(manifest_path) if manifest_path else None,
        signature_path=Path(signature_path) if signature_path else None,
    )
