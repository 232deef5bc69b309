"""Monitoring: each rule opens a violation and resolves it when the condition clears, alerts go
by mail and to a real webhook, one open violation per (rule, key) even under races, and the
status, metrics and self-test endpoints give the figures of the data they look at."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone

from backups.models import Backup
from bridge.choices import JobStatus
from bridge.models import Job
from compliance import chain, consent, monitoring, tasks
from compliance.audit import AuditContext, record_event
from compliance.choices import (
    COMPLIANCE_TEST_JOB_KIND,
    RETENTION_JOB_KIND,
    AuditAction,
    CheckpointStatus,
    ViolationRule,
    ViolationSeverity,
    ViolationStatus,
)
from compliance.models import (
    ApprovalRequest,
    AuditCheckpoint,
    AuditEvent,
    AuditVerification,
    ComplianceReport,
    ComplianceViolation,
    DataSubjectRequest,
    LegalHold,
)
from tests.conftest import bypass_triggers
from tests.recovery.probe_servers import scripted_http_server

pytestmark = pytest.mark.django_db

VIOLATIONS = "/api/compliance/violations"


@pytest.fixture(autouse=True)
def _alert_channels(settings) -> None:
    from recovery import breaker

    settings.COMPLIANCE_ALERT_EMAILS = ["dpo@example.org"]
    settings.COMPLIANCE_ALERT_WEBHOOK = ""
    settings.MAX_RETRIES = 2
    settings.BASE_RETRY_DELAY = 10  # ms
    settings.RETRY_MAX_DELAY = 50
    # The channels' breakers are shared state: a webhook failing in one test must not leave
    # the next one refused.
    for name in (monitoring.ALERT_MAIL_SERVICE, monitoring.ALERT_WEBHOOK_SERVICE):
        breaker.reset(name, context=AuditContext.system())


@pytest.fixture
def evaluate(django_capture_on_commit_callbacks):
    """Evaluate the rules with their alerts sent (on commit, as in production)."""

    def run(now: datetime | None = None) -> dict:
        with django_capture_on_commit_callbacks(execute=True):
            return monitoring.evaluate_rules(now=now)

    return run


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run `fn` and the on-commit work it queued (observers, alerts)."""

    def run(fn, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return fn(*args, **kwargs)

    return run


def open_keys(rule: str) -> set[str]:
    return set(
        ComplianceViolation.objects.filter(rule=rule, status=ViolationStatus.OPEN).values_list(
            "key", flat=True
        )
    )


def mails_about(words: str) -> list:
    return [message for message in mail.outbox if words in message.subject]


# --- Violations and alerts ------------------------------------------------------------------


def test_a_violation_opens_once_per_rule_and_key_and_resolving_closes_it(committed):
    # when the same finding is raised twice
    first = committed(
        monitoring.raise_violation,
        rule=ViolationRule.EXPORT_VOLUME,
        key="user:1",
        severity=ViolationSeverity.WARNING,
        summary="too many exports",
        details={"exports": 5},
    )
    again = committed(
        monitoring.raise_violation,
        rule=ViolationRule.EXPORT_VOLUME,
        key="user:1",
        severity=ViolationSeverity.WARNING,
        summary="too many exports",
        details={"exports": 7},
    )
    # then one row, refreshed, one alert, one audit event
    assert again.pk == first.pk
    assert again.last_seen_at > first.last_seen_at and again.details == {"exports": 7}
    assert len(mails_about("too many exports")) == 1
    assert AuditEvent.objects.filter(action=AuditAction.VIOLATION_OPENED).count() == 1
    # when it is resolved, then it is closed once and audited
    resolved = monitoring.resolve_violation(rule=ViolationRule.EXPORT_VOLUME, key="user:1")
    assert resolved.status == ViolationStatus.RESOLVED and resolved.resolved_at is not None
    assert monitoring.resolve_violation(rule=ViolationRule.EXPORT_VOLUME, key="user:1") is None
    assert AuditEvent.objects.filter(action=AuditAction.VIOLATION_RESOLVED).count() == 1
    # and the same finding later is a new violation
    reopened = committed(
        monitoring.raise_violation,
        rule=ViolationRule.EXPORT_VOLUME,
        key="user:1",
        severity=ViolationSeverity.WARNING,
        summary="too many exports",
    )
    assert reopened.pk != first.pk


def test_an_alert_goes_by_mail_and_to_a_real_webhook(settings, committed):
    with scripted_http_server() as receiver:
        settings.COMPLIANCE_ALERT_WEBHOOK = f"{receiver.url}/hook"
        violation = committed(
            monitoring.raise_violation,
            rule=ViolationRule.BACKUP_STALE,
            key="",
            severity=ViolationSeverity.CRITICAL,
            summary="Newest backup is 30.0 h old",
            details={"age_seconds": 108000},
        )
    [message] = mails_about("Newest backup is 30.0 h old")
    assert message.to == ["dpo@example.org"]
    assert message.subject.startswith("[Bridge] CRITICAL compliance violation")
    [posted] = receiver.received
    assert posted["path"] == "/hook"
    assert posted["headers"]["Content-Type"] == "application/json"
    assert posted["json"]["rule"] == "backup_stale"
    assert posted["json"]["violation_id"] == violation.pk
    assert posted["json"]["details"] == {"age_seconds": 108000}
    violation.refresh_from_db()
    assert violation.alerted_at is not None and violation.alert_error == ""


def test_an_undelivered_alert_is_recorded_and_sent_again_by_the_next_evaluation(
    settings, committed, evaluate
):
    settings.COMPLIANCE_ALERT_EMAILS = []
    # (the condition holds, so the evaluation below keeps the violation open)
    Job.objects.create(kind=RETENTION_JOB_KIND, status=JobStatus.FAILED, finished_at=timezone.now())
    with scripted_http_server() as receiver:
        receiver.status = 502
        settings.COMPLIANCE_ALERT_WEBHOOK = receiver.url
        violation = committed(
            monitoring.raise_violation,
            rule=ViolationRule.RETENTION_FAILED,
            key="",
            severity=ViolationSeverity.WARNING,
            summary="Retention job 1 failed",
        )
        violation.refresh_from_db()
        assert violation.alerted_at is None
        assert violation.alert_error == "webhook: WebhookFailed: HTTP 502"
        assert len(receiver.received) == 3  # the first attempt and MAX_RETRIES more
        # when the receiver is back
        receiver.status = 200
        result = evaluate()
    violation.refresh_from_db()
    assert result["alerts_retried"] >= 1
    assert violation.alerted_at is not None and violation.alert_error == ""


def test_without_a_channel_the_violation_says_nobody_was_alerted(settings, committed):
    settings.COMPLIANCE_ALERT_EMAILS = []
    violation = committed(
        monitoring.raise_violation,
        rule=ViolationRule.SOD_CONFLICT,
        key="x",
        severity=ViolationSeverity.CRITICAL,
        summary="s",
    )
    violation.refresh_from_db()
    assert violation.alerted_at is None
    assert violation.alert_error == monitoring.NO_CHANNEL


def test_concurrent_raises_open_a_single_violation(postgres, transactional_db):
    # given eight workers finding the same thing at the same moment
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            monitoring.raise_violation(
                rule=ViolationRule.AUDIT_CHAIN_BROKEN,
                key="",
                severity=ViolationSeverity.CRITICAL,
                summary="raced",
            )
        except BaseException as exc:  # reported below, whatever it is
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # then one row, one audit event, one alert
    assert errors == []
    assert ComplianceViolation.objects.filter(rule=ViolationRule.AUDIT_CHAIN_BROKEN).count() == 1
    assert AuditEvent.objects.filter(action=AuditAction.VIOLATION_OPENED).count() == 1
    assert len(mails_about("raced")) == 1


# --- The rules ------------------------------------------------------------------------------


def make_request(*, due_in_days: int, status: str = "in_progress", **fields) -> DataSubjectRequest:
    now = timezone.now()
    return DataSubjectRequest.objects.create(
        subject_id="subject-1",
        type="access",
        status=status,
        received_at=now - timedelta(days=20),
        due_date=now.astimezone(UTC).date() + timedelta(days=due_in_days),
        **fields,
    )


def test_a_request_nearing_its_deadline_then_overdue_then_answered(evaluate, settings):
    settings.DSR_REMINDER_DAYS = 7
    # given a request due in 3 days, one due later, and one waiting for identity proof
    soon = make_request(due_in_days=3)
    make_request(due_in_days=20)
    make_request(due_in_days=-5, status="verifying")
    # when
    evaluate()
    # then a warning (the reminder) and nothing else
    assert open_keys(ViolationRule.DSR_DUE_SOON) == {str(soon.pk)}
    assert open_keys(ViolationRule.DSR_OVERDUE) == set()
    soon.refresh_from_db()
    reminded = soon.reminded_at
    assert reminded is not None
    assert len(mails_about("is due in 3 day(s)")) == 1
    # when the due date has passed
    evaluate(now=timezone.now() + timedelta(days=4))
    # then it is overdue, critical, and no longer "due soon"; the reminder is not set again
    assert open_keys(ViolationRule.DSR_OVERDUE) == {str(soon.pk)}
    assert open_keys(ViolationRule.DSR_DUE_SOON) == set()
    overdue = ComplianceViolation.objects.get(rule=ViolationRule.DSR_OVERDUE)
    assert overdue.severity == ViolationSeverity.CRITICAL
    soon.refresh_from_db()
    assert soon.reminded_at == reminded
    # when it is answered, the condition clears
    DataSubjectRequest.objects.filter(pk=soon.pk).update(
        status="completed", completed_at=timezone.now()
    )
    evaluate(now=timezone.now() + timedelta(days=4))
    assert open_keys(ViolationRule.DSR_OVERDUE) == set()


def test_a_broken_chain_opens_at_once_and_closes_when_a_verification_passes(
    verify, django_capture_on_commit_callbacks
):
    # given a sealed chain with one row rewritten
    for n in range(3):
        record_event(action=f"custom.e{n}", details={"n": n})
    chain.seal_all_pending()
    target = AuditEvent.objects.get(action="custom.e1")
    original = target.details
    bypass_triggers(
        "UPDATE compliance_auditevent SET details = %s WHERE id = %s", ['{"n":99}', target.pk]
    )
    # when a verification runs, then the violation is open on its event, before any beat
    assert verify()["ok"] is False
    violation = ComplianceViolation.objects.get(
        rule=ViolationRule.AUDIT_CHAIN_BROKEN, status=ViolationStatus.OPEN
    )
    assert violation.details["first_broken_id"] == target.pk
    assert violation.severity == ViolationSeverity.CRITICAL
    # and beat agrees
    with django_capture_on_commit_callbacks(execute=True):
        monitoring.evaluate_rules()
    assert open_keys(ViolationRule.AUDIT_CHAIN_BROKEN) == {""}
    # when the row is put back and a verification passes, it is resolved
    bypass_triggers(
        "UPDATE compliance_auditevent SET details = %s WHERE id = %s", [original, target.pk]
    )
    assert verify()["ok"] is True
    assert open_keys(ViolationRule.AUDIT_CHAIN_BROKEN) == set()


def test_beat_reads_the_latest_finished_verification(evaluate):
    now = timezone.now()
    AuditVerification.objects.create(
        status=JobStatus.SUCCEEDED,
        finished_at=now - timedelta(minutes=5),
        result={"ok": False, "reason": "hash mismatch", "first_broken_id": 7},
    )
    evaluate()
    assert open_keys(ViolationRule.AUDIT_CHAIN_BROKEN) == {""}
    # a run that could not finish proves nothing: the violation stays
    AuditVerification.objects.create(
        status=JobStatus.FAILED, finished_at=now - timedelta(minutes=2), error="worker lost"
    )
    evaluate()
    assert open_keys(ViolationRule.AUDIT_CHAIN_BROKEN) == {""}
    AuditVerification.objects.create(
        status=JobStatus.SUCCEEDED, finished_at=now, result={"ok": True, "checked": 10}
    )
    evaluate()
    assert open_keys(ViolationRule.AUDIT_CHAIN_BROKEN) == set()


def test_a_backup_older_than_the_rpo_is_a_violation_until_a_new_one_succeeds(
    evaluate, settings, committed
):
    settings.BACKUP_RPO = timedelta(hours=24)
    # no backup at all
    evaluate()
    assert ComplianceViolation.objects.get(rule=ViolationRule.BACKUP_STALE).summary == (
        "No successful backup yet"
    )
    # a fresh backup clears it at once (on its event)
    backup = Backup.objects.create(kind="full", status="succeeded", finished_at=timezone.now())
    committed(record_event, action=AuditAction.BACKUP_SUCCEEDED, object_id=str(backup.pk))
    assert open_keys(ViolationRule.BACKUP_STALE) == set()
    # a day and more later it is stale again
    evaluate(now=timezone.now() + timedelta(hours=25))
    stale = ComplianceViolation.objects.get(
        rule=ViolationRule.BACKUP_STALE, status=ViolationStatus.OPEN
    )
    assert stale.details["backup_id"] == str(backup.pk)
    assert stale.details["age_seconds"] >= 25 * 3600 - 5


def test_a_failed_retention_job_is_a_violation_until_a_run_succeeds(evaluate):
    now = timezone.now()
    Job.objects.create(
        kind=RETENTION_JOB_KIND,
        status=JobStatus.FAILED,
        finished_at=now - timedelta(hours=1),
        error="OperationalError: disk full",
    )
    evaluate()
    violation = ComplianceViolation.objects.get(rule=ViolationRule.RETENTION_FAILED)
    assert "disk full" in violation.summary and violation.severity == ViolationSeverity.WARNING
    Job.objects.create(kind=RETENTION_JOB_KIND, status=JobStatus.SUCCEEDED, finished_at=now)
    evaluate()
    assert open_keys(ViolationRule.RETENTION_FAILED) == set()


def test_unusual_export_volume_opens_on_the_export_and_clears_after_the_window(
    settings, operator, committed, evaluate
):
    settings.COMPLIANCE_EXPORT_VOLUME = "3/1h"
    context = AuditContext(actor_id=operator.pk, actor_username=operator.username)
    actions = [
        AuditAction.AUDIT_EXPORTED,
        AuditAction.REPORT_DOWNLOADED,
        AuditAction.DSR_EXPORT_DOWNLOADED,
    ]
    # three exports are within the limit
    for action in actions:
        committed(record_event, action=action, context=context)
    assert open_keys(ViolationRule.EXPORT_VOLUME) == set()
    # the fourth is over it: open at once, on the event
    committed(record_event, action=AuditAction.AUDIT_EXPORTED, context=context)
    violation = ComplianceViolation.objects.get(rule=ViolationRule.EXPORT_VOLUME)
    assert violation.key == f"user:{operator.pk}"
    assert violation.details["exports"] == 4 and violation.details["limit"] == 3
    assert violation.details["by_action"][AuditAction.AUDIT_EXPORTED] == 2
    assert "olivia exported 4 times in 1h" in violation.summary
    # an hour later the window holds none
    evaluate(now=timezone.now() + timedelta(hours=2))
    assert open_keys(ViolationRule.EXPORT_VOLUME) == set()


def test_segregation_of_duties_conflicts_are_violations(operator, evaluate, committed):
    # given an approval decided by its own requester and a live restore without approval
    now = timezone.now()
    approval = ApprovalRequest.objects.create(
        action="backup.live_restore",
        reason="restore last night's backup",
        status="approved",
        requested_by=operator,
        requested_by_username=operator.username,
        requested_at=now,
        expires_at=now + timedelta(days=1),
        decided_by=operator,
        decided_by_username=operator.username,
        decided_at=now,
    )
    # when the live restore is recorded, then both are open at once, on its event
    restore = committed(
        record_event,
        action=AuditAction.BACKUP_RESTORE_REQUESTED,
        context=AuditContext(actor_id=operator.pk, actor_username=operator.username),
        details={"kind": "restore", "dry_run": False, "second_approval_required": True},
    )
    assert open_keys(ViolationRule.SOD_CONFLICT) == {f"approval:{approval.pk}", f"event:{restore}"}
    # and beat agrees
    evaluate()
    assert open_keys(ViolationRule.SOD_CONFLICT) == {f"approval:{approval.pk}", f"event:{restore}"}
    assert set(
        ComplianceViolation.objects.filter(rule=ViolationRule.SOD_CONFLICT).values_list(
            "severity", flat=True
        )
    ) == {ViolationSeverity.CRITICAL}
    # once out of the review period they are resolved
    evaluate(now=now + monitoring.SOD_LOOKBACK + timedelta(days=1))
    assert open_keys(ViolationRule.SOD_CONFLICT) == set()


def test_processing_without_consent_is_a_violation_on_the_event(
    compliance_api, django_capture_on_commit_callbacks, evaluate
):
    # given a notice, and consent to marketing from one customer only
    system = AuditContext.system()
    consent.publish_notice(version="v1", text="notice", context=system)
    consent.record_consent(
        subject_id="cust-ok",
        purposes={"marketing": True},
        notice_version="v1",
        method="api",
        context=system,
    )

    def processing(subject_id: str, purpose: str = "marketing"):
        with django_capture_on_commit_callbacks(execute=True):
            response = compliance_api.post(
                "/api/compliance/audit/log",
                {"action": "processing", "details": {"subject_id": subject_id, "purpose": purpose}},
                format="json",
            )
        assert response.status_code == 201, response.content
        return response.json()["id"]

    # when an integration declares processing for both
    processing("cust-ok")
    event_id = processing("cust-no")
    # then only the one without consent is a violation, keyed without the subject id
    violation = ComplianceViolation.objects.get(rule=ViolationRule.NO_CONSENT)
    assert violation.key == monitoring.subject_key("marketing", "cust-no")
    assert "cust-no" not in violation.key and "cust-no" not in violation.summary
    assert violation.details["event_ids"] == [event_id]
    assert violation.severity == ViolationSeverity.CRITICAL
    # a purpose consent cannot be given for is processing without consent too
    processing("cust-ok", purpose="telepathy")
    assert len(open_keys(ViolationRule.NO_CONSENT)) == 2
    # a day without such processing clears it
    evaluate(now=timezone.now() + monitoring.NO_CONSENT_QUIET + timedelta(hours=1))
    assert open_keys(ViolationRule.NO_CONSENT) == set()


def test_beat_finds_processing_without_consent_an_observer_missed(evaluate):
    consent.publish_notice(version="v1", text="notice", context=AuditContext.system())
    # an event whose observer never ran (its process died after the commit)
    record_event(
        action=monitoring.PROCESSING_ACTION,
        details={"subject_id": "cust-late", "purpose": "analytics"},
    )
    assert open_keys(ViolationRule.NO_CONSENT) == set()
    result = evaluate()
    assert open_keys(ViolationRule.NO_CONSENT) == {monitoring.subject_key("analytics", "cust-late")}
    assert result["rules"][ViolationRule.NO_CONSENT]["found"] == 1


def test_beat_judges_consent_as_it_was_when_the_processing_happened(evaluate):
    system = AuditContext.system()
    consent.publish_notice(version="v1", text="notice", context=system)
    record_event(
        action=monitoring.PROCESSING_ACTION,
        details={"subject_id": "cust-after", "purpose": "analytics"},
        occurred_at=timezone.now() - timedelta(minutes=1),
    )
    # consent given only after the processing does not make it lawful
    consent.record_consent(
        subject_id="cust-after",
        purposes={"analytics": True},
        notice_version="v1",
        method="api",
        context=system,
    )
    evaluate()
    assert open_keys(ViolationRule.NO_CONSENT) == {
        monitoring.subject_key("analytics", "cust-after")
    }


def test_a_rule_that_fails_is_reported_and_the_others_still_run(monkeypatch, evaluate):
    from backups import services

    def broken() -> None:
        raise RuntimeError("catalog unreadable")

    monkeypatch.setattr(services, "newest_backup", broken)
    Job.objects.create(kind=RETENTION_JOB_KIND, status=JobStatus.FAILED, finished_at=timezone.now())
    result = evaluate()
    assert result["rules"][ViolationRule.BACKUP_STALE] == {
        "error": "RuntimeError: catalog unreadable"
    }
    assert result["rules"][ViolationRule.RETENTION_FAILED]["opened"] == 1
    assert set(result["rules"]) == set(ViolationRule.values)


def test_the_beat_task_evaluates_every_rule():
    result = tasks.evaluate_rules_task.delay().get()
    assert set(result["rules"]) == set(ViolationRule.values)
    assert result["open"] == ComplianceViolation.objects.filter(status="open").count()


# --- Status and metrics -----------------------------------------------------------------------


def test_status_counts_what_it_sees(compliance_api):
    # given
    now = timezone.now()
    make_request(due_in_days=-1)  # overdue
    make_request(due_in_days=2)  # due soon
    make_request(due_in_days=20, status="received")
    make_request(due_in_days=-3, status="verifying")  # paused: not overdue
    make_request(due_in_days=-30, status="completed")
    for rule, severity in (
        (ViolationRule.BACKUP_STALE, ViolationSeverity.CRITICAL),
        (ViolationRule.EXPORT_VOLUME, ViolationSeverity.WARNING),
        (ViolationRule.DSR_DUE_SOON, ViolationSeverity.WARNING),
    ):
        ComplianceViolation.objects.create(
            rule=rule, key="k", severity=severity, summary="s", opened_at=now, last_seen_at=now
        )
    failed = Job.objects.create(
        kind=RETENTION_JOB_KIND, status=JobStatus.FAILED, finished_at=now, error="boom"
    )
    for status in ("succeeded", "succeeded", "failed"):
        ComplianceReport.objects.create(
            type="audit_trail",
            format="csv",
            status=status,
            period_from=now - timedelta(days=1),
            period_to=now,
            created_at=now,
        )
    LegalHold.objects.create(name="case 7", reason="litigation", categories=[], created_at=now)
    # when
    response = compliance_api.get("/api/compliance/status")
    # then
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "critical"
    assert body["enabled"] == {"gdpr": True, "sox": True, "audit_logging": True}
    assert body["dsr"]["open"] == 4
    assert (body["dsr"]["overdue"], body["dsr"]["due_soon"]) == (1, 1)
    assert body["dsr"]["by_status"]["verifying"] == 1
    assert body["violations"]["open"] == 3
    assert body["violations"]["by_severity"] == {"warning": 2, "critical": 1}
    assert body["violations"]["by_rule"]["backup_stale"] == 1
    assert body["retention"]["last_run"]["job_id"] == failed.pk
    assert body["retention"]["last_run"]["status"] == "failed"
    assert body["retention"]["active_legal_holds"] == 1
    assert body["reports"] == {"total": 3, "by_status": {"succeeded": 2, "failed": 1}}
    assert body["chain"]["head_seq"] >= 0 and body["chain"]["last_verification"] is None


def test_metrics_are_computed_from_the_records(settings):
    # given three answered requests (two on time, one late) and one extended, still open
    def closed(received: str, due: str, **fields) -> None:
        DataSubjectRequest.objects.create(
            subject_id="s",
            type="access",
            received_at=datetime.fromisoformat(received).replace(tzinfo=UTC),
            due_date=datetime.fromisoformat(due).date(),
            **fields,
        )

    closed(
        "2024-01-01",
        "2024-02-01",
        status="completed",
        completed_at=datetime(2024, 1, 11, tzinfo=UTC),
    )
    closed(
        "2024-03-01",
        "2024-04-01",
        status="completed",
        completed_at=datetime(2024, 4, 5, tzinfo=UTC),
    )
    closed(
        "2024-05-01",
        "2024-06-01",
        status="rejected",
        history=[{"status": "rejected", "at": "2024-05-03T00:00:00+00:00"}],
    )
    closed(
        "2024-07-01",
        "2024-10-01",
        status="extended",
        extension_months=2,
        extended_at=datetime(2024, 7, 10, tzinfo=UTC),
    )
    # consent: two subjects granted marketing, one withdrew
    system = AuditContext.system()
    consent.publish_notice(version="v1", text="notice", context=system)
    for subject, granted in (("a", True), ("b", True), ("c", False)):
        consent.record_consent(
            subject_id=subject,
            purposes={"marketing": granted},
            notice_version="v1",
            method="api",
            context=system,
        )
    # request logging: r1 did something and is logged, r2 did something and is not
    now = timezone.now()
    minutes_ago = now - timedelta(minutes=5)
    for request_id, logged in (("r1", True), ("r2", False)):
        context = AuditContext(request_id=request_id)
        record_event(action=AuditAction.JOB_REQUESTED, context=context, occurred_at=minutes_ago)
        if logged:
            record_event(action=AuditAction.API_REQUEST, context=context, occurred_at=minutes_ago)
    record_event(
        action=AuditAction.API_REQUEST, context=AuditContext(request_id="r3"), occurred_at=now
    )
    # checkpoints: #1 existed when the last passing verification finished, #2 came after
    for number, age in ((1, 600), (2, 60)):
        AuditCheckpoint.objects.create(
            number=number,
            seq=number * 10,
            hash="a" * 64,
            created_at=now - timedelta(seconds=age),
            key_id="k",
            signature="s",
            record="{}",
            status=CheckpointStatus.PUBLISHED,
        )
    AuditVerification.objects.create(
        status=JobStatus.SUCCEEDED, finished_at=now - timedelta(seconds=300), result={"ok": True}
    )
    # when
    metrics = monitoring.compliance_metrics()
    # then
    dsr = metrics["dsr"]
    assert (dsr["total"], dsr["closed"], dsr["closed_on_time"], dsr["closed_late"]) == (4, 3, 2, 1)
    assert dsr["on_time_rate"] == 0.6667
    assert dsr["median_days_to_close"] == 10.0
    assert (dsr["extensions"], dsr["extension_rate"]) == (1, 0.25)
    assert metrics["consent"]["marketing"] == {"granted": 2, "withdrawn": 1, "rate": 0.6667}
    coverage = metrics["request_logging"]
    assert (coverage["requests_with_activity"], coverage["covered"]) == (2, 1)
    assert coverage["coverage"] == 0.5
    assert coverage["api_requests"] == 1  # r3 is in the last minute, not yet counted
    checkpoint = metrics["newest_verified_checkpoint"]
    assert checkpoint["number"] == 1
    assert 599 <= checkpoint["age_seconds"] < 660


def test_metrics_over_the_api(compliance_api):
    response = compliance_api.get("/api/compliance/metrics")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {
        "generated_at",
        "dsr",
        "consent",
        "request_logging",
        "newest_verified_checkpoint",
        "violations",
    }
    assert set(body["consent"]) == set(settings_purposes())


def settings_purposes() -> list[str]:
    return consent.configured_purposes()


# --- The self-test ----------------------------------------------------------------------------


def test_the_self_test_runs_as_a_job_with_a_result_per_check(
    compliance_api, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = compliance_api.post("/api/compliance/test")
    assert response.status_code == 202, response.content
    assert response["Location"].endswith(f"/api/jobs/{response.json()['id']}")
    job = compliance_api.get(response["Location"]).json()
    assert job["kind"] == COMPLIANCE_TEST_JOB_KIND and job["status"] == "succeeded", job
    checks = {check["name"]: check for check in job["result"]["checks"]}
    assert list(checks) == ["chain_verifies", "dsr_end_to_end", "report_verifies"]
    assert checks["chain_verifies"]["passed"] is True
    for check in checks.values():
        assert isinstance(check["passed"], bool) and check["detail"]
    assert job["result"]["passed"] == all(check["passed"] for check in checks.values())
    assert AuditEvent.objects.filter(action=AuditAction.COMPLIANCE_TEST).count() == 1


def test_a_missing_or_failing_check_fails_alone(monkeypatch, committed):
    def missing(context):
        raise ImportError("No module named 'compliance.reports.services'")

    def broken(context):
        raise RuntimeError("disk full")

    def fine(context):
        return True, "fine", {}

    monkeypatch.setattr(monitoring, "_CHECKS", (("one", fine), ("two", missing), ("three", broken)))
    job = committed(monitoring.start_compliance_test, context=AuditContext.system())
    job.refresh_from_db()
    result = job.result
    assert job.status == JobStatus.SUCCEEDED
    assert result["passed"] is False
    assert [(c["name"], c["passed"]) for c in result["checks"]] == [
        ("one", True),
        ("two", False),
        ("three", False),
    ]
    assert result["checks"][1]["detail"].startswith("not available: No module named")
    assert result["checks"][2]["detail"] == "RuntimeError: disk full"


# --- The violations API -----------------------------------------------------------------------


def test_violations_are_listed_filtered_and_shown(compliance_api, outsider_api, anon_api):
    now = timezone.now()
    rows = [
        ComplianceViolation.objects.create(
            rule=rule,
            key="k",
            severity=severity,
            status=status,
            summary=f"{rule} {status}",
            opened_at=now - timedelta(minutes=n),
            last_seen_at=now,
        )
        for n, (rule, severity, status) in enumerate(
            [
                ("backup_stale", "critical", "open"),
                ("export_volume", "warning", "open"),
                ("backup_stale", "critical", "resolved"),
            ]
        )
    ]
    listed = compliance_api.get(VIOLATIONS).json()
    assert [row["id"] for row in listed["results"]] == [row.pk for row in rows]
    open_backup = compliance_api.get(VIOLATIONS, {"rule": "backup_stale", "status": "open"})
    assert [row["id"] for row in open_backup.json()["results"]] == [rows[0].pk]
    warnings = compliance_api.get(VIOLATIONS, {"severity": "warning"}).json()["results"]
    assert [row["rule"] for row in warnings] == ["export_volume"]
    assert compliance_api.get(VIOLATIONS, {"rule": "nonsense"}).status_code == 400
    detail = compliance_api.get(f"{VIOLATIONS}/{rows[1].pk}")
    assert detail.status_code == 200 and detail.json()["summary"] == "export_volume open"
    assert compliance_api.get(f"{VIOLATIONS}/999999").status_code == 404
    assert outsider_api.get(VIOLATIONS).status_code == 403
    assert outsider_api.get("/api/compliance/status").status_code == 403
    assert outsider_api.post("/api/compliance/test").status_code == 403
    assert anon_api.get("/api/compliance/metrics").status_code == 401
