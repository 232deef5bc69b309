"""SOX change trails: a before/after record of every row change in the audited tables.

The tables of `settings.SOX_AUDITED_MODELS` get database triggers (`sync_triggers`), so a
change is recorded however it is made: a model's save, a bulk `.update()`, raw SQL, a
migration's data step. Each change becomes one `SoxChange` row with the row before and after,
the columns that changed, who made it, the request it came with, why, and the transaction.

Who and why travel in the database session, not as arguments: `bridge.actor_id`,
`bridge.actor_username`, `bridge.request_id` and `bridge.reason` (PostgreSQL settings read by
the trigger with `current_setting`). Requests set them before their first write
(`request_context`, installed by the audit middleware: DRF authenticates inside the view, so
the user is only known then) and clear them at the end, so a pooled connection never carries
one request's actor into the next. Services, jobs and commands say who acts with
`change_context`.

Secret columns (`settings.SOX_SECRET_COLUMNS`) are never copied: the record says only whether
they changed. Nor are personal columns (`PERSONAL_FIELDS`: a user's names and email), which an
append-only record could never erase. An UPDATE that changes nothing is not recorded, nor one
that changes only the runtime state Bridge itself keeps on a row (`VOLATILE_FIELDS`: a health
check every few seconds, every login), which is not configuration.

PostgreSQL: one generic plpgsql function (`bridge_sox_capture`) run by an AFTER ROW trigger
named `bridge_sox_<table>` on each table; the change table itself is append-only (the audit
trail's guard function). SQLite (development and tests): TEMP triggers generated per table on
each of Bridge's own connections, reading who and why from a function registered on the
connection; they catch bulk and raw updates made through Bridge, but not other programs that
open the file directly (the sqlite3 shell, a restore's own connection).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.exceptions import FieldDoesNotExist
from django.db import DatabaseError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.functional import LazyObject, empty

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from compliance.models import SoxChange

log = logging.getLogger(__name__)

FUNCTION = "bridge_sox_capture"
PREFIX = "bridge_sox_"
SECRET_CHANGED = "<secret: changed>"  # noqa: S105 (a marker, not a secret)
SECRET_UNCHANGED = "<secret: unchanged>"  # noqa: S105
PERSONAL_CHANGED = "<personal: changed>"
PERSONAL_UNCHANGED = "<personal: unchanged>"
APPEND_ONLY_TRIGGERS = ("compliance_soxchange_append_only", "compliance_soxchange_no_truncate")

# Runtime state Bridge writes on audited rows by itself: a change to these fields alone is
# bookkeeping, not a configuration change, and is not recorded (a change to any other field
# still records the whole row, these included).
VOLATILE_FIELDS: dict[str, tuple[str, ...]] = {
    # Every login stamps it; logins are in the audit trail already.
    "security.User": ("last_login",),
    # The monitor writes a service's health after every check (every few seconds).
    "recovery.Service": (
        "status",
        "status_reason",
        "status_since",
        "consecutive_failures",
        "consecutive_successes",
        "last_checked_at",
        "last_latency_ms",
        "updated_at",
    ),
    # Celery beat saves each task's run count and time as it runs them.
    "django_celery_beat.PeriodicTask": ("last_run_at", "total_run_count", "date_changed"),
}

# Personal data on audited rows, recorded like secrets (only whether it changed): the change
# table is append-only and kept by legal obligation, so a value copied into it could never be
# erased (GDPR Art. 17), and an account's name and address are no configuration. The username
# stays: it is who was granted what, and the data subject id the erasure keeps on its records.
PERSONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "security.User": ("first_name", "last_name", "email"),
}

# Session settings the triggers read, in this order everywhere.
_SETTINGS = ("actor_id", "actor_username", "request_id", "reason")
_EMPTY = ("", "", "", "")
_REASON_LIMIT = 1000

# Set while a change_context is active: the request binding then leaves the session alone.
_explicit: ContextVar[bool] = ContextVar("bridge_sox_explicit", default=False)


# --- What is audited -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditedTable:
    """One table whose changes are recorded, and what its trigger needs to know."""

    label: str
    table: str
    pk_column: str
    secret_columns: tuple[str, ...] = ()
    volatile_columns: tuple[str, ...] = ()
    personal_columns: tuple[str, ...] = ()

    @property
    def trigger(self) -> str:
        return trigger_name(self.table)


def trigger_name(table: str) -> str:
    """`bridge_sox_<table>`, shortened with a hash past PostgreSQL's 63-byte names."""
    name = f"{PREFIX}{table}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(table.encode()).hexdigest()[:8]
    return f"{PREFIX}{table[:43]}_{digest}"


def audited_tables() -> list[AuditedTable]:
    """The tables of settings.SOX_AUDITED_MODELS (none while ENABLE_SOX_COMPLIANCE is off).

    A label that names no installed model is logged and skipped: a typo must not stop a
    migration (`installed_triggers()` shows what is really audited).
    """
    if not settings.ENABLE_SOX_COMPLIANCE:
        return []
    secrets = {name.strip().lower() for name in settings.SOX_SECRET_COLUMNS if name.strip()}
    found: dict[str, AuditedTable] = {}
    for label in settings.SOX_AUDITED_MODELS:
        try:
            app_label, model_name = label.split(".", 1)
            model = apps.get_model(app_label, model_name)
        except (ValueError, LookupError):
            log.warning("SOX_AUDITED_MODELS: %r is not an installed model; not audited", label)
            continue
        table = model._meta.db_table
        # The change table itself: a trigger there would record its own records, forever.
        if model is SoxChange or table in found:
            continue
        columns = [f.column for f in model._meta.concrete_fields]
        volatile = []
        for name in VOLATILE_FIELDS.get(model._meta.label, ()):
            with contextlib.suppress(FieldDoesNotExist):
                volatile.append(model._meta.get_field(name).column)
        hidden = tuple(c for c in columns if c.lower() in secrets)
        personal = []
        for name in PERSONAL_FIELDS.get(model._meta.label, ()):
            with contextlib.suppress(FieldDoesNotExist):
                column = model._meta.get_field(name).column
                if column not in hidden:
                    personal.append(column)
        found[table] = AuditedTable(
            label=label,
            table=table,
            pk_column=model._meta.pk.column,
            secret_columns=hidden,
            volatile_columns=tuple(volatile),
            personal_columns=tuple(personal),
        )
    return list(found.values())


# --- Installing the triggers ---------------------------------------------------------------


def sync_triggers(*, context: AuditContext | None = None, audit: bool = True) -> list[str]:
    """Install, update and drop the change triggers to match the settings (idempotent).

    Returns what it changed (empty when everything already matched). On PostgreSQL a change
    is recorded in the audit trail (`sox.triggers_synced`) unless `audit` is off (a database
    being created has no history yet). On SQLite the triggers belong to this connection.
    """
    connection = connections["default"]
    desired = audited_tables()
    if connection.vendor == "postgresql":
        changes = _sync_postgres(connection, desired)
        if changes and audit:
            record_event(
                action=AuditAction.SOX_TRIGGERS_SYNCED,
                context=context or AuditContext.system(),
                object_type="compliance.soxchange",
                details={"changes": changes, "tables": [t.table for t in desired]},
            )
        return changes
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        return _sync_sqlite(connection, desired)
    log.warning("SOX change capture: %s is not supported; nothing installed", connection.vendor)
    return []


def capture_gaps() -> list[dict[str, str]]:
    """Audited tables whose changes are not being recorded right now, and why: the trigger is
    missing, disabled or altered (someone with rights on the database took it away to change
    rows unrecorded), or the change table lost its append-only guard. PostgreSQL only: on
    SQLite the triggers belong to each of Bridge's own connections and are installed as it
    opens. Empty while ENABLE_SOX_COMPLIANCE is off."""
    connection = connections["default"]
    if connection.vendor != "postgresql" or not settings.ENABLE_SOX_COMPLIANCE:
        return []
    gaps: list[dict[str, str]] = []
    with connection.cursor() as cursor:
        existing = set(connection.introspection.table_names(cursor))
        found = {(name, table): (args, ok) for name, table, args, ok in _pg_triggers(cursor)}
        for table in audited_tables():
            if table.table not in existing:
                continue
            current = found.get((table.trigger, table.table))
            if current is None:
                problem = f"no change trigger ({table.trigger}) on the table"
            elif not current[1]:
                problem = f"its change trigger {table.trigger} is disabled or altered"
            elif current[0] != _pg_args(table):
                problem = f"its change trigger {table.trigger} records other columns than set"
            else:
                continue
            gaps.append({"table": table.table, "model": table.label, "problem": problem})
        change_table = SoxChange._meta.db_table
        cursor.execute(
            "SELECT t.tgname FROM pg_catalog.pg_trigger t "
            "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = %s AND n.nspname = current_schema() AND t.tgenabled = 'O' "
            "AND t.tgname = ANY(%s)",
            [change_table, list(APPEND_ONLY_TRIGGERS)],
        )
        guarded = {row[0] for row in cursor.fetchall()}
        for name in APPEND_ONLY_TRIGGERS:
            if name not in guarded:
                gaps.append(
                    {
                        "table": change_table,
                        "model": SoxChange._meta.label,
                        "problem": f"its append-only trigger {name} is missing or disabled",
                    }
                )
    return gaps


def installed_triggers() -> dict[str, str]:
    """Trigger name -> table of the change triggers present now (this connection's on SQLite)."""
    connection = connections["default"]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            return {row[0]: row[1] for row in _pg_triggers(cursor)}
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        return {name: table for name, table, _ in _sqlite_triggers(connection)}
    return {}


# PostgreSQL -----------------------------------------------------------------------------------

# TG_ARGV: 0 model label, 1 primary key column, 2 secret columns, 3 volatile columns, 4
# personal columns (CSV).
_PG_BODY = r"""
DECLARE
    old_row jsonb;
    new_row jsonb;
    secrets text[] := string_to_array(TG_ARGV[2], ',');
    volatile text[] := string_to_array(TG_ARGV[3], ',');
    personal text[] := string_to_array(coalesce(TG_ARGV[4], ''), ',');
    changed text[];
    pk text;
    secret text;
    actor text := current_setting('bridge.actor_id', true);
BEGIN
    IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;
    IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;
    SELECT coalesce(array_agg(key ORDER BY key), '{}') INTO changed
      FROM jsonb_object_keys(coalesce(old_row, '{}'::jsonb) || coalesce(new_row, '{}'::jsonb))
           AS keys(key)
     WHERE old_row -> key IS DISTINCT FROM new_row -> key;
    -- Nothing changed, or only the runtime state Bridge keeps on the row.
    IF TG_OP = 'UPDATE' AND changed <@ volatile THEN
        RETURN NULL;
    END IF;
    pk := coalesce(new_row, old_row) ->> TG_ARGV[1];
    -- Secrets: only whether they changed, never the value (before or after).
    FOREACH secret IN ARRAY secrets LOOP
        IF old_row ? secret THEN
            old_row := jsonb_set(old_row, ARRAY[secret], to_jsonb(
                CASE WHEN secret = ANY(changed) THEN '<secret: changed>'
                     ELSE '<secret: unchanged>' END));
        END IF;
        IF new_row ? secret THEN
            new_row := jsonb_set(new_row, ARRAY[secret], to_jsonb(
                CASE WHEN secret = ANY(changed) THEN '<secret: changed>'
                     ELSE '<secret: unchanged>' END));
        END IF;
    END LOOP;
    -- Personal data: the same, so nothing in this append-only table needs erasing later.
    FOREACH secret IN ARRAY personal LOOP
        IF old_row ? secret THEN
            old_row := jsonb_set(old_row, ARRAY[secret], to_jsonb(
                CASE WHEN secret = ANY(changed) THEN '<personal: changed>'
                     ELSE '<personal: unchanged>' END));
        END IF;
        IF new_row ? secret THEN
            new_row := jsonb_set(new_row, ARRAY[secret], to_jsonb(
                CASE WHEN secret = ANY(changed) THEN '<personal: changed>'
                     ELSE '<personal: unchanged>' END));
        END IF;
    END LOOP;
    INSERT INTO compliance_soxchange (
        occurred_at, table_name, model, object_pk, operation, "before", "after",
        changed_fields, actor_id, actor_username, request_id, reason, transaction_id
    ) VALUES (
        clock_timestamp(), TG_TABLE_NAME, left(TG_ARGV[0], 100), left(coalesce(pk, ''), 100),
        TG_OP, old_row, new_row, to_jsonb(changed),
        CASE WHEN actor ~ '^[0-9]{1,18}$' THEN actor::bigint END,
        left(coalesce(current_setting('bridge.actor_username', true), ''), 150),
        left(coalesce(current_setting('bridge.request_id', true), ''), 64),
        coalesce(current_setting('bridge.reason', true), ''),
        txid_current()
    );
    RETURN NULL;
END;
"""

# AFTER, ROW, INSERT, DELETE, UPDATE (pg_trigger.tgtype bits 1, 4, 8, 16; no BEFORE bit 2).
_PG_TGTYPE = 1 | 4 | 8 | 16


def _pg_args(table: AuditedTable) -> tuple[str, ...]:
    return (
        table.label,
        table.pk_column,
        ",".join(table.secret_columns),
        ",".join(table.volatile_columns),
        ",".join(table.personal_columns),
    )


def _pg_triggers(cursor: Any) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """(name, table, arguments, healthy) of every change trigger in the current schema;
    healthy: enabled, of the expected kind and calling the capture function."""
    cursor.execute(
        "SELECT t.tgname, c.relname, t.tgargs, t.tgenabled, t.tgtype, p.proname "
        "FROM pg_catalog.pg_trigger t "
        "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid "
        "WHERE NOT t.tgisinternal AND t.tgname LIKE %s AND n.nspname = current_schema()",
        [PREFIX.replace("_", r"\_") + "%"],
    )
    found = []
    for name, table, raw_args, enabled, tgtype, function in cursor.fetchall():
        parts = bytes(raw_args).split(b"\x00")[:-1] if raw_args else []
        args = tuple(part.decode() for part in parts)
        healthy = enabled == "O" and tgtype == _PG_TGTYPE and function == FUNCTION
        found.append((name, table, args, healthy))
    return found


def _pg_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sync_postgres(connection: BaseDatabaseWrapper, desired: list[AuditedTable]) -> list[str]:
    quote = connection.ops.quote_name
    changes: list[str] = []
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        # Two processes syncing at once (a deploy's migrate, the command) take turns.
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('bridge_sox_sync'))")
        existing_tables = set(connection.introspection.table_names(cursor))
        cursor.execute(
            "SELECT p.prosrc FROM pg_catalog.pg_proc p "
            "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
            "WHERE p.proname = %s AND n.nspname = current_schema()",
            [FUNCTION],
        )
        row = cursor.fetchone()
        if row is None or row[0] != _PG_BODY:
            cursor.execute(
                f"CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger "
                f"LANGUAGE plpgsql AS $bridge_sox${_PG_BODY}$bridge_sox$"
            )
            changes.append(f"{'installed' if row is None else 'updated'} function {FUNCTION}")
        installed = {(name, table): (args, ok) for name, table, args, ok in _pg_triggers(cursor)}
        wanted: set[tuple[str, str]] = set()
        for table in desired:
            if table.table not in existing_tables:
                log.warning("SOX: table %s (%s) does not exist yet", table.table, table.label)
                continue
            wanted.add((table.trigger, table.table))
            args = _pg_args(table)
            current = installed.get((table.trigger, table.table))
            if current is not None:
                if current == (args, True):
                    continue
                cursor.execute(f"DROP TRIGGER {quote(table.trigger)} ON {quote(table.table)}")
                verb = "updated"
            else:
                verb = "installed"
            cursor.execute(
                f"CREATE TRIGGER {quote(table.trigger)} "
                f"AFTER INSERT OR UPDATE OR DELETE ON {quote(table.table)} "
                f"FOR EACH ROW EXECUTE FUNCTION {FUNCTION}"
                f"({', '.join(_pg_literal(arg) for arg in args)})"
            )
            changes.append(f"{verb} {table.trigger} on {table.table}")
        for name, table_name in sorted(installed):
            if (name, table_name) not in wanted:
                cursor.execute(f"DROP TRIGGER {quote(name)} ON {quote(table_name)}")
                changes.append(f"dropped {name} on {table_name}")
        changes += _pg_append_only(cursor, quote)
    if changes:
        log.warning("SOX change capture synced: %s", "; ".join(changes))
    return changes


def _pg_append_only(cursor: Any, quote: Callable[[str], str]) -> list[str]:
    """The change table refuses UPDATE, DELETE and TRUNCATE, like the audit trail (the guard
    function comes from compliance's migration 0002)."""
    table = SoxChange._meta.db_table
    cursor.execute(
        "SELECT t.tgname FROM pg_catalog.pg_trigger t "
        "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND n.nspname = current_schema() AND t.tgenabled = 'O' "
        "AND t.tgname = ANY(%s)",
        [table, list(APPEND_ONLY_TRIGGERS)],
    )
    present = {row[0] for row in cursor.fetchall()}
    changes = []
    for name, timing in zip(
        APPEND_ONLY_TRIGGERS,
        ("BEFORE UPDATE OR DELETE", "BEFORE TRUNCATE"),
        strict=True,
    ):
        if name in present:
            continue
        level = "STATEMENT" if "TRUNCATE" in timing else "ROW"
        cursor.execute(f"DROP TRIGGER IF EXISTS {quote(name)} ON {quote(table)}")
        cursor.execute(
            f"CREATE TRIGGER {quote(name)} {timing} ON {quote(table)} "
            f"FOR EACH {level} EXECUTE FUNCTION compliance_append_only()"
        )
        changes.append(f"installed {name} on {table}")
    return changes


# SQLite ---------------------------------------------------------------------------------------

# SQLite's json_object takes at most 127 arguments: rows are built in pieces and patched.
_JSON_PIECE = 50


def _sqlite_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sqlite_json(columns: list[tuple[str, str]], row: str, secrets: dict[str, str]) -> str:
    pieces = []
    for start in range(0, len(columns), _JSON_PIECE):
        args = []
        for name, kind in columns[start : start + _JSON_PIECE]:
            if name in secrets:
                value = secrets[name]
            elif "blob" in kind.lower():
                value = f'hex({row}."{name}")'
            else:
                value = f'{row}."{name}"'
            args.append(f"{_sqlite_string(name)}, {value}")
        pieces.append(f"json_object({', '.join(args)})")
    built = pieces[0] if pieces else "json_object()"
    for piece in pieces[1:]:
        built = f"json_patch({built}, {piece})"
    return built


def _sqlite_trigger_sql(table: AuditedTable, columns: list[tuple[str, str]]) -> dict[str, str]:
    """The three triggers of one table (SQLite has one event per trigger), by name."""
    names = sorted(name for name, _ in columns)
    secret = [name for name in names if name in table.secret_columns]
    personal = [name for name in names if name in table.personal_columns]
    watched = [name for name in names if name not in table.volatile_columns]
    marked = [(name, SECRET_CHANGED, SECRET_UNCHANGED) for name in secret] + [
        (name, PERSONAL_CHANGED, PERSONAL_UNCHANGED) for name in personal
    ]
    changed_marks = {
        name: f"CASE WHEN OLD.\"{name}\" IS NEW.\"{name}\" THEN '{unchanged}' ELSE '{changed}' END"
        for name, changed, unchanged in marked
    }
    always = {name: f"'{changed}'" for name, changed, _ in marked}
    all_names = "json_array(" + ", ".join(_sqlite_string(name) for name in names) + ")"
    which = " UNION ALL ".join(
        f'SELECT {_sqlite_string(name)} AS name WHERE OLD."{name}" IS NOT NEW."{name}"'
        for name in names
    )
    # Only column names read from the table itself are interpolated, quoted.
    updated = f"(SELECT json_group_array(name) FROM ({which}))"  # noqa: S608
    pk = table.pk_column
    common = f"bridge_sox_now(), {_sqlite_string(table.table)}, {_sqlite_string(table.label[:100])}"
    who = (
        "CAST(NULLIF(bridge_sox_setting('actor_id'), '') AS INTEGER), "
        "coalesce(bridge_sox_setting('actor_username'), ''), "
        "coalesce(bridge_sox_setting('request_id'), ''), "
        "coalesce(bridge_sox_setting('reason'), ''), NULL"
    )
    insert = (
        "INSERT INTO compliance_soxchange (occurred_at, table_name, model, object_pk, "
        '"operation", "before", "after", changed_fields, actor_id, actor_username, '
        "request_id, reason, transaction_id) VALUES "
    )
    ref = f'main."{table.table}"'
    statements = {
        "insert": (
            f"AFTER INSERT ON {ref} FOR EACH ROW BEGIN {insert}({common}, "
            f"CAST(NEW.\"{pk}\" AS TEXT), 'INSERT', NULL, "
            f"{_sqlite_json(columns, 'NEW', always)}, {all_names}, {who}); END"
        ),
        "update": (
            f"AFTER UPDATE ON {ref} FOR EACH ROW WHEN "
            + (" OR ".join(f'OLD."{name}" IS NOT NEW."{name}"' for name in watched) or "0")
            + f" BEGIN {insert}({common}, CAST(NEW.\"{pk}\" AS TEXT), 'UPDATE', "
            f"{_sqlite_json(columns, 'OLD', changed_marks)}, "
            f"{_sqlite_json(columns, 'NEW', changed_marks)}, {updated}, {who}); END"
        ),
        "delete": (
            f"AFTER DELETE ON {ref} FOR EACH ROW BEGIN {insert}({common}, "
            f"CAST(OLD.\"{pk}\" AS TEXT), 'DELETE', {_sqlite_json(columns, 'OLD', always)}, "
            f"NULL, {all_names}, {who}); END"
        ),
    }
    prefix = table.trigger[:55]
    return {
        f"{prefix}_{event}": f'CREATE TRIGGER "{prefix}_{event}" {body}'
        for event, body in statements.items()
    }


def _sqlite_triggers(connection: BaseDatabaseWrapper) -> list[tuple[str, str, str]]:
    rows = connection.connection.execute(
        "SELECT name, tbl_name, sql FROM sqlite_temp_master "
        "WHERE type = 'trigger' AND name LIKE ? ESCAPE '\\'",
        [PREFIX.replace("_", "\\_") + "%"],
    ).fetchall()
    return [(name, table, sql) for name, table, sql in rows]


def _sync_sqlite(connection: BaseDatabaseWrapper, desired: list[AuditedTable]) -> list[str]:
    raw = connection.connection
    existing_tables = {
        row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    wanted: dict[str, tuple[str, str]] = {}
    if SoxChange._meta.db_table in existing_tables:
        for table in desired:
            if table.table not in existing_tables:
                continue
            columns = [
                (row[1], row[2] or "")
                for row in raw.execute(f'PRAGMA main.table_info("{table.table}")').fetchall()
            ]
            for name, sql in _sqlite_trigger_sql(table, columns).items():
                wanted[name] = (table.table, sql)
    installed = {name: (table, sql) for name, table, sql in _sqlite_triggers(connection)}
    changes = []
    for name, (table_name, sql) in installed.items():
        if wanted.get(name, (None, None))[1] != sql:
            raw.execute(f'DROP TRIGGER IF EXISTS temp."{name}"')
            if name not in wanted:
                changes.append(f"dropped {name} on {table_name}")
    for name, (table_name, sql) in wanted.items():
        current = installed.get(name)
        if current is not None and current[1] == sql:
            continue
        raw.execute("CREATE TEMP TRIGGER" + sql[len("CREATE TRIGGER") :])
        changes.append(f"{'updated' if current else 'installed'} {name} on {table_name}")
    return changes


def _drop_sqlite(connection: BaseDatabaseWrapper) -> None:
    for name, _, _ in _sqlite_triggers(connection):
        connection.connection.execute(f'DROP TRIGGER IF EXISTS temp."{name}"')


@contextlib.contextmanager
def capture_paused() -> Iterator[None]:
    """SQLite only: no change records while inside (a test database being emptied row by row,
    which PostgreSQL does with TRUNCATE and its triggers off). A no-op on PostgreSQL."""
    connection = connections["default"]
    if connection.vendor != "sqlite":
        yield
        return
    connection.ensure_connection()
    _drop_sqlite(connection)
    try:
        yield
    finally:
        _sync_sqlite(connection, audited_tables())


# --- Who and why ---------------------------------------------------------------------------


def _clean(value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    # PostgreSQL settings and text refuse NUL; other control characters are noise in a trail.
    text = "".join(ch if ch.isprintable() or ch in "\t " else " " for ch in text)
    return text.strip()[:limit]


def _values(actor: Any, request_id: str = "", reason: str = "") -> tuple[str, str, str, str]:
    actor_id, username = "", ""
    if isinstance(actor, AuditContext):
        actor_id = "" if actor.actor_id is None else str(actor.actor_id)
        username = actor.actor_username
    elif actor is not None and getattr(actor, "is_authenticated", False):
        actor_id, username = str(actor.pk), actor.get_username()
    elif isinstance(actor, str):
        username = actor
    return (
        actor_id,
        _clean(username, 150),
        _clean(request_id, 64),
        _clean(reason, _REASON_LIMIT),
    )


def _state(connection: BaseDatabaseWrapper) -> dict[str, str]:
    """SQLite: the per-connection values the registered function reads."""
    state = getattr(connection, "bridge_sox_state", None)
    if state is None:
        state = {}
        connection.bridge_sox_state = state
    return state


def _write(connection: BaseDatabaseWrapper, values: tuple[str, str, str, str]) -> None:
    """Put who and why into the session (the raw cursor: no execute wrapper sees it)."""
    if connection.vendor == "sqlite":
        state = _state(connection)
        state.clear()
        state.update(zip(_SETTINGS, values, strict=True))
        return
    if connection.vendor != "postgresql":
        return
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(
            "SELECT " + ", ".join(f"set_config('bridge.{name}', %s, false)" for name in _SETTINGS),
            list(values),
        )


def _read(connection: BaseDatabaseWrapper) -> tuple[str, str, str, str]:
    if connection.vendor == "sqlite":
        state = _state(connection)
        return tuple(state.get(name, "") for name in _SETTINGS)  # type: ignore[return-value]
    if connection.vendor != "postgresql":
        return _EMPTY
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(
            "SELECT " + ", ".join(f"current_setting('bridge.{name}', true)" for name in _SETTINGS)
        )
        return tuple(value or "" for value in cursor.fetchone())  # type: ignore[return-value]


def current_context() -> dict[str, str]:
    """Who and why the session says now (what a trigger would record)."""
    return dict(zip(_SETTINGS, _read(connections["default"]), strict=True))


@contextlib.contextmanager
def change_context(*, actor: Any, request_id: str = "", reason: str = "") -> Iterator[None]:
    """Record changes made inside as made by `actor` (a user, an AuditContext or None for the
    system), with this request id and reason: for services, jobs and commands.

    The previous values come back on exit; inside a transaction that rolls back, PostgreSQL
    undoes the setting with it.
    """
    connection = connections["default"]
    values = _values(actor, request_id, reason)
    token = _explicit.set(True)
    previous = _read(connection)
    _write(connection, values)
    try:
        yield
    finally:
        _explicit.reset(token)
        with contextlib.suppress(DatabaseError, transaction.TransactionManagementError):
            _write(connection, previous)


def reason_from(request: HttpRequest) -> str:
    """The change reason a client gave in the `X-Change-Reason` header (cleaned, capped)."""
    return _clean(request.META.get("HTTP_X_CHANGE_REASON", ""), _REASON_LIMIT)


def _known_user(request: HttpRequest) -> Any:
    """The request's user if it is known by now, never loading it (which would be a query
    from inside the execute wrapper)."""
    user = request.__dict__.get("user")
    if isinstance(user, LazyObject):
        wrapped = user._wrapped
        if wrapped is empty:
            return None
        user = wrapped
    return user if getattr(user, "is_authenticated", False) else None


_READ_ONLY = frozenset(
    {"SELECT", "SAVEPOINT", "RELEASE", "ROLLBACK", "SHOW", "EXPLAIN", "BEGIN", "COMMIT", "SET"}
)


def _is_write(sql: str) -> bool:
    head = sql.lstrip(" \t\r\n(")[:10].split(None, 1)
    return bool(head) and head[0].upper() not in _READ_ONLY


@dataclass
class _Pushed:
    values: tuple[str, str, str, str]
    # Where it was set: inside an atomic block, a rollback undoes it.
    atomic: Any = None
    savepoints: tuple = ()
    committed: list = field(default_factory=lambda: [False])


class _RequestBinding:
    """An execute wrapper for one request: before a write, puts the request's actor, id and
    reason into the session when the session does not hold them already.

    Only writes pay (a read-only request never touches the session), and only once while the
    values stand; a value set inside a transaction that may have rolled back is set again.
    """

    def __init__(self, request: HttpRequest, connection: BaseDatabaseWrapper) -> None:
        self.request = request
        self.connection = connection
        self.reason = reason_from(request)
        self.pushed: _Pushed | None = None

    def desired(self) -> tuple[str, str, str, str]:
        return _values(
            _known_user(self.request), getattr(self.request, "request_id", ""), self.reason
        )

    def _still_set(self, values: tuple[str, str, str, str]) -> bool:
        pushed = self.pushed
        if pushed is None or pushed.values != values:
            return False
        if pushed.atomic is None or pushed.committed[0]:
            return True
        connection = self.connection
        return (
            connection.in_atomic_block
            and connection.atomic_blocks[0] is pushed.atomic
            and tuple(connection.savepoint_ids[: len(pushed.savepoints)]) == pushed.savepoints
        )

    def push(self) -> None:
        values = self.desired()
        if self._still_set(values):
            return
        connection = self.connection
        _write(connection, values)
        if connection.in_atomic_block:
            pushed = _Pushed(values, connection.atomic_blocks[0], tuple(connection.savepoint_ids))
            flag = pushed.committed
            transaction.on_commit(lambda: flag.__setitem__(0, True), using=connection.alias)
        else:
            pushed = _Pushed(values)
        self.pushed = pushed

    def __call__(self, execute: Callable, sql: str, params: Any, many: bool, context: dict) -> Any:
        if not _explicit.get() and isinstance(sql, str) and _is_write(sql):
            self.push()
        return execute(sql, params, many, context)

    def close(self) -> None:
        if self.pushed is None:
            return
        self.pushed = None
        try:
            _write(self.connection, _EMPTY)
        except (DatabaseError, transaction.TransactionManagementError):
            # A connection that cannot take the reset cannot be trusted with the values:
            # the next request gets a fresh one.
            log.warning("could not clear the SOX change context; closing the connection")
            with contextlib.suppress(Exception):
                self.connection.close()


@contextlib.contextmanager
def request_context(request: HttpRequest) -> Iterator[None]:
    """Around one request: changes it makes are recorded with its actor, id and reason."""
    connection = connections["default"]
    if not settings.ENABLE_SOX_COMPLIANCE or connection.vendor not in ("postgresql", "sqlite"):
        yield
        return
    binding = _RequestBinding(request, connection)
    try:
        with connection.execute_wrapper(binding):
            yield
    finally:
        binding.close()


# --- Reading the trail ---------------------------------------------------------------------


def changes(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    table: str | None = None,
) -> QuerySet[SoxChange]:
    """Recorded changes, newest first: from `since` (inclusive) to `until` (exclusive), of one
    table (its name or its model label) if given."""
    rows = SoxChange.objects.all()
    if since is not None:
        rows = rows.filter(occurred_at__gte=since)
    if until is not None:
        rows = rows.filter(occurred_at__lt=until)
    if table:
        rows = rows.filter(Q(table_name=table) | Q(model=table))
    return rows.order_by("-id")


# --- Wiring --------------------------------------------------------------------------------


def _fresh_database(plan: Any) -> bool:
    """Whether this migrate created compliance's tables (a new database: nothing to audit)."""
    for migration, backwards in plan or ():
        if not backwards and (migration.app_label, migration.name) == (
            "compliance",
            "0001_initial",
        ):
            return True
    return False


def after_migrate(sender: Any, using: str = "default", plan: Any = None, **kwargs: Any) -> None:
    """post_migrate (and after a test database's flush): triggers as the settings say."""
    if using != "default":
        return
    sync_triggers(audit=not _fresh_database(plan))


def before_migrate(sender: Any, using: str = "default", plan: Any = None, **kwargs: Any) -> None:
    """pre_migrate on SQLite: no triggers while tables are rebuilt (SQLite's rename checks
    every trigger, and one naming a table mid-rebuild would fail the migration)."""
    if using != "default" or not plan:
        return
    connection = connections["default"]
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        _drop_sqlite(connection)


def on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """SQLite: register the function the triggers read who and why from, and install this
    connection's triggers."""
    if connection.vendor != "sqlite" or connection.alias != "default":
        return
    state = _state(connection)

    def setting(name: str) -> str | None:
        return state.get(name) or None

    def now() -> str:
        # SQLite's own clock has millisecond precision; Django stores microseconds.
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    connection.connection.create_function("bridge_sox_setting", 1, setting, deterministic=False)
    connection.connection.create_function("bridge_sox_now", 0, now, deterministic=False)
    try:
        _sync_sqlite(connection, audited_tables())
    except Exception:
        # A database without its tables yet (being created): post_migrate installs them.
        log.debug("SOX triggers not installed on a new SQLite connection", exc_info=True)
