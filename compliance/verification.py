"""Verifying the hash chain: recompute every sealed event, as a job with progress.

No web thread walks the chain: the API and the console start a verification job and read the
latest finished one; the CLI runs the same job inline to print its progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

from django.db import connection, transaction

from bridge.choices import JobStatus
from bridge.jobs import Progress, start_job
from bridge.models import Job
from compliance import proof
from compliance.audit import AuditContext, iso, record_event
from compliance.chain import _EVENT_FIELDS, GENESIS_HASH, HASH_VERSIONS, chain_head, unsealed_count
from compliance.checkpoints import CheckpointRefused, make_checkpoint, review_checkpoints
from compliance.choices import VERIFY_JOB_KIND, AuditAction, VerificationSource
from compliance.models import AuditEvent, AuditSeal, AuditVerification
from compliance.proof import ROW_COLUMNS, ChainWalker, Problem

log = logging.getLogger(__name__)

PROGRESS_EVERY = 20_000


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    checked: int
    unsealed: int
    first_broken_id: int | None
    reason: str
    # The first seq found wrong and the checkpoint that proves it, where there is one.
    first_broken_seq: int | None = None
    checkpoint: int | None = None
    checkpoints: int = 0
    checkpoint_problems: tuple[str, ...] = ()


# The columns a verification reads, in this order: the seal's, then the event's.
_COLUMNS = ROW_COLUMNS
_BATCH = 2000
# Parallel readers of the chain on PostgreSQL, each taking alternate ranges of CHUNK seqs.
READERS = 2
CHUNK = 20_000


def _rows_orm(head_seq: int, after_seq: int) -> Iterator[tuple]:
    """Rows in `_COLUMNS` order through the ORM, `occurred_at` as ISO text (SQLite)."""
    columns = ("seq", "prev_hash", "hash", "hash_version", *(f"event__{n}" for n in _EVENT_FIELDS))
    rows = AuditSeal.objects.filter(seq__gt=after_seq, seq__lte=head_seq)
    rows = rows.order_by("seq").values_list(*columns)
    time_at = _COLUMNS.index("occurred_at")
    for row in rows.iterator(chunk_size=2000):
        yield (*row[:time_at], iso(row[time_at]), *row[time_at + 1 :])


_TIME_SQL = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"


def _from_sql(joined: str = "") -> str:
    quote = connection.ops.quote_name
    seals, events = quote(AuditSeal._meta.db_table), quote(AuditEvent._meta.db_table)
    # Identifiers from our own models only; the two values are parameters.
    return (
        f"FROM {seals} s JOIN {events} e ON e.{quote('id')} = s.{quote('event_id')} {joined} "
        f"WHERE s.{quote('seq')} > %s AND s.{quote('seq')} <= %s ORDER BY s.{quote('seq')}"
    )


def _postgres_sql() -> str:
    """Rows in ROW_COLUMNS order."""
    quote = connection.ops.quote_name
    selected = [f"s.{quote(name)}" for name in _COLUMNS[:4]]
    for name in _EVENT_FIELDS:
        column = f"e.{quote(name)}"
        if name == "occurred_at":
            # PostgreSQL writes the time as iso() would (UTC, microseconds): parsing it into a
            # datetime and formatting it back was a third of the work per event.
            column = _TIME_SQL.format(column)
        selected.append(column)
    return f"SELECT {', '.join(selected)} {_from_sql()}"


# What the fast verification reads: the seal, the event id, and the event's canonical JSON as
# PostgreSQL writes it, in two parts around latency_ms (a float, which PostgreSQL would spell
# "12" where Python's repr, and so the hash, has "12.0"). Strings and numbers come out of
# to_json() escaped exactly as json.dumps(ensure_ascii=False) escapes them; a property test
# holds the two equal on generated rows, and any difference could only ever make an intact
# event fail, never a changed one pass: the bytes hashed are compared with the stored hash.
CANONICAL_COLUMNS = ("seq", "prev_hash", "hash", "hash_version", "text", "latency", "tail")
# latency_ms as Python's repr() spells it, where PostgreSQL's float text says the same digits:
# integral values get ".0", and PostgreSQL writes exponents from 1e15 where Python does from
# 1e16 (and below 1e-4 alike). Otherwise NULL: the row then comes in two parts around the raw
# value, which Python formats (as it does NaN, which it refuses: such a row fails its hash).
_LATENCY_SQL = (
    "CASE WHEN {x} IS NULL THEN 'null' "
    "WHEN abs({x}) < 1e15 AND {x} = trunc({x}) THEN {x}::text || '.0' "
    "WHEN abs({x}) >= 1e-4 AND abs({x}) < 1e15 THEN {x}::text END"
)


def _canonical_parts(version: int) -> tuple[str, str]:
    """SQL text expressions for the canonical JSON before and after latency_ms's value."""
    quote = connection.ops.quote_name
    names = HASH_VERSIONS[version]
    keys = sorted([*names, "hash_version"] if version > 1 else names)
    head: list[str] = []
    tail: list[str] | None = None
    for n, key in enumerate(keys):
        literal = ("{" if n == 0 else ",") + json.dumps(key) + ":"
        parts = tail if tail is not None else head
        parts.append("'" + literal.replace("'", "''") + "'")
        if key == "latency_ms":
            tail = []
            continue
        # to_json() only where a value may need escaping: it is most of the server's work.
        # Numbers, the hex prev_hash and the formatted time never do (and a tampered one
        # that would still fails its hash, as it should).
        if key == "hash_version":
            value = f"'{int(version)}'"
        elif key == "seq":
            value = f"s.{quote(key)}::text"
        elif key == "prev_hash":
            value = f"'\"' || s.{quote(key)} || '\"'"
        elif key in ("id", "actor_id", "status_code"):
            value = f"COALESCE(e.{quote(key)}::text, 'null')"
        elif key == "occurred_at":
            value = "'\"' || " + _TIME_SQL.format("e." + quote(key)) + " || '\"'"
        elif key in proof.PERSONAL_COLUMNS:
            # Bridge writes these as a ciphertext (base64url, dots and a colon) and hex blind
            # indexes, which JSON never escapes; to_json() on the longest column of a version
            # 2 event cost a sixth of the walk. (Not nullable; COALESCE spells a NULL as
            # Python would.)
            value = f"COALESCE('\"' || e.{quote(key)} || '\"', 'null')"
        else:
            value = f"COALESCE(to_json(e.{quote(key)})::text, 'null')"
        parts.append(value)
    (tail if tail is not None else head).append("'}'")
    return " || ".join(head), (" || ".join(tail) if tail is not None else "NULL")


def _canonical_sql() -> str:
    quote = connection.ops.quote_name
    texts, tails = [], []
    for version in sorted(HASH_VERSIONS):
        head, tail = _canonical_parts(version)
        if tail == "NULL":  # a version without latency_ms
            texts.append(f"WHEN {int(version)} THEN {head}")
            continue
        texts.append(
            f"WHEN {int(version)} THEN CASE WHEN l.lat IS NULL THEN {head} "
            f"ELSE {head} || l.lat || {tail} END"
        )
        tails.append(f"WHEN {int(version)} THEN CASE WHEN l.lat IS NULL THEN {tail} END")
    version = f"s.{quote('hash_version')}"
    latency = f"e.{quote('latency_ms')}"
    selected = [
        *(f"s.{quote(name)}" for name in CANONICAL_COLUMNS[:4]),
        f"CASE {version} {' '.join(texts)} END",
        f"CASE WHEN l.lat IS NULL THEN {latency} END",
        f"CASE {version} {' '.join(tails)} END" if tails else "NULL",
    ]
    lateral = f"CROSS JOIN LATERAL (SELECT {_LATENCY_SQL.format(x=latency)} AS lat) l"
    return f"SELECT {', '.join(selected)} {_from_sql(lateral)}"


def canonical_hasher(version: int) -> Callable[[tuple], str]:
    """The hash of a CANONICAL_COLUMNS row: its text, or the two parts around latency_ms."""
    sha256, value_text = hashlib.sha256, proof.json_value

    def hasher(row: tuple) -> str:
        tail = row[6]
        text = row[4] if tail is None else row[4] + value_text(row[5]) + tail
        return sha256(text.encode("utf-8")).hexdigest()

    return hasher


def _batches(sql: str, bounds: list[int], stop: threading.Event) -> Iterator[list[tuple]]:
    """Batches from a server-side cursor on this thread's connection, in a transaction."""
    from django.db import connection as own

    with transaction.atomic():
        own.ensure_connection()
        with own.cursor() as setup:
            # Floats as their shortest exact text (PostgreSQL's default, which a server
            # setting could lower): fewer digits would fail intact events' hashes.
            setup.execute("SET LOCAL extra_float_digits = 1")
            # One long expression per row: compiling it costs more than it saves.
            setup.execute("SET LOCAL jit = off")
        with own.connection.cursor(name=f"verify_{threading.get_ident()}") as cursor:
            cursor.itersize = _BATCH
            cursor.execute(sql, bounds)
            while not stop.is_set():
                batch = cursor.fetchmany(_BATCH)
                if not batch:
                    return
                yield batch


def _rows_postgres(head_seq: int, after_seq: int, sql: str | None = None) -> Iterator[tuple]:
    """Rows in seq order from server-side cursors.

    In a worker (no surrounding transaction) READERS threads, each on its own connection, read
    alternate CHUNK-seq ranges ahead into queues while this thread hashes: PostgreSQL builds
    the rows of two ranges at once in two backends, and the waits for the server overlap with
    the hashing. Inside a caller's transaction (whose uncommitted rows another connection could
    not see) it reads on this thread.
    """
    stop = threading.Event()
    sql = sql or _postgres_sql()
    if connection.in_atomic_block:
        for batch in _batches(sql, [after_seq, head_seq], stop):
            yield from batch
        return
    chunks = [(low, min(low + CHUNK, head_seq)) for low in range(after_seq, head_seq, CHUNK)] or [
        (after_seq, head_seq)
    ]
    readers = min(READERS, len(chunks))
    # Room for a whole chunk per reader: the one not being hashed reads its range meanwhile.
    pipes = [queue.Queue(maxsize=CHUNK // _BATCH + 2) for _ in range(readers)]

    def read(index: int) -> None:
        from django.db import connection as own

        pipe = pipes[index]
        try:
            for bounds in chunks[index::readers]:
                for batch in _batches(sql, list(bounds), stop):
                    _put(pipe, stop, batch)
                _put(pipe, stop, None)
        except BaseException as exc:
            _put(pipe, stop, exc)
        finally:
            own.close()

    threads = [
        threading.Thread(target=read, args=(index,), name=f"verify-reader-{index}", daemon=True)
        for index in range(readers)
    ]
    for thread in threads:
        thread.start()
    try:
        for number in range(len(chunks)):
            pipe = pipes[number % readers]
            while True:
                batch = pipe.get()
                if batch is None:
                    break
                if isinstance(batch, BaseException):
                    raise batch
                yield from batch
    finally:
        # A break found, a cancel, an error: the readers stop at their next batch.
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def _put(batches: queue.Queue, stop: threading.Event, item: object) -> None:
    while not stop.is_set():
        try:
            batches.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def chain_rows(head_seq: int, *, after_seq: int = 0) -> Iterator[tuple]:
    """Sealed rows with seq in (after_seq, head_seq], in `ROW_COLUMNS` order, seq ascending."""
    if connection.vendor == "postgresql":
        return _rows_postgres(head_seq, after_seq)
    return _rows_orm(head_seq, after_seq)


def canonical_rows(head_seq: int, *, after_seq: int = 0) -> Iterator[tuple]:
    """(seq, prev_hash, hash, hash_version, id, canonical JSON text) of the sealed events in
    (after_seq, head_seq]: the exact bytes each hash covers (None for an unknown version)."""
    if connection.vendor == "postgresql":
        value_text = proof.json_value
        for row in _rows_postgres(head_seq, after_seq, _canonical_sql()):
            try:
                text = row[4] if row[6] is None else row[4] + value_text(row[5]) + row[6]
            except (TypeError, ValueError):
                text = None  # a value no canonical JSON holds: it cannot match its hash
            yield (*row[:4], None, text)
        return
    id_at, makers = ROW_COLUMNS.index("id"), {}
    for row in _rows_orm(head_seq, after_seq):
        version = row[3]
        if version not in makers:
            makers[version] = (
                proof.row_canonical(version, ROW_COLUMNS) if version in HASH_VERSIONS else None
            )
        canonical = makers[version]
        try:
            text = canonical(row) if canonical else None
        except (TypeError, ValueError):
            text = None
        yield (*row[:4], row[id_at], text)


def walk_of(
    head_seq: int,
    *,
    after_seq: int = 0,
    start_hash: str = GENESIS_HASH,
    anchors: Iterable[proof.Anchor] = (),
) -> tuple[ChainWalker, Iterator[tuple]]:
    """A walker and the rows of (after_seq, head_seq] it should walk: on PostgreSQL the
    canonical text built by the server and read by parallel readers, elsewhere ORM rows."""
    if connection.vendor == "postgresql":
        walker = ChainWalker(
            anchors,
            start_hash=start_hash,
            start_seq=after_seq + 1,
            hasher_for=canonical_hasher,
            id_at=None,  # looked up by seq if a problem is found
        )
        return walker, _rows_postgres(head_seq, after_seq, _canonical_sql())
    walker = ChainWalker(anchors, start_hash=start_hash, start_seq=after_seq + 1)
    return walker, _rows_orm(head_seq, after_seq)


def check_chain(
    *, on_progress: Callable[[int, int], None] | None = None, retry_after_purge: bool = True
) -> ChainCheck:
    """Recompute every sealed event's hash and link, in seq order, up to the current head, and
    hold the chain to every signed checkpoint found in the sinks (`compliance.proof`).

    After a retention purge the walk starts at the oldest kept seq, from the hash a signed
    checkpoint in the sinks holds for the seq before it (`compliance.retention.chain_base`);
    events removed where no signed checkpoint covers the cut are reported.

    `on_progress(checked, total)` is called every PROGRESS_EVERY events.
    """
    from compliance.retention import chain_base, kept_floor

    # The checkpoints first, then the head: a checkpoint written meanwhile is either not seen,
    # or signs a seq the head read afterwards has reached.
    review = review_checkpoints()
    head = chain_head()
    head_seq = head.last_seq if head else 0
    head_hash = head.last_hash if head else GENESIS_HASH
    unsealed = unsealed_count()
    base = chain_base(review)
    walker, rows = walk_of(
        head_seq,
        after_seq=base.after_seq,
        start_hash=base.start_hash,
        anchors=review.anchors(),
    )
    report = on_progress and (lambda checked: on_progress(checked, head_seq - base.after_seq))
    problem = base.problem or walker.walk(rows, report, PROGRESS_EVERY)
    if problem is not None and retry_after_purge and kept_floor() != base.after_seq + 1:
        # A purge committed during the walk and took rows it was about to read: walk again.
        return check_chain(on_progress=on_progress, retry_after_purge=False)
    if problem is None:
        problem = walker.finish()
        if problem is None and (walker.last_seq != head_seq or walker.last_hash != head_hash):
            problem = Problem(
                f"the chain ends at seq {walker.last_seq} but its head records seq {head_seq}",
                seq=(walker.last_seq or 0) + 1,
                event_id=head.last_event_id if head else None,
            )
    if problem is not None and (
        problem.event_id is None or problem.reason.startswith("event(s) with seq")
    ):
        # The event at that seq, by its seal. For removed events the seal is still there (its
        # own table, no foreign key): name the event that is gone, not the one after the gap.
        seals = AuditSeal.objects.values_list("event_id", flat=True)
        named = seals.filter(seq=problem.seq).first()
        if named is None:  # seal gone too: the event right after the gap
            named = seals.filter(seq__gt=problem.seq).order_by("seq").first()
        if named is not None:
            problem = replace(problem, event_id=named)
    checkpoint_problems = tuple(item.reason for item in review.problems)
    if problem is None and review.problems:
        problem = review.problems[0]
    if problem is None:
        return ChainCheck(True, walker.checked, unsealed, None, "", checkpoints=review.count)
    return ChainCheck(
        False,
        walker.checked,
        unsealed,
        problem.event_id,
        problem.reason,
        first_broken_seq=problem.seq,
        checkpoint=problem.checkpoint,
        checkpoints=review.count,
        checkpoint_problems=checkpoint_problems[:20],
    )


def start_verification(
    *,
    context: AuditContext,
    source: VerificationSource,
    enqueue: bool = True,
    reuse_active: bool = True,
) -> Job:
    """Ask for a verification run (a job); the worker runs `verify_chain_job`.

    One at a time: while a run is pending or running, asking again returns that run, so a
    burst of requests cannot queue a walk of the whole chain each and starve the sealer. The
    command line (`reuse_active=False`) runs its own, to print its progress.
    """
    if reuse_active:
        active = (
            AuditVerification.objects.filter(status__in=(JobStatus.PENDING, JobStatus.RUNNING))
            .order_by("id")
            .first()
        )
        if active is not None:
            return active
    return start_job(
        kind=VERIFY_JOB_KIND, context=context, params={"source": str(source)}, enqueue=enqueue
    )


def verify_chain_job(job: Job, progress: Progress) -> dict:
    """The job's work: check the chain, audit the outcome, return it as the job's result.

    A broken chain is a successful run with `ok: false`, logged at ERROR level and recorded as
    `audit.broken`; a run that could not finish is a failed job.
    """
    head = chain_head()
    progress.update(0, head.last_seq if head else 0, "signing a checkpoint")
    try:
        # At every verification: what the chain holds now is then signed, and checked below.
        make_checkpoint()
    except CheckpointRefused:
        pass  # recorded as audit.checkpoint_not_signed; the walk below names the damage
    head = chain_head()
    progress.update(0, head.last_seq if head else 0, "verifying the hash chain")
    result = check_chain(on_progress=lambda checked, total: progress.update(checked, total))
    record_event(
        action=AuditAction.AUDIT_VERIFIED if result.ok else AuditAction.AUDIT_BROKEN,
        context=AuditContext(actor_id=job.actor_id, actor_username=job.actor_username),
        object_type="bridge.job",
        object_id=job.pk,
        details={**asdict(result), "source": job.params.get("source", "")},
    )
    if not result.ok:
        log.error(
            "AUDIT CHAIN BROKEN at event %s: %s (checked %s)",
            result.first_broken_id,
            result.reason,
            result.checked,
        )
    return asdict(result)


def latest_verification() -> AuditVerification | None:
    """The newest verification that finished (succeeded or failed), or None."""
    return (
        AuditVerification.objects.filter(status__in=(JobStatus.SUCCEEDED, JobStatus.FAILED))
        .order_by("-finished_at", "-id")
        .first()
    )
