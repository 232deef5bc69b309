"""Each probe against a real server: PostgreSQL, Redis, RabbitMQ, Celery workers, an HTTP
server and TCP ports run here; and against closed and hung ports, down within the timeout."""

from __future__ import annotations

import socket
import time

import pytest

from recovery import monitor, probes
from recovery.models import HealthCheck
from security.models import StoredSecret
from tests.conftest import free_port, need
from tests.recovery.probe_servers import make_service, scripted_http_server

pytestmark = pytest.mark.django_db


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _no_healing(settings) -> None:
    settings.ENABLE_SELF_HEALING = False


# --- TCP and HTTP --------------------------------------------------------------------------


def test_a_tcp_service_that_accepts_connections_passes_with_its_latency():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        service = make_service(kind="tcp", target=f"127.0.0.1:{listener.getsockname()[1]}")
        check = monitor.check_now(service)
    finally:
        listener.close()
    assert check.ok, check.detail
    assert check.detail == "accepts connections"
    assert check.latency_ms is not None and check.latency_ms < 1000
    assert service.status == "up"


def test_a_closed_port_fails_at_once():
    service = make_service(kind="tcp", target=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    check = monitor.check_now(service)
    assert not check.ok
    assert "refused" in check.detail.lower()
    assert time.monotonic() - started < 1


def test_an_http_service_passes_on_2xx_and_the_expected_body():
    with scripted_http_server() as peer:
        service = make_service(target=f"{peer.url}/health", expect_body="all good")
        assert monitor.check_now(service).ok
        peer.body = b"on fire"
        check = monitor.check_now(service)
    assert not check.ok
    assert "body lacks the expected text" in check.detail


def test_an_http_service_fails_on_an_unexpected_status_and_passes_on_the_expected_one():
    with scripted_http_server() as peer:
        peer.status = 503
        service = make_service(target=peer.url)
        check = monitor.check_now(service)
        assert not check.ok
        assert check.detail == "HTTP 503 (expected 2xx)"
        service.expect_status = 503
        service.save()
        assert monitor.check_now(service).ok


@pytest.mark.parametrize("kind", ["http", "redis", "postgres", "rabbitmq"])
def test_a_hung_target_is_down_within_its_timeout(hung_port, kind):
    # given a server that accepts connections and never answers, and a 700 ms timeout
    target = f"http://127.0.0.1:{hung_port}/" if kind == "http" else f"127.0.0.1:{hung_port}"
    service = make_service(kind=kind, target=target, timeout_ms=700)
    # when
    started = time.monotonic()
    check = monitor.check_now(service)
    elapsed = time.monotonic() - started
    # then the check failed, and no later than the timeout (plus bookkeeping)
    assert not check.ok
    assert elapsed < 0.7 + 0.8, elapsed
    assert "timed out" in check.detail.lower() or "timeout" in check.detail.lower()


# --- Real PostgreSQL, Redis, RabbitMQ ------------------------------------------------------


@pytest.mark.services
def test_postgres_answers_select_1_and_says_it_is_the_primary():
    need(reachable(5432), "needs PostgreSQL on 127.0.0.1:5432")
    service = make_service(kind="postgres", target="127.0.0.1:5432/postgres")
    check = monitor.check_now(service)
    assert check.ok, check.detail
    assert check.detail == "SELECT 1 (primary)"


@pytest.mark.services
def test_redis_answers_ping():
    need(reachable(6379), "needs Redis on 127.0.0.1:6379")
    service = make_service(kind="redis", target="127.0.0.1:6379/0")
    check = monitor.check_now(service)
    assert check.ok, check.detail
    assert check.detail.startswith("PONG")


@pytest.mark.services
def test_rabbitmq_accepts_an_amqp_connection_with_the_stored_credential():
    need(reachable(5672), "needs RabbitMQ on 127.0.0.1:5672")
    secret = StoredSecret.objects.create(name="t-amqp", value="guest:guest")
    service = make_service(kind="rabbitmq", target="127.0.0.1:5672", credential=secret)
    check = monitor.check_now(service)
    assert check.ok, check.detail
    # a wrong password is refused, and the password appears nowhere in the detail
    secret.value = "guest:not-the-password"
    secret.save()
    service.refresh_from_db()
    check = monitor.check_now(service)
    assert not check.ok
    assert "not-the-password" not in check.detail


@pytest.mark.services
def test_postgres_with_a_wrong_password_fails_without_showing_it():
    need(reachable(5432), "needs PostgreSQL on 127.0.0.1:5432")
    secret = StoredSecret.objects.create(name="t-pg", value="nobody:hunter2-wrong")
    service = make_service(kind="postgres", target="127.0.0.1:5432/postgres", credential=secret)
    check = monitor.check_now(service)
    assert not check.ok
    assert "hunter2" not in check.detail


# --- Celery workers --------------------------------------------------------------------------


@pytest.mark.services
def test_the_celery_probe_is_up_with_a_worker_on_the_queue_and_down_without(worker_queue):
    # given a real worker consuming only its own queue
    service = make_service(kind="celery", target=worker_queue, timeout_ms=3000)
    # when it is probed (the worker may need a few seconds to start)
    deadline = time.monotonic() + 30
    check = monitor.check_now(service)
    while not check.ok and time.monotonic() < deadline:
        time.sleep(0.5)
        check = monitor.check_now(service)
    # then
    assert check.ok, check.detail
    assert "every queue consumed" in check.detail
    # and a queue nobody consumes is down, within its short timeout
    lonely = make_service(kind="celery", target="bridge-test-nobody-here", timeout_ms=1000)
    started = time.monotonic()
    check = monitor.check_now(lonely)
    assert not check.ok
    assert time.monotonic() - started < 2.5
    assert "nobody-here" in check.detail or "no worker answered" in check.detail


# --- Targets ---------------------------------------------------------------------------------


def test_addresses_are_parsed_with_an_optional_name():
    assert probes.parse_address("db.example.org:5432/app") == probes.Address(
        "db.example.org", 5432, "app"
    )
    assert probes.parse_address("[::1]:6379") == probes.Address("::1", 6379, "")
    for bad in ["db", "db:0", "db:65536", "db:\uff15\uff14", "user:pw@db:5432", "redis://db:6379"]:
        with pytest.raises(ValueError):
            probes.parse_address(bad)


def test_an_unparseable_target_is_a_failed_check_not_an_error():
    service = make_service(kind="tcp", target="not a target")
    check = monitor.check_now(service)
    assert not check.ok
    assert HealthCheck.objects.filter(service=service).count() == 1
