"""`manage.py ensure_admin`: idempotent, prints a generated password once, audits changes."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings

from compliance.models import AuditEvent
from security.models import User

GENERATED = re.compile(r"with password: (\S+)")
ENV_PASSWORD = "Env-Supplied-Passphrase-77"


def ensure_admin() -> str:
    out = StringIO()
    call_command("ensure_admin", stdout=out, no_color=True)
    return out.getvalue()


def admin_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="admin.account").order_by("id"))


@pytest.fixture
def no_env_password(monkeypatch):
    monkeypatch.delenv("BRIDGE_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("BRIDGE_ADMIN_PASSWORD_FILE", raising=False)


@pytest.mark.django_db
def test_first_run_creates_a_superuser_and_prints_a_working_generated_password(no_env_password):
    # when
    output = ensure_admin()
    # then
    admin = User.objects.get(username="admin")
    assert (admin.is_superuser, admin.is_staff, admin.is_active) == (True, True, True)
    [password] = GENERATED.findall(output)
    assert len(password) >= 20
    assert admin.check_password(password)
    assert output.count(password) == 1
    [event] = admin_events()
    assert event.object_type == "security.user" and event.object_id == str(admin.pk)
    assert event.details_data["created"] is True
    assert password not in event.details


@pytest.mark.django_db
def test_second_run_prints_no_password_and_changes_nothing(no_env_password):
    # given
    first = ensure_admin()
    password = GENERATED.findall(first)[0]
    hash_before = User.objects.get(username="admin").password
    # when
    second = ensure_admin()
    # then
    assert GENERATED.search(second) is None
    assert password not in second
    assert "Admin account 'admin' is ready." in second
    admin = User.objects.get(username="admin")
    assert admin.password == hash_before
    assert admin.check_password(password)
    assert User.objects.filter(is_superuser=True).count() == 1
    assert len(admin_events()) == 1


@pytest.mark.django_db
def test_an_env_password_is_used_on_creation_and_never_printed(monkeypatch):
    # given
    monkeypatch.setenv("BRIDGE_ADMIN_PASSWORD", ENV_PASSWORD)
    # when
    output = ensure_admin()
    # then
    assert "Created admin account 'admin'." in output
    assert ENV_PASSWORD not in output
    assert User.objects.get(username="admin").check_password(ENV_PASSWORD)
    [event] = admin_events()
    assert ENV_PASSWORD not in event.details


@pytest.mark.django_db
def test_setting_bridge_admin_password_resets_an_existing_admin_once(no_env_password, monkeypatch):
    # given an admin created with a generated password
    generated = GENERATED.findall(ensure_admin())[0]
    # when the operator sets BRIDGE_ADMIN_PASSWORD and runs the command twice
    monkeypatch.setenv("BRIDGE_ADMIN_PASSWORD", ENV_PASSWORD)
    ensure_admin()
    hash_after_reset = User.objects.get(username="admin").password
    ensure_admin()
    # then the password changed once, and only that change was audited
    admin = User.objects.get(username="admin")
    assert admin.check_password(ENV_PASSWORD)
    assert not admin.check_password(generated)
    assert admin.password == hash_after_reset
    created, updated = admin_events()
    assert created.details_data["created"] is True
    assert updated.details_data == {"created": False, "updated": ["password"]}
    assert ENV_PASSWORD not in updated.details


@pytest.mark.django_db
def test_a_demoted_admin_is_restored_and_the_restoration_audited(no_env_password):
    # given
    ensure_admin()
    User.objects.filter(username="admin").update(is_superuser=False, is_staff=False)
    # when
    ensure_admin()
    # then
    admin = User.objects.get(username="admin")
    assert (admin.is_superuser, admin.is_staff, admin.is_active) == (True, True, True)
    assert admin_events()[-1].details_data == {"created": False, "updated": ["flags"]}
    assert len(admin_events()) == 2


@pytest.mark.django_db
@override_settings(BRIDGE_ADMIN_USERNAME="ops-root")
def test_the_admin_username_comes_from_settings(no_env_password):
    # when
    output = ensure_admin()
    # then
    assert "Created admin account 'ops-root'" in output
    assert User.objects.filter(username="ops-root", is_superuser=True).exists()
    assert not User.objects.filter(username="admin").exists()
    [event] = admin_events()
    assert event.actor_username == "ops-root"


@pytest.mark.django_db
def test_the_creation_event_says_whether_the_password_was_generated(no_env_password):
    ensure_admin()
    [event] = admin_events()
    assert event.details_data["generated"] is True
