"""Exporting the audit trail for offline verification (`manage.py export_audit`).

An export is JSON lines, streamed in constant memory: a header, the key rotation records, every
copy of the checkpoints that anchor the range (from the sinks and the database, each marked with
where it came from), the sealed events in seq order, each with its seal and the exact canonical
JSON its hash covers (`proof.event_line`), and an end line with the counts, so a cut-off file is
told from a complete one. `python -m compliance.verify_export`
checks it with nothing but the standard library and `cryptography`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.utils import timezone

from compliance import proof
from compliance.audit import AuditContext, iso, record_event
from compliance.chain import chain_head
from compliance.checkpoints import database_copies
from compliance.choices import AuditAction
from compliance.models import AuditSeal
from compliance.sinks import configured_sinks
from compliance.verification import PROGRESS_EVERY, canonical_rows

FORMAT = "bridge-audit-export"


@dataclass(frozen=True)
class ExportSummary:
    path: str
    first_seq: int | None
    last_seq: int | None
    events: int
    checkpoint_copies: int
    rotations: int
    bytes: int
    sha256: str


def _seq_bounds(start: datetime | None, end: datetime | None) -> tuple[int, int]:
    """The contiguous seq range holding the events that occurred in [start, end)."""
    head = chain_head()
    head_seq = head.last_seq if head else 0
    seals = AuditSeal.objects.filter(seq__lte=head_seq)
    first, last = 1, head_seq
    if start is not None:
        found = seals.filter(event__occurred_at__gte=start).order_by("seq").first()
        first = found.seq if found else head_seq + 1
    if end is not None:
        found = seals.filter(event__occurred_at__lt=end).order_by("-seq").first()
        last = found.seq if found else 0
    return first, last


def _copies_in_range(
    first_seq: int, end: datetime | None
) -> tuple[int | None, Callable[[], Iterator[proof.CheckpointCopy]]]:
    """The checkpoint copies an export of `first_seq..` carries: from the last checkpoint
    before the range (its signature links the next) to the last made before `end`."""
    sinks = configured_sinks()

    def every() -> Iterator[proof.CheckpointCopy]:
        return proof.merge_by_number(*(sink.copies() for sink in sinks), database_copies())

    base = None
    for copy in every():
        seq = copy.record.get("seq")
        if isinstance(seq, int) and seq < first_seq:
            base = copy.number
    limit = iso(end) if end is not None else None

    def selected() -> Iterator[proof.CheckpointCopy]:
        for copy in every():
            if base is not None and copy.number < base:
                continue
            if limit is not None and str(copy.record.get("time", "")) >= limit:
                continue
            yield copy

    return (base if base is not None else 1), selected


def export_audit(
    *,
    out: Path,
    start: datetime | None,
    end: datetime | None,
    context: AuditContext,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write the export to `out` (a temporary file beside it, renamed once complete)."""
    from security.keys import rotation_records

    out = Path(out)
    first_seq, last_seq = _seq_bounds(start, end)
    total = max(0, last_seq - first_seq + 1)
    sinks = configured_sinks()
    rotations: dict[str, dict] = {}
    for record in [*rotation_records(), *(r for sink in sinks for r in sink.rotations())]:
        rotations.setdefault(proof.canonical_json(record), record)
    first_checkpoint, copies = _copies_in_range(first_seq, end)
    digest = hashlib.sha256()
    size = events = copy_count = 0
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:

            def write(item: dict) -> None:
                nonlocal size
                data = (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
                handle.write(data)
                digest.update(data)
                size += len(data)

            write(
                {
                    "type": "export",
                    "format": FORMAT,
                    "version": 1,
                    "created_at": iso(timezone.now()),
                    "from": iso(start) if start else None,
                    "to": iso(end) if end else None,
                    "first_seq": first_seq if total else None,
                    "last_seq": last_seq if total else None,
                    "first_checkpoint": first_checkpoint,
                    "sinks": [sink.name for sink in sinks],
                }
            )
            for record in rotations.values():
                write(record)
            for copy in copies():
                copy_count += 1
                write(
                    {
                        "type": "checkpoint_copy",
                        "source": copy.source,
                        "published": copy.published,
                        "record": copy.record,
                    }
                )
            if total:
                for seq, prev, hash_, version, _, text in canonical_rows(
                    last_seq, after_seq=first_seq - 1
                ):
                    data = proof.event_line(seq, prev, hash_, version, text or "null").encode()
                    handle.write(data)
                    digest.update(data)
                    size += len(data)
                    events += 1
                    if on_progress and events % PROGRESS_EVERY == 0:
                        on_progress(events, total)
            write({"type": "end", "events": events, "checkpoint_copies": copy_count})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if on_progress:
        on_progress(events, total)
    summary = ExportSummary(
        str(out),
        first_seq if total else None,
        last_seq if total else None,
        events,
        copy_count,
        len(rotations),
        size,
        digest.hexdigest(),
    )
    record_event(
        action=AuditAction.AUDIT_EXPORTED,
        context=context,
        object_type="compliance.auditevent",
        details={
            "from": iso(start) if start else None,
            "to": iso(end) if end else None,
            "first_seq": summary.first_seq,
            "last_seq": summary.last_seq,
            "events": events,
            "checkpoint_copies": copy_count,
            "sha256": summary.sha256,
        },
    )
    return summary
