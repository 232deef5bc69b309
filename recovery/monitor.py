"""The health monitor: probes services, suppresses flapping, records transitions and what
follows from them (breaker trip, self-healing, alerts, dependants degraded).

A check has two halves. The probe (recovery/probes.py) runs through the retry executor with no
retries and the probe's timeout as its deadline, so the service's circuit breaker sees every
probe and an open breaker answers for it ("circuit open") without touching the service. The
result is then applied to the Service row under `select_for_update`: two beat ticks or two
workers checking the same service at once queue there, and each decides from the row as the
other left it, so a change of status is recorded exactly once.

Statuses: a pass from `unknown` is `up` at once; `HEALTH_FAILURES_TO_DOWN` failures in a row
take a service `down`, `HEALTH_PASSES_TO_UP` passes in a row bring it back; anything in between
keeps the status it had (flapping suppressed). A service that passes while one of its critical
dependencies is down is `degraded`, naming it. `maintenance` is set by hand and holds whatever
the probes say. `unknown` is what readers see when the latest result is older than
`HEALTH_STALE_AFTER`: the monitor itself has stopped then, so nothing could record it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from recovery import probes
from recovery.choices import HealthStatus, ServiceKind
from recovery.models import HealthCheck, HealthTransition, Service

log = logging.getLogger(__name__)

# Bridge's own services, registered by ensure_builtin_services(); the prefix is reserved.
BUILTIN_PREFIX = "bridge-"
BUILTIN_DATABASE = "bridge-database"
BUILTIN_BROKER = "bridge-broker"
BUILTIN_REDIS = "bridge-redis"
BUILTIN_WORKERS = "bridge-workers"

# The reason of a status that a dependency caused: re-evaluated when that dependency changes.
DEPENDENCY_REASON = "depends on "
# Worst first: how lists, the dashboard and the overall status order services.
SEVERITY = {
    HealthStatus.DOWN: 0,
    HealthStatus.DEGRADED: 1,
    HealthStatus.UNKNOWN: 2,
    HealthStatus.MAINTENANCE: 3,
    HealthStatus.UP: 4,
}
# Checks run at once by one beat tick; a probe mostly waits on a socket.
MAX_CONCURRENT_CHECKS = 16
# A check is due a little early: beat's ticks and the checks' own durations jitter, and a
# check missed by milliseconds would otherwise wait a whole extra interval.
DUE_TOLERANCE = timedelta(seconds=1)
PRUNE_EVERY = 3600  # seconds between history prunings (one process does it, via the cache)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float | None
    detail: str
    degraded: str = ""


def timeout_of(service: Service) -> float:
    """The probe's hard timeout in seconds: the service's own, else CASCADE_TIMEOUT."""
    return (service.timeout_ms or settings.CASCADE_TIMEOUT) / 1000.0


def _breaker_open(exc: BaseException) -> BaseException | None:
    """The BreakerOpen behind `exc`, if the executor refused because of the breaker."""
    from recovery.breaker import BreakerOpen

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, BreakerOpen):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _root(exc: BaseException) -> BaseException:
    """The probe's own error behind the executor's wrapper (RetryExhausted and the like)."""
    from recovery.retry import RetryError

    while isinstance(exc, RetryError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def probe_service(service: Service) -> ProbeResult:
    """Probe `service` once through the executor, within its timeout; never raises."""
    from recovery import retry

    timeout = timeout_of(service)
    try:
        probe = probes.probe_for(service, timeout)
    except Exception as exc:  # a target that no longer parses, a credential that won't decrypt
        return ProbeResult(False, None, probes.reason(exc))
    timing: dict[str, float] = {}

    def attempt() -> probes.ProbeOutcome:
        started = time.perf_counter()
        try:
            return probes.run_probe(probe, timeout, name=service.name)
        finally:
            timing["ms"] = (time.perf_counter() - started) * 1000

    policy = retry.default_policy(max_retries=0, deadline=timeout)
    try:
        outcome = retry.call(attempt, service=service.name, policy=policy)
    except Exception as exc:
        refused = _breaker_open(exc)
        if refused is not None and "ms" not in timing:
            wait = math.ceil(getattr(refused, "retry_after", 0.0))
            return ProbeResult(False, None, f"circuit open, next trial in {wait} s")
        return ProbeResult(False, timing.get("ms"), probes.reason(_root(exc)))
    return ProbeResult(True, timing.get("ms"), outcome.detail, outcome.degraded)


# --- Applying a result ------------------------------------------------------------------------


def _down_dependencies(service: Service) -> list[str]:
    return list(
        service.depends_on.filter(critical=True, status=HealthStatus.DOWN)
        .order_by("name")
        .values_list("name", flat=True)
    )


def _dependency_reason(names: list[str]) -> str:
    verb = "is" if len(names) == 1 else "are"
    return f"{DEPENDENCY_REASON}{', '.join(names)}, which {verb} down"


def _decide(service: Service, result: ProbeResult) -> tuple[str, str]:
    """The status and reason after `result`, from the locked row (its counters updated)."""
    current = service.status
    if service.maintenance:
        return HealthStatus.MAINTENANCE, "in maintenance (set by hand)"
    failures_to_down = settings.HEALTH_FAILURES_TO_DOWN
    passes_to_up = settings.HEALTH_PASSES_TO_UP
    if not result.ok:
        if service.consecutive_failures >= failures_to_down and current != HealthStatus.DOWN:
            count = service.consecutive_failures
            return HealthStatus.DOWN, f"{count} failed check(s) in a row: {result.detail}"
        if current == HealthStatus.DOWN:
            return current, result.detail
        return current, service.status_reason  # below the threshold: nothing changes yet
    if current == HealthStatus.DOWN and service.consecutive_successes < passes_to_up:
        return current, (
            f"passing again ({service.consecutive_successes} of {passes_to_up}): {result.detail}"
        )
    down = _down_dependencies(service)
    if down:
        return HealthStatus.DEGRADED, _dependency_reason(down)
    if result.degraded:
        return HealthStatus.DEGRADED, result.degraded
    if current == HealthStatus.DOWN:
        return HealthStatus.UP, f"{service.consecutive_successes} passed checks in a row"
    return HealthStatus.UP, result.detail


def _transition(service: Service, to_status: str, reason: str, now: datetime) -> HealthTransition:
    transition = HealthTransition.objects.create(
        service=service, at=now, from_status=service.status, to_status=to_status, reason=reason
    )
    service.status = to_status
    service.status_since = now
    return transition


def apply_result(
    service_id: int, result: ProbeResult, *, forced: bool = False
) -> tuple[HealthCheck, HealthTransition | None]:
    """Record one probe's result and the status it leads to, under the row's lock."""
    with transaction.atomic():
        service = Service.objects.select_for_update().get(pk=service_id)
        now = timezone.now()
        check = HealthCheck.objects.create(
            service=service,
            checked_at=now,
            ok=result.ok,
            latency_ms=result.latency_ms,
            detail=result.detail[:500],
            forced=forced,
        )
        if result.ok:
            service.consecutive_successes += 1
            service.consecutive_failures = 0
        else:
            service.consecutive_failures += 1
            service.consecutive_successes = 0
        status, reason = _decide(service, result)
        transition = None
        if status != service.status:
            transition = _transition(service, status, reason[:500], now)
        service.status_reason = reason[:500]
        service.last_checked_at = now
        service.last_latency_ms = result.latency_ms
        service.save(
            update_fields=[
                "status",
                "status_reason",
                "status_since",
                "consecutive_failures",
                "consecutive_successes",
                "last_checked_at",
                "last_latency_ms",
                "updated_at",
            ]
        )
        if transition is not None:
            transaction.on_commit(lambda: after_transition(transition.pk))
    return check, transition


def set_status(service: Service, status: str, reason: str) -> HealthTransition | None:
    """Change a service's status outside a check (maintenance on or off), recorded as a
    transition with its reason. Runs in the caller's transaction."""
    locked = Service.objects.select_for_update().get(pk=service.pk)
    if locked.status == status:
        return None
    now = timezone.now()
    transition = _transition(locked, status, reason[:500], now)
    locked.status_reason = reason[:500]
    locked.consecutive_failures = locked.consecutive_successes = 0
    locked.save(
        update_fields=[
            "status",
            "status_reason",
            "status_since",
            "consecutive_failures",
            "consecutive_successes",
            "updated_at",
        ]
    )
    service.status, service.status_reason, service.status_since = status, reason, now
    transaction.on_commit(lambda: after_transition(transition.pk))
    return transition


def reevaluate_dependants(service: Service) -> list[HealthTransition]:
    """Dependants of `service` whose dependency status changed: up <-> degraded without a new
    probe (their own failures are their checks' business)."""
    changed = []
    for dependant_id in service.dependents.values_list("pk", flat=True):
        with transaction.atomic():
            dependant = Service.objects.select_for_update().get(pk=dependant_id)
            if dependant.maintenance or dependant.status not in (
                HealthStatus.UP,
                HealthStatus.DEGRADED,
            ):
                continue
            down = _down_dependencies(dependant)
            now = timezone.now()
            if down and dependant.status == HealthStatus.UP:
                reason = _dependency_reason(down)
                transition = _transition(dependant, HealthStatus.DEGRADED, reason, now)
            elif (
                not down
                and dependant.status == HealthStatus.DEGRADED
                and dependant.status_reason.startswith(DEPENDENCY_REASON)
            ):
                reason = "its critical dependencies are up again"
                transition = _transition(dependant, HealthStatus.UP, reason, now)
            else:
                continue
            dependant.status_reason = reason[:500]
            dependant.save(update_fields=["status", "status_reason", "status_since", "updated_at"])
            transaction.on_commit(lambda pk=transition.pk: after_transition(pk))
            changed.append(transition)
    return changed


def _alert_worthy(transition: HealthTransition) -> bool:
    """Alerts on a change for the worse, and on recovering from one; a new service coming
    up and maintenance switched by hand are not news."""
    bad = (HealthStatus.DOWN, HealthStatus.DEGRADED)
    return transition.to_status in bad or (
        transition.to_status == HealthStatus.UP and transition.from_status in bad
    )


def after_transition(transition_id: int) -> None:
    """What a committed change of status sets off: to `down`, the breaker opens and
    self-healing is considered; dependants are re-evaluated; alerts go out (a Celery task,
    so a slow mail server or webhook never holds the monitor)."""
    transition = HealthTransition.objects.select_related("service").filter(pk=transition_id)
    transition = transition.first()
    if transition is None:
        return
    service = transition.service
    if transition.to_status == HealthStatus.DOWN:
        from recovery import breaker

        try:
            breaker.trip(service.name, reason=f"health check: {transition.reason}"[:300])
        except Exception:
            log.exception("recovery: could not open the breaker of %s", service.name)
        try:
            from recovery import healing

            healing.maybe_heal(service=service, trigger="down")
        except Exception:
            log.exception("recovery: self-healing of %s could not start", service.name)
    if HealthStatus.DOWN in (transition.from_status, transition.to_status):
        reevaluate_dependants(service)
    if _alert_worthy(transition):
        from recovery import alerts
        from recovery.tasks import send_transition_alert_task

        if alerts.channels_configured():
            try:
                send_transition_alert_task.delay(transition.pk)
            except Exception:
                log.exception("recovery: the alert for %s could not be queued", service.name)


# --- Checks ---------------------------------------------------------------------------------


def check_now(service: Service, *, forced: bool = False) -> HealthCheck:
    """Probe `service` now and apply the result; `service` is refreshed from the row."""
    result = probe_service(service)
    check, _ = apply_result(service.pk, result, forced=forced)
    service.refresh_from_db()
    return check


def due_services(now: datetime | None = None) -> list[Service]:
    """Enabled services whose own check interval has passed since their last check."""
    now = now or timezone.now()
    due = []
    candidates = Service.objects.filter(enabled=True).select_related("credential")
    for service in candidates:
        last = service.last_checked_at
        interval = timedelta(seconds=service.check_interval)
        if last is None or last + interval - DUE_TOLERANCE <= now:
            due.append(service)
    return due


def _check_in_thread(service: Service) -> bool:
    try:
        return check_now(service).ok
    except Exception:
        log.exception("recovery: the check of %s failed", service.name)
        return False
    finally:
        # A pool thread's connection would otherwise outlive the tick.
        close_old_connections()
        connection.close()


def run_due_checks() -> int:
    """Check every due service concurrently; returns how many were checked."""
    due = due_services()
    if not due:
        return 0
    with ThreadPoolExecutor(
        max_workers=min(MAX_CONCURRENT_CHECKS, len(due)), thread_name_prefix="health"
    ) as pool:
        list(pool.map(_check_in_thread, due))
    return len(due)


def prune_history(now: datetime | None = None) -> int:
    """Delete checks older than HEALTH_HISTORY_DAYS (transitions and alerts are kept: they
    are few, and they are the history an operator reads)."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.HEALTH_HISTORY_DAYS)
    deleted, _ = HealthCheck.objects.filter(checked_at__lt=cutoff).delete()
    return deleted


def prune_history_if_due() -> int:
    """Prune at most once per PRUNE_EVERY across processes (an atomic cache add)."""
    if not cache.add("recovery:prune-history", 1, timeout=PRUNE_EVERY):
        return 0
    return prune_history()


# --- Reading ----------------------------------------------------------------------------------


def is_stale(service: Service, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    last = service.last_checked_at
    return last is None or now - last > settings.HEALTH_STALE_AFTER


def effective_status(service: Service, now: datetime | None = None) -> tuple[str, str]:
    """The status readers see: maintenance by hand, unknown without a fresh result."""
    if service.maintenance:
        return HealthStatus.MAINTENANCE, service.status_reason or "in maintenance (set by hand)"
    if not service.enabled:
        return HealthStatus.UNKNOWN, "checks are disabled"
    if is_stale(service, now):
        if service.last_checked_at is None:
            return HealthStatus.UNKNOWN, "not checked yet"
        return HealthStatus.UNKNOWN, "no fresh result: is the monitor (beat, worker) running?"
    return service.status, service.status_reason


def effective_status_q(status: str, now: datetime | None = None) -> Q:
    """A filter matching the services whose effective_status is `status`."""
    fresh_after = (now or timezone.now()) - settings.HEALTH_STALE_AFTER
    unknown = (
        Q(enabled=False) | Q(last_checked_at__isnull=True) | Q(last_checked_at__lt=fresh_after)
    )
    if status == HealthStatus.MAINTENANCE:
        return Q(maintenance=True)
    if status == HealthStatus.UNKNOWN:
        return Q(maintenance=False) & (unknown | Q(status=HealthStatus.UNKNOWN))
    return Q(maintenance=False, status=status) & ~unknown


def sort_worst_first(services: list[Service]) -> list[Service]:
    def key(service: Service) -> tuple:
        status, _ = effective_status(service)
        return (SEVERITY.get(status, 2), not service.critical, service.name)

    return sorted(services, key=key)


def overall_status(statuses: list[tuple[str, bool]]) -> str:
    """One word for the stack, from (effective status, critical) pairs: down when a critical
    service is down, degraded when anything else is not up, unknown with nothing to judge."""
    judged = [(status, critical) for status, critical in statuses if status != "maintenance"]
    if not judged:
        return HealthStatus.UNKNOWN
    if any(status == HealthStatus.DOWN and critical for status, critical in judged):
        return HealthStatus.DOWN
    if all(status == HealthStatus.UP for status, _ in judged):
        return HealthStatus.UP
    return HealthStatus.DEGRADED


# --- Bridge's own services ------------------------------------------------------------------


# Other apps' services that Bridge itself depends on (backups' remote targets): each provider
# returns name -> (kind, target) under the live settings. Registered from AppConfig.ready; the
# services are probed like the built-in ones but are not critical (a backup target being down
# puts no request at risk, yet its breaker and health show in the recovery status).
BUILTIN_PROVIDERS: list[Callable[[], dict[str, tuple[str, str]]]] = []


def register_builtin_provider(
    provider: Callable[[], dict[str, tuple[str, str]]],
) -> Callable[[], dict[str, tuple[str, str]]]:
    if provider not in BUILTIN_PROVIDERS:
        BUILTIN_PROVIDERS.append(provider)
    return provider


def _builtin_specs() -> dict[str, tuple[str, str]]:
    """name -> (kind, target) of Bridge's own services under the live settings; targets are
    where they live, never how to log in (the probe reads the credentials from settings)."""
    specs: dict[str, tuple[str, str]] = {}
    database = settings.DATABASES["default"]
    if "postgresql" in database.get("ENGINE", "") or "postgis" in database.get("ENGINE", ""):
        host = database.get("HOST") or "localhost"
        host = f"[{host}]" if ":" in host else host
        target = f"{host}:{database.get('PORT') or 5432}/{database.get('NAME') or 'postgres'}"
        specs[BUILTIN_DATABASE] = (ServiceKind.POSTGRES, target)
    broker = settings.CELERY_BROKER_URL or ""
    if broker.startswith(("redis://", "rediss://")):
        specs[BUILTIN_BROKER] = (ServiceKind.REDIS, _redis_target(broker))
    elif broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        specs[BUILTIN_BROKER] = (ServiceKind.RABBITMQ, probes.safe_target(broker))
    # (The filesystem broker has nothing to connect to; the workers' check covers it.)
    if settings.REDIS_URL:
        specs[BUILTIN_REDIS] = (ServiceKind.REDIS, _redis_target(settings.REDIS_URL))
    specs[BUILTIN_WORKERS] = (ServiceKind.CELERY, ",".join(probes.builtin_queues()))
    for provider in BUILTIN_PROVIDERS:
        try:
            for name, spec in provider().items():
                specs.setdefault(name, spec)
        except Exception:
            log.exception("built-in service provider %s failed", provider)
    return specs


_CORE_SERVICES = {BUILTIN_DATABASE, BUILTIN_BROKER, BUILTIN_REDIS, BUILTIN_WORKERS}


def _redis_target(url: str) -> str:
    target = probes.safe_target(url) or "localhost:6379"
    if ":" not in target.rsplit("]", 1)[-1]:
        target += ":6379"
    db = probes.urlsplit(url).path.strip("/")
    return f"{target}/{db}" if db.isdigit() else target


def ensure_builtin_services() -> None:
    """Register Bridge's own database, broker, Redis and Celery workers (idempotent, cheap
    when nothing changed: one query). A built-in service no longer configured is removed."""
    specs = _builtin_specs()
    existing = {
        row["name"]: (row["kind"], row["target"])
        for row in Service.objects.filter(builtin=True).values("name", "kind", "target")
    }
    if existing == specs:
        return
    for name, (kind, target) in specs.items():
        if existing.get(name) == (kind, target):
            continue
        try:
            with transaction.atomic():
                service, created = Service.objects.get_or_create(
                    name=name,
                    defaults={
                        "kind": kind,
                        "target": target,
                        "builtin": True,
                        "critical": name in _CORE_SERVICES,
                    },
                )
                if not created:
                    Service.objects.filter(pk=service.pk).update(
                        kind=kind, target=target, builtin=True, updated_at=timezone.now()
                    )
        except IntegrityError:
            continue  # another process registered it at the same moment
    Service.objects.filter(builtin=True).exclude(name__in=list(specs)).delete()
    workers = Service.objects.filter(name=BUILTIN_WORKERS).first()
    broker = Service.objects.filter(name=BUILTIN_BROKER).first()
    if workers is not None and broker is not None:
        # The workers can do nothing without their broker: degraded while it is down.
        workers.depends_on.add(broker)
