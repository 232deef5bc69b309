"""Reading large tables for reports: bounded windows of ids, and on PostgreSQL a reader thread.

A report over a million audit events must stay in constant memory and finish in seconds, on a
database whose statements time out (DB_STATEMENT_TIMEOUT). So a table is read in windows of ids,
each its own short query returning at most BATCH rows as value tuples: memory stays at a
window or two, no statement or transaction lasts the whole report (the job's progress and
heartbeat commit as it goes), and each query touches a bounded range of the primary key
whatever plan the database picks. On PostgreSQL, outside a transaction, a second thread with
its own connection reads the next window while this one formats the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

from django.db import connection
from django.db.models import CharField, Func, Max, Min, QuerySet

from compliance.models import AuditSeal

BATCH = 5000
_MAX_SPAN = 1_000_000
_END = object()


def django_fetch(queryset: QuerySet) -> list[tuple]:
    return list(queryset)


def raw_fetch(queryset: QuerySet) -> list[tuple]:
    """The rows of a values_list queryset straight from the cursor, without Django's per-row
    conversions: only for columns the driver already returns as Python values (PostgreSQL
    text, numbers, times; not JSONField, which Django decodes itself)."""
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def window_batches(
    queryset: QuerySet,
    fields: tuple[str, ...],
    *,
    batch: int = BATCH,
    fetch: Callable[[QuerySet], list[tuple]] = django_fetch,
) -> Iterator[list[tuple]]:
    """Lists of `fields` tuples (the first field is the integer id), in id order, each from
    one query over a bounded id window. Sparse ranges (a rare filter) widen the window, dense
    ones narrow it; a window never returns more than `batch` rows."""
    bounds = queryset.aggregate(low=Min("id"), high=Max("id"))
    low, high = bounds["low"], bounds["high"]
    if low is None:
        return
    span = batch * 2
    ordered = queryset.order_by("id").values_list(*fields)
    while low <= high:
        end = min(low + span, high + 1)
        rows = fetch(ordered.filter(id__gte=low, id__lt=end)[:batch])
        if rows:
            yield rows
        if len(rows) == batch:
            low = rows[-1][0] + 1  # denser than a batch: carry on right after the last row
            span = max(batch, span // 2)
        else:
            low = end
            if len(rows) < batch // 4:
                span = min(span * 4, _MAX_SPAN)


def windowed(queryset: QuerySet, fields: tuple[str, ...], batch: int = BATCH) -> Iterator[tuple]:
    """The rows of `window_batches`, one by one."""
    for rows in window_batches(queryset, fields, batch=batch):
        yield from rows


def _put(pipe: queue.Queue, stop: threading.Event, item: object) -> bool:
    while not stop.is_set():
        try:
            pipe.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def read_ahead(batches: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """The items of `batches()`, produced by a reader thread on its own database connection
    (PostgreSQL, outside a transaction) one item ahead of the consumer; elsewhere, or inside a
    transaction (whose rows another connection could not see), on this thread."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield from batches()
        return
    pipe: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def read() -> None:
        from django.db import connection as own

        try:
            for item in batches():
                if not _put(pipe, stop, item):
                    return
            _put(pipe, stop, _END)
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(pipe, stop, exc)
        finally:
            own.close()

    reader = threading.Thread(target=read, name="report-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = pipe.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Truncated, failed or done: the reader stops at its next window.
        stop.set()
        reader.join(timeout=30)


# --- Audit events ---------------------------------------------------------------------------


class UtcText(Func):
    """A time as the audit trail writes it (ISO 8601, UTC, microseconds), made by PostgreSQL:
    cheaper than building a datetime per row and formatting it again."""

    template = (
        "to_char(%(expressions)s AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"
    )
    output_field = CharField()


# (id, time, actor_username, actor_index, client_ip, personal, action, object_type, object_id,
# method, path, status_code, request_id, details): what `audit_batches` gives per event.
AUDIT_FIELDS = (
    "id",
    "time_text",
    "actor_username",
    "actor_index",
    "client_ip",
    "personal",
    "action",
    "object_type",
    "object_id",
    "method",
    "path",
    "status_code",
    "request_id",
    "details",
)


def _seals(rows: list[tuple], fetch: Callable[[QuerySet], list[tuple]]) -> dict[int, tuple]:
    """event id -> (seq, hash_version) for the events of a window that are sealed: a range of
    the seal table's primary key (events are mostly dense), or the ids themselves when sparse."""
    first, last = rows[0][0], rows[-1][0]
    seals = AuditSeal.objects.values_list("event_id", "seq", "hash_version")
    if last - first < 2 * len(rows):
        seals = seals.filter(event_id__gte=first, event_id__lte=last)
    else:
        seals = seals.filter(event_id__in=[row[0] for row in rows])
    return {event_id: (seq, version) for event_id, seq, version in fetch(seals)}


def audit_batches(queryset: QuerySet) -> Iterator[tuple[list[tuple], dict[int, tuple]]]:
    """(rows in AUDIT_FIELDS order, their seals) per window of events, read ahead on
    PostgreSQL. Seals come from their own table by key range rather than a join, which reads
    the seal index in order instead of once per event."""
    postgres = connection.vendor == "postgresql"
    if postgres:
        events = queryset.annotate(time_text=UtcText("occurred_at"))
        fields, fetch = AUDIT_FIELDS, raw_fetch
    else:
        events = queryset
        fields = ("id", "occurred_at", *AUDIT_FIELDS[2:])
        fetch = django_fetch

    def batches() -> Iterator[tuple[list[tuple], dict[int, tuple]]]:
        for rows in window_batches(events, fields, fetch=fetch):
            if not postgres:
                rows = [(row[0], _iso(row[1]), *row[2:]) for row in rows]
            yield rows, _seals(rows, fetch)

    return read_ahead(batches)


def _iso(moment: Any) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
