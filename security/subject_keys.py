"""The subject keys' own backup: database dumps leave their table out (crypto.SUBJECT_KEY_TABLES),
so a shredded key cannot return with a restored dump; this short-lived backup lets a restore
find every living subject's key.

A backup file holds the keys as stored: wrapped under the master key, never in the clear, so
the file alone opens nothing. Destroyed keys are not in it. Files older than
SUBJECT_KEY_BACKUP_RETENTION_DAYS (under 28 days) are deleted at each backup, so a key shredded
for an erasure has left every copy within the one-month deadline.

Restoring adds the keys the table lacks; a key the table holds as destroyed stays destroyed.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from security.models import SubjectKey

FORMAT = "bridge.subject-keys.v1"
_FIELDS = ("key_id", "purpose", "subject_id", "version", "master_key_id", "wrapped")


class KeyBackupError(ValueError):
    pass


def _directory() -> Path:
    path = Path(settings.SUBJECT_KEY_BACKUP_DIR)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def backup_subject_keys(*, context: AuditContext) -> dict[str, Any]:
    """Write every living subject key (wrapped) to a new file; delete files past retention."""
    now = timezone.now()
    keys = [
        {**{name: getattr(row, name) for name in _FIELDS}, "created_at": row.created_at.isoformat()}
        for row in SubjectKey.objects.filter(destroyed_at__isnull=True).order_by("pk")
    ]
    body = json.dumps(
        {"format": FORMAT, "taken_at": now.isoformat(), "keys": keys}, sort_keys=True
    ).encode()
    directory = _directory()
    path = directory / f"subject-keys-{now:%Y%m%dT%H%M%S%fZ}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # never a half-written backup under the real name
    finally:
        tmp.unlink(missing_ok=True)
    pruned = prune_backups(now=now)
    summary = {
        "file": path.name,
        "keys": len(keys),
        "sha256": hashlib.sha256(body).hexdigest(),
        "pruned": pruned,
    }
    record_event(
        action=AuditAction.SUBJECT_KEYS_BACKED_UP,
        context=context,
        object_type="security.subjectkey",
        object_id=path.name,
        details=summary,
    )
    return summary


def prune_backups(*, now: Any = None) -> list[str]:
    """Delete key backups older than the retention; returns their names."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.SUBJECT_KEY_BACKUP_RETENTION_DAYS)
    gone = []
    for path in sorted(_directory().glob("subject-keys-*.json")):
        taken = path.stat().st_mtime
        if taken < cutoff.timestamp():
            path.unlink()
            gone.append(path.name)
    return gone


def restore_subject_keys(*, path: Path, context: AuditContext) -> dict[str, int]:
    """Add the keys of a backup file that the table lacks; never revive a destroyed key."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyBackupError(f"{path}: not a readable key backup ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KeyBackupError(f"{path}: not a Bridge subject key backup ({FORMAT})")
    added = kept_destroyed = present = 0
    with transaction.atomic():
        known = dict(SubjectKey.objects.values_list("key_id", "destroyed_at"))
        for item in data["keys"]:
            if item["key_id"] in known:
                if known[item["key_id"]] is not None:
                    kept_destroyed += 1
                else:
                    present += 1
                continue
            SubjectKey.objects.create(
                **{name: item[name] for name in _FIELDS},
                created_at=parse_datetime(item["created_at"]),
            )
            added += 1
        summary = {"added": added, "present": present, "kept_destroyed": kept_destroyed}
        record_event(
            action=AuditAction.SUBJECT_KEYS_RESTORED,
            context=context,
            object_type="security.subjectkey",
            object_id=Path(path).name,
            details=summary,
        )
    return summary
