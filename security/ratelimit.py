"""Rate limits and IP bans, shared by every process (ENABLE_DDOS_PROTECTION).

One primitive, `hit(key, limit, window)`: a sliding window, atomic under any concurrency. With
REDIS_URL it is one Lua script per check (a sorted set of the admitted requests' times, on
Redis's own clock, so every host agrees); without Redis it is the database (the same sliding
log, serialised per key). Requests over a limit are refused, not counted, so a flood cannot push
its own window further out.

Keys group a client by IP (IPv6 by /64, so one host cannot walk its own prefix), by user, and
by the username submitted to login, per endpoint class (auth, read, write, export, crypto).
Repeat offenders are banned: the IP_BAN_AFTER-th over-limit episode within IP_BAN_WINDOW bans
the address for IP_BAN_BASE, doubled with each earlier ban in IP_BAN_MEMORY, up to IP_BAN_MAX.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction

log = logging.getLogger(__name__)


class LimiterUnavailable(Exception):
    """The shared store (Redis) did not answer: each class's policy decides."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    count: int
    limit: int
    retry_after: float  # seconds until a request would be admitted (0 when allowed)
    banned_until: float | None = None  # epoch seconds, when the address is banned


@dataclass(frozen=True)
class Rate:
    limit: int
    window: float  # seconds

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'10/1m', '300/60s', '5/5m': requests per window."""
        from bridge.env import parse_duration

        count, _, period = text.partition("/")
        limit, window = int(count), parse_duration(period or "1s").total_seconds()
        if limit < 1 or window <= 0:
            raise ValueError(f"{text!r}: a limit and a window above zero")
        return cls(limit, window)


# --- Keys -----------------------------------------------------------------------------------


def ip_group(ip: str | None) -> str:
    """The address a limit applies to: IPv4 as is, IPv6 as its /64."""
    if not ip:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def allowlisted(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in settings.RATE_LIMIT_ALLOWLIST)


# --- Redis ----------------------------------------------------------------------------------

# Admit a request if fewer than `limit` were admitted in the last `window` ms, on Redis's clock;
# with a ban key, a ban refuses first (one round trip for both checks).
_SLIDING_WINDOW = """
if KEYS[2] then
  local banned = redis.call('GET', KEYS[2])
  if banned then
    return {-1, 0, banned}
  end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now_ms, now_ms .. '-' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, count + 1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, count, tonumber(oldest[2]) + window - now_ms}
"""

_redis_lock = threading.Lock()
_redis_client = None
_script = None


def _redis_connection():
    """One client (and connection pool) per process, with the REDIS_TIMEOUT timeouts."""
    global _redis_client, _script
    with _redis_lock:
        if _redis_client is None:
            import redis

            timeout = settings.REDIS_TIMEOUT
            _redis_client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            _script = _redis_client.register_script(_SLIDING_WINDOW)
    return _redis_client


def _redis():
    _redis_connection()
    return _script


def _hit_redis(key: str, rate: Rate, ban_group: str | None = None) -> Decision:
    import redis

    window_ms = max(1, int(rate.window * 1000))
    keys = [f"bridge:rl:{key}"]
    if ban_group is not None:
        keys.append(ban_key(ban_group))
    try:
        allowed, count, retry = _redis()(
            keys=keys, args=[window_ms, rate.limit, secrets.token_hex(6)]
        )
    except redis.RedisError as exc:
        raise LimiterUnavailable(f"Redis: {type(exc).__name__}") from exc
    if allowed == -1:  # banned: `retry` is the ban's end (epoch seconds, as text)
        until = float(retry)
        return Decision(False, 0, rate.limit, max(0.0, until - time.time()), banned_until=until)
    return Decision(bool(allowed), int(count), rate.limit, max(0.0, float(retry) / 1000))


def ban_key(group: str) -> str:
    return f"bridge:ban:{group}"


# --- Database -------------------------------------------------------------------------------


def _hit_database(key: str, rate: Rate) -> Decision:
    """A sliding log in the database, serialised per key: PostgreSQL takes a transaction-scoped
    advisory lock on the key before counting; SQLite admits one writer at a time, so the row is
    inserted first (taking that lock) and taken back if it was one too many."""
    from security.models import RateHit

    with transaction.atomic():
        now = time.time()
        hits = RateHit.objects.filter(key=key)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])
            hits.filter(at__lte=now - rate.window).delete()
            count = hits.count()
            if count < rate.limit:
                RateHit.objects.create(key=key, at=now)
                return Decision(True, count + 1, rate.limit, 0.0)
        else:
            mine = RateHit.objects.create(key=key, at=now)
            hits.filter(at__lte=now - rate.window).delete()
            count = hits.count()
            if count <= rate.limit:
                return Decision(True, count, rate.limit, 0.0)
            mine.delete()
            count -= 1
        oldest = hits.order_by("at").values_list("at", flat=True).first() or now
    return Decision(False, count, rate.limit, max(0.001, oldest + rate.window - now))


def hit(key: str, rate: Rate, *, ban_group: str | None = None) -> Decision:
    """Count a request against `key` if under `rate`; the decision either way. With
    `ban_group` on Redis, a ban of that address refuses first, in the same round trip."""
    if settings.REDIS_URL:
        return _hit_redis(key, rate, ban_group)
    return _hit_database(key, rate)


def clear(prefix: str = "") -> None:
    """Forget counters (and bans, see security.bans) whose key starts with `prefix`."""
    from security.models import RateHit

    RateHit.objects.filter(key__startswith=prefix).delete()
    if settings.REDIS_URL:
        import redis

        try:
            client = _redis_connection()
            for name in client.scan_iter(match=f"bridge:rl:{prefix}*", count=1000):
                client.delete(name)
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"Redis: {type(exc).__name__}") from exc


ENDPOINT_CLASSES = ("auth", "read", "write", "export", "crypto")


def rate_for(endpoint_class: str) -> Rate:
    return _parsed(settings.RATE_LIMITS[endpoint_class])


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> Rate:
    return Rate.parse(text)


def endpoint_class(path: str, method: str) -> str:
    """Which limit a request counts against."""
    if path.startswith(("/api/security/auth/", "/admin/login")):
        return "auth"
    if path.startswith(("/api/security/encrypt", "/api/security/decrypt")):
        return "crypto"
    if "/export" in path or path.startswith("/api/compliance/reports/"):
        return "export"
    return "read" if method in ("GET", "HEAD", "OPTIONS") else "write"


def ban_length(previous_bans: int) -> timedelta:
    base, cap = settings.IP_BAN_BASE, settings.IP_BAN_MAX
    return min(cap, base * (2 ** min(previous_bans, 20)))


def check_rate_limits() -> None:
    """Every RATE_LIMIT_<CLASS> parses, or the process does not start."""
    from django.core.exceptions import ImproperlyConfigured

    try:
        Rate.parse(settings.RATE_LIMIT_LOGIN_USERNAME)
    except ValueError as exc:
        raise ImproperlyConfigured(f"RATE_LIMIT_LOGIN_USERNAME: {exc}") from exc
    for kind in ENDPOINT_CLASSES:
        try:
            Rate.parse(settings.RATE_LIMITS[kind])
        except (KeyError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"RATE_LIMIT_{kind.upper()}: expected requests/window such as 20/1m ({exc})"
            ) from exc
