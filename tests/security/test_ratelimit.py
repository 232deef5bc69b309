"""Rate limits and IP bans: atomic under concurrency, on Redis and on the database, before
authentication, with bans that outlive the window and grow."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.test import Client

from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import bans, ratelimit
from security.models import IPBan
from tests.conftest import need, on_postgres, process_env, start_gunicorn

REDIS_URL = os.environ.get("REDIS_URL", "")


@pytest.fixture(params=["database", "redis"])
def backend(request, settings):
    """Each test runs on both stores: the database (no REDIS_URL) and Redis."""
    if request.param == "redis":
        need(bool(REDIS_URL), "needs Redis (set REDIS_URL)")
        settings.REDIS_URL = REDIS_URL
    else:
        settings.REDIS_URL = ""
    ratelimit.clear()
    if settings.REDIS_URL:
        for name in ratelimit._redis_connection().scan_iter(match="bridge:ban:*"):
            ratelimit._redis_connection().delete(name)
    yield request.param
    ratelimit.clear()


@pytest.fixture
def limited(settings, backend):
    settings.ENABLE_DDOS_PROTECTION = True
    settings.RATE_LIMITS = {**settings.RATE_LIMITS, "read": "3/1s", "auth": "2/1s"}
    settings.IP_BAN_AFTER = 3
    settings.IP_BAN_BASE = timedelta(seconds=2)
    return settings


def test_a_rate_reads_requests_per_window():
    assert ratelimit.Rate.parse("20/1m") == ratelimit.Rate(20, 60.0)
    assert ratelimit.Rate.parse("5/500ms") == ratelimit.Rate(5, 0.5)
    for bad in ("0/1m", "x/1m", "5/0s"):
        with pytest.raises(ValueError):
            ratelimit.Rate.parse(bad)


def test_ipv6_clients_are_grouped_by_their_64_and_the_allowlist_is_cidrs(settings):
    import ipaddress

    assert ratelimit.ip_group("2001:db8:1:2:aaaa::1") == ratelimit.ip_group("2001:db8:1:2::ffff")
    assert ratelimit.ip_group("2001:db8:1:2::1") != ratelimit.ip_group("2001:db8:1:3::1")
    assert ratelimit.ip_group("::ffff:10.0.0.1") == "10.0.0.1"
    assert ratelimit.ip_group("203.0.113.7") == "203.0.113.7"
    settings.RATE_LIMIT_ALLOWLIST = [ipaddress.ip_network("10.1.0.0/16")]
    assert ratelimit.allowlisted("10.1.2.3") and not ratelimit.allowlisted("10.2.0.1")


@pytest.mark.django_db(transaction=True)
def test_the_window_admits_the_limit_and_says_when_to_retry(backend):
    rate = ratelimit.Rate(5, 2.0)
    decisions = [ratelimit.hit(f"t:{backend}", rate) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert 0 < decisions[-1].retry_after <= 2.0
    assert ratelimit.hit(f"other:{backend}", rate).allowed


@pytest.mark.django_db(transaction=True)
def test_parallel_hits_never_admit_more_than_the_limit(backend):
    if backend == "database":
        need(on_postgres(), "needs PostgreSQL: SQLite serialises writers")
    rate = ratelimit.Rate(25, 30.0)

    def one(_: int) -> bool:
        from django.db import connection

        try:
            return ratelimit.hit(f"race:{backend}", rate).allowed
        finally:
            connection.close()

    with ThreadPoolExecutor(16) as pool:
        admitted = sum(pool.map(one, range(200)))
    assert admitted == 25


@pytest.mark.django_db(transaction=True)
def test_over_the_limit_is_429_with_retry_after_and_another_ip_is_served(limited):
    flooder, other = Client(REMOTE_ADDR="203.0.113.9"), Client(REMOTE_ADDR="198.51.100.4")
    statuses = [flooder.get("/api/jobs").status_code for _ in range(5)]
    # admitted requests reach authentication (401); the rest never get that far
    assert statuses == [401, 401, 401, 429, 429]
    refused = flooder.get("/api/jobs")
    body = refused.json()
    assert body["code"] == "rate_limited" and "read" in body["detail"]
    assert 1 <= int(refused["Retry-After"]) <= 1
    assert other.get("/api/jobs").status_code == 401
    # a forged X-Forwarded-For from a peer that is no trusted proxy changes nothing
    spoofed = flooder.get("/api/jobs", HTTP_X_FORWARDED_FOR="192.0.2.77")
    assert spoofed.status_code == 429
    assert AuditEvent.objects.filter(action=AuditAction.RATE_LIMITED).count() == 1


@pytest.mark.django_db(transaction=True)
def test_repeat_offenders_are_banned_beyond_the_window_and_longer_each_time(limited):
    flooder = Client(REMOTE_ADDR="203.0.113.10")

    def episode() -> list[int]:
        codes = [flooder.get("/api/jobs").status_code for _ in range(5)]
        time.sleep(1.05)  # the next window
        return codes

    # given two over-limit episodes: limited, not banned
    assert episode()[-1] == 429 and episode()[-1] == 429
    assert not IPBan.objects.exists()
    # when the third comes, the address is banned
    episode()
    ban = IPBan.objects.get()
    assert (ban.network, ban.ban_number) == ("203.0.113.10", 1)
    assert ban.ends_at - ban.started_at == timedelta(seconds=2)
    # then the ban outlives the window: a fresh window still refuses, as banned
    refused = flooder.get("/api/jobs")
    assert refused.status_code == 429 and refused.json()["code"] == "ip_banned"
    assert int(refused["Retry-After"]) >= 1
    assert AuditEvent.objects.filter(action=AuditAction.IP_BANNED).count() == 1
    # and once it has run out and the address offends again, the next ban lasts twice as long
    time.sleep(max(0, (ban.ends_at - ban.started_at).total_seconds() - 1.0))
    for _ in range(3):
        episode()
    second = IPBan.objects.order_by("-started_at").first()
    assert second.ban_number == 2
    assert second.ends_at - second.started_at == timedelta(seconds=4)


@pytest.mark.django_db(transaction=True)
def test_a_lifted_ban_lets_the_address_back_in(limited):
    from compliance.audit import AuditContext

    row = bans.ban(group="203.0.113.11", reason="test", context=AuditContext.system())
    client = Client(REMOTE_ADDR="203.0.113.11")
    assert client.get("/api/jobs").json()["code"] == "ip_banned"
    assert bans.lift(bans=[row], context=AuditContext.system()) == 1
    assert client.get("/api/jobs").status_code == 401


@pytest.mark.django_db(transaction=True)
def test_allowlisted_networks_and_health_probes_are_never_limited(limited):
    import ipaddress

    limited.RATE_LIMIT_ALLOWLIST = [ipaddress.ip_network("192.0.2.0/24")]
    monitor = Client(REMOTE_ADDR="192.0.2.8")
    assert {monitor.get("/api/jobs").status_code for _ in range(10)} == {401}
    probe = Client(REMOTE_ADDR="203.0.113.12")
    assert {probe.get("/health/live").status_code for _ in range(10)} == {200}


@pytest.mark.django_db(transaction=True)
def test_when_redis_is_down_login_refuses_and_reads_are_served(limited, hung_port):
    original = limited.REDIS_URL
    limited.REDIS_URL = f"redis://127.0.0.1:{hung_port}/0"
    limited.REDIS_TIMEOUT = 1
    ratelimit._redis_client = None  # a fresh client on the dead address
    try:
        client = Client(REMOTE_ADDR="203.0.113.13")
        login = client.post(
            "/api/security/auth/login", {"username": "x", "password": "y"}, "application/json"
        )
        assert login.status_code == 503 and login.json()["code"] == "limiter_unavailable"
        assert client.get("/api/jobs").status_code == 401
    finally:
        limited.REDIS_URL = original
        ratelimit._redis_client = None


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_200_parallel_requests_through_gunicorn_admit_exactly_the_limit(postgres):
    need(bool(REDIS_URL), "needs Redis (set REDIS_URL)")
    # given Bridge under gunicorn (2 processes x 8 threads) limiting reads to 50 a minute per
    # IP on Redis, behind a trusted proxy (this host) that names the client
    env = process_env(
        ENABLE_DDOS_PROTECTION="true",
        RATE_LIMIT_READ="50/1m",
        TRUSTED_PROXIES="127.0.0.1/32",
        REDIS_URL=REDIS_URL,
        LOG_LEVEL="ERROR",
    )
    ratelimit.clear()
    process, url = start_gunicorn(env)
    try:

        def get(client_ip: str) -> int:
            request = urllib.request.Request(
                f"{url}/api/jobs", headers={"X-Forwarded-For": client_ip}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                if error.code == 429:
                    assert json.loads(error.read())["code"] in ("rate_limited", "ip_banned")
                    assert error.headers["Retry-After"]
                return error.code

        # when one client fires 200 at once
        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(get, ["203.0.113.50"] * 200))
        # then exactly the limit got through (to authentication: 401), the rest were refused,
        # and another client is served meanwhile
        assert statuses.count(401) == 50, statuses
        assert statuses.count(429) == 150
        assert get("198.51.100.60") == 401
    finally:
        process.terminate()
        process.wait(timeout=15)
        ratelimit.clear()


@pytest.mark.django_db(transaction=True)
def test_login_attempts_per_username_are_limited_across_addresses(limited):
    limited.RATE_LIMIT_LOGIN_USERNAME = "3/1m"
    limited.RATE_LIMITS = {**limited.RATE_LIMITS, "auth": "100/1m"}
    codes = []
    for n in range(5):
        client = Client(REMOTE_ADDR=f"203.0.113.{100 + n}")  # a botnet: one try per address
        response = client.post(
            "/api/security/auth/login",
            {"username": "Alice", "password": "guess"},
            "application/json",
        )
        codes.append(response.status_code)
    assert codes == [401, 401, 401, 429, 429]
    assert response.json()["code"] == "login_rate_limited" and int(response["Retry-After"]) >= 1
    # the same name in another case is the same account
    other = Client(REMOTE_ADDR="198.51.100.200").post(
        "/api/security/auth/login", {"username": "ALICE", "password": "x"}, "application/json"
    )
    assert other.status_code == 429


@pytest.mark.django_db(transaction=True)
def test_a_security_officer_lifts_a_ban_from_the_console(limited, security_officer):
    from compliance.audit import AuditContext
    from tests.test_console import console_for

    row = bans.ban(group="203.0.113.14", reason="test", context=AuditContext.system())
    console = console_for(security_officer)
    page = console.get("/admin/security/ipban/").content.decode()
    assert "203.0.113.14" in page and "active" in page
    response = console.post(
        "/admin/security/ipban/", {"action": "lift", "_selected_action": [row.pk]}
    )
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.lifted_by == security_officer.username and not row.active
    assert AuditEvent.objects.filter(action=AuditAction.IP_UNBANNED).count() == 1
    assert Client(REMOTE_ADDR="203.0.113.14").get("/api/jobs").status_code == 401


@pytest.mark.django_db(transaction=True)
def test_a_flood_of_refusals_is_not_a_flood_of_log_lines(limited, caplog):
    flooder = Client(REMOTE_ADDR="203.0.113.15")
    with caplog.at_level("WARNING", logger="django.request"):
        codes = [flooder.get("/api/jobs").status_code for _ in range(20)]
    assert codes.count(429) == 17
    assert not [r for r in caplog.records if "Too Many Requests" in r.getMessage()]
