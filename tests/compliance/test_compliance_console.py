"""The compliance officer's console (issue 11): the DSR queue in deadline order with urgency
colours, consent history per subject, notices, SOX diffs, approvals, legal holds, purges,
reports with audited downloads, violations, the GDPR & SOX panel, and who may see what."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from bridge.choices import JobStatus
from bridge.models import Job
from compliance import approvals, consent
from compliance import dsr as dsr_service
from compliance.admin_gdpr import today_utc
from compliance.audit import AuditContext
from compliance.choices import (
    RETENTION_JOB_KIND,
    ApprovalAction,
    ApprovalStatus,
    AuditAction,
    ConsentMethod,
    DsrStatus,
    DsrType,
    ReportFormat,
    ReportStatus,
    ReportType,
    SoxOperation,
    ViolationRule,
    ViolationSeverity,
    ViolationStatus,
)
from compliance.models import (
    ApprovalRequest,
    AuditEvent,
    AuditPurge,
    ComplianceReport,
    ComplianceViolation,
    ConsentEvent,
    DataSubjectRequest,
    LegalHold,
    PrivacyNotice,
    SoxChange,
)
from security.choices import Role
from tests.conftest import PASSWORD, make_user

pytestmark = pytest.mark.django_db

# unfold's label colours (unfold/helpers/label.html): red, amber, green and grey.
COLOURS = {
    "bg-red-100": "red",
    "bg-orange-100": "amber",
    "bg-green-100": "green",
    "bg-base-500/8": "grey",
    "bg-blue-100": "blue",
}
URGENCY = re.compile(r'data-urgency="(\w+)">\s*<span class="[^"]*?(bg-[a-z]+-[0-9/]+)', re.S)


def console_for(user) -> Client:
    user.is_staff = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


def page(client: Client, url: str, **params) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, (url, response.status_code)
    return response.content.decode()


def changelist(name: str) -> str:
    return reverse(f"admin:compliance_{name}_changelist")


def change(obj) -> str:
    return reverse(f"admin:compliance_{obj._meta.model_name}_change", args=[obj.pk])


def flashes(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def dsr(
    subject: str,
    *,
    due_in: int,
    status: str = DsrStatus.IN_PROGRESS,
    type: str = DsrType.ACCESS,
    **fields,
) -> DataSubjectRequest:
    """A request as the service leaves it, with its due date `due_in` days from today."""
    return DataSubjectRequest.objects.create(
        subject_id=subject,
        type=type,
        status=status,
        received_at=timezone.now() - timedelta(days=30 - due_in),
        due_date=today_utc() + timedelta(days=due_in),
        **fields,
    )


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def act(client: Client, name: str, action: str, objects, **fields):
    """Send a changelist action for `objects`; with fields, as the confirmed ask page does."""
    data = {"action": action, "_selected_action": [str(obj.pk) for obj in objects]}
    if fields:
        data.update(confirm="yes", **fields)
    return client.post(changelist(name), data)


SYSTEM = AuditContext.system()


def received(subject: str = "alice", type: str = DsrType.ACCESS) -> DataSubjectRequest:
    return dsr_service.create_request(subject_id=subject, type=type, details={}, context=SYSTEM)


# --- Every page answers the compliance officer ----------------------------------------------


def test_every_new_list_and_detail_page_renders_for_a_compliance_officer(compliance_officer):
    client = console_for(compliance_officer)
    now = timezone.now()
    records = [
        dsr("alice", due_in=5, history=[{"at": now.isoformat(), "status": "received"}]),
        ConsentEvent.objects.create(
            subject_id="alice",
            purpose="marketing",
            granted=True,
            notice_version="v1",
            notice_sha256="0" * 64,
            method=ConsentMethod.CHECKBOX,
            occurred_at=now,
        ),
        PrivacyNotice.objects.create(
            version="v1", text="We keep…", sha256="0" * 64, published_at=now
        ),
        SoxChange.objects.create(
            occurred_at=now,
            table_name="recovery_service",
            operation=SoxOperation.UPDATE,
            before={"name": "db"},
            after={"name": "database"},
            changed_fields=["name"],
        ),
        ApprovalRequest.objects.create(
            action=ApprovalAction.KEY_ROTATION,
            reason="yearly",
            requested_by_username="sam",
            requested_at=now,
            expires_at=now + timedelta(hours=1),
        ),
        LegalHold.objects.create(
            name="Case 42", reason="litigation", categories=["audit_events"], created_at=now
        ),
        AuditPurge.objects.create(
            first_seq=1,
            last_seq=100,
            events=100,
            checkpoint_number=3,
            anchor_hash="a" * 64,
            newest_purged_at=now,
            purged_at=now,
        ),
        ComplianceReport.objects.create(
            type=ReportType.AUDIT_TRAIL,
            format=ReportFormat.CSV,
            status=ReportStatus.PENDING,
            period_from=now,
            period_to=now,
            created_at=now,
        ),
        ComplianceViolation.objects.create(
            rule=ViolationRule.DSR_OVERDUE,
            key="x",
            severity=ViolationSeverity.CRITICAL,
            summary="overdue",
            opened_at=now,
            last_seen_at=now,
        ),
    ]
    for record in records:
        name = record._meta.model_name
        listing = page(client, changelist(name))
        assert change(record) in listing, name
        detail = page(client, change(record))
        # read-only: nothing to save, and no change history for records changed only by services
        assert 'name="_save"' not in detail, name
        assert reverse(f"admin:compliance_{name}_history", args=[record.pk]) not in detail, name


def test_the_sidebar_lists_the_new_pages_under_compliance(compliance_officer, operator):
    dashboard = page(console_for(compliance_officer), "/admin/")
    for name in (
        "datasubjectrequest",
        "consentevent",
        "privacynotice",
        "complianceviolation",
        "compliancereport",
        "soxchange",
        "approvalrequest",
        "legalhold",
        "auditpurge",
        "auditcheckpoint",
    ):
        assert changelist(name) in dashboard, name
    # an operator decides approvals, and sees nothing else of compliance
    operators = page(console_for(operator), "/admin/")
    assert changelist("approvalrequest") in operators
    assert changelist("datasubjectrequest") not in operators
    assert changelist("consentevent") not in operators


def test_the_new_pages_carry_no_inline_script(compliance_officer):
    # The Content-Security-Policy allows scripts from Bridge's own URLs only.
    item = dsr("alice", due_in=3, history=[{"at": "2026-01-05T10:00:00+00:00", "status": "x"}])
    client = console_for(compliance_officer)
    inline = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>")
    pages = {
        url: page(client, url)
        for url in (
            "/admin/",
            changelist("datasubjectrequest"),
            change(item),
            reverse("admin:compliance_datasubjectrequest_add"),
            changelist("consentevent") + "?subject_id=alice",
            changelist("complianceviolation"),
        )
    }
    pages["ask"] = act(client, "datasubjectrequest", "extend_deadline", [item]).content.decode()
    for url, html in pages.items():
        assert not inline.search(html), url


# --- Who may see what ---------------------------------------------------------------------------


def test_outsiders_are_turned_away_and_operators_see_only_approvals(outsider, operator):
    anonymous = Client()
    url = changelist("datasubjectrequest")
    assert anonymous.get(url).status_code == 302  # to the login page
    assert "/admin/login/" in anonymous.get(url)["Location"]
    staff_without_role = console_for(outsider)
    for name in ("datasubjectrequest", "consentevent", "compliancereport", "approvalrequest"):
        assert staff_without_role.get(changelist(name)).status_code == 403, name
    operators = console_for(operator)
    assert operators.get(changelist("approvalrequest")).status_code == 200
    assert operators.get(changelist("datasubjectrequest")).status_code == 403
    assert operators.get(reverse("admin:compliance_datasubjectrequest_add")).status_code == 403


# --- The DSR queue ------------------------------------------------------------------------------


def test_the_queue_puts_open_requests_first_by_due_date_coloured_by_urgency(
    compliance_officer, settings
):
    settings.DSR_REMINDER_DAYS = 7
    on_track = dsr("olga", due_in=20)
    answered = dsr("carl", due_in=-40, status=DsrStatus.COMPLETED)
    overdue = dsr("otto", due_in=-2)
    soon = dsr("sara", due_in=3, status=DsrStatus.VERIFYING)
    edge = dsr("eddy", due_in=7, type=DsrType.ERASURE)  # exactly DSR_REMINDER_DAYS: amber
    rejected = dsr("rita", due_in=-1, status=DsrStatus.REJECTED)
    client = console_for(compliance_officer)

    response = client.get(changelist("datasubjectrequest"))
    listed = [item.pk for item in response.context["cl"].result_list]
    assert listed == [overdue.pk, soon.pk, edge.pk, on_track.pk, answered.pk, rejected.pk]
    html = response.content.decode()
    shown = [(urgency, COLOURS[css]) for urgency, css in URGENCY.findall(html)]
    assert shown == [
        ("overdue", "red"),
        ("due_soon", "amber"),
        ("due_soon", "amber"),
        ("on_track", "green"),
        ("closed", "grey"),
        ("closed", "grey"),
    ]
    assert "2 d overdue" in html and "3 d left (paused)" in html and "20 d left" in html
    headers = [str(header["text"]).lower() for header in response.context["result_headers"]]
    assert headers[1:] == [
        "subject",
        "type",
        "status",
        "received",
        "due",
        "days left",
        "progress",
    ]


def test_the_queue_filters_by_due_status_and_type_and_searches_the_exact_subject(
    compliance_officer, settings
):
    settings.DSR_REMINDER_DAYS = 7
    overdue = dsr("otto", due_in=-2)
    soon = dsr("sara", due_in=3, type=DsrType.ERASURE)
    later = dsr("olga", due_in=20)
    done = dsr("otto", due_in=-30, status=DsrStatus.COMPLETED)
    dsr("otto2", due_in=1)
    client = console_for(compliance_officer)
    url = changelist("datasubjectrequest")

    def listed(**params) -> set:
        return {item.pk for item in client.get(url, params).context["cl"].result_list}

    assert listed(due="overdue") == {overdue.pk}
    assert listed(due="later") == {later.pk}
    assert listed(due="closed") == {done.pk}
    assert soon.pk in listed(due="soon")
    assert listed(status=DsrStatus.COMPLETED) == {done.pk}
    assert listed(type=DsrType.ERASURE) == {soon.pk}
    # exact: "otto" finds otto's two requests, never otto2's
    assert listed(q="otto") == {overdue.pk, done.pk}
    assert listed(q="OTTO") == set()


def test_a_request_page_shows_its_deadline_history_and_export_link(compliance_officer, tmp_path):
    export = tmp_path / "export.zip"
    export.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    item = dsr(
        "alice",
        due_in=-1,
        status=DsrStatus.COMPLETED,
        completed_at=timezone.now(),
        export_path=str(export),
        export_sha256="ab" * 32,
        export_size=22,
        result={"sources": {"users": 1}},
        history=[
            {"at": "2026-01-05T10:00:00+00:00", "status": "received", "actor": "carla"},
            {"at": "2026-01-06T09:30:00+00:00", "status": "in_progress", "method": "email"},
        ],
    )
    html = page(console_for(compliance_officer), change(item))
    assert 'data-urgency="closed"' in html
    # the history as a table: one row per step, a column per key, time first
    table = re.search(r'<div class="bridge-history">.*?</table>', html, re.S).group(0)
    assert re.findall(r"<th>(\w+)</th>", table) == ["at", "status", "actor", "method"]
    assert "2026-01-06T09:30:00+00:00" in table and "in_progress" in table
    download = reverse("admin:compliance_datasubjectrequest_export", args=[item.pk])
    assert f'href="{download}"' in html and "ab" * 32 in html
    consent = changelist("consentevent") + "?subject_id=alice"
    assert consent in html


def test_the_add_form_creates_a_request_through_the_service(compliance_officer):
    client = console_for(compliance_officer)
    form = client.get(reverse("admin:compliance_datasubjectrequest_add"))
    assert form.status_code == 200
    response = client.post(
        reverse("admin:compliance_datasubjectrequest_add"),
        {"subject_id": "alice", "type": DsrType.ERASURE, "details": '{"channel": "letter"}'},
    )
    item = DataSubjectRequest.objects.get()
    assert response.status_code == 302 and response["Location"] == change(item)
    assert item.subject_id == "alice" and item.type == DsrType.ERASURE
    assert item.details.get("channel") == "letter"
    assert item.due_date > today_utc()
    received = events(AuditAction.DSR_RECEIVED)
    assert [event.object_id for event in received] == [str(item.pk)]
    # a bad subject id is refused by the form, and nothing is created
    refused = client.post(
        reverse("admin:compliance_datasubjectrequest_add"),
        {"subject_id": "bad\x07id", "type": DsrType.ACCESS, "details": ""},
    )
    assert refused.status_code == 200 and DataSubjectRequest.objects.count() == 1


def test_verifying_identity_asks_for_the_method_then_starts_the_work_and_audits_it(
    compliance_officer, settings, tmp_path, django_capture_on_commit_callbacks
):
    settings.DSR_EXPORT_DIR = tmp_path / "exports"
    item = received("carla")  # the officer's own data: the registry finds her user row
    client = console_for(compliance_officer)

    # first the ask page, with the method to fill in and suggestions for it
    asked = act(client, "datasubjectrequest", "verify_identity", [item])
    assert asked.status_code == 200
    html = asked.content.decode()
    assert 'name="method"' in html and 'list="verification-methods"' in html
    assert 'name="confirm" value="yes"' in html and str(item) in html
    assert DataSubjectRequest.objects.get(pk=item.pk).status == DsrStatus.RECEIVED

    # confirmed: the service records the check and starts the job, which writes the export
    with django_capture_on_commit_callbacks(execute=True):
        done = act(
            client, "datasubjectrequest", "verify_identity", [item], method="ID document checked"
        )
    assert done.status_code == 302
    item.refresh_from_db()
    assert item.verification_method == "ID document checked"
    assert item.verified_by_id == compliance_officer.pk
    assert item.status == DsrStatus.COMPLETED, item.result
    verified = events(AuditAction.DSR_VERIFIED)
    assert [event.object_id for event in verified] == [str(item.pk)]
    assert verified[0].actor_id == compliance_officer.pk

    # the page now links the export; downloading it streams the ZIP and is audited
    detail = page(client, change(item))
    download = reverse("admin:compliance_datasubjectrequest_export", args=[item.pk])
    assert f'href="{download}"' in detail and item.export_sha256 in detail
    response = client.get(download)
    assert response.status_code == 200
    assert b"".join(response.streaming_content).startswith(b"PK")
    assert [event.object_id for event in events(AuditAction.DSR_EXPORT_DOWNLOADED)] == [
        str(item.pk)
    ]


def test_extending_and_rejecting_go_through_the_service_with_their_reasons(compliance_officer):
    working, other = received("bob"), received("eve", DsrType.ERASURE)
    dsr_service.verify_request(request=working, method="email", context=SYSTEM, enqueue=False)
    due_before = DataSubjectRequest.objects.get(pk=working.pk).due_date
    client = console_for(compliance_officer)

    # a reason is required: sent back empty, the ask page shows the error
    empty = act(client, "datasubjectrequest", "extend_deadline", [working], reason="")
    assert empty.status_code == 200 and "This field is required" in empty.content.decode()

    act(client, "datasubjectrequest", "extend_deadline", [working], reason="Many sources")
    working.refresh_from_db()
    assert working.status == DsrStatus.EXTENDED
    assert working.extension_reason == "Many sources" and working.due_date > due_before
    assert [event.object_id for event in events(AuditAction.DSR_EXTENDED)] == [str(working.pk)]

    act(client, "datasubjectrequest", "reject_requests", [other], reason="Not the subject")
    other.refresh_from_db()
    assert other.status == DsrStatus.REJECTED and other.rejected_reason == "Not the subject"
    assert [event.object_id for event in events(AuditAction.DSR_REJECTED)] == [str(other.pk)]

    # the service's refusal is shown as it words it; nothing changes
    again = act(client, "datasubjectrequest", "extend_deadline", [working], reason="More")
    assert any("already extended" in text for text in flashes(again))
    assert len(events(AuditAction.DSR_EXTENDED)) == 1


def test_a_request_page_offers_the_next_steps_for_its_status(compliance_officer):
    new, done = received("hugo"), dsr("ida", due_in=-3, status=DsrStatus.COMPLETED)
    client = console_for(compliance_officer)
    html = page(client, change(new))
    buttons = re.findall(r'formaction="([^"]+)" name="action" value="(\w+)"', html)
    assert buttons == [
        (changelist("datasubjectrequest"), "ask_for_identity"),
        (changelist("datasubjectrequest"), "verify_identity"),
        (changelist("datasubjectrequest"), "reject_requests"),
    ]
    assert f'name="_selected_action" value="{new.pk}"' in html
    # a button sends the queue's action for this request: its ask page follows
    asked = client.post(
        changelist("datasubjectrequest"),
        {"action": "verify_identity", "_selected_action": [str(new.pk)]},
    )
    assert asked.status_code == 200 and 'id="bridge-ask"' in asked.content.decode()
    # an answered request has no next step
    assert 'id="dsr-actions"' not in page(client, change(done))


def test_pausing_for_identity_keeps_a_paused_request_from_turning_overdue(
    compliance_officer, settings
):
    settings.DSR_REMINDER_DAYS = 7
    item = received("dora")
    client = console_for(compliance_officer)
    act(client, "datasubjectrequest", "ask_for_identity", [item], reason="Send a copy of your ID")
    item.refresh_from_db()
    assert item.status == DsrStatus.VERIFYING and item.paused_at is not None
    assert [event.object_id for event in events(AuditAction.DSR_VERIFYING)] == [str(item.pk)]
    # forty days later the stored due date has passed, but the clock stood still meanwhile
    DataSubjectRequest.objects.filter(pk=item.pk).update(
        paused_at=timezone.now() - timedelta(days=40),
        due_date=today_utc() - timedelta(days=5),
    )
    html = page(client, changelist("datasubjectrequest"))
    assert URGENCY.findall(html)[0][0] == "on_track"
    assert "35 d left (paused)" in html
    # the due filter judges it the same way, and the panel does not count it overdue
    url = changelist("datasubjectrequest")
    assert list(client.get(url, {"due": "overdue"}).context["cl"].result_list) == []
    assert list(client.get(url, {"due": "later"}).context["cl"].result_list) == [item]
    figures = {figure.label: figure.value for figure in panel(client).figures}
    assert figures["DSRs open"] == 1 and figures["DSRs overdue"] == 0


def test_processing_actions_need_the_process_permission(compliance_officer, operator):
    item = received("fred")
    group = compliance_officer.groups.get()
    group.permissions.remove(Permission.objects.get(codename="process_datasubjectrequest"))
    client = console_for(compliance_officer)
    listing = client.get(changelist("datasubjectrequest"))
    assert listing.status_code == 200
    assert "verify_identity" not in listing.content.decode()
    refused = act(client, "datasubjectrequest", "reject_requests", [item], reason="x")
    assert DataSubjectRequest.objects.get(pk=item.pk).status == DsrStatus.RECEIVED
    assert refused.status_code in (200, 302)


# --- Consent and notices --------------------------------------------------------------------------


def test_a_subjects_consent_history_opens_with_the_state_per_purpose(compliance_officer, settings):
    settings.GDPR_CONSENT_PURPOSES = ["marketing", "analytics", "personalisation"]
    consent.publish_notice(version="2026-01", text="We use your data for…", context=SYSTEM)
    consent.record_consent(
        subject_id="alice",
        purposes={"marketing": True, "analytics": True},
        notice_version="2026-01",
        method=ConsentMethod.CHECKBOX,
        context=SYSTEM,
    )
    consent.record_consent(
        subject_id="alice",
        purposes={"analytics": False},
        notice_version="2026-01",
        method=ConsentMethod.EMAIL,
        context=SYSTEM,
    )
    consent.record_consent(
        subject_id="bob",
        purposes={"marketing": True},
        notice_version="2026-01",
        method=ConsentMethod.API,
        context=SYSTEM,
    )
    client = console_for(compliance_officer)

    response = client.get(changelist("consentevent"), {"subject_id": "alice"})
    html = response.content.decode()
    assert {event.subject_id for event in response.context["cl"].result_list} == {"alice"}
    assert len(response.context["cl"].result_list) == 3
    state = re.search(r'<div class="bridge-consent-state.*?</table>', html, re.S).group(0)
    rows = dict(re.findall(r'data-purpose="(\w+)" data-state="(\w+)"', state))
    assert rows == {"marketing": "granted", "analytics": "withdrawn", "personalisation": "none"}
    assert "2026-01" in state and "Email" in state
    # the exact search shows the same page; without a subject there is no state on top
    assert 'id="consent-state"' in page(client, changelist("consentevent"), q="alice")
    everyone = page(client, changelist("consentevent"))
    assert 'id="consent-state"' not in everyone
    # filters: purpose, granted, method
    only = client.get(changelist("consentevent"), {"purpose": "marketing", "granted__exact": "1"})
    assert {event.subject_id for event in only.context["cl"].result_list} == {"alice", "bob"}
    by_method = client.get(changelist("consentevent"), {"method__exact": ConsentMethod.EMAIL})
    assert [event.purpose for event in by_method.context["cl"].result_list] == ["analytics"]


def test_a_notice_is_published_through_the_service_and_cannot_be_edited(compliance_officer):
    client = console_for(compliance_officer)
    add = reverse("admin:compliance_privacynotice_add")
    response = client.post(add, {"version": "2026-02", "text": "What we do with your data."})
    notice = PrivacyNotice.objects.get()
    assert response.status_code == 302 and response["Location"] == change(notice)
    assert len(notice.sha256) == 64
    assert [event.object_id for event in events(AuditAction.NOTICE_PUBLISHED)] == [str(notice.pk)]
    detail = page(client, change(notice))
    assert notice.sha256 in detail and 'name="_save"' not in detail
    # a version is published once: the second time the form says so and nothing changes
    again = client.post(add, {"version": "2026-02", "text": "Different text."})
    assert again.status_code == 200 and "already exists" in again.content.decode()
    assert PrivacyNotice.objects.get().text == "What we do with your data."


# --- SOX changes ----------------------------------------------------------------------------------


def test_a_sox_change_shows_before_and_after_with_the_changed_columns_marked(compliance_officer):
    change_row = SoxChange.objects.create(
        occurred_at=timezone.now(),
        table_name="security_storedsecret",
        model="security.StoredSecret",
        object_pk="7",
        operation=SoxOperation.UPDATE,
        before={"name": "smtp", "value": "old-secret", "enabled": True},
        after={"name": "smtp-relay", "value": "new-secret", "enabled": True},
        changed_fields=["name", "value"],
        actor_username="sam",
        reason="rename",
    )
    SoxChange.objects.create(
        occurred_at=timezone.now(),
        table_name="recovery_service",
        operation=SoxOperation.DELETE,
        before={"name": "db"},
    )
    client = console_for(compliance_officer)
    html = page(client, change(change_row))
    diff = re.search(r'<table class="bridge-table bridge-diff">.*?</table>', html, re.S).group(0)
    marked = re.findall(r'<tr data-column="(\w+)" class="bridge-changed" data-changed="yes">', diff)
    assert marked == ["name", "value"]
    assert "smtp-relay" in diff and "<td>enabled</td>" in diff
    # a secret column says it changed, never what it holds (in the table or the raw JSON)
    assert "old-secret" not in html and "new-secret" not in html
    # filters by table and operation; exact search by actor
    # (the triggers capture the test's own user and group changes too)
    url = changelist("soxchange")
    by_table = client.get(url, {"table": "security_storedsecret"}).context["cl"].result_list
    assert change_row in by_table
    assert {row.table_name for row in by_table} == {"security_storedsecret"}
    deletes = client.get(url, {"operation__exact": SoxOperation.DELETE}).context["cl"].result_list
    assert {row.operation for row in deletes} == {SoxOperation.DELETE}
    assert change_row not in deletes
    assert [row.pk for row in client.get(url, {"q": "sam"}).context["cl"].result_list] == [
        change_row.pk
    ]


# --- Approvals ------------------------------------------------------------------------------------


def test_the_requester_cannot_approve_and_a_second_officer_can(security_officer, monkeypatch):
    carried_out = []
    monkeypatch.setitem(
        approvals._executors,
        ApprovalAction.KEY_ROTATION,
        lambda approval, context: carried_out.append(approval.pk) or {"rotated": True},
    )
    second = make_user("sue", Role.SECURITY_OFFICER)
    rotation = approvals.request_approval(
        action=ApprovalAction.KEY_ROTATION,
        params={},
        reason="yearly rotation",
        context=SYSTEM,
        user=security_officer,
    )
    other = approvals.request_approval(
        action=ApprovalAction.KEY_ROTATION,
        params={},
        reason="again",
        context=SYSTEM,
        user=security_officer,
    )
    requester = console_for(security_officer)
    listing = page(requester, changelist("approvalrequest"))
    assert "bg-orange-100" in listing  # pending: amber

    # the requester is refused by the service, and told why
    own = act(requester, "approvalrequest", "approve_requests", [rotation], note="")
    assert any("second authorised user" in text for text in flashes(own))
    rotation.refresh_from_db()
    assert rotation.status == ApprovalStatus.PENDING and carried_out == []

    # a second security officer approves (carried out) and rejects the other (with a reason)
    approver = console_for(second)
    act(approver, "approvalrequest", "approve_requests", [rotation], note="checked")
    rotation.refresh_from_db()
    assert rotation.status == ApprovalStatus.APPROVED and rotation.decided_by_username == "sue"
    assert carried_out == [rotation.pk]
    act(approver, "approvalrequest", "reject_requests", [other], note="not now")
    other.refresh_from_db()
    assert other.status == ApprovalStatus.REJECTED and other.decision_note == "not now"
    assert [event.object_id for event in events(AuditAction.APPROVAL_APPROVED)] == [
        str(rotation.pk)
    ]
    assert [event.object_id for event in events(AuditAction.APPROVAL_REJECTED)] == [str(other.pk)]
    colours = page(approver, changelist("approvalrequest"))
    assert "bg-green-100" in colours and "bg-red-100" in colours


def test_compliance_officers_see_approvals_but_cannot_decide_them(compliance_officer, operator):
    pending = approvals.request_approval(
        action=ApprovalAction.LIVE_RESTORE,
        params={"backup": str(uuid.uuid4())},
        reason="restore",
        context=SYSTEM,
        user=operator,
    )
    client = console_for(compliance_officer)
    listing = page(client, changelist("approvalrequest"))
    assert change(pending) in listing and "approve_requests" not in listing
    act(client, "approvalrequest", "approve_requests", [pending], note="")
    assert ApprovalRequest.objects.get(pk=pending.pk).status == ApprovalStatus.PENDING


# --- Legal holds and purges -----------------------------------------------------------------------


def test_a_hold_is_placed_and_released_through_retention(compliance_officer):
    client = console_for(compliance_officer)
    response = client.post(
        reverse("admin:compliance_legalhold_add"),
        {
            "name": "Case 42",
            "reason": "Litigation hold",
            "categories": ["audit_events", "dsr_records"],
            "subject_id": "alice",
        },
    )
    hold = LegalHold.objects.get()
    assert response.status_code == 302 and response["Location"] == change(hold)
    assert hold.categories == ["audit_events", "dsr_records"] and hold.subject_id == "alice"
    assert hold.created_by_id == compliance_officer.pk
    assert [event.object_id for event in events(AuditAction.LEGAL_HOLD_PLACED)] == [str(hold.pk)]
    listing = page(client, changelist("legalhold"))
    assert "active" in listing and "bg-orange-100" in listing
    active = client.get(changelist("legalhold"), {"state": "active"}).context["cl"].result_list
    assert list(active) == [hold]

    # released after a confirmation page
    confirm = act(client, "legalhold", "release_holds", [hold])
    assert confirm.status_code == 200 and "Case 42" in confirm.content.decode()
    act(client, "legalhold", "release_holds", [hold], ok="1")
    hold.refresh_from_db()
    assert hold.released_at is not None and hold.released_by_id == compliance_officer.pk
    released = client.get(changelist("legalhold"), {"state": "released"}).context["cl"]
    assert list(released.result_list) == [hold]
    assert [event.object_id for event in events(AuditAction.LEGAL_HOLD_RELEASED)] == [str(hold.pk)]
    # a second release is refused by the service, and said
    twice = act(client, "legalhold", "release_holds", [hold], ok="1")
    assert any("already released" in text for text in flashes(twice))


def test_a_hold_without_a_category_is_refused_by_the_form(compliance_officer):
    client = console_for(compliance_officer)
    response = client.post(
        reverse("admin:compliance_legalhold_add"), {"name": "x", "reason": "y", "categories": []}
    )
    assert response.status_code == 200 and LegalHold.objects.count() == 0


# --- Violations ------------------------------------------------------------------------------


def test_violations_are_coloured_by_severity_open_first(compliance_officer):
    now = timezone.now()

    def violation(rule, severity, status=ViolationStatus.OPEN, days_ago=0):
        return ComplianceViolation.objects.create(
            rule=rule,
            key=str(uuid.uuid4())[:8],
            severity=severity,
            status=status,
            summary=f"{rule} {severity}",
            opened_at=now - timedelta(days=days_ago),
            last_seen_at=now,
            resolved_at=now if status == ViolationStatus.RESOLVED else None,
        )

    resolved = violation(ViolationRule.BACKUP_STALE, ViolationSeverity.CRITICAL, "resolved")
    warning = violation(ViolationRule.DSR_DUE_SOON, ViolationSeverity.WARNING, days_ago=2)
    critical = violation(ViolationRule.AUDIT_CHAIN_BROKEN, ViolationSeverity.CRITICAL, days_ago=1)
    client = console_for(compliance_officer)
    response = client.get(changelist("complianceviolation"))
    assert [row.pk for row in response.context["cl"].result_list] == [
        critical.pk,
        warning.pk,
        resolved.pk,
    ]
    html = response.content.decode()
    severities = re.findall(
        r'data-severity="(\w+)">\s*<span class="[^"]*?(bg-[a-z]+-[0-9/]+)', html, re.S
    )
    assert [(name, COLOURS[css]) for name, css in severities] == [
        ("critical", "red"),
        ("warning", "amber"),
        ("critical", "grey"),  # resolved: no longer calls for attention
    ]
    open_only = client.get(changelist("complianceviolation"), {"status__exact": "open"})
    assert len(open_only.context["cl"].result_list) == 2
    critical_only = client.get(
        changelist("complianceviolation"), {"severity__exact": ViolationSeverity.CRITICAL}
    )
    assert {row.pk for row in critical_only.context["cl"].result_list} == {critical.pk, resolved.pk}


# --- Reports --------------------------------------------------------------------------------------


def test_a_report_is_generated_from_the_console_and_downloaded_with_an_audit_event(
    compliance_officer, outsider, settings, tmp_path, django_capture_on_commit_callbacks
):
    settings.REPORT_DIR = tmp_path / "reports"
    client = console_for(compliance_officer)
    today = today_utc()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("admin:compliance_compliancereport_add"),
            {
                "type": ReportType.AUDIT_TRAIL,
                "format": ReportFormat.CSV,
                "date_from": (today - timedelta(days=7)).isoformat(),
                "date_to": today.isoformat(),
            },
        )
    report = ComplianceReport.objects.get()
    assert response.status_code == 302 and response["Location"] == change(report)
    assert report.status == ReportStatus.SUCCEEDED, report.error
    assert report.created_by_id == compliance_officer.pk
    assert [event.object_id for event in events(AuditAction.REPORT_REQUESTED)] == [str(report.pk)]

    listing = page(client, changelist("compliancereport"))
    file_url = reverse("admin:compliance_compliancereport_download", args=[report.pk, "file"])
    signature_url = reverse(
        "admin:compliance_compliancereport_download", args=[report.pk, "signature"]
    )
    assert file_url in listing and signature_url in listing
    assert "bg-green-100" in listing  # succeeded
    detail = page(client, change(report))
    assert report.sha256 in detail and report.signature[:40] in detail
    assert "&quot;sha256&quot;" in detail  # the manifest, pretty-printed

    # the file streams, and the download is audited; the signature verifies it
    download = client.get(file_url)
    assert download.status_code == 200
    body = b"".join(download.streaming_content)
    assert len(body) == report.size
    assert [event.object_id for event in events(AuditAction.REPORT_DOWNLOADED)] == [str(report.pk)]
    signature = client.get(signature_url)
    assert signature.status_code == 200 and b"Ed25519" in b"".join(signature.streaming_content)
    assert len(events(AuditAction.REPORT_DOWNLOADED)) == 1  # the file's download only

    # someone without the reports' view permission gets nothing
    assert console_for(outsider).get(file_url).status_code == 403


def test_a_report_the_service_refuses_is_not_created(compliance_officer):
    client = console_for(compliance_officer)
    today = today_utc()
    response = client.post(
        reverse("admin:compliance_compliancereport_add"),
        {
            "type": ReportType.AUDIT_TRAIL,
            "format": ReportFormat.CSV,
            "date_from": today.isoformat(),
            "date_to": (today - timedelta(days=1)).isoformat(),
        },
    )
    assert response.status_code == 200 and ComplianceReport.objects.count() == 0
    # an unknown filter is refused on the form, with the service's words
    misspelt = client.post(
        reverse("admin:compliance_compliancereport_add"),
        {
            "type": ReportType.AUDIT_TRAIL,
            "format": ReportFormat.CSV,
            "date_from": today.isoformat(),
            "date_to": today.isoformat(),
            "filters": '{"actr": "carla"}',
        },
    )
    assert misspelt.status_code == 200 and "Unknown filter" in misspelt.content.decode()
    assert ComplianceReport.objects.count() == 0


# --- The dashboard panel --------------------------------------------------------------------------


def panel(client: Client, key: str = "compliance-gdpr"):
    shown = {item.panel.key: item for item in client.get("/admin/").context["panels"]}
    return shown[key].content if key in shown else None


def test_the_gdpr_and_sox_panel_counts_requests_violations_consent_and_approvals(
    compliance_officer, operator, settings
):
    settings.DSR_REMINDER_DAYS = 7
    settings.GDPR_CONSENT_PURPOSES = ["marketing", "analytics"]
    now = timezone.now()
    dsr("a", due_in=-3)  # overdue
    dsr("b", due_in=2)  # due soon
    dsr("c", due_in=25)  # on track
    # answered: two on time, one late, one rejected by its due date (three of four on time)
    dsr("d", due_in=-10, status=DsrStatus.COMPLETED, completed_at=now - timedelta(days=12))
    dsr("e", due_in=-1, status=DsrStatus.COMPLETED, completed_at=now - timedelta(days=1))
    dsr("f", due_in=-5, status=DsrStatus.COMPLETED, completed_at=now - timedelta(days=2))
    dsr(
        "g",
        due_in=-5,
        status=DsrStatus.REJECTED,
        history=[{"at": (now - timedelta(days=6)).isoformat(), "status": "rejected"}],
    )
    for rule, severity, status in (
        (ViolationRule.DSR_OVERDUE, ViolationSeverity.CRITICAL, ViolationStatus.OPEN),
        (ViolationRule.DSR_DUE_SOON, ViolationSeverity.WARNING, ViolationStatus.OPEN),
        (ViolationRule.EXPORT_VOLUME, ViolationSeverity.WARNING, ViolationStatus.OPEN),
        (ViolationRule.BACKUP_STALE, ViolationSeverity.CRITICAL, ViolationStatus.RESOLVED),
    ):
        ComplianceViolation.objects.create(
            rule=rule,
            key=str(uuid.uuid4())[:8],
            severity=severity,
            status=status,
            summary="x",
            opened_at=now,
            last_seen_at=now,
        )
    consent.publish_notice(version="v1", text="notice", context=SYSTEM)
    for subject, marketing in (("s1", True), ("s2", True), ("s3", False), ("s4", True)):
        consent.record_consent(
            subject_id=subject,
            purposes={"marketing": marketing},
            notice_version="v1",
            method=ConsentMethod.API,
            context=SYSTEM,
        )
    for expires in (now + timedelta(hours=1), now - timedelta(minutes=1)):  # one stale
        ApprovalRequest.objects.create(
            action=ApprovalAction.LIVE_RESTORE,
            reason="r",
            requested_by_username="olivia",
            requested_at=now - timedelta(hours=2),
            expires_at=expires,
        )
    Job.objects.create(
        kind=RETENTION_JOB_KIND, status=JobStatus.FAILED, finished_at=now - timedelta(hours=3)
    )
    ComplianceReport.objects.create(
        type=ReportType.GDPR_REQUESTS,
        format=ReportFormat.PDF,
        status=ReportStatus.SUCCEEDED,
        period_from=now,
        period_to=now,
        created_at=now,
    )

    content = panel(console_for(compliance_officer))
    figures = {figure.label: figure for figure in content.figures}
    values = {label: figure.value for label, figure in figures.items()}
    assert values["DSRs open"] == 3
    assert values["DSRs overdue"] == 1 and figures["DSRs overdue"].state == "bad"
    assert values["due within 7 d"] == 1 and figures["due within 7 d"].state == "warn"
    assert values["answered on time"] == "75%"
    assert figures["answered on time"].hint == "3 of 4 answered"
    assert values["critical violations"] == 1 and figures["critical violations"].state == "bad"
    assert values["warnings"] == 2 and figures["warnings"].state == "warn"
    assert values["approvals waiting"] == 1
    assert values["last retention run"] == "failed"
    assert figures["last retention run"].state == "bad"
    assert values["newest report"] == "gdpr requests"
    assert content.state == "bad" and content.badge == "1 overdue"
    bars = {bar.label: bar.value for bar in content.chart.bars}
    assert bars == {"marketing 75%": 75, "analytics n/a": 0}
    # the most urgent open requests, nearest deadline first, coloured by urgency
    assert [(row.label, row.state) for row in content.rows] == [
        ("access · a", "bad"),
        ("access · b", "warn"),
        ("access · c", "ok"),
    ]
    links = {link.label for link in content.links}
    assert {"DSR queue", "Violations", "Consent", "Reports", "Checkpoints"} <= links

    # operators decide approvals but see no GDPR panel
    assert panel(console_for(operator)) is None


def test_the_panel_renders_on_the_dashboard_without_requests(compliance_officer):
    html = page(console_for(compliance_officer), "/admin/")
    assert 'id="panel-compliance-gdpr"' in html
    assert "Consent per purpose" in html and "on track" in html


# --- In a real browser, at 1366 px --------------------------------------------------------------


def seed_every_page() -> dict[str, str]:
    """A row with long values in every new list, and the detail pages worth a look."""
    now = timezone.now()
    long_subject = "a.rather.long.customer.address@example-subsidiary.org"
    queue = [
        dsr(long_subject, due_in=-3, type=DsrType.PORTABILITY),
        dsr("bob", due_in=4, status=DsrStatus.VERIFYING, paused_at=now),
        dsr("carl", due_in=21, type=DsrType.RECTIFICATION),
        dsr("dora", due_in=-9, status=DsrStatus.COMPLETED, completed_at=now),
    ]
    job = Job.objects.create(
        kind="compliance.dsr", status=JobStatus.RUNNING, progress_done=3, progress_total=8
    )
    DataSubjectRequest.objects.filter(pk=queue[2].pk).update(job=job)
    ConsentEvent.objects.create(
        subject_id=long_subject,
        purpose="third_party_sharing",
        granted=False,
        notice_version="2026-01-long-version",
        notice_sha256="0" * 64,
        method=ConsentMethod.CHECKBOX,
        channel="mobile-app-onboarding-v2",
        occurred_at=now,
    )
    PrivacyNotice.objects.create(
        version="2026-01-long-version", text="We keep " * 40, sha256="f" * 64, published_at=now
    )
    sox = SoxChange.objects.create(
        occurred_at=now,
        table_name="django_celery_beat_periodictask",
        model="django_celery_beat.PeriodicTask",
        object_pk="123456",
        operation=SoxOperation.UPDATE,
        before={"name": "reap-stale-jobs", "enabled": True, "description": "x" * 200},
        after={"name": "reap-stale-jobs", "enabled": False, "description": "y" * 200},
        changed_fields=["enabled", "description", "last_run_at"],
        actor_username="a-rather-long-user-name",
        reason="Disabled during the maintenance window of the database cluster",
    )
    ApprovalRequest.objects.create(
        action=ApprovalAction.LIVE_RESTORE,
        reason="restore",
        requested_by_username="a-rather-long-user-name",
        requested_at=now,
        expires_at=now + timedelta(hours=1),
        decided_by_username="another-long-user-name",
        decided_at=now,
    )
    LegalHold.objects.create(
        name="Litigation: Example Corp. v. Subsidiary Ltd., case 2026-0042",
        reason="court order",
        categories=["audit_events", "api_requests", "dsr_records", "reports"],
        subject_id=long_subject,
        covers_from=now - timedelta(days=400),
        covers_to=now,
        created_at=now,
    )
    AuditPurge.objects.create(
        first_seq=1,
        last_seq=1_000_000,
        events=1_000_000,
        checkpoint_number=12345,
        anchor_hash="a" * 64,
        newest_purged_at=now,
        purged_at=now,
    )
    ComplianceReport.objects.create(
        type=ReportType.SOX_CHANGES,
        format=ReportFormat.PDF,
        status=ReportStatus.SUCCEEDED,
        period_from=now,
        period_to=now,
        rows=1_000_000,
        truncated=True,
        size=123_456_789,
        created_at=now,
        file_path="/x.pdf",
    )
    ComplianceViolation.objects.create(
        rule=ViolationRule.SOD_CONFLICT,
        key="a-rather-long-user-name",
        severity=ViolationSeverity.CRITICAL,
        summary="a-rather-long-user-name holds operator and compliance_officer: they could "
        "restore the live system and audit their own restore",
        opened_at=now,
        last_seen_at=now,
    )
    return {"dsr": change(queue[0]), "sox": change(sox), "extend": change(queue[2])}


@pytest.mark.services
def test_the_compliance_pages_fit_a_1366_px_screen(chromium, live_server):
    from playwright.sync_api import expect

    from tests.test_browser import SCREEN, console_page, log_in, no_horizontal_overflow, screenshot

    make_user("root", superuser=True)
    details = seed_every_page()
    names = (
        "datasubjectrequest",
        "consentevent",
        "privacynotice",
        "soxchange",
        "approvalrequest",
        "legalhold",
        "auditpurge",
        "compliancereport",
        "complianceviolation",
    )
    with console_page(chromium) as page:
        log_in(page, live_server.url, "root", PASSWORD)
        expect(page).to_have_url(f"{live_server.url}/admin/")
        expect(page.locator("#panel-compliance-gdpr")).to_contain_text("DSRs overdue")
        widths = no_horizontal_overflow(page)
        assert widths["page"] <= SCREEN["width"], widths
        page.locator("#panel-compliance-gdpr").scroll_into_view_if_needed()
        screenshot(page, "console-compliance-gdpr-panel.png")
        too_wide = []
        for name in names:
            url = f"/admin/compliance/{name}/"
            page.goto(f"{live_server.url}{url}")
            expect(page.locator("#result_list"), url).to_be_visible()
            if name == "datasubjectrequest":
                screenshot(page, "console-dsr-queue.png")
            widths = no_horizontal_overflow(page)
            if widths["page"] > SCREEN["width"] or widths["table"] > widths["room"]:
                too_wide.append((url, widths))
        for key in ("dsr", "sox"):
            page.goto(f"{live_server.url}{details[key]}")
            if key == "sox":
                screenshot(page, "console-sox-change.png")
            widths = no_horizontal_overflow(page)
            if widths["page"] > SCREEN["width"]:
                too_wide.append((details[key], widths))

        # a request's own page offers its next steps; extending asks for the reason first
        page.goto(f"{live_server.url}{details['extend']}")
        page.locator("#dsr-actions button", has_text="Extend the deadline").click()
        expect(page.locator("#bridge-ask")).to_contain_text("Extend the deadline")
        page.fill("textarea[name=reason]", "Eight systems hold the data")
        page.locator("#bridge-ask button[type=submit]").click()
        expect(page.locator("body")).to_contain_text("extended, now due")
    # then no page or list needs a horizontal scrollbar
    assert too_wide == []
    extended = DataSubjectRequest.objects.get(subject_id="carl")
    assert extended.status == DsrStatus.EXTENDED
    assert extended.extension_reason == "Eight systems hold the data"
