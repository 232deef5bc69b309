"""The recovery area's dashboard panel: is this instance ready, and what is missing."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from bridge.panels import Figure, PanelContent, Row, register_panel
from recovery.health import readiness_report

_STATES = {"ok": "ok", "degraded": "warn", "down": "bad"}
_WORDS = {"ok": "up", "degraded": "degraded", "down": "down"}
_BADGES = {"ok": "ready", "degraded": "degraded", "unavailable": "NOT READY"}


def _checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = report.get("checks", {})
    return list(checks.values()) if isinstance(checks, dict) else list(checks)


# No permission beyond the console's own: the same facts are what the unauthenticated
# /health/ready probe answers to any load balancer.
@register_panel("recovery", title="Recovery · readiness", order=30)
def readiness_panel(request: HttpRequest) -> PanelContent:
    report = readiness_report()
    checks = _checks(report)
    status = report.get("status", "unavailable")
    failing = [check for check in checks if not check.get("ok")]
    rows = []
    for check in checks:
        check_state = check.get("state") or ("ok" if check.get("ok") else "down")
        rows.append(
            Row(
                label=str(check.get("name", "?")).capitalize(),
                value=_WORDS.get(check_state, check_state),
                state=_STATES.get(check_state, "bad"),
                detail=str(check.get("detail", "")),
            )
        )
    return PanelContent(
        state={"ok": "ok", "degraded": "warn"}.get(status, "bad"),
        badge=_BADGES.get(status, status),
        figures=[
            Figure(
                "checks passing",
                f"{len(checks) - len(failing)} / {len(checks)}",
                state="ok" if not failing else ("bad" if status == "unavailable" else "warn"),
            ),
        ],
        rows_title="Dependencies and background work",
        rows=rows,
    )


# --- Monitored services (recovery/monitor.py) ---------------------------------------------

_HEALTH_STATES = {"up": "ok", "degraded": "warn", "down": "bad", "unknown": "warn"}
SERVICE_ROWS = 8


@register_panel(
    "recovery-services",
    title="Recovery · services",
    permissions=("recovery.view_service",),
    order=31,
)
def services_panel(request: HttpRequest) -> PanelContent:
    """Every watched service's health, the worst first, with its reason."""
    from django.urls import reverse

    from bridge.panels import Link, ago
    from recovery import monitor
    from recovery.models import HealOperation, Service

    monitor.ensure_builtin_services()
    services = monitor.sort_worst_first(list(Service.objects.all()))
    statuses = [(monitor.effective_status(service), service) for service in services]
    counts: dict[str, int] = {}
    for (status, _), _service in statuses:
        counts[status] = counts.get(status, 0) + 1
    overall = monitor.overall_status([(status, s.critical) for (status, _), s in statuses])
    healing = HealOperation.objects.filter(outcome="pending").count()
    rows = [
        Row(
            label=service.name,
            value=status,
            state=_HEALTH_STATES.get(status, "info"),
            detail=reason
            + (f" · {service.last_latency_ms:.0f} ms" if service.last_latency_ms else "")
            + f" · checked {ago(service.last_checked_at)}",
            url=reverse("admin:recovery_service_change", args=[service.pk]),
        )
        for (status, reason), service in statuses[:SERVICE_ROWS]
    ]
    down = counts.get("down", 0)
    return PanelContent(
        state={"up": "ok", "degraded": "warn", "down": "bad"}.get(overall, "warn"),
        badge=overall,
        figures=[
            Figure("services", len(services)),
            Figure("up", counts.get("up", 0), state="ok" if counts.get("up") else ""),
            Figure("down", down, state="bad" if down else "ok"),
            Figure(
                "degraded or unknown",
                counts.get("degraded", 0) + counts.get("unknown", 0),
                state="warn" if counts.get("degraded") or counts.get("unknown") else "",
            ),
            Figure("healing", healing, state="info" if healing else ""),
        ],
        rows_title="Worst first",
        rows=rows,
        links=[
            Link("Services", reverse("admin:recovery_service_changelist")),
            Link(
                "Transitions",
                reverse("admin:recovery_healthtransition_changelist"),
                permission="recovery.view_healthtransition",
            ),
        ],
        note="" if rows else "No services yet.",
    )
