"""Liveness and readiness probes: unauthenticated, never audited, answering in time whatever
hangs, naming what fails without hosts, ports or credentials."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.conf import settings as dj_settings
from django.core.cache import cache
from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from compliance import audit, chain
from compliance.models import AuditChainHead, AuditEvent
from recovery import health
from tests.conftest import bypass_triggers, need

LIVE = "/health/live"
READY = "/health/ready"
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"
BROKER_PASSWORD = "s3cret-broker-pw"
REDIS_PASSWORD = "s3cret-redis-pw"
CRITICAL = ["database", "cache", "broker"]
BACKGROUND = ["worker", "beat", "audit", "verification", "checkpoints"]


@pytest.fixture(autouse=True)
def fresh_heartbeats() -> Iterator[None]:
    """No heartbeat left by another test (or a running Bridge sharing the cache folder), and
    no check thread left running into the next test, which would find it still in flight."""
    keys = [health.HEARTBEAT_KEY.format(role) for role in ("worker", "beat")]
    cache.delete_many(keys)
    health._last_heartbeat.clear()
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("ready-"):
            thread.join(timeout=10)
    cache.delete_many(keys)
    health._last_heartbeat.clear()


@pytest.fixture
def beating() -> None:
    """Worker and beat alive, as their signal handlers report it."""
    health.record_heartbeat("worker")
    health.record_heartbeat("beat")


@pytest.mark.django_db
def test_live_probe_answers_ok_without_authentication(anon_api):
    response = anon_api.get(LIVE)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
def test_ready_probe_is_ok_when_everything_answers_and_worker_and_beat_are_alive(anon_api, beating):
    response = anon_api.get(READY)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert (body["failing"], body["degraded"]) == ([], [])
    assert list(body["checks"]) == CRITICAL + BACKGROUND
    for name, check in body["checks"].items():
        assert check["name"] == name
        assert (check["ok"], check["state"]) == (True, "ok")
        assert check["critical"] is (name in CRITICAL)
    assert body["checks"]["worker"]["detail"].startswith("last heartbeat")


@pytest.mark.django_db
def test_without_worker_and_beat_ready_stays_200_but_degraded_naming_them(anon_api):
    response = anon_api.get(READY)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["degraded"] == ["worker", "beat"]
    assert body["failing"] == []
    assert body["checks"]["worker"] == {
        "name": "worker",
        "ok": False,
        "state": "degraded",
        "detail": "no heartbeat yet",
        "critical": False,
    }


@pytest.mark.django_db
@override_settings(HEALTH_HEARTBEAT_MAX_AGE=timedelta(seconds=30))
def test_a_worker_silent_for_longer_than_the_limit_is_reported_with_its_age(anon_api, beating):
    # given a worker whose last heartbeat is 90 s old
    cache.set(health.HEARTBEAT_KEY.format("worker"), time.time() - 90, timeout=600)
    # when
    body = anon_api.get(READY).json()
    # then
    assert body["degraded"] == ["worker"]
    assert body["checks"]["worker"]["detail"] == "last heartbeat 90 s ago (limit 30 s)"


@pytest.mark.django_db
def test_probes_refuse_writes(anon_api):
    assert anon_api.post(LIVE).status_code == 405
    assert anon_api.post(READY).status_code == 405


@pytest.mark.django_db
@pytest.mark.parametrize(
    "broker_url",
    [UNREACHABLE_BROKER, f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/0"],
    ids=["plain", "with-password"],
)
def test_ready_probe_names_an_unreachable_broker_without_revealing_its_url(
    anon_api, beating, broker_url
):
    # given a broker nobody listens on
    with override_settings(CELERY_BROKER_URL=broker_url, CELERY_BROKER_TRANSPORT_OPTIONS={}):
        # when
        response = anon_api.get(READY)
    # then
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failing"] == ["broker"]
    assert body["checks"]["broker"]["state"] == "down"
    assert body["checks"]["database"]["ok"] is True
    raw = response.content.decode()
    assert broker_url not in raw
    assert BROKER_PASSWORD not in raw
    assert "127.0.0.1" not in raw
    assert ":1/" not in raw


class _BrokenConnection:
    """Stands in for django.db.connection when the database cannot be reached."""

    def cursor(self):
        raise OperationalError(
            'connection to server at "db.internal" (10.0.0.7), port 5432 failed: timeout expired'
        )

    def close(self) -> None:
        pass


@pytest.mark.django_db
def test_ready_probe_names_a_failing_database_without_its_address(anon_api, monkeypatch):
    # given (the probe's connection is replaced; tests/test_runtime.py hangs a real one)
    monkeypatch.setattr(health, "connection", _BrokenConnection())
    # when
    response = anon_api.get(READY)
    # then
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["database"]
    detail = body["checks"]["database"]["detail"]
    assert detail.startswith("OperationalError: connection to server at ")
    assert detail.endswith("failed: timeout expired")
    for leak in ("db.internal", "10.0.0.7", "5432"):
        assert leak not in response.content.decode()
    assert body["checks"]["broker"]["ok"] is True


@pytest.mark.django_db
def test_ready_answers_within_two_seconds_when_broker_and_cache_hang(anon_api, beating, hung_port):
    # given a broker and a cache that accept connections and never answer
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{hung_port}/0"
    caches = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "OPTIONS": {"socket_connect_timeout": 30, "socket_timeout": 30},
        }
    }
    with override_settings(
        CELERY_BROKER_URL=url, CELERY_BROKER_TRANSPORT_OPTIONS={}, REDIS_URL=url, CACHES=caches
    ):
        # when asked twice (the second time the first checks are still hanging)
        timings, bodies = [], []
        for _ in range(2):
            started = time.monotonic()
            response = anon_api.get(READY)
            timings.append(time.monotonic() - started)
            assert response.status_code == 503
            bodies.append(response.json())
    # then each answer came within the budget, naming both, without the URL
    assert max(timings) < 2.0, timings
    first, second = bodies
    assert first["failing"] == ["cache", "broker"]
    assert first["checks"]["cache"]["detail"] == f"timed out after {health.READY_DEADLINE:g} s"
    assert first["checks"]["database"]["ok"] is True
    assert second["checks"]["cache"]["detail"].startswith("timed out")
    for body in bodies:
        assert REDIS_PASSWORD not in str(body)
        assert str(hung_port) not in str(body)


@pytest.mark.django_db
def test_ready_probe_names_an_unreachable_cache_without_revealing_its_url(anon_api):
    # given REDIS_URL pointing where nobody listens
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"
    caches = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    }
    with override_settings(REDIS_URL=url, CACHES=caches):
        # when
        response = anon_api.get(READY)
    # then
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["cache"]
    assert body["checks"]["cache"]["detail"].startswith("ConnectionError")
    # and worker and beat, whose heartbeats live in that cache, cannot be confirmed either
    assert body["degraded"] == ["worker", "beat"]
    assert REDIS_PASSWORD not in response.content.decode()


@pytest.mark.django_db(transaction=True)
@override_settings(AUDIT_SEAL_MAX_LAG=timedelta(seconds=60), AUDIT_SEAL_INTERVAL=1)
def test_an_event_waiting_for_its_seal_too_long_degrades_readiness(anon_api, beating):
    # given an event recorded 90 s ago that the sealer never linked
    head = AuditChainHead.objects.filter(pk=1).first()
    event = AuditEvent.objects.create(
        occurred_at=timezone.now() - timedelta(seconds=90), action="custom.stuck"
    )
    assert head is None or (head.last_event_id or 0) < event.id
    # when
    response = anon_api.get(READY)
    # then
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["degraded"]) == ("degraded", ["audit"])
    assert body["checks"]["audit"]["detail"].startswith("oldest unsealed event is 90 s old")


@pytest.mark.django_db(transaction=True)
def test_recent_unsealed_events_keep_the_audit_check_ok(anon_api, beating):
    AuditEvent.objects.create(occurred_at=timezone.now(), action="custom.fresh")
    body = anon_api.get(READY).json()
    assert body["checks"]["audit"]["ok"] is True
    assert body["checks"]["audit"]["detail"].startswith("oldest unsealed event is")


@override_settings(AUDIT_SEAL_MAX_LAG=timedelta(seconds=60), AUDIT_SEAL_INTERVAL=300)
def test_the_seal_lag_limit_is_never_shorter_than_three_seal_intervals():
    assert chain.seal_lag_limit() == timedelta(seconds=900)


@pytest.mark.django_db
def test_health_probes_are_not_audited(anon_api):
    # given
    before = AuditEvent.objects.count()
    # when
    anon_api.get(LIVE)
    anon_api.get(READY)
    with override_settings(
        CELERY_BROKER_URL=UNREACHABLE_BROKER, CELERY_BROKER_TRANSPORT_OPTIONS={}
    ):
        anon_api.get(READY)
    # then
    assert AuditEvent.objects.count() == before == 0


# --- Heartbeats ---------------------------------------------------------------------------


def test_beat_records_its_heartbeat_on_every_tick_of_its_scheduler():
    # given beat's start signal received by the handler CELERY_IMPORTS loads
    ticks = []
    scheduler = SimpleNamespace(tick=lambda: ticks.append(1) or 5.0)
    health._beat_started(sender=SimpleNamespace(scheduler=scheduler))
    cache.delete(health.HEARTBEAT_KEY.format("beat"))
    health._last_heartbeat.clear()
    # when the beat loop ticks
    interval = scheduler.tick()
    # then the scheduler still ran and answered, and the heartbeat is fresh
    assert (ticks, interval) == ([1], 5.0)
    assert health.heartbeat_age("beat") < 5


def test_the_worker_records_its_heartbeat_when_ready_and_on_each_event_heartbeat():
    from celery.signals import heartbeat_sent, worker_ready

    worker_ready.send(sender=None)
    assert health.heartbeat_age("worker") < 5
    cache.delete(health.HEARTBEAT_KEY.format("worker"))
    health._last_heartbeat.clear()
    heartbeat_sent.send(sender=None)
    assert health.heartbeat_age("worker") < 5


def test_a_cache_outage_never_stops_the_process_recording_its_heartbeat(caplog):
    url = "redis://127.0.0.1:1/0"
    caches = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    }
    with override_settings(CACHES=caches):
        health.record_heartbeat("worker")
        health.record_heartbeat("worker")
    # one warning for the outage, not one per beat
    assert [r.message for r in caplog.records].count(
        "cannot record the worker heartbeat: ConnectionError: Error 111 connecting to <host>. "
        "Connection refused."
    ) == 1


# --- Reasons without addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'connection to server at "db.internal" (10.1.2.3), port 5432 failed: '
            "Connection refused\n\tIs the server running on that host?",
            'connection to server at "…" (<host>), port <n> failed: Connection refused',
        ),
        (
            'could not translate host name "db" to address: Name or service not known',
            'could not translate host name "…" to address: Name or service not known',
        ),
        (
            'FATAL:  password authentication failed for user "bridge"',
            'FATAL:  password authentication failed for user "…"',
        ),
        (
            "Error 111 connecting to 127.0.0.1:6379. Connection refused.",
            "Error 111 connecting to <host>. Connection refused.",
        ),
        (
            "Error -2 connecting to redis.internal:6379. Name or service not known.",
            "Error -2 connecting to <host>. Name or service not known.",
        ),
        ("failed to reach amqp://bridge:pw@mq:5672//", "failed to reach <url>"),
        ("[Errno 111] Connection refused", "[Errno 111] Connection refused"),
        ("connect to [::1]:5432 failed", "connect to <host> failed"),
    ],
    ids=[
        "psycopg2-refused",
        "psycopg2-dns",
        "psycopg2-auth",
        "redis",
        "redis-dns",
        "url",
        "plain",
        "ipv6",
    ],
)
def test_failure_reasons_keep_the_cause_and_drop_hosts_ports_and_credentials(message, expected):
    assert health._reason(OperationalError(message)) == f"OperationalError: {expected}"


def test_with_redis_url_the_shared_cache_is_redis():
    from django.conf import settings

    need(bool(settings.REDIS_URL), "needs Redis (set REDIS_URL)")
    import redis

    # given a value stored through Django's cache
    cache.set("bridge-test-shared", "seen-by-every-process", timeout=30)
    # then it is in Redis, where every gunicorn and Celery process on every host reads it
    keys = redis.Redis.from_url(settings.REDIS_URL).keys("*bridge-test-shared*")
    assert len(keys) == 1
    assert cache.get("bridge-test-shared") == "seen-by-every-process"
    cache.delete("bridge-test-shared")


@pytest.mark.django_db(transaction=True)
def test_a_fresh_install_without_a_verification_yet_is_not_degraded(anon_api, beating):
    audit.record_event(action="custom.first")
    check = anon_api.get(READY).json()["checks"]["verification"]
    assert (check["ok"], check["detail"]) == (True, "no verification yet (the first one is due)")


@pytest.mark.django_db(transaction=True)
def test_a_trail_never_verified_for_two_intervals_degrades_readiness(anon_api, beating, settings):
    # given events older than two verification intervals and no verification at all
    event = audit.record_event(action="custom.old")
    old = timezone.now() - timedelta(seconds=2 * settings.AUDIT_VERIFY_INTERVAL + 60)
    bypass_triggers("UPDATE compliance_auditevent SET occurred_at = %s WHERE id = %s", [old, event])
    # then
    body = anon_api.get(READY).json()
    assert response_ok(body) and "verification" in body["degraded"]
    assert body["checks"]["verification"]["detail"] == "no verification has finished yet"


@pytest.mark.django_db(transaction=True)
def test_the_last_verification_age_and_outcome_show_in_readiness(anon_api, beating, verify):
    # given an intact, fresh verification
    verify()
    check = anon_api.get(READY).json()["checks"]["verification"]
    assert check["ok"] is True and check["detail"].startswith("intact, verified ")
    # when it grows older than two intervals
    from compliance.models import AuditVerification

    run = AuditVerification.objects.get()
    stale = timezone.now() - timedelta(seconds=2 * dj_settings.AUDIT_VERIFY_INTERVAL + 5)
    AuditVerification.objects.filter(pk=run.pk).update(finished_at=stale)
    # then readiness is degraded, naming it
    body = anon_api.get(READY).json()
    assert body["status"] == "degraded" and "verification" in body["degraded"]
    assert body["checks"]["verification"]["detail"].startswith("last verification ")


@pytest.mark.django_db(transaction=True)
def test_a_broken_chain_degrades_readiness_naming_the_event(anon_api, beating, verify):
    audit.record_event(action="custom.victim")
    chain.seal_all_pending()
    victim = AuditEvent.objects.get(action="custom.victim")
    bypass_triggers(
        "UPDATE compliance_auditevent SET action = 'custom.x' WHERE id = %s", [victim.pk]
    )
    assert verify()["ok"] is False
    body = anon_api.get(READY).json()
    assert body["checks"]["verification"] == {
        "name": "verification",
        "ok": False,
        "state": "degraded",
        "detail": body["checks"]["verification"]["detail"],
        "critical": False,
    }
    assert body["checks"]["verification"]["detail"].startswith(f"CHAIN BROKEN at event {victim.pk}")


def response_ok(body: dict) -> bool:
    return body["status"] in ("ok", "degraded") and body["failing"] == []


@pytest.mark.django_db(transaction=True)
def test_probes_arriving_together_share_each_check_and_all_answer_ok(beating):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from django.db import connections
    from rest_framework.test import APIClient

    # given six probes released at the same instant (load balancer nodes, the dashboard)
    gate = Barrier(6)

    def probe(_: int) -> int:
        gate.wait()
        try:
            return APIClient().get(READY).status_code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(probe, range(6)))
    # then none of them reports a healthy dependency as timed out
    assert statuses == [200] * 6


@pytest.mark.django_db(transaction=True)
@override_settings(AUDIT_SEAL_MAX_LAG=timedelta(seconds=30), AUDIT_SEAL_INTERVAL=1)
def test_a_sealing_lag_is_recorded_once_per_episode_however_many_probes_see_it(anon_api, beating):
    def stuck(seconds: int) -> AuditEvent:
        return AuditEvent.objects.create(
            occurred_at=timezone.now() - timedelta(seconds=seconds), action="custom.stuck"
        )

    def lag_events() -> int:
        return AuditEvent.objects.filter(action="audit.seal_lag").count()

    # given an event the sealer has not linked for 45 s (the limit is 30)
    stuck(45)
    # when three probes look
    for _ in range(3):
        body = anon_api.get(READY).json()
        assert "audit" in body["degraded"]
    # then the lag is recorded once, with its figures
    assert lag_events() == 1
    event = AuditEvent.objects.get(action="audit.seal_lag")
    assert event.details_data["limit_seconds"] == 30.0
    assert event.details_data["oldest_unsealed_seconds"] >= 45
    # when the sealer catches up, the episode ends; a new lag is a new episode
    chain.seal_all_pending()
    assert AuditChainHead.objects.get(pk=1).lag_reported_at is None
    assert anon_api.get(READY).json()["checks"]["audit"]["ok"] is True
    stuck(40)
    anon_api.get(READY)
    assert lag_events() == 2
