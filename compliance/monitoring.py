"""Compliance monitoring: rules that open and resolve violations, their alerts, the status and
metrics pages, and the self-test.

A rule looks at what Bridge already records and answers "which findings hold now", each keyed
within the rule (a DSR id, a user, "" for a global one). `raise_violation` keeps at most one open
ComplianceViolation per (rule, key) and alerts when it opens; a finding that no longer holds is
resolved. Rules run on beat (`evaluate_rules_task`, every COMPLIANCE_CHECK_INTERVAL) and, where
that is cheap, on the audit events that can change their answer (`observe_audit_trail`), so a
broken chain or a burst of exports is a violation at once rather than minutes later.

The rules:

- `dsr_due_soon` (warning): an open request due within DSR_REMINDER_DAYS; the first time also
  sets the request's `reminded_at` (the alert is the reminder). `dsr_overdue` (critical): past
  its due date. A request waiting for identity proof is left out: its clock is paused (Art.
  12(6)), and its due date moves when it resumes.
- `audit_chain_broken` (critical): the latest verification found the chain broken. A run that
  could not finish proves nothing either way: the newest run that did decides.
- `backup_stale` (critical): the newest successful backup is older than BACKUP_RPO (or there is
  none).
- `retention_failed` (warning): the latest retention job failed. It runs again the next day;
  until then data past retention is kept a day longer, not lost.
- `export_volume` (warning): a user made more exports (DSR exports downloaded, reports
  downloaded, audit trail exports) than COMPLIANCE_EXPORT_VOLUME ("N/window") allows within the
  window; resolved once the window holds N or fewer.
- `sod_conflict` (critical): a segregation-of-duties conflict reported by
  `compliance.approvals.sod_conflicts` over the last SOD_LOOKBACK (an approval decided by its own
  requester, a live restore or key rotation without an approval, a user holding roles declared
  conflicting); resolved once it is no longer reported for that period.
- `no_consent` (critical): processing declared in the trail for a subject who has not consented
  to its purpose. An integration declares processing that relies on consent by recording
  `POST /api/compliance/audit/log {"action": "processing", "details": {"subject_id",
  "purpose"}}` (stored as `custom.processing`). The check runs on the event, and beat re-checks
  the last two intervals (against the consent held when the event happened) in case a process
  died before its observer ran. One violation per purpose and subject (the key is a keyed hash
  of the subject id, so the violation and its alert carry no personal data; its details list the
  audit events, which show the subject to those allowed to see it); resolved once no such
  processing happened for NO_CONSENT_QUIET.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.utils import timezone
from django.utils.crypto import salted_hmac

from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext, RecordedEvent, iso, observe, record_event
from compliance.choices import (
    COMPLIANCE_TEST_JOB_KIND,
    CUSTOM_ACTION_PREFIX,
    OPEN_DSR_STATUSES,
    RETENTION_JOB_KIND,
    AuditAction,
    DsrStatus,
    ViolationRule,
    ViolationSeverity,
    ViolationStatus,
)
from compliance.models import (
    AuditCheckpoint,
    AuditEvent,
    AuditVerification,
    ComplianceReport,
    ComplianceViolation,
    DataSubjectRequest,
    LegalHold,
)

if TYPE_CHECKING:
    from security.ratelimit import Rate

log = logging.getLogger(__name__)

# The retry executor's breaker and statistics names for compliance alerts (their own, so a
# dead compliance webhook never opens the recovery alerts' breaker, nor the reverse).
ALERT_MAIL_SERVICE = "compliance-alerts-mail"
ALERT_WEBHOOK_SERVICE = "compliance-alerts-webhook"
NO_CHANNEL = "no alert channel configured (COMPLIANCE_ALERT_EMAILS, COMPLIANCE_ALERT_WEBHOOK)"
# Undelivered alerts sent again per rule evaluation, at most.
ALERT_RETRIES_PER_RUN = 20

PROCESSING_ACTION = f"{CUSTOM_ACTION_PREFIX}processing"
EXPORT_ACTIONS: tuple[str, ...] = (
    AuditAction.DSR_EXPORT_DOWNLOADED,
    AuditAction.REPORT_DOWNLOADED,
    AuditAction.AUDIT_EXPORTED,
)
NO_CONSENT_QUIET = timedelta(hours=24)
SOD_LOOKBACK = timedelta(days=30)
# Request-logging coverage looks at this window, leaving out the last minute (a request still
# being served has its service events committed but its own event not yet). An hour: the query
# reads every event of the window, and GET /metrics must stay cheap on a busy trail.
COVERAGE_WINDOW = timedelta(hours=1)
COVERAGE_SETTLE = timedelta(seconds=60)
REQUEST_ACTIONS: tuple[str, ...] = (AuditAction.API_REQUEST, AuditAction.ADMIN_REQUEST)


@dataclass(frozen=True)
class Finding:
    """A rule's answer for one key: what to open (or keep open)."""

    severity: str
    summary: str
    details: dict


# --- Violations ----------------------------------------------------------------------------


def _violation_details(violation: ComplianceViolation) -> dict[str, Any]:
    # "key" alone is a secret word to the redaction of audit details: named in full here.
    return {
        "rule": violation.rule,
        "violation_key": violation.key,
        "severity": violation.severity,
        "summary": violation.summary,
        "details": violation.details,
    }


def _open_or_refresh(
    *,
    rule: str,
    key: str,
    severity: str,
    summary: str,
    details: dict,
    context: AuditContext,
) -> tuple[ComplianceViolation, bool]:
    summary, key = summary[:300], key[:200]
    for _ in range(5):
        now = timezone.now()
        current = ComplianceViolation.objects.filter(
            rule=rule, key=key, status=ViolationStatus.OPEN
        )
        if current.update(last_seen_at=now, severity=severity, summary=summary, details=details):
            violation = current.first()
            if violation is not None:
                return violation, False
            continue  # resolved between the two statements: open a new one
        try:
            with transaction.atomic():
                violation = ComplianceViolation.objects.create(
                    rule=rule,
                    key=key,
                    severity=severity,
                    summary=summary,
                    details=details,
                    opened_at=now,
                    last_seen_at=now,
                )
                record_event(
                    action=AuditAction.VIOLATION_OPENED,
                    context=context,
                    object_type="compliance.complianceviolation",
                    object_id=violation.pk,
                    details=_violation_details(violation),
                )
        except IntegrityError:
            # Another process opened it between our update and insert (the partial unique
            # constraint): refresh theirs on the next pass.
            continue
        return violation, True
    violation = ComplianceViolation.objects.get(rule=rule, key=key, status=ViolationStatus.OPEN)
    return violation, False


def raise_violation(
    *,
    rule: str,
    key: str,
    severity: str,
    summary: str,
    details: dict | None = None,
    context: AuditContext | None = None,
) -> ComplianceViolation:
    """Open the violation of `rule` for `key`, or refresh the open one (last seen, severity,
    summary, details). Opening records `compliance.violation.opened` and, once committed,
    alerts by mail and webhook (a Celery task, so a slow receiver never holds the caller)."""
    violation, opened = _open_or_refresh(
        rule=str(rule),
        key=key,
        severity=str(severity),
        summary=summary,
        details=details or {},
        context=context or AuditContext.system(),
    )
    if opened:
        log.warning(
            "compliance violation opened: %s %s (%s): %s", rule, key, severity, violation.summary
        )
        transaction.on_commit(functools.partial(_queue_alert, violation.pk), robust=True)
    return violation


def resolve_violation(
    *, rule: str, key: str, context: AuditContext | None = None, reason: str = ""
) -> ComplianceViolation | None:
    """Close the open violation of `rule` for `key` (compare-and-swap: once), recording
    `compliance.violation.resolved`; None when none was open."""
    violation = ComplianceViolation.objects.filter(
        rule=rule, key=key, status=ViolationStatus.OPEN
    ).first()
    if violation is None:
        return None
    now = timezone.now()
    with transaction.atomic():
        closed = ComplianceViolation.objects.filter(
            pk=violation.pk, status=ViolationStatus.OPEN
        ).update(status=ViolationStatus.RESOLVED, resolved_at=now)
        if not closed:
            return None
        record_event(
            action=AuditAction.VIOLATION_RESOLVED,
            context=context or AuditContext.system(),
            object_type="compliance.complianceviolation",
            object_id=violation.pk,
            details={
                "rule": violation.rule,
                "violation_key": violation.key,
                "open_seconds": round((now - violation.opened_at).total_seconds()),
                "reason": reason,
            },
        )
    violation.refresh_from_db()
    log.info("compliance violation resolved: %s %s", rule, key)
    return violation


def _sync(
    rule: str,
    findings: dict[str, Finding],
    *,
    started: datetime,
    resolve_others: bool = True,
) -> dict[str, Any]:
    """Raise every finding; resolve the rule's open violations not found any more.

    Only violations last seen before this evaluation started are resolved: one an observer
    opened meanwhile (for an event committed after this rule's query) stays open.
    """
    opened = 0
    for key, finding in findings.items():
        violation = raise_violation(
            rule=rule,
            key=key,
            severity=finding.severity,
            summary=finding.summary,
            details=finding.details,
        )
        opened += violation.opened_at >= started
    resolved = 0
    if resolve_others:
        stale = ComplianceViolation.objects.filter(
            rule=rule, status=ViolationStatus.OPEN, last_seen_at__lt=started
        ).exclude(key__in=list(findings))
        for key in stale.values_list("key", flat=True):
            resolved += (
                resolve_violation(rule=rule, key=key, reason="condition cleared") is not None
            )
    return {"found": len(findings), "opened": opened, "resolved": resolved}


# --- Alerts --------------------------------------------------------------------------------


def _queue_alert(violation_id: int) -> None:
    from compliance.tasks import send_violation_alert_task

    try:
        send_violation_alert_task.delay(violation_id)
    except Exception as exc:
        # The broker refused it (or, in eager mode, the sending itself broke): say so on the
        # row; the next rule evaluation sends undelivered alerts again.
        text = _describe(exc)
        log.error("compliance alert for violation %s not sent: %s", violation_id, text)
        ComplianceViolation.objects.filter(pk=violation_id).update(
            alert_error=f"not queued: {text}"[:2000]
        )


def _describe(exc: BaseException) -> str:
    """The root cause's type and first line, credentials in URLs masked."""
    from recovery.health import redact

    cause = exc
    while cause.__cause__ is not None and cause is not cause.__cause__:
        cause = cause.__cause__
    text = str(cause).strip()
    detail = text.splitlines()[0] if text else ""
    return redact(f"{type(cause).__name__}: {detail}".rstrip(": "))[:500]


def channels_configured() -> bool:
    return bool(settings.COMPLIANCE_ALERT_EMAILS or settings.COMPLIANCE_ALERT_WEBHOOK)


def _alert_text(violation: ComplianceViolation) -> tuple[str, str, dict[str, Any]]:
    label = ViolationRule(violation.rule).label if violation.rule in ViolationRule.values else ""
    subject = f"[Bridge] {violation.severity.upper()} compliance violation: {violation.summary}"
    body = (
        f"{label or violation.rule} ({violation.severity})\n"
        f"{violation.summary}\n\n"
        f"Rule: {violation.rule}\nKey: {violation.key or '-'}\n"
        f"Opened: {iso(violation.opened_at)}\nViolation id: {violation.pk}\n"
        f"Details: {violation.details}\n\n"
        "It is resolved on its own once the condition clears; "
        "see GET /api/compliance/violations.\n"
    )
    payload = {
        "type": "compliance.violation",
        "subject": subject[:200],
        "text": body,
        "violation_id": violation.pk,
        "rule": violation.rule,
        "key": violation.key,
        "severity": violation.severity,
        "summary": violation.summary,
        "details": violation.details,
        "opened_at": iso(violation.opened_at),
    }
    return subject[:200], body, payload


def send_violation_alert(violation_id: int) -> ComplianceViolation | None:
    """Mail COMPLIANCE_ALERT_EMAILS (Django's mail backend) and POST the JSON payload to
    COMPLIANCE_ALERT_WEBHOOK, each through the recovery retry executor. The outcome is kept
    on the violation: `alerted_at` once a channel delivered, `alert_error` naming each channel
    that did not (or that none is configured), and logged; delivery itself never raises."""
    from recovery import alerts, retry

    violation = ComplianceViolation.objects.filter(pk=violation_id).first()
    if violation is None:
        return None
    subject, body, payload = _alert_text(violation)
    recipients = list(settings.COMPLIANCE_ALERT_EMAILS)
    url = settings.COMPLIANCE_ALERT_WEBHOOK
    policy = alerts._policy()  # recovery's delivery policy: a short deadline, 4xx not retried
    errors: list[str] = []
    delivered = False
    if recipients:

        def mail() -> int:
            return send_mail(
                subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False
            )

        try:
            retry.call(mail, service=ALERT_MAIL_SERVICE, policy=policy)
            delivered = True
        except Exception as exc:
            errors.append(f"mail: {_describe(exc)}")
    if url:
        try:
            retry.call(
                lambda: alerts._post_webhook(url, payload),
                service=ALERT_WEBHOOK_SERVICE,
                policy=policy,
            )
            delivered = True
        except Exception as exc:
            errors.append(f"webhook: {_describe(exc)}")
    if not recipients and not url:
        errors.append(NO_CHANNEL)
    changes: dict[str, Any] = {"alert_error": "; ".join(errors)[:2000]}
    if delivered:
        changes["alerted_at"] = timezone.now()
    ComplianceViolation.objects.filter(pk=violation.pk).update(**changes)
    for error in errors:
        if error == NO_CHANNEL:
            log.warning("compliance violation %s: %s", violation.pk, error)
        else:
            log.error("compliance alert for violation %s not delivered: %s", violation.pk, error)
    violation.refresh_from_db()
    return violation


def _retry_alerts() -> int:
    """Send again the alerts of open violations that no channel delivered."""
    if not channels_configured():
        return 0
    waiting = (
        ComplianceViolation.objects.filter(status=ViolationStatus.OPEN, alerted_at__isnull=True)
        .exclude(alert_error="")
        .order_by("opened_at")
        .values_list("pk", flat=True)[:ALERT_RETRIES_PER_RUN]
    )
    count = 0
    for pk in list(waiting):
        send_violation_alert(pk)
        count += 1
    return count


# --- The rules -----------------------------------------------------------------------------


def _today(now: datetime) -> date:
    return now.astimezone(UTC).date()


def _dsr_rules(now: datetime, started: datetime) -> dict[str, Any]:
    if not settings.ENABLE_GDPR_COMPLIANCE:
        off = {"skipped": "ENABLE_GDPR_COMPLIANCE is off"}
        return {ViolationRule.DSR_DUE_SOON: off, ViolationRule.DSR_OVERDUE: off}
    today = _today(now)
    horizon = today + timedelta(days=settings.DSR_REMINDER_DAYS)
    running = [status for status in OPEN_DSR_STATUSES if status != DsrStatus.VERIFYING]
    requests = DataSubjectRequest.objects.filter(status__in=running, due_date__lte=horizon).only(
        "id", "type", "status", "due_date", "received_at", "reminded_at"
    )
    soon: dict[str, Finding] = {}
    overdue: dict[str, Finding] = {}
    for request in requests:
        key = str(request.pk)
        days = (request.due_date - today).days
        details = {
            "request_id": key,
            "type": request.type,
            "status": request.status,
            "due_date": request.due_date.isoformat(),
            "days_left": days,
        }
        if days < 0:
            overdue[key] = Finding(
                ViolationSeverity.CRITICAL,
                f"{request.type} request {key[:8]} is {-days} day(s) overdue "
                f"(due {request.due_date.isoformat()})",
                details,
            )
        else:
            soon[key] = Finding(
                ViolationSeverity.WARNING,
                f"{request.type} request {key[:8]} is due in {days} day(s) "
                f"({request.due_date.isoformat()})",
                details,
            )
            if request.reminded_at is None:
                # Once: the violation's alert is the reminder.
                DataSubjectRequest.objects.filter(pk=request.pk, reminded_at__isnull=True).update(
                    reminded_at=now
                )
    return {
        ViolationRule.DSR_DUE_SOON: _sync(ViolationRule.DSR_DUE_SOON, soon, started=started),
        ViolationRule.DSR_OVERDUE: _sync(ViolationRule.DSR_OVERDUE, overdue, started=started),
    }


def _chain_finding(result: dict[str, Any], run_id: int | None) -> Finding:
    where = result.get("first_broken_id")
    reason = result.get("reason") or "the chain does not verify"
    return Finding(
        ViolationSeverity.CRITICAL,
        f"Audit chain broken{f' at event {where}' if where else ''}: {reason}"[:300],
        {
            "verification_id": run_id,
            "first_broken_id": where,
            "first_broken_seq": result.get("first_broken_seq"),
            "checkpoint": result.get("checkpoint"),
            "reason": reason,
        },
    )


def _chain_rule(now: datetime, started: datetime) -> dict[str, Any]:
    from compliance.verification import latest_verification

    run = latest_verification()
    if run is not None and run.ok is None:
        # The latest run did not finish: the newest one that did decides.
        run = (
            AuditVerification.objects.filter(status=JobStatus.SUCCEEDED)
            .order_by("-finished_at", "-id")
            .first()
        )
    if run is None:
        return {"skipped": "no verification has finished yet"}
    findings = {} if run.ok else {"": _chain_finding(run.result, run.pk)}
    return {**_sync(ViolationRule.AUDIT_CHAIN_BROKEN, findings, started=started), "run": run.pk}


def _backup_rule(now: datetime, started: datetime) -> dict[str, Any]:
    from backups.services import newest_backup

    rpo = settings.BACKUP_RPO
    newest = newest_backup()
    findings: dict[str, Finding] = {}
    if newest is None:
        findings[""] = Finding(
            ViolationSeverity.CRITICAL,
            "No successful backup yet",
            {"rpo_seconds": int(rpo.total_seconds())},
        )
    else:
        taken = newest.finished_at or newest.created_at
        age = now - taken
        if age > rpo:
            findings[""] = Finding(
                ViolationSeverity.CRITICAL,
                f"Newest backup is {age.total_seconds() / 3600:.1f} h old, over the RPO of "
                f"{rpo.total_seconds() / 3600:.1f} h",
                {
                    "backup_id": str(newest.pk),
                    "finished_at": iso(taken),
                    "age_seconds": round(age.total_seconds()),
                    "rpo_seconds": int(rpo.total_seconds()),
                },
            )
    return _sync(ViolationRule.BACKUP_STALE, findings, started=started)


def latest_retention_run() -> Job | None:
    """The newest retention job that finished (succeeded or failed)."""
    return (
        Job.objects.filter(
            kind=RETENTION_JOB_KIND, status__in=(JobStatus.SUCCEEDED, JobStatus.FAILED)
        )
        .order_by("-finished_at", "-id")
        .first()
    )


def _retention_rule(now: datetime, started: datetime) -> dict[str, Any]:
    run = latest_retention_run()
    findings: dict[str, Finding] = {}
    if run is not None and run.status == JobStatus.FAILED:
        findings[""] = Finding(
            ViolationSeverity.WARNING,
            f"Retention job {run.pk} failed: {run.error or 'no error recorded'}"[:300],
            {
                "job_id": run.pk,
                "finished_at": iso(run.finished_at) if run.finished_at else None,
                "error": run.error[:1000],
            },
        )
    return _sync(ViolationRule.RETENTION_FAILED, findings, started=started)


def export_rate() -> Rate:
    """COMPLIANCE_EXPORT_VOLUME parsed by the rate limiter's parser ("20/1h")."""
    from security.ratelimit import Rate

    return Rate.parse(settings.COMPLIANCE_EXPORT_VOLUME)


def check_settings() -> None:
    """The monitoring settings parse, or the process does not start."""
    try:
        export_rate()
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"COMPLIANCE_EXPORT_VOLUME: expected count/window such as 20/1h ({exc})"
        ) from exc


def _export_findings(now: datetime, actor_id: int | None = None) -> dict[str, Finding]:
    from security.models import User

    rate = export_rate()
    window = settings.COMPLIANCE_EXPORT_VOLUME.partition("/")[2] or f"{rate.window:g} s"
    since = now - timedelta(seconds=rate.window)
    events = AuditEvent.objects.filter(
        action__in=EXPORT_ACTIONS, occurred_at__gt=since, occurred_at__lte=now
    )
    events = (
        events.filter(actor_id=actor_id) if actor_id is not None else events.exclude(actor_id=None)
    )
    over = (
        events.values("actor_id")
        .annotate(exports=Count("id"))
        .filter(exports__gt=rate.limit)
        .order_by("actor_id")
    )
    rows = list(over)
    names = dict(
        User.objects.filter(pk__in=[row["actor_id"] for row in rows]).values_list("pk", "username")
    )
    findings = {}
    for row in rows:
        user = row["actor_id"]
        name = names.get(user, f"user #{user}")
        by_action = dict(
            events.filter(actor_id=user)
            .values_list("action")
            .annotate(n=Count("id"))
            .values_list("action", "n")
        )
        findings[f"user:{user}"] = Finding(
            ViolationSeverity.WARNING,
            f"{name} exported {row['exports']} times in {window}, over the limit of {rate.limit}",
            {
                "actor_id": user,
                "username": name,
                "exports": row["exports"],
                "limit": rate.limit,
                "window_seconds": rate.window,
                "by_action": by_action,
            },
        )
    return findings


def _export_rule(now: datetime, started: datetime) -> dict[str, Any]:
    return _sync(ViolationRule.EXPORT_VOLUME, _export_findings(now), started=started)


def _sod_key(conflict: dict[str, Any]) -> str:
    # sod_conflicts gives each conflict a stable key ("event:12", "approval:<id>", ...).
    if conflict.get("key"):
        return str(conflict["key"])[:200]
    from compliance.proof import canonical_json

    digest = salted_hmac("bridge.compliance.sod", canonical_json(_json_safe(conflict)))
    return f"{conflict.get('type', 'conflict')}:{digest.hexdigest()[:32]}"


def _sod_rule(now: datetime, started: datetime) -> dict[str, Any]:
    if not settings.ENABLE_SOX_COMPLIANCE:
        return {"skipped": "ENABLE_SOX_COMPLIANCE is off"}
    try:
        from compliance.approvals import sod_conflicts
    except ImportError as exc:
        return {"skipped": f"compliance.approvals.sod_conflicts is not available: {exc}"}
    findings: dict[str, Finding] = {}
    for conflict in sod_conflicts(since=now - SOD_LOOKBACK):
        summary = conflict.get("summary") or (
            f"segregation-of-duties conflict: {conflict.get('type', 'unnamed')}"
        )
        findings[_sod_key(conflict)] = Finding(
            ViolationSeverity.CRITICAL, str(summary)[:300], _json_safe(conflict)
        )
    return _sync(ViolationRule.SOD_CONFLICT, findings, started=started)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(item) for item in value]
    if isinstance(value, datetime):
        return iso(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def subject_key(purpose: str, subject_id: str) -> str:
    """The no-consent violation's key: the purpose and a keyed hash of the subject id, so the
    violation (and its alert) carry no personal data and an erasure leaves nothing behind."""
    digest = salted_hmac("bridge.compliance.no_consent", subject_id, algorithm="sha256")
    return f"{purpose}:{digest.hexdigest()[:32]}"


def _no_consent_finding(purpose: str, event_ids: list[int], at: datetime) -> Finding:
    return Finding(
        ViolationSeverity.CRITICAL,
        f"Processing for {purpose!r} without the subject's consent (audit event {event_ids[-1]})",
        {"purpose": purpose, "event_ids": event_ids[-20:], "last_event_at": iso(at)},
    )


def _processing_subject(details: dict) -> tuple[str, str] | None:
    subject_id, purpose = details.get("subject_id"), details.get("purpose")
    if isinstance(subject_id, str) and subject_id and isinstance(purpose, str) and purpose:
        return subject_id, purpose
    return None


def _no_consent_rule(now: datetime, started: datetime) -> dict[str, Any]:
    from compliance.consent import configured_purposes, has_consent
    from compliance.personal import reveal

    if not settings.ENABLE_GDPR_COMPLIANCE:
        return {"skipped": "ENABLE_GDPR_COMPLIANCE is off"}
    since = now - timedelta(seconds=2 * settings.COMPLIANCE_CHECK_INTERVAL)
    recent = AuditEvent.objects.filter(
        action=PROCESSING_ACTION, occurred_at__gt=since, occurred_at__lte=now
    ).order_by("id")
    known = set(configured_purposes())
    offending: dict[str, tuple[str, list[int], datetime]] = {}
    checked = 0
    rows = recent.values_list(
        "id", "occurred_at", "actor_username", "client_ip", "personal", "details"
    )
    for event_id, occurred_at, actor, ip, personal, details in rows.iterator(chunk_size=2000):
        checked += 1
        try:
            revealed = reveal(
                actor_username=actor, client_ip=ip, personal=personal, details=details
            )
        except ValueError:
            continue  # sealed data this reader cannot open: nothing to check it against
        if revealed.erased:
            continue
        found = _processing_subject(revealed.details)
        if found is None:
            continue
        subject_id, purpose = found
        if purpose in known and has_consent(subject_id, purpose, at=occurred_at):
            continue
        key = subject_key(purpose, subject_id)
        _, ids, _ = offending.get(key, (purpose, [], occurred_at))
        offending[key] = (purpose, [*ids, event_id], occurred_at)
    for key, (purpose, ids, at) in offending.items():
        finding = _no_consent_finding(purpose, ids, at)
        raise_violation(
            rule=ViolationRule.NO_CONSENT,
            key=key,
            severity=finding.severity,
            summary=finding.summary,
            details=finding.details,
        )
    quiet = ComplianceViolation.objects.filter(
        rule=ViolationRule.NO_CONSENT,
        status=ViolationStatus.OPEN,
        # Quiet for NO_CONSENT_QUIET at `now`, and not refreshed since this run started.
        last_seen_at__lt=min(now - NO_CONSENT_QUIET, started),
    ).exclude(key__in=list(offending))
    resolved = 0
    for key in quiet.values_list("key", flat=True):
        resolved += (
            resolve_violation(
                rule=ViolationRule.NO_CONSENT,
                key=key,
                reason=f"no processing without consent for {NO_CONSENT_QUIET}",
            )
            is not None
        )
    return {"checked": checked, "found": len(offending), "resolved": resolved}


# Each entry returns its result; a function covering two rules returns {rule: result}.
_RULES: tuple[tuple[str, Callable[[datetime, datetime], dict[str, Any]]], ...] = (
    ("dsr", _dsr_rules),
    (ViolationRule.AUDIT_CHAIN_BROKEN, _chain_rule),
    (ViolationRule.BACKUP_STALE, _backup_rule),
    (ViolationRule.RETENTION_FAILED, _retention_rule),
    (ViolationRule.EXPORT_VOLUME, _export_rule),
    (ViolationRule.SOD_CONFLICT, _sod_rule),
    (ViolationRule.NO_CONSENT, _no_consent_rule),
)


def evaluate_rules(*, now: datetime | None = None) -> dict[str, Any]:
    """Run every rule: raise what holds, resolve what cleared. A rule that fails is logged and
    reported in the result; the others still run. Undelivered alerts are sent again.

    `now` is the moment the rules judge (tests move it); resolving only ever considers
    violations last seen before this call started.
    """
    started = timezone.now()
    now = now or started
    results: dict[str, Any] = {}
    for name, rule in _RULES:
        try:
            outcome = rule(now, started)
        except Exception as exc:
            log.exception("compliance rule %s failed", name)
            outcome = {"error": _describe(exc)}
        if name == "dsr" and "error" not in outcome:
            results.update({str(key): value for key, value in outcome.items()})
        elif name == "dsr":
            results[ViolationRule.DSR_DUE_SOON] = results[ViolationRule.DSR_OVERDUE] = outcome
        else:
            results[str(name)] = outcome
    retried = _retry_alerts()
    open_count = ComplianceViolation.objects.filter(status=ViolationStatus.OPEN).count()
    return {
        "evaluated_at": iso(now),
        "seconds": round((timezone.now() - started).total_seconds(), 3),
        "rules": results,
        "open": open_count,
        "alerts_retried": retried,
    }


# --- On events -----------------------------------------------------------------------------


def _on_chain_event(event: RecordedEvent) -> None:
    if event.action == AuditAction.AUDIT_BROKEN:
        run_id = int(event.object_id) if event.object_id.isdigit() else None
        finding = _chain_finding(event.details, run_id)
        raise_violation(
            rule=ViolationRule.AUDIT_CHAIN_BROKEN,
            key="",
            severity=finding.severity,
            summary=finding.summary,
            details=finding.details,
        )
    else:
        resolve_violation(
            rule=ViolationRule.AUDIT_CHAIN_BROKEN, key="", reason="a verification passed"
        )


def _on_processing(event: RecordedEvent) -> None:
    from compliance.consent import configured_purposes, has_consent

    if not settings.ENABLE_GDPR_COMPLIANCE:
        return
    found = _processing_subject(event.details)
    if found is None:
        return
    subject_id, purpose = found
    if purpose in configured_purposes() and has_consent(subject_id, purpose):
        return
    finding = _no_consent_finding(purpose, [event.id], timezone.now())
    key = subject_key(purpose, subject_id)
    current = ComplianceViolation.objects.filter(
        rule=ViolationRule.NO_CONSENT, key=key, status=ViolationStatus.OPEN
    ).first()
    if current is not None:
        ids = [*current.details.get("event_ids", []), event.id]
        finding = _no_consent_finding(purpose, ids, timezone.now())
    raise_violation(
        rule=ViolationRule.NO_CONSENT,
        key=key,
        severity=finding.severity,
        summary=finding.summary,
        details=finding.details,
    )


def _on_export(event: RecordedEvent) -> None:
    actor_id = event.context.actor_id
    if actor_id is None:
        return
    for key, finding in _export_findings(timezone.now(), actor_id).items():
        raise_violation(
            rule=ViolationRule.EXPORT_VOLUME,
            key=key,
            severity=finding.severity,
            summary=finding.summary,
            details=finding.details,
        )


def _on_job_finished(event: RecordedEvent) -> None:
    if event.details.get("kind") == RETENTION_JOB_KIND:
        _retention_rule(timezone.now(), timezone.now())


def _on_backup(event: RecordedEvent) -> None:
    now = timezone.now()
    _backup_rule(now, now)


def _on_dsr(event: RecordedEvent) -> None:
    now = timezone.now()
    _dsr_rules(now, now)


def _on_approval(event: RecordedEvent) -> None:
    now = timezone.now()
    _sod_rule(now, now)


def _safely(handler: Callable[[RecordedEvent], None]) -> Callable[[RecordedEvent], None]:
    @functools.wraps(handler)
    def run(event: RecordedEvent) -> None:
        try:
            handler(event)
        except Exception:
            # Beat evaluates every rule again within COMPLIANCE_CHECK_INTERVAL.
            log.exception("compliance rule on event %s (%s) failed", event.id, event.action)

    return run


_EVENT_RULES: dict[str, Callable[[RecordedEvent], None]] = {
    AuditAction.AUDIT_BROKEN: _safely(_on_chain_event),
    AuditAction.AUDIT_VERIFIED: _safely(_on_chain_event),
    PROCESSING_ACTION: _safely(_on_processing),
    **{action: _safely(_on_export) for action in EXPORT_ACTIONS},
    AuditAction.JOB_SUCCEEDED: _safely(_on_job_finished),
    AuditAction.JOB_FAILED: _safely(_on_job_finished),
    AuditAction.BACKUP_SUCCEEDED: _safely(_on_backup),
    **{
        action: _safely(_on_dsr)
        for action in (
            AuditAction.DSR_VERIFYING,
            AuditAction.DSR_VERIFIED,
            AuditAction.DSR_EXTENDED,
            AuditAction.DSR_COMPLETED,
            AuditAction.DSR_REJECTED,
        )
    },
    **{
        action: _safely(_on_approval)
        # What sod_conflicts looks at: decisions, live restores and key rotations.
        for action in (
            AuditAction.APPROVAL_APPROVED,
            AuditAction.APPROVAL_REJECTED,
            AuditAction.BACKUP_RESTORE_REQUESTED,
            AuditAction.KEYS_ROTATED,
        )
    },
}


def observe_audit_trail() -> None:
    """Subscribe the cheap rules to the events that change their answer (compliance.apps)."""
    for action, handler in _EVENT_RULES.items():
        observe([action], handler)


# --- Status and metrics --------------------------------------------------------------------


def _age(now: datetime, moment: datetime | None) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 3)


def _violation_counts() -> dict[str, Any]:
    rows = (
        ComplianceViolation.objects.filter(status=ViolationStatus.OPEN)
        .values_list("severity", "rule")
        .annotate(n=Count("id"))
    )
    by_severity = dict.fromkeys(ViolationSeverity.values, 0)
    by_rule: dict[str, int] = {}
    for severity, rule, n in rows:
        by_severity[severity] = by_severity.get(severity, 0) + n
        by_rule[rule] = by_rule.get(rule, 0) + n
    return {"open": sum(by_severity.values()), "by_severity": by_severity, "by_rule": by_rule}


def _dsr_counts(now: datetime) -> dict[str, Any]:
    today = _today(now)
    horizon = today + timedelta(days=settings.DSR_REMINDER_DAYS)
    running = [status for status in OPEN_DSR_STATUSES if status != DsrStatus.VERIFYING]
    open_requests = DataSubjectRequest.objects.filter(status__in=OPEN_DSR_STATUSES)
    counted = open_requests.aggregate(
        open=Count("id"),
        overdue=Count("id", filter=Q(status__in=running, due_date__lt=today)),
        due_soon=Count(
            "id", filter=Q(status__in=running, due_date__gte=today, due_date__lte=horizon)
        ),
    )
    by_status = dict.fromkeys([str(status) for status in OPEN_DSR_STATUSES], 0)
    for status, n in open_requests.values_list("status").annotate(n=Count("id")):
        by_status[status] = n
    return {**counted, "by_status": by_status}


def _verification_info(now: datetime) -> dict[str, Any] | None:
    from compliance.verification import latest_verification

    run = latest_verification()
    if run is None:
        return None
    return {
        "id": run.pk,
        "status": run.status,
        "ok": run.ok,
        "finished_at": run.finished_at,
        "age_seconds": _age(now, run.finished_at),
        "checked": run.checked,
        "reason": run.reason,
    }


def _checkpoint_info(checkpoint: AuditCheckpoint | None, now: datetime) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    return {
        "number": checkpoint.number,
        "seq": checkpoint.seq,
        "created_at": checkpoint.created_at,
        "age_seconds": _age(now, checkpoint.created_at),
        "status": checkpoint.status,
    }


def compliance_status() -> dict[str, Any]:
    """What a compliance officer asks first: what is on, is the trail intact, which requests
    are open or late, what is violated, how retention and reports stand."""
    from compliance.chain import chain_head, unsealed_count
    from compliance.choices import CheckpointStatus

    now = timezone.now()
    head = chain_head()
    published = AuditCheckpoint.objects.filter(status=CheckpointStatus.PUBLISHED).first()
    violations = _violation_counts()
    run = latest_retention_run()
    reports = dict(ComplianceReport.objects.values_list("status").annotate(n=Count("id")))
    critical = violations["by_severity"].get(ViolationSeverity.CRITICAL, 0)
    return {
        "status": "critical" if critical else ("warning" if violations["open"] else "ok"),
        "generated_at": now,
        "enabled": {
            "gdpr": settings.ENABLE_GDPR_COMPLIANCE,
            "sox": settings.ENABLE_SOX_COMPLIANCE,
            "audit_logging": settings.ENABLE_AUDIT_LOGGING,
        },
        "chain": {
            "head_seq": head.last_seq if head else 0,
            "sealed_at": head.sealed_at if head else None,
            "unsealed": unsealed_count(),
            "last_verification": _verification_info(now),
            "newest_checkpoint": _checkpoint_info(published, now),
            "pending_checkpoints": AuditCheckpoint.objects.filter(
                status=CheckpointStatus.PENDING
            ).count(),
        },
        "dsr": _dsr_counts(now),
        "violations": violations,
        "retention": {
            "dry_run": settings.RETENTION_DRY_RUN,
            "days": dict(settings.RETENTION_DAYS),
            "active_legal_holds": LegalHold.objects.filter(released_at__isnull=True).count(),
            "last_run": None
            if run is None
            else {
                "job_id": run.pk,
                "status": run.status,
                "finished_at": run.finished_at,
                "error": run.error,
                "result": run.result,
            },
        },
        "reports": {"total": sum(reports.values()), "by_status": reports},
    }


def _closed_at(request: DataSubjectRequest) -> datetime | None:
    """When a request was answered: completed_at, or for a rejection without it, the time of
    the history entry that rejected it."""
    if request.completed_at is not None:
        return request.completed_at
    for entry in reversed(request.history or []):
        if isinstance(entry, dict) and entry.get("status") == DsrStatus.REJECTED:
            at = entry.get("at")
            if isinstance(at, str):
                try:
                    return datetime.fromisoformat(at.replace("Z", "+00:00"))
                except ValueError:
                    return None
    return None


def dsr_figures() -> dict[str, Any]:
    """Closed requests (completed or rejected): how many on time (answered on or before the
    due date, in UTC), the median days from receipt to answer, how many were extended."""
    closed = DataSubjectRequest.objects.filter(
        status__in=(DsrStatus.COMPLETED, DsrStatus.REJECTED)
    ).only("received_at", "due_date", "completed_at", "history", "status")
    days: list[float] = []
    on_time = late = 0
    for request in closed.iterator(chunk_size=2000):
        at = _closed_at(request)
        if at is None:
            continue
        days.append((at - request.received_at).total_seconds() / 86400)
        if _today(at) <= request.due_date:
            on_time += 1
        else:
            late += 1
    answered = on_time + late
    extended = DataSubjectRequest.objects.filter(
        Q(extended_at__isnull=False) | Q(extension_months__gt=0)
    ).count()
    total = DataSubjectRequest.objects.count()
    return {
        "total": total,
        "closed": answered,
        "closed_on_time": on_time,
        "closed_late": late,
        "on_time_rate": round(on_time / answered, 4) if answered else None,
        "median_days_to_close": round(statistics.median(days), 2) if days else None,
        "extensions": extended,
        "extension_rate": round(extended / total, 4) if total else None,
    }


def request_logging_coverage(now: datetime | None = None) -> dict[str, Any]:
    """Of the requests that did something audited (a service event carrying a request id)
    over the last COVERAGE_WINDOW, the share whose request itself is in the trail (an
    `api.request` or `admin.request` event with the same request id).

    Every service event records the request id of the request it ran in, so a request id seen
    on a service event but on no request event is a request the trail missed: the middleware
    did not run for it, or its event was lost. Requests that changed nothing audited cannot be
    counted this way (nothing else records them); `api_requests` is how many were logged.
    """
    now = now or timezone.now()
    until = now - COVERAGE_SETTLE
    since = until - COVERAGE_WINDOW
    window = AuditEvent.objects.filter(occurred_at__gt=since, occurred_at__lte=until)
    activity = window.exclude(request_id="").exclude(action__in=REQUEST_ACTIONS)
    request_ids = activity.values("request_id").distinct()
    total = request_ids.count()
    logged = AuditEvent.objects.filter(
        action__in=REQUEST_ACTIONS, request_id__in=activity.values("request_id")
    )
    covered = logged.values("request_id").distinct().count()
    return {
        "enabled": settings.ENABLE_AUDIT_LOGGING,
        "window_seconds": int(COVERAGE_WINDOW.total_seconds()),
        "api_requests": window.filter(action=AuditAction.API_REQUEST).count(),
        "requests_with_activity": total,
        "covered": covered,
        "coverage": round(covered / total, 4) if total else None,
    }


def newest_verified_checkpoint() -> AuditCheckpoint | None:
    """The newest published checkpoint that existed when the latest passing verification
    finished: that run held the chain to every checkpoint in the sinks."""
    from compliance.choices import CheckpointStatus

    run = (
        AuditVerification.objects.filter(status=JobStatus.SUCCEEDED, result__ok=True)
        .order_by("-finished_at", "-id")
        .first()
    )
    if run is None or run.finished_at is None:
        return None
    return (
        AuditCheckpoint.objects.filter(
            status=CheckpointStatus.PUBLISHED, created_at__lte=run.finished_at
        )
        .order_by("-number")
        .first()
    )


def compliance_metrics() -> dict[str, Any]:
    """The figures an auditor asks for: DSRs answered on time, median days to answer and
    extensions; consent rates per purpose; request-logging coverage; the age of the newest
    verified checkpoint; open violations."""
    from compliance.consent import consent_rates

    now = timezone.now()
    checkpoint = newest_verified_checkpoint()
    return {
        "generated_at": now,
        "dsr": dsr_figures(),
        "consent": consent_rates(),
        "request_logging": request_logging_coverage(now),
        "newest_verified_checkpoint": _checkpoint_info(checkpoint, now),
        "violations": _violation_counts(),
    }


# --- The self-test -------------------------------------------------------------------------


def start_compliance_test(*, context: AuditContext) -> Job:
    """Ask for a self-test run (a job); while one is pending or running, that one is returned."""
    from bridge.jobs import start_job

    active = (
        Job.objects.filter(
            kind=COMPLIANCE_TEST_JOB_KIND, status__in=(JobStatus.PENDING, JobStatus.RUNNING)
        )
        .order_by("id")
        .first()
    )
    if active is not None:
        return active
    return start_job(kind=COMPLIANCE_TEST_JOB_KIND, context=context, params={})


def _check_chain(context: AuditContext) -> tuple[bool, str, dict]:
    from compliance.chain import seal_all_pending
    from compliance.verification import check_chain

    # What is recorded up to now is sealed first (the sealer's lock keeps this from forking
    # the chain), so the check covers the newest events too.
    seal_all_pending()
    result = check_chain()
    detail = f"{result.checked} sealed events verified" if result.ok else result.reason
    return result.ok, detail, {"checked": result.checked, "unsealed": result.unsealed}


def _check_dsr(context: AuditContext) -> tuple[bool, str, dict]:
    from compliance.dsr import run_synthetic_dsr

    result = run_synthetic_dsr(context=context) or {}
    steps = [step for step in result.get("checks", []) if isinstance(step, dict)]
    ok = bool(result.get("ok")) and bool(steps)
    if ok:
        return True, f"access and erasure ran end to end ({len(steps)} checks)", result
    failed = [
        f"{step.get('name', '?')}: {step.get('detail') or 'failed'}"
        for step in steps
        if not step.get("ok")
    ]
    return False, "; ".join(failed) or "the synthetic request reported no checks", result


def _check_report(context: AuditContext) -> tuple[bool, str, dict]:
    from compliance import reports
    from compliance.choices import ReportFormat, ReportStatus, ReportType

    today = _today(timezone.now())
    report = reports.generate_inline(
        type=ReportType.AUDIT_TRAIL,
        format=ReportFormat.JSON,
        date_from=today,
        date_to=today,
        filters={},
        context=context,
    )
    facts = {"report_id": str(report.pk), "rows": report.rows, "sha256": report.sha256}
    if report.status != ReportStatus.SUCCEEDED:
        return False, f"the report {report.status}: {report.error or 'no error recorded'}", facts
    verdict = reports.verify_report_file(report.file_path)
    reason = getattr(verdict, "reason", "") or ""
    if not verdict.ok:
        return False, f"the report does not verify: {reason}", facts
    return True, "an audit trail report was generated, signed and verified", facts


_CHECKS: tuple[tuple[str, Callable[[AuditContext], tuple[bool, str, dict]]], ...] = (
    ("chain_verifies", _check_chain),
    ("dsr_end_to_end", _check_dsr),
    ("report_verifies", _check_report),
)


def compliance_test_job(job: Job, progress: Any) -> dict[str, Any]:
    """The self-test's work: each check passes or fails on its own (a missing component is a
    failed check naming why); the job succeeds whenever it could run them all."""
    context = AuditContext(actor_id=job.actor_id, actor_username=job.actor_username)
    checks = []
    for done, (name, check) in enumerate(_CHECKS):
        progress.update(done, len(_CHECKS), name)
        started = time.perf_counter()
        try:
            passed, detail, facts = check(context)
        except ImportError as exc:
            passed, detail, facts = False, f"not available: {exc}", {}
        except Exception as exc:
            log.exception("compliance self-test check %s raised", name)
            passed, detail, facts = False, _describe(exc), {}
        checks.append(
            {
                "name": name,
                "passed": bool(passed),
                "detail": detail[:500],
                "seconds": round(time.perf_counter() - started, 3),
                "facts": _json_safe(facts),
            }
        )
    progress.update(len(_CHECKS), len(_CHECKS), "done")
    passed = all(check["passed"] for check in checks)
    record_event(
        action=AuditAction.COMPLIANCE_TEST,
        context=context,
        object_type="bridge.job",
        object_id=job.pk,
        details={
            "passed": passed,
            "checks": {check["name"]: check["passed"] for check in checks},
        },
    )
    if not passed:
        failed = [check["name"] for check in checks if not check["passed"]]
        log.error("compliance self-test %s failed: %s", job.pk, ", ".join(failed))
    return {"passed": passed, "checks": checks}
