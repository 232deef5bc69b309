"""Compliance services the API, the console and the scheduler call.

The audit trail's machinery is split by responsibility: `redaction` (what must never be
stored), `audit` (recording, the helper every app calls), `chain` (sealing) and
`verification` (checking). This module holds the operations people ask for.
"""

from __future__ import annotations

from compliance.audit import AuditContext, record_event
from compliance.choices import CUSTOM_ACTION_PREFIX
from compliance.models import AuditEvent


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
