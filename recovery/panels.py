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
