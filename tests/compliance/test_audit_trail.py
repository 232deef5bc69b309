from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import DatabaseError, connection, transaction
from django.test import override_settings
from rest_framework.test import APIClient

from compliance import audit, chain, verification
from compliance.audit import AuditContext
from compliance.models import AuditEvent, AuditSeal, AuditVerification
from compliance.personal import revealed
from tests.conftest import PASSWORD, bypass_triggers, make_user, need, on_postgres
from tests.http import call

EVENTS = "/api/compliance/audit/events"
VERIFY = "/api/compliance/audit/verify"
LOG = "/api/compliance/audit/log"


def _request_events(path: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="api.request", path=path).order_by("id"))


@pytest.mark.django_db
def test_jwt_requests_are_recorded_with_the_actor_by_name(compliance_api):
    response = compliance_api.get(EVENTS, {"page_size": 5}, HTTP_X_REQUEST_ID="req-42")
    assert response.status_code == 200
    [event] = _request_events(EVENTS)
    # the actor and the address are sealed under carla's key (hash version 2), not in clear
    shown = revealed(event)
    assert (shown.actor_username, event.method, event.status_code) == ("carla", "GET", 200)
    assert (event.actor_username, event.client_ip) == ("", None)
    assert event.request_id == "req-42" == response["X-Request-ID"]
    assert shown.client_ip == "127.0.0.1"
    assert event.latency_ms > 0
    assert event.details_data["query"] == {"page_size": "5"}


@pytest.mark.django_db
def test_401_403_and_404_are_recorded(anon_api, outsider_api):
    assert anon_api.get(EVENTS).status_code == 401
    assert outsider_api.get(EVENTS).status_code == 403
    assert outsider_api.get("/api/compliance/nothing-here").status_code == 404
    statuses = [(revealed(e).actor_username, e.status_code) for e in _request_events(EVENTS)]
    assert statuses == [("", 401), ("otto", 403)]
    assert _request_events("/api/compliance/nothing-here")[0].status_code == 404


@pytest.mark.django_db
def test_500_is_recorded_and_answered_in_json(compliance_api, monkeypatch):
    def explode(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(verification, "latest_verification", explode)
    compliance_api.raise_request_exception = False
    response = compliance_api.get(VERIFY)
    assert response.status_code == 500
    assert response.json()["detail"] == "Internal server error."
    assert _request_events(VERIFY)[0].status_code == 500


@pytest.mark.django_db
@override_settings(ENABLE_AUDIT_LOGGING=False)
def test_request_logging_can_be_switched_off(compliance_api):
    compliance_api.get(EVENTS)
    assert _request_events(EVENTS) == []


@pytest.mark.django_db
def test_custom_event_is_recorded_under_custom_with_secrets_redacted(operator_api):
    response = operator_api.post(
        LOG,
        {
            "action": "maintenance.window",
            "object_type": "service",
            "object_id": "db-1",
            "details": {"note": "patching", "api_key": "sk-live-123", "nested": {"password": "x"}},
        },
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    assert body["action"] == "custom.maintenance.window"
    assert body["details"] == {
        "note": "patching",
        "api_key": "[REDACTED]",
        "nested": {"password": "[REDACTED]"},
    }
    stored = "".join(AuditEvent.objects.values_list("details", flat=True))
    assert "sk-live-123" not in stored


@pytest.mark.django_db
def test_custom_event_with_a_bad_action_name_is_400_naming_the_field(operator_api):
    response = operator_api.post(LOG, {"action": "Auth Login!"}, format="json")
    assert response.status_code == 400
    assert "action" in response.json()


@pytest.mark.django_db
def test_event_list_filters_and_counts(compliance_api, operator_api, compliance_officer):
    # given
    operator_api.post(LOG, {"action": "one"}, format="json")
    operator_api.post(LOG, {"action": "two"}, format="json")
    # when / then
    custom = compliance_api.get(EVENTS, {"action": "custom.one"}).json()
    assert custom["count"] == 1 and custom["results"][0]["actor_username"] == "olivia"
    by_actor = compliance_api.get(EVENTS, {"actor": "olivia", "page_size": 2}).json()
    olivias = [e for e in AuditEvent.objects.all() if revealed(e).actor_username == "olivia"]
    assert by_actor["count"] == len(olivias) >= 2
    assert len(by_actor["results"]) == 2 and by_actor["next"]
    everything = compliance_api.get(EVENTS, {"page_size": 1}).json()
    # the listing request's own event is written after its response was built
    assert everything["count"] == AuditEvent.objects.count() - 1
    future = compliance_api.get(EVENTS, {"from": "2999-01-01T00:00:00Z"}).json()
    assert future["count"] == 0


@pytest.mark.django_db
def test_event_list_with_a_bad_date_is_400_naming_the_field(compliance_api):
    response = compliance_api.get(EVENTS, {"from": "yesterday"})
    assert response.status_code == 400
    assert "from" in response.json()


@pytest.mark.django_db
def test_sealed_chain_verifies_over_the_api(compliance_api, verify):
    compliance_api.get(EVENTS)
    chain.seal_all_pending()
    body = verify()
    assert body["ok"] is True
    assert body["checked"] == AuditEvent.objects.filter(seal__isnull=False).count() > 0
    assert body["first_broken_id"] is None
    assert AuditVerification.objects.get(pk=body["verification_id"]).ok is True


@pytest.mark.django_db
def test_verification_reports_events_not_sealed_yet(verify):
    chain.seal_all_pending()
    audit.record_event(action="custom.late")
    body = verify()
    assert body["ok"] is True and body["unsealed"] >= 1


@pytest.mark.django_db
def test_a_tampered_row_is_found_and_named(verify):
    # given a sealed chain of several events
    for n in range(5):
        audit.record_event(action=f"custom.e{n}", details={"n": n})
    chain.seal_all_pending()
    target = AuditEvent.objects.get(action="custom.e2")
    # when someone with database rights rewrites it
    bypass_triggers(
        "UPDATE compliance_auditevent SET details = %s WHERE id = %s", ['{"n":99}', target.pk]
    )
    # then
    body = verify()
    assert body["ok"] is False
    assert body["first_broken_id"] == target.pk
    assert AuditEvent.objects.filter(action="audit.broken").exists()


@pytest.mark.django_db
@pytest.mark.parametrize("seal_removed_too", [False, True], ids=["event", "event-and-seal"])
def test_a_removed_row_is_found(verify, seal_removed_too):
    for n in range(5):
        audit.record_event(action=f"custom.e{n}")
    chain.seal_all_pending()
    victim = AuditEvent.objects.get(action="custom.e2")
    after = AuditEvent.objects.get(action="custom.e3")
    if seal_removed_too:
        bypass_triggers("DELETE FROM compliance_auditseal WHERE event_id = %s", [victim.pk])
    bypass_triggers("DELETE FROM compliance_auditevent WHERE id = %s", [victim.pk])
    body = verify()
    # while its seal survives, the removed event itself is named; without it, the gap is
    assert (body["ok"], body["first_broken_id"]) == (
        False,
        after.pk if seal_removed_too else victim.pk,
    )
    assert "missing" in body["reason"]


@pytest.mark.django_db
def test_removing_the_newest_sealed_rows_is_found(verify):
    for n in range(3):
        audit.record_event(action=f"custom.e{n}")
    chain.seal_all_pending()
    last = AuditEvent.objects.filter(seal__isnull=False).order_by("-seal__seq").first()
    bypass_triggers("DELETE FROM compliance_auditevent WHERE id = %s", [last.pk])
    body = verify()
    assert (body["ok"], body["first_broken_id"]) == (False, last.pk)


@pytest.mark.django_db
def test_verify_command_exits_1_naming_the_broken_event(python):

    audit.record_event(action="custom.a")
    chain.seal_all_pending()
    event = AuditEvent.objects.get(action="custom.a")
    bypass_triggers(
        "UPDATE compliance_auditevent SET actor_username = 'mallory' WHERE id = %s", [event.pk]
    )
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError) as failure:
        call_command("verify_audit_chain")
    assert failure.value.returncode == 1
    assert f"event id {event.pk}" in str(failure.value)


@pytest.mark.django_db
def test_verify_command_succeeds_on_an_intact_chain(capsys):
    from django.core.management import call_command

    audit.record_event(action="custom.a")
    call_command("verify_audit_chain", "--seal")
    assert "audit chain intact: " in capsys.readouterr().out


@pytest.mark.django_db
def test_admin_changes_are_recorded(admin_user, operator):
    client = APIClient()
    client.force_login(admin_user)
    response = client.post(
        f"/admin/security/user/{operator.pk}/change/",
        {
            "username": "olivia",
            "is_active": "on",
            "email": "olivia@example.org",
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
            "groups": [g.pk for g in operator.groups.all()],
        },
    )
    assert response.status_code == 302, response.content[:2000]
    event = AuditEvent.objects.get(action="admin.change")
    assert revealed(event).actor_username == "root"
    assert event.object_type == "security.user" and event.object_id == str(operator.pk)
    assert event.details_data["operation"] == "change"


@pytest.mark.django_db
def test_admin_logins_are_recorded(operator):
    operator.is_staff = True
    operator.save()
    client = APIClient()
    client.post("/admin/login/?next=/admin/", {"username": "olivia", "password": "bad"})
    client.post("/admin/login/?next=/admin/", {"username": "olivia", "password": PASSWORD})
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    # each login form sent is also an admin.request (its password redacted)
    assert actions == [
        "auth.login.failed",
        "admin.request",
        "auth.login.succeeded",
        "admin.request",
    ]


# --- PostgreSQL: the database itself refuses rewriting history ------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE compliance_auditevent SET action = 'x'",
        "DELETE FROM compliance_auditevent",
        "TRUNCATE compliance_auditevent",
        "UPDATE compliance_auditseal SET hash = repeat('a', 64)",
        "DELETE FROM compliance_auditseal",
        "TRUNCATE compliance_auditseal",
    ],
)
def test_postgres_refuses_update_delete_and_truncate_of_events_and_seals(postgres, sql):
    audit.record_event(action="custom.keep")
    chain.seal_all_pending()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql)
    assert AuditEvent.objects.filter(action="custom.keep").exists()
    assert AuditSeal.objects.count() == 1


def _commit_late(event: AuditEvent) -> None:
    """Put a removed event back under its old id, as a transaction committing late would."""
    bypass_triggers(
        "INSERT INTO compliance_auditevent (id, occurred_at, actor_username, request_id, action,"
        " object_type, object_id, method, path, details) VALUES"
        " (%s, %s, '', '', %s, '', '', '', '', '{}')",
        [event.pk, event.occurred_at, event.action],
    )


@pytest.mark.django_db
def test_an_event_committed_after_newer_ones_were_sealed_is_sealed_next_time(monkeypatch):
    monkeypatch.setattr(chain, "STRAGGLER_CHECK_SECONDS", 0)
    # given a straggler: its id is below the newest sealed event's
    audit.record_event(action="custom.first")
    audit.record_event(action="custom.second")
    straggler = AuditEvent.objects.get(action="custom.first")
    bypass_triggers("DELETE FROM compliance_auditevent WHERE id = %s", [straggler.pk])
    chain.seal_all_pending()
    _commit_late(straggler)
    # when
    sealed = chain.seal_all_pending()
    # then
    assert sealed == 1
    assert AuditSeal.objects.get(event_id=straggler.pk).seq == 2
    result = verification.check_chain()
    assert (result.ok, result.checked, result.unsealed) == (True, 2, 0)


@pytest.mark.django_db
def test_a_straggler_older_than_the_window_is_found_by_the_sweep(monkeypatch):
    monkeypatch.setattr(chain, "STRAGGLER_WINDOW", 1)
    monkeypatch.setattr(chain, "STRAGGLER_CHECK_SECONDS", 0)
    for n in range(4):
        audit.record_event(action=f"custom.e{n}")
    straggler = AuditEvent.objects.get(action="custom.e0")
    bypass_triggers("DELETE FROM compliance_auditevent WHERE id = %s", [straggler.pk])
    chain.seal_all_pending()
    _commit_late(straggler)
    assert chain.seal_all_pending() == 0
    assert verification.check_chain().unsealed == 1
    assert chain.seal_all_pending(sweep=True) == 1
    assert verification.check_chain().unsealed == 0


# --- Concurrency through a real gunicorn with two workers ----------------------------------


def test_20_concurrent_requests_leave_a_chain_that_verifies(server):
    # given
    make_user("carla", "compliance_officer")
    token = call(
        "POST", f"{server}/api/security/auth/login", {"username": "carla", "password": PASSWORD}
    ).body["access"]
    before = AuditEvent.objects.count()

    # when 20 requests run at once while sealers race each other
    def fire(n: int) -> int:
        if n % 5 == 0:
            chain.seal_all_pending()
            connection.close()
        return call("GET", f"{server}{EVENTS}?page_size=3", token=token).status

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(fire, range(20)))

    # then every request is recorded once and the chain holds all of them, in one line
    assert statuses == [200] * 20
    assert AuditEvent.objects.count() == before + 20
    chain.seal_all_pending()
    result = verification.check_chain()
    assert (result.ok, result.unsealed) == (True, 0)
    assert result.checked == AuditEvent.objects.count()
    seqs = sorted(AuditSeal.objects.values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


def test_concurrent_sealers_never_fork_the_chain(postgres, transactional_db):
    need(on_postgres(), "needs PostgreSQL")
    for n in range(300):
        audit.record_event(action=f"custom.n{n % 7}")

    def seal(_: int) -> int:
        try:
            return chain.seal_pending_events(batch=37)
        finally:
            connection.close()

    with ThreadPoolExecutor(6) as pool:
        while AuditEvent.objects.filter(seal__isnull=True).exists():
            list(pool.map(seal, range(6)))
    result = verification.check_chain()
    assert (result.ok, result.checked) == (True, 300)


@pytest.mark.django_db
def test_event_rendering_matches_drf_field_by_field(compliance_api):
    # The list serializer renders by hand for speed; it must equal DRF's declared fields.
    from rest_framework import serializers as drf

    from compliance.api.serializers import AuditEventSerializer

    audit.record_event(action="custom.x", details={"a": 1}, status_code=201, latency_ms=2.5)
    chain.seal_all_pending()
    event = AuditEvent.objects.get(action="custom.x")
    fast = AuditEventSerializer(event).data
    slow = drf.ModelSerializer.to_representation(AuditEventSerializer(), event)
    assert dict(fast) == dict(slow)


@pytest.mark.django_db
def test_total_count_adds_unsealed_events_to_the_sealed_ones():
    for n in range(3):
        audit.record_event(action=f"custom.s{n}")
    chain.seal_all_pending()
    for n in range(2):
        audit.record_event(action=f"custom.u{n}")
    assert chain.total_event_count() == 5 == AuditEvent.objects.count()


@pytest.mark.django_db
def test_console_search_finds_events_by_exact_username_request_id_or_ip(admin_user):
    from django.test import Client

    audit.record_event(action="custom.a", context=AuditContext().with_actor(admin_user))
    audit.record_event(action="custom.b")
    client = Client()
    client.force_login(admin_user)
    page = client.get("/admin/compliance/auditevent/", {"q": "root"})
    assert page.status_code == 200
    shown = {event.action for event in page.context["cl"].result_list}
    assert "custom.a" in shown and "custom.b" not in shown
    assert (
        client.get("/admin/compliance/auditevent/", {"q": "ROOT"}).context["cl"].result_count == 0
    )


@pytest.mark.django_db
@pytest.mark.parametrize("group_commit", [True, False])
def test_a_request_whose_event_cannot_be_written_is_answered_503_not_200(
    compliance_api, monkeypatch, settings, group_commit
):
    # given the audit table refuses writes
    settings.AUDIT_GROUP_COMMIT = group_commit

    def refuse(*args, **kwargs):
        raise DatabaseError("disk full")

    monkeypatch.setattr(audit, "insert_event_rows", refuse)
    monkeypatch.setattr("compliance.writer.insert_event_rows", refuse)
    monkeypatch.setattr("compliance.middleware.record_event", refuse)
    # when
    response = compliance_api.get(EVENTS)
    # then the client is not told the call succeeded unrecorded
    assert response.status_code == 503
    assert "audit trail is unavailable" in response.json()["detail"]
    assert response.json()["request_id"] == response["X-Request-ID"]


@pytest.mark.django_db
def test_verification_reports_progress_as_it_goes(monkeypatch, capsys):
    from django.core.management import call_command

    monkeypatch.setattr(verification, "PROGRESS_EVERY", 2)
    for n in range(5):
        audit.record_event(action=f"custom.p{n}")
    chain.seal_all_pending()
    seen: list[tuple[int, int]] = []
    verification.check_chain(on_progress=lambda checked, total: seen.append((checked, total)))
    assert seen == [(2, 5), (4, 5)]
    call_command("verify_audit_chain")
    assert " 40%  2 of 5 events" in capsys.readouterr().out
    run = AuditVerification.objects.get()
    assert (run.checked, run.progress_total, run.percent, run.ok) == (5, 5, 100, True)


@pytest.mark.django_db
def test_nan_and_infinity_in_bodies_cannot_break_the_event_list(compliance_api, operator_api):
    # given an anonymous body with NaN and a custom event whose details overflow to Infinity
    APIClient().post("/api/security/auth/login", data='{"x": NaN}', content_type="application/json")
    assert (
        operator_api.post(
            LOG, data='{"action": "big", "details": {"a": 1e999}}', content_type="application/json"
        ).status_code
        == 201
    )
    # when / then
    response = compliance_api.get(EVENTS)
    assert response.status_code == 200
    stored = "".join(AuditEvent.objects.values_list("details", flat=True))
    assert '"inf"' in stored and '"nan"' in stored


@pytest.mark.django_db
def test_a_deeply_nested_body_is_recorded_by_size(anon_api):
    body = "[" * 5000 + "]" * 5000
    response = anon_api.post("/api/security/auth/login", data=body, content_type="application/json")
    assert response.status_code == 400
    [event] = _request_events("/api/security/auth/login")
    assert event.details_data["body_bytes"] == 10000


@pytest.mark.django_db
def test_a_request_id_with_a_newline_is_replaced(compliance_api):
    response = compliance_api.get(EVENTS, HTTP_X_REQUEST_ID="abc\n")
    assert response["X-Request-ID"] != "abc\n" and len(response["X-Request-ID"]) == 32


@pytest.mark.django_db
def test_beat_installs_the_sealer_every_second_with_stale_ticks_dropped():
    from django.conf import settings
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import ModelEntry

    from bridge.celery import app

    ModelEntry.from_entry(
        "seal-audit-chain", app=app, **settings.CELERY_BEAT_SCHEDULE["seal-audit-chain"]
    )
    task = PeriodicTask.objects.get(name="seal-audit-chain")
    assert (task.interval.every, task.interval.period) == (1, "seconds")
    # A backlog of ticks (worker down, busy) must not turn into a burst of sealer runs.
    assert task.expire_seconds == 10
    assert task.task == "compliance.tasks.seal_audit_chain_task"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "status", "field", "text"),
    [
        ({"page": "abc"}, 400, "page", "whole number"),
        ({"page": "0"}, 400, "page", "1 or more"),
        ({"page_size": "ten"}, 400, "page_size", "whole number"),
        ({"page_size": "501"}, 400, "page_size", "500 or less"),
        ({"page": "99"}, 404, "page", "does not exist"),
    ],
)
def test_bad_paging_is_refused_naming_the_parameter(compliance_api, query, status, field, text):
    response = compliance_api.get(EVENTS, query)
    assert response.status_code == status
    assert text in response.json()[field][0]


@pytest.mark.django_db
def test_the_audit_admin_is_read_only_even_for_a_superuser(admin_user):
    from django.test import Client

    audit.record_event(action="custom.x")
    event = AuditEvent.objects.get(action="custom.x")
    client = Client()
    client.force_login(admin_user)
    base = "/admin/compliance/auditevent/"
    change = client.get(f"{base}{event.pk}/change/")
    assert change.status_code == 200
    assert b'name="_save"' not in change.content  # shown, not editable
    assert client.get(f"{base}add/").status_code == 403
    assert client.post(f"{base}add/", {"action": "custom.forged"}).status_code == 403
    assert client.post(f"{base}{event.pk}/change/", {"action": "custom.forged"}).status_code == 403
    assert client.post(f"{base}{event.pk}/delete/", {"post": "yes"}).status_code == 403
    assert list(AuditEvent.objects.filter(pk=event.pk).values_list("action", flat=True)) == [
        "custom.x"
    ]
    assert not AuditEvent.objects.filter(action="custom.forged").exists()


def _console_ids(client, query: str) -> tuple[list[int], str]:
    import re

    page = client.get(f"/admin/compliance/auditevent/?{query}").content.decode()
    ids = [int(n) for n in re.findall(r"/admin/compliance/auditevent/(\d+)/change/", page)]
    return ids, page


@pytest.mark.django_db
def test_the_console_filters_by_seal_and_status_class(admin_user):
    from django.test import Client

    client = Client()
    client.force_login(admin_user)  # itself an event (auth.login.succeeded)
    for status in (200, 404, 503):
        audit.record_event(action="api.request", status_code=status)
    chain.seal_all_pending()
    later = audit.record_event(action="custom.late")
    sealed = set(AuditEvent.objects.filter(seal__isnull=False).values_list("id", flat=True))
    # waiting for seal: exactly the event recorded after the last seal
    waiting, _ = _console_ids(client, "sealed=no")
    assert waiting == [later]
    # sealed: every sealed event, counted from the chain head
    listed, page = _console_ids(client, "sealed=yes")
    assert set(listed) == sealed
    # (unfold's pagination spreads the count over lines: compare the text, not the markup)
    assert f"{len(sealed)} audit events" in " ".join(page.split())
    # 5xx: only the 503
    server_errors, _ = _console_ids(client, "status_class=5")
    assert [AuditEvent.objects.get(pk=pk).status_code for pk in server_errors] == [503]


@pytest.mark.django_db
def test_the_api_and_the_command_name_the_same_first_broken_event(verify):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    # given events and seals 3-5 of 8 deleted together, as a superuser would
    for n in range(8):
        audit.record_event(action=f"custom.g{n}")
    chain.seal_all_pending()
    ids = list(AuditEvent.objects.order_by("id").values_list("id", flat=True))
    gone = ids[2:5]
    for event_id in gone:
        bypass_triggers("DELETE FROM compliance_auditseal WHERE event_id = %s", [event_id])
        bypass_triggers("DELETE FROM compliance_auditevent WHERE id = %s", [event_id])
    # when both look
    body = verify()
    with pytest.raises(CommandError) as failure:
        call_command("verify_audit_chain")
    # then both name the event right after the gap, and the missing seqs
    assert body["ok"] is False
    assert body["first_broken_id"] == ids[5]
    assert f"at seq 3 (event id {ids[5]})" in str(failure.value)
    assert "seq 3..5 are missing" in body["reason"] and "seq 3..5" in str(failure.value)


@pytest.mark.django_db
def test_every_seal_records_the_hash_version_it_was_made_with():
    audit.record_event(action="custom.v")
    chain.seal_all_pending()
    assert set(AuditSeal.objects.values_list("hash_version", flat=True)) == {
        chain.CURRENT_HASH_VERSION
    }


@pytest.mark.django_db
def test_a_seal_relabelled_with_an_unknown_hash_version_is_reported(verify):
    audit.record_event(action="custom.v")
    chain.seal_all_pending()
    victim = AuditEvent.objects.get(action="custom.v")
    bypass_triggers(
        "UPDATE compliance_auditseal SET hash_version = 7 WHERE event_id = %s", [victim.pk]
    )
    body = verify()
    assert (body["ok"], body["first_broken_id"]) == (False, victim.pk)
    assert body["reason"] == "unknown hash_version 7"


@pytest.mark.django_db
def test_seals_of_an_old_and_a_new_hash_version_verify_together_and_cannot_swap(verify, admin_user):
    # given seals made with version 1, before personal data was sealed
    with override_settings(AUDIT_PERSONAL_DATA=False):
        audit.record_event(action="custom.old", context=AuditContext().with_actor(admin_user))
        chain.seal_all_pending()
    # when version 2 takes over and seals newer events, their personal data sealed
    audit.record_event(action="custom.new", context=AuditContext().with_actor(admin_user))
    chain.seal_all_pending()
    older = AuditEvent.objects.get(action="custom.old")
    newer = AuditEvent.objects.get(action="custom.new")
    assert (older.seal.hash_version, newer.seal.hash_version) == (1, 2)
    assert (older.actor_username, newer.actor_username) == ("root", "")
    # then both verify, each with its own field set
    assert verify()["ok"] is True
    # and a version-2 seal relabelled as version 1 no longer matches
    bypass_triggers(
        "UPDATE compliance_auditseal SET hash_version = 1 WHERE event_id = %s", [newer.pk]
    )
    body = verify()
    assert (body["ok"], body["first_broken_id"]) == (False, newer.pk)
