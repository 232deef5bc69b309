"""Key rotation services: re-wrap every data key under the current master key, start new data
key versions, and re-encrypt stored values under them in a background job with progress.

Old data stays readable throughout: a data key is re-wrapped in place (its id, and so every
ciphertext naming it, is unchanged), old data key versions are kept, and processes accept the
previous master key (BRIDGE_MASTER_KEY_PREVIOUS) until the re-wrap has committed.

Order for a new master key: set BRIDGE_MASTER_KEY to the new key and BRIDGE_MASTER_KEY_PREVIOUS
to the old one everywhere, restart, run `manage.py rotate_keys`, then drop the previous key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import Max

from bridge.jobs import Progress, start_job
from bridge.models import Job
from compliance import approvals
from compliance.audit import AuditContext, record_event
from compliance.choices import ApprovalAction, AuditAction
from compliance.models import ApprovalRequest
from security import crypto
from security.choices import REENCRYPT_JOB_KIND
from security.fields import EncryptedTextField, encrypted_fields
from security.models import DataKey, SubjectKey

log = logging.getLogger(__name__)

_BATCH = 500

# Keys that other apps keep in their own rows (a backup's data key): each hook re-wraps its
# rows under the current master inside rotate_keys' transaction and returns how many it did.
REWRAP_HOOKS: list[Callable[[], int]] = []


def register_rewrap(hook: Callable[[], int]) -> Callable[[], int]:
    REWRAP_HOOKS.append(hook)
    return hook


def rotate_keys(
    *,
    context: AuditContext,
    new_data_keys: bool = True,
    enqueue: bool = True,
    approval: ApprovalRequest | None = None,
) -> dict[str, Any]:
    """Re-wrap every live data key under the current master key and (by default) start a new
    version of every purpose key; then a job re-encrypts stored values under the new versions.

    One transaction: a failure to unwrap any key (a master key this process lacks) rolls it all
    back and names the key, so the table never holds a mix made by a half-finished rotation.
    With SOX_REQUIRE_SECOND_APPROVAL on it needs `approval` (an approved request by a second
    user, compliance/approvals.py), else approvals.ApprovalRequired is raised.
    """
    approval_id = approvals.authorise(
        ApprovalAction.KEY_ROTATION, approval, new_data_keys=new_data_keys
    )
    master_id, _ = crypto.master_key()
    keyring = crypto.master_keys()
    with transaction.atomic():
        rows = [
            row
            for model in (DataKey, SubjectKey)
            for row in model.objects.select_for_update()
            .filter(destroyed_at__isnull=True)
            .exclude(wrapped="")
            .order_by("pk")
        ]
        rewrapped = 0
        for row in rows:
            if row.master_key_id == master_id:
                continue
            if row.master_key_id not in keyring:
                raise crypto.CryptoError(
                    f"data key {row.key_id} is wrapped by master key {row.master_key_id}, which "
                    "is neither BRIDGE_MASTER_KEY nor in BRIDGE_MASTER_KEY_PREVIOUS"
                )
            key = crypto._unwrap(row)
            row.master_key_id, row.wrapped = crypto.wrap(
                key_id=row.key_id, purpose=row.purpose, subject_id=row.subject_id, key=key
            )
            row.save(update_fields=["master_key_id", "wrapped"])
            rewrapped += 1
        for hook in REWRAP_HOOKS:
            rewrapped += hook()
        created = []
        if new_data_keys:
            purposes = (
                DataKey.objects.filter(subject_id="")
                .values("purpose")
                .annotate(top=Max("version"))
                .order_by("purpose")
            )
            for item in purposes:
                fresh = crypto._new_key(
                    purpose=item["purpose"], subject_id="", version=item["top"] + 1
                )
                created.append(fresh.key_id)
        summary = {
            "master_key_id": master_id,
            "data_keys": len(rows),
            "rewrapped": rewrapped,
            "new_data_keys": created,
        }
        job = start_job(
            kind=REENCRYPT_JOB_KIND,
            context=context,
            params={"after": "rotate_keys"},
            enqueue=enqueue,
        )
        summary["job_id"] = job.pk
        record_event(
            action=AuditAction.KEYS_ROTATED,
            context=context,
            object_type="security.datakey",
            object_id=master_id,
            details={
                **summary,
                "approval": approval_id,
                "second_approval_required": approvals.requires_approval(
                    ApprovalAction.KEY_ROTATION
                ),
            },
        )
    crypto.forget_keys()
    log.warning(
        "data keys rotated: %d re-wrapped under %s, %d new version(s); re-encryption job %s",
        rewrapped,
        master_id,
        len(created),
        job.pk,
    )
    return summary


def rotate_approved(approval: ApprovalRequest, context: AuditContext) -> dict[str, Any]:
    """Carry out an approved key rotation (the executor compliance.approvals calls, in the
    approval's transaction); the re-encryption job is queued once that commits."""
    summary = rotate_keys(
        context=context,
        new_data_keys=bool(approval.params.get("new_data_keys", True)),
        approval=approval,
    )
    return {
        "job_id": summary["job_id"],
        "master_key_id": summary["master_key_id"],
        "rewrapped": summary["rewrapped"],
        "new_data_keys": summary["new_data_keys"],
    }


def _current_ids() -> dict[str, str]:
    """The current key id of every purpose (subject keys are not versioned by rotation)."""
    current: dict[str, tuple[int, str]] = {}
    for purpose, version, key_id in DataKey.objects.filter(
        subject_id="", destroyed_at__isnull=True
    ).values_list("purpose", "version", "key_id"):
        if purpose not in current or version > current[purpose][0]:
            current[purpose] = (version, key_id)
    return {purpose: key_id for purpose, (_, key_id) in current.items()}


def _reencrypt_field(
    field: EncryptedTextField, current: str | None, progress: Progress, counts: dict[str, int]
) -> None:
    model = field.model
    only = {model._meta.pk.attname, field.attname}
    if field.row_key:
        only.add(field.row_key)
    rows = model._base_manager.filter(**{f"{field.attname}__isnull": False}).only(*only)
    last = None
    while True:
        page = rows.order_by("pk")
        if last is not None:
            page = page.filter(pk__gt=last)
        batch = list(page[:_BATCH])
        if not batch:
            return
        for instance in batch:
            last = instance.pk
            sealed = field.sealed_value(instance)
            counts["done"] += 1
            if sealed is None:
                continue
            try:
                if current is not None and crypto.key_id_of(sealed) == current:
                    counts["current"] += 1
                    continue
                plaintext = getattr(instance, field.attname)
                fresh = crypto.encrypt(
                    plaintext.encode(),
                    purpose=field.purpose,
                    context=field.context_for(instance),
                )
            except crypto.CryptoError as exc:
                counts["failed"] += 1
                log.error(
                    "re-encryption: %s row %s field %s does not decrypt: %s",
                    model._meta.label,
                    instance.pk,
                    field.name,
                    exc,
                )
                continue
            # Compare-and-swap: a value someone changed meanwhile is theirs, not overwritten.
            updated = model._base_manager.filter(pk=instance.pk, **{field.attname: sealed}).update(
                **{field.attname: fresh}
            )
            counts["reencrypted" if updated else "changed_meanwhile"] += 1
        progress.update(counts["done"], counts["total"])


def reencrypt_job(job: Job, progress: Progress) -> dict[str, Any]:
    """Re-encrypt every encrypted field's values not under their purpose's current key."""
    crypto.forget_keys()  # the current versions are the ones in the database now
    current = _current_ids()
    fields = encrypted_fields()
    counts = {
        "total": sum(
            field.model._base_manager.filter(**{f"{field.attname}__isnull": False}).count()
            for field in fields
        ),
        "done": 0,
        "current": 0,
        "reencrypted": 0,
        "changed_meanwhile": 0,
        "failed": 0,
    }
    progress.update(0, counts["total"])
    for field in fields:
        _reencrypt_field(field, current.get(field.purpose), progress, counts)
    progress.update(counts["done"], counts["total"])
    result = {key: value for key, value in counts.items() if key != "done"}
    if counts["failed"]:
        # Every other value was done; the job still fails, loudly, naming how many.
        raise crypto.CryptoError(
            f"{counts['failed']} stored value(s) did not decrypt and were left as they are "
            f"(see the log for model, row and field); {counts['reencrypted']} re-encrypted"
        )
    return result
