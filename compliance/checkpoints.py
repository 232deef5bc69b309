"""Signed checkpoints: the chain's state, signed with a key outside the database and written
to sinks outside it, so that even a database superuser cannot rewrite or cut the trail
unnoticed (AWS CloudTrail's signed digest files are the model).

Every AUDIT_CHECKPOINT_INTERVAL, and at every verification, a checkpoint signs the newest
sealed seq and hash, the hashes at up to AUDIT_CHECKPOINT_WAYPOINTS seqs since the previous
checkpoint, the event count, the time, the key id and the previous checkpoint's signature.
Before signing, the new range is walked from the previous checkpoint's hash, so a checkpoint
never vouches for a chain that does not connect to what was signed before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from compliance import proof
from compliance.audit import AuditContext, iso, record_event
from compliance.chain import chain_head
from compliance.choices import AuditAction, CheckpointStatus
from compliance.models import AuditCheckpoint
from compliance.redaction import redact_text
from compliance.sinks import CheckpointSink, SinkError, configured_sinks

log = logging.getLogger(__name__)

# pg_advisory_lock key of the checkpointer ("BRIDGECP" as a number).
_LOCK_KEY = 0x4252494447454350 & 0x7FFFFFFFFFFFFFFF


class CheckpointRefused(Exception):
    """The new range does not connect to the last checkpoint: nothing was signed."""

    def __init__(self, problem: proof.Problem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


def rotations_to_publish(sinks: list[CheckpointSink]) -> list[dict]:
    """The rotation records a trusted key vouches for (an insider's row goes nowhere)."""
    from security.keys import rotation_records, trusted_keys

    ring = trusted_keys(sink_rotations(sinks))
    accepted = []
    for record in rotation_records():
        if ring.keys.get(record.get("new_key_id")) and ring.keys.get(record.get("old_key_id")):
            accepted.append(record)
    return accepted


def _unverified(checkpoint: AuditCheckpoint, ring: proof.KeyRing | None = None) -> str | None:
    """Why Bridge's copy of a checkpoint is not one Bridge signed (None: it is)."""
    from security.keys import trusted_keys

    try:
        record = checkpoint.record_data
    except ValueError:
        return "its record is not JSON"
    if not isinstance(record, dict):
        return "its record is not a checkpoint"
    ring = ring or trusted_keys(sink_rotations(configured_sinks()))
    key_id = record.get("key_id")
    key = ring.keys.get(key_id) if isinstance(key_id, str) else None
    if key is None:
        return f"it is signed by key {key_id!r}, which is not trusted"
    try:
        message = proof.checkpoint_message(record)
    except (TypeError, ValueError):
        return "its record is not canonical JSON"
    if not proof.verifies(key, record.get("signature"), message):
        return "its signature does not verify"
    signed = (record.get("number"), record.get("seq"), record.get("hash"), record.get("signature"))
    if signed != (checkpoint.number, checkpoint.seq, checkpoint.hash, checkpoint.signature):
        return "its columns differ from its signed record"
    return None


def _publish(
    checkpoint: AuditCheckpoint, sinks: list[CheckpointSink], blocked: set[str] | None = None
) -> bool:
    """Write one checkpoint to every sink that lacks it; True once all hold it. A sink in
    `blocked` (an earlier checkpoint failed there) is not written: each sink holds an unbroken
    run of numbers, so a gap in one is always news."""
    blocked = blocked if blocked is not None else set()
    wrong = _unverified(checkpoint)
    if wrong:
        # Bridge never signs what it publishes; a row that does not verify was not written
        # by Bridge, and goes nowhere.
        refused = AuditCheckpoint.objects.filter(
            pk=checkpoint.pk, status=CheckpointStatus.PENDING
        ).update(status=CheckpointStatus.REFUSED, last_error=wrong)
        if refused:
            record_event(
                action=AuditAction.CHECKPOINT_REFUSED,
                context=AuditContext.system(),
                object_type="compliance.auditcheckpoint",
                object_id=checkpoint.pk,
                details={"number": checkpoint.number, "key_id": checkpoint.key_id, "why": wrong},
            )
            log.error("AUDIT CHECKPOINT #%s REFUSED: %s", checkpoint.number, wrong)
        return False
    record = checkpoint.record_data
    written = list(checkpoint.sinks_written)
    errors = []
    rotations = rotations_to_publish(sinks)
    for sink in sinks:
        if sink.name in written:
            continue
        if sink.name in blocked:
            errors.append(f"sink {sink.name}: waits for an earlier checkpoint")
            continue
        try:
            sink.ensure_rotations(rotations)
            sink.append(record)
        except Exception as exc:  # any backend's error: reported, retried, never lost
            errors.append(redact_text(str(exc)))
            blocked.add(sink.name)
            continue
        written.append(sink.name)
    done = all(sink.name in written for sink in sinks)
    changed = AuditCheckpoint.objects.filter(
        pk=checkpoint.pk, status=CheckpointStatus.PENDING
    ).update(
        sinks_written=written,
        attempts=checkpoint.attempts + 1,
        last_error="; ".join(errors),
        status=CheckpointStatus.PUBLISHED if done else CheckpointStatus.PENDING,
        published_at=timezone.now() if done else None,
    )
    failing_before = (
        AuditCheckpoint.objects.filter(
            status=CheckpointStatus.PENDING, number__lt=checkpoint.number
        )
        .exclude(last_error="")
        .exists()
    )
    if errors and changed and checkpoint.attempts == 0 and not failing_before:
        # Once per outage: the checkpoint is retried every interval, later ones queue behind it,
        # and readiness shows it meanwhile.
        record_event(
            action=AuditAction.CHECKPOINT_FAILED,
            context=AuditContext.system(),
            object_type="compliance.auditcheckpoint",
            object_id=checkpoint.pk,
            details={"number": checkpoint.number, "errors": errors},
        )
    if errors:
        log.error("AUDIT CHECKPOINT #%s not written: %s", checkpoint.number, "; ".join(errors))
    return done


def publish_pending(sinks: list[CheckpointSink] | None = None) -> int:
    """Retry every checkpoint not yet in every sink, oldest first; returns how many remain."""
    sinks = sinks if sinks is not None else configured_sinks()
    remaining = 0
    blocked: set[str] = set()
    pending = AuditCheckpoint.objects.filter(status=CheckpointStatus.PENDING).order_by("number")
    for checkpoint in pending:
        if not _publish(checkpoint, sinks, blocked):
            remaining += 1
    return remaining


def _noting(rows: Iterator[tuple], wanted: set[int], out: list[list]) -> Iterator[tuple]:
    """The rows, noting [seq, hash] of those whose seq is wanted (rows start seq, prev, hash)."""
    for row in rows:
        if row[0] in wanted:
            out.append([row[0], row[2]])
        yield row


def _refuse(problem: proof.Problem) -> None:
    record_event(
        action=AuditAction.CHECKPOINT_NOT_SIGNED,
        context=AuditContext.system(),
        object_type="compliance.auditchainhead",
        object_id=1,
        details={"seq": problem.seq, "reason": problem.reason},
    )
    log.error("AUDIT CHECKPOINT NOT SIGNED at seq %s: %s", problem.seq, problem.reason)
    raise CheckpointRefused(problem)


def make_checkpoint(*, force: bool = False) -> AuditCheckpoint | None:
    """Sign the chain's newest sealed state and write it to every sink.

    Nothing is signed when the chain has not moved since the last checkpoint (unless
    `force`), or when its new range does not connect to the last checkpoint's hash
    (CheckpointRefused, recorded as `audit.checkpoint_not_signed`). Two callers at once: one
    wins the number, the other returns None.
    """
    with _checkpointer_lock() as mine:
        if not mine:
            return None  # another process is making one now
        return _make_checkpoint(force=force)


@contextmanager
def _checkpointer_lock() -> Iterator[bool]:
    """One checkpointer at a time across every process (a PostgreSQL advisory lock; SQLite
    serialises writers anyway): numbers are then made and written in order."""
    if connection.vendor != "postgresql":
        yield True
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [_LOCK_KEY])
        mine = bool(cursor.fetchone()[0])
    try:
        yield mine
    finally:
        if mine:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])


def _newest_in_sinks(sinks: list[CheckpointSink], ring: proof.KeyRing) -> dict | None:
    """The newest checkpoint any sink holds with a good signature."""
    newest = None
    for sink in sinks:
        try:
            record = sink.newest(lambda item: signed_by(item, ring))
        except Exception as exc:  # an unreadable sink: publishing reports it
            log.warning("sink %s cannot be read: %s", sink.name, redact_text(str(exc)))
            continue
        if record is not None and (newest is None or record["number"] > newest["number"]):
            newest = record
    return newest


def signed_by(record: dict, ring: proof.KeyRing) -> bool:
    key_id = record.get("key_id")
    key = ring.keys.get(key_id) if isinstance(key_id, str) else None
    try:
        return key is not None and proof.verifies(
            key, record.get("signature"), proof.checkpoint_message(record)
        )
    except (TypeError, ValueError):
        return False


def _make_checkpoint(*, force: bool) -> AuditCheckpoint | None:
    from compliance.verification import walk_of
    from security.keys import audit_signing_key, trusted_keys

    sinks = configured_sinks()
    publish_pending(sinks)
    head = chain_head()
    if head is None or head.last_seq == 0:
        return None
    seq, hash_ = head.last_seq, head.last_hash
    last = AuditCheckpoint.objects.order_by("-number").first()
    wrong = _unverified(last) if last else None
    if wrong:
        # An insider's row: chaining from it would make every later checkpoint a lie.
        _refuse(proof.Problem(f"the newest checkpoint in the database (#{last.number}): {wrong}"))
    held = _newest_in_sinks(sinks, trusted_keys(sink_rotations(sinks)))
    if held is not None and (last is None or last.number < held["number"]):
        # The sinks hold a newer checkpoint than the database: rows were deleted. Signing on
        # would put a second, different checkpoint of that number beside the real one.
        _refuse(
            proof.Problem(
                f"a sink holds checkpoint #{held['number']}, the database only "
                f"#{last.number if last else 0}: checkpoint rows were deleted"
            )
        )
    if held is not None and last.number == held["number"] and last.signature != held["signature"]:
        _refuse(proof.Problem(f"checkpoint #{last.number} differs from the sink's copy"))
    previous_seq = last.seq if last else 0
    if last and last.seq >= seq and not force:
        return None
    wanted = set(proof.waypoint_seqs(previous_seq, seq, settings.AUDIT_CHECKPOINT_WAYPOINTS))
    waypoints: list[list] = []
    walker, rows = walk_of(
        seq, after_seq=previous_seq, start_hash=last.hash if last else proof.GENESIS_HASH
    )
    problem = walker.walk(_noting(rows, wanted, waypoints))
    problem = problem or (
        None
        if walker.last_hash == hash_ and walker.last_seq == seq
        else proof.Problem(f"the chain does not reach its head at seq {seq}", seq=seq)
    )
    if problem:
        _refuse(problem)
    key = audit_signing_key()
    # Never before the previous one (hosts' clocks differ): numbers and times then agree, and
    # so do the sinks' day files.
    now = (
        max(timezone.now(), last.created_at + timedelta(microseconds=1)) if last else timezone.now()
    )
    number = (last.number if last else 0) + 1
    record = key.sign_checkpoint(
        {
            "v": 1,
            "number": number,
            "seq": seq,
            "hash": hash_,
            "events": seq - previous_seq,
            "time": iso(now),
            "prev_signature": last.signature if last else "",
            "waypoints": waypoints,
        }
    )
    try:
        with transaction.atomic():
            checkpoint = AuditCheckpoint.objects.create(
                number=number,
                seq=seq,
                hash=hash_,
                created_at=now,
                key_id=key.key_id,
                signature=record["signature"],
                record=proof.canonical_json(record),
            )
    except IntegrityError:
        return None
    _publish(checkpoint, sinks)
    checkpoint.refresh_from_db()
    return checkpoint


# --- What verification reads --------------------------------------------------------------


def database_copies() -> Iterator[proof.CheckpointCopy]:
    rows = AuditCheckpoint.objects.order_by("number").values_list(
        "number", "record", "sinks_written"
    )
    for number, record, written in rows.iterator(chunk_size=500):
        try:
            data = json.loads(record)
        except ValueError:
            data = None  # reported as "not a checkpoint record"
        names = tuple(name for name in written or () if isinstance(name, str))
        yield proof.CheckpointCopy(number, data, proof.DATABASE, names)


def _readable(
    sink: CheckpointSink, problems: list[proof.Problem]
) -> Iterator[proof.CheckpointCopy]:
    """A sink's copies; a sink that cannot be read is a problem, not a crash."""
    try:
        yield from sink.copies()
    except (SinkError, OSError, ValueError) as exc:
        problems.append(proof.Problem(f"sink {sink.name} cannot be read: {exc}"))


def sink_rotations(sinks: list[CheckpointSink]) -> list[dict]:
    found = []
    for sink in sinks:
        try:
            found.extend(sink.rotations())
        except (SinkError, OSError, ValueError):
            continue  # the copies' reading reports the sink
    return found


def all_copies(
    sinks: list[CheckpointSink], problems: list[proof.Problem]
) -> Iterator[proof.CheckpointCopy]:
    """Every copy of every checkpoint, sinks and database, as one stream sorted by number."""
    return proof.merge_by_number(*(_readable(sink, problems) for sink in sinks), database_copies())


def review_checkpoints(sinks: list[CheckpointSink] | None = None) -> proof.CheckpointReview:
    """Every copy of every checkpoint, in the sinks and the database, checked (see
    `proof.CheckpointReview`) against the keys Bridge trusts."""
    from security.keys import trusted_keys

    sinks = sinks if sinks is not None else configured_sinks()
    unreadable: list[proof.Problem] = []
    review = proof.CheckpointReview(
        lambda: all_copies(sinks, unreadable),
        sinks=[sink.name for sink in sinks],
        ring=trusted_keys(sink_rotations(sinks)),
    )
    seen = set()
    for problem in unreadable:  # each sink read twice: once checking, once anchoring
        if problem.reason not in seen:
            seen.add(problem.reason)
            review.problems.append(problem)
    for sink in sinks:
        review.problems.extend(proof.Problem(text) for text in dict.fromkeys(sink.problems))
    return review


# --- Health -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointHealth:
    ok: bool
    message: str
    newest: AuditCheckpoint | None
    pending: int
    failing: str


def checkpoint_health() -> CheckpointHealth:
    """Degraded when a checkpoint waits for a sink, or when sealed events have gone without a
    checkpoint for three intervals (the checkpointer is not running)."""
    newest = AuditCheckpoint.objects.filter(status=CheckpointStatus.PUBLISHED).first()
    pending = AuditCheckpoint.objects.filter(status=CheckpointStatus.PENDING)
    waiting = pending.count()
    failing = pending.exclude(last_error="").order_by("number").first()
    if failing is not None:
        message = f"checkpoint #{failing.number} not written: {failing.last_error}"
        return CheckpointHealth(False, message, newest, waiting, failing.last_error)
    refused = AuditCheckpoint.objects.filter(status=CheckpointStatus.REFUSED).first()
    if refused is not None:
        message = f"checkpoint #{refused.number} in the database does not verify (forged?)"
        return CheckpointHealth(False, message, newest, waiting, "")
    latest = AuditCheckpoint.objects.first()
    wrong = _unverified(latest) if latest else None
    if wrong:
        message = f"checkpoint #{latest.number} in the database: {wrong} (forged?)"
        return CheckpointHealth(False, message, newest, waiting, "")
    head = chain_head()
    limit = timedelta(seconds=3 * settings.AUDIT_CHECKPOINT_INTERVAL)
    behind = head is not None and head.last_seq > (newest.seq if newest else 0)
    since = newest.created_at if newest else (head.sealed_at if head else None)
    if behind and since is not None and timezone.now() - since > limit:
        age = (timezone.now() - since).total_seconds()
        message = f"no checkpoint of the newest sealed events for {age:.0f} s"
        return CheckpointHealth(False, message, newest, waiting, "")
    return CheckpointHealth(True, "", newest, waiting, "")
