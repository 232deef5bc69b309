"""Threat assessment: scored events from four layers, decaying scores, bans and alerts.

Four layers each produce `ThreatEvent` rows, written only when something suspicious happens:

- network: over-limit episodes and the limiter's bans (hooked into security/bans.py);
- authentication: failed logins, lockouts, refresh-token reuse (observed from the audit trail:
  compliance.audit.observe, so the login code is not touched);
- application: probes for SQL injection, cross-site scripting and path traversal in the path or
  a query parameter, bursts of 404s (a scanner), oversized bodies (ThreatMiddleware);
- data: decryptions or exports past THREAT_DECRYPT_VOLUME / THREAT_EXPORT_VOLUME per user, and
  refused decryptions (observed from the audit trail).

Each event adds its points to a score that halves every THREAT_SCORE_HALF_LIFE. The score goes
to whoever did it: a signed-in caller by name (`UserActivity`: their address may be a whole
office behind one NAT, and an analyst searching the trail for `' OR 1=1` is not an attack on
it), an anonymous one by address (`IPActivity`, IPv6 per /64). Refresh-token reuse scores both:
the token names its owner, but whoever presented it is unauthenticated. Crossing
THREAT_ALERT_SCORE records one `security.threat_alert` audit event per episode (the episode ends
when the score decays below the threshold again); an address reaching THREAT_BAN_SCORE is banned
through security.bans (the limiter's ban lengths, doubling per repeat).

Cost: an ordinary request costs a regular-expression search of its path and query parameters
and a status comparison; only a suspicious one writes (the event and its score row, one
transaction, the score row locked so that parallel events from many processes add up exactly).
Counting 404s, decryptions and exports uses the limiter's sliding windows (Redis or the database).

All of it is part of ENABLE_DDOS_PROTECTION (the bans are enforced by its middleware);
ENABLE_THREAT_DETECTION switches the scoring alone off.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F
from django.db.models.functions import TruncHour
from django.http import HttpRequest
from django.utils import timezone

from compliance.audit import AuditContext, RecordedEvent, observe, record_event
from compliance.choices import AuditAction
from compliance.redaction import REDACTED, is_secret_key, redact_text
from security import ratelimit
from security.choices import ThreatKind, ThreatLayer, ThreatLevel
from security.ip import client_ip
from security.models import IPActivity, IPBan, ThreatEvent, UserActivity

log = logging.getLogger(__name__)

# Points per event (THREAT_SCORES overrides them). With the default thresholds (alert 50, ban
# 100): five probes ban a scanner (which scores a 404 burst a minute besides); a lockout and the
# failed logins before it (5 x 5 + 20) nearly alert, the next tries do; reused refresh tokens
# alert at once; a mistyped password or one odd query only shows.
SCORES: dict[str, int] = {
    ThreatKind.OVER_LIMIT: 10,
    ThreatKind.RATE_BAN: 25,
    ThreatKind.LOGIN_FAILED: 5,
    ThreatKind.LOCKED_OUT: 20,
    ThreatKind.TOKEN_REUSE: 50,
    ThreatKind.SQL_INJECTION: 20,
    ThreatKind.XSS: 20,
    ThreatKind.PATH_TRAVERSAL: 20,
    ThreatKind.NOT_FOUND_BURST: 30,
    ThreatKind.OVERSIZED_BODY: 10,
    ThreatKind.DECRYPTION_FAILED: 10,
    ThreatKind.DECRYPT_VOLUME: 40,
    ThreatKind.EXPORT_VOLUME: 40,
}

LAYERS: dict[str, str] = {
    ThreatKind.OVER_LIMIT: ThreatLayer.NETWORK,
    ThreatKind.RATE_BAN: ThreatLayer.NETWORK,
    ThreatKind.LOGIN_FAILED: ThreatLayer.AUTHENTICATION,
    ThreatKind.LOCKED_OUT: ThreatLayer.AUTHENTICATION,
    ThreatKind.TOKEN_REUSE: ThreatLayer.AUTHENTICATION,
    ThreatKind.SQL_INJECTION: ThreatLayer.APPLICATION,
    ThreatKind.XSS: ThreatLayer.APPLICATION,
    ThreatKind.PATH_TRAVERSAL: ThreatLayer.APPLICATION,
    ThreatKind.NOT_FOUND_BURST: ThreatLayer.APPLICATION,
    ThreatKind.OVERSIZED_BODY: ThreatLayer.APPLICATION,
    ThreatKind.DECRYPTION_FAILED: ThreatLayer.DATA,
    ThreatKind.DECRYPT_VOLUME: ThreatLayer.DATA,
    ThreatKind.EXPORT_VOLUME: ThreatLayer.DATA,
}

# After ten half-lives a score is under 0.1% of itself: older rows are left out of the picture.
HORIZON_HALF_LIVES = 10
# Top offenders are ranked among this many rows with the highest recorded score (exact unless
# more addresses than this were scored within the horizon).
CANDIDATES = 500
# Many small events from many sources (a distributed attack no single score shows) raise the
# level on their own: events in the last hour.
ELEVATED_EVENTS = 20
HIGH_EVENTS = 200


def enabled() -> bool:
    return bool(settings.ENABLE_DDOS_PROTECTION and settings.ENABLE_THREAT_DETECTION)


def score_of(kind: str) -> int:
    return int(settings.THREAT_SCORES.get(str(kind), SCORES[kind]))


# --- Decay ------------------------------------------------------------------------------------


def half_life() -> timedelta:
    return settings.THREAT_SCORE_HALF_LIFE


def decayed(score: float, since: datetime, now: datetime | None = None) -> float:
    """`score` recorded at `since`, as it stands at `now`: halved every half-life.

    A moment in the future (another host's clock a little ahead) counts as no time at all.
    """
    now = now or timezone.now()
    elapsed = max(0.0, (now - since).total_seconds())
    return score * 0.5 ** (elapsed / half_life().total_seconds())


def current_score(row: IPActivity | UserActivity, now: datetime | None = None) -> float:
    return decayed(row.score, row.scored_at, now)


def reached(score: float, threshold: float) -> bool:
    """Compared to the hundredth of a point: five 20-point probes a few milliseconds apart reach
    100, though decay took a millionth of a point off in between."""
    return round(score, 2) >= threshold


# --- Recording and scoring ----------------------------------------------------------------


def record(
    *,
    kind: ThreatKind,
    network: str = "",
    user_id: int | None = None,
    path: str = "",
    details: dict | None = None,
    context: AuditContext | None = None,
    score_network: bool | None = None,
) -> ThreatEvent | None:
    """Write one threat event and add its points to the score of who caused it.

    `network` is the address group (security.ratelimit.ip_group); `user_id` the user the event
    is about. The user's score is raised when there is one, the address's when there is none
    (or when `score_network` says so). One transaction, the score rows locked: parallel events
    from any number of processes add up exactly, and a threshold is crossed exactly once.
    """
    if not enabled():
        return None
    network = "" if network in ("", "unknown") else network
    if score_network is None:
        score_network = user_id is None
    points = score_of(kind)
    now = timezone.now()
    with transaction.atomic():
        event = ThreatEvent.objects.create(
            occurred_at=now,
            layer=LAYERS[kind],
            kind=kind,
            score=points,
            network=network,
            user_id=user_id,
            path=path[:500],
            details=details or {},
        )
        if network and score_network:
            _score_address(event, now, context)
        if user_id is not None:
            _score_user(event, now, context)
    return event


def _score_address(event: ThreatEvent, now: datetime, context: AuditContext | None) -> None:
    row, _ = IPActivity.objects.select_for_update().get_or_create(
        network=event.network, defaults={"first_seen": now, "last_seen": now, "scored_at": now}
    )
    before = current_score(row, now)
    after = before + event.score
    IPActivity.objects.filter(pk=row.pk).update(
        score=after,
        scored_at=now,
        last_seen=now,
        events=F("events") + 1,
        flagged_requests=F("flagged_requests") + int(event.layer == ThreatLayer.APPLICATION),
        refusals=F("refusals") + int(event.kind == ThreatKind.OVER_LIMIT),
    )
    alert = settings.THREAT_ALERT_SCORE
    if not reached(before, alert) and reached(after, alert):
        IPActivity.objects.filter(pk=row.pk).update(last_alert_at=now)
        _alert(event, after, context, object_type="security.ip", object_id=event.network)
    if reached(after, settings.THREAT_BAN_SCORE):
        _ban(event, after, context)


def _score_user(event: ThreatEvent, now: datetime, context: AuditContext | None) -> None:
    row, _ = UserActivity.objects.select_for_update().get_or_create(
        user_id=event.user_id, defaults={"first_seen": now, "last_seen": now, "scored_at": now}
    )
    before = current_score(row, now)
    after = before + event.score
    UserActivity.objects.filter(pk=row.pk).update(
        score=after, scored_at=now, last_seen=now, events=F("events") + 1
    )
    alert = settings.THREAT_ALERT_SCORE
    if not reached(before, alert) and reached(after, alert):
        UserActivity.objects.filter(pk=row.pk).update(last_alert_at=now)
        _alert(event, after, context, object_type="security.user", object_id=event.user_id)


def _alert(
    event: ThreatEvent,
    score: float,
    context: AuditContext | None,
    *,
    object_type: str,
    object_id: str | int | None,
) -> None:
    record_event(
        action=AuditAction.THREAT_ALERT,
        context=context or AuditContext.system(),
        object_type=object_type,
        object_id=object_id or "",
        path=event.path,
        details={
            "score": round(score, 1),
            "threshold": settings.THREAT_ALERT_SCORE,
            "layer": event.layer,
            "kind": event.kind,
            "threat_event": event.pk,
        },
    )
    log.warning(
        "THREAT ALERT: %s %s scored %.0f (%s/%s)",
        object_type,
        object_id,
        score,
        event.layer,
        event.kind,
    )


def _allowlisted(network: str) -> bool:
    try:
        address = ipaddress.ip_network(network, strict=False).network_address
    except ValueError:
        return False
    return ratelimit.allowlisted(str(address))


def _ban(event: ThreatEvent, score: float, context: AuditContext | None) -> None:
    """Ban the address unless it is banned already or allow-listed (never limited, so a ban
    would not be enforced either). Called with its score row locked: one ban per crossing."""
    from security import bans

    network = event.network
    if _allowlisted(network):
        return
    try:
        if bans.active_ban_until(network) is not None:
            return
        # A savepoint: if the ban cannot be mirrored to Redis, the ban row and its audit event
        # are taken back, the threat event stays, and the next event tries again.
        with transaction.atomic():
            bans.ban(
                group=network,
                reason=f"threat score {score:.0f} (ban at {settings.THREAT_BAN_SCORE}), "
                f"last {event.layer}/{event.kind}",
                context=context or AuditContext.system(),
            )
    except Exception:
        log.exception("threat score of %s past the ban threshold, but the ban failed", network)


def ban_recorded(*, group: str, at: datetime) -> None:
    """security.bans.ban's hook: count the ban (the limiter's, the score's or a manual one) in
    the address's activity. In the ban's transaction; a failure here never stops the ban."""
    if not enabled():
        return
    try:
        with transaction.atomic():
            row, _ = IPActivity.objects.get_or_create(
                network=group, defaults={"first_seen": at, "last_seen": at, "scored_at": at}
            )
            IPActivity.objects.filter(pk=row.pk).update(ban_count=F("ban_count") + 1)
    except Exception:
        log.exception("the ban of %s was not counted in its activity", group)


def _safely(function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Threat assessment never fails what it watches: a request, a login, a decryption."""
    try:
        function(*args, **kwargs)
    except Exception:
        log.exception("threat assessment failed in %s", function.__name__)


# --- Network layer (security/bans.py) -----------------------------------------------------


def limiter_refused(
    *, group: str, endpoint_class: str, ban: IPBan | None, context: AuditContext
) -> None:
    """An over-limit episode of `group` (the first refusal of a window), and the ban it led to."""
    if not enabled():
        return
    path = _context_path()
    _safely(
        record,
        kind=ThreatKind.OVER_LIMIT,
        network=group,
        path=path,
        details={"class": endpoint_class},
        context=context,
    )
    if ban is not None:
        _safely(
            record,
            kind=ThreatKind.RATE_BAN,
            network=group,
            path=path,
            details={"class": endpoint_class, "ban": ban.pk, "ban_number": ban.ban_number},
            context=context,
        )


def _context_path() -> str:
    from compliance.audit import current_request

    request = current_request.get()
    return getattr(request, "path", "") if request is not None else ""


# --- Application layer (ThreatMiddleware) ---------------------------------------------------

_FLAGS = re.IGNORECASE | re.DOTALL

# Each pattern needs the structure of an attack, not just its words: "select a plan from the
# list", "O'Brien", "javascript: the good parts" or "rock 'n' roll" match none of them.
PROBES: tuple[tuple[ThreatKind, re.Pattern[str]], ...] = (
    (
        ThreatKind.SQL_INJECTION,
        re.compile(
            "|".join(
                (
                    r"\bunion(?:\s+(?:all|distinct))?\s+select\b",
                    # ' OR 1=1, " or "a"="a, ') AND x LIKE
                    r"['\"`)]\s*(?:or|and|\|\||&&)\s+[^=<>;]{0,40}?(?:=|<>|!=|<|>|\blike\b)",
                    r"['\"`)]\s*(?:or|and)\s+(?:true|false|not)\b",
                    r"\bor\s+\d+\s*=\s*\d+",
                    # a quote closed, then a comment: admin'--, 1"/*
                    r"['\"`]\s*\)?\s*;?\s*(?:--|/\*)",
                    # stacked statements
                    r";\s*(?:drop\s+(?:table|database)|delete\s+from|insert\s+into"
                    r"|update\s+\w+\s+set|alter\s+table|truncate\s+table|exec(?:ute)?\s+\w"
                    r"|shutdown\b|declare\s+@)",
                    # time-based and catalogue probes
                    r"\b(?:sleep|pg_sleep|benchmark)\s*\(\s*\d",
                    r"\bwaitfor\s+delay\s+'",
                    r"\b(?:information_schema|pg_catalog|sysobjects|xp_cmdshell|load_file)\b",
                    r"\binto\s+(?:out|dump)file\b",
                )
            ),
            _FLAGS,
        ),
    ),
    (
        ThreatKind.XSS,
        re.compile(
            "|".join(
                (
                    r"<\s*/?\s*script\b",
                    r"<\s*(?:iframe|object|embed|svg|frameset|applet)\b",
                    # an event handler inside a tag: <img src=x onerror=..., <svg/onload=...
                    r"<[a-z][^>]*?[\s/\"']on[a-z]{3,}\s*=",
                    # breaking out of an attribute: " onmouseover="...
                    r"[\"'`]\s*/?\s*on(?:error|load|mouse[a-z]+|focus|blur|click|dblclick"
                    r"|key[a-z]+|submit|change|input|toggle|animation[a-z]+|pointer[a-z]+|begin)"
                    r"\s*=",
                    r"\b(?:javascript|vbscript|livescript)\s*:(?=\S)",
                    r"\b(?:alert|prompt|confirm)\((?:\d|['\"`]|document\b)",
                    r"\bdocument\s*\.\s*(?:cookie|domain|write)\b",
                )
            ),
            _FLAGS,
        ),
    ),
    (
        ThreatKind.PATH_TRAVERSAL,
        re.compile(
            "|".join(
                (
                    # ../ and ..\ (and ..; which some servers read as ../)
                    r"(?:^|[/\\])\.\.(?:[/\\;]|$)",
                    r"\b(?:etc/(?:passwd|shadow)|proc/self/|boot\.ini|win\.ini)\b",
                    r"\bc:\\windows\b",
                    r"\x00",
                )
            ),
            _FLAGS,
        ),
    ),
)

# Long enough for any attack a pattern knows; a bound on the work one request can cause.
_SCAN_LIMIT = 2048
# Probes of the load balancer; static files WhiteNoise served never get this far.
_EXEMPT_PREFIXES = ("/health/",)

# What every pattern above needs, one of them at least: a text with none of these cannot match,
# and is not searched (the common case costs a set test instead of three regular expressions).
# A pattern added above must add what it needs here; the tests' probes go through this filter.
_TRIGGER_CHARACTERS = frozenset("'\"`()<;:\\\x00")
_TRIGGER_WORDS = (
    "..",
    "union",
    "information_schema",
    "pg_catalog",
    "sysobjects",
    "xp_cmdshell",
    "load_file",
    "outfile",
    "dumpfile",
    "document",
    "etc/",
    "proc/self",
    "boot.ini",
    "win.ini",
)


# `1 OR 1=1` has no character above: "or" and a space (a superset: "color " passes too).
_TRIGGER_OR = re.compile(r"or\s", re.IGNORECASE)


def _may_be_probe(text: str) -> bool:
    if not _TRIGGER_CHARACTERS.isdisjoint(text):
        return True
    lowered = text.lower()
    return any(word in lowered for word in _TRIGGER_WORDS) or bool(_TRIGGER_OR.search(text))


def _decoded(text: str, rounds: int = 1) -> str:
    # Django decoded the path and parse_qsl the values once; another round undoes the double
    # encoding (%252e%252e%252f) that slips past filters that decode once.
    text = text[:_SCAN_LIMIT]
    for _ in range(rounds):
        if "%" not in text and "+" not in text:
            break
        text = unquote_plus(text)
    # SQL comments used as spaces: UNION/**/SELECT.
    return text.replace("/**/", " ")


@dataclass(frozen=True)
class Probe:
    kind: ThreatKind
    where: str  # "path" or "query"
    param: str
    matched: str


def find_probe(path: str, query: str) -> Probe | None:
    """The first attack pattern in the path or a query parameter (name or value), or None.

    `path` as Django decoded it, `query` as sent (QUERY_STRING).
    """
    texts = []
    decoded_path = _decoded(path)
    if _may_be_probe(decoded_path):
        texts.append(("path", "", decoded_path))
    # The whole query decoded twice is what its parameters decode to, separators aside.
    if query and _may_be_probe(_decoded(query, rounds=2)):
        for name, value in parse_qsl(query[:_SCAN_LIMIT], keep_blank_values=True):
            texts.append(("query", name, _decoded(name)))
            texts.append(("query", name, _decoded(value)))
    for where, param, text in texts:
        for kind, pattern in PROBES:
            match = pattern.search(text)
            if match:
                return Probe(kind, where, param[:100], match.group(0)[:100])
    return None


def _subject(request: HttpRequest) -> tuple[str, int | None]:
    """The request's address group and, when signed in, its user id."""
    user = getattr(request, "user", None)
    user_id = user.pk if user is not None and getattr(user, "is_authenticated", False) else None
    return ratelimit.ip_group(client_ip(request)), user_id


def inspect_request(request: HttpRequest, status: int) -> None:
    """ThreatMiddleware's work for one request: look for probes, count 404s, note a 413."""
    path = request.path
    if path.startswith(_EXEMPT_PREFIXES):
        return
    probe = find_probe(path, request.META.get("QUERY_STRING", ""))
    if probe is None and status not in (404, 413):
        return
    network, user_id = _subject(request)
    context = AuditContext.from_request(request)
    if probe is not None:
        # The matched text only, and not even that from a parameter named like a secret.
        secret = probe.param and is_secret_key(probe.param)
        record(
            kind=probe.kind,
            network=network,
            user_id=user_id,
            path=path,
            details={
                "where": probe.where,
                "param": probe.param,
                "matched": REDACTED if secret else redact_text(probe.matched),
                "status": status,
                "method": request.method or "",
            },
            context=context,
        )
    if status == 404:
        _count_not_found(request, network, user_id, context)
    elif status == 413:
        record(
            kind=ThreatKind.OVERSIZED_BODY,
            network=network,
            user_id=user_id,
            path=path,
            details={
                "content_length": request.META.get("CONTENT_LENGTH", "")[:20],
                "method": request.method or "",
            },
            context=context,
        )


@functools.lru_cache(maxsize=16)
def _rate(text: str) -> ratelimit.Rate:
    return ratelimit.Rate.parse(text)


def _over_threshold(counter: str, rate_text: str) -> bool:
    """True once per window when `counter` goes past its rate: the first refused count of the
    window starts an episode, the later ones are the same episode (as with over-limit episodes)."""
    rate = _rate(rate_text)
    if ratelimit.hit(f"threat:{counter}", rate).allowed:
        return False
    return ratelimit.hit(f"threat-episode:{counter}", ratelimit.Rate(1, rate.window)).allowed


def _count_not_found(
    request: HttpRequest, network: str, user_id: int | None, context: AuditContext
) -> None:
    subject = f"user:{user_id}" if user_id is not None else f"ip:{network}"
    if _over_threshold(f"404:{subject}", settings.THREAT_404_BURST):
        rate = _rate(settings.THREAT_404_BURST)
        record(
            kind=ThreatKind.NOT_FOUND_BURST,
            network=network,
            user_id=user_id,
            path=request.path,
            details={"not_found": rate.limit, "window_seconds": rate.window},
            context=context,
        )


# --- Authentication and data layers (observed from the audit trail) --------------------------

# Report exports will add their actions here as they arrive.
EXPORT_ACTIONS: frozenset[str] = frozenset({AuditAction.AUDIT_EXPORTED})


def _network_of(event: RecordedEvent) -> str:
    return ratelimit.ip_group(event.context.client_ip)


def _login_failed(event: RecordedEvent) -> None:
    # Anonymous by nature: the address is scored; the username is in the audit event linked.
    locked = bool(event.details.get("locked_out"))
    record(
        kind=ThreatKind.LOGIN_FAILED,
        network=_network_of(event),
        path=event.path,
        details={
            "audit_event": event.id,
            "channel": str(event.details.get("channel", "")),
            "locked_out": locked,
        },
        context=event.context,
    )


def _locked_out(event: RecordedEvent) -> None:
    record(
        kind=ThreatKind.LOCKED_OUT,
        network=_network_of(event),
        path=event.path,
        details={"audit_event": event.id},
        context=event.context,
    )


def _token_reuse(event: RecordedEvent) -> None:
    # The token names its owner, but whoever presented it did not authenticate: both scores.
    record(
        kind=ThreatKind.TOKEN_REUSE,
        network=_network_of(event),
        user_id=event.context.actor_id,
        path=event.path,
        details={"audit_event": event.id, "family": event.object_id},
        context=event.context,
        score_network=True,
    )


def _decryption_failed(event: RecordedEvent) -> None:
    record(
        kind=ThreatKind.DECRYPTION_FAILED,
        network=_network_of(event),
        user_id=event.context.actor_id,
        path=event.path,
        details={"audit_event": event.id, "code": str(event.details.get("code", ""))[:64]},
        context=event.context,
    )


def _volume(event: RecordedEvent, kind: ThreatKind, counter: str, rate_text: str) -> None:
    """Count a user's decryptions or exports; past the rate, a data event once per window.
    Without a user (a command, the scheduler) there is nobody to count."""
    user_id = event.context.actor_id
    if user_id is None:
        return
    if _over_threshold(f"{counter}:user:{user_id}", rate_text):
        rate = _rate(rate_text)
        record(
            kind=kind,
            network=_network_of(event),
            user_id=user_id,
            path=event.path,
            details={
                "audit_event": event.id,
                "action": event.action,
                "count": rate.limit,
                "window_seconds": rate.window,
            },
            context=event.context,
        )


def _decrypted(event: RecordedEvent) -> None:
    _volume(event, ThreatKind.DECRYPT_VOLUME, "decrypt", settings.THREAT_DECRYPT_VOLUME)


def _exported(event: RecordedEvent) -> None:
    _volume(event, ThreatKind.EXPORT_VOLUME, "export", settings.THREAT_EXPORT_VOLUME)


_HANDLERS: dict[str, Callable[[RecordedEvent], None]] = {
    AuditAction.LOGIN_FAILED: _login_failed,
    AuditAction.LOCKED_OUT: _locked_out,
    AuditAction.TOKEN_REUSE_DETECTED: _token_reuse,
    AuditAction.DECRYPTION_FAILED: _decryption_failed,
    AuditAction.DATA_DECRYPTED: _decrypted,
    **{action: _exported for action in EXPORT_ACTIONS},
}


def on_audit_event(event: RecordedEvent) -> None:
    """The audit trail's observer: run after the event's transaction commits."""
    if not enabled():
        return
    handler = _HANDLERS.get(event.action)
    if handler is not None:
        _safely(handler, event)


def observe_audit_trail() -> None:
    """Subscribe to the audit actions above (security.apps, once per process)."""
    observe(_HANDLERS, on_audit_event)


def check_threat_settings() -> None:
    """The thresholds and rates parse, or the process does not start."""
    from django.core.exceptions import ImproperlyConfigured

    for name in ("THREAT_404_BURST", "THREAT_DECRYPT_VOLUME", "THREAT_EXPORT_VOLUME"):
        try:
            ratelimit.Rate.parse(getattr(settings, name))
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"{name}: expected count/window such as 20/1m ({exc})"
            ) from exc
    unknown = set(settings.THREAT_SCORES) - set(SCORES)
    if unknown:
        raise ImproperlyConfigured(
            f"THREAT_SCORES: unknown kinds {sorted(unknown)}; known: {sorted(SCORES)}"
        )
    for kind, value in settings.THREAT_SCORES.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10000:
            raise ImproperlyConfigured(f"THREAT_SCORES[{kind!r}]: a whole number 0-10000")
    if settings.THREAT_BAN_SCORE < settings.THREAT_ALERT_SCORE:
        raise ImproperlyConfigured("THREAT_BAN_SCORE must not be below THREAT_ALERT_SCORE")


# --- The picture (GET /api/security/threats, the dashboard panel) --------------------------


@dataclass(frozen=True)
class Offender:
    kind: str  # "address" or "user"
    name: str  # the address group, or the username
    score: float
    events: int
    last_seen: datetime
    user_id: int | None = None
    banned_until: datetime | None = None


@dataclass(frozen=True)
class WindowCounts:
    window: str
    since: datetime
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class HourBucket:
    start: datetime
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class ThreatPicture:
    generated_at: datetime
    level: str
    reasons: list[str]
    top_score: float
    banned: int  # addresses banned now
    active_bans: list[IPBan]  # the latest-ending 100 of their bans
    addresses: list[Offender]
    users: list[Offender]
    windows: list[WindowCounts]
    series: list[HourBucket]


def _ranked(rows: Iterable[IPActivity | UserActivity], now: datetime) -> list:
    scored = [(current_score(row, now), row) for row in rows]
    # A score under half a point is history, not a threat.
    return sorted(
        [(score, row) for score, row in scored if score >= 0.5], key=lambda pair: -pair[0]
    )


def top_addresses(now: datetime, limit: int = 10) -> list[Offender]:
    since = now - half_life() * HORIZON_HALF_LIVES
    rows = IPActivity.objects.filter(last_seen__gte=since).order_by("-score")[:CANDIDATES]
    ranked = _ranked(rows, now)[:limit]
    bans_by_network: dict[str, datetime] = {}
    for network, ends_at in IPBan.objects.filter(
        network__in=[row.network for _, row in ranked], lifted_at__isnull=True, ends_at__gt=now
    ).values_list("network", "ends_at"):
        bans_by_network[network] = max(ends_at, bans_by_network.get(network, ends_at))
    return [
        Offender(
            kind="address",
            name=row.network,
            score=round(score, 1),
            events=row.events,
            last_seen=row.last_seen,
            banned_until=bans_by_network.get(row.network),
        )
        for score, row in ranked
    ]


def top_users(now: datetime, limit: int = 10) -> list[Offender]:
    since = now - half_life() * HORIZON_HALF_LIVES
    rows = (
        UserActivity.objects.filter(last_seen__gte=since)
        .select_related("user")
        .order_by("-score")[:CANDIDATES]
    )
    return [
        Offender(
            kind="user",
            name=row.user.get_username(),
            score=round(score, 1),
            events=row.events,
            last_seen=row.last_seen,
            user_id=row.user_id,
        )
        for score, row in _ranked(rows, now)[:limit]
    ]


def _layer_counts(since: datetime) -> dict[str, int]:
    counts = dict.fromkeys(ThreatLayer.values, 0)
    for row in (
        ThreatEvent.objects.filter(occurred_at__gte=since)
        .values("layer")
        .annotate(n=Count("id"))
        .order_by()
    ):
        counts[row["layer"]] = row["n"]
    return counts


def hourly_series(now: datetime, hours: int = 24) -> list[HourBucket]:
    """Events per layer per hour over the last `hours` hours, the current hour last."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    start = hour - timedelta(hours=hours - 1)
    found: dict[datetime, dict[str, int]] = {}
    for row in (
        ThreatEvent.objects.filter(occurred_at__gte=start)
        .annotate(hour=TruncHour("occurred_at"))
        .values("hour", "layer")
        .annotate(n=Count("id"))
        .order_by()
    ):
        found.setdefault(row["hour"], {})[row["layer"]] = row["n"]
    buckets = []
    for index in range(hours):
        moment = start + timedelta(hours=index)
        counts = dict.fromkeys(ThreatLayer.values, 0)
        counts.update(found.get(moment, {}))
        buckets.append(HourBucket(moment, counts))
    return buckets


def level_of(top_score: float, bans: int, events_last_hour: int) -> tuple[str, list[str]]:
    """critical: someone is at the ban score now; high: someone is past the alert score, an
    address is banned, or HIGH_EVENTS events came in the last hour; elevated: someone is past
    half the alert score, or ELEVATED_EVENTS events came in the last hour; low otherwise."""
    alert, ban = settings.THREAT_ALERT_SCORE, settings.THREAT_BAN_SCORE
    reasons = []
    if top_score >= ban:
        reasons.append(f"a score of {top_score:.0f} is at the ban threshold ({ban})")
    elif top_score >= alert:
        reasons.append(f"a score of {top_score:.0f} is past the alert threshold ({alert})")
    elif top_score >= alert / 2:
        reasons.append(f"a score of {top_score:.0f} is past half the alert threshold")
    if bans:
        reasons.append(f"{bans} address(es) banned now")
    if events_last_hour >= ELEVATED_EVENTS:
        reasons.append(f"{events_last_hour} threat events in the last hour")
    if top_score >= ban:
        level = ThreatLevel.CRITICAL
    elif top_score >= alert or bans or events_last_hour >= HIGH_EVENTS:
        level = ThreatLevel.HIGH
    elif top_score >= alert / 2 or events_last_hour >= ELEVATED_EVENTS:
        level = ThreatLevel.ELEVATED
    else:
        level = ThreatLevel.LOW
    return str(level), reasons or ["no score near a threshold, few events"]


def assess(now: datetime | None = None) -> ThreatPicture:
    """The threat picture now: level, active bans, top offenders, counts, the 24-hour series."""
    now = now or timezone.now()
    current = IPBan.objects.filter(lifted_at__isnull=True, ends_at__gt=now)
    active = list(current.order_by("-ends_at")[:100])
    banned = current.order_by().values("network").distinct().count()
    addresses = top_addresses(now)
    users = top_users(now)
    top = max([offender.score for offender in addresses + users] + [0.0])
    windows = [
        WindowCounts("1h", now - timedelta(hours=1), _layer_counts(now - timedelta(hours=1))),
        WindowCounts("24h", now - timedelta(hours=24), _layer_counts(now - timedelta(hours=24))),
    ]
    level, reasons = level_of(top, banned, windows[0].total)
    return ThreatPicture(
        generated_at=now,
        level=level,
        reasons=reasons,
        top_score=round(top, 1),
        banned=banned,
        active_bans=active,
        addresses=addresses,
        users=users,
        windows=windows,
        series=hourly_series(now),
    )


def clear_scores() -> int:
    """Set every score to zero (POST /reset, with the limiter's counters and the bans): the
    events stay, as history; an address starts again from nothing."""
    now = timezone.now()
    cleared = IPActivity.objects.filter(score__gt=0).update(score=0.0, scored_at=now)
    return cleared + UserActivity.objects.filter(score__gt=0).update(score=0.0, scored_at=now)
