"""GET /api/security/status, POST /api/security/test and POST /api/security/reset: live
figures, real self-checks that fail when what they check is broken, and a reset for superusers."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.utils import timezone

from compliance.audit import record_event
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import crypto, ratelimit
from security.models import DataKey, IPActivity, IPBan, ThreatEvent
from tests.conftest import client_for, on_postgres

pytestmark = pytest.mark.django_db

STATUS, TEST, RESET = "/api/security/status", "/api/security/test", "/api/security/reset"


def test_status_reports_the_live_posture(security_officer):
    crypto.encrypt(b"x", purpose="stored_secret")
    IPBan.objects.create(
        network="203.0.113.0",
        reason="test",
        started_at=timezone.now(),
        ends_at=timezone.now() + timedelta(minutes=5),
    )
    record_event(action=AuditAction.TOKEN_REUSE_DETECTED, details={"family": "f"})
    response = client_for(security_officer).get(STATUS)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["jwt"]["rotation"] is True and body["jwt"]["access_seconds"] > 0
    assert body["tls"]["minimum_version"] in ("TLSv1.3", "TLSv1.2")
    assert body["rate_limiting"]["store"]["ok"] is True
    keys = body["keys"]
    assert keys["master_key_id"] == crypto.master_key()[0]
    purposes = {item["purpose"]: item for item in keys["data_keys"]}
    assert purposes["stored_secret"]["version"] == 1 and purposes["stored_secret"]["age_days"] == 0
    assert body["active_bans"] == 1 and body["last_hour"]["bans"] == 1
    assert body["last_day"]["token_reuse"] == 1
    # development settings: the deploy checks have findings, and they are listed
    assert any(item["id"].startswith("security.") for item in body["deploy_checks"])


def test_status_and_self_test_need_the_security_role(compliance_api, anon_api):
    assert anon_api.get(STATUS).status_code == 401
    assert compliance_api.get(STATUS).status_code == 403
    assert compliance_api.post(TEST).status_code == 403


# Committed rows: the limiter check hits the store from eight threads at once.
@pytest.mark.django_db(transaction=True)
def test_the_self_test_runs_real_checks_and_fails_the_one_that_is_broken(security_officer):
    api = client_for(security_officer)
    body = api.post(TEST).json()
    results = {item["name"]: item for item in body["checks"]}
    for name in (
        "encryption_round_trip",
        "tampered_ciphertext_refused",
        "limiter_atomic",
        "token_blacklist",
        "audit_signing_key",
    ):
        assert results[name]["ok"], results[name]
    assert "10 of 40" in results["limiter_atomic"]["detail"]
    # development settings are not deployable: that check says so
    assert results["deploy_checks"]["ok"] is False and body["ok"] is False

    # a data key altered in the database makes the round trip fail, naming the key
    crypto.forget_keys()
    row = DataKey.objects.filter(purpose="self_test").get()
    DataKey.objects.filter(pk=row.pk).update(wrapped=row.wrapped[:-4] + "AAA=")
    broken = {item["name"]: item for item in api.post(TEST).json()["checks"]}
    assert broken["encryption_round_trip"]["ok"] is False
    assert "does not unwrap" in broken["encryption_round_trip"]["detail"]
    event = AuditEvent.objects.filter(action=AuditAction.SECURITY_SELF_TEST).order_by("id").last()
    assert "encryption_round_trip" in json.loads(event.details)["failed"]


def test_reset_is_for_superusers_and_clears_bans_counters_and_lockouts(
    security_officer, admin_user, settings
):
    now = timezone.now()
    IPBan.objects.create(
        network="198.51.100.0", reason="t", started_at=now, ends_at=now + timedelta(hours=1)
    )
    AccessAttempt.objects.create(
        username="victim",
        ip_address="198.51.100.7",
        user_agent="x",
        failures_since_start=9,
        attempt_time=now,
    )
    activity = IPActivity.objects.create(
        network="198.51.100.0", first_seen=now, last_seen=now, score=80.0, scored_at=now
    )
    ThreatEvent.objects.create(
        occurred_at=now,
        layer="application",
        kind="sql_injection",
        score=20,
        network=activity.network,
    )
    rate = ratelimit.Rate(1, 60)
    assert ratelimit.hit("ip:read:198.51.100.0", rate).allowed
    assert not ratelimit.hit("ip:read:198.51.100.0", rate).allowed

    refused = client_for(security_officer).post(RESET)
    assert refused.status_code == 403 and "superuser" in refused.json()["detail"]
    assert IPBan.objects.filter(lifted_at__isnull=True).count() == 1

    done = client_for(admin_user).post(RESET)
    assert done.status_code == 200, done.content
    assert done.json() == {"bans_lifted": 1, "lockouts_cleared": 1, "scores_cleared": 1}
    assert IPActivity.objects.get().score == 0.0 and ThreatEvent.objects.count() == 1
    assert not IPBan.objects.filter(lifted_at__isnull=True).exists()
    assert not AccessAttempt.objects.exists()
    assert ratelimit.hit("ip:read:198.51.100.0", rate).allowed  # counters forgotten
    assert AuditEvent.objects.filter(action=AuditAction.SECURITY_RESET).count() == 1


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_the_limiter_self_check_holds_on_the_real_store(security_officer, settings):
    from tests.conftest import need

    need(on_postgres(), "needs PostgreSQL for parallel database hits")
    body = client_for(security_officer).post(TEST).json()
    limiter = next(item for item in body["checks"] if item["name"] == "limiter_atomic")
    assert limiter["ok"], limiter
