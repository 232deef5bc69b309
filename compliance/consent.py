"""Consent: privacy notices, append-only consent events and their projection.

A consent event says one subject granted or withdrew one purpose, against which version of the
privacy notice (and that text's SHA-256), how (method, channel), from where (client IP, request
id) and when. Events are only ever inserted: the current state per purpose is a projection of
them, the latest event per subject and purpose deciding (by id, the order Bridge recorded them
in, so two events in the same microsecond still have an order).

Withdrawing is the same call as granting, with `false` (GDPR Art. 7(3)). A call naming a
purpose whose state it does not change is recorded too: it is a re-confirmation, and when it is
given against a newer notice it is the evidence that the subject agreed to that text (Art. 7(1):
the controller must be able to demonstrate consent). `since` in the projection is when the
current state began, so a re-confirmation does not move it; `updated_at` is the latest event.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Max
from django.utils import timezone

from compliance.audit import AuditContext, iso, record_event
from compliance.choices import AuditAction, ConsentMethod
from compliance.models import ConsentEvent, PrivacyNotice
from compliance.proof import canonical_json

# A subject id is a free string (a username, a customer id, an email): at most 128 characters,
# no control characters, and no "/" since it travels as one segment of the API's paths.
SUBJECT_ID_PATTERN = r"[^/\x00-\x1f\x7f]{1,128}"
_SUBJECT_ID = re.compile(SUBJECT_ID_PATTERN)
NOTICE_VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}"
_NOTICE_VERSION = re.compile(NOTICE_VERSION_PATTERN)
NOTICE_MAX_CHARS = 200_000
CHANNEL_MAX_CHARS = 64

# What a receipt's signature covers: this prefix, then the canonical JSON of the receipt without
# its `signature`. The prefix keeps a receipt signature from ever passing for a checkpoint's.
RECEIPT_CONTEXT = b"bridge-consent-receipt/v1\n"
RECEIPT_VERSION = "KI-CR-v1.1.0"


class ConsentError(ValueError):
    """A consent call refused: `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def configured_purposes() -> list[str]:
    """The purposes consent can be given for (GDPR_CONSENT_PURPOSES), in their order."""
    return list(dict.fromkeys(settings.GDPR_CONSENT_PURPOSES))


def check_subject_id(subject_id: Any) -> str:
    if not isinstance(subject_id, str) or not _SUBJECT_ID.fullmatch(subject_id):
        raise ConsentError("subject_id", "1-128 characters, no control characters and no '/'.")
    check_text(subject_id, "subject_id")
    return subject_id


def check_text(value: str, field: str) -> str:
    """`value` if it can be stored: JSON can carry a lone surrogate (\\ud800), which no
    database text column (nor the audit trail) can hold; refused naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConsentError(field, "Not valid Unicode text (a lone surrogate).") from None
    return value


# --- Privacy notices -----------------------------------------------------------------------


def notice_sha256(text: str) -> str:
    """The SHA-256 of a notice's text as UTF-8: what consent events record."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def publish_notice(*, version: str, text: str, context: AuditContext) -> PrivacyNotice:
    """Store a privacy notice version with its SHA-256. Versions are immutable: publishing an
    existing version again is refused, a changed text is a new version."""
    if not isinstance(version, str) or not _NOTICE_VERSION.fullmatch(version):
        raise ConsentError(
            "version", "1-40 letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    if not isinstance(text, str) or not text.strip():
        raise ConsentError("text", "The notice's text may not be blank.")
    if len(text) > NOTICE_MAX_CHARS:
        raise ConsentError("text", f"At most {NOTICE_MAX_CHARS} characters.")
    if "\x00" in text:
        raise ConsentError("text", "The text may not contain NUL characters.")
    check_text(text, "text")
    digest = notice_sha256(text)
    try:
        with transaction.atomic():
            notice = PrivacyNotice.objects.create(
                version=version, text=text, sha256=digest, published_at=timezone.now()
            )
            record_event(
                action=AuditAction.NOTICE_PUBLISHED,
                context=context,
                object_type="compliance.privacynotice",
                object_id=notice.pk,
                details={"version": version, "sha256": digest, "characters": len(text)},
            )
    except IntegrityError as exc:
        raise ConsentError(
            "version",
            f"Notice version {version!r} already exists; versions never change, publish a new one.",
        ) from exc
    return notice


# --- Recording -----------------------------------------------------------------------------


def _check_purposes(purposes: Any) -> dict[str, bool]:
    if not isinstance(purposes, dict) or not purposes:
        raise ConsentError("purposes", 'Name at least one purpose: {"<purpose>": true | false}.')
    known = configured_purposes()
    for purpose, granted in purposes.items():
        if purpose not in known:
            raise ConsentError(
                "purposes",
                f"Unknown purpose {purpose!r}: expected one of {', '.join(known)}.",
            )
        if not isinstance(granted, bool):
            raise ConsentError("purposes", f"{purpose}: true (grant) or false (withdraw).")
    return dict(purposes)


def record_consent(
    *,
    subject_id: str,
    purposes: dict[str, bool],
    notice_version: str,
    method: str,
    channel: str = "",
    context: AuditContext,
) -> list[ConsentEvent]:
    """Record one consent event per purpose named (granted true, withdrawn false), all against
    `notice_version`, with the caller's client IP, request id and user from `context`.

    Everything is checked before anything is written: an unknown purpose, notice version or
    method refuses the whole call (ConsentError naming the field). One audit event per call.
    """
    check_subject_id(subject_id)
    wanted = _check_purposes(purposes)
    if method not in ConsentMethod.values:
        raise ConsentError("method", f"One of {', '.join(ConsentMethod.values)}.")
    if not isinstance(channel, str) or len(channel) > CHANNEL_MAX_CHARS or "\x00" in channel:
        raise ConsentError("channel", f"Text of at most {CHANNEL_MAX_CHARS} characters.")
    check_text(channel, "channel")
    notice = PrivacyNotice.objects.filter(version=notice_version).first()
    if notice is None:
        raise ConsentError(
            "notice_version",
            f"No privacy notice {notice_version!r}: publish it first "
            "(POST /api/compliance/gdpr/notices).",
        )
    now = timezone.now()
    with transaction.atomic():
        events = ConsentEvent.objects.bulk_create(
            ConsentEvent(
                subject_id=subject_id,
                purpose=purpose,
                granted=granted,
                notice_version=notice.version,
                notice_sha256=notice.sha256,
                method=method,
                channel=channel,
                client_ip=context.client_ip,
                actor_id=context.actor_id,
                request_id=context.request_id[:64],
                occurred_at=now,
            )
            for purpose, granted in sorted(wanted.items())
        )
        if any(event.pk is None for event in events):
            # A backend that does not return ids from a bulk insert: read them back.
            events = list(
                ConsentEvent.objects.filter(subject_id=subject_id, occurred_at=now).order_by("id")
            )
        record_event(
            action=AuditAction.CONSENT_RECORDED,
            context=context,
            object_type="compliance.consentevent",
            object_id=events[-1].pk,
            details={
                "subject_id": subject_id,
                "purposes": {purpose: wanted[purpose] for purpose in sorted(wanted)},
                "notice_version": notice.version,
                "notice_sha256": notice.sha256,
                "method": method,
                "channel": channel,
                "event_ids": [event.pk for event in events],
            },
        )
    return events


# --- The projection ------------------------------------------------------------------------


def _event_data(event: ConsentEvent) -> dict[str, Any]:
    return {
        "id": event.pk,
        "purpose": event.purpose,
        "granted": event.granted,
        "notice_version": event.notice_version,
        "notice_sha256": event.notice_sha256,
        "method": event.method,
        "channel": event.channel,
        "client_ip": event.client_ip,
        "actor_id": event.actor_id,
        "request_id": event.request_id,
        "occurred_at": event.occurred_at,
    }


def _never_asked() -> dict[str, Any]:
    return {
        "granted": False,
        "since": None,
        "updated_at": None,
        "notice_version": None,
        "notice_sha256": None,
        "method": None,
        "channel": None,
    }


def project(events: list[ConsentEvent]) -> dict[str, dict[str, Any]]:
    """The state per purpose of one subject's events (in id order): the latest event decides;
    `since` is when the current state began (the first event of its unbroken run)."""
    state: dict[str, dict[str, Any]] = {
        purpose: _never_asked() for purpose in configured_purposes()
    }
    seen: set[str] = set()
    for event in events:
        current = state.get(event.purpose)
        continuing = (
            event.purpose in seen and current is not None and current["granted"] == (event.granted)
        )
        state[event.purpose] = {
            "granted": event.granted,
            "since": current["since"] if continuing else event.occurred_at,
            "updated_at": event.occurred_at,
            "notice_version": event.notice_version,
            "notice_sha256": event.notice_sha256,
            "method": event.method,
            "channel": event.channel,
        }
        seen.add(event.purpose)
    return state


def consent_state(subject_id: str) -> dict[str, Any]:
    """`{"subject_id", "purposes": {purpose: state}, "history": [events, oldest first]}`.

    Every configured purpose appears (never asked: not granted, `since` null), and so does a
    purpose no longer configured that the subject has events for: its state is still a fact.
    """
    events = list(ConsentEvent.objects.filter(subject_id=subject_id).order_by("id"))
    return {
        "subject_id": subject_id,
        "purposes": project(events),
        "history": [_event_data(event) for event in events],
    }


def has_consent(subject_id: str, purpose: str, *, at: datetime | None = None) -> bool:
    """Whether the subject's latest event for `purpose` (up to `at`, default now) grants it."""
    events = ConsentEvent.objects.filter(subject_id=subject_id, purpose=purpose)
    if at is not None:
        events = events.filter(occurred_at__lte=at)
    latest = events.order_by("-id").values_list("granted", flat=True).first()
    return latest is True


def consent_rates() -> dict[str, dict[str, Any]]:
    """Per purpose, over every subject's current state: subjects granting, subjects who
    withdrew, and the share granting (null when no subject was ever asked).

    Two aggregates in the database: the newest event id per (subject, purpose), then the
    granted/withdrawn count of those events per purpose.
    """
    latest = ConsentEvent.objects.values("subject_id", "purpose").annotate(last=Max("id"))
    counts = (
        ConsentEvent.objects.filter(id__in=latest.values("last"))
        .values("purpose", "granted")
        .annotate(subjects=Count("id"))
    )
    rates: dict[str, dict[str, Any]] = {
        purpose: {"granted": 0, "withdrawn": 0, "rate": None} for purpose in configured_purposes()
    }
    for row in counts:
        entry = rates.setdefault(row["purpose"], {"granted": 0, "withdrawn": 0, "rate": None})
        entry["granted" if row["granted"] else "withdrawn"] += row["subjects"]
    for entry in rates.values():
        asked = entry["granted"] + entry["withdrawn"]
        entry["rate"] = round(entry["granted"] / asked, 4) if asked else None
    return rates


# --- Receipts ------------------------------------------------------------------------------


def controller_name() -> str:
    """Who the receipts name as the controller: GDPR_CONTROLLER when set, else "Bridge"."""
    return str(getattr(settings, "GDPR_CONTROLLER", "") or "Bridge")


def receipt_message(receipt: dict[str, Any]) -> bytes:
    """The bytes a receipt's signature covers: every field but the signature."""
    unsigned = {key: value for key, value in receipt.items() if key != "signature"}
    return RECEIPT_CONTEXT + canonical_json(unsigned).encode("utf-8")


def consent_receipt(*, subject_id: str, context: AuditContext) -> dict[str, Any] | None:
    """A consent receipt for the subject (after the Kantara Initiative's Consent Receipt
    v1.1 fields), signed with the audit signing key; None when nothing was ever recorded.

    Per purpose: the state, when it began and last changed, the notice version and hash it was
    given against, and every event's time. The notices named are listed with their hashes, so
    the subject can check the text they were shown. Audited (gdpr.consent.receipt).
    """
    from security.keys import audit_signing_key

    check_subject_id(subject_id)
    events = list(ConsentEvent.objects.filter(subject_id=subject_id).order_by("id"))
    if not events:
        return None
    state = project(events)
    asked = [purpose for purpose in state if state[purpose]["since"] is not None]
    versions = sorted({event.notice_version for event in events})
    notices = {
        notice.version: notice
        for notice in PrivacyNotice.objects.filter(version__in=versions).only(
            "version", "sha256", "published_at"
        )
    }
    now = timezone.now()
    receipt: dict[str, Any] = {
        "version": RECEIPT_VERSION,
        "jurisdiction": "EU (GDPR)",
        "consent_receipt_id": str(uuid.uuid4()),
        "generated_at": iso(now),
        "consent_timestamp": iso(events[-1].occurred_at),
        "collection_method": events[-1].method,
        "subject": subject_id,
        "controller": controller_name(),
        "language": "en",
        "purposes": [
            {
                "purpose": purpose,
                "consent_type": "explicit",
                "granted": state[purpose]["granted"],
                "since": iso(state[purpose]["since"]),
                "updated_at": iso(state[purpose]["updated_at"]),
                "notice_version": state[purpose]["notice_version"],
                "notice_sha256": state[purpose]["notice_sha256"],
                "method": state[purpose]["method"],
                "channel": state[purpose]["channel"],
                "events": [
                    {
                        "granted": event.granted,
                        "at": iso(event.occurred_at),
                        "notice_version": event.notice_version,
                        "method": event.method,
                    }
                    for event in events
                    if event.purpose == purpose
                ],
            }
            for purpose in asked
        ],
        "notices": [
            {
                "version": version,
                "sha256": notices[version].sha256 if version in notices else None,
                "published_at": iso(notices[version].published_at) if version in notices else None,
            }
            for version in versions
        ],
    }
    key = audit_signing_key()
    signature = key.private.sign(receipt_message(receipt))
    receipt["signature"] = {
        "algorithm": "Ed25519",
        "key_id": key.key_id,
        "context": RECEIPT_CONTEXT.decode("ascii").strip(),
        "value": base64.b64encode(signature).decode("ascii"),
    }
    record_event(
        action=AuditAction.CONSENT_RECEIPT,
        context=context,
        object_type="compliance.consentevent",
        object_id=events[-1].pk,
        details={
            "subject_id": subject_id,
            "consent_receipt_id": receipt["consent_receipt_id"],
            "purposes": asked,
        },
    )
    return receipt
