"""IP bans for repeat offenders, checked before authentication by every process."""

from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from security import ratelimit, threats
from security.models import IPBan

log = logging.getLogger(__name__)


def active_ban_until(group: str) -> datetime | None:
    """When the address's ban ends, or None. One Redis GET with REDIS_URL (bans are mirrored
    there with their expiry), one indexed query otherwise."""
    if settings.REDIS_URL:
        import redis

        try:
            value = ratelimit._redis_connection().get(ratelimit.ban_key(group))
        except redis.RedisError as exc:
            raise ratelimit.LimiterUnavailable(f"Redis: {type(exc).__name__}") from exc
        if value is None:
            return None
        ends = datetime.fromtimestamp(float(value), tz=timezone.get_current_timezone())
        return ends if ends > timezone.now() else None
    ban = (
        IPBan.objects.filter(network=group, lifted_at__isnull=True, ends_at__gt=timezone.now())
        .order_by("-ends_at")
        .first()
    )
    return ban.ends_at if ban else None


def note_over_limit(*, group: str, endpoint_class: str, context: AuditContext) -> IPBan | None:
    """Count an over-limit episode (the first refusal of a window; later ones in the same window
    are the same episode); the IP_BAN_AFTER-th within IP_BAN_WINDOW bans the address."""
    episode = ratelimit.Rate(1, ratelimit.rate_for(endpoint_class).window)
    if not ratelimit.hit(f"episode:{endpoint_class}:{group}", episode).allowed:
        return None
    record_event(
        action=AuditAction.RATE_LIMITED,
        context=context,
        object_type="security.ip",
        object_id=group,
        details={"class": endpoint_class},
    )
    offences = ratelimit.Rate(settings.IP_BAN_AFTER - 1, settings.IP_BAN_WINDOW.total_seconds())
    banned = None
    if settings.IP_BAN_AFTER == 1 or not ratelimit.hit(f"offence:{group}", offences).allowed:
        reason = f"{settings.IP_BAN_AFTER} over-limit episodes"
        banned = ban(group=group, reason=reason, context=context)
    threats.limiter_refused(group=group, endpoint_class=endpoint_class, ban=banned, context=context)
    return banned


def ban(*, group: str, reason: str, context: AuditContext) -> IPBan:
    """Ban the address: IP_BAN_BASE, doubled for each ban of it within IP_BAN_MEMORY."""
    now = timezone.now()
    with transaction.atomic():
        earlier = IPBan.objects.filter(
            network=group, started_at__gte=now - settings.IP_BAN_MEMORY
        ).count()
        length = ratelimit.ban_length(earlier)
        row = IPBan.objects.create(
            network=group,
            reason=reason,
            started_at=now,
            ends_at=now + length,
            ban_number=earlier + 1,
        )
        threats.ban_recorded(group=group, at=now)
        record_event(
            action=AuditAction.IP_BANNED,
            context=context,
            object_type="security.ipban",
            object_id=row.pk,
            details={
                "network": group,
                "seconds": length.total_seconds(),
                "ban_number": earlier + 1,
                "reason": reason,
            },
        )
    if settings.REDIS_URL:
        seconds = max(1, int(length.total_seconds()))
        ratelimit._redis_connection().set(
            ratelimit.ban_key(group), str(row.ends_at.timestamp()), ex=seconds
        )
    log.warning("IP BANNED: %s for %s (ban %s)", group, length, earlier + 1)
    return row


def lift(*, bans: list[IPBan], context: AuditContext) -> int:
    """Lift bans early (the console's unban action, POST /reset)."""
    now = timezone.now()
    lifted = 0
    for row in bans:
        changed = IPBan.objects.filter(pk=row.pk, lifted_at__isnull=True).update(
            lifted_at=now, lifted_by=context.actor_username
        )
        if changed:
            lifted += 1
            record_event(
                action=AuditAction.IP_UNBANNED,
                context=context,
                object_type="security.ipban",
                object_id=row.pk,
                details={"network": row.network},
            )
            if settings.REDIS_URL:
                ratelimit._redis_connection().delete(ratelimit.ban_key(row.network))
    return lifted
