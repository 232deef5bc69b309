"""The services API: CRUD with strict validation and role permissions, health in detail with
a forced check, and the status overview; each state change audited."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from compliance.models import AuditEvent
from compliance.personal import revealed
from recovery.models import HealOperation, HealthCheck, Service
from security.models import StoredSecret
from tests.conftest import client_for, free_port, make_user
from tests.recovery.probe_servers import make_service, scripted_http_server

pytestmark = pytest.mark.django_db
SERVICES = "/api/recovery/services"
STATUS = "/api/recovery/status"


@pytest.fixture(autouse=True)
def _no_healing(settings) -> None:
    settings.ENABLE_SELF_HEALING = False
    settings.RECOVERY_RESTART_COMMANDS = {"restart-web": ["systemctl", "restart", "web"]}


def create(api, **body):
    body.setdefault("kind", "http")
    body.setdefault("target", "https://app.example.org/health")
    return api.post(SERVICES, body, format="json")


# --- CRUD ----------------------------------------------------------------------------------


def test_an_operator_adds_lists_changes_and_removes_a_service(operator_api):
    # when
    created = create(operator_api, name="billing", critical=False, heal_strategies=["reconnect"])
    # then
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["name"] == "billing" and body["status"] == "unknown"
    assert body["timeout_ms"] == 5000 and body["critical"] is False and not body["builtin"]
    event = AuditEvent.objects.get(action="recovery.service.created")
    assert event.object_id == "billing" and revealed(event).actor_username == "olivia"

    listed = operator_api.get(SERVICES, {"kind": "http"}).json()
    assert [s["name"] for s in listed["results"]] == ["billing"]
    assert operator_api.get(SERVICES, {"critical": "true", "kind": "http"}).json()["count"] == 0
    assert operator_api.get(SERVICES, {"status": "unknown", "kind": "http"}).json()["count"] == 1

    changed = operator_api.patch(f"{SERVICES}/billing", {"timeout_ms": 900}, format="json")
    assert changed.status_code == 200, changed.content
    assert changed.json()["timeout_ms"] == 900
    update = AuditEvent.objects.get(action="recovery.service.updated")
    assert update.details_data["changed"] == {"timeout_ms": 900}

    removed = operator_api.delete(f"{SERVICES}/billing")
    assert removed.status_code == 200 and removed.json()["name"] == "billing"
    assert not Service.objects.filter(name="billing").exists()
    assert AuditEvent.objects.filter(action="recovery.service.deleted").count() == 1
    assert operator_api.get(f"{SERVICES}/billing").status_code == 404


def test_the_list_registers_bridges_own_services_which_cannot_be_removed(operator_api):
    names = [s["name"] for s in operator_api.get(SERVICES).json()["results"]]
    assert "bridge-workers" in names
    refused = operator_api.delete(f"{SERVICES}/bridge-workers")
    assert refused.status_code == 409
    assert refused.json()["code"] == "builtin"
    moved = operator_api.patch(f"{SERVICES}/bridge-workers", {"target": "elsewhere"}, format="json")
    assert moved.status_code == 400 and "target" in moved.json()
    tuned = operator_api.patch(f"{SERVICES}/bridge-workers", {"timeout_ms": 2000}, format="json")
    assert tuned.status_code == 200


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"target": "https://admin:pw@app.example.org/"}, "target", "credential"),
        ({"target": "https://app.example.org/?token=abc"}, "target", "credential"),
        ({"kind": "redis", "target": "user:pw@cache:6379"}, "target", "credential"),
        ({"kind": "postgres", "target": "db.example.org"}, "target", "host:port"),
        ({"kind": "tcp", "target": "db.example.org:99999"}, "target", "65535"),
        ({"kind": "http", "target": "ftp://files.example.org/"}, "target", "http"),
        ({"kind": "tcp", "target": "bad host!:80"}, "target", "host"),
        ({"kind": "smtp"}, "kind", "valid choice"),
        ({"name": "bridge-mine"}, "name", "Bridge's own"),
        ({"name": "has space"}, "name", "pattern"),
        ({"timeout_ms": "900"}, "timeout_ms", "integer"),
        ({"timeout_ms": 10}, "timeout_ms", "100"),
        ({"critical": "yes"}, "critical", "boolean"),
        ({"heal_strategies": ["reboot"]}, "heal_strategies", "valid choice"),
        ({"heal_strategies": ["restart_command"]}, "heal_strategies", "restart_command"),
        ({"restart_command": "rm-rf"}, "restart_command", "RECOVERY_RESTART_COMMANDS"),
        ({"depends_on": ["nowhere"]}, "depends_on", "nowhere"),
        ({"credential": "no-such-secret"}, "credential", "does not exist"),
        ({"expect_status": 99}, "expect_status", "100"),
    ],
)
def test_invalid_services_are_refused_naming_the_field(operator_api, body, field, words):
    body.setdefault("name", "app")
    response = create(operator_api, **body)
    assert response.status_code == 400, response.content
    message = str(response.json()[field])
    assert words in message, message
    assert not Service.objects.filter(name="app").exists()


def test_a_dependency_cycle_is_refused(operator_api):
    assert create(operator_api, name="a").status_code == 201
    assert create(operator_api, name="b", depends_on=["a"]).status_code == 201
    assert create(operator_api, name="c", depends_on=["b"]).status_code == 201
    cycle = operator_api.patch(f"{SERVICES}/a", {"depends_on": ["c"]}, format="json")
    assert cycle.status_code == 400
    assert "cycle" in cycle.json()["depends_on"][0]
    itself = operator_api.patch(f"{SERVICES}/a", {"depends_on": ["a"]}, format="json")
    assert itself.status_code == 400
    assert create(operator_api, name="a").status_code == 400  # the name is taken


def test_attaching_a_stored_secret_needs_the_secrets_keepers_permission(operator_api, admin_api):
    StoredSecret.objects.create(name="app-token", value="t0ken")
    refused = create(operator_api, name="app", credential="app-token")
    assert refused.status_code == 400
    assert "security.change_storedsecret" in refused.json()["credential"][0]
    allowed = create(admin_api, name="app", credential="app-token")
    assert allowed.status_code == 201
    assert allowed.json()["credential"] == "app-token"
    assert "t0ken" not in allowed.content.decode()


# --- Permissions ---------------------------------------------------------------------------


def test_services_need_authentication_and_the_recovery_permissions(
    anon_api, compliance_api, operator
):
    assert anon_api.get(SERVICES).status_code == 401
    assert anon_api.get(STATUS).status_code == 401
    assert compliance_api.get(SERVICES).status_code == 403
    assert compliance_api.get(STATUS).status_code == 403
    assert create(compliance_api, name="x").status_code == 403
    viewer = make_user("vera")
    viewer.user_permissions.add(Permission.objects.get(codename="view_service"))
    api = client_for(viewer)
    assert api.get(SERVICES).status_code == 200
    assert create(api, name="x").status_code == 403
    make_service(name="t-seen")
    assert api.patch(f"{SERVICES}/t-seen", {}, format="json").status_code == 403
    assert api.delete(f"{SERVICES}/t-seen").status_code == 403
    assert api.get("/api/recovery/health/t-seen").status_code == 200
    forced = api.get("/api/recovery/health/t-seen", {"fresh": "true"})
    assert forced.status_code == 403
    assert "recovery.check_service" in forced.json()["detail"]


# --- Health and status ---------------------------------------------------------------------


def test_health_in_detail_can_force_a_fresh_check_which_is_audited(operator_api):
    with scripted_http_server() as peer:
        service = make_service(name="t-web", target=peer.url)
        plain = operator_api.get("/api/recovery/health/t-web")
        assert plain.status_code == 200
        assert plain.json()["checks"] == [] and plain.json()["fresh"] is False
        fresh = operator_api.get("/api/recovery/health/t-web", {"fresh": "true"})
    assert fresh.status_code == 200, fresh.content
    body = fresh.json()
    assert body["fresh"] is True
    assert body["service"]["status"] == "up"
    assert body["checks"][0]["ok"] is True and body["checks"][0]["forced"] is True
    assert body["checks"][0]["latency_ms"] > 0
    assert body["transitions"][0]["to_status"] == "up"
    assert body["breaker"]["name"] == "t-web"
    assert HealthCheck.objects.filter(service=service).count() == 1
    event = AuditEvent.objects.get(action="recovery.service.checked")
    assert event.details_data["ok"] is True
    assert operator_api.get("/api/recovery/health/t-web", {"fresh": "maybe"}).status_code == 400
    assert operator_api.get("/api/recovery/health/nothing-here").status_code == 404


def test_status_lists_every_service_worst_first_with_heals_and_an_overall_word(operator_api):
    now = timezone.now()
    make_service(name="t-a", status="up", last_checked_at=now)
    down = make_service(
        name="t-b",
        kind="tcp",
        target=f"127.0.0.1:{free_port()}",
        status="down",
        last_checked_at=now,
    )
    HealOperation.objects.create(service=down, trigger="down", started_at=now)
    body = operator_api.get(STATUS).json()
    assert body["status"] == "down"
    assert body["services"][0]["name"] == "t-b"
    assert body["services"][0]["breaker"]["state"] in ("closed", "open", "half_open")
    assert [heal["service"] for heal in body["active_heals"]] == ["t-b"]
    assert isinstance(body["retries"], list)
    names = [s["name"] for s in body["services"]]
    assert "bridge-workers" in names


@pytest.mark.parametrize("name", ["a\x00b", "x" * 65, ""])
def test_a_name_the_pattern_refuses_never_reaches_the_database(operator_api, name):
    response = create(operator_api, name=name)
    assert response.status_code == 400
    assert "name" in response.json()


# --- Console -------------------------------------------------------------------------------


def console_for(user):
    from django.test import Client

    user.is_staff = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


def test_the_console_lists_services_with_health_sparkline_and_breaker(operator):
    with scripted_http_server() as peer:
        service = make_service(name="t-shop", target=peer.url)
        from recovery import monitor

        for _ in range(3):
            monitor.check_now(service)
    client = console_for(operator)
    page = client.get("/admin/recovery/service/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "t-shop" in html and "bridge-workers" in html
    assert "<polyline" in html  # the latency sparkline
    assert "closed" in html  # the breaker
    detail = client.get(f"/admin/recovery/service/{service.pk}/change/")
    assert detail.status_code == 200
    for history in ("healthcheck", "healthtransition", "alert"):
        assert client.get(f"/admin/recovery/{history}/").status_code == 200


def test_the_check_now_action_probes_and_audits(operator):
    service = make_service(name="t-gone", kind="tcp", target=f"127.0.0.1:{free_port()}")
    client = console_for(operator)
    response = client.post(
        "/admin/recovery/service/",
        {"action": "check_now", "_selected_action": [service.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert "Checked t-gone" in response.content.decode()
    assert HealthCheck.objects.filter(service=service, forced=True).count() == 1
    assert AuditEvent.objects.filter(action="recovery.service.checked").count() == 1


def test_the_dashboard_shows_services_worst_first(operator):
    now = timezone.now()
    make_service(name="t-fine", status="up", last_checked_at=now)
    make_service(name="t-broken", status="down", last_checked_at=now, status_reason="HTTP 500")
    client = console_for(operator)
    panels = {shown.panel.key: shown.content for shown in client.get("/admin/").context["panels"]}
    content = panels["recovery-services"]
    assert content.rows[0].label == "t-broken" and content.rows[0].state == "bad"
    assert content.badge == "down"
    assert "recovery" in panels  # the readiness panel stays


@pytest.mark.parametrize("query", [{"critical": "2"}, {"builtin": "yes"}, {"status": "fine"}])
def test_a_filter_value_outside_its_type_is_refused_naming_it(operator_api, query):
    # django-filter's boolean read "2" as "no filter": the fuzz found the 200
    response = operator_api.get(SERVICES, query)
    assert response.status_code == 400
    assert next(iter(query)) in response.json()
