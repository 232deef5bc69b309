"""Databases: Bridge's own (PostgreSQL or SQLite) and the PostgreSQL databases of the stack.

Units: "database-default" is Bridge's own database (settings.DATABASES["default"]); each URL of
settings.BACKUP_DATABASES is a unit "database-<dbname>" (PostgreSQL only).

Backups write plaintext; backups/stream.py compresses and encrypts.
- PostgreSQL: `pg_dump -Fc -Z0` streamed from its stdout, never held whole. The dump runs in a
  snapshot exported by a REPEATABLE READ transaction which, meanwhile, counts every table's
  rows in that same snapshot: the manifest's counts are exactly the dump's even while the
  database is being written, so a drill compares them exactly.
- SQLite: the online backup API into a scratch copy, streamed as the file itself.
- Data-subject keys (security.crypto.SUBJECT_KEY_TABLES) are never in a dump: they have a
  short-lived backup of their own, so a shredded key cannot come back with a restored database
  (a PostgreSQL dump leaves their data out; the SQLite copy deletes them and is vacuumed so no
  free page keeps them).

Restores are all or nothing.
- Scratch (drills): a database "<db>_drill_<tag>" on the same server, or a file under
  scratch_dir. PostgreSQL: the pre-data and data sections stream into pg_restore while the dump
  is spooled to a file; the post-data section (indexes, constraints: most of a restore's CPU)
  then runs `pg_restore -j2` from that file.
- Live: refused (RestoreRefused, nothing changed) for another engine, a newer server major or
  another schema (applied migrations). PostgreSQL: the dump is spooled first (a reader that
  fails leaves the database untouched), then psql runs pg_restore's script in one transaction
  that first locks every table it will replace, giving up after the lock timeout (live writers
  make the restore refused, never hang or half apply), and commits only if pg_restore and every
  statement succeeded. SQLite: one transaction on the live file. Bridge's own database keeps its
  history tables (preserved_tables()); stack databases are restored whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg2
from django.apps import apps
from django.conf import settings
from django.db import connections
from psycopg2.extensions import ISOLATION_LEVEL_REPEATABLE_READ, parse_dsn

from backups.components import (
    ComponentError,
    ComponentHandler,
    Destination,
    OnBytes,
    Opener,
    RestoreRefused,
    Unit,
    register,
)
from compliance.redaction import redact_text
from security import crypto

COMPONENT = "database"
OWN_UNIT = "database-default"
POSTGRESQL = "postgresql"
SQLITE = "sqlite"

# Bytes per read and write of a stream: large, so a gigabyte is a thousand system calls.
CHUNK = 1024 * 1024
# Longest error text kept from a tool's stderr (its end says what failed).
_STDERR_TAIL = 4000
# How long a live restore waits for a table lock held by live traffic before it is refused
# (settings.BACKUP_RESTORE_LOCK_TIMEOUT, a timedelta or seconds, overrides).
DEFAULT_LOCK_TIMEOUT = timedelta(seconds=5)

# --- What a live restore of Bridge's own database keeps ---------------------------------------
# These tables record what happened after the backup was taken; restoring the database must not
# rewind them:
# - the audit trail (events, their seals in the hash chain, the chain head and the signed
#   checkpoints): rewinding it would delete evidence (and the chain head must stay consistent
#   with the seals), including the events of the restore itself;
# - bridge.Job: the jobs that ran since, among them the restore's own job and its safety backup;
# - every table of the backups app: the catalog must still know every backup and copy made
#   since (the safety backup taken just before this restore included) and archived WAL;
# - the data-subject keys: never in a dump, so restoring would empty them and make every
#   subject's data unreadable; erasures made since stay final;
# - django_migrations: the schema is not rewound (the preflight requires the same migrations),
#   so the record of it stays as it is;
# - GDPR records: the erasure log (compliance.dsr.reapply_erasures runs every erasure again
#   on the restored rows right after the restore), data-subject requests and their deadlines,
#   consent given or withdrawn since (a withdrawal must not be undone) and the notices it was
#   given against;
# - SOX records: the change trail (evidence, append-only) and the second-approval requests,
#   among them the one that approved this very restore.
PRESERVED_MODELS: tuple[str, ...] = (
    "compliance.AuditEvent",
    "compliance.AuditSeal",
    "compliance.AuditChainHead",
    "compliance.AuditCheckpoint",
    "bridge.Job",
    "security.SubjectKey",
    "compliance.ErasureRecord",
    "compliance.DataSubjectRequest",
    "compliance.ConsentEvent",
    "compliance.PrivacyNotice",
    "compliance.SoxChange",
    "compliance.ApprovalRequest",
)
PRESERVED_APPS: tuple[str, ...] = ("backups",)
PRESERVED_EXTRA_TABLES: tuple[str, ...] = ("django_migrations",)


def preserved_tables() -> list[str]:
    """The tables a live restore of Bridge's own database leaves untouched (see above)."""
    tables: set[str] = set(PRESERVED_EXTRA_TABLES) | set(crypto.SUBJECT_KEY_TABLES)
    models = [apps.get_model(label) for label in PRESERVED_MODELS]
    for label in PRESERVED_APPS:
        models.extend(apps.get_app_config(label).get_models())
    for model in models:
        opts = model._meta
        tables.add(opts.db_table)
        for relation in opts.local_many_to_many:
            through = relation.remote_field.through
            if through._meta.auto_created:
                tables.add(through._meta.db_table)
    return sorted(tables)


def lock_timeout() -> float:
    """Seconds a live restore waits for a lock before it is refused."""
    value = getattr(settings, "BACKUP_RESTORE_LOCK_TIMEOUT", None) or DEFAULT_LOCK_TIMEOUT
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return max(seconds, 0.001)


# --- Connections --------------------------------------------------------------------------

# libpq keywords Django's OPTIONS may carry on to pg_dump and psql (others are Django's own).
_LIBPQ_KEYWORDS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "options",
        "application_name",
        "connect_timeout",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "sslpassword",
        "sslcompression",
        "gssencmode",
        "krbsrvname",
        "target_session_attrs",
        "service",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
    }
)


@dataclass(frozen=True)
class PgServer:
    """One PostgreSQL database as libpq keywords. The password only goes to psycopg2 and to
    the tools' PGPASSWORD, never onto a command line or into a manifest."""

    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_django(cls, settings_dict: dict[str, Any]) -> PgServer:
        params = {
            key: str(value)
            for key, value in (settings_dict.get("OPTIONS") or {}).items()
            if key in _LIBPQ_KEYWORDS and value not in (None, "")
        }
        for key, name in (
            ("dbname", "NAME"),
            ("user", "USER"),
            ("password", "PASSWORD"),
            ("host", "HOST"),
            ("port", "PORT"),
        ):
            if settings_dict.get(name) not in (None, ""):
                params[key] = str(settings_dict[name])
        return cls(params)

    @classmethod
    def from_url(cls, url: str) -> PgServer:
        try:
            params = parse_dsn(url)
        except psycopg2.ProgrammingError as exc:
            raise ComponentError(f"not a PostgreSQL URL: {public_url(url)}") from exc
        return cls({key: value for key, value in params.items() if value not in (None, "")})

    @property
    def dbname(self) -> str:
        return self.params.get("dbname", "")

    def with_dbname(self, dbname: str) -> PgServer:
        return PgServer({**self.params, "dbname": dbname})

    def conninfo(self) -> str:
        """A libpq connection string for the tools: no password, no options (PGOPTIONS)."""
        return " ".join(
            f"{key}={_conninfo_value(value)}"
            for key, value in sorted(self.params.items())
            if key not in ("password", "options")
        )

    def options(self, *extra: str) -> str:
        # The connection's own options (Django's carry a statement_timeout made for web
        # requests) with ours after them, so ours win: a dump or restore may take hours.
        return " ".join(part for part in (self.params.get("options", ""), *extra) if part)

    def env(self, *options: str) -> dict[str, str]:
        env = dict(os.environ)
        if self.params.get("password"):
            env["PGPASSWORD"] = self.params["password"]
        env["PGOPTIONS"] = self.options("-c statement_timeout=0", *options)
        return env

    def connect(self) -> Any:
        params = dict(self.params)
        params["options"] = self.options("-c statement_timeout=0")
        params.setdefault("connect_timeout", "10")
        params.setdefault("application_name", "bridge-backup")
        try:
            return psycopg2.connect(**params)
        except psycopg2.Error as exc:
            where = f"{params.get('host', 'local socket')}:{params.get('port', '5432')}"
            raise ComponentError(
                f"cannot connect to PostgreSQL database {params.get('dbname')!r} at {where}: "
                f"{_clean(str(exc))}",
                "database_unreachable",
            ) from exc


def _conninfo_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def public_url(url: str) -> str:
    """A database URL without its password (in the netloc or a password= parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        netloc = f"{credentials.split(':', 1)[0]}@{host}"
    query = urlencode(
        [(key, value) for key, value in parse_qsl(parts.query) if key.lower() != "password"]
    )
    return redact_text(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def _clean(text: str) -> str:
    """A tool's or driver's message made safe to store: secrets redacted, the end kept."""
    text = redact_text(text.strip())
    return text if len(text) <= _STDERR_TAIL else "..." + text[-_STDERR_TAIL:]


def own_engine() -> str:
    vendor = connections["default"].vendor
    return {"postgresql": POSTGRESQL, "sqlite": SQLITE}.get(vendor, vendor)


def stack_databases() -> dict[str, str]:
    """Unit name -> URL of every BACKUP_DATABASES entry, in order."""
    found: dict[str, str] = {}
    for url in settings.BACKUP_DATABASES:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("postgres", "postgresql"):
            raise ComponentError(
                f"BACKUP_DATABASES: only PostgreSQL URLs are supported, not {public_url(url)}",
                "database_unsupported",
            )
        params = PgServer.from_url(url).params
        dbname = params.get("dbname") or params.get("user") or "postgres"
        name = f"database-{_slug(dbname)}"
        if name == OWN_UNIT or name in found:
            host = f"{params.get('host', 'local')}-{params.get('port', '5432')}"
            name = f"database-{_slug(dbname)}-{_slug(host)}"
        if name in found:
            raise ComponentError(
                f"BACKUP_DATABASES lists {public_url(url)} twice", "database_duplicate"
            )
        found[name] = url
    return found


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "db"


def scratch_database_name(dbname: str, tag: str) -> str:
    """The drill database of `dbname` for the drill `tag`: "<db>_drill_<tag>", at most 63 bytes
    (PostgreSQL's limit) and never the name of the database it is a copy of."""
    tag = re.sub(r"[^a-z0-9_]+", "_", tag.lower()).strip("_")[:24] or "scratch"
    suffix = f"_drill_{tag}"
    base = dbname.encode()[: 63 - len(suffix)].decode(errors="ignore")
    return base + suffix


# --- PostgreSQL tools -----------------------------------------------------------------------


def _client_package(major: int | None) -> str:
    package = f"postgresql-client-{major}" if major else "postgresql-client"
    return f"install {package} (Debian: apt-get install {package})"


def tool_major(path: str) -> int:
    """The major version of a PostgreSQL program ("pg_dump (PostgreSQL) 15.20 ..." -> 15)."""
    done = subprocess.run(  # noqa: S603  (our argv, no shell)
        [path, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return parse_tool_major(done.stdout)


def parse_tool_major(text: str) -> int:
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ComponentError(f"cannot tell a PostgreSQL program's version from {text!r}")
    major = int(match.group(1))
    # Before 10 the major version was two numbers (9.6).
    return major if major >= 10 else major * 100 + int(match.group(2) or 0)


def pg_tool(name: str, server_major: int | None) -> str:
    """The PATH's `name` (pg_dump, pg_restore, psql), refused when missing or older than the
    server: an old pg_dump cannot read a newer server's catalogs, an old pg_restore a newer
    dump's format."""
    path = shutil.which(name)
    if path is None:
        raise ComponentError(
            f"{name} is not installed (not found on PATH): {_client_package(server_major)}",
            "pg_tools_missing",
        )
    major = tool_major(path)
    if server_major and major < server_major:
        raise ComponentError(
            f"{name} {major} ({path}) is older than PostgreSQL {server_major}, which it must "
            f"handle: {_client_package(server_major)}",
            "pg_tools_too_old",
        )
    return path


def _server_major(version_num: int) -> int:
    return version_num // 10000 if version_num >= 100000 else version_num // 100


# --- Streams and processes --------------------------------------------------------------------


def _widen_pipe(stream: IO[bytes] | None) -> None:
    # A 1 MiB pipe instead of 64 KiB: fewer wake-ups between the tool and us.
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(stream.fileno(), 1031, CHUNK)  # F_SETPIPE_SZ


def _read_tail(handle: IO[bytes]) -> str:
    handle.seek(0)
    return _clean(handle.read().decode(errors="replace"))


def _run(args: list[str], *, env: dict[str, str] | None = None, what: str) -> str:
    done = subprocess.run(  # noqa: S603  (our argv, no shell)
        args, capture_output=True, env=env, check=False
    )
    if done.returncode != 0:
        raise ComponentError(
            f"{what} failed (exit {done.returncode}): "
            f"{_clean(done.stderr.decode(errors='replace'))}",
            "database_tool_failed",
        )
    return done.stdout.decode(errors="replace")


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.kill()
    process.wait()


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _spool(opener: Opener, path: Path, on_bytes: OnBytes) -> int:
    """The whole plaintext stream into `path` (0600); a reader that raises raises here."""
    size = 0
    source = opener()
    try:
        with path.open("wb") as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
                on_bytes(len(chunk))
    finally:
        _close(source)
    return size


def _scratch_dir(destination: Destination | None = None) -> Path:
    base = destination.scratch_dir if destination and destination.scratch_dir else None
    path = Path(base or settings.BACKUP_SCRATCH_DIR)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _temp_path(directory: Path, prefix: str, suffix: str) -> Path:
    # mkstemp: 0600, a name nobody else has; a plaintext dump never lands world-readable.
    handle, name = tempfile.mkstemp(prefix=f".{prefix}-", suffix=suffix, dir=directory)
    os.close(handle)
    return Path(name)


def _remove(*paths: Path) -> None:
    """Delete files and what SQLite may have left beside them."""
    for path in paths:
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


# --- Migrations -----------------------------------------------------------------------------


def migration_summary(rows: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The latest applied migration per app, their count and a digest of the whole set."""
    applied = sorted({(str(app), str(name)) for app, name in rows})
    latest: dict[str, str] = {}
    for app, name in applied:
        latest[app] = max(name, latest.get(app, ""))
    digest = hashlib.sha256("\n".join(f"{a}.{n}" for a, n in applied).encode()).hexdigest()
    return {"migrations": latest, "migration_count": len(applied), "migrations_digest": digest}


def migration_problem(backup: dict[str, Any], here_rows: set[tuple[str, str]]) -> str | None:
    """Why the schema here cannot take the backup's data, or None when the migrations match."""
    for app, name in sorted((backup.get("migrations") or {}).items()):
        if (app, name) not in here_rows:
            return (
                f"this database's schema is older than the backup's: migration {app}.{name} of "
                "the backup is not applied here (upgrade Bridge and run `manage.py migrate` "
                "first)"
            )
    here = migration_summary(here_rows)
    if backup.get("migrations_digest") in (None, here["migrations_digest"]):
        return None
    for app, name in sorted(here["migrations"].items()):
        theirs = (backup.get("migrations") or {}).get(app)
        if theirs != name:
            return (
                f"this database's schema differs from the backup's: {app} is at migration "
                f"{name} here and at {theirs or 'none'} in the backup (restore with the Bridge "
                "version that made the backup, or into a scratch database)"
            )
    return (
        "this database's schema differs from the backup's: "
        f"{here['migration_count']} migrations applied here, "
        f"{backup.get('migration_count')} in the backup"
    )


def _pg_migration_rows(cursor: Any) -> set[tuple[str, str]] | None:
    cursor.execute("SELECT to_regclass('django_migrations') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return None
    cursor.execute("SELECT app, name FROM django_migrations")
    return {(app, name) for app, name in cursor.fetchall()}


def _sqlite_migration_rows(db: sqlite3.Connection, schema: str = "main") -> set | None:
    found = db.execute(
        f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = 'django_migrations'"  # noqa: S608
    ).fetchone()
    if not found:
        return None
    rows = db.execute(f"SELECT app, name FROM {schema}.django_migrations").fetchall()  # noqa: S608
    return {(app, name) for app, name in rows}


# --- PostgreSQL catalog -----------------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    # standard_conforming_strings is on in every supported server (and in pg_restore's scripts)
    return "'" + text.replace("'", "''") + "'"


def _rel_key(schema: str, name: str) -> str:
    return name if schema == "public" else f"{schema}.{name}"


_USER_TABLES = """
    SELECT n.nspname, c.relname
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r'
      AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
      AND NOT EXISTS (
          SELECT 1 FROM pg_catalog.pg_depend d
          WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
            AND d.deptype = 'e')
    ORDER BY 1, 2
"""


def _pg_tables(cursor: Any) -> list[tuple[str, str]]:
    """Every table that holds rows of its own (partitions, not their parents; no extension's
    tables): what a dump's data is and what the counts cover."""
    cursor.execute(_USER_TABLES)
    return [(schema, name) for schema, name in cursor.fetchall()]


def _pg_count(cursor: Any, tables: list[tuple[str, str]]) -> dict[str, int]:
    counts = {}
    for schema, name in tables:
        cursor.execute(f"SELECT count(*) FROM {_ident(schema)}.{_ident(name)}")  # noqa: S608
        counts[_rel_key(schema, name)] = int(cursor.fetchone()[0])
    return counts


def _pg_resolve(cursor: Any, names: Iterable[str]) -> list[tuple[int, str, str]]:
    """(oid, schema, name) of each table name as the connection's search_path finds it."""
    found = []
    for name in names:
        cursor.execute(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(quote_ident(%s))",
            [name],
        )
        row = cursor.fetchone()
        if row:
            found.append((int(row[0]), row[1], row[2]))
    return found


def _pg_facts(connection: Any) -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('server_version'), "
            "current_setting('server_version_num')::int, current_database(), "
            "pg_encoding_to_char(d.encoding), d.datcollate, d.datctype "
            "FROM pg_catalog.pg_database d WHERE d.datname = current_database()"
        )
        version, version_num, dbname, encoding, collate, ctype = cursor.fetchone()
        facts: dict[str, Any] = {
            "server_version": version,
            "server_version_num": version_num,
            "server_major": _server_major(version_num),
            "database": dbname,
            "encoding": encoding,
            "lc_collate": collate,
            "lc_ctype": ctype,
            "system_identifier": None,
        }
        # pg_control_system() needs superuser or pg_monitor-like rights: without them the
        # backup still runs, without the identifier.
        try:
            cursor.execute("SELECT system_identifier::text FROM pg_control_system()")
            facts["system_identifier"] = cursor.fetchone()[0]
        except psycopg2.Error:
            connection.rollback()
    return facts


def _server_facts(server: PgServer) -> dict[str, Any]:
    connection = server.connect()
    try:
        connection.autocommit = True
        return _pg_facts(connection)
    finally:
        connection.close()


# --- TOC filtering for live restores of Bridge's own database ---------------------------------

# pg_restore --list entry kinds ("desc"), longest first so "TABLE DATA" wins over "TABLE".
_TOC_KINDS = sorted(
    (
        "ACCESS METHOD",
        "ACL",
        "AGGREGATE",
        "BLOB",
        "BLOB METADATA",
        "BLOBS",
        "CAST",
        "CHECK CONSTRAINT",
        "COLLATION",
        "COMMENT",
        "CONSTRAINT",
        "CONVERSION",
        "DATABASE",
        "DATABASE PROPERTIES",
        "DEFAULT",
        "DEFAULT ACL",
        "DOMAIN",
        "ENCODING",
        "EVENT TRIGGER",
        "EXTENSION",
        "FK CONSTRAINT",
        "FOREIGN DATA WRAPPER",
        "FOREIGN SERVER",
        "FOREIGN TABLE",
        "FUNCTION",
        "INDEX",
        "INDEX ATTACH",
        "LARGE OBJECT",
        "MATERIALIZED VIEW",
        "MATERIALIZED VIEW DATA",
        "OPERATOR",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "POLICY",
        "PROCEDURAL LANGUAGE",
        "PROCEDURE",
        "PUBLICATION",
        "PUBLICATION TABLE",
        "PUBLICATION TABLES IN SCHEMA",
        "ROW SECURITY",
        "RULE",
        "SCHEMA",
        "SEARCHPATH",
        "SECURITY LABEL",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "SEQUENCE SET",
        "SERVER",
        "SHELL TYPE",
        "STATISTICS",
        "STDSTRINGS",
        "SUBSCRIPTION",
        "TABLE",
        "TABLE ATTACH",
        "TABLE DATA",
        "TEXT SEARCH CONFIGURATION",
        "TEXT SEARCH DICTIONARY",
        "TEXT SEARCH PARSER",
        "TEXT SEARCH TEMPLATE",
        "TRANSFORM",
        "TRIGGER",
        "TYPE",
        "USER MAPPING",
        "VIEW",
    ),
    key=len,
    reverse=True,
)
_TOC_LINE = re.compile(r"^\s*(\d+);\s+(\d+)\s+(\d+)\s+(.*)$")
# Entries whose tag starts with the name of the table they belong to ("bridge_job pkey").
_ON_TABLE = frozenset(
    {
        "CONSTRAINT",
        "CHECK CONSTRAINT",
        "FK CONSTRAINT",
        "TRIGGER",
        "DEFAULT",
        "POLICY",
        "RULE",
        "TABLE ATTACH",
    }
)


@dataclass(frozen=True)
class TocEntry:
    """One line of `pg_restore --list`: its kind, schema and tag ("table constraint"...)."""

    line: str
    kind: str
    schema: str
    tag: str


def parse_toc(text: str) -> list[TocEntry | str]:
    """The list's entries; comment lines (and any line not understood) stay strings."""
    found: list[TocEntry | str] = []
    for line in text.splitlines():
        match = _TOC_LINE.match(line)
        if not match:
            found.append(line)
            continue
        rest = match.group(4)
        kind = next((k for k in _TOC_KINDS if rest.startswith(k + " ")), None)
        if kind is None:
            found.append(line)
            continue
        # "<schema> <tag> <owner>": the owner is the last word (empty for some kinds).
        body = rest[len(kind) + 1 :]
        body = body.rsplit(" ", 1)[0] if " " in body else body
        schema, _, tag = body.partition(" ")
        found.append(TocEntry(line=line, kind=kind, schema=schema, tag=tag))
    return found


@dataclass
class KeptObjects:
    """Objects of the preserved tables, by (schema, name), as the live catalog names them."""

    tables: set[tuple[str, str]] = field(default_factory=set)
    indexes: set[tuple[str, str]] = field(default_factory=set)
    sequences: set[tuple[str, str]] = field(default_factory=set)
    functions: set[tuple[str, str]] = field(default_factory=set)
    # FK constraints of restored tables that reference a preserved table: (schema, table, name)
    foreign_keys: set[tuple[str, str, str]] = field(default_factory=set)

    def owns(self, entry: TocEntry) -> bool:
        """Whether a TOC entry belongs to a preserved table (so the restore must skip it)."""
        schema, kind, tag = entry.schema, entry.kind, entry.tag
        if kind in ("TABLE", "TABLE DATA", "ROW SECURITY"):
            return (schema, tag) in self.tables
        if kind in _ON_TABLE:
            table, _, name = tag.partition(" ")
            if kind == "FK CONSTRAINT" and (schema, table, name) in self.foreign_keys:
                return True
            return (schema, table) in self.tables
        if kind in ("INDEX", "INDEX ATTACH"):
            return (schema, tag) in self.indexes
        if kind in ("SEQUENCE", "SEQUENCE SET", "SEQUENCE OWNED BY"):
            return (schema, tag) in self.sequences
        if kind in ("FUNCTION", "PROCEDURE"):
            return (schema, tag.split("(", 1)[0]) in self.functions
        if kind in ("ACL", "COMMENT", "SECURITY LABEL"):
            return self._owns_target(schema, tag)
        return False

    def _owns_target(self, schema: str, tag: str) -> bool:
        # "TABLE t", "COLUMN t.c", "SEQUENCE s", "INDEX i", "CONSTRAINT c ON t", "TRIGGER x ON t"
        what, _, name = tag.partition(" ")
        if what in ("TABLE", "VIEW"):
            return (schema, name) in self.tables
        if what == "COLUMN":
            return (schema, name.split(".", 1)[0]) in self.tables
        if what == "SEQUENCE":
            return (schema, name) in self.sequences
        if what == "INDEX":
            return (schema, name) in self.indexes
        if what in ("CONSTRAINT", "TRIGGER", "POLICY", "RULE") and " ON " in name:
            return (schema, name.rsplit(" ON ", 1)[1]) in self.tables
        if what in ("FUNCTION", "PROCEDURE"):
            return (schema, name.split("(", 1)[0]) in self.functions
        return False


@dataclass
class LivePlan:
    """What a live restore of one database will do, worked out before anything changes."""

    toc: str
    kept_entries: int
    skipped_entries: int
    # Tables locked first (ACCESS EXCLUSIVE, qualified and quoted): every table dropped and
    # recreated, and every table a foreign key links to one of them.
    lock: list[str]
    # FK constraints crossing between a preserved and a restored table: dropped first when on
    # a preserved table (they would block dropping the table they reference), and all added
    # back at the end NOT VALID, then validated where the rows allow (a job run since by a
    # user the backup does not have keeps its row; the constraint then stays NOT VALID).
    drop_first: list[tuple[str, str]]
    add_last: list[tuple[str, str, str]]
    preserved: list[str]


def plan_live_restore(server: PgServer, toc_text: str, preserved: list[str]) -> LivePlan:
    """The filtered TOC, the locks and the crossing foreign keys for a live restore."""
    connection = server.connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            kept = KeptObjects()
            oids = []
            for oid, schema, name in _pg_resolve(cursor, preserved):
                oids.append(oid)
                kept.tables.add((schema, name))
            cursor.execute(
                "SELECT n.nspname, ic.relname FROM pg_catalog.pg_index i "
                "JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = ic.relnamespace "
                "WHERE i.indrelid = ANY(%s::oid[])",
                [oids],
            )
            kept.indexes = set(cursor.fetchall())
            cursor.execute(
                "SELECT n.nspname, s.relname FROM pg_catalog.pg_depend d "
                "JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
                "JOIN pg_catalog.pg_namespace n ON n.oid = s.relnamespace "
                "WHERE d.classid = 'pg_catalog.pg_class'::regclass "
                "AND d.refclassid = 'pg_catalog.pg_class'::regclass "
                "AND d.refobjid = ANY(%s::oid[]) AND d.deptype IN ('a', 'i')",
                [oids],
            )
            kept.sequences = set(cursor.fetchall())
            # The functions the preserved tables' triggers run (the audit trail's guard):
            # dropping them would fail, replacing them is not the restore's business.
            cursor.execute(
                "SELECT DISTINCT n.nspname, p.proname FROM pg_catalog.pg_trigger t "
                "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                "WHERE t.tgrelid = ANY(%s::oid[]) AND NOT t.tgisinternal",
                [oids],
            )
            kept.functions = set(cursor.fetchall())
            cursor.execute(
                "SELECT n.nspname, c.relname, k.conname FROM pg_catalog.pg_constraint k "
                "JOIN pg_catalog.pg_class c ON c.oid = k.conrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE k.contype = 'f' AND k.confrelid = ANY(%(p)s::oid[]) "
                "AND NOT k.conrelid = ANY(%(p)s::oid[])",
                {"p": oids},
            )
            kept.foreign_keys = set(cursor.fetchall())

            lines, skipped, kept_count, replaced = [], 0, 0, []
            for entry in parse_toc(toc_text):
                if isinstance(entry, str):
                    lines.append(entry)
                elif kept.owns(entry):
                    skipped += 1
                    lines.append(";" + entry.line)
                else:
                    kept_count += 1
                    lines.append(entry.line)
                    if entry.kind == "TABLE":
                        replaced.append(f"{_ident(entry.schema)}.{_ident(entry.tag)}")
            dropped = []
            for name in replaced:
                cursor.execute("SELECT to_regclass(%s)::oid", [name])
                oid = cursor.fetchone()[0]
                if oid is not None:
                    dropped.append(int(oid))
            # Every name from here on is schema-qualified: the restore script empties the
            # search_path, and pg_get_constraintdef qualifies what the path does not show.
            cursor.execute("SET search_path = ''")
            cursor.execute(
                "SELECT DISTINCT r::regclass::text FROM ("
                " SELECT unnest(%(d)s::oid[]) AS r"
                " UNION SELECT confrelid FROM pg_catalog.pg_constraint"
                "   WHERE contype = 'f' AND conrelid = ANY(%(d)s::oid[])"
                " UNION SELECT conrelid FROM pg_catalog.pg_constraint"
                "   WHERE contype = 'f' AND confrelid = ANY(%(d)s::oid[])) AS s ORDER BY 1",
                {"d": dropped},
            )
            lock = [row[0] for row in cursor.fetchall()]
            cursor.execute(
                "SELECT conrelid::regclass::text, quote_ident(conname), "
                "pg_get_constraintdef(oid), conrelid = ANY(%(p)s::oid[]) "
                "FROM pg_catalog.pg_constraint WHERE contype = 'f' AND ("
                " (conrelid = ANY(%(p)s::oid[]) AND confrelid = ANY(%(d)s::oid[]))"
                " OR (confrelid = ANY(%(p)s::oid[]) AND conrelid = ANY(%(d)s::oid[])))"
                " ORDER BY 1, 2",
                {"p": oids, "d": dropped},
            )
            drop_first, add_last = [], []
            for table, name, definition, on_preserved in cursor.fetchall():
                if on_preserved:
                    drop_first.append((table, name))
                add_last.append((table, name, definition))
    finally:
        connection.close()
    return LivePlan(
        toc="\n".join(lines) + "\n",
        kept_entries=kept_count,
        skipped_entries=skipped,
        lock=lock,
        drop_first=drop_first,
        add_last=add_last,
        preserved=sorted(_rel_key(schema, name) for schema, name in kept.tables),
    )


_BUSY_MARK = "bridge-restore-busy:"
_DONE_MARK = "bridge-restore-committed"


def _pre_sql(plan: LivePlan, timeout_ms: int) -> str:
    """Before pg_restore's script: one transaction that takes every lock first, so live
    traffic makes the restore refused before it changed anything."""
    tables = ", ".join(_literal(name) for name in plan.lock)
    lines = [
        "BEGIN;",
        f"SET lock_timeout = {_literal(f'{timeout_ms}ms')};",
    ]
    if tables:
        lines.append(
            "DO $bridge$ DECLARE t text; BEGIN\n"
            f"  FOREACH t IN ARRAY ARRAY[{tables}]::text[] LOOP\n"
            "    BEGIN\n"
            "      EXECUTE 'LOCK TABLE ' || t || ' IN ACCESS EXCLUSIVE MODE';\n"
            "    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN\n"
            f"      RAISE EXCEPTION '{_BUSY_MARK} %', t USING ERRCODE = 'lock_not_available';\n"
            "    END;\n"
            "  END LOOP;\n"
            "END $bridge$;"
        )
    for table, name in plan.drop_first:
        lines.append(f"ALTER TABLE {table} DROP CONSTRAINT {name};")
    return "\n".join(lines) + "\n"


def _post_sql(plan: LivePlan) -> str:
    lines = []
    for table, name, definition in plan.add_last:
        lines.append(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition} NOT VALID;")
        lines.append(
            "DO $bridge$ BEGIN\n"
            f"  ALTER TABLE {table} VALIDATE CONSTRAINT {name};\n"
            "EXCEPTION WHEN foreign_key_violation THEN NULL;\n"
            "END $bridge$;"
        )
    lines += ["COMMIT;", f"\\echo {_DONE_MARK}"]
    return "\n" + "\n".join(lines) + "\n"


# --- SQLite -----------------------------------------------------------------------------------

_SQLITE_MAGIC = b"SQLite format 3\x00"


def _sqlite_tables(db: sqlite3.Connection, schema: str = "main") -> list[str]:
    rows = db.execute(
        f"SELECT name FROM {schema}.sqlite_master "  # noqa: S608
        "WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    return [row[0] for row in rows]


def _sqlite_counts(db: sqlite3.Connection, tables: Iterable[str]) -> dict[str, int]:
    return {
        name: int(db.execute(f"SELECT count(*) FROM {_ident(name)}").fetchone()[0])  # noqa: S608
        for name in tables
    }


def _is_sqlite_file(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


@contextlib.contextmanager
def _sqlite_readonly(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


# --- The handler ------------------------------------------------------------------------------


def _checks(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ok": all(item["ok"] for item in items), "checks": items}


def _check(name: str, expected: Any, actual: Any) -> dict[str, Any]:
    return {"name": name, "expected": expected, "actual": actual, "ok": expected == actual}


class DatabaseHandler(ComponentHandler):
    """Bridge's own database and the stack's PostgreSQL databases (see the module docstring)."""

    component = COMPONENT

    # -- units --

    def units(self) -> list[Unit] | str:
        found = []
        engine = own_engine()
        if engine in (POSTGRESQL, SQLITE):
            found.append(Unit(COMPONENT, OWN_UNIT, {"alias": "default", "engine": engine}))
        for name, url in stack_databases().items():
            # The URL without its password: the real one is looked up by name when needed.
            found.append(Unit(COMPONENT, name, {"url": public_url(url), "engine": POSTGRESQL}))
        if not found:
            return (
                f"Bridge's database engine ({engine}) cannot be backed up here and "
                "BACKUP_DATABASES is empty"
            )
        return found

    def _server(self, unit: Unit) -> PgServer | None:
        """Where the unit's database is now: None when it is not (or no longer) configured
        as a PostgreSQL database."""
        if unit.name == OWN_UNIT:
            if own_engine() != POSTGRESQL:
                return None
            return PgServer.from_django(connections["default"].settings_dict)
        url = stack_databases().get(unit.name)
        return PgServer.from_url(url) if url else None

    # -- backup --

    def backup(
        self, unit: Unit, out: BinaryIO, *, parent: dict[str, Any] | None, on_bytes: OnBytes
    ) -> dict[str, Any]:
        started = time.monotonic()
        if unit.name == OWN_UNIT and own_engine() == SQLITE:
            manifest = self._backup_sqlite(out, on_bytes)
        else:
            server = self._server(unit)
            if server is None:
                raise ComponentError(f"{unit.name}: not configured here", "unit_unknown")
            manifest = self._backup_postgres(
                server, out, subject_keys=unit.name == OWN_UNIT, on_bytes=on_bytes
            )
            if unit.name != OWN_UNIT:
                manifest["url"] = public_url(stack_databases()[unit.name])
        manifest["unit"] = unit.name
        manifest["mode"] = "full_dump"
        if parent is not None:
            manifest["reason"] = (
                "databases are dumped whole in every backup (a dump is consistent on its own "
                "and restores without its parent); the changes between backups are in the "
                "archived WAL, for point-in-time recovery"
            )
            manifest["parent_server_version"] = parent.get("server_version")
        manifest["seconds"] = round(time.monotonic() - started, 3)
        return manifest

    def _backup_postgres(
        self, server: PgServer, out: BinaryIO, *, subject_keys: bool, on_bytes: OnBytes
    ) -> dict[str, Any]:
        connection = server.connect()
        process = None
        counter: _Counter | None = None
        stderr = tempfile.TemporaryFile()
        try:
            connection.autocommit = True
            facts = _pg_facts(connection)
            pg_dump = pg_tool("pg_dump", facts["server_major"])
            dump_major = tool_major(pg_dump)
            connection.autocommit = False
            connection.set_session(isolation_level=ISOLATION_LEVEL_REPEATABLE_READ, readonly=True)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_export_snapshot()")
                snapshot = cursor.fetchone()[0]
                tables = _pg_tables(cursor)
                excluded = _pg_resolve(cursor, crypto.SUBJECT_KEY_TABLES) if subject_keys else []
                migrations = _pg_migration_rows(cursor)
            skip = {(schema, name) for _, schema, name in excluded}
            args = [
                pg_dump,
                "--format=custom",
                "--compress=0",
                f"--snapshot={snapshot}",
                "--no-password",
                *(f"--exclude-table-data={_ident(s)}.{_ident(n)}" for s, n in sorted(skip)),
                "--dbname",
                server.conninfo(),
            ]
            process = subprocess.Popen(  # noqa: S603  (our argv, no shell)
                args, stdout=subprocess.PIPE, stderr=stderr, env=server.env()
            )
            _widen_pipe(process.stdout)
            # Counted while pg_dump runs, in the snapshot it dumps.
            counter = _Counter(connection, tables)
            size = 0
            assert process.stdout is not None
            while chunk := process.stdout.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
                on_bytes(len(chunk))
            code = process.wait()
            if code != 0:
                raise ComponentError(
                    f"pg_dump of {facts['database']} failed (exit {code}): {_read_tail(stderr)}",
                    "pg_dump_failed",
                )
            counts = counter.result()
        finally:
            _stop(process)
            if counter is not None:
                counter.abort()
            with contextlib.suppress(psycopg2.Error):
                connection.rollback()
            connection.close()
            stderr.close()
        row_counts = {key: n for key, n in counts.items() if key not in _keys(skip)}
        manifest: dict[str, Any] = {
            "engine": POSTGRESQL,
            **facts,
            "row_counts": row_counts,
            "tables": len(row_counts),
            "rows": sum(row_counts.values()),
            # Left out of the dump on purpose (their rows here, at backup time).
            "excluded_table_data": {key: counts.get(key, 0) for key in sorted(_keys(skip))},
            "pg_dump_version": dump_major,
            "format": "pg_dump custom (-Fc), uncompressed (-Z0)",
            "bytes": size,
        }
        if migrations is not None:
            manifest.update(migration_summary(migrations))
        return manifest

    def _backup_sqlite(self, out: BinaryIO, on_bytes: OnBytes) -> dict[str, Any]:
        source_path = Path(connections["default"].settings_dict["NAME"])
        if not source_path.is_file():
            raise ComponentError(f"{OWN_UNIT}: the SQLite file {source_path} does not exist")
        copy = _temp_path(_scratch_dir(), "database-default", ".sqlite3")
        try:
            # A connection of our own: Django's may be inside a transaction, which the backup
            # API would wait on forever. WAL mode lets it read while others write.
            source = sqlite3.connect(source_path, timeout=60)
            target = sqlite3.connect(copy, isolation_level=None)
            try:
                source.backup(target)
            finally:
                source.close()
            try:
                target.execute("PRAGMA journal_mode = DELETE")
                excluded = {}
                present = set(_sqlite_tables(target))
                for table in crypto.SUBJECT_KEY_TABLES:
                    if table in present:
                        excluded[table] = _sqlite_counts(target, [table])[table]
                        target.execute(f"DELETE FROM {_ident(table)}")  # noqa: S608
                # Always: the copy holds the source's free pages too, where rows deleted
                # there (shredded keys, erased personal data) may still be readable.
                target.execute("VACUUM")
                tables = [name for name in _sqlite_tables(target) if name not in excluded]
                row_counts = _sqlite_counts(target, tables)
                migrations = _sqlite_migration_rows(target)
                page_size = target.execute("PRAGMA page_size").fetchone()[0]
            finally:
                target.close()
            size = 0
            with copy.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    out.write(chunk)
                    size += len(chunk)
                    on_bytes(len(chunk))
        finally:
            _remove(copy)
        manifest: dict[str, Any] = {
            "engine": SQLITE,
            "server_version": sqlite3.sqlite_version,
            "database": source_path.name,
            "row_counts": row_counts,
            "tables": len(row_counts),
            "rows": sum(row_counts.values()),
            "excluded_table_data": excluded,
            "format": "SQLite database file (online backup API, vacuumed)",
            "page_size": page_size,
            "bytes": size,
        }
        if migrations is not None:
            manifest.update(migration_summary(migrations))
        return manifest

    # -- preflight --

    def preflight(self, unit: Unit, manifest: dict[str, Any], *, destination: Destination) -> None:
        engine = manifest.get("engine")
        if engine not in (POSTGRESQL, SQLITE):
            raise RestoreRefused(
                f"{unit.name}: the backup's engine {engine!r} is not one this handler restores",
                "engine_mismatch",
            )
        if unit.name != OWN_UNIT and self._server(unit) is None:
            raise RestoreRefused(
                f"{unit.name}: this database is no longer configured (BACKUP_DATABASES), so "
                "there is no server to restore it to",
                "unit_unknown",
            )
        here = own_engine() if unit.name == OWN_UNIT else POSTGRESQL
        if engine == SQLITE and not destination.live:
            return  # a drill of a SQLite backup is a file, whatever Bridge runs on
        if engine != here:
            what = "this database" if destination.live else "the server a drill would use"
            raise RestoreRefused(
                f"{unit.name}: the backup is {engine}, {what} is {here}", "engine_mismatch"
            )
        if engine == POSTGRESQL:
            server = self._server(unit)
            assert server is not None
            facts = _server_facts(server)
            theirs = manifest.get("server_major") or _server_major(
                int(manifest.get("server_version_num") or 0)
            )
            if theirs and theirs > facts["server_major"]:
                raise RestoreRefused(
                    f"{unit.name}: the backup is of PostgreSQL {theirs}, this server runs "
                    f"{facts['server_major']} (a dump does not restore into an older major)",
                    "server_too_old",
                )
        if destination.live and unit.name == OWN_UNIT and "migrations" in manifest:
            problem = migration_problem(manifest, self._live_migrations())
            if problem:
                raise RestoreRefused(f"{unit.name}: {problem}", "schema_mismatch")

    def _live_migrations(self) -> set[tuple[str, str]]:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT app, name FROM django_migrations")
            return {(app, name) for app, name in cursor.fetchall()}

    # -- restore --

    def restore(
        self,
        unit: Unit,
        manifests: list[dict[str, Any]],
        chain: list[Opener],
        *,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        # Every database artifact is a whole dump: only the newest of a chain counts.
        manifest, opener = manifests[-1], chain[-1]
        self.preflight(unit, manifest, destination=destination)
        started = time.monotonic()
        if manifest["engine"] == SQLITE:
            if destination.live:
                result = self._restore_sqlite_live(manifest, opener, destination, on_bytes)
            else:
                result = self._restore_sqlite_scratch(unit, opener, destination, on_bytes)
        else:
            server = self._server(unit)
            assert server is not None
            if destination.live:
                result = self._restore_postgres_live(
                    unit, server, manifest, opener, destination, on_bytes
                )
            else:
                result = self._restore_postgres_scratch(
                    unit, server, manifest, opener, destination, on_bytes
                )
        result["seconds"] = round(time.monotonic() - started, 3)
        return result

    def _pg_restore_tools(self, manifest: dict[str, Any]) -> tuple[str, str]:
        major = int(manifest.get("pg_dump_version") or manifest.get("server_major") or 0)
        pg_restore = pg_tool("pg_restore", major or None)
        # psql from the same installation: pg_restore's scripts use its meta-commands.
        sibling = Path(pg_restore).with_name("psql")
        psql = str(sibling) if os.access(sibling, os.X_OK) else pg_tool("psql", major or None)
        return pg_restore, psql

    def _restore_postgres_scratch(
        self,
        unit: Unit,
        server: PgServer,
        manifest: dict[str, Any],
        opener: Opener,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        pg_restore, _ = self._pg_restore_tools(manifest)
        name = scratch_database_name(server.dbname, destination.tag)
        target = server.with_dbname(name)
        _create_database(server, name, manifest)
        try:
            # Pre-data and data stream straight in (overlapping the reader's decryption); then
            # a second read of the artifact feeds post-data (indexes, constraints), which
            # needs only the dump's table of contents at its start: pg_restore stops reading
            # there. No plaintext spool: writing 0.7x the database to disk beside the restored
            # tables and their WAL cost more (8-18% of the restore, bench/README.md) than the
            # parallel index builds a spool file would allow.
            size = _feed(
                [
                    pg_restore,
                    "--exit-on-error",
                    "--no-owner",
                    "--section=pre-data",
                    "--section=data",
                    "--dbname",
                    target.conninfo(),
                ],
                opener,
                _Discard(),
                env=target.env(),
                on_bytes=on_bytes,
            )
            _feed(
                [
                    pg_restore,
                    "--exit-on-error",
                    "--no-owner",
                    "--section=post-data",
                    "--dbname",
                    target.conninfo(),
                ],
                opener,
                _Discard(),
                env=target.env(),
                on_bytes=lambda count: None,
                drain=False,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                _drop_database(server, name)
            raise
        return {"engine": POSTGRESQL, "database": name, "live": False, "bytes": size, "jobs": 1}

    def _restore_postgres_live(
        self,
        unit: Unit,
        server: PgServer,
        manifest: dict[str, Any],
        opener: Opener,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        pg_restore, psql = self._pg_restore_tools(manifest)
        scratch = _scratch_dir(destination)
        spool = _temp_path(scratch, unit.name, ".dump")
        listing = _temp_path(scratch, unit.name, ".list")
        try:
            size = _spool(opener, spool, on_bytes)
            toc = _run(
                [pg_restore, "--list", str(spool)],
                what=f"{unit.name}: reading the dump's table of contents (nothing was changed):"
                " pg_restore --list",
            )
            own = unit.name == OWN_UNIT
            plan = plan_live_restore(server, toc, preserved_tables() if own else [])
            listing.write_text(plan.toc)
            timeout = lock_timeout()
            self._apply_in_one_transaction(
                unit, server, plan, pg_restore, psql, spool, listing, timeout
            )
        finally:
            _remove(spool, listing)
        unvalidated = _unvalidated(server, plan)
        if unit.name == OWN_UNIT:
            from django.contrib.contenttypes.models import ContentType

            ContentType.objects.clear_cache()
        return {
            "engine": POSTGRESQL,
            "database": server.dbname,
            "live": True,
            "bytes": size,
            "toc_entries_restored": plan.kept_entries,
            "toc_entries_kept_live": plan.skipped_entries,
            "preserved_tables": plan.preserved,
            "tables_locked": len(plan.lock),
            # Foreign keys from kept history to restored rows that no longer exist (a job run
            # since by a user the backup does not have): kept, enforced for new rows only.
            "unvalidated_constraints": unvalidated,
        }

    def _apply_in_one_transaction(
        self,
        unit: Unit,
        server: PgServer,
        plan: LivePlan,
        pg_restore: str,
        psql: str,
        spool: Path,
        listing: Path,
        timeout: float,
    ) -> None:
        timeout_ms = max(int(timeout * 1000), 1)
        errors = tempfile.TemporaryFile()
        output = tempfile.TemporaryFile()
        script_errors = tempfile.TemporaryFile()
        runner = script = None
        try:
            runner = subprocess.Popen(  # noqa: S603  (our argv, no shell)
                [
                    psql,
                    "--no-psqlrc",
                    "--quiet",
                    "--set=ON_ERROR_STOP=1",
                    "--dbname",
                    server.conninfo(),
                    "--file=-",
                ],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=errors,
                env=server.env(f"-c lock_timeout={timeout_ms}"),
            )
            script = subprocess.Popen(  # noqa: S603  (our argv, no shell)
                [
                    # Owners and privileges as they were: the live database's roles exist, and
                    # the stack's services must find their tables as they left them.
                    pg_restore,
                    "--clean",
                    "--if-exists",
                    "--exit-on-error",
                    f"--use-list={listing}",
                    "--file=-",
                    str(spool),
                ],
                stdout=subprocess.PIPE,
                stderr=script_errors,
            )
            _widen_pipe(script.stdout)
            _widen_pipe(runner.stdin)
            assert runner.stdin is not None and script.stdout is not None
            broken = False
            try:
                runner.stdin.write(_pre_sql(plan, timeout_ms).encode())
                head = True
                while chunk := script.stdout.read(CHUNK):
                    if head:
                        # pg_restore's script turns lock_timeout off; ours must hold for all
                        # of it, so live traffic cannot make the restore hang.
                        chunk = chunk.replace(
                            b"SET lock_timeout = 0;",
                            f"SET lock_timeout = '{timeout_ms}ms';".encode(),
                            1,
                        )
                        head = False
                    runner.stdin.write(chunk)
                code = script.wait()
                if code != 0:
                    # The transaction is open: killing psql rolls it back.
                    _stop(runner)
                    raise ComponentError(
                        f"{unit.name}: pg_restore could not read the dump (exit {code}), "
                        f"nothing was changed: {_read_tail(script_errors)}",
                        "pg_restore_failed",
                    )
                runner.stdin.write(_post_sql(plan).encode())
                runner.stdin.close()
            except BrokenPipeError:
                broken = True  # psql stopped at an error; its exit says which
            _stop(script)
            code = runner.wait()
            output.seek(0)
            committed = _DONE_MARK.encode() in output.read()
            if code != 0 or broken or not committed:
                raise self._restore_error(unit, _read_tail(errors), timeout)
        finally:
            _stop(script)
            _stop(runner)
            for handle in (errors, output, script_errors):
                handle.close()

    def _restore_error(self, unit: Unit, text: str, timeout: float) -> ComponentError:
        busy = re.search(re.escape(_BUSY_MARK) + r"\s*(\S+)", text)
        if busy:
            return RestoreRefused(
                f"{unit.name}: the live database is in use: {busy.group(1)} is locked by "
                f"another transaction (waited {timeout:g}s); nothing was changed",
                "database_busy",
            )
        if "lock timeout" in text or "deadlock detected" in text:
            return RestoreRefused(
                f"{unit.name}: the live database is in use (a lock was not granted within "
                f"{timeout:g}s); nothing was changed: {text}",
                "database_busy",
            )
        return ComponentError(
            f"{unit.name}: the restore failed and was rolled back, nothing was changed: {text}",
            "restore_failed",
        )

    def _restore_sqlite_scratch(
        self, unit: Unit, opener: Opener, destination: Destination, on_bytes: OnBytes
    ) -> dict[str, Any]:
        path = self._scratch_file(unit, destination)
        partial = _temp_path(path.parent, unit.name, ".partial")
        try:
            size = _spool(opener, partial, on_bytes)
            if not _is_sqlite_file(partial):
                raise ComponentError(f"{unit.name}: the artifact is not a SQLite database")
            os.replace(partial, path)
        finally:
            _remove(partial)
        return {"engine": SQLITE, "path": str(path), "live": False, "bytes": size}

    def _restore_sqlite_live(
        self, manifest: dict[str, Any], opener: Opener, destination: Destination, on_bytes: OnBytes
    ) -> dict[str, Any]:
        live_path = Path(connections["default"].settings_dict["NAME"])
        spool = _temp_path(_scratch_dir(destination), OWN_UNIT, ".sqlite3")
        timeout = lock_timeout()
        try:
            size = _spool(opener, spool, on_bytes)
            if not _is_sqlite_file(spool):
                raise ComponentError(f"{OWN_UNIT}: the artifact is not a SQLite database")
            try:
                with _sqlite_readonly(spool) as restored:
                    verdict = restored.execute("PRAGMA quick_check").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                verdict = str(exc)
            if verdict != "ok":
                raise ComponentError(
                    f"{OWN_UNIT}: the backup's SQLite file is damaged ({verdict}); nothing was "
                    "changed",
                    "restore_failed",
                )
            result = _sqlite_replace(live_path, spool, set(preserved_tables()), timeout)
        finally:
            _remove(spool)
        result.update({"engine": SQLITE, "database": live_path.name, "live": True, "bytes": size})
        return result

    # -- check and discard --

    def _scratch_file(self, unit: Unit, destination: Destination) -> Path:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", destination.tag) or "scratch"
        return _scratch_dir(destination) / f"{unit.name}-{tag}.sqlite3"

    def check(
        self, unit: Unit, manifest: dict[str, Any], *, destination: Destination
    ) -> dict[str, Any]:
        if manifest.get("engine") == SQLITE:
            path = (
                Path(connections["default"].settings_dict["NAME"])
                if destination.live
                else self._scratch_file(unit, destination)
            )
            return self._check_sqlite(path, manifest)
        server = self._server(unit)
        if server is None:
            return _checks([_check("server configured", True, False)])
        if not destination.live:
            server = server.with_dbname(scratch_database_name(server.dbname, destination.tag))
        return self._check_postgres(server, manifest)

    def _check_postgres(self, server: PgServer, manifest: dict[str, Any]) -> dict[str, Any]:
        connection = server.connect()
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                tables = _pg_tables(cursor)
                counts = _pg_count(cursor, tables)
                migrations = _pg_migration_rows(cursor)
        finally:
            connection.close()
        return _compare(manifest, counts, migrations, engine=POSTGRESQL)

    def _check_sqlite(self, path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        if not path.exists():
            return _checks([_check("restored file exists", True, False)])
        with _sqlite_readonly(path) as db:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            counts = _sqlite_counts(db, _sqlite_tables(db))
            migrations = _sqlite_migration_rows(db)
        result = _compare(manifest, counts, migrations, engine=SQLITE)
        result["checks"].insert(0, _check("integrity_check", "ok", integrity))
        result["ok"] = result["ok"] and integrity == "ok"
        return result

    def discard(self, unit: Unit, *, destination: Destination) -> None:
        if destination.live:
            return  # never: discard is for scratch restores
        _remove(self._scratch_file(unit, destination))
        server = self._server(unit)
        if server is not None:
            _drop_database(server, scratch_database_name(server.dbname, destination.tag))


def _keys(tables: Iterable[tuple[str, str]]) -> set[str]:
    return {_rel_key(schema, name) for schema, name in tables}


def _compare(
    manifest: dict[str, Any],
    counts: dict[str, int],
    migrations: set[tuple[str, str]] | None,
    *,
    engine: str,
) -> dict[str, Any]:
    """Row counts of every table (and the migrations) against the backup's manifest."""
    expected: dict[str, int] = manifest.get("row_counts") or {}
    excluded: dict[str, int] = manifest.get("excluded_table_data") or {}
    items = [_check("engine", manifest.get("engine"), engine)]
    restored_tables = sorted(name for name in counts if name not in excluded)
    items.append(_check("tables", sorted(expected), restored_tables))
    for name in sorted(set(expected) | set(restored_tables)):
        items.append(_check(f"rows {name}", expected.get(name), counts.get(name)))
    for name in sorted(excluded):
        # Never dumped (data-subject keys): the restored table exists and is empty.
        items.append(_check(f"rows {name} (not in backups)", 0, counts.get(name)))
    if "migrations" in manifest:
        here = migration_summary(migrations or set())
        items.append(_check("migrations", manifest["migrations"], here["migrations"]))
        if manifest.get("migrations_digest"):
            items.append(
                _check(
                    "migrations digest", manifest["migrations_digest"], here["migrations_digest"]
                )
            )
    return _checks(items)


class _Counter:
    """Row counts of every table on the snapshot's own connection, in a thread, while the main
    thread pumps pg_dump's output (which would stall if nobody read it)."""

    def __init__(self, connection: Any, tables: list[tuple[str, str]]) -> None:
        self.connection = connection
        self.tables = tables
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="backup-row-counts", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.connection.cursor() as cursor:
                # One core: pg_dump and the pipeline need the others.
                cursor.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                self.counts = _pg_count(cursor, self.tables)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> dict[str, int]:
        self.thread.join()
        if self.error is not None:
            raise ComponentError(f"counting rows failed: {_clean(str(self.error))}")
        return self.counts

    def abort(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(psycopg2.Error):
                self.connection.cancel()
            self.thread.join(timeout=30)


class _Discard:
    """A sink for `_feed` when no copy of the stream is wanted."""

    def write(self, data: bytes) -> int:
        return len(data)


def _feed(
    args: list[str],
    opener: Opener,
    copy: BinaryIO | _Discard,
    *,
    env: dict[str, str],
    on_bytes: OnBytes,
    drain: bool = True,
) -> int:
    """Stream the plaintext into a tool's stdin and into `copy`; with `drain`, the whole
    stream reaches `copy` even when the tool stops reading early (it needed only some
    sections); without, reading stops there too."""
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(  # noqa: S603  (our argv, no shell)
        args, stdin=subprocess.PIPE, stderr=stderr, env=env
    )
    _widen_pipe(process.stdin)
    assert process.stdin is not None
    size, feeding = 0, True
    source = opener()
    try:
        while chunk := source.read(CHUNK):
            copy.write(chunk)
            size += len(chunk)
            on_bytes(len(chunk))
            if feeding:
                try:
                    process.stdin.write(chunk)
                except BrokenPipeError:
                    feeding = False
                    if process.wait() != 0 or not drain:
                        break
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        code = process.wait()
        if code != 0:
            raise ComponentError(
                f"{Path(args[0]).name} failed (exit {code}): {_read_tail(stderr)}",
                "pg_restore_failed",
            )
    finally:
        _close(source)
        _stop(process)
        stderr.close()
    return size


def _create_database(server: PgServer, name: str, manifest: dict[str, Any]) -> None:
    connection = server.connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            _terminate_and_drop(cursor, name)
            options = ["TEMPLATE template0"]
            if manifest.get("encoding"):
                options.append(f"ENCODING {_literal(manifest['encoding'])}")
            if manifest.get("lc_collate") and manifest.get("lc_ctype"):
                options.append(f"LC_COLLATE {_literal(manifest['lc_collate'])}")
                options.append(f"LC_CTYPE {_literal(manifest['lc_ctype'])}")
            cursor.execute(f"CREATE DATABASE {_ident(name)} {' '.join(options)}")
    except psycopg2.Error as exc:
        raise ComponentError(
            f"cannot create the scratch database {name}: {_clean(str(exc))}", "scratch_failed"
        ) from exc
    finally:
        connection.close()


def _terminate_and_drop(cursor: Any, name: str) -> None:
    # Works on every supported server (DROP DATABASE ... WITH (FORCE) needs 13).
    cursor.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        [name],
    )
    cursor.execute(f"DROP DATABASE IF EXISTS {_ident(name)}")


def _drop_database(server: PgServer, name: str) -> None:
    if name == server.dbname:
        raise ComponentError(f"refusing to drop {name}: it is the live database")
    connection = server.connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            _terminate_and_drop(cursor, name)
    finally:
        connection.close()


def _unvalidated(server: PgServer, plan: LivePlan) -> list[str]:
    if not plan.add_last:
        return []
    connection = server.connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SET search_path = ''")
            cursor.execute(
                "SELECT conrelid::regclass::text || '.' || quote_ident(conname) "
                "FROM pg_catalog.pg_constraint WHERE contype = 'f' AND NOT convalidated "
                "AND (conrelid::regclass::text, quote_ident(conname)) IN "
                "(SELECT * FROM unnest(%s::text[], %s::text[])) ORDER BY 1",
                [[t for t, _, _ in plan.add_last], [n for _, n, _ in plan.add_last]],
            )
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


def _sqlite_replace(
    live_path: Path, restored_path: Path, preserved: set[str], timeout: float
) -> dict[str, Any]:
    """Every table of the restored file except the preserved ones replaces the live one's rows,
    in one transaction on the live file: all or nothing."""
    db = sqlite3.connect(live_path, isolation_level=None, timeout=timeout)
    try:
        # Foreign keys off for the swap (a job run since by a user the backup does not have
        # would otherwise fail the whole restore); the check below still refuses a restore
        # whose own rows do not hold together.
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute("ATTACH DATABASE ? AS bridge_restored", [str(restored_path)])
        try:
            live_tables = set(_sqlite_tables(db))
            restored = [
                name for name in _sqlite_tables(db, "bridge_restored") if name not in preserved
            ]
            missing = [name for name in restored if name not in live_tables]
            if missing:
                raise RestoreRefused(
                    f"{OWN_UNIT}: tables of the backup are missing here: {', '.join(missing)}",
                    "schema_mismatch",
                )
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise RestoreRefused(
                    f"{OWN_UNIT}: the live database is in use: another connection holds its "
                    f"write lock (waited {timeout:g}s); nothing was changed",
                    "database_busy",
                ) from exc
            try:
                for name in restored:
                    columns = ", ".join(
                        _ident(row[1])
                        for row in db.execute(
                            f"PRAGMA bridge_restored.table_info({_ident(name)})"
                        ).fetchall()
                    )
                    table = _ident(name)
                    db.execute(f"DELETE FROM main.{table}")  # noqa: S608
                    db.execute(
                        f"INSERT INTO main.{table} ({columns}) "  # noqa: S608
                        f"SELECT {columns} FROM bridge_restored.{table}"
                    )
                _copy_sqlite_sequences(db, restored)
                broken, dangling = _sqlite_foreign_key_problems(db, set(restored))
                if broken:
                    raise ComponentError(
                        f"{OWN_UNIT}: the backup's rows do not hold together ("
                        f"{', '.join(broken)}); nothing was changed",
                        "restore_failed",
                    )
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                    raise RestoreRefused(
                        f"{OWN_UNIT}: the live database is in use ({exc}); nothing was changed",
                        "database_busy",
                    ) from exc
                raise
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("DETACH DATABASE bridge_restored")
    finally:
        db.close()
    return {
        "tables_restored": len(restored),
        "preserved_tables": sorted(preserved & live_tables),
        "dangling_references": dangling,
    }


def _copy_sqlite_sequences(db: sqlite3.Connection, tables: list[str]) -> None:
    # AUTOINCREMENT counters of the restored tables come back with them; the preserved
    # tables' counters stay (their rows stayed).
    has = {
        schema: bool(
            db.execute(
                f"SELECT 1 FROM {schema}.sqlite_master WHERE name = 'sqlite_sequence'"  # noqa: S608
            ).fetchone()
        )
        for schema in ("main", "bridge_restored")
    }
    if not (has["main"] and has["bridge_restored"]) or not tables:
        return
    marks = ", ".join("?" for _ in tables)
    db.execute(f"DELETE FROM main.sqlite_sequence WHERE name IN ({marks})", tables)  # noqa: S608
    db.execute(
        "INSERT INTO main.sqlite_sequence (name, seq) "  # noqa: S608
        f"SELECT name, seq FROM bridge_restored.sqlite_sequence WHERE name IN ({marks})",
        tables,
    )


def _sqlite_foreign_key_problems(
    db: sqlite3.Connection, restored: set[str]
) -> tuple[list[str], list[str]]:
    """(restored rows referencing missing restored rows: the backup is broken; references
    between kept history and restored tables that no longer resolve: reported, kept)."""
    broken: dict[str, int] = {}
    dangling: dict[str, int] = {}
    for table, _rowid, parent, _fk in db.execute("PRAGMA main.foreign_key_check").fetchall():
        key = f"{table} -> {parent}"
        bucket = broken if table in restored and parent in restored else dangling
        bucket[key] = bucket.get(key, 0) + 1
    return (
        [f"{key}: {n}" for key, n in sorted(broken.items())],
        [f"{key}: {n}" for key, n in sorted(dangling.items())],
    )


register(DatabaseHandler())
