"""Rate limits and IP bans on every request to the API and the console, before
authentication: a banned or flooding client costs one shared-store round trip, no session,
no token check, no view."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from compliance.audit import AuditContext
from security import bans, ratelimit, threats
from security.ip import client_ip

log = logging.getLogger(__name__)

# When the shared store does not answer: classes that must not run unlimited refuse (a login
# flood while Redis is down would be a password-guessing window), the others serve unlimited
# and say so in the log.
FAIL_CLOSED = frozenset({"auth", "crypto"})


def _refusal(status: int, code: str, detail: str, retry_after: float) -> JsonResponse:
    response = JsonResponse({"detail": detail, "code": code}, status=status)
    response["Retry-After"] = str(max(1, math.ceil(retry_after)))
    # Not one "Too Many Requests" log line per refused request: a flood would become a flood of
    # log lines. The audit trail has each request, and an episode is logged once.
    response._has_been_logged = True
    return response


class RateLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not settings.ENABLE_DDOS_PROTECTION or not request.path.startswith(("/api/", "/admin/")):
            return self.get_response(request)
        ip = client_ip(request)
        if ratelimit.allowlisted(ip):
            return self.get_response(request)
        group = ratelimit.ip_group(ip)
        kind = ratelimit.endpoint_class(request.path, request.method or "GET")
        try:
            refusal = self._check(request, group, kind)
        except ratelimit.LimiterUnavailable as exc:
            if kind in FAIL_CLOSED:
                log.error("rate limiter unavailable (%s): refusing %s requests", exc, kind)
                return _refusal(
                    503, "limiter_unavailable", "Rate limiting is unavailable; try again.", 5
                )
            log.error("rate limiter unavailable (%s): serving %s requests unlimited", exc, kind)
            refusal = None
        return refusal or self.get_response(request)

    def _check(self, request: HttpRequest, group: str, kind: str) -> HttpResponse | None:
        if settings.REDIS_URL:
            # The ban and the limit in one round trip.
            decision = ratelimit.hit(
                f"ip:{kind}:{group}", ratelimit.rate_for(kind), ban_group=group
            )
            if decision.banned_until is not None:
                return _refusal(
                    429, "ip_banned", "This address is banned for now.", decision.retry_after
                )
        else:
            until = bans.active_ban_until(group)
            if until is not None:
                seconds = (until - timezone.now()).total_seconds()
                return _refusal(429, "ip_banned", "This address is banned for now.", seconds)
            decision = ratelimit.hit(f"ip:{kind}:{group}", ratelimit.rate_for(kind))
        if decision.allowed:
            return None
        banned = bans.note_over_limit(
            group=group, endpoint_class=kind, context=AuditContext.from_request(request)
        )
        if banned is not None:
            seconds = (banned.ends_at - timezone.now()).total_seconds()
            return _refusal(429, "ip_banned", "This address is banned for now.", seconds)
        return _refusal(
            429,
            "rate_limited",
            f"Too many {kind} requests; {decision.limit} are allowed per window.",
            decision.retry_after,
        )


class ThreatMiddleware:
    """The application layer of threat assessment (security/threats.py): probes for SQL
    injection, cross-site scripting and path traversal in the path or query, 404 bursts and
    oversized bodies. It looks after the response, so it knows the status; an ordinary request
    costs a pattern search and nothing else, a suspicious one a write. Never fails a request."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if settings.ENABLE_DDOS_PROTECTION and settings.ENABLE_THREAT_DETECTION:
            try:
                threats.inspect_request(request, response.status_code)
            except Exception:
                log.exception("threat assessment of request %s failed", request.path[:200])
        return response
