"""SOX change trails: database triggers record every change of an audited table, bulk and raw
ones too, with who, why and which request; secrets never; the triggers follow the settings."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from compliance import sox
from compliance.audit import AuditContext
from compliance.models import AuditEvent, SoxChange
from recovery.models import Service
from security.models import User
from tests.conftest import make_user, on_postgres

pytestmark = pytest.mark.django_db

CHANGES = "/api/compliance/sox/changes"
SERVICES = "/api/recovery/services"


@pytest.fixture
def resync(settings):
    """A test that changes the audited set gets the triggers of the defaults back after."""
    audited, enabled = list(settings.SOX_AUDITED_MODELS), settings.ENABLE_SOX_COMPLIANCE
    yield
    settings.SOX_AUDITED_MODELS, settings.ENABLE_SOX_COMPLIANCE = audited, enabled
    sox.sync_triggers(audit=False)


def last_change(table: str, pk: object = None) -> SoxChange:
    rows = SoxChange.objects.filter(table_name=table)
    if pk is not None:
        rows = rows.filter(object_pk=str(pk))
    return rows.order_by("-id").first()


def service(name: str = "billing") -> Service:
    return Service.objects.create(name=name, kind="http", target="http://127.0.0.1:1/")


def test_bulk_update_is_recorded_row_by_row_with_before_and_after():
    first, second = service("billing"), service("ledger")
    mark = SoxChange.objects.order_by("-id").values_list("id", flat=True).first() or 0
    # when: one UPDATE statement, no save(), no signal
    Service.objects.filter(pk__in=[first.pk, second.pk]).update(timeout_ms=1234)
    # then
    rows = list(SoxChange.objects.filter(id__gt=mark, table_name="recovery_service"))
    assert {row.object_pk for row in rows} == {str(first.pk), str(second.pk)}
    for row in rows:
        assert row.operation == "UPDATE"
        assert row.model == "recovery.Service"
        assert row.before["timeout_ms"] == 5000
        assert row.after["timeout_ms"] == 1234
        assert row.changed_fields == ["timeout_ms"]
        assert row.actor_id is None and row.actor_username == ""
        if on_postgres():
            assert row.transaction_id is not None


def test_raw_sql_update_is_recorded():
    row = service()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE recovery_service SET target = %s WHERE id = %s", ["http://10.0.0.9/", row.pk]
        )
    change = last_change("recovery_service", row.pk)
    assert change.operation == "UPDATE"
    assert (change.before["target"], change.after["target"]) == (
        "http://127.0.0.1:1/",
        "http://10.0.0.9/",
    )


def test_insert_and_delete_are_recorded_with_the_whole_row():
    row = service()
    inserted = last_change("recovery_service", row.pk)
    assert inserted.operation == "INSERT" and inserted.before is None
    assert inserted.after["name"] == "billing"
    assert "name" in inserted.changed_fields and "target" in inserted.changed_fields
    pk = row.pk
    row.delete()
    deleted = last_change("recovery_service", pk)
    assert deleted.operation == "DELETE" and deleted.after is None
    assert deleted.before["name"] == "billing"


def test_an_update_that_changes_nothing_or_only_runtime_state_is_not_recorded():
    row = service()
    count = SoxChange.objects.count()
    Service.objects.filter(pk=row.pk).update(target=row.target)  # the same value
    # The monitor's health bookkeeping after a check, every few seconds: not configuration.
    Service.objects.filter(pk=row.pk).update(
        status="up", consecutive_successes=3, last_checked_at=timezone.now()
    )
    user = make_user("ursula")
    count = SoxChange.objects.count()
    User.objects.filter(pk=user.pk).update(last_login=timezone.now())  # every login
    assert SoxChange.objects.count() == count
    # A real change still records the whole row, runtime state included.
    Service.objects.filter(pk=row.pk).update(timeout_ms=99, status="down")
    change = last_change("recovery_service", row.pk)
    assert change.changed_fields == ["status", "timeout_ms"]


def test_a_password_never_reaches_the_record_only_whether_it_changed():
    user = make_user("paula")
    old_hash = User.objects.get(pk=user.pk).password
    user.set_password("An-Entirely-New-Passphrase-77")
    user.save()
    new_hash = User.objects.get(pk=user.pk).password
    change = last_change("security_user", user.pk)
    assert change.operation == "UPDATE"
    assert change.before["password"] == sox.SECRET_CHANGED
    assert change.after["password"] == sox.SECRET_CHANGED
    assert "password" in change.changed_fields
    text = json.dumps([change.before, change.after])
    assert old_hash not in text and new_hash not in text
    # Unchanged, it says so, still without the value.
    User.objects.filter(pk=user.pk).update(first_name="Paula")
    change = last_change("security_user", user.pk)
    assert change.after["password"] == sox.SECRET_UNCHANGED
    # (a name is personal data: recorded like a secret, see test_compliance_hardening.py)
    assert change.after["first_name"] == sox.PERSONAL_CHANGED
    assert "first_name" in change.changed_fields
    inserted = SoxChange.objects.filter(
        table_name="security_user", object_pk=str(user.pk), operation="INSERT"
    ).get()
    assert inserted.after["password"] == sox.SECRET_CHANGED
    assert not SoxChange.objects.filter(before__icontains=new_hash).exists()


def test_many_to_many_changes_are_recorded():
    user = make_user("gina")
    group = Group.objects.get_or_create(name="operator")[0]
    user.groups.add(group)
    change = last_change("security_user_groups")
    assert change.operation == "INSERT"
    assert change.model == "security.User_groups"
    assert (change.after["user_id"], change.after["group_id"]) == (user.pk, group.pk)


def test_change_context_names_the_actor_request_and_reason_then_restores_the_session():
    boss = make_user("bea")
    row = service()
    with sox.change_context(actor=boss, request_id="job-42", reason="quarterly review"):
        Service.objects.filter(pk=row.pk).update(timeout_ms=700)
    change = last_change("recovery_service", row.pk)
    assert (change.actor_id, change.actor_username) == (boss.pk, "bea")
    assert (change.request_id, change.reason) == ("job-42", "quarterly review")
    assert sox.current_context() == {
        "actor_id": "",
        "actor_username": "",
        "request_id": "",
        "reason": "",
    }
    # An AuditContext says who as well (a service's own context).
    context = AuditContext(actor_id=boss.pk, actor_username="bea")
    with sox.change_context(actor=context, reason="from a job"):
        Service.objects.filter(pk=row.pk).update(timeout_ms=800)
    assert last_change("recovery_service", row.pk).reason == "from a job"


def test_an_api_change_records_the_jwt_actor_request_id_and_reason(operator, operator_api):
    row = service()
    response = operator_api.patch(
        f"{SERVICES}/{row.name}",
        {"timeout_ms": 900},
        format="json",
        HTTP_X_REQUEST_ID="req-sox-1",
        HTTP_X_CHANGE_REASON="ticket OPS-7: slow upstream",
    )
    assert response.status_code == 200, response.content
    change = last_change("recovery_service", row.pk)
    assert change.after["timeout_ms"] == 900
    assert (change.actor_id, change.actor_username) == (operator.pk, "olivia")
    assert change.request_id == "req-sox-1"
    assert change.reason == "ticket OPS-7: slow upstream"
    # The pooled connection does not carry the request's actor into what follows.
    assert sox.current_context()["actor_username"] == ""
    Service.objects.filter(pk=row.pk).update(timeout_ms=901)
    assert last_change("recovery_service", row.pk).actor_username == ""


def test_a_console_change_records_the_session_user(admin_user, client):
    client.force_login(admin_user)
    row = service()
    pk = row.pk
    response = client.post(
        f"/admin/recovery/service/{pk}/delete/", {"post": "yes"}, HTTP_X_REQUEST_ID="req-admin-1"
    )
    assert response.status_code == 302, response.content[:300]
    change = last_change("recovery_service", pk)
    assert change.operation == "DELETE"
    assert (change.actor_username, change.request_id) == ("root", "req-admin-1")


def test_a_rolled_back_savepoint_does_not_lose_the_actor(operator):
    # The session value set inside a savepoint that rolls back is set again for the next write.
    row = service()
    binding = sox._RequestBinding.__new__(sox._RequestBinding)
    binding.request = type("R", (), {"request_id": "r-1"})()
    binding.request.__dict__["user"] = operator
    binding.connection = connection
    binding.reason = ""
    binding.pushed = None
    with connection.execute_wrapper(binding):
        try:
            with transaction.atomic():
                Service.objects.filter(pk=row.pk).update(timeout_ms=1)
                raise RuntimeError("undo")
        except RuntimeError:
            pass
        Service.objects.filter(pk=row.pk).update(timeout_ms=2)
    binding.close()
    change = last_change("recovery_service", row.pk)
    assert change.after["timeout_ms"] == 2
    assert change.actor_username == "olivia"


def test_sync_is_idempotent():
    assert sox.sync_triggers() == []
    assert sox.sync_triggers() == []
    installed = sox.installed_triggers()
    assert set(installed.values()) >= {"security_user", "recovery_service", "auth_group"}


def test_dropping_a_model_from_the_setting_drops_its_trigger(settings, resync):
    settings.SOX_AUDITED_MODELS = [
        label for label in settings.SOX_AUDITED_MODELS if label != "recovery.Service"
    ]
    changes = sox.sync_triggers()
    assert any("dropped" in change and "recovery_service" in change for change in changes)
    assert "recovery_service" not in sox.installed_triggers().values()
    row = service()
    Service.objects.filter(pk=row.pk).update(timeout_ms=5)
    assert not SoxChange.objects.filter(table_name="recovery_service").exists()
    # and it comes back
    settings.SOX_AUDITED_MODELS = [*settings.SOX_AUDITED_MODELS, "recovery.Service"]
    assert any("installed" in change for change in sox.sync_triggers())
    Service.objects.filter(pk=row.pk).update(timeout_ms=6)
    assert last_change("recovery_service", row.pk).after["timeout_ms"] == 6


def test_sox_off_drops_every_trigger(settings, resync):
    settings.ENABLE_SOX_COMPLIANCE = False
    sox.sync_triggers()
    assert sox.installed_triggers() == {}
    make_user("nobody-sees")
    assert not SoxChange.objects.filter(table_name="security_user").exists()


def test_an_unknown_label_is_skipped_not_fatal(settings, resync, caplog):
    settings.SOX_AUDITED_MODELS = [*settings.SOX_AUDITED_MODELS, "nope.Missing"]
    assert sox.sync_triggers() == []
    assert "nope.Missing" in caplog.text


def test_the_command_reports_what_it_changed(settings, resync, capsys):
    call_command("sync_sox_triggers")
    assert "already in step" in capsys.readouterr().out
    settings.SOX_AUDITED_MODELS = ["recovery.Service"]
    call_command("sync_sox_triggers")
    out = capsys.readouterr().out
    assert "dropped" in out and "1 table(s) audited: recovery_service" in out


# --- PostgreSQL: the database objects themselves ------------------------------------------


def test_a_sync_that_changes_something_is_audited(postgres, settings, resync):
    settings.SOX_AUDITED_MODELS = ["recovery.Service"]
    changes = sox.sync_triggers()
    event = AuditEvent.objects.filter(action="sox.triggers_synced").order_by("-id").first()
    assert event is not None
    assert event.details_data["changes"] == changes
    assert event.details_data["tables"] == ["recovery_service"]


def test_a_disabled_trigger_is_switched_back_on(postgres, resync):
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE recovery_service DISABLE TRIGGER bridge_sox_recovery_service")
    assert sox.sync_triggers() == ["updated bridge_sox_recovery_service on recovery_service"]
    row = service()
    assert last_change("recovery_service", row.pk).operation == "INSERT"


def test_the_change_table_is_append_only(postgres):
    service()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        SoxChange.objects.update(reason="rewritten")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        SoxChange.objects.all().delete()


def test_a_change_in_a_rolled_back_transaction_leaves_no_record(postgres):
    row = service()
    count = SoxChange.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        Service.objects.filter(pk=row.pk).update(timeout_ms=1)
        raise RuntimeError("rolled back")
    assert SoxChange.objects.count() == count


# --- The API -----------------------------------------------------------------------------------


def test_changes_api_lists_and_filters(compliance_api, operator_api):
    row = service()
    operator_api.patch(f"{SERVICES}/{row.name}", {"timeout_ms": 901}, format="json")
    Service.objects.filter(pk=row.pk).update(target="http://127.0.0.1:3/")
    listed = compliance_api.get(CHANGES, {"table": "recovery.Service", "operation": "UPDATE"})
    assert listed.status_code == 200, listed.content
    results = listed.json()["results"]
    assert len(results) == 2 and results[0]["id"] > results[1]["id"]
    assert {r["table_name"] for r in results} == {"recovery_service"}
    by_actor = compliance_api.get(CHANGES, {"actor": "olivia", "table": "recovery_service"})
    [mine] = by_actor.json()["results"]
    assert mine["after"]["timeout_ms"] == 901 and mine["actor_username"] == "olivia"
    future = compliance_api.get(CHANGES, {"from": "2999-01-01T00:00:00Z"})
    assert future.json()["results"] == []
    one = compliance_api.get(f"{CHANGES}/{mine['id']}")
    assert one.status_code == 200 and one.json()["changed_fields"] == ["timeout_ms", "updated_at"]
    assert compliance_api.get(f"{CHANGES}/999999999").status_code == 404
    bad = compliance_api.get(CHANGES, {"operation": "TRUNCATE"})
    assert bad.status_code == 400
    backwards = compliance_api.get(
        CHANGES, {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"}
    )
    assert backwards.status_code == 400


def test_changes_api_needs_view_soxchange(operator_api, outsider_api, anon_api):
    assert outsider_api.get(CHANGES).status_code == 403
    assert operator_api.get(CHANGES).status_code == 403
    assert anon_api.get(CHANGES).status_code == 401


def test_changes_helper_filters_by_time_and_table():
    before = timezone.now()
    row = service()
    mine = sox.changes(since=before, table="recovery_service").filter(object_pk=str(row.pk))
    assert mine.exists()
    assert sox.changes(since=before, table="recovery.Service").filter(pk__in=mine).exists()
    assert not sox.changes(until=before).filter(pk__in=mine).exists()
    assert not sox.changes(since=before, table="auth_group").filter(pk__in=mine).exists()
