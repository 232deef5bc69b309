"""GDPR data-subject requests end to end through the API: deadlines, the workflow, the export,
rectification, erasure (crypto-shredding included), its re-application after a restore, and
who may do what."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import stat
import threading
import zipfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.db import connection
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.models import Job
from compliance import dsr, personal_data
from compliance.audit import AuditContext
from compliance.choices import DSR_JOB_KIND, DsrStatus, DsrType
from compliance.models import AuditEvent, ConsentEvent, DataSubjectRequest, ErasureRecord
from security import crypto
from security.models import SubjectKey, User
from tests.conftest import client_for, make_user

DSR = "/api/compliance/gdpr/data-subject-request"
METHOD = {"method": "signed-in account and ID document"}


@pytest.fixture(autouse=True)
def _export_dir(settings, tmp_path) -> Path:
    settings.DSR_EXPORT_DIR = tmp_path / "dsr-exports"
    settings.ENABLE_GDPR_COMPLIANCE = True
    return settings.DSR_EXPORT_DIR


@pytest.fixture
def dana(db) -> User:
    """The data subject: a Bridge user with a profile, a consent and an encrypted record."""
    user = make_user("dana")
    user.first_name, user.last_name, user.email = "Dana", "Doe", "dana@example.com"
    user.save()
    ConsentEvent.objects.create(
        subject_id="dana",
        purpose="marketing",
        granted=True,
        notice_version="v1",
        notice_sha256="0" * 64,
        method="checkbox",
        client_ip="203.0.113.7",
        occurred_at=timezone.now(),
    )
    return user


def create(api, subject_id: str = "dana", type_: str = "access", **details) -> dict:
    body = {"subject_id": subject_id, "type": type_}
    if details:
        body["details"] = details
    response = api.post(DSR, body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def verify(api, capture, dsr_id: str, expect: int = 202):
    with capture(execute=True):
        response = api.post(f"{DSR}/{dsr_id}/verify", METHOD, format="json")
    assert response.status_code == expect, response.content
    return response


def detail(api, dsr_id: str) -> dict:
    response = api.get(f"{DSR}/{dsr_id}")
    assert response.status_code == 200, response.content
    return response.json()


def download(api, dsr_id: str) -> bytes:
    response = api.get(f"{DSR}/{dsr_id}/export")
    assert response.status_code == 200, getattr(response, "content", b"")[:500]
    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"].startswith("attachment;")
    return b"".join(response.streaming_content)


# --- Deadlines ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "months", "due"),
    [
        (date(2026, 1, 31), 1, date(2026, 2, 28)),
        (date(2024, 1, 31), 1, date(2024, 2, 29)),  # leap year
        (date(2024, 2, 29), 1, date(2024, 3, 29)),
        (date(2026, 3, 31), 1, date(2026, 4, 30)),
        (date(2025, 12, 31), 1, date(2026, 1, 31)),  # across the year end
        (date(2026, 6, 15), 1, date(2026, 7, 15)),
        (date(2026, 2, 28), 2, date(2026, 4, 28)),  # an extension from the due date
        (date(2025, 12, 31), 2, date(2026, 2, 28)),
    ],
)
def test_the_due_date_is_calendar_months_later_or_that_months_last_day(received, months, due):
    assert dsr.due_date_for(received, months) == due


def test_a_request_received_on_january_31st_is_due_on_the_last_day_of_february(
    compliance_officer,
):
    request = dsr.create_request(
        subject_id="erin",
        type=DsrType.ACCESS,
        details={},
        context=AuditContext.system(),
        received_at=datetime(2024, 1, 31, 23, 30, tzinfo=UTC),
    )
    assert request.due_date == date(2024, 2, 29)


def test_holding_for_identity_pauses_the_clock_and_verifying_adds_the_whole_days(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    # given a request waiting for proof of identity since three and a half days
    created = create(compliance_api)
    due = date.fromisoformat(created["due_date"])
    held = compliance_api.post(
        f"{DSR}/{created['id']}/hold", {"reason": "asked for a copy of an ID"}, format="json"
    )
    assert held.status_code == 200, held.content
    assert held.json()["status"] == "verifying" and held.json()["paused_at"]
    DataSubjectRequest.objects.filter(pk=created["id"]).update(
        paused_at=timezone.now() - timedelta(days=3, hours=12)
    )
    # when the identity is verified
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    # then the three whole days moved the due date
    shown = detail(compliance_api, created["id"])
    assert shown["paused_days"] == 3 and shown["paused_at"] is None
    assert date.fromisoformat(shown["due_date"]) == due + timedelta(days=3)
    assert [entry["status"] for entry in shown["history"]][:3] == [
        "received",
        "verifying",
        "in_progress",
    ]
    assert "3 paused day(s) added" in shown["history"][2]["note"]


def _in_progress(api, capture, subject: str = "dana") -> str:
    """A request whose work is under way (its job failed, so it stays in progress)."""

    class Broken(personal_data.Source):
        name = "broken_for_test"

        def export(self, subject_id: str):
            raise RuntimeError("the source is down")

    personal_data.register_source(Broken())
    try:
        created = create(api, subject)
        verify(api, capture, created["id"])
    finally:
        personal_data.unregister_source("broken_for_test")
    assert detail(api, created["id"])["status"] == "in_progress"
    return created["id"]


def test_the_deadline_is_extended_once_only_with_a_reason(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    dsr_id = _in_progress(compliance_api, django_capture_on_commit_callbacks)
    due = date.fromisoformat(detail(compliance_api, dsr_id)["due_date"])
    # when extended
    response = compliance_api.post(
        f"{DSR}/{dsr_id}/extend", {"reason": "40 systems to search"}, format="json"
    )
    # then two more months from the due date it replaces
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "extended" and body["extension_months"] == 2
    assert date.fromisoformat(body["due_date"]) == dsr.due_date_for(due, 2)
    assert body["extension_reason"] == "40 systems to search"
    # and never twice
    again = compliance_api.post(f"{DSR}/{dsr_id}/extend", {"reason": "more"}, format="json")
    assert again.status_code == 409
    assert again.json()["code"] == "already_extended"
    assert AuditEvent.objects.filter(action="gdpr.request.extended", object_id=dsr_id).count() == 1


def test_an_extension_is_refused_once_the_due_date_has_passed(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    dsr_id = _in_progress(compliance_api, django_capture_on_commit_callbacks)
    yesterday = timezone.now().date() - timedelta(days=1)
    DataSubjectRequest.objects.filter(pk=dsr_id).update(due_date=yesterday)
    response = compliance_api.post(f"{DSR}/{dsr_id}/extend", {"reason": "late"}, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "extension_too_late"
    # on the due date itself it is still in time
    DataSubjectRequest.objects.filter(pk=dsr_id).update(due_date=timezone.now().date())
    response = compliance_api.post(f"{DSR}/{dsr_id}/extend", {"reason": "in time"}, format="json")
    assert response.status_code == 200, response.content


def test_an_extension_is_for_work_under_way_and_by_one_or_two_months(compliance_api, dana):
    created = create(compliance_api)
    early = compliance_api.post(
        f"{DSR}/{created['id']}/extend", {"reason": "complex"}, format="json"
    )
    assert early.status_code == 409 and early.json()["code"] == "cannot_extend"
    too_long = compliance_api.post(
        f"{DSR}/{created['id']}/extend", {"reason": "complex", "months": 3}, format="json"
    )
    assert too_long.status_code == 400 and "months" in too_long.json()


def test_a_rejected_request_is_closed_with_its_reason(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    created = create(compliance_api, type_="erasure")
    response = compliance_api.post(
        f"{DSR}/{created['id']}/reject",
        {"reason": "identity could not be verified"},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "rejected"
    assert body["rejected_reason"] == "identity could not be verified"
    assert body["links"]["verify"] is None and body["links"]["reject"] is None
    # nothing happened to the subject, and the request cannot be taken up again
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"], expect=409)
    assert User.objects.get(username="dana").is_active
    again = compliance_api.post(f"{DSR}/{created['id']}/reject", {"reason": "x"}, format="json")
    assert again.status_code == 409 and again.json()["code"] == "cannot_reject"


# --- Access and portability -------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["access", "portability"])
def test_an_access_request_yields_a_zip_whose_manifest_matches_its_files(
    type_, compliance_api, dana, django_capture_on_commit_callbacks, _export_dir
):
    # given a subject who used Bridge and has a record encrypted under their key
    client_for(dana).get("/api/jobs")
    crypto.encrypt(b"dana's record", purpose="test.records", subject_id="dana")
    created = create(compliance_api, type_=type_, channel="email")
    assert created["status"] == "received"
    assert created["due_date"] == dsr.due_date_for(timezone.now().date()).isoformat()
    assert created["links"]["verify"].endswith(f"{DSR}/{created['id']}/verify")
    assert created["export"] is None
    # when the identity is verified
    started = verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    # then the job ran and the request completed with a download
    assert started.json()["kind"] == DSR_JOB_KIND
    assert started["Location"].endswith(f"/api/jobs/{started.json()['id']}")
    job = compliance_api.get(started["Location"]).json()
    assert job["status"] == "succeeded", job
    shown = detail(compliance_api, created["id"])
    assert shown["status"] == "completed" and shown["completed_at"]
    assert shown["links"]["export"] == shown["export"]["url"]
    data = download(compliance_api, created["id"])
    assert hashlib.sha256(data).hexdigest() == shown["export"]["sha256"]
    assert len(data) == shown["export"]["size"]
    stored = Path(DataSubjectRequest.objects.get(pk=created["id"]).export_path)
    assert stored.parent == _export_dir
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert not [p for p in _export_dir.iterdir() if p.name.startswith(".")]  # no leftovers
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        names = set(archive.namelist())
        # every file the manifest names, with its SHA-256, size and row count
        for entry in manifest["files"]:
            content = archive.read(entry["name"])
            assert hashlib.sha256(content).hexdigest() == entry["sha256"], entry["name"]
            assert len(content) == entry["bytes"]
        assert names == {entry["name"] for entry in manifest["files"]} | {"manifest.json"}
        for source in personal_data.sources():
            rows = json.loads(archive.read(f"{source.name}.json"))
            table = list(csv.DictReader(io.StringIO(archive.read(f"{source.name}.csv").decode())))
            assert len(rows) == len(table) == manifest["counts"][source.name]
        users = json.loads(archive.read("users.json"))
        consent = json.loads(archive.read("consent_events.json"))
        keys = json.loads(archive.read("subject_keys.json"))
        events = json.loads(archive.read("audit_events.json"))
        requests = json.loads(archive.read("data_subject_requests.json"))
    assert manifest["type"] == type_ and manifest["subject_id"] == "dana"
    assert [(u["username"], u["email"], u["last_name"]) for u in users] == [
        ("dana", "dana@example.com", "Doe")
    ]
    assert not any("password" in key for key in users[0])
    assert [(c["purpose"], c["granted"], c["client_ip"]) for c in consent] == [
        ("marketing", True, "203.0.113.7")
    ]
    assert keys and {k["purpose"] for k in keys} >= {"test.records"}
    assert not any("wrapped" in key for key in keys[0])
    assert events and all(event["actor"] == "dana" for event in events)
    assert [r["id"] for r in requests] == [created["id"]]
    # the download is audited
    assert AuditEvent.objects.filter(action="gdpr.export.downloaded", object_id=created["id"])
    assert AuditEvent.objects.filter(action="gdpr.request.completed", object_id=created["id"])


def test_export_cells_cannot_run_as_spreadsheet_formulas(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    User.objects.filter(pk=dana.pk).update(first_name='=HYPERLINK("http://evil","x")')
    created = create(compliance_api)
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    with zipfile.ZipFile(io.BytesIO(download(compliance_api, created["id"]))) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("users.csv").decode())))
        raw = json.loads(archive.read("users.json"))
    assert rows[0]["first_name"] == '\'=HYPERLINK("http://evil","x")'
    assert raw[0]["first_name"] == '=HYPERLINK("http://evil","x")'  # JSON keeps the value


def test_an_expired_or_missing_export_is_refused(
    compliance_api, dana, django_capture_on_commit_callbacks, settings
):
    created = create(compliance_api)
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    DataSubjectRequest.objects.filter(pk=created["id"]).update(
        completed_at=timezone.now() - timedelta(days=settings.DSR_EXPORT_TTL_DAYS + 1)
    )
    assert detail(compliance_api, created["id"])["export"] is None
    expired = compliance_api.get(f"{DSR}/{created['id']}/export")
    assert expired.status_code == 409 and expired.json()["code"] == "export_expired"
    assert dsr.delete_expired_exports() == 1
    gone = compliance_api.get(f"{DSR}/{created['id']}/export")
    assert gone.status_code == 409 and gone.json()["code"] == "no_export"
    never = create(compliance_api, type_="erasure")
    answer = compliance_api.get(f"{DSR}/{never['id']}/export", HTTP_ACCEPT="application/zip")
    assert answer.status_code == 409 and answer.json()["code"] == "no_export"


# --- Rectification ----------------------------------------------------------------------------


def test_rectification_corrects_the_user_row_through_the_registry(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    corrections = {"users": {"last_name": "Smith", "email": "dana.smith@example.com"}}
    created = create(compliance_api, type_="rectification", corrections=corrections)
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    dana.refresh_from_db()
    assert (dana.last_name, dana.email, dana.first_name) == (
        "Smith",
        "dana.smith@example.com",
        "Dana",
    )
    shown = detail(compliance_api, created["id"])
    assert shown["status"] == "completed"
    assert shown["result"]["rows"] == {"users": 1}
    event = AuditEvent.objects.get(action="gdpr.rectified", object_id=created["id"])
    # the trail names the fields, never the values
    assert "last_name" in event.details and "Smith" not in event.details


@pytest.mark.parametrize(
    ("corrections", "named"),
    [
        ({"users": {"password": "x"}}, "password"),
        ({"users": {"username": "mallory"}}, "username"),
        ({"nosuch_source": {"name": "x"}}, "nosuch_source"),
        ({"users": {"email": "not an address"}}, "email"),
        ({"users": {"last_name": 5}}, "last_name"),
        ({}, "corrections"),
    ],
)
def test_a_rectification_naming_what_cannot_be_rectified_is_refused(
    compliance_api, dana, corrections, named
):
    response = compliance_api.post(
        DSR,
        {"subject_id": "dana", "type": "rectification", "details": {"corrections": corrections}},
        format="json",
    )
    assert response.status_code == 400, response.content
    assert named in response.json()["details"][0]
    assert not DataSubjectRequest.objects.exists()


# --- Erasure ----------------------------------------------------------------------------------


def test_erasure_anonymises_the_user_and_makes_encrypted_records_unreadable(
    compliance_api, security_officer, dana, django_capture_on_commit_callbacks, _export_dir
):
    # given records encrypted under dana's key, directly and through the API, and an export
    record = crypto.encrypt(b"dana's diagnosis", purpose="test.records", subject_id="dana")
    sealed = client_for(security_officer).post(
        "/api/security/encrypt",
        {"plaintext": "dana's address", "subject_id": "dana", "context": "crm"},
        format="json",
    )
    assert sealed.status_code == 200, sealed.content
    assert crypto.decrypt(record) == b"dana's diagnosis"
    earlier = create(compliance_api)
    verify(compliance_api, django_capture_on_commit_callbacks, earlier["id"])
    export_path = Path(DataSubjectRequest.objects.get(pk=earlier["id"]).export_path)
    assert export_path.exists()
    # when dana's erasure request is processed
    created = create(compliance_api, type_="erasure")
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    # then every record encrypted for dana is unreadable, in backups too
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(record)
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(sealed.json()["ciphertext"], context="crm")
    refused = client_for(security_officer).post(
        "/api/security/decrypt",
        {"ciphertext": sealed.json()["ciphertext"], "context": "crm"},
        format="json",
    )
    assert refused.status_code == 400
    assert not SubjectKey.objects.filter(subject_id="dana", destroyed_at__isnull=True).exists()
    # the account is anonymised, its foreign keys intact, and can never sign in
    user = User.objects.get(pk=dana.pk)
    assert user.username.startswith("erased-") and user.username != "dana"
    assert (user.first_name, user.last_name, user.email) == ("", "", "")
    assert not user.is_active and not user.has_usable_password()
    assert not user.groups.exists()
    # consent stays as counted evidence, pseudonymised
    assert not ConsentEvent.objects.filter(subject_id="dana").exists()
    kept = ConsentEvent.objects.get()
    assert kept.subject_id == personal_data.pseudonym("dana") and kept.client_ip is None
    # the erasure is recorded to be applied again after a restore, and audited
    erasure = ErasureRecord.objects.get(subject_id="dana")
    assert erasure.request_id is not None and str(erasure.request_id) == created["id"]
    assert erasure.counts["users"]["anonymised"] == 1
    assert erasure.counts["subject_keys"]["keys_destroyed"] >= 1
    assert AuditEvent.objects.filter(action="gdpr.erased", object_id=str(erasure.pk)).exists()
    shown = detail(compliance_api, created["id"])
    assert shown["status"] == "completed"
    assert shown["result"]["exports_deleted"] == 1
    assert set(shown["result"]["retained"]) >= {"data_subject_requests"}
    assert "Art. 17(3)" in shown["result"]["retained"]["data_subject_requests"]["basis"]
    # the earlier access export was a copy of what was erased: gone too
    assert not export_path.exists()
    assert detail(compliance_api, earlier["id"])["export"] is None


def test_reapplying_erasures_erases_data_a_restore_brought_back(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    # given an erased subject
    created = create(compliance_api, type_="erasure")
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    # and their rows back as a restore of an older backup would bring them
    back = make_user("dana")
    User.objects.filter(pk=back.pk).update(email="dana@example.com", first_name="Dana")
    ConsentEvent.objects.create(
        subject_id="dana",
        purpose="analytics",
        granted=True,
        notice_version="v1",
        notice_sha256="0" * 64,
        method="form",
        client_ip="198.51.100.4",
        occurred_at=timezone.now(),
    )
    # when
    applied = dsr.reapply_erasures(context=AuditContext.system())
    # then erased again
    assert applied == 1
    assert not User.objects.filter(username="dana").exists()
    assert not User.objects.get(pk=back.pk).is_active
    assert not ConsentEvent.objects.filter(subject_id="dana").exists()
    record = ErasureRecord.objects.get(subject_id="dana")
    assert record.reapplied_count == 1 and record.reapplied_at is not None
    event = AuditEvent.objects.get(action="gdpr.erasures_reapplied")
    assert json.loads(event.details)["rows_changed"] >= 2
    # and running it again finds nothing more to change
    assert dsr.reapply_erasures(context=AuditContext.system()) == 1
    assert (
        json.loads(AuditEvent.objects.filter(action="gdpr.erasures_reapplied").first().details)[
            "rows_changed"
        ]
        == 0
    )


@pytest.mark.django_db(transaction=True)
def test_a_live_restore_of_bridges_database_applies_the_erasures_again(settings, tmp_path):
    from backups import services as backups
    from backups.choices import BackupKind, BackupStatus, RestoreStatus
    from bridge.jobs import run_job

    settings.BACKUP_SCRATCH_DIR = tmp_path / "scratch"
    settings.BACKUP_DATABASES = []
    settings.BACKUP_RESTORE_LOCK_TIMEOUT = timedelta(seconds=5)
    settings.SOX_REQUIRE_SECOND_APPROVAL = False
    context = AuditContext.system()
    # given a backup taken while dana's data was there
    subject = make_user("dana")
    User.objects.filter(pk=subject.pk).update(email="dana@example.com")
    backup = backups.start_backup(
        kind=BackupKind.FULL, context=context, components=["database"], enqueue=False
    )
    run_job(backup.job_id, backups.run_backup_job)
    backup.refresh_from_db()
    assert backup.status == BackupStatus.SUCCEEDED, backup.error
    # and dana erased since
    request = dsr.create_request(
        subject_id="dana", type=DsrType.ERASURE, details={}, context=context
    )
    job = dsr.verify_request(request=request, method="test", context=context, enqueue=False)
    run_job(job.pk, dsr.run_dsr_job)
    assert not User.objects.filter(username="dana").exists()
    # when the backup is restored onto the live database
    restore = backups.start_restore(
        backup=backup, context=context, components=["database"], enqueue=False
    )
    run_job(restore.job_id, backups.run_restore_job)
    restore.refresh_from_db()
    # then the restore kept the erasure log, and applied it again at once
    assert restore.status == RestoreStatus.SUCCEEDED, restore.error
    assert restore.result["erasures_reapplied"] == 1
    assert not User.objects.filter(username="dana").exists()
    assert not User.objects.get(pk=subject.pk).is_active
    assert ErasureRecord.objects.get(subject_id="dana").reapplied_count == 1
    assert DataSubjectRequest.objects.get(pk=request.pk).status == DsrStatus.COMPLETED


# --- Failures and the registry ----------------------------------------------------------------


def test_a_failed_job_leaves_the_request_in_progress_loudly_and_a_retry_completes_it(
    compliance_api, dana, django_capture_on_commit_callbacks, caplog
):
    with caplog.at_level(logging.ERROR, logger="compliance.dsr"):
        dsr_id = _in_progress(compliance_api, django_capture_on_commit_callbacks)
    shown = detail(compliance_api, dsr_id)
    assert shown["status"] == "in_progress"
    assert "the source is down" in shown["result"]["error"]
    assert shown["job"]["status"] == "failed"
    assert shown["links"]["retry"] is not None
    assert "processing failed" in shown["history"][-1]["note"]
    assert any(
        record.levelno == logging.ERROR and dsr_id in record.getMessage()
        for record in caplog.records
    )
    assert AuditEvent.objects.filter(action="gdpr.request.failed", object_id=dsr_id).exists()
    assert not list(Path(dsr.export_dir()).iterdir())  # the half-written ZIP is gone
    # when the source works again and the work is retried
    with django_capture_on_commit_callbacks(execute=True):
        response = compliance_api.post(
            f"{DSR}/{dsr_id}/retry", {"reason": "the source is back"}, format="json"
        )
    assert response.status_code == 202, response.content
    shown = detail(compliance_api, dsr_id)
    assert shown["status"] == "completed" and shown["export"] is not None
    again = compliance_api.post(f"{DSR}/{dsr_id}/retry", {"reason": "again"}, format="json")
    assert again.status_code == 409 and again.json()["code"] == "cannot_retry"


class Notes(personal_data.Source):
    """An in-memory source: notes kept about subjects by some other system."""

    name = "support_notes"
    description = "Support notes"
    rectifiable = ("text",)

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {}

    def find(self, subject_id: str) -> int:
        return len(self.rows.get(subject_id, []))

    def export(self, subject_id: str):
        return [dict(row) for row in self.rows.get(subject_id, [])]

    def apply_corrections(self, subject_id: str, corrections: dict) -> int:
        for row in self.rows.get(subject_id, []):
            row.update(corrections)
        return len(self.rows.get(subject_id, []))

    def erase(self, subject_id: str) -> dict:
        # Whether the subject's keys were still there when this source ran.
        self.keys_alive = SubjectKey.objects.filter(
            subject_id=subject_id, destroyed_at__isnull=True
        ).exists()
        return {"deleted": len(self.rows.pop(subject_id, []))}


@pytest.fixture
def sample_sources():
    """A model the registry did not know (axes' failed logins) and an in-memory store."""
    attempts = personal_data.ModelSource(
        name="login_attempts",
        model=AccessAttempt,
        subject_field="username",
        fields=("username", "ip_address", "user_agent", "attempt_time", "failures_since_start"),
        description="Failed sign-in attempts",
    )
    notes = Notes()
    notes.rows["dana"] = [{"id": 1, "text": "called about invoice 42"}]
    personal_data.register_source(attempts)
    personal_data.register_source(notes)
    try:
        yield attempts, notes
    finally:
        personal_data.unregister_source("login_attempts")
        personal_data.unregister_source("support_notes")


def test_the_registry_takes_any_source_and_every_request_type_uses_it(
    compliance_api, dana, sample_sources, django_capture_on_commit_callbacks
):
    _, notes = sample_sources
    AccessAttempt.objects.create(
        username="dana",
        ip_address="192.0.2.9",
        user_agent="curl",
        http_accept="*/*",
        path_info="/admin/login/",
        attempt_time=timezone.now(),
        failures_since_start=3,
    )
    crypto.encrypt(b"dana's ticket", purpose="test.records", subject_id="dana")
    # access: both new sources are in the export
    access = create(compliance_api)
    verify(compliance_api, django_capture_on_commit_callbacks, access["id"])
    with zipfile.ZipFile(io.BytesIO(download(compliance_api, access["id"]))) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        attempts = json.loads(archive.read("login_attempts.json"))
    assert manifest["counts"]["login_attempts"] == 1 and manifest["counts"]["support_notes"] == 1
    assert attempts[0]["ip_address"] == "192.0.2.9"
    # rectification: through the source's own rule
    corrections = {"support_notes": {"text": "called about invoice 43"}}
    fix = create(compliance_api, type_="rectification", corrections=corrections)
    verify(compliance_api, django_capture_on_commit_callbacks, fix["id"])
    assert notes.rows["dana"][0]["text"] == "called about invoice 43"
    bad = compliance_api.post(
        DSR,
        {
            "subject_id": "dana",
            "type": "rectification",
            "details": {"corrections": {"login_attempts": {"ip_address": "x"}}},
        },
        format="json",
    )
    assert bad.status_code == 400 and "ip_address" in bad.json()["details"][0]
    # erasure: both erased with the rest
    erase = create(compliance_api, type_="erasure")
    verify(compliance_api, django_capture_on_commit_callbacks, erase["id"])
    assert not AccessAttempt.objects.exists() and "dana" not in notes.rows
    counts = ErasureRecord.objects.get().counts
    assert counts["login_attempts"] == {"deleted": 1} and counts["support_notes"] == {"deleted": 1}
    # the keys go last: every other source could still read what they protect
    assert notes.keys_alive and counts[personal_data.SUBJECT_KEYS]["keys_destroyed"] >= 1


def test_rows_of_one_source_with_differing_fields_share_one_csv_header(db, sample_sources):
    _, notes = sample_sources
    notes.rows["dana"] = [
        {"id": 1, "text": "first"},
        {"id": 2, "text": "second, with a comma\nand a line", "tag": "billing"},
        {},
    ]
    request = dsr.create_request(
        subject_id="dana", type=DsrType.ACCESS, details={}, context=AuditContext.system()
    )
    written = dsr.write_export(request=request)
    with zipfile.ZipFile(written["path"]) as archive:
        table = list(csv.reader(io.StringIO(archive.read("support_notes.csv").decode())))
        rows = json.loads(archive.read("support_notes.json"))
    assert table == [
        ["id", "text", "tag"],
        ["1", "first", ""],
        ["2", "second, with a comma\nand a line", "billing"],
        ["", "", ""],
    ]
    assert rows == notes.rows["dana"]
    assert written["counts"]["support_notes"] == 3


def test_the_registry_refuses_a_duplicate_or_malformed_source():
    with pytest.raises(ValueError, match="users"):
        personal_data.register_source(personal_data.UserSource())

    class Nameless:
        name = "Bad Name"

    with pytest.raises(TypeError):
        personal_data.register_source(Nameless())

    class Partial:
        name = "partial"

        def find(self, subject_id: str) -> int:
            return 0

    with pytest.raises(TypeError, match="export"):
        personal_data.register_source(Partial())
    assert [s.name for s in personal_data.sources()][:6] == [
        "users",
        "consent_events",
        "data_subject_requests",
        "audit_events",
        "sox_changes",
        "subject_keys",
    ]


# --- The API's edges --------------------------------------------------------------------------


def test_the_queue_lists_by_due_date_and_filters(compliance_api, dana):
    first = create(compliance_api, "a-customer")
    second = create(compliance_api, "b-customer", "erasure")
    DataSubjectRequest.objects.filter(pk=first["id"]).update(due_date=date(2020, 1, 1))
    listing = compliance_api.get(DSR).json()
    assert listing["count"] == 2
    assert [row["id"] for row in listing["results"]] == [first["id"], second["id"]]
    assert listing["results"][0]["overdue"] is True and listing["results"][0]["days_left"] < 0

    def ids(**query) -> list[str]:
        response = compliance_api.get(DSR, query)
        assert response.status_code == 200, response.content
        return [row["id"] for row in response.json()["results"]]

    assert ids(type="erasure") == [second["id"]]
    assert ids(status="received") == [first["id"], second["id"]]
    assert ids(status="completed") == []
    assert ids(subject_id="b-customer") == [second["id"]]
    assert ids(due_before="2020-01-01") == [first["id"]]
    assert ids(due_after="2020-01-02") == [second["id"]]
    assert ids(overdue="true") == [first["id"]]
    assert ids(overdue="false") == [second["id"]]
    assert ids(open="true") == [first["id"], second["id"]]
    assert ids(page_size="1") == [first["id"]]
    for query in (
        {"due_before": "01/31/2026"},
        {"due_before": "2026-02-30"},
        {"status": "done"},
        {"overdue": "yes"},
        {"type": ""},
    ):
        response = compliance_api.get(DSR, query)
        assert response.status_code == 400, query
        assert set(query) <= set(response.json()), response.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject_id": "dana", "type": "access", "dry_run": True}, "dry_run"),
        ({"subject_id": "dana", "type": "forget"}, "type"),
        ({"subject_id": "dana"}, "type"),
        ({"type": "access"}, "subject_id"),
        ({"subject_id": "", "type": "access"}, "subject_id"),
        ({"subject_id": "a/b", "type": "access"}, "subject_id"),
        ({"subject_id": "line\nbreak", "type": "access"}, "subject_id"),
        ({"subject_id": "x" * 129, "type": "access"}, "subject_id"),
        ({"subject_id": 42, "type": "access"}, "subject_id"),
        ({"subject_id": "dana", "type": "access", "details": [1]}, "details"),
        ({"subject_id": "dana", "type": "access", "details": {"corrections": {}}}, "details"),
        ({"subject_id": "dana", "type": "access", "details": {"x": "y" * 70000}}, "details"),
        ({"subject_id": "dana", "type": "access", "details": {"x": "nul\x00"}}, "details"),
        ([], "non_field_errors"),
    ],
)
def test_a_bad_request_answers_400_naming_the_field(compliance_api, body, field):
    response = compliance_api.post(DSR, body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not DataSubjectRequest.objects.exists()


def test_bad_workflow_input_answers_400_and_an_unknown_request_404(compliance_api, dana):
    created = create(compliance_api)
    for action, body, field in (
        ("verify", {}, "method"),
        ("verify", {"method": "   "}, "method"),
        ("verify", {"method": "x", "notes": "y"}, "notes"),
        ("hold", {"reason": ""}, "reason"),
        ("reject", {"reason": 7}, "reason"),
        ("extend", {"reason": "x", "months": "2"}, "months"),
    ):
        response = compliance_api.post(f"{DSR}/{created['id']}/{action}", body, format="json")
        assert response.status_code == 400, (action, response.content)
        assert field in response.json(), (action, response.json())
    missing = "00000000-0000-0000-0000-000000000000"
    assert compliance_api.get(f"{DSR}/{missing}").status_code == 404
    assert compliance_api.post(f"{DSR}/{missing}/verify", METHOD, format="json").status_code == 404
    assert compliance_api.get(f"{DSR}/not-a-uuid").status_code == 404
    assert detail(compliance_api, created["id"])["status"] == "received"


def test_only_compliance_officers_see_and_handle_requests(
    compliance_api, operator_api, outsider_api, anon_api, dana
):
    created = create(compliance_api)
    for api, expected in ((outsider_api, 403), (operator_api, 403), (anon_api, 401)):
        assert api.get(DSR).status_code == expected
        assert api.get(f"{DSR}/{created['id']}").status_code == expected
        body = {"subject_id": "dana", "type": "erasure"}
        assert api.post(DSR, body, format="json").status_code == expected
        assert (
            api.post(f"{DSR}/{created['id']}/verify", METHOD, format="json").status_code == expected
        )
        assert api.get(f"{DSR}/{created['id']}/export").status_code == expected
    assert DataSubjectRequest.objects.count() == 1
    assert detail(compliance_api, created["id"])["status"] == "received"


def test_with_gdpr_compliance_off_writes_answer_503_and_records_stay_readable(
    compliance_api, dana, settings
):
    created = create(compliance_api)
    settings.ENABLE_GDPR_COMPLIANCE = False
    response = compliance_api.post(DSR, {"subject_id": "x", "type": "access"}, format="json")
    assert response.status_code == 503
    assert response.json()["code"] == "gdpr_disabled"
    refused = compliance_api.post(f"{DSR}/{created['id']}/verify", METHOD, format="json")
    assert refused.status_code == 503 and refused.json()["code"] == "gdpr_disabled"
    assert compliance_api.get(DSR).json()["count"] == 1
    assert detail(compliance_api, created["id"])["status"] == "received"


def test_every_step_is_audited_without_naming_the_subject(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    created = create(compliance_api, type_="erasure")
    compliance_api.post(f"{DSR}/{created['id']}/hold", {"reason": "ID please"}, format="json")
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    actions = list(
        AuditEvent.objects.filter(object_id=created["id"])
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == [
        "gdpr.request.received",
        "gdpr.request.verifying",
        "gdpr.request.verified",
        "gdpr.request.completed",
    ]
    for event in AuditEvent.objects.filter(action__startswith="gdpr."):
        assert '"dana"' not in event.details and "dana@example.com" not in event.details


# --- Concurrency ------------------------------------------------------------------------------


def test_verifying_twice_starts_one_job(compliance_api, dana, django_capture_on_commit_callbacks):
    created = create(compliance_api)
    verify(compliance_api, django_capture_on_commit_callbacks, created["id"])
    second = verify(compliance_api, django_capture_on_commit_callbacks, created["id"], expect=409)
    assert second.json()["code"] == "cannot_verify"
    assert Job.objects.filter(kind=DSR_JOB_KIND).count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_verify_calls_at_once_start_one_job(postgres, settings, tmp_path):
    settings.DSR_EXPORT_DIR = tmp_path / "exports"
    officer = make_user("carla", "compliance_officer")
    clients = [client_for(officer), client_for(officer)]
    request = dsr.create_request(
        subject_id="dana", type=DsrType.ACCESS, details={}, context=AuditContext.system()
    )
    barrier = threading.Barrier(2)
    answers: list[int] = []

    def call(client) -> None:
        try:
            barrier.wait(5)
            response = client.post(f"{DSR}/{request.pk}/verify", METHOD, format="json")
            answers.append(response.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=call, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == [202, 409]
    assert Job.objects.filter(kind=DSR_JOB_KIND).count() == 1
    request.refresh_from_db()
    assert request.status == DsrStatus.COMPLETED
    assert [entry["status"] for entry in request.history].count("in_progress") == 1


# --- Self-test and metrics --------------------------------------------------------------------


def test_the_synthetic_request_passes_and_leaves_only_audit_events(db, _export_dir):
    users, keys, jobs = User.objects.count(), SubjectKey.objects.count(), Job.objects.count()
    events = AuditEvent.objects.count()
    outcome = dsr.run_synthetic_dsr(context=AuditContext.system())
    assert outcome["ok"], outcome["checks"]
    names = {check["name"] for check in outcome["checks"]}
    assert {"export counts", "export SHA-256", "encrypted record unreadable"} <= names
    assert (User.objects.count(), SubjectKey.objects.count(), Job.objects.count()) == (
        users,
        keys,
        jobs,
    )
    assert not DataSubjectRequest.objects.exists() and not ErasureRecord.objects.exists()
    assert not ConsentEvent.objects.exists()
    assert not list(_export_dir.iterdir())
    assert AuditEvent.objects.count() > events
    assert AuditEvent.objects.filter(action="gdpr.erased").exists()


def test_metrics_count_on_time_closures_extensions_and_overdue(db):
    context = AuditContext.system()
    now = timezone.now()

    def make(status: str, received_days_ago: int, closed_days_ago: int | None, **extra):
        received = now - timedelta(days=received_days_ago)
        request = dsr.create_request(
            subject_id="m", type=DsrType.ACCESS, details={}, context=context, received_at=received
        )
        changes = {"status": status, **extra}
        if closed_days_ago is not None:
            changes["completed_at"] = now - timedelta(days=closed_days_ago)
        DataSubjectRequest.objects.filter(pk=request.pk).update(**changes)

    make(DsrStatus.COMPLETED, 20, 10)  # 10 days, on time
    make(DsrStatus.COMPLETED, 80, 20)  # 60 days, late
    make(DsrStatus.COMPLETED, 40, 30, extension_months=2)  # extended, 10 days
    make(DsrStatus.IN_PROGRESS, 45, None)  # overdue
    make(DsrStatus.RECEIVED, 1, None)
    metrics = dsr.dsr_metrics()
    assert metrics["closed"] == 3 and metrics["closed_on_time"] == 2
    assert metrics["on_time_rate"] == round(2 / 3, 4)
    assert metrics["median_days_to_close"] == 10.0
    assert metrics["extensions"] == 1
    assert metrics["open"] == 2 and metrics["overdue"] == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"subject_id": "lone\ud800"}, "subject_id"),
        ({"details": {"note": "lone\ud800"}}, "details"),
        ({"details": {"deep": [[[[[[[[[[[[]]]]]]]]]]]]}}, None),
    ],
)
def test_text_no_database_can_store_is_refused_by_the_service(db, fields, field):
    arguments = {"subject_id": "x", "type": DsrType.ACCESS, "details": {}, **fields}
    if field is None:  # nesting is fine as long as it is JSON
        assert dsr.create_request(context=AuditContext.system(), **arguments).details
        return
    with pytest.raises(dsr.DsrRefused) as refused:
        dsr.create_request(context=AuditContext.system(), **arguments)
    assert refused.value.field == field


def test_received_in_the_future_is_refused(db):
    with pytest.raises(dsr.DsrRefused) as refused:
        dsr.create_request(
            subject_id="x",
            type=DsrType.ACCESS,
            details={},
            context=AuditContext.system(),
            received_at=timezone.now() + timedelta(days=1),
        )
    assert refused.value.field == "received_at"


def test_rejecting_cancels_a_job_not_yet_started(db, _export_dir):
    context = AuditContext.system()
    request = dsr.create_request(subject_id="x", type=DsrType.ACCESS, details={}, context=context)
    job = dsr.verify_request(request=request, method="test", context=context, enqueue=False)
    dsr.reject_request(request=request, reason="withdrawn by the subject", context=context)
    from bridge.jobs import run_job

    # the job no worker took yet was cancelled with the request, and never runs
    assert run_job(job.pk, dsr.run_dsr_job) is None
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED
    request.refresh_from_db()
    assert request.status == DsrStatus.REJECTED and not request.export_path
