"""The backups console (list, detail, restore confirmation, dashboard panels) and the
`backup` and `restore` commands, on real backups."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from backups.choices import BackupStatus, RestoreStatus
from backups.models import Backup, RestoreJob
from tests.test_console import console_for, dashboard

pytestmark = pytest.mark.django_db


@pytest.fixture
def media(settings) -> Path:
    root = Path(settings.MEDIA_ROOT)
    root.mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    return root


def backup_now(*args: str) -> str:
    out = io.StringIO()
    call_command("backup", *args, stdout=out)
    return out.getvalue()


def test_backup_command_shows_progress_and_the_3_2_1_state(media):
    output = backup_now("full", "--components", "uploads", "config")
    backup = Backup.objects.get()
    assert backup.status == BackupStatus.SUCCEEDED
    assert f"backup {backup.pk} (full) succeeded" in output
    assert "%" in output and "3-2-1 rule violated" in output


def test_restore_command_restores_and_refuses_without_confirmation(media, monkeypatch):
    backup_now("full", "--components", "uploads")
    backup = Backup.objects.get()
    (media / "a.txt").write_text("changed")
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="not confirmed"):
        call_command("restore", str(backup.pk), stdout=io.StringIO())
    assert (media / "a.txt").read_text() == "changed"
    out = io.StringIO()
    call_command("restore", str(backup.pk), "--yes", stdout=out)
    assert (media / "a.txt").read_text() == "alpha"
    assert RestoreJob.objects.get().status == RestoreStatus.SUCCEEDED
    assert "succeeded in" in out.getvalue()


def test_backup_command_fails_loudly(media, settings, tmp_path):
    settings.BACKUP_TARGETS = {
        "broken": {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": "/proc/bridge-cannot-write-here"},
            "media": "disk",
            "offsite": False,
        }
    }
    with pytest.raises(CommandError, match="failed"):
        backup_now("full", "--components", "uploads")
    assert Backup.objects.get().status == BackupStatus.FAILED


def test_console_lists_backups_and_confirms_a_restore_naming_what_is_overwritten(
    media, admin_user, django_capture_on_commit_callbacks
):
    backup_now("full", "--components", "uploads")
    backup = Backup.objects.get()
    client = console_for(admin_user)
    listing = client.get(reverse("admin:backups_backup_changelist")).content.decode()
    assert str(backup.pk)[:8] in listing and "violated" in listing
    detail = client.get(reverse("admin:backups_backup_change", args=[backup.pk])).content.decode()
    assert backup.artifacts.get().sha256[:15] in detail
    confirm = client.post(
        reverse("admin:backups_backup_changelist"),
        {"action": "restore_backup", "_selected_action": [str(backup.pk)]},
    ).content.decode()
    assert "This overwrites live data" in confirm and str(media) in confirm
    (media / "a.txt").write_text("changed")
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("admin:backups_backup_changelist"),
            {
                "action": "restore_backup",
                "_selected_action": [str(backup.pk)],
                "confirm": "yes",
                "components": ["uploads"],
            },
        )
    restore = RestoreJob.objects.get()
    assert restore.components == ["uploads"]
    assert restore.status == RestoreStatus.SUCCEEDED, restore.error
    assert (media / "a.txt").read_text() == "alpha"


def test_dashboard_panels_show_age_rule_and_drill(media, admin_user, operator):
    backup_now("full", "--components", "uploads")
    page = dashboard(console_for(admin_user))
    assert "newest backup age" in page and "3-2-1" in page and "last drill" in page
    assert "Duration of the last backups" in page
    assert "newest backup age" in dashboard(console_for(operator))


def test_console_starts_a_backup_by_post_only_and_for_operators_only(
    media, operator, compliance_officer, django_capture_on_commit_callbacks
):
    url = reverse("admin:backups_backup_start", args=["full"])
    operator_console = console_for(operator)
    listing = operator_console.get(reverse("admin:backups_backup_changelist")).content.decode()
    assert url in listing
    # A GET (a link, an image tag on another site) starts nothing.
    operator_console.get(url)
    assert not Backup.objects.exists()
    officer = console_for(compliance_officer)
    assert url not in officer.get(reverse("admin:backups_backup_changelist")).content.decode()
    assert officer.post(url).status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        operator_console.post(url)
    assert Backup.objects.get().status == BackupStatus.SUCCEEDED
