"""The security area's dashboard panel: sessions, lockouts, failed logins and token thefts."""

from __future__ import annotations

from datetime import timedelta

from axes.models import AccessAttempt
from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from bridge.panels import Figure, Link, PanelContent, register_panel, worst
from compliance.choices import AuditAction
from compliance.models import AuditEvent
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
