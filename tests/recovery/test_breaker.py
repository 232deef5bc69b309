"""Circuit breakers: rate-based opening over a window with a minimum of calls, growing open time,
half-open permits shared across threads and processes, manual states, no lock during a call;
on Redis and on the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection

from compliance.audit import AuditContext
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from compliance.personal import revealed
from recovery import breaker
from recovery.models import BreakerState, Service
from tests.conftest import client_for, need, on_postgres, process_env

REDIS_URL = os.environ.get("REDIS_URL", "")


@pytest.fixture(params=["database", "redis"])
def backend(request, settings):
    """Each test runs on both shared stores: the database (no REDIS_URL) and Redis."""
    if request.param == "redis":
        need(bool(REDIS_URL), "needs Redis (set REDIS_URL)")
        settings.REDIS_URL = REDIS_URL
    else:
        settings.REDIS_URL = ""
    settings.BREAKER_WINDOW = timedelta(seconds=30)
    settings.BREAKER_MIN_CALLS = 5
    settings.BREAKER_FAILURE_RATE = 0.5
    settings.BREAKER_SLOW_RATE = 0.8
    settings.BREAKER_SLOW_CALL_MS = 100
    settings.BREAKER_OPEN_BASE = timedelta(milliseconds=300)
    settings.BREAKER_OPEN_MAX = timedelta(seconds=60)
    settings.BREAKER_HALF_OPEN_PERMITS = 1
    breaker._clear_registry()
    yield request.param
    breaker._clear_registry()


@pytest.fixture
def name() -> str:
    # Unique per test: test runs share one Redis.
    return f"t-{uuid.uuid4().hex[:10]}"


def _fail() -> None:
    raise ConnectionError("down")


def _calls(b: breaker.CircuitBreaker, ok: int = 0, failed: int = 0, duration: float = 0.0):
    for outcome in [True] * ok + [False] * failed:
        b.record(b.allow(), ok=outcome, duration=duration)


def _wait_until_half_open(b: breaker.CircuitBreaker) -> None:
    until = b.snapshot()["open_until"].timestamp()
    time.sleep(max(0.0, until - time.time()) + 0.02)


@pytest.mark.django_db(transaction=True)
def test_a_closed_breaker_passes_calls_and_returns_their_result(backend, name):
    assert breaker.get(name).call(lambda x: x * 2, 21) == 42
    assert breaker.get(name).snapshot()["state"] == "closed"


@pytest.mark.django_db(transaction=True)
def test_it_opens_on_the_failure_rate_but_not_below_the_minimum_of_calls(backend, name):
    b = breaker.get(name)
    # given four failures: a 100% failure rate, but fewer calls than BREAKER_MIN_CALLS
    _calls(b, failed=4)
    assert b.snapshot()["state"] == "closed"
    # when a fifth call fails
    _calls(b, failed=1)
    # then it is open, says why, and refuses calls without running them
    snap = b.snapshot()
    assert snap["state"] == "open"
    assert snap["trips"] == 1
    assert "failure rate 5/5" in snap["last_reason"]
    ran = []
    with pytest.raises(breaker.BreakerOpen) as refused:
        b.call(lambda: ran.append(1))
    assert ran == []
    assert 0 < refused.value.retry_after <= 0.3


@pytest.mark.django_db(transaction=True)
def test_a_failure_rate_under_the_threshold_keeps_it_closed(backend, name):
    b = breaker.get(name)
    _calls(b, ok=6, failed=5)  # 5/11 < 0.5
    snap = b.snapshot()
    assert snap["state"] == "closed"
    assert snap["calls"] == 11
    assert snap["failure_rate"] == pytest.approx(5 / 11, abs=1e-3)


@pytest.mark.django_db(transaction=True)
def test_it_opens_on_the_slow_call_rate(backend, name):
    b = breaker.get(name)
    _calls(b, ok=1)
    _calls(b, ok=4, duration=0.2)  # 4/5 slow (BREAKER_SLOW_CALL_MS is 100)
    snap = b.snapshot()
    assert snap["state"] == "open"
    assert "slow-call rate 4/5" in snap["last_reason"]


@pytest.mark.django_db(transaction=True)
def test_a_successful_trial_closes_it_and_a_failed_one_doubles_the_open_time(backend, name):
    b = breaker.get(name)
    _calls(b, failed=5)
    first = b.snapshot()
    assert first["state"] == "open"
    _wait_until_half_open(b)
    assert b.snapshot()["state"] == "half_open"
    # when the trial fails, it opens again for twice as long
    with pytest.raises(ConnectionError):
        b.call(_fail)
    second = b.snapshot()
    assert second["state"] == "open"
    assert second["trips"] == 2
    left = second["open_until"].timestamp() - time.time()
    assert 0.4 < left <= 0.6  # 2 x 300 ms
    # and when the next trial succeeds, it is closed with its trips forgotten
    _wait_until_half_open(b)
    assert b.call(lambda: "ok") == "ok"
    third = b.snapshot()
    assert third["state"] == "closed"
    assert third["trips"] == 0


@pytest.mark.django_db(transaction=True)
def test_half_open_lets_exactly_the_permitted_number_of_trials_through(backend, name, settings):
    if backend == "database":
        need(on_postgres(), "row locks across threads need PostgreSQL")
    settings.BREAKER_HALF_OPEN_PERMITS = 2
    b = breaker.get(name)
    _calls(b, failed=5)
    _wait_until_half_open(b)
    started = []
    barrier = threading.Barrier(8)

    def trial() -> str:
        barrier.wait()
        try:
            return breaker.get(name).call(lambda: started.append(1) or time.sleep(0.3) or "ran")
        except breaker.BreakerOpen:
            return "refused"
        finally:
            connection.close()  # this thread's own connection, or the test DB stays in use

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: trial(), range(8)))
    assert outcomes.count("ran") == 2
    assert outcomes.count("refused") == 6
    assert len(started) == 2
    assert b.snapshot()["state"] == "closed"


@pytest.mark.django_db(transaction=True)
def test_no_lock_is_held_during_the_call(backend, name):
    # pybreaker holds its lock for the whole call: 8 x 50 ms would take 400 ms.
    b = breaker.get(name)
    b.call(lambda: None)  # the first sync
    barrier = threading.Barrier(8)

    def slow() -> None:
        barrier.wait()
        try:
            b.call(time.sleep, 0.05)
        finally:
            connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: slow(), range(8)))
    assert time.perf_counter() - started < 0.2


@pytest.mark.django_db(transaction=True)
def test_trip_opens_it_at_once_and_reset_closes_it_audited(backend, name):
    b = breaker.get(name)
    breaker.trip(name, reason="service down")
    with pytest.raises(breaker.BreakerOpen):
        b.allow()
    snap = b.snapshot()
    assert (snap["state"], snap["last_reason"]) == ("open", "service down")
    assert BreakerState.objects.get(name=name).state == "open"
    # when reset by hand
    snap = breaker.reset(name, context=AuditContext(actor_username="ops"))
    assert snap["state"] == "closed"
    assert b.call(lambda: 1) == 1
    event = AuditEvent.objects.get(action=AuditAction.BREAKER_RESET, object_id=name)
    assert json.loads(event.details) == {"from": "open", "to": "closed"}
    assert revealed(event).actor_username == "ops"


@pytest.mark.django_db(transaction=True)
def test_forced_open_refuses_and_disabled_passes_everything(backend, name):
    b = breaker.get(name)
    breaker.force_open(name, context=AuditContext())
    with pytest.raises(breaker.BreakerOpen) as refused:
        b.call(lambda: 1)
    assert refused.value.state == "forced_open"
    assert breaker.trip(name, reason="down") is None  # a manual state wins
    assert b.snapshot()["state"] == "forced_open"
    breaker.disable(name, context=AuditContext())
    for _ in range(20):
        with pytest.raises(ConnectionError):
            b.call(_fail)
    assert b.snapshot()["state"] == "disabled"
    assert {e.action for e in AuditEvent.objects.filter(object_id=name)} == {
        AuditAction.BREAKER_FORCED_OPEN,
        AuditAction.BREAKER_DISABLED,
    }
    assert name in [s["name"] for s in breaker.snapshots()]


_OTHER_PROCESS = """
import django, sys, time
django.setup()
from recovery import breaker
b = breaker.get(sys.argv[1])
for _ in range(5):
    b.record(b.allow(), ok=False, duration=0.001)
    time.sleep(0.01)
time.sleep(0.7)  # past SYNC_INTERVAL: the failures are published by then, or at exit
"""


@pytest.mark.django_db(transaction=True)
def test_two_processes_share_one_breaker(backend, name):
    if backend == "database":
        need(on_postgres(), "another process sees the tests' database on PostgreSQL only")
    # given this process has used the breaker (its view is fresh and closed)
    b = breaker.get(name)
    assert b.call(lambda: "ok") == "ok"
    env = process_env(
        DJANGO_SETTINGS_MODULE="bridge.settings",
        REDIS_URL=REDIS_URL if backend == "redis" else "",
        BREAKER_MIN_CALLS="5",
        BREAKER_OPEN_BASE="30s",
        PYTHONPATH=os.getcwd(),
    )
    # when another process records failures
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, name], env=env, check=True, timeout=60)
    published = time.monotonic()
    # then this process refuses calls within about a second, without being told
    while True:
        try:
            b.allow()
        except breaker.BreakerOpen:
            break
        assert time.monotonic() - published < 2.0, "not open within 2 s"
        time.sleep(0.02)
    assert time.monotonic() - started < 30
    # and a reset here closes it for the other processes too
    breaker.reset(name, context=AuditContext())
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django,sys; django.setup(); from recovery import breaker; "
            "print(breaker.get(sys.argv[1]).snapshot()['state'])",
            name,
        ],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "closed"


# --- The API ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_reset_endpoint_closes_a_breaker_for_an_operator(backend, operator, name):
    breaker.trip(name, reason="down")
    api = client_for(operator)
    response = api.post(f"/api/recovery/circuit-breaker/{name}/reset")
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "closed"
    assert response.json()["name"] == name
    assert AuditEvent.objects.filter(action=AuditAction.BREAKER_RESET, object_id=name).exists()


@pytest.mark.django_db
def test_the_reset_endpoint_knows_services_without_a_breaker_yet(operator, settings):
    settings.REDIS_URL = ""
    Service.objects.create(name="web", kind="http", target="http://127.0.0.1:1/")
    response = client_for(operator).post("/api/recovery/circuit-breaker/web/reset")
    assert response.status_code == 200
    assert response.json()["state"] == "closed"


@pytest.mark.django_db
def test_the_reset_endpoint_answers_404_naming_an_unknown_service(operator, settings):
    settings.REDIS_URL = ""
    response = client_for(operator).post("/api/recovery/circuit-breaker/nowhere/reset")
    assert response.status_code == 404
    assert "nowhere" in response.json()["detail"]


@pytest.mark.django_db
def test_the_reset_endpoint_needs_the_heal_permission(security_officer, anon_api, settings):
    settings.REDIS_URL = ""
    breaker.trip("guarded", reason="down")
    assert (
        client_for(security_officer).post("/api/recovery/circuit-breaker/guarded/reset").status_code
        == 403
    )
    assert anon_api.post("/api/recovery/circuit-breaker/guarded/reset").status_code == 401
    assert breaker.get("guarded").snapshot()["state"] == "open"


@pytest.mark.django_db(transaction=True)
def test_a_breaker_opened_by_its_failure_rate_starts_the_services_self_healing(
    backend, name, monkeypatch
):
    from bridge import jobs
    from recovery.models import HealOperation, Service

    # the heal stays pending (no worker runs it): what counts is that it was started
    monkeypatch.setattr(jobs, "_enqueue", lambda job, spec: None)
    Service.objects.create(
        name=name, kind="tcp", target="127.0.0.1:9", heal_strategies=["reconnect"], status="up"
    )
    # when its callers' failures open the breaker (no monitor involved)
    b = breaker.get(name)
    _calls(b, failed=5)
    assert b.snapshot()["state"] == "open"
    # then a heal of that service starts, saying why
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if HealOperation.objects.filter(service__name=name).exists():
            break
        time.sleep(0.05)
    operation = HealOperation.objects.get(service__name=name)
    assert (operation.trigger, operation.outcome) == ("breaker_open", "pending")


@pytest.mark.django_db(transaction=True)
def test_a_breaker_of_no_service_opens_without_healing_anything(backend, name, settings):
    from recovery.models import HealOperation

    b = breaker.get(name)
    _calls(b, failed=5)
    assert b.snapshot()["state"] == "open"
    time.sleep(0.3)
    assert not HealOperation.objects.exists()
