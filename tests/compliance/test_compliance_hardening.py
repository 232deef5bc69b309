"""The compliance work attacked: each test is a way a malicious API client, an insider with
rights on the database or the file system, or a careless request could defeat a control, and
shows the control now holds.

- DSR: a customer's email never selects an employee's account; an erasure cannot lock out an
  active administrator; an export swapped on disk is refused; a path edited in the database
  never steers a deletion; expired and half-written exports do not stay on disk; an erasure
  leaves no name or email in the SOX trail nor in the subject's requests; CSV cells are safe
  after whitespace.
- Reports: a file, manifest or signature swapped on disk is refused at download, and another
  report's validly signed files do not verify under this report's name.
- Retention: the purge's session setting opens no other append-only table; a legal hold on a
  subject keeps the events about them, not only those they acted in.
- SOX: a change trigger dropped or disabled is a segregation-of-duties conflict and a violation.
- Endpoints that take no fields refuse fields by name; text no database can store (a lone
  surrogate, NUL) is refused naming the field.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from datetime import date, timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Group
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from bridge.jobs import run_job
from compliance import (
    approvals,
    audit,
    chain,
    checkpoints,
    dsr,
    monitoring,
    reports,
    retention,
    sox,
)
from compliance.audit import AuditContext
from compliance.choices import (
    ApprovalAction,
    ApprovalStatus,
    AuditAction,
    DsrStatus,
    DsrType,
    ReportFormat,
    ReportStatus,
    ReportType,
    RetentionCategory,
    ViolationRule,
    ViolationStatus,
)
from compliance.models import (
    ApprovalRequest,
    AuditEvent,
    AuditSeal,
    ComplianceReport,
    ComplianceViolation,
    ConsentEvent,
    DataSubjectRequest,
    SoxChange,
)
from compliance.reports import verify
from security.choices import Role
from security.models import User
from tests.conftest import bypass_triggers, client_for, make_user

pytestmark = pytest.mark.django_db

SYSTEM = AuditContext.system()
DSR = "/api/compliance/gdpr/data-subject-request"
METHOD = {"method": "ID document"}


def request_and_run(subject_id: str, type_: str, details: dict | None = None) -> DataSubjectRequest:
    """A data subject request recorded, verified and processed in this process."""
    request = dsr.create_request(
        subject_id=subject_id, type=type_, details=details or {}, context=SYSTEM
    )
    job = dsr.verify_request(request=request, method="test", context=SYSTEM, enqueue=False)
    run_job(job.pk, dsr.run_dsr_job)
    request.refresh_from_db()
    assert request.status == DsrStatus.COMPLETED, request.result
    return request


@pytest.fixture
def dana(db) -> User:
    user = make_user("dana")
    user.first_name, user.last_name, user.email = "Dana", "Doe", "dana@example.com"
    user.save()
    return user


# --- DSR: whose data a subject id selects ---------------------------------------------------


def test_an_erasure_for_a_customers_email_never_anonymises_the_account_sharing_it(
    compliance_api, django_capture_on_commit_callbacks
):
    # given an administrator whose address a customer happens to share (emails are not unique)
    boss = make_user("boss", Role.OPERATOR)
    User.objects.filter(pk=boss.pk).update(email="shared@example.com", first_name="Big")
    # when the customer's access and erasure requests (subject id: the email) are processed
    for type_ in ("access", "erasure"):
        created = compliance_api.post(
            DSR, {"subject_id": "shared@example.com", "type": type_}, format="json"
        ).json()
        with django_capture_on_commit_callbacks(execute=True):
            started = compliance_api.post(f"{DSR}/{created['id']}/verify", METHOD, format="json")
        assert started.status_code == 202, started.content
        done = DataSubjectRequest.objects.get(pk=created["id"])
        assert done.status == DsrStatus.COMPLETED, done.result
        # then the administrator's account is neither exported nor touched
        assert done.result["counts"]["users"] in (0, {"anonymised": 0, "sessions_revoked": 0})
    boss.refresh_from_db()
    assert (boss.username, boss.email, boss.first_name, boss.is_active) == (
        "boss",
        "shared@example.com",
        "Big",
        True,
    )
    assert boss.groups.filter(name=Role.OPERATOR).exists()


# --- DSR: the export file ----------------------------------------------------------------


def test_an_export_swapped_on_disk_is_refused_not_served(
    compliance_api, dana, django_capture_on_commit_callbacks
):
    # given a completed access request whose ZIP someone with write access replaced
    created = compliance_api.post(
        DSR, {"subject_id": "dana", "type": "access"}, format="json"
    ).json()
    with django_capture_on_commit_callbacks(execute=True):
        compliance_api.post(f"{DSR}/{created['id']}/verify", METHOD, format="json")
    path = Path(DataSubjectRequest.objects.get(pk=created["id"]).export_path)
    original = path.read_bytes()
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("manifest.json", json.dumps({"counts": {"users": 0}}))
    path.write_bytes(forged.getvalue())
    # when it is downloaded, then it is refused, naming why
    refused = compliance_api.get(f"{DSR}/{created['id']}/export")
    assert refused.status_code == 409
    assert refused.json()["code"] == "export_tampered"
    # and the genuine file is served again once it is back
    path.write_bytes(original)
    served = compliance_api.get(f"{DSR}/{created['id']}/export")
    assert served.status_code == 200
    assert b"".join(served.streaming_content) == original


def test_an_export_path_edited_in_the_database_never_steers_a_deletion(
    dana, tmp_path, django_capture_on_commit_callbacks
):
    # given an access export, its row pointed by an insider at evidence outside the exports
    access = request_and_run("dana", DsrType.ACCESS)
    evidence = tmp_path / "audit-checkpoints" / "2026-11-28.jsonl"
    evidence.parent.mkdir(parents=True, exist_ok=True)
    evidence.write_text('{"number": 1}\n')
    DataSubjectRequest.objects.filter(pk=access.pk).update(export_path=str(evidence))
    # when the subject is erased (which deletes their earlier exports once it commits)
    with django_capture_on_commit_callbacks(execute=True):
        request_and_run("dana", DsrType.ERASURE)
    # and when exports expire
    DataSubjectRequest.objects.filter(pk=access.pk).update(
        export_path=str(evidence), completed_at=timezone.now() - timedelta(days=400)
    )
    assert dsr.delete_expired_exports() == 1
    # then the file outside the export directory is still there
    assert evidence.read_text() == '{"number": 1}\n'


def test_export_csv_cells_are_safe_after_whitespace_and_in_full_width(dana):
    for risky in (" =1+1", '\n=HYPERLINK("http://x")', "\uff1dcmd", "\t@SUM(1)", "  +1+1"):
        assert dsr.csv_cell(risky) == "'" + risky
    for plain in ("-5", "3.14", "plain", "", " text"):
        assert dsr.csv_cell(plain) == plain
    # end to end: a profile field crafted as a formula reaches the CSV quoted
    User.objects.filter(pk=dana.pk).update(first_name=' =HYPERLINK("http://evil")')
    access = request_and_run("dana", DsrType.ACCESS)
    with zipfile.ZipFile(access.export_path) as archive:
        users = archive.read("users.csv").decode()
    assert "' =HYPERLINK" in users


def test_expired_and_half_written_exports_do_not_outlive_their_window(dana, settings):
    # given an access export past DSR_EXPORT_TTL_DAYS, and the half-written ZIP of a worker
    # killed while exporting another request of the subject
    access = request_and_run("dana", DsrType.ACCESS)
    DataSubjectRequest.objects.filter(pk=access.pk).update(
        completed_at=timezone.now() - timedelta(days=settings.DSR_EXPORT_TTL_DAYS + 1)
    )
    killed = dsr.create_request(subject_id="dana", type=DsrType.ACCESS, details={}, context=SYSTEM)
    partial = Path(settings.DSR_EXPORT_DIR) / f".dsr-{killed.pk}-abc123.part"
    partial.write_bytes(b"PK\x03\x04 dana@example.com")
    # when the daily retention run goes (dry run first: it only counts)
    dry = retention.apply_retention(dry_run=True, context=SYSTEM)
    assert dry["categories"]["dsr_records"]["exports_expired"] == 1
    assert Path(access.export_path).exists()
    run = retention.apply_retention(dry_run=False, context=SYSTEM)
    # then the expired export is gone from disk (the request stays), the fresh partial too
    # only once it is clearly abandoned
    assert run["categories"]["dsr_records"]["exports_expired"] == 1
    assert not Path(access.export_path).exists()
    assert DataSubjectRequest.objects.get(pk=access.pk).export_path == ""
    assert partial.exists()
    dsr.delete_expired_exports(now=timezone.now() + dsr.PARTIAL_EXPORT_AGE * 2)
    assert not partial.exists()


def test_an_erasure_removes_half_written_exports_of_the_subject(
    dana, settings, django_capture_on_commit_callbacks
):
    killed = dsr.create_request(subject_id="dana", type=DsrType.ACCESS, details={}, context=SYSTEM)
    partial = Path(settings.DSR_EXPORT_DIR) / f".dsr-{killed.pk}-abc123.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"PK\x03\x04 dana@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        request_and_run("dana", DsrType.ERASURE)
    assert not partial.exists()


# --- DSR: what an erasure leaves behind ---------------------------------------------------


def test_an_erasure_leaves_no_name_or_email_in_the_sox_change_trail(dana):
    # given the subject's account changed (every change of a user row is a SOX record)
    User.objects.filter(pk=dana.pk).update(email="dana.doe@example.com")
    email_change = (
        SoxChange.objects.filter(table_name="security_user", object_pk=str(dana.pk))
        .order_by("-id")
        .first()
    )
    # the change is recorded as a change, without the values
    assert "email" in email_change.changed_fields
    assert email_change.after["email"] == sox.PERSONAL_CHANGED
    # when the subject is erased
    request_and_run("dana", DsrType.ERASURE)
    # then no SOX record (append-only, kept by legal obligation) holds their name or address
    text = json.dumps(
        list(SoxChange.objects.filter(table_name="security_user").values("before", "after"))
    )
    for personal in ("dana@example.com", "dana.doe@example.com", "Dana", "Doe"):
        assert personal not in text
    # while what SOX needs stays: which account changed, and what
    erased = (
        SoxChange.objects.filter(table_name="security_user", object_pk=str(dana.pk))
        .order_by("-id")
        .first()
    )
    assert {"username", "is_active", "email"} <= set(erased.changed_fields)


def test_an_erasure_scrubs_what_the_subjects_requests_said_about_them(dana):
    # given a rectification that carried the subject's new address, and a note naming them
    request_and_run(
        "dana",
        DsrType.RECTIFICATION,
        {
            "corrections": {"users": {"email": "dana.new@example.com"}},
            "note": "called from +44 20 7946 0000",
        },
    )
    # when the subject is erased
    erasure = request_and_run("dana", DsrType.ERASURE)
    # then the requests stay (accountability) with their keys, but not their values
    rows = list(DataSubjectRequest.objects.filter(subject_id="dana").order_by("received_at"))
    assert len(rows) == 2
    text = json.dumps([row.details for row in rows])
    assert "dana.new@example.com" not in text and "7946" not in text
    assert rows[0].details["corrections"]["users"]["email"] == "[erased]"
    counts = erasure.result["counts"]["data_subject_requests"]
    assert counts == {"retained": 2, "anonymised": 1}
    # and applying the erasures again (after a restore) finds nothing more to change
    dsr.reapply_erasures(context=SYSTEM)
    event = AuditEvent.objects.filter(action=AuditAction.ERASURES_REAPPLIED).first()
    assert json.loads(event.details)["rows_changed"] == 0


# --- Reports: files swapped on disk -----------------------------------------------------


def _report() -> ComplianceReport:
    audit.record_event(action="custom.reported", context=SYSTEM, details={"n": 1})
    today = timezone.now().date()
    report = reports.generate_inline(
        type=ReportType.AUDIT_TRAIL,
        format=ReportFormat.CSV,
        date_from=today,
        date_to=today,
        filters={},
        context=SYSTEM,
    )
    assert report.status == ReportStatus.SUCCEEDED, report.error
    return report


def _copy_triple(source: ComplianceReport, target: ComplianceReport) -> None:
    for origin, destination in zip(
        reports.report_files(source), reports.report_files(target), strict=True
    ):
        shutil.copyfile(origin, destination)


def test_a_report_file_swapped_on_disk_is_refused_at_download(compliance_api):
    # given two reports, and an insider who copies the older one's signed files over the newer
    older, newer = _report(), _report()
    _copy_triple(older, newer)
    base = f"/api/compliance/reports/{newer.pk}"
    # when the newer report, its manifest or its signature is downloaded: refused, not served
    for suffix in ("/download", "/manifest", "/signature"):
        refused = compliance_api.get(base + suffix)
        assert refused.status_code == 409, (suffix, refused.content)
        assert refused.json()["code"] == "report_tampered"
    # and the older report, untouched, is served as ever
    assert compliance_api.get(f"/api/compliance/reports/{older.pk}/download").status_code == 200


def test_another_reports_signed_files_do_not_verify_under_this_reports_name():
    older, newer = _report(), _report()
    assert reports.verify_report_file(reports.report_path(newer)).ok
    _copy_triple(older, newer)
    verdict = reports.verify_report_file(reports.report_path(newer))
    assert not verdict.ok and verdict.problem == verify.TAMPERED
    assert str(older.pk) in verdict.reason
    # a copy renamed by hand is still checked by its content alone
    renamed = reports.report_path(older).with_name("evidence.csv")
    shutil.copyfile(reports.report_path(older), renamed)
    manifest, signature = verify.companion_paths(reports.report_path(older))
    assert reports.verify_report_file(renamed, signature_path=signature, manifest_path=manifest).ok


# --- Retention: the purge's bypass and legal holds --------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_purge_setting_opens_no_other_append_only_table(postgres):
    # given sealed audit events and SOX change records whose ids are theirs too
    for n in range(5):
        audit.record_event(action=f"custom.e{n}", context=SYSTEM, details={})
    chain.seal_all_pending()
    overlapping = list(AuditSeal.objects.values_list("event_id", flat=True))
    for pk in overlapping:
        SoxChange.objects.create(
            id=pk,
            occurred_at=timezone.now(),
            table_name="security_user",
            model="security.User",
            object_pk="1",
            operation="UPDATE",
            changed_fields=["is_superuser"],
        )
    # when a session sets the purge's range itself and deletes SOX records: refused
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('bridge.audit_purge', '1:999999', true)")
            cursor.execute("DELETE FROM compliance_soxchange WHERE id = ANY(%s)", [overlapping])
    assert SoxChange.objects.filter(id__in=overlapping).count() == len(overlapping)
    # and an older guard (which let the setting through everywhere) is replaced on sight
    older = retention._GUARD_SQL.replace(
        "\n       AND TG_TABLE_NAME IN ('compliance_auditevent', 'compliance_auditseal')", ""
    )
    with connection.cursor() as cursor:
        cursor.execute(older)
    assert retention.install_purge_guard() is True
    assert retention.install_purge_guard() is False


def _aged_event(days: int = 60, **fields: object) -> None:
    audit.record_event(
        action=fields.pop("action", "custom.old"),
        context=fields.pop("context", SYSTEM),
        details=fields.pop("details", {}),
        occurred_at=timezone.now() - timedelta(days=days),
        **fields,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("about", ["consent", "request", "consent_path"])
def test_a_legal_hold_on_a_subject_keeps_the_events_about_them(settings, about):
    settings.RETENTION_DAYS = {category: 30 for category in RetentionCategory.values}
    settings.RETENTION_DRY_RUN = False
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    officer = AuditContext(actor_id=None, actor_username="officer")
    # given 4 old events, then one about customer cust-9 recorded by an officer, then more
    for _ in range(4):
        _aged_event()
    if about == "consent":
        event = ConsentEvent.objects.create(
            subject_id="cust-9",
            purpose="marketing",
            granted=True,
            notice_version="v1",
            notice_sha256="0" * 64,
            method="api",
            occurred_at=timezone.now() - timedelta(days=60),
        )
        _aged_event(
            action=AuditAction.CONSENT_RECORDED,
            context=officer,
            object_type="compliance.consentevent",
            object_id=event.pk,
        )
    elif about == "request":
        # (the row alone: the service would record a fresh event in the middle of the range)
        request = DataSubjectRequest.objects.create(
            subject_id="cust-9",
            type=DsrType.ACCESS,
            received_at=timezone.now() - timedelta(days=60),
            due_date=date.today() - timedelta(days=30),
        )
        _aged_event(
            action=AuditAction.DSR_RECEIVED,
            context=officer,
            object_type="compliance.datasubjectrequest",
            object_id=request.pk,
        )
    else:
        _aged_event(action=AuditAction.API_REQUEST, path="/api/compliance/gdpr/consent/cust-9")
    for _ in range(5):
        _aged_event()
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    # when a hold on cust-9 stands and the trail is purged
    retention.place_hold(
        name="cust-9 dispute",
        reason="claim",
        categories=[RetentionCategory.AUDIT_EVENTS],
        subject_id="cust-9",
        context=SYSTEM,
    )
    result = retention.purge_audit_events(dry_run=False, context=SYSTEM)
    # then the event about them (seq 5) and what follows stay
    assert (result["status"], result["last_seq"]) == ("purged", 4), result
    assert retention.kept_floor() == 5


# --- SOX: capture taken away ------------------------------------------------------------


def test_a_dropped_or_disabled_change_trigger_is_a_conflict_and_a_violation(postgres, db):
    assert not [c for c in approvals.sod_conflicts() if c["type"] == "capture_missing"]
    # given an insider who drops the trigger on the user table and disables the change
    # table's append-only guard
    bypass_triggers(f'DROP TRIGGER "{sox.trigger_name("security_user")}" ON security_user')
    bypass_triggers(
        "ALTER TABLE compliance_soxchange DISABLE TRIGGER compliance_soxchange_append_only"
    )
    # then both are segregation-of-duties conflicts, and the rule opens violations
    gaps = {c["key"]: c for c in approvals.sod_conflicts() if c["type"] == "capture_missing"}
    assert set(gaps) == {"capture:security_user", "capture:compliance_soxchange"}
    assert "not recorded" in gaps["capture:security_user"]["summary"]
    monitoring.evaluate_rules()
    open_keys = set(
        ComplianceViolation.objects.filter(
            rule=ViolationRule.SOD_CONFLICT, status=ViolationStatus.OPEN
        ).values_list("key", flat=True)
    )
    assert {"capture:security_user", "capture:compliance_soxchange"} <= open_keys
    # when the triggers are put back, the conflicts are gone
    bypass_triggers(
        "ALTER TABLE compliance_soxchange ENABLE TRIGGER compliance_soxchange_append_only"
    )
    sox.sync_triggers()
    assert not [c for c in approvals.sod_conflicts() if c["type"] == "capture_missing"]


# --- Endpoints that take no fields -------------------------------------------------------


def test_posts_that_take_no_fields_refuse_fields_by_name(compliance_api, operator):
    # the self-test
    refused = compliance_api.post("/api/compliance/test", {"checks": ["all"]}, format="json")
    assert refused.status_code == 400 and "checks" in refused.json()
    assert compliance_api.post("/api/compliance/test", {}, format="json").status_code == 202
    # cancelling an approval request
    approval = ApprovalRequest.objects.create(
        action=ApprovalAction.KEY_ROTATION,
        params={"new_data_keys": True},
        reason="test",
        status=ApprovalStatus.PENDING,
        requested_by=operator,
        requested_by_username=operator.username,
        requested_at=timezone.now(),
        expires_at=timezone.now() + timedelta(hours=1),
    )
    api = client_for(operator)
    cancel = f"/api/compliance/approvals/{approval.pk}/cancel"
    refused = api.post(cancel, {"force": True}, format="json")
    assert refused.status_code == 400 and "force" in refused.json()
    assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalStatus.PENDING
    assert api.post(cancel).status_code == 200


# --- DSR: who an erasure may reach -------------------------------------------------------


def test_an_erasure_cannot_lock_out_an_active_administrator(
    compliance_api, admin_user, django_capture_on_commit_callbacks
):
    # given a compliance officer who records an erasure request naming the superuser
    created = compliance_api.post(
        DSR, {"subject_id": admin_user.username, "type": "erasure"}, format="json"
    ).json()
    # when they verify it: refused, the account untouched
    refused = compliance_api.post(f"{DSR}/{created['id']}/verify", METHOD, format="json")
    assert refused.status_code == 409 and refused.json()["code"] == "account_active"
    admin_user.refresh_from_db()
    assert admin_user.is_active and admin_user.is_superuser
    # once an administrator has deactivated the account, its data is erased as anyone's
    User.objects.filter(pk=admin_user.pk).update(is_active=False)
    with django_capture_on_commit_callbacks(execute=True):
        started = compliance_api.post(f"{DSR}/{created['id']}/verify", METHOD, format="json")
    assert started.status_code == 202, started.content
    admin_user.refresh_from_db()
    assert admin_user.username.startswith("erased-") and not admin_user.is_superuser


def test_an_account_given_a_role_after_verification_is_not_erased_by_the_job(dana):
    request = dsr.create_request(
        subject_id="dana", type=DsrType.ERASURE, details={}, context=SYSTEM
    )
    job = dsr.verify_request(request=request, method="test", context=SYSTEM, enqueue=False)
    dana.groups.add(Group.objects.get_or_create(name=Role.SECURITY_OFFICER)[0])
    run_job(job.pk, dsr.run_dsr_job)
    request.refresh_from_db()
    # the request stays in progress, loudly, and the account keeps its role
    assert request.status == DsrStatus.IN_PROGRESS
    assert "active Bridge account" in request.result["error"]
    assert User.objects.get(pk=dana.pk).groups.filter(name=Role.SECURITY_OFFICER).exists()


# --- Text no database column can store ---------------------------------------------------

SURROGATE = "\ud800"


def test_text_with_a_lone_surrogate_is_refused_naming_the_field():
    from compliance import consent

    consent.publish_notice(version="v1", text="Our notice", context=SYSTEM)
    with pytest.raises(consent.ConsentError) as refused:
        consent.record_consent(
            subject_id="cust-1",
            purposes={"marketing": True},
            notice_version="v1",
            method="api",
            channel="web" + SURROGATE,
            context=SYSTEM,
        )
    assert refused.value.field == "channel"
    with pytest.raises(consent.ConsentError) as refused:
        consent.publish_notice(version="v2", text="Notice " + SURROGATE, context=SYSTEM)
    assert refused.value.field == "text"
    with pytest.raises(consent.ConsentError) as refused:
        consent.consent_receipt(subject_id="cust" + SURROGATE, context=SYSTEM)
    assert refused.value.field == "subject_id"
    today = timezone.now().date()
    with pytest.raises(reports.ReportRefused) as refused:
        reports.start_report(
            type=ReportType.AUDIT_TRAIL,
            format=ReportFormat.CSV,
            date_from=today,
            date_to=today,
            filters={"action": "custom." + SURROGATE},
            context=SYSTEM,
        )
    assert refused.value.field == "filters"
    for field, text in (("name", "hold" + SURROGATE), ("reason", "claim\x00")):
        fields = {"name": "hold", "reason": "claim", field: text}
        with pytest.raises(retention.RetentionError) as refused:
            retention.place_hold(
                categories=[RetentionCategory.AUDIT_EVENTS], context=SYSTEM, **fields
            )
        assert refused.value.field == field


@pytest.mark.django_db(transaction=True)
def test_a_lone_surrogate_in_a_request_body_is_recorded_not_a_503(compliance_api):
    # given a body JSON allows and UTF-8 cannot hold (a lone surrogate escape)
    body = '{"action": "note", "details": {"text": "\\ud800 x", "\\udfff": 1}}'
    # when it is sent
    response = compliance_api.post(
        "/api/compliance/audit/log", data=body, content_type="application/json"
    )
    # then the request is answered and recorded, the surrogate stored as U+FFFD
    assert response.status_code != 503, response.content
    assert response.status_code in (201, 400)
    events = AuditEvent.objects.filter(path="/api/compliance/audit/log", action="api.request")
    assert events.count() == 1
    stored = AuditEvent.objects.filter(action="custom.note").values_list("details", flat=True)
    for details in stored:
        assert "\ufffd" in details and "\ud800" not in details
