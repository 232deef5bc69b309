"""Recording audit events: the one helper every app calls.

`record_event` is one INSERT in the caller's connection (inside the caller's transaction when
there is one), so an event is durable exactly when the change it describes commits. Who did it
and from where travels in an `AuditContext` (actor, client IP, request id), never as an
HttpRequest, so services, Celery tasks and commands record events the same way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.http import HttpRequest
from django.utils import timezone

from compliance.models import AuditEvent
from compliance.personal import seal_event
from compliance.proof import canonical_json
from compliance.redaction import redact
from security.ip import client_ip

# The request being served, so events raised deep inside (admin LogEntry signals, services
# called without a context) still carry its client IP and request id.
current_request: ContextVar[HttpRequest | None] = ContextVar("current_request", default=None)

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
    # Hash version 2: the sealed personal data and its blind indexes (compliance.personal).
    "personal",
    "actor_index",
    "ip_index",
)


_TOO_DEEP = {"unrecorded": "details nested too deeply"}


def _authenticated(user: Any) -> bool:
    return user is not None and bool(getattr(user, "is_authenticated", False))


@dataclass(frozen=True)
class AuditContext:
    """Who acted and from where: everything an event says about its origin."""

    actor_id: int | None = None
    actor_username: str = ""
    client_ip: str | None = None
    request_id: str = ""

    @classmethod
    def from_request(cls, request: HttpRequest | None, *, user: Any = None) -> AuditContext:
        """The request's client IP and request id; the actor is `user`, else the request's
        authenticated user, else anonymous."""
        if request is None:
            return cls().with_actor(user)
        if user is None:
            user = getattr(request, "user", None)
        return cls(
            client_ip=client_ip(request), request_id=getattr(request, "request_id", "")
        ).with_actor(user)

    @classmethod
    def current(cls, *, user: Any = None) -> AuditContext:
        """The context of the request being served, or a system context outside requests."""
        return cls.from_request(current_request.get(), user=user)

    @classmethod
    def system(cls) -> AuditContext:
        """No person: the scheduler, a worker or a command acting on its own."""
        return cls()

    def with_actor(self, user: Any) -> AuditContext:
        if not _authenticated(user):
            return replace(self, actor_id=None, actor_username="")
        return replace(self, actor_id=user.pk, actor_username=user.get_username())

    @property
    def is_anonymous(self) -> bool:
        return self.actor_id is None


def _clean_text(value: str | None, limit: int) -> str:
    # PostgreSQL text refuses NUL; a path or username is never legitimately longer than limit.
    return _storable((value or "").replace("\x00", "\\x00")[:limit])


_SURROGATES = re.compile("[\ud800-\udfff]")


def _storable(text: str) -> str:
    """`text` as UTF-8 can hold it: a lone surrogate (JSON may carry "\\ud800", UTF-8 cannot)
    becomes U+FFFD, or the event (and every event sharing its group commit) could not be
    written and the request would go unrecorded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def _without_surrogates(value: Any) -> Any:
    """`value` (JSON data) with every lone surrogate in its strings and keys replaced."""
    if isinstance(value, str):
        return _storable(value)
    if isinstance(value, dict):
        return {_storable(str(key)): _without_surrogates(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_surrogates(item) for item in value]
    return value


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


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
        event_id = cursor.fetchone()[0]
    observers = _observers.get(fields.get("action", ""))
    if observers:
        _notify_on_commit(event_id, fields, observers)
    return event_id


# --- Observers --------------------------------------------------------------------------------
# Other areas react to what the trail records (security.threats scores failed logins, token
# reuse, decryptions and exports) without hooks in every caller: an observer subscribes to
# actions and is called with each such event once its transaction commits, never for one rolled
# back. It runs in the recording process; one that fails is logged and the others still run.
# (API request events, written in batches by compliance.writer, are not observed.)


@dataclass(frozen=True)
class RecordedEvent:
    """An event as recorded: its details redacted as they were stored."""

    id: int
    action: str
    context: AuditContext
    object_type: str
    object_id: str
    path: str
    details: dict


_observers: dict[str, list[Callable[[RecordedEvent], None]]] = {}


def observe(actions: Iterable[str], observer: Callable[[RecordedEvent], None]) -> None:
    """Call `observer` with every committed event of one of `actions` (idempotent)."""
    for action in actions:
        subscribed = _observers.setdefault(str(action), [])
        if observer not in subscribed:
            subscribed.append(observer)


def _notify_on_commit(
    event_id: int, fields: dict[str, Any], observers: list[Callable[[RecordedEvent], None]]
) -> None:
    # The context is fixed now: by commit time the request may be over.
    context = fields.get("context")
    try:
        details = redact(fields.get("details") or {}, mask=fields.get("mask", ()))
    except RecursionError:
        details = {}
    event = RecordedEvent(
        id=event_id,
        action=str(fields["action"]),
        context=context if context is not None else AuditContext.current(),
        object_type=str(fields.get("object_type", "")),
        object_id=str(fields.get("object_id", "")),
        path=str(fields.get("path", "")),
        details=details,
    )
    for observer in list(observers):
        transaction.on_commit(functools.partial(observer, event), robust=True)


def event_values(
    *,
    action: str,
    context: AuditContext | None = None,
    object_type: str = "",
    object_id: str | int = "",
    method: str = "",
    path: str = "",
    status_code: int | None = None,
    latency_ms: float | None = None,
    details: dict | None = None,
    mask: Iterable[str] = (),
    occurred_at: datetime | None = None,
) -> tuple:
    """The row `record_event` would insert, redacted and cleaned, in `_INSERT_COLUMNS` order.

    Without a context the current request's is used (or the system's outside a request).
    `mask` names extra detail keys the caller knows to be secret.
    """
    who = context if context is not None else AuditContext.current()
    actor_username = _clean_text(who.actor_username, 150)
    client = who.client_ip
    try:
        details_data = redact(details or {}, mask=mask)
    except RecursionError:
        details_data = _TOO_DEEP
    personal = actor_index = ip_index = ""
    if settings.AUDIT_PERSONAL_DATA:
        # The actor, the client IP and personal detail keys sealed under the data subject's
        # key: erasable by destroying the key, while the chain hashes the ciphertext
        # (compliance.personal).
        try:
            sealed = seal_event(
                actor_username=actor_username, client_ip=client, details=details_data
            )
        except UnicodeEncodeError:
            details_data = _without_surrogates(details_data)
            sealed = seal_event(
                actor_username=actor_username, client_ip=client, details=details_data
            )
        except RecursionError:
            sealed = seal_event(actor_username=actor_username, client_ip=client, details=_TOO_DEEP)
        actor_username, client, details_data = (
            sealed.actor_username,
            sealed.client_ip,
            sealed.details,
        )
        personal, actor_index, ip_index = sealed.personal, sealed.actor_index, sealed.ip_index
    try:
        details_text = canonical_json(details_data)
    except RecursionError:
        details_text = canonical_json(_TOO_DEEP)
    # ASCII, the common case, holds no surrogate: only other text is searched.
    if not details_text.isascii() and _SURROGATES.search(details_text):
        details_text = canonical_json(_without_surrogates(details_data))
    return (
        connection.ops.adapt_datetimefield_value(occurred_at or timezone.now()),
        who.actor_id,
        actor_username,
        client,
        _clean_text(who.request_id, 64),
        _clean_text(action, 64),
        _clean_text(object_type, 100),
        _clean_text(str(object_id), 100),
        _clean_text(method, 10),
        _clean_text(path, 500),
        status_code,
        None if latency_ms is None else round(latency_ms, 3),
        details_text,
        personal,
        actor_index,
        ip_index,
    )


def insert_event_rows(rows: list[tuple]) -> None:
    """Insert many prepared rows in one statement (one round trip, one commit in autocommit)."""
    if len(rows) == 1:
        # The common case when idle or in a sync worker: skip execute_values' assembly.
        with connection.cursor() as cursor:
            cursor.execute(_insert_sql(connection.vendor), rows[0])
    else:
        bulk_insert(AuditEvent, _INSERT_COLUMNS, rows)


def bulk_insert(model: type, columns: tuple[str, ...], rows: list[tuple]) -> None:
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
