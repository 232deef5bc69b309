"""Compliance services the API, the console and the scheduler call.

The audit trail's machinery is split by responsibility: `redaction` (what must never be
stored), `audit` (recording, the helper every app calls), `chain` (sealing) and
`verification` (checking). This module holds the operations people ask for.
"""

from __future__ import annotations

from compliance import proof
from compliance.audit import AuditContext, record_event
from compliance.choices import CUSTOM_ACTION_PREFIX
from compliance.models import AuditEvent
from security.choices import KeyPurpose


def log_custom_event(
    *,
    context: AuditContext,
    name: str,
    object_type: str = "",
    object_id: str = "",
    details: dict | None = None,
) -> AuditEvent:
    """Record an event an operator or integration asked for (`POST /api/compliance/audit/log`).

    Custom events live under `custom.` so that no client can forge one of Bridge's own actions.
    """
    event_id = record_event(
        action=f"{CUSTOM_ACTION_PREFIX}{name}",
        context=context,
        object_type=object_type,
        object_id=object_id,
        details=details,
    )
    return AuditEvent.objects.select_related("seal").get(pk=event_id)


def public_keys() -> dict:
    """The audit signing key now in use, every earlier one and the rotation records linking
    them: what an auditor pins for `python -m compliance.verify_export`."""
    from security.keys import audit_signing_key, rotation_records
    from security.models import SigningKey

    current = audit_signing_key()
    rows = SigningKey.objects.filter(purpose=KeyPurpose.AUDIT_SIGNING).order_by("created_at", "id")
    return {
        "algorithm": "Ed25519",
        "key_id": current.key_id,
        "public_key": proof.public_key_text(current.public),
        "public_key_pem": proof.public_key_pem(current.public),
        "keys": [
            {
                "key_id": row.key_id,
                "public_key": row.public_key,
                "public_key_pem": _pem_or_note(row.public_key),
                "created_at": row.created_at,
                "retired_at": row.retired_at,
                "current": row.key_id == current.key_id,
            }
            for row in rows
        ],
        "rotations": rotation_records(),
    }


def _pem_or_note(text: str) -> str:
    try:
        return proof.public_key_pem(proof.load_public_key(text))
    except (ValueError, TypeError):
        return "(not a public key: this row was altered)"
