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
from compliance.checkpoints import all_copies, signed_by, sink_rotations
from compliance.choices import AuditAction
from compliance.models import AuditSeal
from compliance.retention import kept_floor
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


def _base_checkpoint(first_seq: int) -> dict | None:
    """The newest checkpoint in a sink, signed by a trusted key, that signs a seq before the
    range: the export starts right after it, so its signed hash anchors the range's start."""
    from security.keys import trusted_keys

    sinks = configured_sinks()
    ring = trusted_keys(sink_rotations(sinks))
    base = None
    for copy in all_copies(sinks, []):
        record = copy.record
        if copy.source == proof.DATABASE or not isinstance(record, dict):
            continue
        if record.get("number") != copy.number or not signed_by(record, ring):
            continue
        if isinstance(record.get("seq"), int) and record["seq"] < first_seq:
            base = record
    return base


def _checkpoint_signing(seq: int) -> dict | None:
    """The first checkpoint in a sink, signed by a trusted key, that signs the hash at `seq`,
    as its own seq or as a waypoint (where a retention purge cut the chain)."""
    from security.keys import trusted_keys

    sinks = configured_sinks()
    ring = trusted_keys(sink_rotations(sinks))
    for copy in all_copies(sinks, []):
        record = copy.record
        if copy.source == proof.DATABASE or not isinstance(record, dict):
            continue
        if record.get("number") != copy.number or not signed_by(record, ring):
            continue
        points = record.get("waypoints") or []
        if record.get("seq") == seq or any(isinstance(p, list) and p[:1] == [seq] for p in points):
            return record
    return None


def _copies_from(
    base_number: int, end: datetime | None
) -> Callable[[], Iterator[proof.CheckpointCopy]]:
    """The copies from the base checkpoint on, made before `end` (checkpoint times only grow
    with their numbers)."""
    limit = iso(end) if end is not None else None
    sinks = configured_sinks()

    def selected() -> Iterator[proof.CheckpointCopy]:
        for copy in all_copies(sinks, []):
            if copy.number < base_number:
                continue
            record = copy.record if isinstance(copy.record, dict) else {}
            if record.get("number") != copy.number:
                continue  # a row holding another number's record: Bridge's check reports it
            if limit is not None and str(record.get("time", "")) >= limit:
                continue
            yield copy

    return selected


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
    floor = kept_floor()
    first_seq = max(first_seq, floor)
    if first_seq > 1:
        # Start right after the last signed checkpoint before the range (from the first event
        # when there is none): the verifier begins at its signed hash, trusting nothing else.
        base = _base_checkpoint(first_seq)
        first_seq = base["seq"] + 1 if base else 1
        if first_seq < floor:
            # The events before `floor` were purged (compliance.retention): start where the
            # purge cut the chain, at the hash a checkpoint signs there (its own or a waypoint).
            base, first_seq = _checkpoint_signing(floor - 1), floor
    else:
        base = None
    first_checkpoint = base["number"] if base else 1
    copies = _copies_from(first_checkpoint, end)
    total = max(0, last_seq - first_seq + 1)
    sinks = configured_sinks()
    rotations: dict[str, dict] = {}
    for record in [*rotation_records(), *sink_rotations(sinks)]:
        if isinstance(record, dict):
            rotations.setdefault(proof.canonical_json(record), record)
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
                        "written_to": list(copy.written_to),
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
