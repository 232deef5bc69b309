"""Liveness and readiness probes: unauthenticated, never audited, never leaking the broker URL."""

from __future__ import annotations

import pytest
from django.db import OperationalError
from django.test import override_settings

from compliance.models import AuditEvent
from recovery import health
from tests.conftest import need

LIVE = "/health/live"
READY = "/health/ready"
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"
BROKER_PASSWORD = "s3cret-broker-pw"


@pytest.mark.django_db
def test_live_probe_answers_ok_without_authentication(anon_api):
    response = anon_api.get(LIVE)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
def test_ready_probe_reports_database_and_broker_ok_when_both_are_up(anon_api):
    response = anon_api.get(READY)
    assert response.status_code == 200, response.content
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "broker": "ok", "cache": "ok"},
    }


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
def test_ready_probe_names_an_unreachable_broker_without_revealing_its_url(anon_api, broker_url):
    # given a broker nobody listens on
    with override_settings(CELERY_BROKER_URL=broker_url, CELERY_BROKER_TRANSPORT_OPTIONS={}):
        # when
        response = anon_api.get(READY)
    # then
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failing"] == ["broker"]
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"] != "ok"
    raw = response.content.decode()
    assert broker_url not in raw
    assert BROKER_PASSWORD not in raw


class _BrokenConnection:
    """Stands in for django.db.connection when the database cannot be reached."""

    def cursor(self):
        raise OperationalError('connection to server at "db.internal" failed: timeout expired')


@pytest.mark.django_db
def test_ready_probe_names_a_failing_database(anon_api, monkeypatch):
    # given (a real outage is impractical mid-test: the probe's connection is replaced)
    monkeypatch.setattr(health, "connection", _BrokenConnection())
    # when
    response = anon_api.get(READY)
    # then
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["database"]
    assert body["checks"]["database"].startswith("OperationalError: ")
    assert body["checks"]["broker"] == "ok"


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


REDIS_PASSWORD = "s3cret-redis-pw"


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
    assert body["checks"]["cache"].startswith("ConnectionError")
    assert REDIS_PASSWORD not in response.content.decode()


def test_with_redis_url_the_shared_cache_is_redis():
    from django.conf import settings
    from django.core.cache import cache

    need(bool(settings.REDIS_URL), "needs Redis (set REDIS_URL)")
    import redis

    # given a value stored through Django's cache
    cache.set("bridge-test-shared", "seen-by-every-process", timeout=30)
    # then it is in Redis, where every gunicorn and Celery process on every host reads it
    keys = redis.Redis.from_url(settings.REDIS_URL).keys("*bridge-test-shared*")
    assert len(keys) == 1
    assert cache.get("bridge-test-shared") == "seen-by-every-process"
    cache.delete("bridge-test-shared")
