"""The one retry executor everything in Bridge that calls out goes through.

`call(fn, service=..., policy=...)` runs `fn` until it succeeds, with between attempts an
exponential backoff with jitter ("Exponential Backoff And Jitter", AWS Architecture Blog):

- full jitter: the n-th retry (n from 0) waits uniform(0, min(cap, base * 2**n));
- decorrelated jitter: it waits min(cap, uniform(base, 3 * previous delay)), the first previous
  delay being `base`.

One deadline covers every attempt and delay: a delay that would end past it is not slept, the
call stops with RetryExhausted. `fn` may raise RetryAfter(seconds) (an HTTP 429/503 with a
Retry-After header): that delay is used instead of the drawn one, still bounded by the deadline.

The service's circuit breaker (recovery/breaker.py, named after the service) is asked before
every attempt and told every outcome; BreakerOpen is never retried. A retry budget per service
keeps retries to RETRY_BUDGET_RATIO of the calls of the last RETRY_BUDGET_WINDOW (plus
RETRY_BUDGET_MIN allowed regardless), summed over every process, so retries cannot multiply an
outage: once spent, a failure is final (BudgetExhausted). Taking a retry from the budget is one
round trip to the shared store (Redis, else the RetryStat rows under a row lock), which is fine
since a retry follows a failure and precedes a sleep; calls (which only enlarge the budget) are
counted locally and published with the statistics, so the budget errs on the strict side.

Statistics per service and minute (RetryStat) are counted in this process and added to the rows
with F() updates by whichever call finds the last flush older than FLUSH_INTERVAL, at exit, and
before `stats()` reads them. A successful first attempt on a closed breaker therefore costs a few
dictionary operations and no I/O.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Sum
from django.db.models.functions import Greatest
from django.utils import timezone

from recovery import breaker as breakers

log = logging.getLogger(__name__)

T = TypeVar("T")

FLUSH_INTERVAL = 1.0  # seconds between flushes of a process's statistics

JITTERS = ("full", "decorrelated")


class RetryError(Exception):
    """The call failed for good; `attempts` is its timeline, `last_error` the final failure."""

    def __init__(self, message: str, *, attempts: list[Attempt] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []

    @property
    def last_error(self) -> BaseException | None:
        return self.__cause__


class RetryExhausted(RetryError):
    """Every allowed attempt failed, or the next delay would pass the deadline."""


class BudgetExhausted(RetryError):
    """The service's retry budget is spent: this failure is not retried."""


class RetryAfter(Exception):
    """Raised by `fn` to ask for a given delay before the next attempt (Retry-After)."""

    def __init__(self, seconds: float, message: str = "") -> None:
        self.seconds = max(0.0, float(seconds))
        super().__init__(message or f"retry after {self.seconds:g}s")


@dataclass(frozen=True)
class RetryPolicy:
    """How to retry; every duration in seconds."""

    max_retries: int
    base_delay: float
    cap: float
    deadline: float
    jitter: str = "full"
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    use_breaker: bool = True
    use_budget: bool = True

    def __post_init__(self) -> None:
        if self.jitter not in JITTERS:
            raise ValueError(f"jitter: one of {', '.join(JITTERS)}")
        if self.max_retries < 0 or self.base_delay < 0 or self.cap < 0 or self.deadline < 0:
            raise ValueError("max_retries, base_delay, cap and deadline: zero or more")


def default_policy(**overrides: Any) -> RetryPolicy:
    """The policy of the settings (MAX_RETRIES, BASE_RETRY_DELAY, ...), with `overrides`."""
    policy = RetryPolicy(
        max_retries=settings.MAX_RETRIES,
        base_delay=settings.BASE_RETRY_DELAY / 1000,
        cap=settings.RETRY_MAX_DELAY / 1000,
        deadline=settings.RETRY_DEADLINE / 1000,
        jitter=settings.RETRY_JITTER,
    )
    return replace(policy, **overrides) if overrides else policy


@dataclass
class Attempt:
    """One attempt of a call: its number (from 1), its error, the delay drawn after it (None for
    the last), the bound the delay was drawn under, and the seconds since the call began."""

    number: int
    error: str | None
    delay: float | None
    cap: float
    elapsed: float
    retry_after: bool = field(default=False)


# --- Jitter -----------------------------------------------------------------------------------


def full_jitter(retry: int, base: float, cap: float, rand: Callable[[], float]) -> tuple:
    """(delay, bound) of the `retry`-th retry (from 0): uniform(0, min(cap, base * 2**retry))."""
    # 2**retry overflows floats past ~1000 retries; the cap is reached long before.
    bound = min(cap, base * (2 ** min(retry, 64)))
    return rand() * bound, bound


def decorrelated_jitter(
    previous: float, base: float, cap: float, rand: Callable[[], float]
) -> tuple:
    """(delay, bound): min(cap, uniform(base, 3 * previous))."""
    high = max(base, 3 * previous)
    bound = min(cap, high)
    return min(cap, base + rand() * (high - base)), bound


# --- Statistics -------------------------------------------------------------------------------

_FIELDS = (
    "calls",
    "attempts",
    "retries",
    "succeeded_first",
    "succeeded_after_retry",
    "exhausted",
    "rejected_budget",
    "rejected_breaker",
    "delay_ms_total",
    "delay_ms_max",
)
_CALLS, _ATTEMPTS, _RETRIES, _FIRST, _AFTER, _EXHAUSTED, _BUDGET, _BREAKER, _DTOTAL, _DMAX = range(
    10
)

_buffer: dict[tuple[str, int], list] = {}
_buffer_lock = threading.Lock()
_flush_lock = threading.Lock()
_next_flush = 0.0  # monotonic


def _bump(service: str, *counts: tuple[int, float]) -> None:
    """Add (index, amount) pairs to this minute's counters of `service`."""
    key = (service, int(time.time()) // 60)
    with _buffer_lock:
        row = _buffer.get(key)
        if row is None:
            row = _buffer[key] = [0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0]
        for index, amount in counts:
            if index == _DMAX:
                row[_DMAX] = max(row[_DMAX], amount)
            else:
                row[index] += amount
    if time.monotonic() >= _next_flush:
        flush()


def flush() -> int:
    """Add this process's counters to the RetryStat rows; returns the rows touched."""
    global _next_flush
    from recovery.models import RetryStat

    if not _flush_lock.acquire(blocking=False):
        return 0
    try:
        with _buffer_lock:
            pending = dict(_buffer)
            _buffer.clear()
            _next_flush = time.monotonic() + FLUSH_INTERVAL
        for (service, minute), row in pending.items():
            at = datetime.fromtimestamp(minute * 60, tz=UTC)
            try:
                _upsert(RetryStat, service, at, row)
            except Exception as exc:
                log.warning("retry statistics of %s not written: %s", service, exc)
        if settings.REDIS_URL:
            _publish_budget_calls()
        return len(pending)
    finally:
        _flush_lock.release()


def _upsert(model: Any, service: str, minute: datetime, row: list) -> None:
    increments = {name: F(name) + row[i] for i, name in enumerate(_FIELDS[:_DMAX]) if row[i]}
    increments["delay_ms_max"] = Greatest(F("delay_ms_max"), row[_DMAX])
    rows = model.objects.filter(service=service, minute=minute)
    if rows.update(**increments):
        return
    try:
        with transaction.atomic():
            model.objects.create(
                service=service, minute=minute, **dict(zip(_FIELDS, row, strict=True))
            )
    except IntegrityError:  # another process created the minute's row first
        rows.update(**increments)


@atexit.register
def _flush_at_exit() -> None:
    try:
        flush()
    except Exception:  # noqa: S110 (the process is ending; nothing to tell)
        pass


def stats(*, service: str | None = None, since: datetime | None = None) -> list[dict]:
    """Totals per service since `since` (default: the last hour), this process's buffer first."""
    from recovery.models import RetryStat

    _flush_wait()
    since = since or timezone.now() - timedelta(hours=1)
    floor = since.replace(second=0, microsecond=0)
    rows = RetryStat.objects.filter(minute__gte=floor)
    if service:
        rows = rows.filter(service=service)
    totals = rows.values("service").order_by("service")
    totals = totals.annotate(
        **{name: Sum(name) for name in _FIELDS[:_DMAX]}, delay_ms_max_=Max("delay_ms_max")
    )
    result = []
    for row in totals:
        retries = row["retries"] or 0
        result.append(
            {
                "service": row["service"],
                **{name: row[name] or 0 for name in _FIELDS[:_DMAX] if name != "delay_ms_total"},
                "delay_ms_total": round(row["delay_ms_total"] or 0.0, 3),
                "delay_ms_avg": round((row["delay_ms_total"] or 0.0) / retries, 3)
                if retries
                else 0.0,
                "delay_ms_max": round(row["delay_ms_max_"] or 0.0, 3),
            }
        )
    return result


def _flush_wait() -> None:
    # stats() must see this process's counters: wait for a flush in progress, then flush.
    with _flush_lock:
        pass
    flush()


def reset_stats() -> int:
    """Delete every statistic and budget (DELETE /api/recovery/reset); returns rows deleted."""
    from recovery.models import RetryStat

    with _buffer_lock:
        _buffer.clear()
        _budget_calls.clear()
    if settings.REDIS_URL:
        try:
            client = breakers._redis()
            for key in client.scan_iter(match="bridge:rb:*", count=1000):
                client.delete(key)
        except Exception as exc:
            log.warning("retry budgets in Redis not cleared: %s", exc)
    return RetryStat.objects.all().delete()[0]


# --- The retry budget -------------------------------------------------------------------------

# Per-second buckets of calls (`c`) and retries (`r`); takes one retry if the budget allows.
_BUDGET_LUA = """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local window = tonumber(ARGV[3])
if tonumber(ARGV[1]) > 0 then
  redis.call('HINCRBY', KEYS[1], sec .. ':c', ARGV[1])
end
local calls, retries = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local field = all[i]
  local colon = string.find(field, ':')
  local bucket = tonumber(string.sub(field, 1, colon - 1))
  if bucket <= sec - window then
    redis.call('HDEL', KEYS[1], field)
  elseif string.sub(field, colon + 1) == 'c' then
    calls = calls + tonumber(all[i + 1])
  else
    retries = retries + tonumber(all[i + 1])
  end
end
local allowed = 0
if ARGV[2] == '1' and retries + 1 <= tonumber(ARGV[4]) * calls + tonumber(ARGV[5]) then
  redis.call('HINCRBY', KEYS[1], sec .. ':r', 1)
  allowed = 1
end
redis.call('EXPIRE', KEYS[1], window + 1)
return allowed
"""

_budget_calls: dict[str, int] = {}  # calls not yet published to Redis, per service
_budget_script: dict[int, Any] = {}


def _budget_lua() -> Any:
    client = breakers._redis()
    script = _budget_script.get(id(client))
    if script is None:
        script = _budget_script[id(client)] = client.register_script(_BUDGET_LUA)
    return script


def _budget_args(calls: int, want: bool) -> list:
    return [
        calls,
        "1" if want else "0",
        max(1, int(settings.RETRY_BUDGET_WINDOW.total_seconds())),
        settings.RETRY_BUDGET_RATIO,
        settings.RETRY_BUDGET_MIN,
    ]


def _publish_budget_calls() -> None:
    with _buffer_lock:
        pending = dict(_budget_calls)
        _budget_calls.clear()
    for service, calls in pending.items():
        try:
            _budget_lua()(keys=[f"bridge:rb:{service}"], args=_budget_args(calls, False))
        except Exception as exc:
            log.warning("retry budget of %s: Redis unavailable (%s)", service, exc)


def _take_retry(service: str) -> bool:
    """Take one retry from the service's budget; False when it is spent."""
    if settings.REDIS_URL:
        with _buffer_lock:
            calls = _budget_calls.pop(service, 0)
        try:
            return bool(
                _budget_lua()(keys=[f"bridge:rb:{service}"], args=_budget_args(calls, True))
            )
        except Exception as exc:
            # Without the shared store, allow the retry: the breaker still bounds an outage.
            log.warning("retry budget of %s: Redis unavailable (%s)", service, exc)
            return True
    return _take_retry_database(service)


def _take_retry_database(service: str) -> bool:
    from recovery.models import RetryStat

    flush()  # the calls counted here so far belong to the budget's window
    now = timezone.now()
    minute = now.replace(second=0, microsecond=0)
    since = (now - settings.RETRY_BUDGET_WINDOW).replace(second=0, microsecond=0)
    with transaction.atomic():
        try:
            with transaction.atomic():
                RetryStat.objects.get_or_create(service=service, minute=minute)
        except IntegrityError:
            pass
        # The current minute's row serialises the takers of this service's budget.
        current = RetryStat.objects.select_for_update().get(service=service, minute=minute)
        sums = RetryStat.objects.filter(service=service, minute__gte=since).aggregate(
            calls=Sum("calls"), retries=Sum("retries")
        )
        calls = (sums["calls"] or 0) + _pending(service, _CALLS)
        retries = sums["retries"] or 0
        if retries + 1 > settings.RETRY_BUDGET_RATIO * calls + settings.RETRY_BUDGET_MIN:
            return False
        RetryStat.objects.filter(pk=current.pk).update(retries=F("retries") + 1)
        return True


def _pending(service: str, index: int) -> int:
    with _buffer_lock:
        return sum(row[index] for (name, _), row in _buffer.items() if name == service)


# --- The executor -----------------------------------------------------------------------------


def call(
    fn: Callable[[], T],
    *,
    service: str,
    policy: RetryPolicy | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run `fn()` under `policy` (default: the settings'), through the breaker named `service`.

    Raises BreakerOpen (never retried), RetryExhausted, BudgetExhausted (both with the failure
    as `__cause__`), or at once whatever `fn` raises that is not in `policy.retry_on`.
    `sleep` and `rand` are for tests and the test-retry endpoint.
    """
    policy = policy or default_policy()
    breaker = breakers.get(service) if policy.use_breaker else None
    if breaker is not None:
        try:
            permit = breaker.allow()
        except breakers.BreakerOpen:
            _bump(service, (_CALLS, 1), (_BREAKER, 1))
            raise
    else:
        permit = None
    started = time.perf_counter()
    try:
        result = fn()
    except BaseException as exc:
        if breaker is not None:
            breaker.record(permit, ok=False, duration=time.perf_counter() - started)
        return _retry(fn, service, policy, breaker, exc, started, on_attempt, sleep, rand)
    if breaker is not None:
        breaker.record(permit, ok=True, duration=time.perf_counter() - started)
    # The hot path: one dictionary update under a short lock, no I/O (see the docstring).
    key = (service, int(time.time()) // 60)
    with _buffer_lock:
        row = _buffer.get(key)
        if row is None:
            row = _buffer[key] = [0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0]
        row[_CALLS] += 1
        row[_ATTEMPTS] += 1
        row[_FIRST] += 1
        if policy.use_budget and settings.REDIS_URL:
            _budget_calls[service] = _budget_calls.get(service, 0) + 1
    if time.monotonic() >= _next_flush:
        flush()
    if on_attempt is not None:
        on_attempt(Attempt(1, None, None, 0.0, time.perf_counter() - started))
    return result


def _retry(
    fn: Callable[[], T],
    service: str,
    policy: RetryPolicy,
    breaker: breakers.CircuitBreaker | None,
    error: BaseException,
    started: float,
    on_attempt: Callable[[Attempt], None] | None,
    sleep: Callable[[float], None],
    rand: Callable[[], float],
) -> T:
    """The slow path, after a first attempt failed."""
    if settings.REDIS_URL and policy.use_budget:
        with _buffer_lock:
            _budget_calls[service] = _budget_calls.get(service, 0) + 1
    timeline: list[Attempt] = []
    # Time spent: real time, or the delays given to a `sleep` that did not really sleep (tests),
    # whichever is more, so the deadline holds either way.
    slept = 0.0
    attempt_time = time.perf_counter() - started
    previous = policy.base_delay
    counts: list[tuple[int, float]] = [(_CALLS, 1), (_ATTEMPTS, 1)]
    number = 1
    delays: list[float] = []

    def spent() -> float:
        return max(time.perf_counter() - started, slept + attempt_time)

    def done(*extra: tuple[int, float]) -> None:
        total = sum(delays)
        _bump(
            service,
            *counts,
            *extra,
            (_DTOTAL, total * 1000),
            (_DMAX, max(delays, default=0.0) * 1000),
        )

    while True:
        is_retry_after = isinstance(error, RetryAfter)
        if not is_retry_after and not isinstance(error, policy.retry_on):
            timeline.append(Attempt(number, _describe(error), None, 0.0, spent()))
            if on_attempt is not None:
                on_attempt(timeline[-1])
            done()
            raise error
        # The delay before the next attempt.
        if is_retry_after:
            delay = bound = error.seconds
        elif policy.jitter == "full":
            delay, bound = full_jitter(number - 1, policy.base_delay, policy.cap, rand)
        else:
            delay, bound = decorrelated_jitter(previous, policy.base_delay, policy.cap, rand)
            previous = delay
        if number > policy.max_retries:
            reason, stop = f"{number} attempts failed", RetryExhausted
        elif spent() + delay > policy.deadline:
            reason = f"the next delay ({delay:.3f}s) would pass the deadline ({policy.deadline}s)"
            stop = RetryExhausted
        elif policy.use_budget and not _take_retry(service):
            reason, stop = "the retry budget is spent", BudgetExhausted
        else:
            reason, stop = "", None
        if stop is not None:
            timeline.append(Attempt(number, _describe(error), None, bound, spent()))
            if on_attempt is not None:
                on_attempt(timeline[-1])
            done((_EXHAUSTED if stop is RetryExhausted else _BUDGET, 1))
            raise stop(f"{service}: {reason}", attempts=timeline) from error
        timeline.append(Attempt(number, _describe(error), delay, bound, spent(), is_retry_after))
        if on_attempt is not None:
            on_attempt(timeline[-1])
        before = time.perf_counter()
        sleep(delay)
        slept += max(delay, time.perf_counter() - before)
        delays.append(delay)
        number += 1
        counts.append((_ATTEMPTS, 1))
        # Taken from the budget in the database already (the row was incremented there).
        if not (policy.use_budget and not settings.REDIS_URL):
            counts.append((_RETRIES, 1))
        if breaker is not None:
            try:
                permit = breaker.allow()
            except breakers.BreakerOpen:
                done((_BREAKER, 1))
                raise
        attempt_started = time.perf_counter()
        try:
            result = fn()
        except BaseException as exc:
            attempt_time += time.perf_counter() - attempt_started
            if breaker is not None:
                breaker.record(permit, ok=False, duration=time.perf_counter() - attempt_started)
            error = exc
            continue
        attempt_time += time.perf_counter() - attempt_started
        if breaker is not None:
            breaker.record(permit, ok=True, duration=time.perf_counter() - attempt_started)
        timeline.append(Attempt(number, None, None, 0.0, spent()))
        if on_attempt is not None:
            on_attempt(timeline[-1])
        done((_AFTER, 1))
        return result


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
