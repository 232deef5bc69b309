"""What the console's front page shows: one panel per area, from each area's own data."""

from __future__ import annotations

from datetime import timedelta

from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Count
from django.db.models.functions import TruncHour
from django.utils import timezone

from compliance.chain import chain_head, total_event_count
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from compliance.verification import latest_verification
from recovery.health import check_broker, check_database
from security.models import TokenFamily


def _hourly_bars(since_hours: int = 24) -> list[dict]:
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=since_hours - 1)
    counts = {
        row["hour"]: row["n"]
        for row in AuditEvent.objects.filter(occurred_at__gte=start)
        .annotate(hour=TruncHour("occurred_at"))
        .values("hour")
        .annotate(n=Count("id"))
    }
    hours = [start + timedelta(hours=i) for i in range(since_hours)]
    peak = max([counts.get(hour, 0) for hour in hours] + [1])
    return [
        {
            "label": hour.strftime("%H:00"),
            "count": counts.get(hour, 0),
            "height": round(60 * counts.get(hour, 0) / peak, 1),
            "y": round(64 - 60 * counts.get(hour, 0) / peak, 1),
            "x": i * 12,
        }
        for i, hour in enumerate(hours)
    ]


def build_dashboard() -> dict:
    now = timezone.now()
    day_ago = now - timedelta(days=1)
    head = chain_head()
    last_run = latest_verification()
    unsealed = total_event_count() - (head.last_seq if head else 0)
    database, broker = check_database(), check_broker()
    locked = AccessAttempt.objects.filter(
        failures_since_start__gte=settings.AXES_FAILURE_LIMIT,
        attempt_time__gte=now - settings.AXES_COOLOFF_TIME,
    ).count()
    return {
        "ready": database is None and broker is None,
        "readiness": [
            {"name": "Database", "ok": database is None, "detail": database or "reachable"},
            {"name": "Broker", "ok": broker is None, "detail": broker or "reachable"},
        ],
        "audit": {
            "total": total_event_count(),
            "sealed": head.last_seq if head else 0,
            "unsealed": unsealed,
            "sealed_at": head.sealed_at if head else None,
            "last_run": last_run,
            "state": "unknown" if last_run is None else ("ok" if last_run.ok else "bad"),
            "logging_enabled": settings.ENABLE_AUDIT_LOGGING,
            "bars": _hourly_bars(),
        },
        "security": {
            "locked_out": locked,
            "failed_logins_24h": AuditEvent.objects.filter(
                action=AuditAction.LOGIN_FAILED, occurred_at__gte=day_ago
            ).count(),
            "reuse_24h": AuditEvent.objects.filter(
                action=AuditAction.TOKEN_REUSE_DETECTED, occurred_at__gte=day_ago
            ).count(),
            "active_sessions": TokenFamily.objects.filter(
                revoked_at__isnull=True, created_at__gte=now - settings.JWT_REFRESH_EXPIRATION
            ).count(),
        },
    }
