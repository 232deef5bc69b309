"""The hash chain: sealing committed events into it, and reading its head.

Sealing is separate from recording and serialized by a lock on the chain head: it links
committed events in id order, so concurrent writers never contend on a lock and the chain can
never fork.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from compliance import proof
from compliance.audit import AuditContext, bulk_insert, iso, record_event
from compliance.choices import AuditAction
from compliance.models import AuditChainHead, AuditEvent, AuditSeal

log = logging.getLogger(__name__)

# The hashing itself lives in compliance.proof (no Django), shared with the offline verifier.
GENESIS_HASH = proof.GENESIS_HASH
HASH_VERSIONS = proof.HASH_VERSIONS
CURRENT_HASH_VERSION = proof.CURRENT_HASH_VERSION
PERSONAL_HASH_VERSION = proof.PERSONAL_HASH_VERSION
UnknownHashVersion = proof.UnknownHashVersion
canonical_json = proof.canonical_json
_EVENT_FIELDS = proof.EVENT_FIELDS

# How far below the newest sealed id the sealer looks for events that committed late, and how
# often (an anti-join over that window: cheap once a minute, wasteful on every run).
STRAGGLER_WINDOW = 100_000
STRAGGLER_CHECK_SECONDS = 60


def event_hash(fields: dict[str, Any], version: int = CURRENT_HASH_VERSION) -> str:
    """SHA-256 over the canonical JSON of an event's fields (as `version` lists them) and its
    prev_hash. From version 2 on the version itself is hashed too, so a seal relabelled with
    another version no longer matches."""
    names = HASH_VERSIONS.get(version)
    if names is None:
        raise UnknownHashVersion(version)
    payload = {name: fields[name] for name in names}
    payload["occurred_at"] = iso(payload["occurred_at"])
    if version > 1:
        payload["hash_version"] = version
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def current_hash_version() -> int:
    """The version events without sealed personal data are sealed with: the personal data
    version while AUDIT_PERSONAL_DATA is on, version 1 (as before it existed) when it is off."""
    return PERSONAL_HASH_VERSION if settings.AUDIT_PERSONAL_DATA else 1


# Where the personal data columns are in `_EVENT_FIELDS` rows.
_PERSONAL_AT = tuple(_EVENT_FIELDS.index(name) for name in proof.PERSONAL_COLUMNS)


def seal_version(row: tuple, default: int) -> int:
    """The hash version to seal an `_EVENT_FIELDS` row with.

    Decided per row, by what the row holds rather than by the setting alone: a row whose
    personal data was sealed (any of its ciphertext or blind indexes set) is always sealed with
    the personal data version, even if AUDIT_PERSONAL_DATA was switched off since it was
    written, as version 1 would leave those columns outside the hash. Any other row (written
    before the switch, anonymous, or with the setting off) gets `default`: every version
    covers all of its columns, which are then blank or plain.
    """
    for index in _PERSONAL_AT:
        if row[index]:
            return PERSONAL_HASH_VERSION
    return default


def row_hasher(version: int, columns: tuple[str, ...]) -> Callable[[tuple], str]:
    """`event_hash` of a row in `columns` order (see `compliance.proof.row_canonical`)."""
    return proof.row_hasher(version, columns)


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
        default = current_hash_version()
        seals = []
        for row in pending:
            seq += 1
            version = seal_version(row, default)
            fields = dict(zip(_EVENT_FIELDS, row, strict=True))
            fields.update(seq=seq, prev_hash=prev)
            prev = event_hash(fields, version)
            seals.append((fields["id"], seq, fields["prev_hash"], prev, version))
        bulk_insert(AuditSeal, ("event_id", "seq", "prev_hash", "hash", "hash_version"), seals)
        head.last_seq, head.last_hash = seq, prev
        head.last_event_id = max(head.last_event_id or 0, pending[-1][0])
        head.sealed_at = timezone.now()
        if len(pending) < limit:
            # Caught up: a lag episode, if one was reported, is over.
            head.lag_reported_at = None
        head.save()
    return len(pending)


def seal_all_pending(*, sweep: bool = False) -> int:
    total = 0
    while sealed := seal_pending_events(sweep=sweep):
        total += sealed
    return total


def seal_lag_limit() -> timedelta:
    """AUDIT_SEAL_MAX_LAG, but never less than three sealer intervals."""
    return max(settings.AUDIT_SEAL_MAX_LAG, timedelta(seconds=3 * settings.AUDIT_SEAL_INTERVAL))


def oldest_unsealed_age() -> timedelta | None:
    """Age of the oldest event above the chain head (None: all sealed).

    New events are the primary-key range above the head's last sealed id, so this is one
    index lookup at any table size. Its lowest id stands for the oldest: ids and times are
    assigned together, give or take a commit.
    """
    head = AuditChainHead.objects.filter(pk=1).values_list("last_event_id", flat=True).first()
    oldest = (
        AuditEvent.objects.filter(id__gt=head or 0)
        .order_by("id")
        .values_list("occurred_at", flat=True)
        .first()
    )
    return None if oldest is None else max(timedelta(0), timezone.now() - oldest)


def note_seal_lag(age: timedelta) -> bool:
    """Record `audit.seal_lag` once per episode of sealing lagging behind; True if recorded.

    Whoever notices first (a readiness probe, the dashboard) records it: the flag on the head
    is set by a compare-and-swap, so many probes at once still make one event. The sealer
    clears the flag once it has caught up, which ends the episode. Events not yet sealed (and
    later checkpointed) are not yet protected: this is when that window grows.
    """
    with transaction.atomic():
        # The head exists from the first migration on; a database emptied since (a test
        # flush) gets it back, or nobody could ever claim the episode.
        AuditChainHead.objects.bulk_create(
            [AuditChainHead(pk=1, last_seq=0, last_hash=GENESIS_HASH)], ignore_conflicts=True
        )
        claimed = AuditChainHead.objects.filter(pk=1, lag_reported_at__isnull=True).update(
            lag_reported_at=timezone.now()
        )
        if not claimed:
            return False
        limit = seal_lag_limit()
        record_event(
            action=AuditAction.SEAL_LAG,
            context=AuditContext.system(),
            object_type="compliance.auditchainhead",
            object_id=1,
            details={
                "oldest_unsealed_seconds": round(age.total_seconds(), 1),
                "limit_seconds": limit.total_seconds(),
            },
        )
    log.error(
        "AUDIT SEALING LAGS: the oldest unsealed event is %.0f s old (limit %.0f s)",
        age.total_seconds(),
        seal_lag_limit().total_seconds(),
    )
    return True


def unsealed_count() -> int:
    """Events without a seal, exactly (an anti-join over the table: for verification)."""
    return AuditEvent.objects.filter(seal__isnull=True).count()


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
