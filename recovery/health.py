"""Liveness and readiness probes for load balancers and orchestrators (no authentication).

`/health/live` answers from the process alone: no database, cache or broker, so a hung
database never makes an orchestrator kill healthy web servers.

`/health/ready` runs every check of `readiness_report()` at once, each in its own daemon
thread, and answers within READY_DEADLINE whatever hangs: a check still running then is
reported as timed out and left to finish on its own (never joined), and until it does no second
copy of it is started, so a hung dependency costs one thread per check, not one per probe.
503 names what stops this instance from serving (database, cache, broker); what only the
background work lacks (worker, beat, sealing of the audit trail) keeps 200 with
"status": "degraded". Reasons never carry host names, ports or credentials.

Worker and beat liveness are heartbeats in the shared cache (Redis, or files under var/ for
the processes of one host), written by Celery signal handlers below, which worker and beat
load through CELERY_IMPORTS: the worker on each event heartbeat (every 2 s) and when ready,
beat on each turn of its scheduler loop (at least every 5 s). Both only need the cache, so
they work the same on the filesystem broker, Redis and RabbitMQ, and across hosts.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from celery.signals import beat_init, heartbeat_sent, worker_ready
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection

log = logging.getLogger(__name__)

# /health/ready must answer within 2 s; this leaves room for the request around the checks.
READY_DEADLINE = 1.5
HEARTBEAT_KEY = "bridge:heartbeat:{}"
# Long enough that a stale heartbeat still says when the process was last seen.
_HEARTBEAT_KEEP = 7 * 86400
_HEARTBEAT_EVERY = 1.0

# --- Reasons without hosts, ports or credentials ------------------------------------------

_URL = re.compile(r"\b[a-z][a-z0-9+.\-]*://\S+", re.I)
# psycopg2 quotes host names, socket paths, user and database names.
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
_IPV6 = re.compile(r"\[[0-9a-f:.%]+\](?::\d+)?", re.I)
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_HOST_PORT = re.compile(r"\b[\w.\-]+:\d{1,5}\b")
_PORT = re.compile(r"\bport \d+", re.I)


def redact(text: str) -> str:
    """`text` without URLs, quoted names, addresses, host:port pairs and port numbers."""
    text = _URL.sub("<url>", text)
    text = _QUOTED.sub('"…"', text)
    text = _IPV6.sub("<host>", text)
    text = _IPV4.sub("<host>", text)
    text = _HOST_PORT.sub("<host>", text)
    return _PORT.sub("port <n>", text)


def _reason(exc: BaseException) -> str:
    """The exception's type and the first line of its text, redacted: client libraries put
    the server's address, and sometimes the whole connection URL, in their messages."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {redact(text)}" if text else type(exc).__name__


# --- The checks ---------------------------------------------------------------------------


def check_database() -> str | None:
    """None when the database answers, else a short reason."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return _reason(exc)
    return None


def check_broker(timeout: float = 1.0) -> str | None:
    """None when the Celery broker accepts a connection, else a short reason."""
    url = settings.CELERY_BROKER_URL
    options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
    if url.startswith(("redis", "rediss", "sentinel")):
        # A server that accepts the connection and then never answers is waited on forever.
        options.setdefault("socket_timeout", timeout)
    try:
        with Connection(url, transport_options=options, connect_timeout=timeout) as broker:
            # One attempt: kombu waits 2 s before a retry, beyond the probe's budget.
            broker.ensure_connection(max_retries=0, timeout=timeout)
        folder = options.get("data_folder_in")
        if folder and not os.access(folder, os.W_OK):
            return "the queue folder is not writable"
    except Exception as exc:
        return _reason(exc)
    return None


def check_cache() -> str | None:
    """None when the shared cache (Redis with REDIS_URL) stores and returns a value."""
    key, token = "bridge:ready", uuid.uuid4().hex
    try:
        cache.set(key, token, timeout=10)
        if cache.get(key) != token:
            return "the cache did not return what was stored"
    except Exception as exc:
        return _reason(exc)
    return None


def record_heartbeat(role: str) -> None:
    """Note in the shared cache that `role` ("worker" or "beat") is alive, at most once a
    second per process. Never raises: a cache outage must not stop the worker or beat."""
    now = time.monotonic()
    if now - _last_heartbeat.get(role, float("-inf")) < _HEARTBEAT_EVERY:
        return
    try:
        cache.set(HEARTBEAT_KEY.format(role), time.time(), timeout=_HEARTBEAT_KEEP)
    except Exception as exc:
        if role not in _heartbeat_failing:  # once per outage, not once a second
            _heartbeat_failing.add(role)
            log.warning("cannot record the %s heartbeat: %s", role, _reason(exc))
        return
    _heartbeat_failing.discard(role)
    _last_heartbeat[role] = now


_last_heartbeat: dict[str, float] = {}
_heartbeat_failing: set[str] = set()


def heartbeat_age(role: str) -> float | None:
    """Seconds since `role` last recorded its heartbeat; None if it never did."""
    stamp = cache.get(HEARTBEAT_KEY.format(role))
    return None if stamp is None else max(0.0, time.time() - float(stamp))


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def _heartbeat_check(role: str) -> tuple[bool, str]:
    limit = settings.HEALTH_HEARTBEAT_MAX_AGE.total_seconds()
    age = heartbeat_age(role)
    if age is None:
        return False, "no heartbeat yet"
    if age > limit:
        return False, f"last heartbeat {_seconds(age)} ago (limit {_seconds(limit)})"
    return True, f"last heartbeat {_seconds(age)} ago"


def _audit_check() -> tuple[bool, str]:
    from compliance import chain

    age, limit = chain.oldest_unsealed_age(), chain.seal_lag_limit()
    if age is None:
        return True, "every event is sealed"
    seconds, limit_seconds = age.total_seconds(), limit.total_seconds()
    if age > limit:
        try:
            chain.note_seal_lag(age)
        except Exception:
            log.exception("could not record the sealing lag")
        return False, (
            f"oldest unsealed event is {_seconds(seconds)} old "
            f"(limit {_seconds(limit_seconds)}): the sealer is behind or stopped"
        )
    return True, f"oldest unsealed event is {_seconds(seconds)} old"


def _verification_check() -> tuple[bool, str]:
    """The last finished chain verification: intact, and no older than two intervals."""
    from compliance.models import AuditEvent
    from compliance.verification import latest_verification

    limit = 2 * settings.AUDIT_VERIFY_INTERVAL
    run = latest_verification()
    now = timezone.now()
    if run is None:
        first = AuditEvent.objects.order_by("id").values_list("occurred_at", flat=True).first()
        if first is None or (now - first).total_seconds() < limit:
            return True, "no verification yet (the first one is due)"
        return False, "no verification has finished yet"
    age = (now - run.finished_at).total_seconds()
    if run.ok is None:
        return False, f"the last verification failed to run {_seconds(age)} ago"
    if not run.ok:
        seq = run.result.get("first_broken_seq")
        if run.first_broken_id is not None:
            where = f"event {run.first_broken_id}" + (f" (seq {seq})" if seq else "")
        else:
            where = f"seq {seq}" if seq else "a checkpoint"
        return False, f"CHAIN BROKEN at {where} (verified {_seconds(age)} ago)"
    if age > limit:
        return False, f"last verification {_seconds(age)} ago (limit {_seconds(limit)})"
    return True, f"intact, verified {_seconds(age)} ago"


def _checkpoint_check() -> tuple[bool, str]:
    """Signed checkpoints reach every sink, and keep up with the sealed chain."""
    from compliance.checkpoints import checkpoint_health

    health = checkpoint_health()
    if not health.ok:
        return False, health.message
    if health.newest is None:
        return True, "no checkpoint yet (the first one is due)"
    age = (timezone.now() - health.newest.created_at).total_seconds()
    return (
        True,
        f"checkpoint #{health.newest.number} at seq {health.newest.seq}, {_seconds(age)} ago",
    )


def _reason_check(check: Callable[[], str | None], ok_detail: str) -> Callable:
    def run() -> tuple[bool, str]:
        reason = check()
        return (False, reason) if reason else (True, ok_detail)

    return run


def _closing_db(run: Callable[[], tuple[bool, str]]) -> Callable[[], tuple[bool, str]]:
    """Runs a database check and closes the connection it opened in its thread (the thread
    ends with the check; an open connection would linger until garbage collection)."""

    def wrapped() -> tuple[bool, str]:
        try:
            return run()
        finally:
            close = getattr(connection, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: S110 (a broken connection is already reported)
                    pass

    return wrapped


@dataclass(frozen=True)
class Check:
    name: str
    critical: bool
    run: Callable[[], tuple[bool, str]]


def checks() -> list[Check]:
    """Every readiness check: critical ones stop this instance from serving."""
    return [
        Check("database", True, _closing_db(_reason_check(check_database, "answers"))),
        Check("cache", True, _reason_check(check_cache, "stores and returns values")),
        Check("broker", True, _reason_check(check_broker, "accepts connections")),
        Check("worker", False, lambda: _heartbeat_check("worker")),
        Check("beat", False, lambda: _heartbeat_check("beat")),
        Check("audit", False, _closing_db(_audit_check)),
        Check("verification", False, _closing_db(_verification_check)),
        Check("checkpoints", False, _closing_db(_checkpoint_check)),
    ]


# --- Running them against a deadline ------------------------------------------------------

# One run of each check at a time, shared: probes arriving together (several load balancer
# nodes, the dashboard) wait for the same run instead of starting a second one. A run older
# than the deadline is a hung dependency; later probes report it without waiting.
_in_flight: dict[str, tuple[float, Future]] = {}
_in_flight_lock = threading.Lock()


def _start(check: Check, now: float) -> tuple[float, Future]:
    future: Future = Future()

    def run() -> None:
        try:
            outcome = check.run()
        except Exception as exc:
            outcome = (False, _reason(exc))
        with _in_flight_lock:
            if _in_flight.get(check.name, (0.0, None))[1] is future:
                del _in_flight[check.name]
        future.set_result(outcome)

    threading.Thread(target=run, name=f"ready-{check.name}", daemon=True).start()
    return now, future


def _run_all(to_run: list[Check], deadline: float) -> dict[str, tuple[bool, str]]:
    started = time.monotonic()
    runs: dict[str, tuple[float, Future]] = {}
    for check in to_run:
        with _in_flight_lock:
            if check.name not in _in_flight:
                _in_flight[check.name] = _start(check, started)
            runs[check.name] = _in_flight[check.name]
    end = started + deadline
    results: dict[str, tuple[bool, str]] = {}
    for name, (since, future) in runs.items():
        if since < started - deadline:
            # Started by an earlier probe and still not answering after a whole deadline.
            results[name] = (
                False,
                f"timed out: an earlier check has not answered for {started - since:.0f} s",
            )
            continue
        try:
            results[name] = future.result(timeout=max(0.0, end - time.monotonic()))
        except FutureTimeout:
            results[name] = (False, f"timed out after {deadline:g} s")
    return results


def readiness_report(deadline: float = READY_DEADLINE) -> dict[str, Any]:
    """Every check's outcome within `deadline` seconds, for the probe and the console.

    {"status": "ok" | "degraded" | "unavailable",
     "checks": {name: {"name", "ok", "state": "ok" | "degraded" | "down", "detail",
                       "critical"}},
     "failing": [critical checks not ok], "degraded": [other checks not ok]}
    """
    to_run = checks()
    outcomes = _run_all(to_run, deadline)
    results, failing, degraded = {}, [], []
    for check in to_run:
        ok, detail = outcomes[check.name]
        results[check.name] = {
            "name": check.name,
            "ok": ok,
            "state": "ok" if ok else ("down" if check.critical else "degraded"),
            "detail": detail,
            "critical": check.critical,
        }
        if not ok:
            (failing if check.critical else degraded).append(check.name)
    status = "unavailable" if failing else ("degraded" if degraded else "ok")
    return {"status": status, "checks": results, "failing": failing, "degraded": degraded}


# --- Views --------------------------------------------------------------------------------


@never_cache
@require_GET
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    report = readiness_report()
    return JsonResponse(report, status=503 if report["failing"] else 200)


# --- Heartbeats from the worker and beat --------------------------------------------------


@worker_ready.connect(weak=False, dispatch_uid="bridge-worker-ready")
def _worker_ready(sender: object = None, **kwargs: object) -> None:
    record_heartbeat("worker")


@heartbeat_sent.connect(weak=False, dispatch_uid="bridge-worker-heartbeat")
def _worker_heartbeat(sender: object = None, **kwargs: object) -> None:
    record_heartbeat("worker")


@beat_init.connect(weak=False, dispatch_uid="bridge-beat-heartbeat")
def _beat_started(sender: Any = None, **kwargs: object) -> None:  # sender: beat Service
    """Beat has no periodic signal of its own: its scheduler's tick, which the beat loop calls
    at least every max_interval (5 s with django-celery-beat), records the heartbeat."""
    record_heartbeat("beat")
    scheduler = sender.scheduler
    tick = scheduler.tick

    def tick_and_beat(*args: object, **kw: object) -> object:
        interval = tick(*args, **kw)
        record_heartbeat("beat")
        return interval

    scheduler.tick = tick_and_beat
