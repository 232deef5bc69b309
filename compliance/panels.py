"""The compliance area's dashboard panels: the audit trail and its hash chain, the signed
checkpoints, and the GDPR & SOX work (requests against their deadlines, violations, consent)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from django.conf import settings
from django.db.models import Count, F, Q
from django.db.models.functions import TruncHour
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.panels import (
    Bar,
    Chart,
    Figure,
    Link,
    PanelContent,
    Row,
    age,
    register_panel,
    utc,
    worst,
)
from compliance.chain import (
    chain_head,
    oldest_unsealed_age,
    seal_lag_limit,
    total_event_count,
)
from compliance.checkpoints import checkpoint_health
from compliance.models import AuditEvent
from compliance.sinks import configured_sinks
from compliance.verification import latest_verification


def hourly_bars(hours: int = 24) -> list[Bar]:
    """Events per hour over the last `hours` hours, the current hour last; empty hours are 0."""
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=hours - 1)
    counts = {
        row["hour"]: row["n"]
        for row in AuditEvent.objects.filter(occurred_at__gte=start)
        .annotate(hour=TruncHour("occurred_at"))
        .values("hour")
        .annotate(n=Count("id"))
    }
    moments = [start + timedelta(hours=i) for i in range(hours)]
    return [Bar(moment.strftime("%H:00"), counts.get(moment, 0)) for moment in moments]


@register_panel(
    "compliance",
    title="Compliance · audit trail",
    permissions=("compliance.view_auditevent",),
    order=10,
)
def audit_panel(request: HttpRequest) -> PanelContent:
    head = chain_head()
    total = total_event_count()
    sealed = head.last_seq if head else 0
    waiting = max(0, total - sealed)
    oldest = oldest_unsealed_age()
    behind = oldest is not None and oldest > seal_lag_limit()

    run = latest_verification()
    if run is None:
        outcome, outcome_state, hint = "never", "warn", "no verification has finished yet"
    else:
        if run.status == JobStatus.FAILED:
            outcome, outcome_state = "did not finish", "warn"
        elif run.ok:
            outcome, outcome_state = "intact", "ok"
        else:
            outcome, outcome_state = "BROKEN", "bad"
        run_age = timezone.now() - run.finished_at if run.finished_at else None
        if (
            outcome_state == "ok"
            and run_age
            and run_age.total_seconds() > 2 * (settings.AUDIT_VERIFY_INTERVAL)
        ):
            outcome_state = "warn"  # intact, but nobody has looked for a while
        hint = f"{utc(run.finished_at)}, {age(run_age)} ago, {run.checked} checked"
        if run.first_broken_id:
            hint += f", first broken event #{run.first_broken_id}"

    state = worst(outcome_state, "warn" if behind else "ok")
    badge = {"ok": "chain intact", "bad": "CHAIN BROKEN"}.get(outcome_state, "not verified")
    if outcome_state == "warn" and run is not None and outcome == "intact":
        badge = "verification overdue"
    chart = Chart("Events per hour, last 24 h (UTC)", hourly_bars())
    return PanelContent(
        state=state,
        badge=badge,
        figures=[
            Figure("events", total),
            Figure("sealed", sealed, state="ok" if sealed == total else ""),
            Figure("waiting for seal", waiting, state="warn" if behind else ""),
            Figure(
                "oldest unsealed",
                age(oldest) if oldest is not None else "none",
                state="warn" if behind else "ok",
                hint="the sealer is behind" if behind else "",
            ),
            Figure(
                "last verification",
                outcome,
                state=outcome_state,
                hint=hint,
                permission="compliance.view_auditverification",
            ),
        ],
        chart=chart,
        links=[
            Link(
                "Browse events",
                reverse("admin:compliance_auditevent_changelist"),
                permission="compliance.view_auditevent",
            ),
            Link(
                "Verifications",
                reverse("admin:compliance_auditverification_changelist"),
                permission="compliance.view_auditverification",
            ),
        ],
        note=""
        if settings.ENABLE_AUDIT_LOGGING
        else "Request logging is off (ENABLE_AUDIT_LOGGING): only logins, token events and "
        "admin changes are recorded.",
    )


@register_panel(
    "compliance-checkpoints",
    title="Compliance · signed checkpoints",
    permissions=("compliance.view_auditcheckpoint",),
    order=11,
)
def checkpoint_panel(request: HttpRequest) -> PanelContent:
    from security.keys import SigningKeyError, audit_signing_key

    health = checkpoint_health()
    newest = health.newest
    head = chain_head()
    uncovered = max(0, (head.last_seq if head else 0) - (newest.seq if newest else 0))
    try:
        # The id's hex part, short enough for a figure; the whole id in the hint.
        full = audit_signing_key().key_id
        key_id, key_state, key_hint = full.split(":")[-1][:8], "ok", f"{full} signs new ones"
    except SigningKeyError as exc:
        key_id, key_state, key_hint = "unusable", "bad", str(exc)
    state = worst("warn" if not health.ok else "ok", key_state)
    if newest is None:
        last, last_hint = "none yet", f"one every {settings.AUDIT_CHECKPOINT_INTERVAL} s"
    else:
        last = f"#{newest.number} at seq {newest.seq}"
        last_hint = f"{utc(newest.created_at)}, {age(timezone.now() - newest.created_at)} ago"
    return PanelContent(
        state=state,
        badge="anchored"
        if state == "ok"
        else ("KEY UNUSABLE" if key_state == "bad" else "sink failing"),
        figures=[
            Figure("last checkpoint", last, state="ok" if newest else "", hint=last_hint),
            Figure(
                "sealed, not yet signed",
                uncovered,
                hint="not yet protected against a database superuser",
            ),
            Figure(
                "waiting for a sink",
                health.pending,
                state="warn" if not health.ok else "",
                hint=health.message,
            ),
            Figure("signing key", key_id, state=key_state, hint=key_hint),
        ],
        rows_title="Sinks",
        rows=[
            Row(
                sink.name,
                "failing" if health.failing and sink.name in health.failing else "ok",
                state="warn" if health.failing and sink.name in health.failing else "ok",
                detail=str(getattr(sink, "path", "")),
            )
            for sink in configured_sinks()
        ],
        links=[
            Link(
                "Checkpoints",
                reverse("admin:compliance_auditcheckpoint_changelist"),
                permission="compliance.view_auditcheckpoint",
            ),
            Link(
                "Signing keys",
                reverse("admin:security_signingkey_changelist"),
                permission="security.view_signingkey",
            ),
        ],
        note="Events not yet sealed and checkpointed are not yet protected against a "
        "database superuser.",
    )


# --- GDPR & SOX (issue 11) ------------------------------------------------------------------


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _rejected_on(history: list) -> date | None:
    """The UTC day a request was rejected: its history's last `rejected` entry (the row has no
    column for it; compliance.dsr.dsr_metrics reads it the same way)."""
    for entry in reversed(history or []):
        if isinstance(entry, dict) and entry.get("status") == "rejected":
            try:
                return datetime.fromisoformat(entry["at"]).astimezone(UTC).date()
            except (KeyError, TypeError, ValueError):
                return None
    return None


def answered_on_time() -> tuple[int, int]:
    """(answered by their due date, answered): completed requests by one aggregate, rejected
    ones (few) by their history."""
    from compliance.choices import DsrStatus
    from compliance.models import DataSubjectRequest

    completed = DataSubjectRequest.objects.aggregate(
        answered=Count("id", filter=Q(status=DsrStatus.COMPLETED, completed_at__isnull=False)),
        on_time=Count(
            "id", filter=Q(status=DsrStatus.COMPLETED, completed_at__date__lte=F("due_date"))
        ),
    )
    answered, on_time = completed["answered"], completed["on_time"]
    rejected = DataSubjectRequest.objects.filter(status=DsrStatus.REJECTED)
    for due, history in rejected.values_list("due_date", "history"):
        day = _rejected_on(history)
        if day is not None:
            answered += 1
            on_time += day <= due
    return on_time, answered


@register_panel(
    "compliance-gdpr",
    title="Compliance · GDPR & SOX",
    permissions=("compliance.view_datasubjectrequest",),
    order=12,
)
def gdpr_sox_panel(request: HttpRequest) -> PanelContent:
    """Requests against their deadlines, open violations, consent per purpose, approvals
    waiting, the last retention run and the newest report: a handful of aggregate queries."""
    from bridge.models import Job
    from compliance import consent
    from compliance.admin_gdpr import days_left_text, dsr_urgency, today_utc
    from compliance.choices import (
        OPEN_DSR_STATUSES,
        RETENTION_JOB_KIND,
        ApprovalStatus,
        DsrStatus,
        ViolationSeverity,
        ViolationStatus,
    )
    from compliance.models import (
        ApprovalRequest,
        ComplianceReport,
        ComplianceViolation,
        DataSubjectRequest,
    )

    today = today_utc()
    soon = today + timedelta(days=settings.DSR_REMINDER_DAYS)
    is_open = Q(status__in=OPEN_DSR_STATUSES)
    # A request waiting for proof of identity has its clock paused: never overdue or due soon
    # (as compliance.monitoring counts them).
    running = is_open & ~Q(status=DsrStatus.VERIFYING)
    queue = DataSubjectRequest.objects.aggregate(
        open=Count("id", filter=is_open),
        overdue=Count("id", filter=running & Q(due_date__lt=today)),
        due_soon=Count("id", filter=running & Q(due_date__gte=today, due_date__lte=soon)),
    )
    on_time, answered = answered_on_time()
    late = answered - on_time

    violations = dict(
        ComplianceViolation.objects.filter(status=ViolationStatus.OPEN)
        .values_list("severity")
        .annotate(n=Count("id"))
    )
    critical = violations.get(ViolationSeverity.CRITICAL, 0)
    warnings = violations.get(ViolationSeverity.WARNING, 0)

    pending = ApprovalRequest.objects.filter(
        status=ApprovalStatus.PENDING, expires_at__gt=timezone.now()
    ).count()

    retention = Job.objects.filter(kind=RETENTION_JOB_KIND).order_by("-id").first()
    if retention is None:
        retention_value, retention_state, retention_hint = "never", "warn", "no run yet"
    else:
        retention_value = retention.get_status_display().lower()
        retention_state = {
            JobStatus.SUCCEEDED: "ok",
            JobStatus.FAILED: "bad",
            JobStatus.CANCELLED: "warn",
        }.get(retention.status, "info")
        moment = retention.finished_at or retention.created_at
        retention_hint = f"{utc(moment)}, {age(timezone.now() - moment)} ago"
        if retention.params.get("dry_run"):
            retention_hint += ", dry run (RETENTION_DRY_RUN): nothing removed"

    report = ComplianceReport.objects.order_by("-created_at").first()

    rates = consent.consent_rates()
    bars = []
    for purpose, entry in rates.items():
        rate = entry.get("rate")
        shown = "n/a" if rate is None else f"{100 * rate:.0f}%"
        bars.append(Bar(f"{purpose} {shown}", 0 if rate is None else round(100 * rate)))
    chart = Chart(
        "Consent per purpose (share of asked subjects granting, %)",
        bars,
        label_every=1,
        summary=f"{len(bars)} purposes",
    )

    rows = []
    urgent = (
        DataSubjectRequest.objects.filter(is_open)
        .order_by("due_date", "received_at")
        .only("id", "subject_id", "type", "status", "due_date")[:5]
    )
    row_states = {"overdue": "bad", "due_soon": "warn", "on_track": "ok"}
    for item in urgent:
        rows.append(
            Row(
                label=f"{item.type} · {item.subject_id}",
                value=days_left_text(item, today),
                state=row_states.get(dsr_urgency(item, today), ""),
                detail=f"due {item.due_date.isoformat()}",
                url=reverse("admin:compliance_datasubjectrequest_change", args=[item.pk]),
            )
        )

    state = worst(
        "bad" if queue["overdue"] or critical else "ok",
        "warn" if queue["due_soon"] or warnings or late else "ok",
        "bad" if retention_state == "bad" else "ok",
    )
    if queue["overdue"]:
        badge = f"{queue['overdue']} overdue"
    elif critical:
        badge = f"{critical} critical"
    elif state == "warn":
        badge = "attention"
    else:
        badge = "on track"
    return PanelContent(
        state=state,
        badge=badge,
        figures=[
            Figure("DSRs open", queue["open"], state="info" if queue["open"] else ""),
            Figure("DSRs overdue", queue["overdue"], state="bad" if queue["overdue"] else "ok"),
            Figure(
                f"due within {settings.DSR_REMINDER_DAYS} d",
                queue["due_soon"],
                state="warn" if queue["due_soon"] else "",
            ),
            Figure(
                "answered on time",
                _percent(on_time, answered),
                state=("warn" if late else "ok") if answered else "",
                hint=f"{on_time} of {answered} answered",
            ),
            Figure(
                "critical violations",
                critical,
                state="bad" if critical else "ok",
                permission="compliance.view_complianceviolation",
            ),
            Figure(
                "warnings",
                warnings,
                state="warn" if warnings else "ok",
                permission="compliance.view_complianceviolation",
            ),
            Figure(
                "approvals waiting",
                pending,
                state="info" if pending else "",
                permission="compliance.view_approvalrequest",
            ),
            Figure(
                "last retention run",
                retention_value,
                state=retention_state,
                hint=retention_hint,
            ),
            Figure(
                "newest report",
                report.type.replace("_", " ") if report else "none",
                state={"succeeded": "ok", "failed": "bad"}.get(report.status, "info")
                if report
                else "",
                hint=f"{report.status}, {utc(report.created_at)}" if report else "",
                permission="compliance.view_compliancereport",
            ),
        ],
        chart=chart,
        rows_title="Most urgent requests" if rows else "",
        rows=rows,
        links=[
            Link(
                "DSR queue",
                reverse("admin:compliance_datasubjectrequest_changelist"),
                permission="compliance.view_datasubjectrequest",
            ),
            Link(
                "Violations",
                reverse("admin:compliance_complianceviolation_changelist"),
                permission="compliance.view_complianceviolation",
            ),
            Link(
                "Consent",
                reverse("admin:compliance_consentevent_changelist"),
                permission="compliance.view_consentevent",
            ),
            Link(
                "Reports",
                reverse("admin:compliance_compliancereport_changelist"),
                permission="compliance.view_compliancereport",
            ),
            Link(
                "Approvals",
                reverse("admin:compliance_approvalrequest_changelist"),
                permission="compliance.view_approvalrequest",
            ),
            Link(
                "SOX changes",
                reverse("admin:compliance_soxchange_changelist"),
                permission="compliance.view_soxchange",
            ),
            Link(
                "Legal holds",
                reverse("admin:compliance_legalhold_changelist"),
                permission="compliance.view_legalhold",
            ),
            Link(
                "Checkpoints",
                reverse("admin:compliance_auditcheckpoint_changelist"),
                permission="compliance.view_auditcheckpoint",
            ),
        ],
        note=""
        if settings.ENABLE_GDPR_COMPLIANCE
        else "GDPR requests are off (ENABLE_GDPR_COMPLIANCE).",
    )
