"""Refresh-token reuse grace: a client retrying a refresh whose answer it lost gets the same pair
back for JWT_REFRESH_REUSE_GRACE after the rotation; everything else stays reuse."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.state import token_backend

from compliance.models import AuditEvent
from compliance.personal import revealed
from security import services
from security.models import TokenFamily, User
from tests.conftest import login
from tests.test_settings import load_settings

REFRESH = "/api/security/auth/refresh"
SCHEMA = "/api/schema/"
GRACE = timedelta(seconds=30)


def _refresh(client: APIClient, token: str):
    return client.post(REFRESH, {"refresh": token}, format="json")


def _assert_reused(response, user: User) -> None:
    assert response.status_code == 401
    assert response.json()["code"] == "token_reused"
    family = TokenFamily.objects.get(user=user)
    assert family.revoked_reason == "reuse_detected"


@pytest.mark.django_db
@override_settings(JWT_REFRESH_REUSE_GRACE=GRACE)
def test_within_the_grace_the_rotated_token_gets_exactly_the_same_pair_that_works(operator):
    # given a session that rotated once, whose client lost the answer
    client = APIClient()
    first = login(client, "olivia")
    lost = _refresh(client, first["refresh"]).json()
    # when the client retries with the token it still holds
    retry = _refresh(client, first["refresh"])
    # then it gets the very same pair, and that pair works
    assert retry.status_code == 200
    assert retry.json() == lost
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {lost['access']}")
    assert client.get(SCHEMA, HTTP_ACCEPT="application/json").status_code == 200
    assert _refresh(APIClient(), lost["refresh"]).status_code == 200
    family = TokenFamily.objects.get(user=operator)
    assert family.revoked_at is None
    assert family.refresh_count == 2


@pytest.mark.django_db
@override_settings(JWT_REFRESH_REUSE_GRACE=GRACE)
def test_a_grace_retry_is_audited_without_any_token_material(operator):
    client = APIClient()
    first = login(client, "olivia")
    pair = _refresh(client, first["refresh"]).json()
    _refresh(client, first["refresh"])
    retried = AuditEvent.objects.get(action="auth.token.refresh_retried")
    assert revealed(retried).actor_username == "olivia"
    assert set(retried.details_data) == {"seconds_since_rotation", "refreshes"}
    assert not AuditEvent.objects.filter(action="auth.token.reuse_detected").exists()
    stored = "\n".join(AuditEvent.objects.values_list("details", flat=True))
    for token in (first["refresh"], pair["access"], pair["refresh"]):
        assert token not in stored


@pytest.mark.django_db
@pytest.mark.parametrize("grace", [None, timedelta(0)])
def test_without_a_grace_the_second_presentation_is_reuse_and_revokes_the_family(operator, grace):
    with override_settings(JWT_REFRESH_REUSE_GRACE=grace):
        client = APIClient()
        first = login(client, "olivia")
        second = _refresh(client, first["refresh"]).json()
        replay = _refresh(client, first["refresh"])
    _assert_reused(replay, operator)
    assert _refresh(client, second["refresh"]).status_code == 401


@pytest.mark.django_db
@override_settings(JWT_REFRESH_REUSE_GRACE=GRACE)
def test_after_the_grace_has_passed_the_rotated_token_is_reuse(operator, monkeypatch):
    # given a rotation
    client = APIClient()
    first = login(client, "olivia")
    _refresh(client, first["refresh"])
    # when the old token comes back one second after the window closed
    later = timezone.now() + GRACE + timedelta(seconds=1)
    monkeypatch.setattr(timezone, "now", lambda: later)
    replay = _refresh(client, first["refresh"])
    # then it is reuse
    _assert_reused(replay, operator)


@pytest.mark.django_db
@override_settings(JWT_REFRESH_REUSE_GRACE=GRACE)
def test_a_grandparent_token_within_the_grace_is_reuse(operator):
    # given two rotations in quick succession: the first successor has itself rotated
    client = APIClient()
    first = login(client, "olivia")
    second = _refresh(client, first["refresh"]).json()
    assert _refresh(client, second["refresh"]).status_code == 200
    # when the token rotated twice ago is presented, well within the grace
    replay = _refresh(client, first["refresh"])
    # then it is reuse: only the family's latest spent token may retry
    _assert_reused(replay, operator)


@pytest.mark.django_db
@override_settings(JWT_REFRESH_REUSE_GRACE=GRACE)
def test_the_pair_of_a_rolled_back_rotation_is_never_served(operator, monkeypatch):
    # given a rotation that stored its pair in the cache and then rolled back
    client = APIClient()
    first = login(client, "olivia")
    spent_jti = token_backend.decode(first["refresh"])["jti"]
    real_record_event = services.record_event

    def failing_record_event(**fields):
        if fields["action"] == "auth.token.refreshed":
            raise RuntimeError("audit insert failed")
        return real_record_event(**fields)

    monkeypatch.setattr(services, "record_event", failing_record_event)
    client.raise_request_exception = False
    assert _refresh(client, first["refresh"]).status_code == 500
    stale = services.cache.get(services._grace_key(spent_jti))
    assert stale is not None
    # and a later rotation of the same token whose own entry was lost (cache unavailable)
    monkeypatch.setattr(services, "record_event", real_record_event)
    monkeypatch.setattr(services, "_remember_successor", lambda *args: None)
    assert _refresh(client, first["refresh"]).status_code == 200
    # when the token is presented once more
    replay = _refresh(client, first["refresh"])
    # then the stale pair (never issued) is not handed out: the retry is reuse
    assert stale["refresh"] not in replay.content.decode()
    _assert_reused(replay, operator)


@pytest.mark.django_db(transaction=True)
@override_settings(JWT_REFRESH_REUSE_GRACE=GRACE)
def test_two_concurrent_refreshes_of_one_token_both_get_the_same_pair(postgres, operator):
    # given a session, and its family row locked so that both refreshes must queue on it
    first = login(APIClient(), "olivia")
    family = TokenFamily.objects.get(user=operator)
    start = threading.Barrier(3)
    replies: list = [None, None]

    def refresh_in_thread(slot: int) -> None:
        try:
            start.wait()
            replies[slot] = _refresh(APIClient(), first["refresh"])
        finally:
            connection.close()

    threads = [threading.Thread(target=refresh_in_thread, args=(n,)) for n in range(2)]
    try:
        with transaction.atomic():
            TokenFamily.objects.select_for_update().get(pk=family.pk)
            for thread in threads:
                thread.start()
            start.wait()
            _wait_until_blocked_on_locks(2)
        # when the lock is released, one rotates and the other follows it
    finally:
        for thread in threads:
            thread.join(timeout=60)
    # then both got the same pair and the session lives on
    assert [reply.status_code for reply in replies] == [200, 200]
    assert replies[0].json() == replies[1].json()
    family.refresh_from_db()
    assert family.revoked_at is None
    assert family.refresh_count == 1
    assert AuditEvent.objects.filter(action="auth.token.refresh_retried").count() == 1


def _wait_until_blocked_on_locks(count: int, timeout: float = 30) -> None:
    """Poll PostgreSQL until `count` other sessions wait on a lock (an observed state, not a
    guess at how long the threads take to get there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            # Inside a transaction the statistics views keep their first snapshot: drop it.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if cursor.fetchone()[0] >= count:
                return
        time.sleep(0.01)  # polling an observed state, not ordering the threads
    raise AssertionError(f"{count} sessions never queued on the family lock")


def _grace_in_a_fresh_process(var_dir: Path, raw: str) -> subprocess.CompletedProcess:
    """Start Django with JWT_REFRESH_REUSE_GRACE=raw and print the setting it read."""
    return load_settings(var_dir, show="JWT_REFRESH_REUSE_GRACE", JWT_REFRESH_REUSE_GRACE=raw)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("0", "None"), ("0s", "None"), ("30s", "0:00:30"), ("1m", "0:01:00")],
)
def test_the_grace_setting_reads_durations_and_zero_means_off(tmp_path, raw, shown):
    result = _grace_in_a_fresh_process(tmp_path, raw)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shown


@pytest.mark.parametrize("raw", ["soon", "61s", "1d"])
def test_a_malformed_or_too_long_grace_setting_refuses_to_start(tmp_path, raw):
    result = _grace_in_a_fresh_process(tmp_path, raw)
    assert result.returncode != 0
    assert "JWT_REFRESH_REUSE_GRACE" in result.stderr
