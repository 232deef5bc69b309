"""Self-healing: escalating strategies behind guardrails, each run a job row.

When a service goes down (the monitor calls `maybe_heal`) or an operator asks (`start_heal`),
a `HealOperation` row and a job are created; the job (`heal_job`) tries the service's
`heal_strategies` in order of escalation (reconnect, Celery pool restart, shutting one worker
down, the allow-listed restart command, the standby) and checks the service afresh after each
action, stopping at the first that brings it back. Every action is a step on the row and an
audit event; when every strategy failed an alert goes out.

Guardrails (after Kubernetes' restart back-off and systemd's StartLimitBurst): one heal per
service at a time, at most HEAL_MAX_ATTEMPTS automatic heals per service per HEAL_WINDOW with
back-off between them, at most HEAL_MAX_CONCURRENT heals at once, and dry runs that record
what would run and run nothing. The decision is taken under one lock shared by every process
(a PostgreSQL advisory lock; SQLite's IMMEDIATE transactions already serialise writers), so
two processes seeing the same outage start one heal. While a heal runs, a Redis `SET NX` lock
with an expiry (where REDIS_URL is set) also keeps a second worker off the service, and frees
itself if the worker dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from bridge import jobs
from bridge.choices import FINAL_JOB_STATUSES, JobStatus
from bridge.models import Job
from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from compliance.redaction import redact, redact_text
from recovery.choices import HEAL_JOB_KIND, HealOutcome, HealStrategy, HealthStatus, ServiceKind
from recovery.models import HealOperation, Service

log = logging.getLogger(__name__)

# A restart command that has not finished by then is killed (with its process group).
COMMAND_TIMEOUT = 60.0
# Output of a command kept on the step (after redaction): enough to read an error.
OUTPUT_LIMIT = 2000
# After an action, the service is checked until it answers or this long has passed: a
# restarted server needs a moment to listen again.
SETTLE_SECONDS = 10.0
SETTLE_PAUSE = 0.25
# Settling waits at most this long for an open breaker's trial on top of SETTLE_SECONDS.
MAX_BREAKER_WAIT = 60.0
# The first automatic retry of a service waits this long after the previous heal ended,
# doubling with each further attempt in the window (Kubernetes' CrashLoopBackOff idea).
BACKOFF_BASE = timedelta(seconds=10)
# A pending heal whose job has not beaten for this long is stuck (worker lost).
STUCK_AFTER = timedelta(minutes=5)
# PostgreSQL advisory lock key of heal decisions (any constant unique within Bridge).
_DECISION_LOCK_KEY = 0x42524947_48454131  # "BRIGHEA1"
_REDIS_LOCK_PREFIX = "bridge:recovery:heal:"


class HealRefused(Exception):
    """A guardrail said no to a heal asked for by hand (`code` says which)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# --- Guardrails -------------------------------------------------------------------------------


@contextlib.contextmanager
def _decision_lock() -> Iterator[None]:
    """Serialise heal decisions across processes, until the enclosing transaction ends."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                # Transaction-scoped: held until commit even when the caller's transaction
                # encloses ours, so nobody decides on rows not yet visible to them.
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_DECISION_LOCK_KEY])
        yield


def _close_if_orphaned(operation: HealOperation, now: datetime) -> bool:
    """Close a pending heal whose job ended without it (reaped, cancelled, failed hard)."""
    job = operation.job
    if job is None:
        stuck = operation.started_at < now - STUCK_AFTER
        reason = "no job ran it"
    elif job.status in FINAL_JOB_STATUSES:
        stuck = True
        reason = f"its job ended {job.status}: {job.error or 'no error'}"[:300]
    else:
        beat = job.heartbeat_at or job.created_at
        stuck = beat < now - STUCK_AFTER
        reason = "its job stopped beating" if job.status == JobStatus.RUNNING else "never started"
    if not stuck:
        return False
    steps = [*operation.steps, _step("", "closed", ok=False, detail=f"stuck: {reason}")]
    return bool(
        HealOperation.objects.filter(pk=operation.pk, outcome=HealOutcome.PENDING).update(
            outcome=HealOutcome.NOT_HEALED, finished_at=now, steps=steps
        )
    )


def _active(service: Service | None = None) -> list[HealOperation]:
    """Pending real (not dry-run) heals, orphans closed on the way."""
    now = timezone.now()
    pending = HealOperation.objects.filter(outcome=HealOutcome.PENDING, dry_run=False)
    if service is not None:
        pending = pending.filter(service=service)
    return [op for op in pending.select_related("job") if not _close_if_orphaned(op, now)]


def _backoff(attempts: int) -> timedelta:
    return BACKOFF_BASE * (2 ** max(attempts - 1, 0))


def _refusal(service: Service, *, automatic: bool, dry_run: bool) -> tuple[str, str] | None:
    """Which guardrail stops a heal of `service` now, as (code, reason); None lets it run."""
    if dry_run:
        return None  # runs nothing: no lock, no cap
    if _active(service):
        return "already_healing", "a heal of this service is already running"
    running = len(_active())
    if running >= settings.HEAL_MAX_CONCURRENT:
        return (
            "concurrency_cap",
            f"{running} heals are running (HEAL_MAX_CONCURRENT={settings.HEAL_MAX_CONCURRENT})",
        )
    if not automatic:
        return None  # an operator decided: the per-service budget is for automatic heals
    window_start = timezone.now() - settings.HEAL_WINDOW
    recent = list(
        HealOperation.objects.filter(service=service, started_at__gte=window_start, dry_run=False)
        .exclude(outcome=HealOutcome.SKIPPED)
        .exclude(trigger="manual")
        .order_by("-started_at")
    )
    if len(recent) >= settings.HEAL_MAX_ATTEMPTS:
        return (
            "attempts_cap",
            f"{len(recent)} heals within {settings.HEAL_WINDOW} "
            f"(HEAL_MAX_ATTEMPTS={settings.HEAL_MAX_ATTEMPTS})",
        )
    if recent:
        last = recent[0]
        wait_until = (last.finished_at or last.started_at) + _backoff(len(recent))
        if timezone.now() < wait_until:
            until = f"{wait_until:%H:%M:%S} UTC"
            return "backoff", f"backing off until {until} after attempt {len(recent)}"
    return None


def _episode_start(service: Service) -> datetime | None:
    return service.status_since


def _record_skip(service: Service, trigger: str, code: str, reason: str) -> HealOperation | None:
    """A skipped row, once per guardrail per episode (the service's current status), so a
    service that stays down does not add a row on every check."""
    since = _episode_start(service)
    earlier = HealOperation.objects.filter(service=service, outcome=HealOutcome.SKIPPED)
    if since is not None:
        earlier = earlier.filter(started_at__gte=since)
    if any(step.get("guardrail") == code for op in earlier[:50] for step in op.steps[:1]):
        return None
    now = timezone.now()
    operation = HealOperation.objects.create(
        service=service,
        trigger=trigger,
        outcome=HealOutcome.SKIPPED,
        started_at=now,
        finished_at=now,
        steps=[{**_step("", "skipped", ok=None, detail=reason), "guardrail": code}],
    )
    _audit(
        AuditAction.HEAL_SKIPPED,
        AuditContext.system(),
        operation,
        {"service": service.name, "trigger": trigger, "guardrail": code, "reason": reason},
    )
    if code == "attempts_cap":
        # Healing has given up on this episode: a person must look.
        transaction.on_commit(
            lambda: _alert(service, f"Self-healing of {service.name} gave up", reason),
            robust=True,
        )
    return operation


# --- Starting a heal ---------------------------------------------------------------------------


def _strategies(service: Service) -> list[str]:
    known = set(HealStrategy.values)
    return [name for name in service.heal_strategies or [] if name in known]


def _create(
    *,
    service: Service,
    context: AuditContext,
    trigger: str,
    strategy: str,
    dry_run: bool,
) -> HealOperation:
    job = jobs.start_job(
        kind=HEAL_JOB_KIND,
        context=context,
        params={
            "service": service.name,
            "trigger": trigger,
            "strategy": strategy,
            "dry_run": dry_run,
        },
    )
    operation = HealOperation.objects.create(
        job=job,
        service=service,
        trigger=trigger,
        strategy=strategy,
        dry_run=dry_run,
        started_at=timezone.now(),
        actor_username=context.actor_username,
    )
    _audit(
        AuditAction.HEAL_REQUESTED,
        context,
        operation,
        {"service": service.name, "trigger": trigger, "strategy": strategy, "dry_run": dry_run},
    )
    return operation


def maybe_heal(*, service: Service, trigger: str) -> HealOperation | None:
    """Start an automatic heal of `service` unless healing is off or a guardrail says no.

    Returns the pending operation (its job runs once the caller's transaction commits), the
    skipped row the first time a guardrail refuses in this episode, or None.
    """
    if not settings.ENABLE_SELF_HEALING:
        return None
    if not service.enabled or service.maintenance or not _strategies(service):
        return None
    with _decision_lock():
        refusal = _refusal(service, automatic=True, dry_run=False)
        if refusal is not None:
            code, reason = refusal
            if code == "already_healing":
                return None  # the running heal is this episode's answer
            return _record_skip(service, trigger, code, reason)
        return _create(
            service=service,
            context=AuditContext.system(),
            trigger=trigger,
            strategy="",
            dry_run=False,
        )


def start_heal(
    *,
    service: Service,
    context: AuditContext,
    strategy: str | None = None,
    dry_run: bool = False,
) -> HealOperation:
    """Heal `service` by hand: one strategy, or its own list in order; raises HealRefused.

    An operator's heal runs even with ENABLE_SELF_HEALING off and past the per-service
    attempts budget, but never beside another heal of the service or past the global cap.
    """
    if strategy and strategy not in HealStrategy.values:
        raise HealRefused(f"Unknown strategy {strategy!r}.", "unknown_strategy")
    if not strategy and not _strategies(service):
        raise HealRefused(
            "The service has no heal strategies: name one, or configure its list.", "no_strategy"
        )
    with _decision_lock():
        refusal = _refusal(service, automatic=False, dry_run=dry_run)
        if refusal is not None:
            raise HealRefused(refusal[1], refusal[0])
        return _create(
            service=service,
            context=context,
            trigger="manual",
            strategy=strategy or "",
            dry_run=dry_run,
        )


def reset_stuck(*, context: AuditContext) -> int:
    """Close every pending heal that is not making progress; returns how many.

    A heal whose job still beats is left alone: it is working, not stuck.
    """
    now = timezone.now()
    closed = 0
    for operation in HealOperation.objects.filter(outcome=HealOutcome.PENDING).select_related(
        "job", "service"
    ):
        with transaction.atomic():
            if not _close_if_orphaned(operation, now):
                continue
            closed += 1
            _release_run_lock(operation.service_id, token=None)
            _audit(
                AuditAction.HEAL_FINISHED,
                context,
                operation,
                {
                    "service": operation.service.name,
                    "outcome": HealOutcome.NOT_HEALED,
                    "reason": "cleared as stuck",
                },
            )
    return closed


def reset_recovery(*, context: AuditContext) -> dict[str, int]:
    """Clear breakers, retry statistics and stuck heals (DELETE /api/recovery/reset)."""
    from recovery import breaker, retry

    result = {
        "breakers": breaker.reset_all(context=context),
        "retry_stats": retry.reset_stats(),
        "stuck_heals": reset_stuck(context=context),
    }
    record_event(
        action=AuditAction.RECOVERY_RESET,
        context=context,
        object_type="recovery",
        details=result,
    )
    return result


# --- Running a heal (the job) -----------------------------------------------------------------


def _step(strategy: str, action: str, *, ok: bool | None, detail: str = "", **extra: Any) -> dict:
    return {
        "strategy": strategy,
        "action": action,
        "ok": ok,
        "detail": redact_text(detail)[:OUTPUT_LIMIT],
        "at": timezone.now().isoformat(),
        **redact(extra),
    }


def _audit(action: str, context: AuditContext, operation: HealOperation, details: dict) -> None:
    record_event(
        action=action,
        context=context,
        object_type="recovery.healoperation",
        object_id=operation.pk,
        details=details,
    )


def _alert(service: Service, subject: str, body: str) -> None:
    from recovery import alerts

    try:
        alerts.send_alert(service=service, subject=subject, body=body)
    except Exception:
        # An alert that cannot go out must not turn the heal's record into a failure.
        log.exception("recovery: alert %r not sent", subject)


@contextlib.contextmanager
def _run_lock(service: Service) -> Iterator[bool]:
    """Hold the service's Redis lock while healing (True), or say another worker holds it."""
    if not settings.REDIS_URL:
        yield True  # the pending row, decided under the decision lock, is the lock
        return
    from security.ratelimit import _redis_connection

    token = uuid.uuid4().hex
    key = f"{_REDIS_LOCK_PREFIX}{service.pk}"
    try:
        # Expires with the job reaper's patience: a dead worker's lock frees itself.
        got = bool(
            _redis_connection().set(key, token, nx=True, px=settings.JOB_HEARTBEAT_TIMEOUT * 1000)
        )
    except Exception as exc:  # Redis may be the very service that is down
        log.warning("recovery: no heal lock (%s); the pending row guards", type(exc).__name__)
        yield True
        return
    try:
        yield got
    finally:
        if got:
            _release_run_lock(service.pk, token=token)


_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


def _release_run_lock(service_id: int, *, token: str | None) -> None:
    """Free the lock if it is still ours (`token`), or whoever's (None, by an operator)."""
    if not settings.REDIS_URL:
        return
    from security.ratelimit import _redis_connection

    key = f"{_REDIS_LOCK_PREFIX}{service_id}"
    with contextlib.suppress(Exception):
        if token is None:
            _redis_connection().delete(key)
        else:
            _redis_connection().eval(_RELEASE, 1, key, token)


def heal_job(job: Job, progress: jobs.Progress) -> dict:
    """The heal job: try strategies in order until a fresh check passes."""
    operation = HealOperation.objects.select_related("service").get(job=job)
    service = operation.service
    strategies = [operation.strategy] if operation.strategy else _strategies(service)
    context = AuditContext(actor_id=job.actor_id, actor_username=job.actor_username)
    runner = _Runner(operation, context)
    outcome = HealOutcome.NOT_HEALED
    try:
        with _run_lock(service) as locked:
            if not locked:
                runner.add(_step("", "skipped", ok=None, detail="another worker is healing it"))
                outcome = HealOutcome.SKIPPED
                return runner.finish(outcome)
            progress.update(0, len(strategies), f"healing {service.name}")
            for done, strategy in enumerate(strategies, start=1):
                if operation.dry_run:
                    runner.add(
                        _step(strategy, "would run", ok=None, detail=describe(service, strategy))
                    )
                else:
                    runner.add(_act(service, strategy), audit=True)
                    if _settle(service, strategy, runner, progress):
                        outcome = HealOutcome.HEALED
                        progress.update(len(strategies), len(strategies), "healed")
                        break
                progress.update(done, len(strategies), f"{strategy} done")
            if operation.dry_run:
                outcome = HealOutcome.DRY_RUN
    finally:
        # Also on cancel or a crash: the row never stays pending behind a finished job.
        if runner.outcome is None:
            runner.finish(outcome)
    if outcome == HealOutcome.NOT_HEALED:
        tried = ", ".join(strategies) or "none"
        _alert(
            service,
            f"Self-healing of {service.name} gave up",
            f"Tried {tried}; {service.name} is still {service.status}. Heal #{operation.pk}.",
        )
    return {"heal": operation.pk, "outcome": outcome, "steps": len(runner.steps)}


class _Runner:
    """Appends steps to the operation row as they happen (so the console shows progress)."""

    def __init__(self, operation: HealOperation, context: AuditContext) -> None:
        self.operation = operation
        self.context = context
        self.steps: list[dict] = list(operation.steps)
        self.outcome: str | None = None

    def add(self, step: dict, *, audit: bool = False) -> None:
        self.steps.append(step)
        with transaction.atomic():
            HealOperation.objects.filter(pk=self.operation.pk).update(steps=self.steps)
            if audit:
                _audit(
                    AuditAction.HEAL_STEP,
                    self.context,
                    self.operation,
                    {"service": self.operation.service.name, **step},
                )

    def finish(self, outcome: str) -> dict:
        self.outcome = outcome
        with transaction.atomic():
            HealOperation.objects.filter(pk=self.operation.pk, outcome=HealOutcome.PENDING).update(
                outcome=outcome, finished_at=timezone.now(), steps=self.steps
            )
            _audit(
                AuditAction.HEAL_FINISHED,
                self.context,
                self.operation,
                {"service": self.operation.service.name, "outcome": outcome},
            )
        return {"heal": self.operation.pk, "outcome": outcome}


def _breaker_wait(service: Service) -> float:
    """Seconds until the service's open breaker lets a trial probe through (0: now)."""
    from recovery import breaker

    try:
        snapshot = breaker.get(service.name).snapshot()
    except Exception:
        return 0.0  # no breaker store: probing will say what is wrong
    until = snapshot.get("open_until")
    if snapshot.get("state") != "open" or until is None:
        return 0.0
    return max((until - timezone.now()).total_seconds(), 0.0)


def _fresh_check(service: Service) -> Any:
    """One forced probe through the monitor (history, transitions and breaker included)."""
    from recovery import monitor

    return monitor.check_now(service, forced=True)


def _settle(service: Service, strategy: str, runner: _Runner, progress: jobs.Progress) -> bool:
    """Check the service afresh until it passes (then until it is `up`) or time runs out."""
    # The breaker opened when the service went down and refuses probes until its trial:
    # waiting for that trial (rather than recording refusals) is part of settling.
    opened_for = min(_breaker_wait(service), MAX_BREAKER_WAIT)
    deadline = time.monotonic() + max(SETTLE_SECONDS, service.timeout_ms / 1000) + opened_for
    passes = 0
    last = None
    while time.monotonic() < deadline:
        wait = _breaker_wait(service)
        if wait > 0:
            time.sleep(min(wait, 1.0, max(deadline - time.monotonic(), 0.0)))
            progress.beat()
            continue
        check = _fresh_check(service)
        last = check
        progress.beat()
        if check.ok:
            passes += 1
            service.refresh_from_db()
            # A few passes so the monitor's flapping rule sees it back up, not only one probe.
            if service.status == HealthStatus.UP or passes >= settings.HEALTH_PASSES_TO_UP:
                break
        else:
            passes = 0
        time.sleep(SETTLE_PAUSE)
    service.refresh_from_db()
    ok = bool(last is not None and last.ok)
    detail = f"status {service.status}" + (f": {last.detail}" if last is not None else "")
    runner.add(_step(strategy, "check", ok=ok, detail=detail, status=service.status))
    return ok


# --- Strategies --------------------------------------------------------------------------------


def describe(service: Service, strategy: str) -> str:
    """What `strategy` would do to `service` (dry runs show this)."""
    if strategy == HealStrategy.RESTART_COMMAND:
        argv = settings.RECOVERY_RESTART_COMMANDS.get(service.restart_command)
        if argv is None:
            return f"refuse: {service.restart_command or '(none)'} is not in the allow-list"
        return f"run {service.restart_command}: {' '.join(map(str, argv))}"
    if strategy == HealStrategy.SWITCH_STANDBY:
        return f"switch target to {service.standby_target or '(no standby configured)'}"
    return {
        HealStrategy.RECONNECT: f"close and reopen Bridge's connections to {service.kind}",
        HealStrategy.POOL_RESTART: "ask Celery workers to restart their pools",
        HealStrategy.WORKER_SHUTDOWN: "shut one Celery worker down for its supervisor to restart",
    }.get(strategy, strategy)


# Strategies that only mean something for some kinds (the others apply to every kind).
_ONLY_FOR = {
    HealStrategy.POOL_RESTART: {ServiceKind.CELERY},
    HealStrategy.WORKER_SHUTDOWN: {ServiceKind.CELERY},
}


def _act(service: Service, strategy: str) -> dict:
    kinds = _ONLY_FOR.get(strategy)
    if kinds is not None and service.kind not in kinds:
        return _step(strategy, "skipped", ok=False, detail=f"not for a {service.kind} service")
    action: Callable[[Service], dict] = _ACTIONS[strategy]
    try:
        return action(service)
    except Exception as exc:
        return _step(strategy, strategy, ok=False, detail=f"{type(exc).__name__}: {exc}")


def _reconnect(service: Service) -> dict:
    if service.kind == ServiceKind.POSTGRES:
        from django.db import connections

        # Bridge's own pools: the next query opens a fresh connection, and the check that
        # follows is one (for another PostgreSQL server Bridge holds no pool to reset).
        connections.close_all()
        return _step("reconnect", "close_all", ok=True, detail="database connections closed")
    if service.kind == ServiceKind.REDIS:
        closed = _disconnect_redis_pools()
        return _step("reconnect", "disconnect", ok=True, detail=f"{closed} Redis pool(s) reset")
    if service.kind in (ServiceKind.CELERY, ServiceKind.RABBITMQ):
        from bridge.celery import app

        app.pool.force_close_all()
        return _step("reconnect", "broker_pool", ok=True, detail="broker connection pool reset")
    return _step("reconnect", "none", ok=None, detail=f"Bridge pools no {service.kind} connections")


def _disconnect_redis_pools() -> int:
    """Drop the pooled connections of Bridge's Redis clients (limiter, cache)."""
    pools = []
    from security import ratelimit

    if ratelimit._redis_client is not None:
        pools.append(ratelimit._redis_client.connection_pool)
    from django.core.cache import caches

    for cache in caches.all(initialized_only=True):
        client = getattr(cache, "_cache", None)
        pools.extend(getattr(client, "_pools", {}).values())
    for pool in pools:
        pool.disconnect()
    return len(pools)


def _pool_restart(service: Service) -> dict:
    from bridge.celery import app

    if not app.conf.worker_pool_restarts:
        return _step(
            "pool_restart",
            "pool_restart",
            ok=False,
            detail="workers refuse pool_restart: worker_pool_restarts is off "
            "(set CELERY_WORKER_POOL_RESTARTS = True)",
        )
    replies = app.control.pool_restart(reply=True, timeout=service.timeout_ms / 1000)
    return _step(
        "pool_restart", "pool_restart", ok=bool(replies), detail=f"{len(replies or [])} replied"
    )


def _worker_shutdown(service: Service) -> dict:
    from bridge.celery import app

    replies = app.control.ping(timeout=min(service.timeout_ms / 1000, 5.0)) or []
    workers = sorted(name for reply in replies for name in reply)
    if not workers:
        return _step("worker_shutdown", "shutdown", ok=False, detail="no worker answered ping")
    # One only: the others keep working while its supervisor starts it again.
    app.control.shutdown(destination=[workers[0]])
    return _step("worker_shutdown", "shutdown", ok=True, detail=f"asked {workers[0]} to stop")


def run_command(argv: list[str], *, timeout: float = COMMAND_TIMEOUT) -> tuple[int | None, str]:
    """Run an allow-listed argv (never a shell); returns (exit code or None on timeout, output).

    Output goes to a file, not a pipe: a restart command that leaves a daemon behind would
    hold a pipe open and make reading it wait for the daemon to exit.
    """
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(  # noqa: S603  (argv from the settings' allow-list)
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so a timeout kills what it started too
        )
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
        output.seek(0)
        text = output.read(OUTPUT_LIMIT * 4).decode("utf-8", "replace")
    return code, redact_text(text)[-OUTPUT_LIMIT:]


def _restart_command(service: Service) -> dict:
    name = service.restart_command
    argv = settings.RECOVERY_RESTART_COMMANDS.get(name) if name else None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return _step(
            "restart_command",
            "refused",
            ok=False,
            detail=f"{name or '(none)'} is not in RECOVERY_RESTART_COMMANDS",
            command=name,
        )
    code, output = run_command(argv)
    if code is None:
        detail = f"timed out after {COMMAND_TIMEOUT:.0f} s"
    else:
        detail = f"exit {code}"
    return _step(
        "restart_command",
        "run",
        ok=code == 0,
        detail=f"{detail}\n{output}".strip(),
        command=name,
        exit_code=code,
    )


def _switch_standby(service: Service) -> dict:
    old, new = service.target, service.standby_target
    if not new:
        return _step("switch_standby", "switch", ok=False, detail="no standby configured")
    # Swapped, so that switching again goes back: the old target becomes the standby.
    swapped = Service.objects.filter(pk=service.pk, target=old, standby_target=new).update(
        target=new, standby_target=old
    )
    if not swapped:
        return _step("switch_standby", "switch", ok=False, detail="target changed meanwhile")
    service.target, service.standby_target = new, old
    return _step(
        "switch_standby",
        "switch",
        ok=True,
        detail=f"target {old} -> {new}",
        previous=old,
        target=new,
    )


_ACTIONS: dict[str, Callable[[Service], dict]] = {
    HealStrategy.RECONNECT: _reconnect,
    HealStrategy.POOL_RESTART: _pool_restart,
    HealStrategy.WORKER_SHUTDOWN: _worker_shutdown,
    HealStrategy.RESTART_COMMAND: _restart_command,
    HealStrategy.SWITCH_STANDBY: _switch_standby,
}
