"""The monitor: flapping suppressed, a transition for every change and alerts only on them,
dependencies, maintenance, staleness, built-in services, concurrency and pruning."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone

from recovery import breaker, monitor
from recovery.choices import HealthStatus
from recovery.models import Alert, HealthCheck, HealthTransition, Service
from tests.conftest import free_port
from tests.recovery.probe_servers import make_service, scripted_http_server

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _rules(settings) -> None:
    settings.HEALTH_FAILURES_TO_DOWN = 2
    settings.HEALTH_PASSES_TO_UP = 2
    settings.ENABLE_SELF_HEALING = False
    # A tripped breaker lets its trial probe through soon, so recovery is seen in a test.
    settings.BREAKER_OPEN_BASE = timedelta(milliseconds=200)
    settings.BREAKER_OPEN_MAX = timedelta(milliseconds=200)
    settings.RECOVERY_ALERT_EMAILS = ["ops@example.org"]
    settings.RECOVERY_ALERT_WEBHOOK = ""


def statuses(service: Service) -> list[tuple[str, str]]:
    return list(
        HealthTransition.objects.filter(service=service)
        .order_by("at", "id")
        .values_list("from_status", "to_status")
    )


def check_past_open_breaker(service: Service) -> HealthCheck:
    """The next check that reaches the service and passes: the tripped breaker answers for
    it ("circuit open") until its short open time is over and a trial call goes through."""
    deadline = time.monotonic() + 10
    check = monitor.check_now(service)
    while not check.ok and time.monotonic() < deadline:
        assert check.detail.startswith("circuit open"), check.detail
        time.sleep(0.1)
        check = monitor.check_now(service)
    assert check.ok, check.detail
    return check


def come_back_up(service: Service) -> None:
    """Check until the service is up again (a breaker refusal in between counts as a
    failure and starts the passes over, as it should)."""
    deadline = time.monotonic() + 15
    while service.status != "up" and time.monotonic() < deadline:
        check = monitor.check_now(service)
        if not check.ok:
            time.sleep(0.1)
    assert service.status == "up", service.status_reason


def test_flapping_is_suppressed_and_each_change_is_one_transition_and_one_alert(
    django_capture_on_commit_callbacks,
):
    with scripted_http_server() as peer, django_capture_on_commit_callbacks(execute=True):
        service = make_service(target=peer.url)
        # a first pass: up at once
        monitor.check_now(service)
        assert service.status == "up"
        # one failure is not enough to go down
        peer.status = 500
        monitor.check_now(service)
        assert service.status == "up" and service.consecutive_failures == 1
        # one pass in between starts the count again
        peer.status = 200
        monitor.check_now(service)
        peer.status = 500
        monitor.check_now(service)
        assert service.status == "up"
        # the second failure in a row: down, with the reason
        monitor.check_now(service)
        assert service.status == "down"
        assert "2 failed check(s) in a row: HTTP 500" in service.status_reason
        # more failures change nothing
        monitor.check_now(service)
        assert service.status == "down"
        # back: one pass is not enough, the second in a row is
        peer.status = 200
        check_past_open_breaker(service)
        assert service.status == "down", service.status_reason
        assert service.status_reason.startswith("passing again (1 of 2)")
        come_back_up(service)

    assert statuses(service) == [("unknown", "up"), ("up", "down"), ("down", "up")]
    # alerts on the two changes that matter (a new service coming up is not news)
    subjects = [message.subject for message in mail.outbox]
    assert subjects == [f"[Bridge] {service.name} is down", f"[Bridge] {service.name} is up"]
    assert Alert.objects.filter(service=service, delivered=True).count() == 2


def test_going_down_trips_the_breaker_and_open_breaker_checks_do_not_probe(
    django_capture_on_commit_callbacks,
):
    port = free_port()
    service = make_service(kind="tcp", target=f"127.0.0.1:{port}")
    with django_capture_on_commit_callbacks(execute=True):
        monitor.check_now(service)
        monitor.check_now(service)
    assert service.status == "down"
    assert breaker.get(service.name).snapshot()["state"] == "open"
    check = monitor.check_now(service)
    assert not check.ok
    assert check.detail.startswith("circuit open, next trial in ")
    assert check.latency_ms is None


def test_going_down_asks_self_healing(settings, django_capture_on_commit_callbacks):
    from recovery.models import HealOperation

    settings.ENABLE_SELF_HEALING = True
    settings.HEALTH_FAILURES_TO_DOWN = 1
    service = make_service(kind="tcp", target=f"127.0.0.1:{free_port()}")
    service.heal_strategies = ["reconnect"]
    service.save()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        monitor.check_now(service)
    called = []
    import recovery.healing as healing

    original = healing.maybe_heal
    healing.maybe_heal = lambda **kw: called.append(kw)
    try:
        for callback in callbacks:
            callback()
    finally:
        healing.maybe_heal = original
    assert called == [{"service": service, "trigger": "down"}] or (
        called and called[0]["trigger"] == "down"
    )
    assert HealOperation.objects.filter(service=service).count() == 0


# Committed for real, so that what follows a transition runs as it does in production: at
# once, between one check and the next.
@pytest.mark.django_db(transaction=True)
def test_a_service_whose_critical_dependency_is_down_is_degraded_and_says_which():
    with scripted_http_server() as db_peer, scripted_http_server() as app_peer:
        database = make_service(name="t-dep-db", target=db_peer.url, critical=True)
        optional = make_service(name="t-dep-cache", target=db_peer.url, critical=False)
        app = make_service(name="t-dep-app", target=app_peer.url)
        app.depends_on.set([database, optional])
        for service in (database, optional, app):
            monitor.check_now(service)
        assert app.status == "up"
        # when the critical dependency goes down, the app is degraded at once (no new probe)
        db_peer.status = 500
        monitor.check_now(database)
        monitor.check_now(database)
        monitor.check_now(optional)
        monitor.check_now(optional)
        app.refresh_from_db()
        assert app.status == "degraded"
        assert app.status_reason == "depends on t-dep-db, which is down"
        # its own checks keep it degraded while the dependency is down
        monitor.check_now(app)
        assert app.status == "degraded"
        # and it is up again with the dependency
        db_peer.status = 200
        come_back_up(database)
        app.refresh_from_db()
        assert app.status == "up"
    assert statuses(app) == [("unknown", "up"), ("up", "degraded"), ("degraded", "up")]


def test_maintenance_holds_whatever_the_probes_say(django_capture_on_commit_callbacks):
    from compliance.audit import AuditContext
    from recovery import catalog

    service = make_service(kind="tcp", target=f"127.0.0.1:{free_port()}")
    with django_capture_on_commit_callbacks(execute=True):
        catalog.update_service(
            context=AuditContext.system(), service=service, values={"maintenance": True}
        )
        for _ in range(3):
            monitor.check_now(service)
        assert service.status == "maintenance"
        catalog.update_service(
            context=AuditContext.system(), service=service, values={"maintenance": False}
        )
    assert statuses(service) == [("unknown", "maintenance"), ("maintenance", "unknown")]
    assert mail.outbox == []


def test_a_result_older_than_the_stale_limit_reads_as_unknown(settings):
    settings.HEALTH_STALE_AFTER = timedelta(seconds=30)
    service = make_service(status="up", last_checked_at=timezone.now())
    assert monitor.effective_status(service)[0] == "up"
    service.last_checked_at = timezone.now() - timedelta(seconds=31)
    status, reason = monitor.effective_status(service)
    assert status == "unknown" and "no fresh result" in reason
    service.save()
    assert not Service.objects.filter(monitor.effective_status_q("up"), pk=service.pk).exists()
    assert Service.objects.filter(monitor.effective_status_q("unknown"), pk=service.pk).exists()


def test_only_due_services_are_checked_and_history_is_pruned(settings):
    settings.HEALTH_HISTORY_DAYS = 7
    now = timezone.now()
    due = make_service(check_interval=5, last_checked_at=now - timedelta(seconds=5))
    never = make_service()
    not_due = make_service(check_interval=60, last_checked_at=now - timedelta(seconds=10))
    disabled = make_service(enabled=False)
    names = {service.name for service in monitor.due_services(now)}
    assert {due.name, never.name} <= names
    assert not names & {not_due.name, disabled.name}
    HealthCheck.objects.create(service=due, checked_at=now - timedelta(days=8), ok=True)
    HealthCheck.objects.create(service=due, checked_at=now - timedelta(days=6), ok=True)
    assert monitor.prune_history() == 1
    assert HealthCheck.objects.filter(service=due).count() == 1


def test_overall_status_and_worst_first_order():
    assert monitor.overall_status([]) == "unknown"
    assert monitor.overall_status([("up", True), ("maintenance", True)]) == "up"
    assert monitor.overall_status([("up", True), ("down", False)]) == "degraded"
    assert monitor.overall_status([("down", True), ("up", False)]) == "down"
    now = timezone.now()
    up = make_service(name="t-a-up", status="up", last_checked_at=now)
    down = make_service(name="t-z-down", status="down", last_checked_at=now)
    assert monitor.sort_worst_first([up, down])[0] == down


# --- Bridge's own services -------------------------------------------------------------------


def test_builtin_services_are_registered_once_without_credentials(settings):
    settings.REDIS_URL = "redis://:s3cret-pw@127.0.0.1:6379/2"
    settings.CELERY_BROKER_URL = "amqp://guest:amqp-pw@127.0.0.1:5672//"
    monitor.ensure_builtin_services()
    monitor.ensure_builtin_services()
    builtins = {s.name: s for s in Service.objects.filter(builtin=True)}
    assert {"bridge-broker", "bridge-redis", "bridge-workers"} <= set(builtins)
    assert builtins["bridge-redis"].target == "127.0.0.1:6379/2"
    assert builtins["bridge-broker"].kind == "rabbitmq"
    assert builtins["bridge-broker"].target == "127.0.0.1:5672"
    for service in builtins.values():
        assert "pw" not in service.target and "@" not in service.target
    workers = builtins["bridge-workers"]
    assert list(workers.depends_on.values_list("name", flat=True)) == ["bridge-broker"]
    if connection.vendor == "postgresql":
        assert builtins["bridge-database"].kind == "postgres"
    # settings without Redis: its registration goes
    settings.REDIS_URL = ""
    monitor.ensure_builtin_services()
    assert not Service.objects.filter(name="bridge-redis").exists()


@pytest.mark.django_db(transaction=True)
def test_the_beat_task_registers_and_checks_bridges_own_services(settings):
    from recovery.tasks import run_health_checks_task

    settings.CELERY_BROKER_URL = "filesystem://"
    settings.REDIS_URL = ""
    checked = run_health_checks_task()
    assert checked >= 1
    workers = Service.objects.get(name="bridge-workers")
    assert workers.last_checked_at is not None


# --- Concurrency ------------------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_concurrent_results_for_one_service_make_exactly_one_transition(postgres, settings):
    # given a service that is up, and a rule that one failure takes it down
    settings.HEALTH_FAILURES_TO_DOWN = 1
    service = make_service(status=HealthStatus.UP, last_checked_at=timezone.now())
    barrier = threading.Barrier(8)
    failure = monitor.ProbeResult(False, 5.0, "HTTP 500 (expected 2xx)")
    errors = []

    def apply() -> None:
        try:
            barrier.wait()
            monitor.apply_result(service.pk, failure)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    # when eight workers apply a failed result at the same moment
    threads = [threading.Thread(target=apply) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # then one of them made the change, and every result counted
    assert errors == []
    service.refresh_from_db()
    assert service.status == "down"
    assert service.consecutive_failures == 8
    assert statuses(service) == [("up", "down")]
    assert HealthCheck.objects.filter(service=service).count() == 8


@pytest.mark.django_db(transaction=True)
def test_due_checks_run_concurrently_each_within_its_timeout(hung_port, settings):
    # given three hung services with a one-second timeout each
    for _ in range(3):
        make_service(target=f"http://127.0.0.1:{hung_port}/", timeout_ms=1000)
    # when the beat's run checks them
    started = time.monotonic()
    checked = monitor.run_due_checks()
    elapsed = time.monotonic() - started
    # then together in about one timeout, not three
    assert checked == 3
    assert elapsed < 2.5, elapsed
    assert HealthCheck.objects.filter(ok=False).count() == 3
