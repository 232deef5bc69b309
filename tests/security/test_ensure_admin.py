"""`manage.py ensure_admin`: idempotent, leaves a generated password in a private file for
`make run` to show once, audits changes."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import override_settings

from compliance.models import AuditEvent
from compliance.personal import revealed
from security.models import User

ENV_PASSWORD = "Env-Supplied-Passphrase-77"


def ensure_admin() -> str:
    out = StringIO()
    call_command("ensure_admin", stdout=out, no_color=True)
    return out.getvalue()


def take_generated(var_dir: Path) -> str:
    """Read and remove the password file, as bin/run does once Bridge is up."""
    path = var_dir / "admin_password"
    password = path.read_text().strip()
    path.unlink()
    return password


def admin_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="admin.account").order_by("id"))


@pytest.fixture(autouse=True)
def var_dir(tmp_path) -> Path:
    with override_settings(VAR_DIR=tmp_path):
        yield tmp_path


@pytest.fixture
def no_env_password(monkeypatch):
    monkeypatch.delenv("BRIDGE_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("BRIDGE_ADMIN_PASSWORD_FILE", raising=False)


@pytest.mark.django_db
def test_first_run_creates_a_superuser_with_a_working_password_in_a_private_file(
    no_env_password, var_dir
):
    # when
    output = ensure_admin()
    # then the password waits in a file only its owner can read, and is not printed
    admin = User.objects.get(username="admin")
    assert (admin.is_superuser, admin.is_staff, admin.is_active) == (True, True, True)
    password_file = var_dir / "admin_password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = take_generated(var_dir)
    assert len(password) >= 20
    assert admin.check_password(password)
    assert password not in output
    assert str(password_file) in output
    # no temporary file left behind (keys/ holds the development master key, which sealed
    # the event's actor under their subject key)
    assert [path.name for path in var_dir.iterdir() if path.name != "keys"] == []
    [event] = admin_events()
    assert event.object_type == "security.user" and event.object_id == str(admin.pk)
    assert event.details_data["created"] is True
    assert password not in event.details


@pytest.mark.django_db
def test_second_run_writes_no_password_and_changes_nothing(no_env_password, var_dir):
    # given
    ensure_admin()
    password = take_generated(var_dir)
    hash_before = User.objects.get(username="admin").password
    # when
    second = ensure_admin()
    # then
    assert not (var_dir / "admin_password").exists()
    assert password not in second
    assert "Admin account 'admin' is ready." in second
    admin = User.objects.get(username="admin")
    assert admin.password == hash_before
    assert admin.check_password(password)
    assert User.objects.filter(is_superuser=True).count() == 1
    assert len(admin_events()) == 1


@pytest.mark.django_db
def test_an_env_password_is_used_on_creation_and_never_printed_nor_stored(monkeypatch, var_dir):
    # given
    monkeypatch.setenv("BRIDGE_ADMIN_PASSWORD", ENV_PASSWORD)
    # when
    output = ensure_admin()
    # then
    assert "Created admin account 'admin'." in output
    assert ENV_PASSWORD not in output
    assert not (var_dir / "admin_password").exists()
    assert User.objects.get(username="admin").check_password(ENV_PASSWORD)
    [event] = admin_events()
    assert ENV_PASSWORD not in event.details


@pytest.mark.django_db
def test_setting_bridge_admin_password_resets_an_existing_admin_once(
    no_env_password, monkeypatch, var_dir
):
    # given an admin created with a generated password
    ensure_admin()
    generated = take_generated(var_dir)
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
    assert revealed(event).actor_username == "ops-root"


@pytest.mark.django_db
def test_the_creation_event_says_whether_the_password_was_generated(no_env_password):
    ensure_admin()
    [event] = admin_events()
    assert event.details_data["generated"] is True
