"""The security area's dashboard panels: sessions, lockouts, failed logins and token thefts;
the threat picture (level, bans, top offenders, events per hour)."""

from __future__ import annotations

from datetime import timedelta

from axes.models import AccessAttempt
from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from bridge.panels import (
    Bar,
    Chart,
    Figure,
    Link,
    PanelContent,
    Row,
    ago,
    register_panel,
    utc,
    worst,
)
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import threats
from security.choices import ThreatLayer, ThreatLevel
from security.models import TokenFamily


@register_panel(
    "security",
    title="Security · authentication",
    permissions=("security.view_tokenfamily",),
    order=20,
)
def authentication_panel(request: HttpRequest) -> PanelContent:
    now = timezone.now()
    day_ago = now - timedelta(days=1)
    # Both counts use the audit table's (action, -id) index and its occurred_at index.
    failed = AuditEvent.objects.filter(
        action=AuditAction.LOGIN_FAILED, occurred_at__gte=day_ago
    ).count()
    thefts = AuditEvent.objects.filter(
        action=AuditAction.TOKEN_REUSE_DETECTED, occurred_at__gte=day_ago
    ).count()
    active = TokenFamily.objects.filter(
        revoked_at__isnull=True, created_at__gte=now - settings.JWT_REFRESH_EXPIRATION
    ).count()
    figures = [
        Figure("active sessions", active),
        Figure("failed logins 24 h", failed, state="warn" if failed else "ok"),
        Figure("token thefts 24 h", thefts, state="bad" if thefts else "ok"),
    ]
    locked = 0
    if request.user.has_perm("axes.view_accessattempt"):
        locked = AccessAttempt.objects.filter(
            failures_since_start__gte=settings.AXES_FAILURE_LIMIT,
            attempt_time__gte=now - settings.AXES_COOLOFF_TIME,
        ).count()
        figures.insert(
            1,
            Figure(
                "locked out",
                locked,
                state="warn" if locked else "ok",
                permission="axes.view_accessattempt",
            ),
        )
    state = worst("bad" if thefts else "ok", "warn" if locked else "ok")
    badge = "token theft detected" if thefts else ("lockouts" if locked else "quiet")
    return PanelContent(
        state=state,
        badge=badge,
        figures=figures,
        links=[
            Link(
                "Lockouts",
                reverse("admin:axes_accessattempt_changelist"),
                permission="axes.view_accessattempt",
            ),
            Link(
                "Sessions",
                reverse("admin:security_tokenfamily_changelist"),
                permission="security.view_tokenfamily",
            ),
            Link(
                "Users",
                reverse("admin:security_user_changelist"),
                permission="security.view_user",
            ),
        ],
    )


_LEVEL_STATES = {
    ThreatLevel.LOW: "ok",
    ThreatLevel.ELEVATED: "warn",
    ThreatLevel.HIGH: "bad",
    ThreatLevel.CRITICAL: "bad",
}


@register_panel(
    "threats",
    title="Security · threats",
    permissions=("security.view_threatevent",),
    order=21,
)
def threats_panel(request: HttpRequest) -> PanelContent:
    picture = threats.assess()
    day = picture.windows[-1]
    figures = [
        Figure(
            "threat level",
            ThreatLevel(picture.level).label,
            state=_LEVEL_STATES[picture.level],
            hint="; ".join(picture.reasons)[:120],
        ),
        Figure("banned now", picture.banned, state="bad" if picture.banned else "ok"),
        Figure("top score", f"{picture.top_score:.0f}", hint=f"ban at {settings.THREAT_BAN_SCORE}"),
    ]
    # Each layer's events over the day, beside the chart of all of them per hour.
    figures += [
        Figure(f"{label.lower()} 24 h", day.counts.get(layer, 0))
        for layer, label in ThreatLayer.choices
    ]
    ban_score = settings.THREAT_BAN_SCORE
    rows = [
        Row(
            label=offender.name if offender.kind == "address" else f"user {offender.name}",
            value=f"{offender.score:.0f}",
            state="bad" if offender.banned_until or offender.score >= ban_score else "warn",
            detail=(
                f"banned until {utc(offender.banned_until)}"
                if offender.banned_until
                else f"{offender.events} events, last {ago(offender.last_seen)}"
            ),
            # How far the score is on its way to a ban.
            percent=min(100, round(100 * offender.score / ban_score)),
        )
        for offender in sorted(picture.addresses + picture.users, key=lambda o: -o.score)[:6]
    ]
    chart = Chart(
        "Threat events per hour, every layer, last 24 h (UTC)",
        [Bar(bucket.start.strftime("%H:00"), bucket.total) for bucket in picture.series],
    )
    return PanelContent(
        state=_LEVEL_STATES[picture.level],
        badge=f"level {picture.level}",
        figures=figures,
        chart=chart,
        rows_title="Top offenders (score decayed to now; the bar is the way to a ban)",
        rows=rows,
        links=[
            Link(
                "Threat events",
                reverse("admin:security_threatevent_changelist"),
                permission="security.view_threatevent",
            ),
            Link(
                "IP activity",
                reverse("admin:security_ipactivity_changelist"),
                permission="security.view_ipactivity",
            ),
            Link(
                "User activity",
                reverse("admin:security_useractivity_changelist"),
                permission="security.view_useractivity",
            ),
            Link(
                "IP bans",
                reverse("admin:security_ipban_changelist"),
                permission="security.view_ipban",
            ),
        ],
        note="" if rows else "Nobody has a threat score now.",
    )
