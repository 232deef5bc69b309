"""What reaches the trail beyond plain API calls: admin bulk deletes and actions, JWT actors on
paths no view serves, refusals by role, and the lockout's own 429s."""

from __future__ import annotations

import pytest
from django.test import Client
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from compliance.models import AuditEvent
from compliance.personal import revealed
from tests.conftest import PASSWORD, make_user

TASKS = "/admin/django_celery_beat/periodictask/"


def _tasks(*names: str) -> list[PeriodicTask]:
    every, _ = IntervalSchedule.objects.get_or_create(every=30, period=IntervalSchedule.SECONDS)
    return [
        PeriodicTask.objects.create(
            name=name, task="compliance.tasks.seal_audit_chain_task", interval=every
        )
        for name in names
    ]


@pytest.mark.django_db
def test_an_admin_bulk_delete_is_recorded_with_the_rows_it_removed(admin_user):
    # given two tasks (a bulk delete logs its LogEntry rows in one bulk insert: no signal)
    first, second = _tasks("nightly-a", "nightly-b")
    client = Client()
    client.force_login(admin_user)
    # when
    response = client.post(
        TASKS,
        {
            "action": "delete_selected",
            "_selected_action": [first.pk, second.pk],
            "post": "yes",
            "csrfmiddlewaretoken": "csrf-value-never-stored",
        },
    )
    # then
    assert response.status_code == 302
    assert not PeriodicTask.objects.filter(pk__in=[first.pk, second.pk]).exists()
    event = AuditEvent.objects.filter(action="admin.request", path=TASKS).latest("id")
    assert revealed(event).actor_username == "root"
    assert event.method == "POST" and event.status_code == 302
    form = event.details_data["form"]
    assert form["action"] == "delete_selected"
    assert sorted(form["_selected_action"]) == sorted([str(first.pk), str(second.pk)])
    assert form["csrfmiddlewaretoken"] == "[REDACTED]"
    assert "csrf-value-never-stored" not in event.details


@pytest.mark.django_db
def test_an_admin_action_that_logs_nothing_itself_is_recorded(admin_user):
    # given the sealer's schedule, which django-celery-beat's "disable" action turns off with a
    # plain UPDATE (no LogEntry)
    (task,) = _tasks("seal-audit-chain-copy")
    client = Client()
    client.force_login(admin_user)
    # when
    response = client.post(TASKS, {"action": "disable_tasks", "_selected_action": [task.pk]})
    # then
    assert response.status_code == 302
    task.refresh_from_db()
    assert task.enabled is False
    event = AuditEvent.objects.filter(action="admin.request", path=TASKS).latest("id")
    assert event.details_data["form"]["action"] == "disable_tasks"
    assert event.details_data["form"]["_selected_action"] == [str(task.pk)]
    assert revealed(event).actor_username == "root"


@pytest.mark.django_db
def test_an_admin_login_form_is_recorded_without_its_password(admin_user):
    client = Client()
    response = client.post("/admin/login/", {"username": "root", "password": PASSWORD})
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="admin.request", path="/admin/login/")
    assert event.details_data["form"]["password"] == "[REDACTED]"
    assert event.details_data["form"]["username"] == "root"
    assert PASSWORD not in event.details


@pytest.mark.django_db
def test_a_jwt_user_on_an_unknown_api_path_is_recorded_by_name(compliance_api):
    # when no DRF view serves the path, DRF never authenticates the token
    response = compliance_api.get("/api/compliance/nothing-here")
    # then the trail still names the caller
    assert response.status_code == 404
    event = AuditEvent.objects.get(action="api.request", path="/api/compliance/nothing-here")
    assert (revealed(event).actor_username, event.status_code) == ("carla", 404)
    assert event.actor_id is not None


@pytest.mark.django_db
def test_a_bad_token_on_an_unknown_api_path_is_recorded_as_anonymous(anon_api):
    anon_api.credentials(HTTP_AUTHORIZATION="Bearer not-a-token")
    assert anon_api.get("/api/compliance/nothing-here").status_code == 404
    event = AuditEvent.objects.get(action="api.request", path="/api/compliance/nothing-here")
    assert (event.actor_username, event.actor_id) == ("", None)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/compliance/audit/log", {"action": "deploy"}),
        ("get", "/api/compliance/audit/verify", None),
        ("get", "/api/compliance/audit/events", None),
    ],
)
def test_compliance_endpoints_refuse_other_roles_and_record_the_refusal(
    operator_api, outsider_api, method, path, body
):
    for client, who in ((operator_api, "olivia"), (outsider_api, "otto")):
        response = getattr(client, method)(path, body, format="json")
        if path.endswith("/log") and who == "olivia":
            # recording a custom event is open to every role (deploy markers from any team)
            assert response.status_code == 201, response.content
            continue
        assert response.status_code == 403, (who, response.content)
        assert response.json()["code"] == "permission_denied"
        event = AuditEvent.objects.filter(action="api.request", path=path).latest("id")
        assert (revealed(event).actor_username, event.status_code) == (who, 403)


@pytest.mark.django_db
def test_lockout_429s_are_in_the_trail_as_api_requests(anon_api):
    make_user("locky")
    for _ in range(6):
        anon_api.post(
            "/api/security/auth/login", {"username": "locky", "password": "no"}, format="json"
        )
    statuses = list(
        AuditEvent.objects.filter(action="api.request", path="/api/security/auth/login")
        .order_by("id")
        .values_list("status_code", flat=True)
    )
    assert statuses == [401, 401, 401, 401, 429, 429]


@pytest.mark.django_db
def test_long_admin_form_values_are_capped_in_the_trail(admin_user):
    client = Client()
    client.force_login(admin_user)
    client.post(TASKS, {"action": "disable_tasks", "_selected_action": [], "note": "x" * 5000})
    event = AuditEvent.objects.filter(action="admin.request", path=TASKS).latest("id")
    assert event.details_data["form"]["note"] == "x" * 1000
