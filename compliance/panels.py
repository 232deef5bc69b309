"""The compliance area's dashboard panel: the audit trail and its hash chain at a glance."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Count
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
