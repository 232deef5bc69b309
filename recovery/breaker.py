"""Circuit breakers, one per name (a service's name), shared by every gunicorn and Celery process.

States: `closed` (calls pass), `open` (calls are refused with BreakerOpen until `open_until`),
`half_open` (the open time is over: at most BREAKER_HALF_OPEN_PERMITS trial calls at once, the
first trial to succeed closes the breaker, a trial that fails opens it again for twice as long),
and the manual `forced_open` (refuse everything) and `disabled` (pass everything, count nothing).

It opens when, over the last BREAKER_WINDOW and with at least BREAKER_MIN_CALLS calls, the share
of failed calls reaches BREAKER_FAILURE_RATE or the share of slow calls (BREAKER_SLOW_CALL_MS or
longer) reaches BREAKER_SLOW_RATE. It stays open BREAKER_OPEN_BASE, doubled for each consecutive
trip (a failed trial) up to BREAKER_OPEN_MAX; closing resets the count.

Where the state lives. With REDIS_URL: a Redis hash per breaker, a hash of per-second buckets for
the window, and `SET NX PX` keys for the half-open permits, every change one Lua script on Redis's
clock; the BreakerState row mirrors each transition for the console. Without Redis: the
BreakerState row (changed under `select_for_update` or compare-and-swap), BreakerCall rows for the
window (one row per outcome kind and batch, with a count) and BreakerCall rows named
`<name>#permit` whose `at` is the permit's expiry.

Consistency model (why a call costs about a microsecond, not a round trip). Each process keeps a
view of the shared state and a buffer of outcomes. A call on a closed breaker reads the view and
adds to the buffer, nothing else. The view is refreshed, and the buffer published, by whichever
call finds the last sync older than SYNC_INTERVAL (0.5 s); a failed or slow call brings the sync
forward to at most FAILURE_SYNC_INTERVAL (50 ms) after the previous one, since those are the
outcomes that open a breaker. The decision to open is taken in the shared store on the summed
outcomes of every process, so all processes converge on the same state within about a second
(SYNC_INTERVAL plus one round trip); a process may let calls through for up to that long after
another opened the breaker. `trip()`, `reset()`, `force_open()` and `disable()` write the shared
store synchronously: they take effect everywhere at the next sync of each process, and at once in
the calling process. Half-open permits are always taken from the shared store (one round trip),
which is what makes "N trial calls" hold across processes. If the store does not answer, the
breaker keeps its last view (fails open: an unavailable Redis must not stop Bridge calling out),
logs once, and tries again after a second.

No lock is held while the wrapped function runs: `allow()` and `record()` are separate steps and
the only lock is a short in-process one around the counters.
"""

from __future__ import annotations

import atexit
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from django.conf import settings
from django.core.signals import setting_changed
from django.db import IntegrityError, transaction
from django.db.models import Sum

log = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_INTERVAL = 0.5  # seconds between syncs of a process's view with the shared store
FAILURE_SYNC_INTERVAL = 0.05  # a failure is published at most this long after the last sync
STORE_RETRY_INTERVAL = 1.0  # after the store failed, wait this long before asking again
PERMIT_REJECT_BACKOFF = 0.1  # all permits taken: refuse locally this long before asking again

CLOSED, OPEN, HALF_OPEN, FORCED_OPEN, DISABLED = (
    "closed",
    "open",
    "half_open",
    "forced_open",
    "disabled",
)


class BreakerOpen(Exception):
    """The breaker refuses the call; `retry_after` is the number of seconds until a trial."""

    def __init__(self, name: str, retry_after: float, state: str = OPEN) -> None:
        self.name = name
        self.retry_after = max(0.0, retry_after)
        self.state = state
        super().__init__(f"circuit breaker {name!r} is {state} (retry in {self.retry_after:.1f}s)")


@dataclass(frozen=True)
class Permit:
    """What `allow()` gave: a plain pass, a pass of a disabled breaker, or a half-open trial."""

    kind: str  # "pass", "disabled", "trial"
    gen: str = ""  # the trip the trial belongs to (its opened_at), so a late result is ignored
    slot: str = ""  # the permit's key (Redis) or row id (database)


_PASS = Permit("pass")
_DISABLED_PASS = Permit("disabled")


@dataclass
class _View:
    state: str = CLOSED
    open_until: float = 0.0  # epoch seconds
    opened_at: str = ""
    trips: int = 0
    last_reason: str = ""
    calls: int = 0
    failures: int = 0
    slow: int = 0


def _now() -> float:
    return time.time()


def _open_for(trips: int) -> float:
    base = settings.BREAKER_OPEN_BASE.total_seconds()
    top = settings.BREAKER_OPEN_MAX.total_seconds()
    return min(base * (2 ** max(0, trips - 1)), top)


# --- Redis store ------------------------------------------------------------------------------

# Publish a batch of outcomes and evaluate the window; returns the state. Redis's clock, so
# every host agrees on the window and on open_until.
_SYNC_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sec = math.floor(now)
local calls, fails, slows = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local st = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'trips', 'last_reason',
                      'opened_at')
local state = st[1] or 'closed'
local total, f, s = 0, 0, 0
local changed = 0
if state == 'closed' then
  if calls > 0 then
    redis.call('HINCRBY', KEYS[2], sec .. ':c', calls)
    if fails > 0 then redis.call('HINCRBY', KEYS[2], sec .. ':f', fails) end
    if slows > 0 then redis.call('HINCRBY', KEYS[2], sec .. ':s', slows) end
    redis.call('PEXPIRE', KEYS[2], math.floor(window * 1000) + 1000)
  end
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local field = all[i]
    local colon = string.find(field, ':')
    local bucket = tonumber(string.sub(field, 1, colon - 1))
    if bucket <= sec - window then
      redis.call('HDEL', KEYS[2], field)
    else
      local kind = string.sub(field, colon + 1)
      local n = tonumber(all[i + 1])
      if kind == 'c' then total = total + n elseif kind == 'f' then f = f + n
      else s = s + n end
    end
  end
  if (fails > 0 or slows > 0) and total >= tonumber(ARGV[5]) and
     (f / total >= tonumber(ARGV[6]) or s / total >= tonumber(ARGV[7])) then
    local trips = (tonumber(st[3]) or 0) + 1
    local open_for = math.min(tonumber(ARGV[8]) * math.pow(2, trips - 1), tonumber(ARGV[9]))
    local reason
    if f / total >= tonumber(ARGV[6]) then
      reason = string.format('failure rate %d/%d', f, total)
    else
      reason = string.format('slow-call rate %d/%d', s, total)
    end
    st = {'open', tostring(now + open_for), tostring(trips), reason, tostring(now)}
    redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', st[2], 'trips', st[3],
               'last_reason', reason, 'opened_at', st[5])
    redis.call('DEL', KEYS[2])
    state = 'open'
    changed = 1
  end
end
return {state, st[2] or '', st[3] or '0', st[4] or '', st[5] or '', tostring(now), changed,
        total, f, s}
"""

# Take a half-open permit: {state..., permit key or '', changed}.
_PERMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local st = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'trips', 'last_reason',
                      'opened_at')
local state = st[1] or 'closed'
local key = ''
if state == 'open' and now >= (tonumber(st[2]) or 0) then
  for i = 0, tonumber(ARGV[1]) - 1 do
    local k = KEYS[1] .. ':permit:' .. (st[5] or '') .. ':' .. i
    if redis.call('SET', k, ARGV[2], 'NX', 'PX', ARGV[3]) then key = k break end
  end
end
return {state, st[2] or '', st[3] or '0', st[4] or '', st[5] or '', tostring(now), key}
"""

# The result of a trial: close, or open again for longer. Ignored if the trial is stale.
_TRIAL_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('DEL', ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'trips', 'last_reason',
                      'opened_at')
local changed = 0
if st[1] == 'open' and st[5] == ARGV[2] then
  if ARGV[1] == '1' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'open_until', '', 'trips', '0',
               'last_reason', 'trial call succeeded', 'opened_at', '')
    redis.call('DEL', KEYS[2])
    st = {'closed', '', '0', 'trial call succeeded', ''}
  else
    local trips = (tonumber(st[3]) or 0) + 1
    local open_for = math.min(tonumber(ARGV[4]) * math.pow(2, trips - 1), tonumber(ARGV[5]))
    st = {'open', tostring(now + open_for), tostring(trips), 'trial call failed',
          tostring(now)}
    redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', st[2], 'trips', st[3],
               'last_reason', st[4], 'opened_at', st[5])
  end
  changed = 1
end
return {st[1] or 'closed', st[2] or '', st[3] or '0', st[4] or '', st[5] or '', tostring(now),
        changed}
"""

_scripts: dict[str, Any] = {}
_scripts_lock = threading.Lock()


def _redis() -> Any:
    from security.ratelimit import _redis_connection

    return _redis_connection()


def _script(name: str) -> Any:
    client = _redis()
    with _scripts_lock:
        key = f"{id(client)}:{name}"
        if key not in _scripts:
            source = {"sync": _SYNC_LUA, "permit": _PERMIT_LUA, "trial": _TRIAL_LUA}[name]
            _scripts[key] = client.register_script(source)
        return _scripts[key]


def _key(name: str) -> str:
    return f"bridge:cb:{name}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _view_from(raw: list) -> _View:
    state, open_until, trips, reason, opened_at = (_text(v) for v in raw[:5])
    return _View(
        state=state or CLOSED,
        open_until=float(open_until) if open_until else 0.0,
        trips=int(float(trips or 0)),
        last_reason=reason,
        opened_at=opened_at,
    )


class _RedisStore:
    """The shared store on Redis: one Lua script per operation."""

    def sync(self, name: str, calls: int, fails: int, slows: int) -> tuple[_View, bool]:
        raw = _script("sync")(
            keys=[_key(name), f"{_key(name)}:w"],
            args=[
                calls,
                fails,
                slows,
                max(1, int(settings.BREAKER_WINDOW.total_seconds())),
                settings.BREAKER_MIN_CALLS,
                settings.BREAKER_FAILURE_RATE,
                settings.BREAKER_SLOW_RATE,
                settings.BREAKER_OPEN_BASE.total_seconds(),
                settings.BREAKER_OPEN_MAX.total_seconds(),
            ],
        )
        view = _view_from(raw)
        view.calls, view.failures, view.slow = int(raw[7]), int(raw[8]), int(raw[9])
        return view, raw[6] == 1

    def take_permit(self, name: str) -> tuple[_View, str]:
        raw = _script("permit")(
            keys=[_key(name)],
            args=[settings.BREAKER_HALF_OPEN_PERMITS, secrets.token_hex(4), _permit_ttl_ms()],
        )
        return _view_from(raw), _text(raw[6])

    def trial(self, name: str, permit: Permit, ok: bool) -> tuple[_View, bool]:
        raw = _script("trial")(
            keys=[_key(name), f"{_key(name)}:w"],
            args=[
                "1" if ok else "0",
                permit.gen,
                permit.slot,
                settings.BREAKER_OPEN_BASE.total_seconds(),
                settings.BREAKER_OPEN_MAX.total_seconds(),
            ],
        )
        return _view_from(raw), raw[6] == 1

    def write(self, name: str, view: _View) -> None:
        client = _redis()
        pipe = client.pipeline()
        pipe.hset(
            _key(name),
            mapping={
                "state": view.state,
                "open_until": repr(view.open_until) if view.open_until else "",
                "trips": view.trips,
                "last_reason": view.last_reason,
                "opened_at": view.opened_at,
            },
        )
        pipe.delete(f"{_key(name)}:w")
        pipe.execute()

    def read(self, name: str) -> _View:
        return self.sync(name, 0, 0, 0)[0]

    def names(self) -> list[str]:
        found = set()
        for key in _redis().scan_iter(match="bridge:cb:*", count=1000):
            rest = _text(key)[len("bridge:cb:") :]
            if ":" not in rest:
                found.add(rest)
        return sorted(found)

    def clear(self, name: str) -> None:
        client = _redis()
        keys = [_key(name), f"{_key(name)}:w"]
        keys += list(client.scan_iter(match=f"{_key(name)}:permit:*", count=1000))
        client.delete(*keys)


def _permit_ttl_ms() -> int:
    # A trial whose process dies must not hold its permit for ever: it expires after the time a
    # call may take before it counts as slow (twice, at least five seconds).
    return max(5000, 2 * settings.BREAKER_SLOW_CALL_MS)


# --- Database store ---------------------------------------------------------------------------


def _view_of_row(row: Any) -> _View:
    return _View(
        state=row.state,
        open_until=row.open_until.timestamp() if row.open_until else 0.0,
        opened_at=repr(row.opened_at.timestamp()) if row.opened_at else "",
        trips=row.trips,
        last_reason=row.last_reason,
    )


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


class _DatabaseStore:
    """The shared store in the database: BreakerState rows, BreakerCall rows for the window."""

    def _row(self, name: str, *, lock: bool = False) -> Any:
        from recovery.models import BreakerState

        query = BreakerState.objects.select_for_update() if lock else BreakerState.objects
        try:
            return query.get(name=name)
        except BreakerState.DoesNotExist:
            try:
                with transaction.atomic():
                    BreakerState.objects.create(name=name)
            except IntegrityError:
                pass  # another process created it first
            return query.get(name=name)

    def _window(self, name: str, now: float) -> tuple[int, int, int]:
        from django.db.models import Case, IntegerField, When

        from recovery.models import BreakerCall

        since = now - settings.BREAKER_WINDOW.total_seconds()
        integer = IntegerField()
        sums = BreakerCall.objects.filter(name=name, at__gt=since).aggregate(
            calls=Sum("count"),
            failures=Sum(Case(When(ok=False, then="count"), default=0, output_field=integer)),
            slow=Sum(Case(When(slow=True, then="count"), default=0, output_field=integer)),
        )
        return sums["calls"] or 0, sums["failures"] or 0, sums["slow"] or 0

    def sync(self, name: str, calls: int, fails: int, slows: int) -> tuple[_View, bool]:
        from recovery.models import BreakerCall, BreakerState

        now = _now()
        row = self._row(name)
        view = _view_of_row(row)
        if view.state != CLOSED:
            return view, False
        if calls:
            # One row per kind of outcome in the batch; `slow` counts whatever the outcome.
            rows = []
            ok_fast, ok_slow = calls - fails, min(slows, calls - fails)
            fail_slow = slows - ok_slow
            for ok, slow, count in (
                (True, False, ok_fast - ok_slow),
                (True, True, ok_slow),
                (False, False, fails - fail_slow),
                (False, True, fail_slow),
            ):
                if count > 0:
                    rows.append(BreakerCall(name=name, at=now, ok=ok, slow=slow, count=count))
            BreakerCall.objects.bulk_create(rows)
        window = settings.BREAKER_WINDOW.total_seconds()
        BreakerCall.objects.filter(name=name, at__lte=now - window).delete()
        view.calls, view.failures, view.slow = self._window(name, now)
        total = view.calls
        if not (fails or slows) or total < settings.BREAKER_MIN_CALLS:
            return view, False
        if view.failures / total >= settings.BREAKER_FAILURE_RATE:
            reason = f"failure rate {view.failures}/{total}"
        elif view.slow / total >= settings.BREAKER_SLOW_RATE:
            reason = f"slow-call rate {view.slow}/{total}"
        else:
            return view, False
        trips = row.trips + 1
        # Compare-and-swap: only one process turns a closed breaker open.
        changed = BreakerState.objects.filter(pk=row.pk, state=CLOSED).update(
            state=OPEN,
            opened_at=_dt(now),
            open_until=_dt(now + _open_for(trips)),
            trips=trips,
            last_reason=reason,
        )
        if changed:
            BreakerCall.objects.filter(name=name).delete()
        return _view_of_row(BreakerState.objects.get(pk=row.pk)), bool(changed)

    def take_permit(self, name: str) -> tuple[_View, str]:
        from recovery.models import BreakerCall

        now = _now()
        with transaction.atomic():
            row = self._row(name, lock=True)
            view = _view_of_row(row)
            if view.state != OPEN or now < view.open_until:
                return view, ""
            slots = BreakerCall.objects.filter(name=f"{name}#permit")
            slots.filter(at__lt=now).delete()
            if slots.count() >= settings.BREAKER_HALF_OPEN_PERMITS:
                return view, ""
            slot = BreakerCall.objects.create(
                name=f"{name}#permit", at=now + _permit_ttl_ms() / 1000, ok=True
            )
            return view, str(slot.pk)

    def trial(self, name: str, permit: Permit, ok: bool) -> tuple[_View, bool]:
        from recovery.models import BreakerCall

        now = _now()
        with transaction.atomic():
            row = self._row(name, lock=True)
            BreakerCall.objects.filter(pk=int(permit.slot)).delete()
            view = _view_of_row(row)
            if view.state != OPEN or view.opened_at != permit.gen:
                return view, False
            if ok:
                row.state, row.open_until, row.opened_at, row.trips = CLOSED, None, None, 0
                row.last_reason = "trial call succeeded"
                BreakerCall.objects.filter(name=name).delete()
            else:
                row.trips += 1
                row.opened_at = _dt(now)
                row.open_until = _dt(now + _open_for(row.trips))
                row.last_reason = "trial call failed"
            row.save()
            return _view_of_row(row), True

    def write(self, name: str, view: _View) -> None:
        pass  # the row written by _mirror is the state itself

    def read(self, name: str) -> _View:
        return self.sync(name, 0, 0, 0)[0]

    def names(self) -> list[str]:
        return []  # every breaker has its row, listed by snapshots()

    def clear(self, name: str) -> None:
        from recovery.models import BreakerCall

        BreakerCall.objects.filter(name__in=[name, f"{name}#permit"]).delete()


def _store() -> _RedisStore | _DatabaseStore:
    return _RedisStore() if settings.REDIS_URL else _DatabaseStore()


def _mirror(name: str, view: _View) -> None:
    """Write the state to its BreakerState row (the authority without Redis, the console's copy
    with it)."""
    from recovery.models import BreakerState

    BreakerState.objects.update_or_create(
        name=name,
        defaults={
            "state": view.state,
            "open_until": _dt(view.open_until) if view.open_until else None,
            "opened_at": _dt(float(view.opened_at)) if view.opened_at else None,
            "trips": view.trips,
            "last_reason": view.last_reason[:300],
        },
    )


# --- The breaker --------------------------------------------------------------------------------


class CircuitBreaker:
    """This process's handle on the breaker called `name` (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._slow_s = settings.BREAKER_SLOW_CALL_MS / 1000
        self._view = _View()
        self._lock = threading.Lock()  # guards the counters only, never held during a call
        self._sync_lock = threading.Lock()  # one thread syncs at a time; others do not wait
        self._calls = self._fails = self._slows = 0
        self._next_sync = 0.0  # monotonic; 0: sync at the first call
        self._last_sync = 0.0
        self._store_down_until = 0.0
        self._reject_until = 0.0

    # The hot path: allow() and record() on a closed breaker touch only this object.

    def allow(self) -> Permit:
        """A permit to call, or BreakerOpen."""
        if self._view.state is CLOSED and time.monotonic() < self._next_sync:
            return _PASS
        return self._allow_slow()

    def record(self, permit: Permit, *, ok: bool, duration: float) -> None:
        """The outcome of a call made with `permit`; `duration` in seconds."""
        if permit is _PASS:
            slow = duration >= self._slow_s
            with self._lock:
                self._calls += 1
                if not ok or slow:
                    self._fails += not ok
                    self._slows += slow
                    # Bring the sync forward: these outcomes are what opens a breaker.
                    self._next_sync = min(self._next_sync, self._last_sync + FAILURE_SYNC_INTERVAL)
            if time.monotonic() >= self._next_sync:
                self._sync()
        elif permit.kind == "trial":
            self._trial(permit, ok)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """allow -> fn -> record; raises BreakerOpen without calling fn."""
        permit = self.allow()
        started = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            self.record(permit, ok=False, duration=time.perf_counter() - started)
            raise
        self.record(permit, ok=True, duration=time.perf_counter() - started)
        return result

    def snapshot(self) -> dict:
        """The shared state now (publishing this process's outcomes first)."""
        self._sync(force=True)
        view = self._view
        state = view.state
        if state == OPEN and _now() >= view.open_until:
            state = HALF_OPEN
        calls = view.calls
        return {
            "name": self.name,
            "state": state,
            "failure_rate": round(view.failures / calls, 4) if calls else 0.0,
            "slow_rate": round(view.slow / calls, 4) if calls else 0.0,
            "calls": calls,
            "open_until": _dt(view.open_until) if view.open_until else None,
            "trips": view.trips,
            "last_reason": view.last_reason,
        }

    # The slow paths.

    def _allow_slow(self) -> Permit:
        now = time.monotonic()
        if now >= self._next_sync:
            self._sync()
        view = self._view
        if view.state == CLOSED:
            return _PASS
        if view.state == DISABLED:
            return _DISABLED_PASS
        if view.state == FORCED_OPEN:
            raise BreakerOpen(self.name, 60.0, FORCED_OPEN)
        wait = view.open_until - _now()
        if wait > 0 or now < self._reject_until:
            raise BreakerOpen(self.name, max(wait, PERMIT_REJECT_BACKOFF), OPEN)
        if now < self._store_down_until:
            return _PASS  # fail open while the store is unavailable
        try:
            fresh, slot = _store().take_permit(self.name)
        except Exception as exc:
            self._store_failed(exc)
            return _PASS
        self._set_view(fresh, keep_window=True)
        if fresh.state == CLOSED:
            return _PASS
        if fresh.state == DISABLED:
            return _DISABLED_PASS
        if not slot:
            self._reject_until = now + PERMIT_REJECT_BACKOFF
            raise BreakerOpen(
                self.name,
                max(fresh.open_until - _now(), PERMIT_REJECT_BACKOFF),
                HALF_OPEN if fresh.state == OPEN else fresh.state,
            )
        return Permit("trial", gen=fresh.opened_at, slot=slot)

    def _trial(self, permit: Permit, ok: bool) -> None:
        try:
            view, changed = _store().trial(self.name, permit, ok)
        except Exception as exc:
            self._store_failed(exc)
            return
        self._set_view(view)
        if changed:
            self._after_transition(view)

    def _sync(self, *, force: bool = False) -> None:
        if not self._sync_lock.acquire(blocking=force):
            return  # another thread is syncing; this one goes on with the current view
        try:
            now = time.monotonic()
            if not force and now < self._store_down_until:
                self._next_sync = self._store_down_until
                return
            with self._lock:
                calls, fails, slows = self._calls, self._fails, self._slows
                self._calls = self._fails = self._slows = 0
                self._last_sync = now
                self._next_sync = now + SYNC_INTERVAL
            try:
                view, changed = _store().sync(self.name, calls, fails, slows)
            except Exception as exc:
                with self._lock:  # keep the outcomes for the next sync
                    self._calls += calls
                    self._fails += fails
                    self._slows += slows
                self._store_failed(exc)
                return
            self._set_view(view)
            if changed:
                self._after_transition(view)
        finally:
            self._sync_lock.release()

    def _set_view(self, view: _View, *, keep_window: bool = False) -> None:
        if keep_window:
            view.calls, view.failures, view.slow = (
                self._view.calls,
                self._view.failures,
                self._view.slow,
            )
        # Interned constants, so the hot path can compare with `is`.
        view.state = {
            CLOSED: CLOSED,
            OPEN: OPEN,
            FORCED_OPEN: FORCED_OPEN,
            DISABLED: DISABLED,
        }.get(view.state, CLOSED)
        self._view = view
        if view.state is not CLOSED:
            # An open breaker is re-read each SYNC_INTERVAL (and at open_until) by _allow_slow.
            self._next_sync = min(self._next_sync, time.monotonic() + SYNC_INTERVAL)

    def _after_transition(self, view: _View) -> None:
        log.warning("circuit breaker %s is now %s (%s)", self.name, view.state, view.last_reason)
        try:
            if settings.REDIS_URL:
                _mirror(self.name, view)
        except Exception:
            log.exception("circuit breaker %s: could not mirror its state", self.name)
        if view.state is OPEN and settings.ENABLE_SELF_HEALING:
            _heal_on_open(self.name)

    def _store_failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._store_down_until:
            log.warning("circuit breaker %s: shared store unavailable (%s)", self.name, exc)
        self._store_down_until = time.monotonic() + STORE_RETRY_INTERVAL
        self._next_sync = self._store_down_until

    def _publish_pending(self) -> None:
        if self._calls:
            self._sync(force=True)


def _heal_on_open(name: str) -> None:
    """The breaker of a monitored service opened on its calls' failure or slow rate (only the
    process whose counts tipped it gets here): start the service's self-healing.

    In a thread of its own: the caller may be anywhere (inside a transaction, a probe's thread),
    and the guardrails (one heal at a time, attempts per window) are the healing module's.
    """

    def run() -> None:
        from django.db import connections

        try:
            from recovery.healing import maybe_heal
            from recovery.models import Service

            service = Service.objects.filter(name=name).first()
            if service is not None:
                maybe_heal(service=service, trigger="breaker_open")
        except Exception:
            log.exception("circuit breaker %s opened: could not start self-healing", name)
        finally:
            connections.close_all()

    threading.Thread(target=run, name=f"heal-on-open:{name}", daemon=True).start()


# --- The registry and the manual operations ---------------------------------------------------

_registry: dict[str, CircuitBreaker] = {}
_registry_lock = threading.Lock()


def get(name: str) -> CircuitBreaker:
    """This process's breaker called `name` (created on first use)."""
    breaker = _registry.get(name)
    if breaker is None:
        with _registry_lock:
            breaker = _registry.setdefault(name, CircuitBreaker(name))
    return breaker


def _clear_registry(**_: Any) -> None:
    """Forget this process's breakers (settings changed, or tests): the shared state stays."""
    with _registry_lock:
        _registry.clear()


def _on_setting_changed(setting: str, **_: Any) -> None:
    if setting.startswith(("BREAKER_", "REDIS_URL")):
        _clear_registry()


setting_changed.connect(_on_setting_changed)


@atexit.register
def _flush_at_exit() -> None:
    for breaker in list(_registry.values()):
        try:
            breaker._publish_pending()
        except Exception:  # noqa: S110 (the process is ending; nothing to tell)
            pass


def _set(name: str, view: _View) -> dict:
    store = _store()
    if settings.REDIS_URL:
        store.write(name, view)
        store.clear(name)
        store.write(name, view)
    else:
        store.clear(name)
    _mirror(name, view)
    breaker = get(name)
    breaker._set_view(view)
    return breaker.snapshot()


def _audit(action: str, name: str, context: Any, details: dict) -> None:
    from compliance.audit import record_event

    record_event(
        action=action,
        object_type="recovery.breaker",
        object_id=name,
        context=context,
        details=details,
    )


def trip(name: str, *, reason: str) -> None:
    """Open the breaker now, everywhere (the monitor, on a service going down)."""
    current = get(name)._view if settings.REDIS_URL else None
    store = _store()
    try:
        view = store.read(name)
    except Exception:
        view = current or _View()
    if view.state in (FORCED_OPEN, DISABLED):
        return  # a manual state wins over automatic decisions
    now = _now()
    trips = view.trips + 1 if view.state == OPEN else max(1, view.trips + 1)
    _set(
        name,
        _View(
            state=OPEN,
            open_until=now + _open_for(trips),
            opened_at=repr(now),
            trips=trips,
            last_reason=reason[:300],
        ),
    )


def _manual(name: str, state: str, context: Any, action: str) -> dict:
    reason = {CLOSED: "reset by hand", FORCED_OPEN: "forced open by hand", DISABLED: "disabled"}[
        state
    ]
    before = get(name).snapshot()["state"]
    with transaction.atomic():
        snapshot = _set(name, _View(state=state, last_reason=reason))
        _audit(action, name, context, {"from": before, "to": state})
    return snapshot


def reset(name: str, *, context: Any) -> dict:
    """Close the breaker by hand (its window and trip count cleared); audited."""
    from compliance.choices import AuditAction

    return _manual(name, CLOSED, context, AuditAction.BREAKER_RESET)


def force_open(name: str, *, context: Any) -> dict:
    """Refuse every call until reset; audited."""
    from compliance.choices import AuditAction

    return _manual(name, FORCED_OPEN, context, AuditAction.BREAKER_FORCED_OPEN)


def disable(name: str, *, context: Any) -> dict:
    """Let every call through and count nothing until reset; audited."""
    from compliance.choices import AuditAction

    return _manual(name, DISABLED, context, AuditAction.BREAKER_DISABLED)


def names() -> list[str]:
    """Every breaker known here, in the database or in the shared store."""
    from recovery.models import BreakerState

    found = set(BreakerState.objects.values_list("name", flat=True))
    found.update(_registry)
    if settings.REDIS_URL:
        try:
            found.update(_RedisStore().names())
        except Exception as exc:
            log.warning("circuit breakers: Redis unavailable (%s)", exc)
    return sorted(found)


def reset_all(*, context: Any) -> int:
    """Close every breaker (DELETE /api/recovery/reset); one audit event per breaker."""
    count = 0
    for name in names():
        reset(name, context=context)
        count += 1
    return count


def snapshots() -> list[dict]:
    """Every breaker's snapshot, by name."""
    return [get(name).snapshot() for name in names()]


def exists(name: str) -> bool:
    """Whether a breaker of this name has ever been used (for a 404 on an unknown name)."""
    return name in names()
