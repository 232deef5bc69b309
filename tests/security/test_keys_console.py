"""The console's keys pages: ages and states shown, rotation from the console, and stored
secrets that are written but never shown back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from bridge.models import Job
from security import crypto
from security.models import DataKey, StoredSecret
from tests.test_console import console_for

pytestmark = pytest.mark.django_db

KEYS = "/admin/security/datakey/"
SECRETS = "/admin/security/storedsecret/"


def test_the_keys_page_shows_each_keys_age_and_flags_old_ones(security_officer):
    crypto.encrypt(b"x", purpose="stored_secret")
    crypto.encrypt(b"y", purpose="api")
    DataKey.objects.filter(purpose="api").update(created_at=timezone.now() - timedelta(days=400))
    page = console_for(security_officer).get(KEYS).content.decode()
    assert "stored_secret" in page and "400 d" in page and "0 d" in page
    assert "current master key" in page and "Rotate all keys now" in page


def test_rotating_from_the_console_starts_new_versions_and_a_reencryption_job(
    security_officer, django_capture_on_commit_callbacks
):
    StoredSecret.objects.create(name="offsite", value="sftp password")
    first = DataKey.objects.get(purpose="stored_secret")
    with django_capture_on_commit_callbacks(execute=True):
        response = console_for(security_officer).post(
            KEYS, {"action": "rotate", "_selected_action": [first.pk]}, follow=True
        )
    assert response.status_code == 200
    assert "new version(s)" in response.content.decode()
    assert DataKey.objects.filter(purpose="stored_secret").count() == 2
    job = Job.objects.get(kind="security.reencrypt")
    assert job.status == "succeeded" and job.result["reencrypted"] == 1  # eager in unit tests
    assert StoredSecret.objects.get(name="offsite").value == "sftp password"


def test_a_role_without_the_rotate_permission_has_no_rotate_action(compliance_officer):
    from django.contrib.auth.models import Permission

    compliance_officer.user_permissions.add(Permission.objects.get(codename="view_datakey"))
    page = console_for(compliance_officer).get(KEYS).content.decode()
    assert "Rotate all keys now" not in page


def test_a_stored_secret_is_written_through_the_console_and_never_shown_back(security_officer):
    console = console_for(security_officer)
    created = console.post(
        f"{SECRETS}add/",
        {"name": "smtp-relay", "kind": "service", "description": "mail", "new_value": "pa55"},
    )
    assert created.status_code == 302, created.content.decode()[:2000]
    secret = StoredSecret.objects.get(name="smtp-relay")
    assert secret.value == "pa55"
    page = console.get(f"{SECRETS}{secret.pk}/change/").content.decode()
    assert "pa55" not in page and secret.__dict__["value"] not in page  # nor the ciphertext
    # a change that leaves the value blank keeps it
    console.post(
        f"{SECRETS}{secret.pk}/change/",
        {"kind": "service", "description": "mail relay", "new_value": ""},
    )
    assert StoredSecret.objects.get(name="smtp-relay").value == "pa55"
    assert console.post(f"{SECRETS}add/", {"name": "empty", "kind": "other"}).status_code == 200
    assert not StoredSecret.objects.filter(name="empty").exists()
