"""Threat assessment: each layer scores real requests, scores decay, a threshold bans (and the
ban holds), ordinary requests cost nothing, parallel events add up exactly, and the picture is
served to security officers and auditors only."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import crypto, ratelimit, threats
from security.choices import ThreatKind, ThreatLayer, ThreatLevel
from security.models import IPActivity, IPBan, ThreatEvent, UserActivity
from tests.conftest import PASSWORD, client_for, login, make_user, need

THREATS = "/api/security/threats"
LOGIN = "/api/security/auth/login"
REFRESH = "/api/security/auth/refresh"
EVENTS = "/api/compliance/audit/events"
REDIS_URL = os.environ.get("REDIS_URL", "")


@pytest.fixture
def armed(settings):
    """Protection on (the suite switches it off), limits out of the way, counters on the
    database unless a test asks for Redis."""
    settings.ENABLE_DDOS_PROTECTION = True
    settings.ENABLE_THREAT_DETECTION = True
    settings.REDIS_URL = ""
    settings.RATE_LIMITS = dict.fromkeys(settings.RATE_LIMITS, "10000/1m")
    settings.THREAT_ALERT_SCORE = 50
    settings.THREAT_BAN_SCORE = 100
    settings.THREAT_SCORE_HALF_LIFE = timedelta(hours=1)
    ratelimit.clear()
    yield settings
    ratelimit.clear()


@pytest.fixture(params=["database", "redis"])
def store(request, armed):
    """Run on both stores of the limiter's counters and bans."""
    if request.param == "redis":
        need(bool(REDIS_URL), "needs Redis (set REDIS_URL)")
        armed.REDIS_URL = REDIS_URL
        ratelimit._redis_client = None
        ratelimit.clear()
        for name in ratelimit._redis_connection().scan_iter(match="bridge:ban:*"):
            ratelimit._redis_connection().delete(name)
    yield request.param
    ratelimit.clear()
    if armed.REDIS_URL:
        for name in ratelimit._redis_connection().scan_iter(match="bridge:ban:*"):
            ratelimit._redis_connection().delete(name)


def only_event(**filters) -> ThreatEvent:
    return ThreatEvent.objects.get(**filters)


# --- The patterns: true and false positives ------------------------------------------------

PROBES = [
    ("/api/compliance/audit/events", "search=' OR 1=1--", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "id=1%27%20UNION%20SELECT%20username,password%20FROM%20x--", "sql_injection"),
    ("/api/jobs", "id=1;%20DROP%20TABLE%20users", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "id=1%09or%091=1", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "q=admin'--", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "q=1' and pg_sleep(5)", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "q=union/**/select+1", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "q=%2527%20or%201%3D1--", ThreatKind.SQL_INJECTION),  # encoded twice
    ("/api/jobs/1' OR '1'='1", "", ThreatKind.SQL_INJECTION),
    ("/api/jobs", "q=<script>alert(1)</script>", ThreatKind.XSS),
    ("/api/jobs", "q=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", ThreatKind.XSS),
    ("/api/jobs", 'q="><svg/onload=alert(1)>', ThreatKind.XSS),
    ("/api/jobs", "next=javascript:alert(document.cookie)", ThreatKind.XSS),
    ("/api/jobs", 'q=" onmouseover="alert(1)', ThreatKind.XSS),
    ("/api/jobs", "<script>=1", ThreatKind.XSS),  # in a parameter's name
    ("/api/backups/../../etc/passwd", "", ThreatKind.PATH_TRAVERSAL),
    ("/api/files", "name=..%2f..%2fetc%2fpasswd", ThreatKind.PATH_TRAVERSAL),
    ("/api/files", "name=%252e%252e%252fetc%252fpasswd", ThreatKind.PATH_TRAVERSAL),
    ("/api/files", "name=..\\..\\windows\\win.ini", ThreatKind.PATH_TRAVERSAL),
    ("/api/files", "name=report.pdf%00.txt", ThreatKind.PATH_TRAVERSAL),
    ("/api/x/..;/admin/", "", ThreatKind.PATH_TRAVERSAL),
]

ORDINARY = [
    ("/api/compliance/audit/events", "search=O'Brien"),
    ("/api/compliance/audit/events", "actor=d'Artagnan&action=auth.login.failed"),
    ("/api/compliance/audit/events", "search=rock 'n' roll"),
    ("/api/compliance/audit/events", "search='Tom' and 'Jerry'"),
    ("/api/compliance/audit/events", "search=Tom's and Jerry's"),
    ("/api/compliance/audit/events", "search=select a plan from the list"),
    ("/api/compliance/audit/events", "search=drop table tennis"),
    ("/api/compliance/audit/events", "search=update the doc; delete later"),
    ("/api/compliance/audit/events", "search=javascript: the good parts"),
    ("/api/compliance/audit/events", "search=please confirm (by phone)"),
    ("/api/compliance/audit/events", "search=x < y and y > z"),
    ("/api/compliance/audit/events", "search=it's -- fine"),
    ("/api/compliance/audit/events", "search=color or flavour"),
    ("/api/compliance/audit/events", "search=error 404 for /etc/hosts.allow"),
    ("/api/compliance/audit/events", "search=version 1.2..3"),
    ("/api/compliance/audit/events", "search=%E2%9C%93 100%25 done"),
    ("/api/compliance/audit/events", "from=2024-01-01T00:00:00Z&to=2024-02-01T00:00:00%2B01:00"),
    ("/api/compliance/audit/events", "page=1&page_size=50&search=online=yes"),
    ("/admin/compliance/auditevent/", "q=203.0.113.0/24&action=auth.login.failed&o=-1.2"),
    ("/admin/compliance/auditevent/", "_changelist_filters=action%3Dauth.login.failed"),
    ("/admin/security/ipban/", "q=2001:db8::/64"),
    ("/api/jobs/12", ""),
]


@pytest.mark.parametrize(("path", "query", "kind"), PROBES)
def test_attack_patterns_are_recognised_in_the_path_and_the_query(path, query, kind):
    probe = threats.find_probe(path, query)
    assert probe is not None, f"{path}?{query}"
    assert probe.kind == kind


@pytest.mark.parametrize(("path", "query"), ORDINARY)
def test_ordinary_paths_and_searches_match_no_pattern(path, query):
    assert threats.find_probe(path, query) is None


# --- Application layer: real requests -------------------------------------------------------


@pytest.mark.django_db
def test_a_sql_injection_probe_in_a_query_string_is_scored_against_the_address(armed):
    # when an anonymous client probes the audit search
    client = Client(REMOTE_ADDR="203.0.113.20")
    response = client.get(EVENTS, {"search": "' OR 1=1--", "token": "eyJhbGciOi.x.y"})
    # then the request is answered as usual and one application event is scored
    assert response.status_code == 401
    event = only_event(kind=ThreatKind.SQL_INJECTION)
    assert (event.layer, event.network, event.user_id, event.path) == (
        ThreatLayer.APPLICATION,
        "203.0.113.20",
        None,
        EVENTS,
    )
    assert event.details["param"] == "search" and event.details["matched"].startswith("' OR 1=")
    assert event.details["status"] == 401 and "eyJ" not in str(event.details)
    activity = IPActivity.objects.get(network="203.0.113.20")
    assert (activity.events, activity.flagged_requests, activity.refusals) == (1, 1, 0)
    assert activity.score == threats.SCORES[ThreatKind.SQL_INJECTION]


@pytest.mark.django_db
def test_a_traversal_path_and_an_xss_query_are_scored_and_ipv6_is_grouped_by_64(armed):
    first = Client(REMOTE_ADDR="2001:db8:1:2::10")
    second = Client(REMOTE_ADDR="2001:db8:1:2:ffff::99")  # the same /64
    assert first.get("/api/backups/../../etc/passwd").status_code == 404
    second.get("/admin/login/", {"next": "javascript:alert(document.cookie)"})
    kinds = set(ThreatEvent.objects.values_list("kind", flat=True))
    assert kinds == {ThreatKind.PATH_TRAVERSAL, ThreatKind.XSS}
    activity = IPActivity.objects.get()
    assert activity.network == "2001:db8:1:2::/64" and activity.events == 2


@pytest.mark.django_db
def test_a_burst_of_404s_is_one_scanner_event_per_window(armed):
    armed.THREAT_404_BURST = "5/1m"
    scanner = Client(REMOTE_ADDR="203.0.113.21")
    paths = ["/.env", "/wp-login.php", "/.git/config", "/phpmyadmin/", "/backup.zip"]
    statuses = [scanner.get(path).status_code for path in paths * 3]
    assert set(statuses) == {404}
    # five 404s are not a burst; the sixth is, and the rest of the window is the same burst
    event = only_event(kind=ThreatKind.NOT_FOUND_BURST)
    assert event.layer == ThreatLayer.APPLICATION and event.network == "203.0.113.21"
    assert event.details == {"not_found": 5, "window_seconds": 60.0}
    # another address has its own count
    Client(REMOTE_ADDR="203.0.113.22").get("/.env")
    assert ThreatEvent.objects.count() == 1


@pytest.mark.django_db
def test_an_oversized_body_is_scored(armed):
    body = '{"username": "' + "x" * 3_000_000 + '", "password": "y"}'
    response = Client(REMOTE_ADDR="203.0.113.23").post(LOGIN, body, content_type="application/json")
    assert response.status_code == 413
    event = only_event(kind=ThreatKind.OVERSIZED_BODY)
    assert event.network == "203.0.113.23" and event.details["content_length"] == str(len(body))


@pytest.mark.django_db
def test_a_signed_in_callers_probe_scores_the_user_not_the_address(armed, compliance_officer):
    # an auditor searching the trail for the payload of an attack (their office may be behind
    # one NAT address that a ban would lock out whole)
    api = client_for(compliance_officer)
    assert api.get(EVENTS, {"search": "' UNION SELECT password FROM users--"}).status_code == 200
    event = only_event(kind=ThreatKind.SQL_INJECTION)
    assert event.user_id == compliance_officer.pk and event.network == "127.0.0.1"
    assert not IPActivity.objects.exists()
    assert UserActivity.objects.get(user=compliance_officer).score == 20


@pytest.mark.django_db
def test_ordinary_requests_create_no_events_and_no_rows(armed, compliance_officer, operator):
    # given the requests a working day is made of
    auditor = client_for(compliance_officer)
    for query in ORDINARY:
        if query[0] == EVENTS:
            assert auditor.get(f"{EVENTS}?{query[1]}").status_code in (200, 400)
    assert auditor.get("/api/jobs").status_code == 200
    assert auditor.get("/api/jobs/999999").status_code == 404  # one 404 is no burst
    client_for(operator).post(
        "/api/compliance/audit/log", {"action": "custom.deploy", "details": {}}, format="json"
    )
    Client().get("/health/live")
    # then nothing was scored, and nothing was written for it
    assert not ThreatEvent.objects.exists()
    assert not IPActivity.objects.exists() and not UserActivity.objects.exists()


# --- Network layer ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_over_limit_episodes_and_the_limiters_ban_are_network_events(armed):
    armed.RATE_LIMITS = {**armed.RATE_LIMITS, "read": "2/1s"}
    armed.IP_BAN_AFTER = 1
    flooder = Client(REMOTE_ADDR="203.0.113.30")
    codes = [flooder.get("/api/jobs").status_code for _ in range(4)]
    assert codes == [401, 401, 429, 429]
    kinds = sorted(ThreatEvent.objects.values_list("kind", flat=True))
    assert kinds == [ThreatKind.OVER_LIMIT, ThreatKind.RATE_BAN]
    activity = IPActivity.objects.get(network="203.0.113.30")
    assert (activity.refusals, activity.ban_count) == (1, 1)
    assert activity.score == pytest.approx(35, abs=0.01)  # 10 for the episode, 25 for the ban


# --- Authentication layer (from the audit trail) --------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_series_of_failed_logins_then_a_lockout_raises_one_alert(armed, operator):
    client = APIClient(REMOTE_ADDR="203.0.113.40")
    codes = [
        client.post(LOGIN, {"username": "olivia", "password": "guess"}, format="json").status_code
        for _ in range(5)
    ]
    assert codes[:4] == [401] * 4 and codes[4] in (401, 429)
    events = ThreatEvent.objects.filter(layer=ThreatLayer.AUTHENTICATION, network="203.0.113.40")
    assert events.filter(kind=ThreatKind.LOGIN_FAILED).count() == 5
    assert events.filter(kind=ThreatKind.LOCKED_OUT).count() == 1
    assert all(event.user_id is None for event in events)
    # 5 x 5 + 20 = 45: under the alert; one more refused try crosses it, once
    assert not AuditEvent.objects.filter(action=AuditAction.THREAT_ALERT).exists()
    for _ in range(3):
        client.post(LOGIN, {"username": "olivia", "password": "guess"}, format="json")
    alert = AuditEvent.objects.get(action=AuditAction.THREAT_ALERT)
    assert (alert.object_type, alert.object_id) == ("security.ip", "203.0.113.40")
    assert alert.details_data["threshold"] == 50 and alert.details_data["score"] >= 50
    # the password guessed is nowhere in the threat records
    assert "guess" not in str(list(ThreatEvent.objects.values_list("details", flat=True)))


@pytest.mark.django_db(transaction=True)
def test_refresh_token_reuse_scores_the_owner_and_the_presenting_address(armed, operator):
    tokens = login(APIClient(), "olivia")
    APIClient().post(REFRESH, {"refresh": tokens["refresh"]}, format="json")
    thief = APIClient(REMOTE_ADDR="198.51.100.41")
    assert thief.post(REFRESH, {"refresh": tokens["refresh"]}, format="json").status_code == 401
    event = only_event(kind=ThreatKind.TOKEN_REUSE)
    assert (event.layer, event.user_id, event.network) == (
        ThreatLayer.AUTHENTICATION,
        operator.pk,
        "198.51.100.41",
    )
    assert IPActivity.objects.get(network="198.51.100.41").score == 50
    assert UserActivity.objects.get(user=operator).score == 50
    # 50 is the alert threshold: both are alerted
    alerts = AuditEvent.objects.filter(action=AuditAction.THREAT_ALERT)
    assert sorted(alerts.values_list("object_type", flat=True)) == ["security.ip", "security.user"]


@pytest.mark.django_db(transaction=True)
def test_an_event_rolled_back_is_never_observed(armed):
    with pytest.raises(RuntimeError), transaction.atomic():
        record_event(
            action=AuditAction.LOGIN_FAILED,
            context=AuditContext(client_ip="203.0.113.42"),
            details={"username": "x"},
        )
        raise RuntimeError("rolled back")
    assert not ThreatEvent.objects.exists()
    record_event(action=AuditAction.LOGIN_FAILED, context=AuditContext(client_ip="203.0.113.42"))
    assert only_event().kind == ThreatKind.LOGIN_FAILED


# --- Data layer ------------------------------------------------------------------------------


@pytest.fixture
def master_key(settings):
    settings.BRIDGE_MASTER_KEY = base64.b64encode(b"k" * 32).decode()
    crypto._master = None
    yield
    crypto._master = None


@pytest.mark.django_db(transaction=True)
def test_decrypt_volume_over_the_threshold_is_a_data_event_for_the_user(
    armed, master_key, security_officer
):
    armed.THREAT_DECRYPT_VOLUME = "3/1h"
    api = client_for(security_officer)
    sealed = api.post(
        "/api/security/encrypt", {"plaintext": "IBAN DE89", "context": "c"}, format="json"
    ).json()["ciphertext"]
    # when the officer decrypts five times within the hour
    for _ in range(5):
        opened = api.post(
            "/api/security/decrypt", {"ciphertext": sealed, "context": "c"}, format="json"
        )
        assert opened.status_code == 200
    # then the fourth started one episode (the fifth is the same one), scored by name
    event = only_event(layer=ThreatLayer.DATA)
    assert (event.kind, event.user_id) == (ThreatKind.DECRYPT_VOLUME, security_officer.pk)
    assert event.details["count"] == 3 and event.details["window_seconds"] == 3600
    assert "DE89" not in str(event.details)
    assert UserActivity.objects.get(user=security_officer).score == 40
    assert not IPActivity.objects.exists()
    # a refused decryption is a data event of its own
    api.post("/api/security/decrypt", {"ciphertext": sealed, "context": "x"}, format="json")
    assert ThreatEvent.objects.filter(kind=ThreatKind.DECRYPTION_FAILED).count() == 1


# --- Decay -----------------------------------------------------------------------------------


def test_a_score_halves_every_half_life(settings):
    settings.THREAT_SCORE_HALF_LIFE = timedelta(hours=1)
    now = timezone.now()
    assert threats.decayed(100, now, now) == 100
    assert threats.decayed(100, now - timedelta(hours=1), now) == pytest.approx(50)
    assert threats.decayed(100, now - timedelta(hours=3), now) == pytest.approx(12.5)
    assert threats.decayed(100, now - timedelta(minutes=30), now) == pytest.approx(70.71, 1e-3)
    # another host's clock a little ahead is no time at all, never growth
    assert threats.decayed(100, now + timedelta(seconds=5), now) == 100


@pytest.mark.django_db
def test_a_new_event_adds_to_the_decayed_score_and_alerts_only_when_crossing(armed):
    two_hours_ago = timezone.now() - timedelta(hours=2)
    IPActivity.objects.create(
        network="203.0.113.50",
        first_seen=two_hours_ago,
        last_seen=two_hours_ago,
        scored_at=two_hours_ago,
        score=124.0,  # 31 now
    )
    threats.record(kind=ThreatKind.SQL_INJECTION, network="203.0.113.50")
    row = IPActivity.objects.get()
    assert row.score == pytest.approx(51, abs=0.01) and row.events == 1
    assert AuditEvent.objects.filter(action=AuditAction.THREAT_ALERT).count() == 1
    threats.record(kind=ThreatKind.SQL_INJECTION, network="203.0.113.50")  # 71: same episode
    assert AuditEvent.objects.filter(action=AuditAction.THREAT_ALERT).count() == 1


# --- Threshold ban ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_reaching_the_ban_score_bans_the_address_and_its_next_request_is_refused(store):
    prober = Client(REMOTE_ADDR="203.0.113.60")
    bystander = Client(REMOTE_ADDR="203.0.113.61")
    # five probes: 100 points
    for n in range(5):
        assert prober.get(EVENTS, {"search": f"x' OR {n}={n}"}).status_code == 401
    ban = IPBan.objects.get(network="203.0.113.60")
    assert ban.reason.startswith("threat score 100 (ban at 100)")
    assert "application/sql_injection" in ban.reason
    refused = prober.get("/api/jobs")
    assert refused.status_code == 429 and refused.json()["code"] == "ip_banned"
    assert bystander.get("/api/jobs").status_code == 401
    assert IPActivity.objects.get(network="203.0.113.60").ban_count == 1
    assert AuditEvent.objects.filter(action=AuditAction.THREAT_ALERT).count() == 1
    assert AuditEvent.objects.filter(action=AuditAction.IP_BANNED).count() == 1


@pytest.mark.django_db
def test_an_allowlisted_address_is_scored_but_never_banned(armed):
    import ipaddress

    armed.RATE_LIMIT_ALLOWLIST = [ipaddress.ip_network("192.0.2.0/24")]
    monitor = Client(REMOTE_ADDR="192.0.2.9")
    for n in range(6):
        monitor.get(EVENTS, {"search": f"x' OR {n}={n}"})
    assert IPActivity.objects.get(network="192.0.2.9").score == pytest.approx(120, abs=0.01)
    assert not IPBan.objects.exists()


# --- Concurrency -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_parallel_events_add_up_exactly_and_cross_each_threshold_once(postgres, armed):
    # given one address and one user hit by 48 events from 12 threads at once (5 points each)
    armed.THREAT_SCORES = {ThreatKind.TOKEN_REUSE: 5}
    user = make_user("victim")

    def one(_: int) -> None:
        try:
            threats.record(
                kind=ThreatKind.TOKEN_REUSE,
                network="198.51.100.70",
                user_id=user.pk,
                score_network=True,
                context=AuditContext(client_ip="198.51.100.70"),
            )
        finally:
            connection.close()

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(48)))
    # then every point counted (less seconds of decay), and each threshold fired exactly once
    address = IPActivity.objects.get(network="198.51.100.70")
    person = UserActivity.objects.get(user=user)
    assert address.events == person.events == ThreatEvent.objects.count() == 48
    assert 239 < address.score <= 240 and 239 < person.score <= 240
    assert IPBan.objects.filter(network="198.51.100.70").count() == 1
    assert address.ban_count == 1
    alerts = AuditEvent.objects.filter(action=AuditAction.THREAT_ALERT)
    assert sorted(alerts.values_list("object_type", flat=True)) == ["security.ip", "security.user"]


# --- GET /api/security/threats ---------------------------------------------------------------


@pytest.mark.django_db
def test_the_threat_picture_needs_a_role_that_may_read_it(
    armed, anon_api, outsider_api, operator_api, security_officer, compliance_officer
):
    assert anon_api.get(THREATS).status_code == 401
    for api in (outsider_api, operator_api):
        refused = api.get(THREATS)
        assert refused.status_code == 403
        assert "security.view_threatevent" in refused.json()["detail"]
    assert client_for(security_officer).get(THREATS).status_code == 200
    assert client_for(compliance_officer).get(THREATS).status_code == 200  # auditors read it


@pytest.mark.django_db
def test_the_threat_picture_shows_level_bans_offenders_counts_and_an_hourly_series(
    armed, security_officer, operator
):
    # given a quiet picture
    api = client_for(security_officer)
    quiet = api.get(THREATS).json()
    assert quiet["level"] == ThreatLevel.LOW and quiet["active_bans"] == []
    assert quiet["top_offenders"] == {"addresses": [], "users": []}
    # when one address probes until banned, another once, and a user's token is reused
    for n in range(5):
        Client(REMOTE_ADDR="203.0.113.80").get(EVENTS, {"search": f"x' OR {n}={n}"})
    Client(REMOTE_ADDR="203.0.113.81").get("/api/x/../../etc/passwd")
    threats.record(kind=ThreatKind.TOKEN_REUSE, network="198.51.100.82", user_id=operator.pk)
    earlier = ThreatEvent.objects.create(
        occurred_at=timezone.now() - timedelta(hours=5),
        layer=ThreatLayer.DATA,
        kind=ThreatKind.EXPORT_VOLUME,
        score=40,
    )
    body = api.get(THREATS).json()
    # then
    assert body["level"] == ThreatLevel.CRITICAL and body["top_score"] == pytest.approx(100, 0.01)
    assert body["thresholds"] == {"alert": 50, "ban": 100, "half_life_seconds": 3600.0}
    assert [ban["network"] for ban in body["active_bans"]] == ["203.0.113.80"]
    addresses = body["top_offenders"]["addresses"]
    assert [a["network"] for a in addresses] == ["203.0.113.80", "203.0.113.81"]
    assert addresses[0]["banned_until"] and addresses[1]["banned_until"] is None
    assert addresses[0]["events"] == 5 and addresses[1]["score"] == pytest.approx(20, 0.01)
    users = body["top_offenders"]["users"]
    assert [(u["username"], u["id"]) for u in users] == [("olivia", operator.pk)]
    counts = {window["window"]: window for window in body["counts"]}
    assert counts["1h"] == {
        "window": "1h",
        "since": counts["1h"]["since"],
        "total": 7,
        "network": 0,
        "authentication": 1,
        "application": 6,
        "data": 0,
    }
    assert counts["24h"]["total"] == 8 and counts["24h"]["data"] == 1
    series = body["series"]
    assert len(series) == 24 and series[-1]["application"] == 6 and series[-1]["total"] == 7
    assert sum(bucket["data"] for bucket in series) == 1
    hour = earlier.occurred_at.replace(minute=0, second=0, microsecond=0)
    assert series[-6]["start"].startswith(hour.strftime("%Y-%m-%dT%H:00:00"))
    assert series[-6]["data"] == 1


def test_the_level_follows_the_top_score_bans_and_the_events_of_the_last_hour(settings):
    settings.THREAT_ALERT_SCORE, settings.THREAT_BAN_SCORE = 50, 100
    assert threats.level_of(0, 0, 0)[0] == ThreatLevel.LOW
    assert threats.level_of(10, 0, 19)[0] == ThreatLevel.LOW
    assert threats.level_of(25, 0, 0)[0] == ThreatLevel.ELEVATED
    assert threats.level_of(5, 0, 20)[0] == ThreatLevel.ELEVATED  # many small ones
    assert threats.level_of(50, 0, 0)[0] == ThreatLevel.HIGH
    assert threats.level_of(0, 1, 0)[0] == ThreatLevel.HIGH
    assert threats.level_of(100, 1, 0)[0] == ThreatLevel.CRITICAL


# --- Console ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_dashboard_shows_the_threat_panel_to_those_who_may_read_it(
    armed, security_officer, compliance_officer, operator
):
    from tests.test_console import console_for

    for n in range(3):
        Client(REMOTE_ADDR="203.0.113.90").get(EVENTS, {"search": f"x' OR {n}={n}"})
    page = console_for(security_officer).get("/admin/").content.decode()
    assert 'id="panel-threats"' in page and "Threat events per hour" in page
    assert "203.0.113.90" in page and "threat level" in page
    panel = next(
        shown.content
        for shown in console_for(compliance_officer).get("/admin/").context["panels"]
        if shown.panel.key == "threats"
    )
    assert panel.badge == "level high" and [row.value for row in panel.rows] == ["60"]
    assert {link.label for link in panel.links} == {"Threat events"}  # no activity lists
    assert 'id="panel-threats"' not in console_for(operator).get("/admin/").content.decode()


@pytest.mark.django_db
def test_the_console_lists_events_and_activity_read_only_with_filters(
    armed, security_officer, compliance_officer
):
    from tests.test_console import console_for

    Client(REMOTE_ADDR="203.0.113.91").get("/api/x/../../etc/passwd")
    officer = console_for(security_officer)
    for url in (
        "/admin/security/threatevent/?layer__exact=application",
        "/admin/security/threatevent/?kind__exact=path_traversal&q=203.0.113.91",
        "/admin/security/ipactivity/?seen=1h&banned=never",
        "/admin/security/useractivity/?seen=24h",
    ):
        response = officer.get(url)
        assert response.status_code == 200, url
    listed = officer.get("/admin/security/ipactivity/?seen=1h").content.decode()
    assert "203.0.113.91" in listed and "20.0" in listed
    event = ThreatEvent.objects.get()
    detail = officer.get(f"/admin/security/threatevent/{event.pk}/change/").content.decode()
    assert "path_traversal" in detail or "Path traversal probe" in detail
    assert officer.get("/admin/security/threatevent/add/").status_code == 403
    auditor = console_for(compliance_officer)
    assert auditor.get("/admin/security/threatevent/").status_code == 200
    assert auditor.get("/admin/security/ipactivity/").status_code == 403


# --- Settings --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_switched_off_nothing_is_scored(armed):
    armed.ENABLE_THREAT_DETECTION = False
    Client(REMOTE_ADDR="203.0.113.95").get(EVENTS, {"search": "' OR 1=1--"})
    assert not ThreatEvent.objects.exists()


def test_bad_threat_settings_refuse_to_start(settings):
    settings.THREAT_SCORES = {"sqli": 5}
    with pytest.raises(ImproperlyConfigured, match="unknown kinds"):
        threats.check_threat_settings()
    settings.THREAT_SCORES = {}
    settings.THREAT_404_BURST = "many"
    with pytest.raises(ImproperlyConfigured, match="THREAT_404_BURST"):
        threats.check_threat_settings()


@pytest.mark.django_db
def test_clearing_scores_keeps_the_events(armed):
    threats.record(kind=ThreatKind.XSS, network="203.0.113.96")
    assert threats.clear_scores() == 1
    assert IPActivity.objects.get().score == 0 and ThreatEvent.objects.count() == 1


def test_the_password_of_the_persona_is_not_a_probe():
    # personas log in with this password in every test: it must never look like an attack
    assert threats.find_probe(LOGIN, f"password={PASSWORD}") is None
