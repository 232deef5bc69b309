"""Retention: legal holds, the daily run with its dry run, DSR records and reports removed when
due, and the audit purge in whole signed ranges, after which the chain still verifies, online
and offline, from the checkpoint the purge was cut at; an insider's cut does not."""

from __future__ import annotations

import base64
import importlib
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.models import Job
from compliance import audit, chain, checkpoints, retention
from compliance.audit import AuditContext
from compliance.choices import (
    RETENTION_JOB_KIND,
    AuditAction,
    DsrStatus,
    DsrType,
    ReportFormat,
    ReportStatus,
    ReportType,
    RetentionCategory,
)
from compliance.export import export_audit
from compliance.models import (
    AuditCheckpoint,
    AuditEvent,
    AuditPurge,
    AuditSeal,
    ComplianceReport,
    DataSubjectRequest,
    LegalHold,
)
from compliance.reports import report_files
from compliance.verification import check_chain
from compliance.verify_export import verify_export
from security import keys
from security.keys import audit_signing_key
from tests.compliance.test_checkpoints import public_key_file, run_offline
from tests.conftest import bypass_triggers

pytestmark = pytest.mark.django_db(transaction=True)

DAYS = 30
SYSTEM = AuditContext.system()
RETENTION = "/api/compliance/retention"


@pytest.fixture(autouse=True)
def short_retention(settings) -> None:
    settings.RETENTION_DAYS = {category: DAYS for category in RetentionCategory.values}
    settings.RETENTION_DRY_RUN = False


def aged(count: int, *, days: int = 2 * DAYS, prefix: str = "old", **fields) -> None:
    """`count` events that occurred `days` ago (events are append-only: they are recorded
    old, never moved back)."""
    when = timezone.now() - timedelta(days=days)
    for n in range(count):
        audit.record_event(
            action=fields.get("action") or f"custom.{prefix}{n}",
            context=fields.get("context", SYSTEM),
            details={"n": n},
            occurred_at=when + timedelta(seconds=n),
        )


def fresh(count: int, prefix: str = "new") -> None:
    for n in range(count):
        audit.record_event(action=f"custom.{prefix}{n}", context=SYSTEM, details={"n": n})


def seal() -> int:
    chain.seal_all_pending()
    return chain.chain_head().last_seq


def purge(**kwargs) -> dict:
    return retention.purge_audit_events(
        dry_run=kwargs.pop("dry_run", False), context=SYSTEM, **kwargs
    )


def remove_seqs(first: int, last: int) -> None:
    """An insider with superuser rights deletes seqs first..last, seals and events."""
    gone = list(
        AuditSeal.objects.filter(seq__gte=first, seq__lte=last).values_list("event_id", flat=True)
    )
    marks = ",".join(["%s"] * len(gone))
    bypass_triggers(f"DELETE FROM compliance_auditevent WHERE id IN ({marks})", gone)  # noqa: S608
    bypass_triggers(f"DELETE FROM compliance_auditseal WHERE event_id IN ({marks})", gone)  # noqa: S608


# --- The purge, and verification after it -------------------------------------------------


def test_a_purge_removes_a_signed_range_and_the_chain_verifies_from_its_checkpoint():
    # given 40 events past retention, sealed and signed, then 10 recent ones
    aged(40)
    assert seal() == 40
    first = checkpoints.make_checkpoint(force=True)
    fresh(10)
    assert seal() == 50
    checkpoints.make_checkpoint()
    # when the audit trail is purged
    result = purge()
    # then seq 1..40 are gone, cut at checkpoint #1's seq, and the purge says so
    assert result["status"] == "purged", result
    assert (result["first_seq"], result["last_seq"], result["events"]) == (1, 40, 40)
    assert not AuditEvent.objects.filter(action__startswith="custom.old").exists()
    assert AuditEvent.objects.filter(action__startswith="custom.new").count() == 10
    row = AuditPurge.objects.get()
    assert (row.first_seq, row.last_seq, row.events, row.checkpoint_number) == (1, 40, 40, 1)
    assert row.anchor_hash == first.hash
    assert row.newest_purged_at < timezone.now() - timedelta(days=DAYS)
    # and verification starts after seq 40, from the hash checkpoint #1 signs, and passes
    assert retention.chain_base()[:3] == (40, first.hash, 1)
    check = check_chain()
    assert check.ok, check.reason
    assert check.checked == 10
    # and the purge is itself an event of the chain, sealed, signed and verified in turn
    recorded = AuditEvent.objects.get(action=AuditAction.AUDIT_PURGED)
    assert recorded.object_id == str(row.pk)
    assert recorded.details_data["last_seq"] == 40
    seal()
    checkpoints.make_checkpoint()
    check = check_chain()
    assert check.ok and check.checked == 11, check


def test_a_purge_can_end_at_a_waypoint_and_runs_in_signed_transactions(settings, monkeypatch):
    # given 35 old events and 5 recent ones under one checkpoint signing every seq
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    monkeypatch.setattr(retention, "PURGE_CHUNK", 10)
    monkeypatch.setattr(retention, "DELETE_BATCH", 3)
    aged(35)
    fresh(5)
    seal()
    checkpoints.make_checkpoint()
    # when purged, 10 events per transaction
    result = purge()
    # then seq 1..35 went in four purges, each cut at a signed seq, each recorded
    assert (result["status"], result["last_seq"], result["events"]) == ("purged", 35, 35)
    rows = list(AuditPurge.objects.order_by("first_seq").values_list("first_seq", "last_seq"))
    assert rows == [(1, 10), (11, 20), (21, 30), (31, 35)]
    assert AuditEvent.objects.filter(action=AuditAction.AUDIT_PURGED).count() == 4
    # and the chain verifies from seq 36, whose predecessor checkpoint #1 signs as a waypoint
    assert retention.chain_base()[:3] == (35, result["anchor_hash"], 1)
    assert check_chain().ok


def test_a_purge_without_a_covering_checkpoint_is_refused_and_recorded():
    # given old, sealed events that no checkpoint signs
    aged(20)
    seal()
    # when a purge is asked for, then it is refused, and nothing goes
    with pytest.raises(retention.PurgeRefused, match="no signed checkpoint covers"):
        purge()
    assert AuditSeal.objects.count() == 20
    assert not AuditPurge.objects.exists()
    refused = AuditEvent.objects.get(action=AuditAction.AUDIT_PURGE_REFUSED)
    assert "no signed checkpoint covers" in refused.details_data["reason"]
    # and the retention run that meets it fails, saying why, after recording its counts
    with pytest.raises(retention.RetentionFailed, match="no signed checkpoint"):
        retention.apply_retention(dry_run=False, context=SYSTEM)
    run = AuditEvent.objects.get(action=AuditAction.RETENTION_RUN)
    assert run.details_data["audit_status"] == "refused" and run.details_data["ok"] is False


def test_a_dry_run_deletes_nothing_and_says_what_would_go():
    aged(20)
    seal()
    checkpoints.make_checkpoint()
    fresh(3)
    seal()
    result = purge(dry_run=True)
    assert (result["status"], result["first_seq"], result["last_seq"]) == ("would_purge", 1, 20)
    assert result["events"] == 20
    summary = retention.apply_retention(dry_run=True, context=SYSTEM)
    assert summary["categories"]["audit_events"]["would_delete"] == 20
    assert AuditSeal.objects.count() == 23 and not AuditPurge.objects.exists()
    assert not AuditEvent.objects.filter(action=AuditAction.AUDIT_PURGED).exists()
    run = AuditEvent.objects.get(action=AuditAction.RETENTION_RUN)
    assert run.details_data["dry_run"] is True
    assert run.details_data["counts"]["audit_events"]["would_delete"] == 20


def test_a_tampered_tail_after_the_checkpoint_is_detected_after_a_purge():
    # given a purged chain and events sealed after the last checkpoint
    aged(20)
    seal()
    checkpoints.make_checkpoint()
    fresh(10)
    seal()
    checkpoints.make_checkpoint()
    purge()
    fresh(5, "tail")
    head = seal()
    assert check_chain().ok
    # when an insider changes an event after the last checkpoint
    victim = AuditSeal.objects.get(seq=head - 1)
    bypass_triggers(
        "UPDATE compliance_auditevent SET action = %s WHERE id = %s",
        ["custom.innocent", victim.event_id],
    )
    # then verification, starting at the purge's checkpoint, names it
    check = check_chain()
    assert not check.ok
    assert (check.first_broken_seq, check.first_broken_id) == (head - 1, victim.event_id)
    assert "does not match its hash" in check.reason


def test_a_signed_seq_rewritten_after_the_purge_point_is_named_by_its_checkpoint(settings):
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    aged(10)
    fresh(10)
    seal()
    checkpoints.make_checkpoint()
    purge()
    # an event between the cut and the checkpoint, changed and its seal recomputed
    victim = AuditSeal.objects.get(seq=15)
    bypass_triggers(
        "UPDATE compliance_auditevent SET action = %s WHERE id = %s",
        ["custom.innocent", victim.event_id],
    )
    row = AuditEvent.objects.get(pk=victim.event_id)
    fields = {name: getattr(row, name) for name in chain._EVENT_FIELDS}
    fields.update(seq=15, prev_hash=victim.prev_hash)
    bypass_triggers(
        "UPDATE compliance_auditseal SET hash = %s WHERE event_id = %s",
        [chain.event_hash(fields, victim.hash_version), victim.event_id],
    )
    check = check_chain()
    assert not check.ok and check.first_broken_seq == 15
    assert check.checkpoint == 1 and "history was rewritten" in check.reason


@pytest.mark.parametrize(
    "forged",
    [
        "unsigned cut with a purge row",
        "signed cut, no row",
        "row without event",
        "row and event, no signature",
    ],
)
def test_an_insiders_cut_is_reported_whatever_purge_row_they_write(settings, forged):
    # given 30 old events under a checkpoint signing every third seq
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 10
    aged(30)
    seal()
    checkpoint = checkpoints.make_checkpoint()
    last = 16 if forged == "unsigned cut with a purge row" else 15
    cut_hash = AuditSeal.objects.get(seq=last).hash
    # when an insider deletes seq 1..last with the triggers off
    remove_seqs(1, last)
    if forged != "signed cut, no row":
        # and writes the purge row a real purge would have written
        AuditPurge.objects.create(
            first_seq=1,
            last_seq=last,
            events=last,
            checkpoint_number=checkpoint.number,
            anchor_hash=cut_hash,
            newest_purged_at=timezone.now() - timedelta(days=DAYS * 2),
            purged_at=timezone.now(),
        )
    if forged == "row and event, no signature":
        # and the purge's own event too (inserts are allowed): all but Bridge's signature
        forged_row = AuditPurge.objects.get(last_seq=last)
        forged_row.key_id = audit_signing_key().key_id
        forged_row.signature = base64.b64encode(b"\x00" * 64).decode("ascii")
        forged_row.save()
        audit.record_event(
            action=AuditAction.AUDIT_PURGED,
            context=SYSTEM,
            object_type="compliance.auditpurge",
            object_id=forged_row.pk,
            details={"first_seq": 1, "last_seq": last},
        )
    # then verification reports the cut
    check = check_chain()
    assert not check.ok
    expected = {
        "unsigned cut with a purge row": f"events 1..{last} were removed and no signed "
        "checkpoint covers them",
        "signed cut, no row": f"events 1..{last} were removed without a recorded purge",
        "row without event": "is not in the audit trail",
        "row and event, no signature": "is not signed by a key Bridge trusts",
    }[forged]
    assert expected in check.reason, check.reason
    assert check.first_broken_seq == 1
    # and no purge runs on a chain cut below
    with pytest.raises(retention.PurgeRefused, match="is cut"):
        purge()


def test_a_real_purge_is_signed_and_a_changed_purge_row_is_reported(settings):
    # given a real purge
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 10
    aged(30)
    seal()
    checkpoints.make_checkpoint()
    purge()
    row = AuditPurge.objects.get()
    assert row.key_id == audit_signing_key().key_id and row.signature
    assert check_chain().ok
    # when an insider edits what the row says (the count of events it removed)
    bypass_triggers("UPDATE compliance_auditpurge SET events = events + 1 WHERE id = %s", [row.pk])
    # then its signature no longer covers it
    check = check_chain()
    assert not check.ok and "is not signed by a key Bridge trusts" in check.reason


def test_a_legal_hold_blocks_the_purge_until_released(settings):
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    aged(20)
    seal()
    checkpoints.make_checkpoint()
    # a hold on the whole audit trail keeps everything
    hold = retention.place_hold(
        name="Litigation 42",
        reason="court order",
        categories=[RetentionCategory.AUDIT_EVENTS],
        context=SYSTEM,
    )
    result = purge()
    assert result["status"] == "held" and [h["id"] for h in result["holds"]] == [hold.pk]
    assert AuditSeal.objects.filter(seq__lte=20).count() == 20
    plan = retention.retention_plan()
    assert plan["audit_purge"]["status"] == "held"
    assert plan["categories"]["audit_events"]["holds"][0]["id"] == hold.pk
    # holds on another subject, another time, or only on request records keep none of these
    retention.release_hold(hold=hold, context=SYSTEM)
    retention.place_hold(
        name="someone else",
        reason="x",
        categories=["audit_events"],
        subject_id="nobody",
        context=SYSTEM,
    )
    retention.place_hold(
        name="last year",
        reason="x",
        categories=["audit_events"],
        covers_to=timezone.now() - timedelta(days=365),
        context=SYSTEM,
    )
    retention.place_hold(name="requests", reason="x", categories=["api_requests"], context=SYSTEM)
    # a hold from the 11th event's time on keeps it and what follows
    tenth = AuditSeal.objects.select_related("event").get(seq=11).event.occurred_at
    retention.place_hold(
        name="from then",
        reason="x",
        categories=["audit_events"],
        covers_from=tenth,
        context=SYSTEM,
    )
    result = purge()
    assert (result["status"], result["last_seq"]) == ("purged", 10), result
    assert "legal hold" in result["reason"]
    assert retention.kept_floor() == 11 and check_chain().ok
    assert AuditEvent.objects.filter(action=AuditAction.LEGAL_HOLD_PLACED).count() == 5
    assert AuditEvent.objects.filter(action=AuditAction.LEGAL_HOLD_RELEASED).count() == 1


def test_a_hold_on_a_subject_keeps_the_events_they_acted_in(settings):
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    aged(4)
    aged(1, prefix="mallory", context=AuditContext(actor_id=7, actor_username="mallory"))
    aged(5, prefix="later")
    seal()
    checkpoints.make_checkpoint()
    retention.place_hold(
        name="mallory",
        reason="x",
        categories=["audit_events"],
        subject_id="mallory",
        context=SYSTEM,
    )
    result = purge()
    assert (result["status"], result["last_seq"]) == ("purged", 4), result


def test_shorter_api_request_retention_is_honoured_as_not_before(settings):
    # request records may go after 10 days, other events after 100
    settings.RETENTION_DAYS = {**settings.RETENTION_DAYS, "api_requests": 10, "audit_events": 100}
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    aged(3, days=50, action=AuditAction.API_REQUEST)  # due (50 > 10)
    aged(1, days=50, prefix="keep")  # not due (50 < 100)
    aged(3, days=50, action=AuditAction.API_REQUEST)  # due, but after an event that is not
    seal()
    checkpoints.make_checkpoint()
    plan = retention.retention_plan()
    requests = plan["categories"]["api_requests"]
    assert (requests["due"], requests["would_delete"], requests["kept"]) == (6, 3, 3)
    result = purge()
    assert (result["last_seq"], result["events"], result["api_requests"]) == (3, 3, 3)
    # the three after the kept event stay until the whole range around them is due
    assert AuditEvent.objects.filter(action=AuditAction.API_REQUEST).count() == 3


def test_nothing_is_purged_while_every_event_is_within_retention():
    fresh(5)
    seal()
    checkpoints.make_checkpoint()
    assert purge()["status"] == "nothing_due"
    assert AuditSeal.objects.count() == 5


def test_an_export_after_a_purge_verifies_offline(settings, tmp_path):
    # given a purge cut at a waypoint of a checkpoint whose own seq lies later
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    aged(15)
    fresh(10)
    seal()
    checkpoints.make_checkpoint()
    assert purge()["last_seq"] == 15
    seal()
    checkpoints.make_checkpoint()
    # when the whole trail is exported
    out = tmp_path / "audit.jsonl"
    summary = export_audit(out=out, start=None, end=None, context=SYSTEM)
    assert (summary.first_seq, summary.events) == (16, 11)
    # then the offline verifier (no Django) accepts it from the signed hash at seq 15
    code, output = run_offline([str(out), "--public-key", str(public_key_file(tmp_path))])
    assert code == 0 and "11 events (seq 16..26)" in output, output
    # and an export of a later range still starts at a checkpoint
    later = export_audit(
        out=tmp_path / "later.jsonl",
        start=timezone.now() - timedelta(minutes=5),
        end=None,
        context=SYSTEM,
    )
    assert later.first_seq >= 16
    verdict = verify_export(tmp_path / "later.jsonl", [keys.audit_signing_key().public])
    assert verdict.ok, verdict.reason


def test_an_export_of_a_chain_an_insider_cut_does_not_verify(settings, tmp_path):
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 10
    aged(30)
    seal()
    checkpoints.make_checkpoint()
    remove_seqs(1, 16)  # 16 is no waypoint
    out = tmp_path / "audit.jsonl"
    export_audit(out=out, start=None, end=None, context=SYSTEM)
    verdict = verify_export(out, [keys.audit_signing_key().public])
    assert not verdict.ok and "no signed checkpoint anchors the start" in verdict.reason


# --- The guard (PostgreSQL) ----------------------------------------------------------------


def test_only_a_purge_range_passes_the_append_only_guard(postgres):
    fresh(8)
    seal()
    first, sixth = (AuditSeal.objects.get(seq=n).event_id for n in (1, 6))
    with connection.cursor() as cursor:
        # a plain DELETE, UPDATE or TRUNCATE is refused
        for sql, params in (
            ("DELETE FROM compliance_auditevent WHERE id = %s", [first]),
            ("DELETE FROM compliance_auditseal WHERE seq = 1", None),
            ("UPDATE compliance_auditevent SET action = 'x' WHERE id = %s", [first]),
            ("TRUNCATE compliance_auditseal", None),
        ):
            with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
                cursor.execute(sql, params)
        # inside a transaction naming seq 1..5, those go, seq 6 and any UPDATE do not
        with pytest.raises(RuntimeError, match="rolled back"), transaction.atomic():
            retention._allow_purge(1, 5)
            cursor.execute("DELETE FROM compliance_auditevent WHERE id = %s", [first])
            assert cursor.rowcount == 1
            cursor.execute("DELETE FROM compliance_auditseal WHERE seq = 1")
            assert cursor.rowcount == 1
            for sql, params in (
                ("DELETE FROM compliance_auditevent WHERE id = %s", [sixth]),
                ("DELETE FROM compliance_auditseal WHERE seq = 6", None),
                ("UPDATE compliance_auditseal SET hash = 'x' WHERE seq = 2", None),
            ):
                with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
                    cursor.execute(sql, params)
            raise RuntimeError("rolled back")
        # and the setting ends with its transaction
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            cursor.execute("DELETE FROM compliance_auditevent WHERE id = %s", [first])
    assert AuditSeal.objects.count() == 8


def test_the_guard_is_installed_on_migrate_and_again_when_missing(postgres):
    from django.core.management.sql import emit_post_migrate_signal

    plain = importlib.import_module("compliance.migrations.0002_append_only").GUARD

    def installed() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT prosrc FROM pg_proc WHERE proname = 'compliance_append_only'")
            return retention.PURGE_SETTING in cursor.fetchone()[0]

    assert installed()  # by the test database's migrate
    # migrate installs it over migration 0002's function
    with connection.cursor() as cursor:
        cursor.execute(plain)
    assert not installed()
    emit_post_migrate_signal(verbosity=0, interactive=False, db="default")
    assert installed()
    # and a purge installs it when a restored dump brought the old function back
    with connection.cursor() as cursor:
        cursor.execute(plain)
    aged(5)
    seal()
    checkpoints.make_checkpoint()
    assert purge()["status"] == "purged" and installed()


# --- DSR records and reports ---------------------------------------------------------------


def _dsr(subject: str, status: str, *, closed_days: int, export: Path | None = None):
    closed = timezone.now() - timedelta(days=closed_days)
    return DataSubjectRequest.objects.create(
        subject_id=subject,
        type=DsrType.ACCESS,
        status=status,
        received_at=closed - timedelta(days=10),
        due_date=(closed + timedelta(days=20)).date(),
        completed_at=closed if status == DsrStatus.COMPLETED else None,
        history=[{"status": status, "at": closed.isoformat()}],
        export_path=str(export) if export else "",
    )


def _report(*, days: int, path: Path | None = None) -> ComplianceReport:
    created = timezone.now() - timedelta(days=days)
    return ComplianceReport.objects.create(
        type=ReportType.AUDIT_TRAIL,
        format=ReportFormat.CSV,
        status=ReportStatus.SUCCEEDED,
        period_from=created - timedelta(days=7),
        period_to=created,
        created_at=created,
        finished_at=created,
        file_path=str(path) if path else "",
    )


def test_closed_dsrs_and_reports_past_retention_are_removed_unless_held(settings, tmp_path):
    settings.DSR_EXPORT_DIR = tmp_path / "dsr"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.DSR_EXPORT_DIR.mkdir()
    settings.REPORT_DIR.mkdir()
    export = settings.DSR_EXPORT_DIR / "old.zip"
    export.write_bytes(b"zip")
    outside = tmp_path / "not-ours.zip"
    outside.write_bytes(b"keep me")
    # DSRs: closed long ago (two go), closed recently, open, and one held by its subject
    gone = _dsr("alice", DsrStatus.COMPLETED, closed_days=90, export=export)
    rejected = _dsr("bob", DsrStatus.REJECTED, closed_days=90, export=outside)
    recent = _dsr("carol", DsrStatus.COMPLETED, closed_days=5)
    still_open = _dsr("dave", DsrStatus.IN_PROGRESS, closed_days=90)
    held = _dsr("erin", DsrStatus.COMPLETED, closed_days=90)
    retention.place_hold(
        name="erin's claim",
        reason="x",
        categories=["dsr_records"],
        subject_id="erin",
        context=SYSTEM,
    )
    # reports: an old one with its manifest and signature, a recent one, an old one held by time
    old_report = _report(days=90)
    old_file, manifest, signature = report_files(old_report)
    old_report.file_path = str(old_file)
    old_report.save(update_fields=["file_path"])
    for path in (old_file, manifest, signature):
        path.write_text("x")
    new_report = _report(days=5)
    held_report = _report(days=200)
    retention.place_hold(
        name="2020 audit",
        reason="x",
        categories=["reports"],
        covers_from=timezone.now() - timedelta(days=220),
        covers_to=timezone.now() - timedelta(days=190),
        context=SYSTEM,
    )
    # the plan says what would go and what is held
    plan = retention.retention_plan()["categories"]
    assert (plan["dsr_records"]["would_delete"], plan["dsr_records"]["held"]) == (2, 1)
    assert (plan["reports"]["would_delete"], plan["reports"]["held"]) == (1, 1)
    # when retention runs
    result = retention.apply_retention(dry_run=False, context=SYSTEM)
    # then exactly the due, unheld ones went, with their files (and only files of their own)
    remaining = set(DataSubjectRequest.objects.values_list("pk", flat=True))
    assert remaining == {recent.pk, still_open.pk, held.pk}
    assert gone.pk not in remaining and rejected.pk not in remaining
    assert not export.exists() and outside.exists()
    reports = set(ComplianceReport.objects.values_list("pk", flat=True))
    assert reports == {new_report.pk, held_report.pk} and old_report.pk not in reports
    assert not old_file.exists() and not manifest.exists() and not signature.exists()
    assert result["categories"]["dsr_records"]["deleted"] == 2
    assert result["categories"]["reports"]["files_deleted"] == 3
    run = AuditEvent.objects.get(action=AuditAction.RETENTION_RUN)
    assert run.details_data["counts"]["dsr_records"]["deleted"] == 2


# --- Holds, the API and the daily job ------------------------------------------------------


def test_holds_are_validated_and_released_once():
    with pytest.raises(retention.RetentionError) as bad:
        retention.place_hold(name="x", reason="y", categories=["backups"], context=SYSTEM)
    assert bad.value.field == "categories"
    with pytest.raises(retention.RetentionError) as bad:
        retention.place_hold(
            name="x",
            reason="y",
            categories=["reports"],
            covers_from=timezone.now(),
            covers_to=timezone.now() - timedelta(days=1),
            context=SYSTEM,
        )
    assert bad.value.field == "covers_to"
    hold = retention.place_hold(name="x", reason="y", categories=["reports"], context=SYSTEM)
    retention.release_hold(hold=hold, context=SYSTEM)
    with pytest.raises(retention.RetentionError) as twice:
        retention.release_hold(hold=hold, context=SYSTEM)
    assert twice.value.code == "hold_released"


def test_the_retention_api(compliance_api, outsider_api, django_capture_on_commit_callbacks):
    holds = f"{RETENTION}/legal-holds"
    # outsiders see nothing and change nothing
    for method, path in (
        ("get", holds),
        ("post", holds),
        ("get", f"{RETENTION}/plan"),
        ("post", f"{RETENTION}/run"),
        ("get", f"{RETENTION}/purges"),
    ):
        assert getattr(outsider_api, method)(path, {}, format="json").status_code == 403
    # a hold is placed, listed, shown and released once
    body = {
        "name": "Case 7",
        "reason": "preserve for litigation",
        "categories": ["audit_events", "reports"],
        "subject_id": "alice",
        "covers_from": "2020-01-01T00:00:00Z",
    }
    created = compliance_api.post(holds, body, format="json")
    assert created.status_code == 201, created.content
    hold = created.json()
    assert hold["active"] is True and hold["created_by"] == "carla"
    assert hold["categories"] == ["audit_events", "reports"]
    for wrong in (
        {**body, "categories": ["backups"]},
        {**body, "categry": []},
        {**body, "name": 5},
    ):
        assert compliance_api.post(holds, wrong, format="json").status_code == 400
    listed = compliance_api.get(holds, {"active": "true"}).json()
    assert [item["id"] for item in listed["results"]] == [hold["id"]]
    assert compliance_api.get(hold["url"]).json()["name"] == "Case 7"
    assert compliance_api.get(f"{holds}/999999").status_code == 404
    released = compliance_api.post(f"{holds}/{hold['id']}/release")
    assert released.status_code == 200 and released.json()["active"] is False
    assert released.json()["released_by"] == "carla"
    assert compliance_api.post(f"{holds}/{hold['id']}/release").status_code == 409
    # the plan shows every category
    plan = compliance_api.get(f"{RETENTION}/plan")
    assert plan.status_code == 200
    assert set(plan.json()["categories"]) == set(RetentionCategory.values)
    # a run needs dry_run said explicitly; it is a job
    assert compliance_api.post(f"{RETENTION}/run", {}, format="json").status_code == 400
    assert (
        compliance_api.post(f"{RETENTION}/run", {"dry_run": "yes"}, format="json").status_code
        == 400
    )
    with django_capture_on_commit_callbacks(execute=True):
        started = compliance_api.post(f"{RETENTION}/run", {"dry_run": True}, format="json")
    assert started.status_code == 202, started.content
    job = compliance_api.get(started["Location"]).json()
    assert job["kind"] == RETENTION_JOB_KIND and job["status"] == "succeeded", job
    assert job["result"]["dry_run"] is True
    purges = compliance_api.get(f"{RETENTION}/purges")
    assert purges.status_code == 200 and purges.json()["results"] == []


def test_a_run_while_another_is_pending_is_refused(compliance_api):
    retention.start_retention(dry_run=True, context=SYSTEM, enqueue=False)
    again = compliance_api.post(f"{RETENTION}/run", {"dry_run": False}, format="json")
    assert again.status_code == 409 and again.json()["code"] == "retention_running"


def test_the_daily_task_starts_a_run_dry_when_configured(
    settings, django_capture_on_commit_callbacks
):
    from compliance.tasks import retention_task

    settings.RETENTION_DRY_RUN = True
    aged(5)
    seal()
    checkpoints.make_checkpoint()
    with django_capture_on_commit_callbacks(execute=True):
        job_id = retention_task()
    job = Job.objects.get(pk=job_id)
    assert job.status == JobStatus.SUCCEEDED and job.params["dry_run"] is True
    assert job.result["audit_purge"]["status"] == "would_purge"
    assert AuditSeal.objects.filter(seq__lte=5).count() == 5
    # and a real run records which job purged
    settings.RETENTION_DRY_RUN = False
    with django_capture_on_commit_callbacks(execute=True):
        job_id = retention_task()
    assert Job.objects.get(pk=job_id).status == JobStatus.SUCCEEDED
    assert AuditPurge.objects.get().job_id == job_id
    assert not LegalHold.objects.exists() and AuditCheckpoint.objects.exists()
