"""Consent: notices with their hash, append-only events, the projection per purpose (the
latest event decides), receipts, refusals naming the field, permissions."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.utils import timezone

from compliance import consent
from compliance.audit import AuditContext
from compliance.models import AuditEvent, ConsentEvent, PrivacyNotice
from security.keys import audit_signing_key

pytestmark = pytest.mark.django_db

NOTICES = "/api/compliance/gdpr/notices"
V1_TEXT = "We use your data for marketing and analytics. Version 1."
V2_TEXT = "We use your data for marketing, analytics and personalisation. Version 2."


def consent_url(subject_id: str, suffix: str = "") -> str:
    return f"/api/compliance/gdpr/consent/{subject_id}{suffix}"


@pytest.fixture
def notices(compliance_api) -> dict[str, dict]:
    published = {}
    for version, text in (("v1", V1_TEXT), ("v2", V2_TEXT)):
        response = compliance_api.post(NOTICES, {"version": version, "text": text}, format="json")
        assert response.status_code == 201, response.content
        published[version] = response.json()
    return published


def put(api, subject_id: str, purposes: dict, notice: str = "v1", **extra):
    body = {"purposes": purposes, "notice_version": notice, "method": "checkbox", **extra}
    return api.put(consent_url(subject_id), body, format="json", HTTP_X_REQUEST_ID="req-42")


def test_a_notice_is_stored_with_the_sha256_of_its_text(compliance_api, notices):
    assert notices["v1"]["sha256"] == hashlib.sha256(V1_TEXT.encode()).hexdigest()
    assert PrivacyNotice.objects.get(version="v2").text == V2_TEXT
    listed = compliance_api.get(NOTICES).json()["results"]
    assert [row["version"] for row in listed] == ["v2", "v1"]
    again = compliance_api.post(NOTICES, {"version": "v1", "text": "changed"}, format="json")
    assert again.status_code == 400
    assert "already exists" in again.json()["version"][0]
    assert AuditEvent.objects.filter(action="gdpr.notice.published").count() == 2


def test_granting_records_one_event_per_purpose_with_notice_hash_ip_and_request_id(
    compliance_api, notices, compliance_officer
):
    # when
    response = put(compliance_api, "cust-1", {"marketing": True, "analytics": True}, channel="web")
    # then
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["subject_id"] == "cust-1"
    marketing = body["purposes"]["marketing"]
    assert marketing["granted"] is True
    assert marketing["notice_version"] == "v1"
    assert marketing["notice_sha256"] == notices["v1"]["sha256"]
    assert (marketing["method"], marketing["channel"]) == ("checkbox", "web")
    assert marketing["since"] == marketing["updated_at"]
    # purposes never asked: not granted, no since
    assert body["purposes"]["personalisation"] == {
        "granted": False,
        "since": None,
        "updated_at": None,
        "notice_version": None,
        "notice_sha256": None,
        "method": None,
        "channel": None,
    }
    assert [event["purpose"] for event in body["history"]] == ["analytics", "marketing"]
    event = ConsentEvent.objects.get(subject_id="cust-1", purpose="marketing")
    assert event.client_ip == "127.0.0.1"
    assert event.request_id == "req-42"
    assert event.actor_id == compliance_officer.pk
    recorded = AuditEvent.objects.get(action="gdpr.consent.recorded")
    assert recorded.object_type == "compliance.consentevent"
    assert recorded.request_id == "req-42"


def test_withdraw_and_regrant_across_purposes_the_latest_event_decides(compliance_api, notices):
    # given marketing and analytics granted under v1
    first = put(compliance_api, "cust-2", {"marketing": True, "analytics": True}).json()
    granted_since = first["purposes"]["marketing"]["since"]
    # when marketing is withdrawn (the same call, false)
    withdrawn = put(compliance_api, "cust-2", {"marketing": False}).json()["purposes"]
    # then only marketing changed
    assert withdrawn["marketing"]["granted"] is False
    assert withdrawn["marketing"]["since"] > granted_since
    assert withdrawn["analytics"]["granted"] is True
    assert withdrawn["analytics"]["since"] == granted_since
    assert consent.has_consent("cust-2", "marketing") is False
    assert consent.has_consent("cust-2", "analytics") is True
    # when marketing is granted again and analytics re-confirmed, both against v2
    regrant = put(compliance_api, "cust-2", {"marketing": True, "analytics": True}, notice="v2")
    state = regrant.json()
    # then marketing's state begins now; analytics keeps its since but names the new notice
    assert state["purposes"]["marketing"]["granted"] is True
    assert state["purposes"]["marketing"]["since"] > withdrawn["marketing"]["since"]
    assert state["purposes"]["analytics"]["since"] == granted_since
    assert state["purposes"]["analytics"]["updated_at"] > granted_since
    assert state["purposes"]["analytics"]["notice_sha256"] == notices["v2"]["sha256"]
    # every call is in the history: the re-confirmation is evidence too
    assert len(state["history"]) == 5
    assert [e["granted"] for e in state["history"] if e["purpose"] == "marketing"] == [
        True,
        False,
        True,
    ]


def test_the_latest_event_wins_even_within_the_same_instant(notices):
    context = AuditContext.system()
    for granted in (True, False, True, False):
        consent.record_consent(
            subject_id="cust-3",
            purposes={"analytics": granted},
            notice_version="v1",
            method="api",
            context=context,
        )
    # all four at one timestamp: the order Bridge recorded them in decides
    ConsentEvent.objects.filter(subject_id="cust-3").update(occurred_at=timezone.now())
    assert consent.has_consent("cust-3", "analytics") is False
    assert consent.consent_state("cust-3")["purposes"]["analytics"]["granted"] is False


def test_consent_rates_count_each_subjects_current_state(notices):
    context = AuditContext.system()

    def record(subject: str, **purposes: bool) -> None:
        consent.record_consent(
            subject_id=subject,
            purposes=purposes,
            notice_version="v1",
            method="api",
            context=context,
        )

    record("a", marketing=True, analytics=True)
    record("b", marketing=True)
    record("b", marketing=False)
    record("c", marketing=False)
    record("d", marketing=True)
    rates = consent.consent_rates()
    assert rates["marketing"] == {"granted": 2, "withdrawn": 2, "rate": 0.5}
    assert rates["analytics"] == {"granted": 1, "withdrawn": 0, "rate": 1.0}
    assert rates["third_party_sharing"] == {"granted": 0, "withdrawn": 0, "rate": None}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"purposes": {"marketing": True, "telepathy": True}}, "purposes", "telepathy"),
        ({"purposes": {}}, "purposes", ""),
        ({"purposes": {"marketing": "yes"}}, "purposes", ""),
        ({"notice_version": "v9"}, "notice_version", "v9"),
        ({"method": "telepathy"}, "method", ""),
        ({"channel": "x" * 65}, "channel", ""),
        ({"surprise": 1}, "surprise", "Unknown field"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_recorded(
    compliance_api, notices, body, field, words
):
    request = {
        "purposes": {"marketing": True},
        "notice_version": "v1",
        "method": "checkbox",
        **body,
    }
    response = compliance_api.put(consent_url("cust-4"), request, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert words in str(response.json()[field])
    assert not ConsentEvent.objects.exists()


def test_subject_ids_are_one_path_segment_without_control_characters(compliance_api, notices):
    assert put(compliance_api, "x" * 128, {"marketing": True}).status_code == 200
    assert put(compliance_api, "x" * 129, {"marketing": True}).status_code == 404
    assert compliance_api.get(consent_url("bad%01id")).status_code == 404
    assert compliance_api.get(consent_url("a%2Fb")).status_code == 404
    email = compliance_api.get(consent_url("ann@example.org"))
    assert email.status_code == 200 and email.json()["subject_id"] == "ann@example.org"


def test_consent_events_cannot_be_changed_or_deleted_over_the_api(compliance_api, notices):
    put(compliance_api, "cust-5", {"marketing": True})
    assert compliance_api.delete(consent_url("cust-5")).status_code == 405
    assert compliance_api.patch(consent_url("cust-5"), {}, format="json").status_code == 405
    assert ConsentEvent.objects.filter(subject_id="cust-5").count() == 1


def test_a_receipt_lists_purposes_notices_and_is_signed_and_audited(compliance_api, notices):
    # given
    put(compliance_api, "cust-6", {"marketing": True, "analytics": False}, channel="app")
    put(compliance_api, "cust-6", {"marketing": True}, notice="v2")
    # when
    response = compliance_api.get(consent_url("cust-6", "/receipt"))
    # then
    assert response.status_code == 200, response.content
    receipt = response.json()
    assert receipt["subject"] == "cust-6"
    assert receipt["controller"] == "Bridge"
    assert receipt["version"] == consent.RECEIPT_VERSION
    purposes = {item["purpose"]: item for item in receipt["purposes"]}
    assert set(purposes) == {"marketing", "analytics"}
    assert purposes["marketing"]["granted"] is True
    assert purposes["marketing"]["notice_version"] == "v2"
    assert len(purposes["marketing"]["events"]) == 2
    assert purposes["analytics"]["granted"] is False
    assert {(n["version"], n["sha256"]) for n in receipt["notices"]} == {
        ("v1", notices["v1"]["sha256"]),
        ("v2", notices["v2"]["sha256"]),
    }
    signature = receipt["signature"]
    key = audit_signing_key()
    assert signature["key_id"] == key.key_id
    public: Ed25519PublicKey = key.public
    public.verify(base64.b64decode(signature["value"]), consent.receipt_message(receipt))
    assert AuditEvent.objects.filter(action="gdpr.consent.receipt").count() == 1
    # a receipt for nobody is a 404
    assert compliance_api.get(consent_url("nobody", "/receipt")).status_code == 404


def test_the_controller_named_in_receipts_comes_from_settings(settings, notices):
    settings.GDPR_CONTROLLER = "Example GmbH"
    consent.record_consent(
        subject_id="cust-7",
        purposes={"marketing": True},
        notice_version="v1",
        method="form",
        context=AuditContext.system(),
    )
    receipt = consent.consent_receipt(subject_id="cust-7", context=AuditContext.system())
    assert receipt is not None and receipt["controller"] == "Example GmbH"


def test_reading_needs_view_and_recording_needs_record_consent(
    notices, outsider_api, operator_api, anon_api
):
    for api, expected in ((anon_api, 401), (outsider_api, 403), (operator_api, 403)):
        assert api.get(consent_url("cust-8")).status_code == expected
        assert api.get(consent_url("cust-8", "/receipt")).status_code == expected
        assert put(api, "cust-8", {"marketing": True}).status_code == expected
        assert api.get(NOTICES).status_code == expected
        assert api.post(NOTICES, {"version": "v3", "text": "t"}, format="json").status_code == (
            expected
        )
    assert not ConsentEvent.objects.exists()


def test_writes_are_refused_while_gdpr_compliance_is_off(settings, compliance_api, notices):
    put(compliance_api, "cust-9", {"marketing": True})
    settings.ENABLE_GDPR_COMPLIANCE = False
    refused = put(compliance_api, "cust-9", {"marketing": False})
    assert refused.status_code == 503 and refused.json()["code"] == "gdpr_disabled"
    # what was recorded stays readable
    state = compliance_api.get(consent_url("cust-9")).json()
    assert state["purposes"]["marketing"]["granted"] is True


def test_since_is_when_the_current_state_began(notices):
    context = AuditContext.system()
    for granted in (True, True, False, False, True):
        consent.record_consent(
            subject_id="cust-10",
            purposes={"marketing": granted},
            notice_version="v1",
            method="api",
            context=context,
        )
    events = list(ConsentEvent.objects.filter(subject_id="cust-10").order_by("id"))
    start = timezone.now() - timedelta(days=10)
    for offset, event in enumerate(events):
        ConsentEvent.objects.filter(pk=event.pk).update(occurred_at=start + timedelta(days=offset))
    state = consent.consent_state("cust-10")["purposes"]["marketing"]
    assert state["since"] == start + timedelta(days=4)
    withdrawn = consent.project(
        list(ConsentEvent.objects.filter(subject_id="cust-10").order_by("id"))[:4]
    )["marketing"]
    assert (withdrawn["granted"], withdrawn["since"]) == (False, start + timedelta(days=2))
    assert withdrawn["updated_at"] == start + timedelta(days=3)
