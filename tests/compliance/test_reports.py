"""Signed compliance reports: every type and format, the manifest and its signature, formula
injection, whole last days, caps that say so, the API with its permissions, and verify_report."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import sys
import types
import zlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command

import compliance
from backups.choices import BackupKind, BackupStatus, CopyStatus, RestoreKind, RestoreStatus
from backups.models import Artifact, Backup, BackupCopy, RestoreJob
from compliance import proof, reports
from compliance.audit import AuditContext, record_event
from compliance.choices import (
    AuditAction,
    DsrStatus,
    DsrType,
    ReportFormat,
    ReportStatus,
    ReportType,
    SoxOperation,
)
from compliance.models import AuditEvent, ComplianceReport, DataSubjectRequest, SoxChange
from compliance.personal import actor_match
from compliance.reports import verify, writers
from security.choices import Role, ThreatKind, ThreatLayer
from security.models import ThreatEvent, User

pytestmark = pytest.mark.django_db

FIRST, LAST = date(2024, 3, 1), date(2024, 3, 31)
GENERATE = "/api/compliance/reports/generate"
LIST = "/api/compliance/reports/list"
INJECTIONS = ["=cmd|' /C calc'!A0", "+1", "-1", "@SUM(1)", "\t=1"]


def at(day: date, *clock: int) -> datetime:
    return datetime(day.year, day.month, day.day, *clock, tzinfo=UTC)


@pytest.fixture(autouse=True)
def report_dir(settings, tmp_path) -> Path:
    settings.REPORT_DIR = tmp_path / "reports"
    return settings.REPORT_DIR


def event(action: str = AuditAction.ADMIN_CHANGE, when: datetime | None = None, **fields) -> int:
    context = fields.pop("context", AuditContext.system())
    return record_event(action=action, context=context, occurred_at=when or at(FIRST, 12), **fields)


def generate(
    type_: str = ReportType.AUDIT_TRAIL,
    format_: str = ReportFormat.CSV,
    first: date = FIRST,
    last: date = LAST,
    **filters,
) -> ComplianceReport:
    report = reports.generate_inline(
        type=type_,
        format=format_,
        date_from=first,
        date_to=last,
        filters=filters,
        context=AuditContext.system(),
    )
    assert report.status == ReportStatus.SUCCEEDED, report.error
    return report


def csv_rows(report: ComplianceReport) -> list[list[str]]:
    text = reports.report_path(report).read_text(encoding="utf-8-sig")
    return list(csv.reader(io.StringIO(text)))


def json_document(report: ComplianceReport) -> dict:
    return json.loads(reports.report_path(report).read_text(encoding="utf-8"))


def pdf_text(path: Path) -> str:
    """The text drawn in a PDF's content streams (reportlab compresses them)."""
    data = path.read_bytes()
    found = []
    for raw in re.findall(rb"stream\r?\n(.*?)\s*endstream", data, re.DOTALL):
        for decode in (
            lambda chunk: zlib.decompress(chunk),
            lambda chunk: zlib.decompress(base64.a85decode(chunk.strip().removesuffix(b"~>"))),
        ):
            try:
                found.append(decode(raw).decode("latin-1"))
                break
            except (zlib.error, ValueError):
                continue
    return "\n".join(found)


def rows_in_file(report: ComplianceReport) -> int:
    if report.format == ReportFormat.CSV:
        return len(csv_rows(report)) - 1
    if report.format == ReportFormat.JSON:
        return len(json_document(report)["rows"])
    assert reports.report_path(report).read_bytes().startswith(b"%PDF")
    return report.manifest["rows_in_file"]


# --- Constructed data for each type --------------------------------------------------------


@pytest.fixture
def conflicts(monkeypatch) -> list[dict]:
    """compliance.approvals.sod_conflicts answering one conflict (H3's module, or a stand-in)."""
    found = [
        {
            "id": "c0ffee",
            "action": "backup.live_restore",
            "requested_by": "olivia",
            "decided_by": "olivia",
            "time": at(FIRST, 9),
            "summary": "the requester approved their own live restore",
        }
    ]
    calls = []

    def sod_conflicts(*, since=None, until=None) -> list[dict]:
        calls.append((since, until))
        return found

    try:
        from compliance import approvals
    except ImportError:
        approvals = types.ModuleType("compliance.approvals")
        monkeypatch.setitem(sys.modules, "compliance.approvals", approvals)
        monkeypatch.setattr(compliance, "approvals", approvals, raising=False)
    monkeypatch.setattr(approvals, "sod_conflicts", sod_conflicts, raising=False)
    return calls


def make_audit_events() -> int:
    event(when=at(FIRST, 0))
    event(AuditAction.LOGIN_FAILED, when=at(FIRST + timedelta(days=3), 8))
    event(when=at(LAST, 23, 59, 59, 999000))
    event(when=at(LAST + timedelta(days=1)))  # the day after: out
    event(when=at(FIRST, 0) - timedelta(microseconds=1))  # the day before: out
    return 3


def make_access_review() -> int:
    reviewer = User.objects.create_user("auditee", email="a@example.com")
    reviewer.groups.add(Group.objects.get_or_create(name=Role.OPERATOR)[0])
    event(
        AuditAction.BACKUP_REQUESTED,
        context=AuditContext(actor_id=reviewer.pk, actor_username="auditee"),
    )
    return User.objects.count()


def make_dsrs() -> int:
    received = at(FIRST, 10)
    common = {"subject_id": "customer-7", "type": DsrType.ACCESS, "received_at": received}
    DataSubjectRequest.objects.create(
        **common,
        status=DsrStatus.COMPLETED,
        due_date=FIRST + timedelta(days=31),
        completed_at=received + timedelta(days=5),
    )
    DataSubjectRequest.objects.create(
        **common, status=DsrStatus.IN_PROGRESS, due_date=FIRST + timedelta(days=31)
    )
    DataSubjectRequest.objects.create(  # received after the period: out
        **{**common, "received_at": at(LAST + timedelta(days=1), 1)},
        due_date=LAST + timedelta(days=32),
    )
    return 2


def make_sox_changes() -> int:
    for pk in ("1", "2"):
        SoxChange.objects.create(
            occurred_at=at(FIRST, 11),
            table_name="auth_group",
            model="auth.Group",
            object_pk=pk,
            operation=SoxOperation.UPDATE,
            before={"name": "old"},
            after={"name": "new"},
            changed_fields=["name"],
            actor_username="olivia",
        )
    SoxChange.objects.create(
        occurred_at=at(LAST + timedelta(days=2)),
        table_name="auth_group",
        operation=SoxOperation.DELETE,
    )
    return 2 + 1  # the changes and the one conflict


def make_security_events() -> int:
    event(AuditAction.LOGIN_FAILED)
    event(AuditAction.IP_BANNED, when=at(FIRST, 13))
    event(AuditAction.LOGIN_SUCCEEDED)  # not a security event of the report
    ThreatEvent.objects.create(
        occurred_at=at(FIRST, 12, 30),
        layer=ThreatLayer.AUTHENTICATION,
        kind=ThreatKind.LOGIN_FAILED,
        score=5,
        network="203.0.113.0",
    )
    return 3


def make_backups() -> int:
    backup = Backup.objects.create(
        kind=BackupKind.FULL,
        status=BackupStatus.SUCCEEDED,
        components=["uploads"],
        rule_321={"ok": False, "copies": 2},
    )
    artifact = Artifact.objects.create(
        backup=backup, component="uploads", name="uploads.tar", sha256="a" * 64
    )
    for target in ("local", "local-mirror"):
        BackupCopy.objects.create(
            artifact=artifact,
            target=target,
            media="disk",
            location=f"{target}/uploads.tar",
            size=10,
            sha256="b" * 64,
            status=CopyStatus.COMMITTED,
        )
    drill = RestoreJob.objects.create(
        backup=backup,
        backup_ref=str(backup.pk),
        kind=RestoreKind.DRILL,
        status=RestoreStatus.SUCCEEDED,
        rto_seconds=12.5,
    )
    Backup.objects.filter(pk=backup.pk).update(created_at=at(FIRST, 2))
    RestoreJob.objects.filter(pk=drill.pk).update(created_at=at(FIRST, 3))
    return 1 + 2 + 1


MAKERS = {
    ReportType.AUDIT_TRAIL: make_audit_events,
    ReportType.ACCESS_REVIEW: make_access_review,
    ReportType.GDPR_REQUESTS: make_dsrs,
    ReportType.SOX_CHANGES: make_sox_changes,
    ReportType.SECURITY_EVENTS: make_security_events,
    ReportType.BACKUP_EVIDENCE: make_backups,
}


@pytest.mark.parametrize("format_", ReportFormat.values)
@pytest.mark.parametrize("type_", ReportType.values)
def test_each_type_and_format_has_the_rows_of_its_period(type_, format_, conflicts):
    expected = MAKERS[type_]()
    report = generate(type_, format_)
    assert report.rows == expected == report.manifest["rows"]
    assert rows_in_file(report) == expected
    assert report.truncated is False
    # A PDF may shorten long cells (and says so); no row is left out anywhere.
    assert all("shortened" in cap for cap in report.manifest["caps"])
    assert reports.verify_report_file(reports.report_path(report)).ok
    assert AuditEvent.objects.filter(
        action=AuditAction.REPORT_GENERATED, object_id=str(report.pk)
    ).exists()
    if type_ == ReportType.SOX_CHANGES:
        assert conflicts == [(at(FIRST), at(LAST + timedelta(days=1)))]


def test_the_whole_last_day_is_in_and_the_day_after_is_not():
    make_audit_events()
    rows = csv_rows(generate())
    header, body = rows[0], rows[1:]
    times = [row[header.index("time")] for row in body]
    assert times == [
        "2024-03-01T00:00:00.000000+00:00",
        "2024-03-04T08:00:00.000000+00:00",
        "2024-03-31T23:59:59.999000+00:00",
    ]
    report = ComplianceReport.objects.get()
    assert report.period_from == at(FIRST) and report.period_to == at(date(2024, 4, 1))


def test_audit_rows_carry_seq_actions_and_the_checkpoint_they_are_sealed_under():
    make_audit_events()
    report = generate(format_=ReportFormat.JSON)
    document = json_document(report)
    assert document["manifest"]["report"]["id"] == str(report.pk)
    assert [row["action"] for row in document["rows"]] == [
        AuditAction.ADMIN_CHANGE,
        AuditAction.LOGIN_FAILED,
        AuditAction.ADMIN_CHANGE,
    ]
    assert all(isinstance(row["seq"], int) for row in document["rows"])
    assert document["end"] == {
        "rows": 3,
        "truncated": False,
        "max_rows": report.manifest["max_rows"],
        "caps": [],
        "counts": report.manifest["counts"],
        "evidence": report.manifest["evidence"],
    }
    checkpoint = report.manifest["checkpoint"]
    assert checkpoint["number"] == report.checkpoint_number and checkpoint["number"] >= 1
    assert len(checkpoint["hash"]) == 64 and checkpoint["problem"] == ""
    sealing = report.manifest["evidence"]["sealing"]
    assert sealing["all_rows_sealed_under_checkpoint"] is True
    assert sealing["checkpoint"] == checkpoint["number"]
    assert report.manifest["generator"].startswith("Bridge ")
    assert report.manifest["counts"]["Events per day"]["2024-03-31"] == 1


def test_audit_trail_filters_by_action_and_by_sealed_actor(admin_user):
    make_audit_events()
    root = AuditContext(actor_id=admin_user.pk, actor_username=admin_user.username)
    event(context=root, path="/admin/", details={"email": "root@example.com"})
    by_action = generate(action=AuditAction.LOGIN_FAILED)
    assert by_action.rows == 1
    by_actor = generate(format_=ReportFormat.JSON, actor="root")
    rows = json_document(by_actor)["rows"]
    assert [(row["actor"], row["path"]) for row in rows] == [("root", "/admin/")]
    assert rows[0]["details"].get("email") == "root@example.com"
    assert rows[0]["personal_data"] == ""


def test_an_erased_subjects_events_read_as_erased(admin_user):
    from security.crypto import shred_subject_key

    root = AuditContext(actor_id=admin_user.pk, actor_username=admin_user.username)
    event(context=root, details={"email": "root@example.com"})
    shred_subject_key(subject_id="root")
    report = generate(format_=ReportFormat.JSON)
    (row,) = json_document(report)["rows"]
    assert row["personal_data"] == "erased" and "email" not in row["details"]
    assert row["actor"] != "root"
    assert report.manifest["evidence"]["sealing"]["rows_with_erased_personal_data"] == 1


# --- CSV formula injection ---------------------------------------------------------------


@pytest.mark.parametrize("value", [*INJECTIONS, "\r=1", " =1", "\t =HYPERLINK()", "\uff1d1"])
def test_safe_cell_prefixes_what_a_spreadsheet_would_run(value):
    assert reports.safe_cell(value) == "'" + value


@pytest.mark.parametrize(
    ("value", "text"),
    [("plain", "plain"), ("1-2", "1-2"), ("", ""), (None, ""), (5, "5"), (True, "true"),
     ({"a": "=1"}, '{"a":"=1"}'), (-3, "'-3")],
)  # fmt: skip
def test_safe_cell_leaves_text_alone(value, text):
    assert reports.safe_cell(value) == text


def test_formula_injection_in_events_is_neutralised_in_the_csv():
    for value in INJECTIONS:
        event(path=value, object_id=value, details={"note": value})
    header, *body = csv_rows(generate())
    path_at, object_at, details_at = (
        header.index(name) for name in ("path", "object_id", "details")
    )
    assert [row[path_at] for row in body] == ["'" + value for value in INJECTIONS]
    assert [row[object_at] for row in body] == ["'" + value for value in INJECTIONS]
    for row, value in zip(body, INJECTIONS, strict=True):
        assert json.loads(row[details_at]) == {"note": value}  # JSON text starts with "{"
    dangerous = tuple("=+-@\t\r")
    assert not any(cell.startswith(dangerous) for row in body for cell in row)


# --- Caps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("format_", ReportFormat.values)
def test_past_report_max_rows_the_report_stops_and_says_so(settings, format_):
    settings.REPORT_MAX_ROWS = 2
    make_audit_events()
    report = generate(format_=format_)
    assert report.truncated is True and report.rows == 2
    assert report.manifest["truncated"] is True
    assert "REPORT_MAX_ROWS" in report.manifest["caps"][0]
    if format_ == ReportFormat.CSV:
        last = csv_rows(report)[-1]
        assert last[0] == "# TRUNCATED" and "REPORT_MAX_ROWS" in last[1]
        assert len(csv_rows(report)) == 1 + 2 + 1
    elif format_ == ReportFormat.JSON:
        document = json_document(report)
        assert len(document["rows"]) == 2 and document["end"]["truncated"] is True
    else:
        assert "REPORT_MAX_ROWS" in pdf_text(reports.report_path(report))
    assert reports.verify_report_file(reports.report_path(report)).ok


def test_pdf_has_a_summary_page_with_a_chart_and_caps_its_table(monkeypatch):
    monkeypatch.setattr(writers, "PDF_MAX_ROWS", 1)
    make_audit_events()
    report = generate(format_=ReportFormat.PDF)
    path = reports.report_path(report)
    assert path.read_bytes().startswith(b"%PDF")
    text = pdf_text(path)
    assert "Bridge compliance report: Audit trail" in text
    assert "Period 2024-03-01 to 2024-03-31" in text
    assert "Events per day" in text  # the chart's title
    assert "first 1 of 3 rows" in text
    assert report.rows == 3 and report.manifest["rows_in_file"] == 1
    assert any("first 1 of 3 rows" in cap for cap in report.manifest["caps"])


# --- Signature and verification ------------------------------------------------------------


def public_key_file(tmp_path: Path) -> Path:
    from security.keys import audit_signing_key

    path = tmp_path / "audit.pub"
    path.write_text(proof.public_key_pem(audit_signing_key().public))
    return path


def test_signature_verifies_and_fails_after_one_byte_or_the_manifest_changes(tmp_path):
    make_audit_events()
    report = generate()
    path = reports.report_path(report)
    manifest_path, signature_path = verify.companion_paths(path)
    assert manifest_path.name == f"{report.pk}.manifest.json"
    assert signature_path.name == f"{report.pk}.sig"
    verdict = reports.verify_report_file(path)
    assert verdict.ok, verdict.reason
    assert verdict.report_id == str(report.pk) and verdict.key_id == report.key_id
    assert json.loads(manifest_path.read_text())["file"]["sha256"] == report.sha256

    original = path.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    verdict = reports.verify_report_file(path)
    assert not verdict.ok and verdict.problem == verify.TAMPERED
    assert "the file was changed" in verdict.reason
    path.write_bytes(original)

    manifest_text = manifest_path.read_text()
    manifest = json.loads(manifest_text)
    manifest["rows"] += 1
    manifest_path.write_text(json.dumps(manifest))
    verdict = reports.verify_report_file(path)
    assert not verdict.ok and "manifest was changed" in verdict.reason
    manifest_path.write_text(manifest_text)
    assert reports.verify_report_file(path).ok

    # The auditor's offline check: no Django, a pinned public key.
    key = public_key_file(tmp_path)
    assert verify.main([str(path), "--public-key", str(key)]) == 0
    other = tmp_path / "other.pub"
    other.write_text(proof.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    assert verify.main([str(path), "--public-key", str(other)]) == 1
    assert verify.main([str(path), "--public-key", str(tmp_path / "missing.pub")]) == 2


def test_the_offline_verifier_imports_no_django(tmp_path):
    import subprocess

    make_audit_events()
    report = generate(format_=ReportFormat.JSON)
    key = public_key_file(tmp_path)
    code = (
        "import sys, runpy; sys.argv = ['verify', sys.argv[1], '--public-key', sys.argv[2]];"
        "import compliance.reports.verify as v; code = v.main(sys.argv[1:]);"
        "assert 'django' not in sys.modules, 'django imported'; sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(reports.report_path(report)), str(key)],
        cwd=Path(__file__).resolve().parents[2],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: report ")


def test_verify_report_command_exit_codes(tmp_path, capsys):
    make_audit_events()
    report = generate(format_=ReportFormat.PDF)
    path = reports.report_path(report)
    call_command("verify_report", str(path))
    assert "OK: report" in capsys.readouterr().out
    call_command("verify_report", str(path), "--public-key", str(public_key_file(tmp_path)))

    copy = tmp_path / "renamed.pdf"
    copy.write_bytes(path.read_bytes() + b"\n")
    manifest, signature = verify.companion_paths(path)
    with pytest.raises(CommandError) as changed:
        call_command(
            "verify_report", str(copy), "--manifest", str(manifest), "--signature", str(signature)
        )
    assert changed.value.returncode == 1 and "SHA-256" in str(changed.value)
    with pytest.raises(CommandError) as unreadable:
        call_command("verify_report", str(copy))  # no renamed.manifest.json beside it
    assert unreadable.value.returncode == 2
    other = tmp_path / "other.pub"
    other.write_text(proof.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(CommandError) as untrusted:
        call_command("verify_report", str(path), "--public-key", str(other))
    assert untrusted.value.returncode == 1 and "not trusted" in str(untrusted.value)


# --- Refusals and failures ---------------------------------------------------------------


def test_parameters_are_checked_and_named():
    def start(**changes):
        asked = {
            "type": ReportType.AUDIT_TRAIL,
            "format": ReportFormat.CSV,
            "date_from": FIRST,
            "date_to": LAST,
            "filters": {},
            "context": AuditContext.system(),
            **changes,
        }
        with pytest.raises(reports.ReportRefused) as refused:
            reports.start_report(**asked)
        return refused.value

    assert start(date_from=LAST, date_to=FIRST).field == "to"
    unknown = start(filters={"actr": "x", "colour": "red"})
    assert unknown.field == "filters" and "actr, colour" in str(unknown)
    assert "Known: action, actor" in str(unknown)
    assert start(type="everything").field == "type"
    assert start(format="xlsx").field == "format"
    assert start(date_to=date.max).field == "to"
    assert start(date_from=at(FIRST)).field == "from"
    assert start(filters={"actor": ""}).field == "filters"
    assert start(type=ReportType.ACCESS_REVIEW, filters={"active": "yes"}).field == "filters"
    assert start(type=ReportType.ACCESS_REVIEW, filters={"role": "king"}).field == "filters"
    assert not ComplianceReport.objects.exists()


def test_a_sox_report_without_segregation_of_duties_conflicts_fails_naming_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "compliance.approvals", None)
    monkeypatch.delattr(compliance, "approvals", raising=False)
    make_sox_changes()
    report = reports.generate_inline(
        type=ReportType.SOX_CHANGES,
        format=ReportFormat.CSV,
        date_from=FIRST,
        date_to=LAST,
        filters={},
        context=AuditContext.system(),
    )
    assert report.status == ReportStatus.FAILED
    assert "compliance.approvals.sod_conflicts" in report.error
    assert not any(path.exists() for path in reports.report_files(report))
    failed = AuditEvent.objects.get(action=AuditAction.REPORT_FAILED, object_id=str(report.pk))
    assert "sod_conflicts" in failed.details
    assert report.job.status == "failed"


# --- API -------------------------------------------------------------------------------------


def post_generate(api, django_capture_on_commit_callbacks, **body):
    asked = {"type": "audit_trail", "format": "csv", "from": "2024-03-01", "to": "2024-03-31"}
    with django_capture_on_commit_callbacks(execute=True):
        return api.post(GENERATE, {**asked, **body}, format="json")


def test_generate_list_show_download_and_verify_through_the_api(
    compliance_api, django_capture_on_commit_callbacks, tmp_path
):
    make_audit_events()
    response = post_generate(compliance_api, django_capture_on_commit_callbacks)
    assert response.status_code == 202, response.content
    body = response.json()
    report_id = body["report"]["id"]
    assert body["report"]["from"] == "2024-03-01" and body["report"]["to"] == "2024-03-31"
    assert body["job"]["kind"] == "compliance.report"
    assert response["Location"].endswith(f"/api/compliance/reports/{report_id}")
    by_carla = AuditEvent.objects.filter(actor_match("carla"))  # sealed actors too
    assert by_carla.filter(action=AuditAction.REPORT_REQUESTED, object_id=report_id).exists()

    detail = compliance_api.get(f"/api/compliance/reports/{report_id}").json()
    assert detail["status"] == "succeeded" and detail["rows"] == 3
    assert detail["created_by"] == "carla" and detail["manifest"]["rows"] == 3
    assert detail["download_url"].endswith(f"/api/compliance/reports/{report_id}/download")

    listing = compliance_api.get(LIST, {"type": "audit_trail", "status": "succeeded"}).json()
    assert [row["id"] for row in listing["results"]] == [report_id]
    assert compliance_api.get(LIST, {"type": "access_review"}).json()["results"] == []
    # `format` filters here (DRF would read it as the renderer to answer with).
    assert [row["id"] for row in compliance_api.get(LIST, {"format": "csv"}).json()["results"]] == [
        report_id
    ]
    assert compliance_api.get(LIST, {"format": "pdf"}).json()["results"] == []
    assert compliance_api.get(LIST, {"format": "pdfx"}).status_code == 400

    download = compliance_api.get(detail["download_url"])
    assert download.status_code == 200
    assert download["Content-Type"].startswith("text/csv")
    assert f'filename="{report_id}.csv"' in download["Content-Disposition"]
    content = b"".join(download.streaming_content)
    assert content == reports.report_path(ComplianceReport.objects.get(pk=report_id)).read_bytes()
    assert by_carla.filter(action=AuditAction.REPORT_DOWNLOADED, object_id=report_id).count() == 1

    manifest = compliance_api.get(detail["manifest_url"])
    signature = compliance_api.get(detail["signature_url"])
    assert manifest.status_code == signature.status_code == 200
    assert manifest.json()["file"]["sha256"] == detail["sha256"]
    assert signature.json()["signature"] == detail["signature"]
    # What an auditor saves from the API verifies offline.
    (tmp_path / f"{report_id}.csv").write_bytes(content)
    (tmp_path / f"{report_id}.manifest.json").write_bytes(manifest.content)
    (tmp_path / f"{report_id}.sig").write_bytes(signature.content)
    key = public_key_file(tmp_path)
    assert verify.main([str(tmp_path / f"{report_id}.csv"), "--public-key", str(key)]) == 0


def test_api_refusals_name_what_is_wrong(compliance_api, django_capture_on_commit_callbacks):
    def refused(**body):
        response = post_generate(compliance_api, django_capture_on_commit_callbacks, **body)
        assert response.status_code == 400, response.content
        return response.json()

    assert "to" in refused(**{"from": "2024-04-01", "to": "2024-03-01"})
    assert "colour" in refused(filters={"colour": "red"})["filters"][0]
    assert "filtres" in refused(filtres={"action": "x"})
    assert "from" in refused(**{"from": "2024-3-1"})
    assert "from" in refused(**{"from": 20240301})
    assert "type" in refused(type="everything")
    assert "format" in refused(format="xlsx")
    assert "filters" in refused(filters=["action"])
    assert compliance_api.post(GENERATE).status_code == 400
    assert not ComplianceReport.objects.exists()
    missing = "/api/compliance/reports/00000000-0000-0000-0000-000000000000"
    assert compliance_api.get(missing).status_code == 404
    assert compliance_api.get(missing + "/download").status_code == 404


def test_a_report_not_yet_generated_has_nothing_to_download(compliance_api):
    # The job is only queued once the transaction commits: here it never runs.
    response = compliance_api.post(
        GENERATE,
        {"type": "access_review", "format": "pdf", "from": "2024-03-01", "to": "2024-03-01"},
        format="json",
    )
    assert response.status_code == 202
    report = response.json()["report"]
    assert report["status"] == "pending" and report["download_url"] is None
    for tail in ("/download", "/manifest", "/signature"):
        answer = compliance_api.get(f"{report['url']}{tail}")
        assert answer.status_code == 409 and answer.json()["code"] == "report_not_ready"


def test_permissions(
    outsider_api, operator_api, anon_api, compliance_api, django_capture_on_commit_callbacks
):
    asked = {"type": "audit_trail", "format": "csv", "from": "2024-03-01", "to": "2024-03-31"}
    for api in (outsider_api, operator_api):
        assert api.post(GENERATE, asked, format="json").status_code == 403
        assert api.get(LIST).status_code == 403
    assert anon_api.post(GENERATE, asked, format="json").status_code == 401
    assert anon_api.get(LIST).status_code == 401
    report_id = post_generate(compliance_api, django_capture_on_commit_callbacks).json()["report"][
        "id"
    ]
    for api in (outsider_api, operator_api):
        assert api.get(f"/api/compliance/reports/{report_id}").status_code == 403
        assert api.get(f"/api/compliance/reports/{report_id}/download").status_code == 403
    assert not AuditEvent.objects.filter(action=AuditAction.REPORT_DOWNLOADED).exists()


def test_a_report_whose_job_failed_is_shown_failed(
    compliance_api, django_capture_on_commit_callbacks
):
    from bridge.models import Job

    response = compliance_api.post(
        GENERATE,
        {"type": "audit_trail", "format": "json", "from": "2024-03-01", "to": "2024-03-01"},
        format="json",
    )
    report_id = response.json()["report"]["id"]
    Job.objects.filter(pk=response.json()["job"]["id"]).update(status="failed", error="worker lost")
    detail = compliance_api.get(f"/api/compliance/reports/{report_id}").json()
    assert detail["status"] == "failed" and "worker lost" in detail["error"]
    assert AuditEvent.objects.filter(action=AuditAction.REPORT_FAILED, object_id=report_id).exists()


# --- What each type says -------------------------------------------------------------------


def test_access_review_lists_roles_and_privileged_actions():
    make_access_review()
    rows = json_document(generate(ReportType.ACCESS_REVIEW, ReportFormat.JSON))["rows"]
    auditee = next(row for row in rows if row["username"] == "auditee")
    assert auditee["roles"] == Role.OPERATOR and auditee["privileged_actions"] == 1
    assert auditee["last_privileged_action"] == "2024-03-01T12:00:00.000000+00:00"
    assert auditee["active"] is True and auditee["superuser"] is False
    only = generate(ReportType.ACCESS_REVIEW, role=Role.OPERATOR)
    assert [row[0] for row in csv_rows(only)[1:]] == ["auditee"]


def test_gdpr_requests_say_whether_they_were_answered_on_time():
    make_dsrs()
    rows = json_document(generate(ReportType.GDPR_REQUESTS, ReportFormat.JSON))["rows"]
    assert sorted((row["status"], row["on_time"], row["days_to_close"]) for row in rows) == [
        ("completed", "yes", 5),
        ("in_progress", "overdue", None),
    ]
    assert generate(ReportType.GDPR_REQUESTS, status="completed").rows == 1


def test_security_events_join_the_trail_and_threats_in_one_timeline():
    make_security_events()
    rows = json_document(generate(ReportType.SECURITY_EVENTS, ReportFormat.JSON))["rows"]
    assert [(row["source"], row["action"]) for row in rows] == [
        ("audit", AuditAction.LOGIN_FAILED),
        ("threat", ThreatKind.LOGIN_FAILED),
        ("audit", AuditAction.IP_BANNED),
    ]
    assert generate(ReportType.SECURITY_EVENTS, source="threat").rows == 1
    assert generate(ReportType.SECURITY_EVENTS, action=AuditAction.IP_BANNED).rows == 1


def test_backup_evidence_lists_backups_their_copies_and_drills():
    make_backups()
    rows = json_document(generate(ReportType.BACKUP_EVIDENCE, ReportFormat.JSON))["rows"]
    assert [row["record"] for row in rows] == ["backup", "copy", "copy", "drill"]
    assert {row["target"] for row in rows if row["record"] == "copy"} == {"local", "local-mirror"}
    assert rows[-1]["rto_seconds"] == 12.5
    evidence = ComplianceReport.objects.latest("created_at").manifest["evidence"]
    assert evidence["drills_succeeded"] == 1 and evidence["copies"] == 2


def test_sox_report_lists_conflicts_before_changes(conflicts):
    make_sox_changes()
    rows = json_document(generate(ReportType.SOX_CHANGES, ReportFormat.JSON))["rows"]
    assert [row["record"] for row in rows] == ["sod_conflict", "change", "change"]
    assert rows[0]["details"]["summary"].startswith("the requester approved")
    assert rows[0]["time"] == "2024-03-01T09:00:00.000000+00:00"


# --- Reading large tables --------------------------------------------------------------------


def test_windows_read_every_row_once_in_id_order_however_sparse():
    from compliance.reports.reading import windowed

    ids = [event(AuditAction.LOGIN_FAILED if n % 7 == 0 else AuditAction.ADMIN_CHANGE)
           for n in range(60)]  # fmt: skip
    wanted = [pk for n, pk in enumerate(ids) if n % 7 == 0]
    sparse = AuditEvent.objects.filter(action=AuditAction.LOGIN_FAILED)
    assert [row[0] for row in windowed(sparse, ("id",), batch=2)] == wanted
    assert [row[0] for row in windowed(AuditEvent.objects.all(), ("id",), batch=4)] == ids


@pytest.mark.django_db(transaction=True)
def test_on_postgresql_a_reader_thread_reads_ahead(postgres):
    from django.db import connection

    from compliance.reports.reading import audit_batches

    make_audit_events()
    assert not connection.in_atomic_block  # the read-ahead path
    batches = list(audit_batches(AuditEvent.objects.order_by()))
    rows = [row for rows, _ in batches for row in rows]
    assert len(rows) == 5 and rows[0][1].endswith("+00:00")
    report = generate()
    assert report.rows == 3


def test_a_chart_of_centuries_sums_what_it_cannot_show():
    chart = writers.Chart(
        "Events", lambda row: row[0], period=(at(date(1970, 1, 1)), at(date(2500, 1, 1)))
    )
    chart.counts.update({"1980": 2, "2400": 3})
    bars = chart.bars()
    assert chart.title == "Events per year" and bars[-1] == ("2090 on", 3)
    assert dict(bars)["1980"] == 2
