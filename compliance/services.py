"""The audit trail: recording, sealing into a hash chain, verifying.

Recording is one INSERT in the caller's connection (inside the caller's transaction when there
is one), so an event is durable when the request or service that caused it commits. Sealing is
separate and serialized by a lock on the chain head: it links committed events in id order,
which means concurrent writers never contend on a lock and the chain can never fork.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.http import HttpRequest
from django.utils import timezone

from compliance.choices import (
    CUSTOM_ACTION_PREFIX,
    AuditAction,
    VerificationSource,
    VerificationStatus,
)
from compliance.models import AuditChainHead, AuditEvent, AuditSeal, AuditVerification
from security.ip import client_ip

log = logging.getLogger(__name__)

# The request being served, so events raised deep inside (admin LogEntry signals, services
# called without a request) still carry its client IP and request id.
current_request: ContextVar[HttpRequest | None] = ContextVar("current_request", default=None)

GENESIS_HASH = "0" * 64
# How far below the newest sealed id the sealer looks for events that committed late, and how
# often (an anti-join over that window: cheap once a minute, wasteful on every run).
STRAGGLER_WINDOW = 100_000
STRAGGLER_CHECK_SECONDS = 60
REDACTED = "[REDACTED]"
_SECRET_KEY_PATTERN = re.compile(
    r"pass|secret|token|key|plaintext|authorization|cookie|credential|refresh|access|signature"
    r"|otp|session",
    re.IGNORECASE,
)
_HASHED_FIELDS = (
    "id",
    "seq",
    "occurred_at",
    "actor_id",
    "actor_username",
    "client_ip",
    "request_id",
    "action",
    "object_type",
    "object_id",
    "method",
    "path",
    "status_code",
    "latency_ms",
    "details",
    "prev_hash",
)
_EVENT_FIELDS = tuple(name for name in _HASHED_FIELDS if name not in ("seq", "prev_hash"))
_INSERT_COLUMNS = (
    "occurred_at",
    "actor_id",
    "actor_username",
    "client_ip",
    "request_id",
    "action",
    "object_type",
    "object_id",
    "method",
    "path",
    "status_code",
    "latency_ms",
    "details",
)


def redact(value: Any) -> Any:
    """A copy of `value` with every secret-looking key's value replaced by [REDACTED]."""
    if isinstance(value, dict):
        return {
            str(key): REDACTED if _SECRET_KEY_PATTERN.search(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        # NaN and Infinity are not JSON: stored as text, they would break every reader.
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _clean_text(value: str | None, limit: int) -> str:
    # PostgreSQL text refuses NUL; a path or username is never legitimately longer than limit.
    return (value or "").replace("\x00", "\\x00")[:limit]


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(fields: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of an event's fields and its prev_hash."""
    payload = {name: fields[name] for name in _HASHED_FIELDS}
    payload["occurred_at"] = _iso(payload["occurred_at"])
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Actor:
    id: int | None
    username: str

    @classmethod
    def of(cls, user: Any) -> Actor:
        if user is None or not getattr(user, "is_authenticated", False):
            return cls(id=None, username="")
        return cls(id=user.pk, username=user.get_username())


@functools.cache
def _insert_sql(vendor: str) -> str:
    quote = connection.ops.quote_name
    columns = ", ".join(quote(column) for column in _INSERT_COLUMNS)
    marks = ", ".join(["%s"] * len(_INSERT_COLUMNS))
    # Only identifiers from our own model are interpolated; every value is a parameter.
    return (
        f"INSERT INTO {quote(AuditEvent._meta.db_table)} ({columns}) VALUES ({marks}) "  # noqa: S608
        f"RETURNING {quote('id')}"
    )


def record_event(**fields: Any) -> int:
    """Append one event (unsealed) and return its id; `fields` are `event_values`' keywords.

    Runs in the caller's transaction, so a service's change and its event commit together.
    Details are redacted here, whoever calls, so no caller can leak a secret into the trail.
    """
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(connection.vendor), event_values(**fields))
        return cursor.fetchone()[0]


def event_values(
    *,
    action: str,
    actor: Any = None,
    request: HttpRequest | None = None,
    object_type: str = "",
    object_id: str | int = "",
    method: str = "",
    path: str = "",
    status_code: int | None = None,
    latency_ms: float | None = None,
    details: dict | None = None,
    occurred_at: datetime | None = None,
) -> tuple:
    """The row `record_event` would insert, redacted and cleaned, in `_INSERT_COLUMNS` order."""
    who = actor if isinstance(actor, Actor) else Actor.of(actor)
    if request is None:
        request = current_request.get()
    return (
        connection.ops.adapt_datetimefield_value(occurred_at or timezone.now()),
        who.id,
        _clean_text(who.username, 150),
        client_ip(request) if request is not None else None,
        _clean_text(getattr(request, "request_id", ""), 64),
        _clean_text(action, 64),
        _clean_text(object_type, 100),
        _clean_text(str(object_id), 100),
        _clean_text(method, 10),
        _clean_text(path, 500),
        status_code,
        None if latency_ms is None else round(latency_ms, 3),
        _details_text(details),
    )


def _details_text(details: dict | None) -> str:
    try:
        return canonical_json(redact(details or {}))
    except RecursionError:
        return canonical_json({"unrecorded": "details nested too deeply"})


def insert_event_rows(rows: list[tuple]) -> None:
    """Insert many prepared rows in one statement (one round trip, one commit in autocommit)."""
    if len(rows) == 1:
        # The common case when idle or in a sync worker: skip execute_values' assembly.
        with connection.cursor() as cursor:
            cursor.execute(_insert_sql(connection.vendor), rows[0])
    else:
        _bulk_insert(AuditEvent, _INSERT_COLUMNS, rows)


def _bulk_insert(model: type, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """INSERT `rows` of `columns` into `model`'s table without building model instances (which
    cost the sealer more CPU than its hashing did)."""
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    names = ", ".join(quote(column) for column in columns)
    # Only identifiers from our own models are interpolated; every value is a parameter.
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            from psycopg2.extras import execute_values

            execute_values(
                cursor.cursor,
                f"INSERT INTO {table} ({names}) VALUES %s",  # noqa: S608
                rows,
                page_size=1000,
            )
        else:
            marks = ", ".join(["%s"] * len(columns))
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)  # noqa: S608


def log_custom_event(
    *,
    actor: Any,
    request: HttpRequest | None,
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
        actor=actor,
        request=request,
        object_type=object_type,
        object_id=object_id,
        details=details,
    )
    return AuditEvent.objects.get(pk=event_id)


def chain_head() -> AuditChainHead | None:
    """The chain head as last committed (None before the first migration made it)."""
    return AuditChainHead.objects.filter(pk=1).first()


def _head_for_update() -> AuditChainHead:
    head = AuditChainHead.objects.select_for_update().filter(pk=1).first()
    if head is None:
        AuditChainHead.objects.bulk_create(
            [AuditChainHead(pk=1, last_seq=0, last_hash=GENESIS_HASH)], ignore_conflicts=True
        )
        head = AuditChainHead.objects.select_for_update().get(pk=1)
    return head


def _pending(head: AuditChainHead, limit: int, sweep: bool) -> list[tuple]:
    """Committed events without a seal, oldest id first, as `_EVENT_FIELDS` tuples.

    New events have ids above the head's last sealed event: a primary-key range, cheap at any
    table size. An event whose transaction committed after a newer one was sealed (a
    straggler) sits below that id; the last STRAGGLER_WINDOW ids are searched for those once
    a minute, and the whole table when `sweep` is set (hourly, and `seal_audit_chain --sweep`).
    Plain tuples, not model instances: the sealer runs every second beside the web workers,
    and building instances was most of its CPU.
    """
    floor = head.last_event_id or 0
    events = AuditEvent.objects.order_by("id").values_list(*_EVENT_FIELDS)
    newer = list(events.filter(id__gt=floor)[:limit])
    now = timezone.now()
    checked = head.stragglers_checked_at
    if not sweep and checked and (now - checked).total_seconds() < STRAGGLER_CHECK_SECONDS:
        return newer
    head.stragglers_checked_at = now
    lower = 0 if sweep else max(0, floor - STRAGGLER_WINDOW)
    stragglers = list(events.filter(id__gt=lower, id__lte=floor, seal__isnull=True)[:limit])
    # _EVENT_FIELDS starts with "id".
    return sorted(stragglers + newer, key=lambda row: row[0])[:limit]


def seal_pending_events(*, batch: int | None = None, sweep: bool = False) -> int:
    """Link up to `batch` committed, unsealed events into the chain; returns how many.

    One transaction holding the head's row lock: two sealers (two beat hosts, a manual run)
    queue behind each other and each continues from the head the other left.
    """
    limit = batch or settings.AUDIT_SEAL_BATCH
    with transaction.atomic():
        head = _head_for_update()
        checked_before = head.stragglers_checked_at
        pending = _pending(head, limit, sweep)
        if not pending:
            if head.stragglers_checked_at != checked_before:
                head.save(update_fields=["stragglers_checked_at"])
            return 0
        seq, prev = head.last_seq, head.last_hash
        seals = []
        for row in pending:
            seq += 1
            fields = dict(zip(_EVENT_FIELDS, row, strict=True))
            fields.update(seq=seq, prev_hash=prev)
            prev = event_hash(fields)
            seals.append((fields["id"], seq, fields["prev_hash"], prev))
        _bulk_insert(AuditSeal, ("event_id", "seq", "prev_hash", "hash"), seals)
        head.last_seq, head.last_hash = seq, prev
        head.last_event_id = max(head.last_event_id or 0, pending[-1][0])
        head.sealed_at = timezone.now()
        head.save()
    return len(pending)


def seal_all_pending(*, sweep: bool = False) -> int:
    total = 0
    while sealed := seal_pending_events(sweep=sweep):
        total += sealed
    return total


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    checked: int
    unsealed: int
    first_broken_id: int | None
    reason: str


def unsealed_count() -> int:
    """Events without a seal, exactly (an anti-join over the table: for verification)."""
    return AuditEvent.objects.filter(seal__isnull=True).count()


PROGRESS_EVERY = 20_000


def check_chain(*, on_progress: Callable[[int, int], None] | None = None) -> ChainCheck:
    """Recompute every sealed event's hash and link, in seq order, up to the current head.

    `on_progress(checked, total)` is called every PROGRESS_EVERY events.
    """
    head = chain_head()
    head_seq = head.last_seq if head else 0
    head_hash = head.last_hash if head else GENESIS_HASH
    unsealed = unsealed_count()
    expected_seq, prev, checked = 1, GENESIS_HASH, 0
    columns = ("seq", "prev_hash", "hash", *(f"event__{name}" for name in _EVENT_FIELDS))
    rows = AuditSeal.objects.filter(seq__lte=head_seq).order_by("seq").values_list(*columns)
    for row in rows.iterator(chunk_size=2000):
        seq, prev_hash, stored_hash = row[:3]
        fields = dict(zip(_EVENT_FIELDS, row[3:], strict=True))
        fields.update(seq=seq, prev_hash=prev_hash)
        if seq != expected_seq:
            # The removed event's seal is still there (its own table, no foreign key): name the
            # event that is gone, not the one after the gap.
            seals = AuditSeal.objects.filter(seq=expected_seq)
            gone = seals.values_list("event_id", flat=True).first()
            return ChainCheck(
                False,
                checked,
                unsealed,
                gone if gone is not None else fields["id"],
                f"event(s) with seq {expected_seq}..{seq - 1} are missing",
            )
        if prev_hash != prev:
            return ChainCheck(
                False, checked, unsealed, fields["id"], "prev_hash does not match the event before"
            )
        if event_hash(fields) != stored_hash:
            return ChainCheck(
                False, checked, unsealed, fields["id"], "content does not match its hash"
            )
        prev = stored_hash
        expected_seq += 1
        checked += 1
        if on_progress and checked % PROGRESS_EVERY == 0:
            on_progress(checked, head_seq)
    if checked != head_seq or prev != head_hash:
        return ChainCheck(
            False,
            checked,
            unsealed,
            head.last_event_id if head else None,
            f"the chain ends at seq {checked} but its head records seq {head_seq}",
        )
    return ChainCheck(True, checked, unsealed, None, "")


def verify_chain(
    *,
    source: VerificationSource,
    actor: Any = None,
    request: HttpRequest | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AuditVerification:
    """Run `check_chain`, keep the run as an AuditVerification row and audit the outcome.

    A broken chain is logged at ERROR level and recorded as `audit.broken`.
    """
    who = Actor.of(actor)
    head = chain_head()
    run = AuditVerification.objects.create(
        source=source,
        requested_by=who.username,
        started_at=timezone.now(),
        total=head.last_seq if head else 0,
    )

    def progress(checked: int, total: int) -> None:
        # Committed as it goes (no surrounding transaction), so the console shows it live.
        AuditVerification.objects.filter(pk=run.pk).update(checked=checked, total=total)
        if on_progress:
            on_progress(checked, total)

    try:
        result = check_chain(on_progress=progress)
    except Exception as exc:
        AuditVerification.objects.filter(pk=run.pk).update(
            status=VerificationStatus.FAILED, finished_at=timezone.now(), reason=str(exc)[:2000]
        )
        log.exception("audit chain verification %s failed to run", run.pk)
        raise
    status = VerificationStatus.OK if result.ok else VerificationStatus.BROKEN
    with transaction.atomic():
        AuditVerification.objects.filter(pk=run.pk).update(
            status=status,
            finished_at=timezone.now(),
            checked=result.checked,
            unsealed=result.unsealed,
            first_broken_id=result.first_broken_id,
            reason=result.reason,
        )
        record_event(
            action=AuditAction.AUDIT_VERIFIED if result.ok else AuditAction.AUDIT_BROKEN,
            actor=who,
            request=request,
            object_type="compliance.auditverification",
            object_id=run.pk,
            details={
                "checked": result.checked,
                "unsealed": result.unsealed,
                "first_broken_id": result.first_broken_id,
                "reason": result.reason,
                "source": str(source),
            },
        )
    if not result.ok:
        log.error(
            "AUDIT CHAIN BROKEN at event %s: %s (checked %s)",
            result.first_broken_id,
            result.reason,
            result.checked,
        )
    run.refresh_from_db()
    return run


def total_event_count() -> int:
    """Number of audit events without counting the whole table.

    Events are never deleted, so they are the sealed ones (the head's seq) plus those above
    the head's last sealed id (a primary-key range, small while the sealer keeps up). A
    straggler (committed after a newer event was sealed) is left out until the next seal,
    seconds later. One statement, one snapshot, so a seal committing meanwhile cannot count a
    row twice.
    """
    quote = connection.ops.quote_name
    events = quote(AuditEvent._meta.db_table)
    heads = quote(AuditChainHead._meta.db_table)
    # Identifiers from our own models only, no values.
    sql = (
        f"SELECT h.{quote('last_seq')} + (SELECT COUNT(*) FROM {events} e "  # noqa: S608
        f"WHERE e.{quote('id')} > COALESCE(h.{quote('last_event_id')}, 0)) "
        f"FROM {heads} h WHERE h.{quote('id')} = 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return int(row[0]) if row else AuditEvent.objects.count()
