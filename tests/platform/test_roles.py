"""Roles are a map in code, synchronised after migrate, checked with has_perm everywhere."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management.sql import emit_post_migrate_signal
from django.test import Client

from bridge import roles
from bridge.roles import ROLE_PERMISSIONS, Role
from security.models import User
from tests.conftest import PASSWORD, client_for, make_user

EVENTS = "/api/compliance/audit/events"


def _codes(group: Group) -> set[str]:
    return {
        f"{app}.{code}"
        for app, code in group.permissions.values_list("content_type__app_label", "codename")
    }


@pytest.mark.django_db
def test_each_role_group_holds_exactly_the_permissions_of_the_map():
    for role, entries in ROLE_PERMISSIONS.items():
        group = Group.objects.get(name=role)
        expected = {
            f"{app}.{code}"
            for app, code in roles.resolve(entries).values_list(
                "content_type__app_label", "codename"
            )
        }
        assert expected, f"{role} resolves to no permission"
        assert _codes(group) == expected


@pytest.mark.django_db
def test_the_map_names_only_permissions_that_exist():
    for entries in ROLE_PERMISSIONS.values():
        for entry in entries:
            assert roles.resolve((entry,)).exists(), f"{entry} matches no permission"


@pytest.mark.django_db
def test_migrate_puts_a_hand_edited_group_back_to_the_map(monkeypatch):
    # given a permission granted by hand in the console, and one added to the map in code
    group = Group.objects.get(name=Role.OPERATOR)
    group.permissions.add(Permission.objects.get(codename="delete_user"))
    monkeypatch.setitem(
        ROLE_PERMISSIONS,
        Role.OPERATOR,
        (*ROLE_PERMISSIONS[Role.OPERATOR], "django_celery_beat.change_periodictask"),
    )
    # when migrate finishes (it sends post_migrate)
    emit_post_migrate_signal(verbosity=0, interactive=False, db="default")
    # then the group is the map again: the hand-made grant gone, the new entry there
    codes = _codes(group)
    assert "security.delete_user" not in codes
    assert "django_celery_beat.change_periodictask" in codes


@pytest.mark.django_db
def test_a_single_permission_without_a_role_is_enough_because_has_perm_decides():
    # given a user with no group, granted only the permission to view audit events
    user = make_user("vera")
    user.user_permissions.add(Permission.objects.get(codename="view_auditevent"))
    api = client_for(user)
    # then the event list opens, and what needs another permission stays closed
    assert api.get(EVENTS).status_code == 200
    refused = api.post("/api/compliance/audit/verify")
    assert refused.status_code == 403
    assert refused.json()["code"] == "permission_denied"
    assert "compliance.verify_chain" in refused.json()["detail"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("role", "allowed"),
    [(Role.COMPLIANCE_OFFICER, True), (Role.OPERATOR, False), (Role.SECURITY_OFFICER, False)],
)
def test_the_api_and_the_console_agree_on_who_sees_the_audit_trail(role, allowed):
    user = make_user(f"u-{role}", role)
    User.objects.filter(pk=user.pk).update(is_staff=True)
    api = client_for(user)
    console = Client()
    console.force_login(user)
    api_status = api.get(EVENTS).status_code
    console_status = console.get("/admin/compliance/auditevent/").status_code
    assert (api_status == 200, console_status == 200) == (allowed, allowed)
    assert api_status in (200, 403) and console_status in (200, 403)


@pytest.mark.django_db
def test_custom_events_may_be_logged_by_every_role_and_nobody_else(
    operator_api, security_officer, compliance_api, outsider_api
):
    payload = {"action": "deploy", "details": {"v": 1}}
    for api in (operator_api, client_for(security_officer), compliance_api):
        assert api.post("/api/compliance/audit/log", payload, format="json").status_code == 201
    assert outsider_api.post("/api/compliance/audit/log", payload, format="json").status_code == 403


def _auth_queries(captured) -> int:
    return sum("auth_permission" in query["sql"] for query in captured.captured_queries)


@pytest.mark.django_db
def test_permission_sets_are_cached_so_a_request_asks_the_database_nothing_about_them(
    compliance_api,
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    compliance_api.get(EVENTS)  # fills the cache
    with CaptureQueriesContext(connection) as captured:
        assert compliance_api.get(EVENTS).status_code == 200
    assert _auth_queries(captured) == 0


@pytest.mark.django_db
def test_a_role_granted_or_taken_counts_on_the_very_next_request(
    operator, operator_api, django_capture_on_commit_callbacks
):
    # given an operator refused the audit trail, with the refusal cached
    assert operator_api.get(EVENTS).status_code == 403
    # when the compliance role is granted (the test's transaction commits nothing, so the
    # commit callbacks are run by hand)
    with django_capture_on_commit_callbacks(execute=True):
        operator.groups.add(Group.objects.get(name=Role.COMPLIANCE_OFFICER))
    assert operator_api.get(EVENTS).status_code == 200
    # and when the role loses that permission
    with django_capture_on_commit_callbacks(execute=True):
        Group.objects.get(name=Role.COMPLIANCE_OFFICER).permissions.remove(
            Permission.objects.get(codename="view_auditevent")
        )
    assert operator_api.get(EVENTS).status_code == 403


@pytest.mark.django_db
def test_a_cached_set_is_never_used_for_another_user_row_with_the_same_id():
    # given a compliance officer whose permissions are cached, then deleted (the cascade to
    # its group rows sends no m2m signal), and a user without a role created under the same id
    officer = make_user("first", Role.COMPLIANCE_OFFICER)
    assert client_for(officer).get(EVENTS).status_code == 200
    pk = officer.pk
    officer.delete()
    stranger = User.objects.create_user(pk=pk, username="second", password=PASSWORD)
    # then the stranger does not inherit the cached set
    assert client_for(stranger).get(EVENTS).status_code == 403


@pytest.mark.django_db
def test_a_role_taken_away_counts_at_once_even_after_the_generation_was_evicted(
    operator, operator_api, django_capture_on_commit_callbacks
):
    from django.core.cache import cache

    from bridge import permission_cache

    # given a cached set that grants the audit trail
    with django_capture_on_commit_callbacks(execute=True):
        operator.groups.add(Group.objects.get(name=Role.COMPLIANCE_OFFICER))
    assert operator_api.get(EVENTS).status_code == 200
    # when the cache evicts the generation, and then the role is taken away
    cache.delete(permission_cache._GENERATION_KEY)
    assert operator_api.get(EVENTS).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        operator.groups.remove(Group.objects.get(name=Role.COMPLIANCE_OFFICER))
    # then the very next request is refused
    assert operator_api.get(EVENTS).status_code == 403


@pytest.mark.django_db
def test_a_hung_cache_costs_one_timeout_then_permissions_come_from_the_database(
    compliance_api, hung_port, settings
):
    import time

    from bridge import permission_cache

    # given a Redis cache that accepts connections and never answers
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{hung_port}/0",
            "OPTIONS": {"socket_timeout": 0.3, "socket_connect_timeout": 0.3},
        }
    }
    try:
        # when two requests check a permission
        assert compliance_api.get(EVENTS).status_code == 200
        started = time.monotonic()
        assert compliance_api.get(EVENTS).status_code == 200
        # then the second one does not wait on the cache again
        assert time.monotonic() - started < 0.3
    finally:
        permission_cache._cache_paused_until = 0.0
