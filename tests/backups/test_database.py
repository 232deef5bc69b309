"""The database component: dumps, drills and live restores of real databases.

PostgreSQL tests run against the shared server (a scratch database of their own for the stack
database, the run's test database for Bridge's own); SQLite tests against `make test`'s file.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.utils import timezone

from backups.components import (
    ComponentError,
    Destination,
    RestoreRefused,
    Unit,
    handler_for,
)
from backups.components import database as db_component
from backups.components.database import (
    OWN_UNIT,
    DatabaseHandler,
    KeptObjects,
    parse_toc,
    parse_tool_major,
    preserved_tables,
    scratch_database_name,
)
from bridge.models import Job
from compliance.audit import AuditContext, record_event
from compliance.models import AuditEvent
from security.models import SubjectKey, User
from tests.conftest import on_postgres

SUBJECT_MARKER = "subject-key-marker-7f3a"


@pytest.fixture(autouse=True)
def _scratch(settings, tmp_path) -> Path:
    settings.BACKUP_SCRATCH_DIR = tmp_path / "scratch"
    settings.BACKUP_DATABASES = []
    # Short: a refused restore must not make the suite wait.
    settings.BACKUP_RESTORE_LOCK_TIMEOUT = timedelta(milliseconds=500)
    return settings.BACKUP_SCRATCH_DIR


@pytest.fixture
def handler() -> DatabaseHandler:
    found = handler_for("database")
    assert isinstance(found, DatabaseHandler)
    return found


def sqlite_only() -> None:
    if on_postgres():
        pytest.skip("SQLite only: this run's database is PostgreSQL")


def own_unit(handler: DatabaseHandler) -> Unit:
    units = handler.units()
    assert isinstance(units, list)
    return next(unit for unit in units if unit.name == OWN_UNIT)


def back_up(handler: DatabaseHandler, unit: Unit, parent: dict | None = None) -> tuple[dict, bytes]:
    out = io.BytesIO()
    seen = []
    manifest = handler.backup(unit, out, parent=parent, on_bytes=seen.append)
    data = out.getvalue()
    assert sum(seen) == len(data) == manifest["bytes"]
    return manifest, data


def opener(data: bytes) -> Callable[[], io.BytesIO]:
    return lambda: io.BytesIO(data)


class FailingReader(io.RawIOBase):
    """A reader that hands out part of a stream and then fails, as a decrypting reader does on a
    tampered or truncated chunk."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        self.data = memoryview(data)
        self.position = 0
        self.fail_after = fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.position >= self.fail_after:
            raise OSError("artifact database-default: truncated: chunk 3 missing")
        end = min(self.position + len(buffer), self.fail_after)
        count = end - self.position
        buffer[:count] = self.data[self.position : end]
        self.position = end
        return count


def make_subject_key(subject: str = "subject-1") -> SubjectKey:
    return SubjectKey.objects.create(
        key_id=f"sk-{uuid.uuid4().hex[:12]}",
        purpose="pii",
        subject_id=subject,
        master_key_id="mk:test",
        wrapped=SUBJECT_MARKER,
        created_at=timezone.now(),
    )


def restore(handler, unit, manifest, source, destination) -> dict:
    return handler.restore(
        unit, [manifest], [source], destination=destination, on_bytes=lambda n: None
    )


# --- Units, names, parsing (no database) -----------------------------------------------------


def test_units_are_bridges_database_and_each_stack_url_without_its_password(settings, handler):
    settings.BACKUP_DATABASES = [
        "postgres://app:s3cret-pw@db.example:5432/shop",
        "postgresql://ops:other-pw@db2.example:5433/shop",
        "postgres://u@db3.example/default",
    ]
    units = handler.units()
    names = [unit.name for unit in units]
    assert names == [OWN_UNIT, "database-shop", "database-shop-db2.example-5433", names[3]]
    assert names[3].startswith("database-default-")  # never Bridge's own unit name
    assert "s3cret-pw" not in repr(units) and "other-pw" not in repr(units)
    assert units[1].options["url"] == "postgres://app@db.example:5432/shop"


def test_a_stack_url_that_is_not_postgresql_is_a_clear_error(settings, handler):
    settings.BACKUP_DATABASES = ["mysql://root:pw@db/shop"]
    with pytest.raises(ComponentError, match="only PostgreSQL") as caught:
        handler.units()
    assert "pw@" not in str(caught.value)


def test_tool_versions_and_scratch_names():
    assert parse_tool_major("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)\n") == 15
    assert parse_tool_major("pg_dump (PostgreSQL) 9.6.24") == 906
    long_name = "x" * 63
    scratch = scratch_database_name(long_name, "5f1c2d0e-aaaa-bbbb")
    assert len(scratch.encode()) <= 63 and scratch != long_name and "_drill_5f1c2d0e" in scratch
    assert scratch_database_name("bridge", "42") == "bridge_drill_42"


def test_the_preserved_tables_are_the_history_of_bridges_own_database():
    kept = set(preserved_tables())
    assert {
        "compliance_auditevent",
        "compliance_auditseal",
        "compliance_auditchainhead",
        "compliance_auditcheckpoint",
        "bridge_job",
        "backups_backup",
        "backups_artifact",
        "backups_backupcopy",
        "backups_restorejob",
        "backups_walsegment",
        "security_subjectkey",
        "django_migrations",
    } <= kept
    assert "security_user" not in kept and "auth_group" not in kept


def test_the_toc_filter_skips_every_object_of_a_preserved_table():
    toc = """;
; Archive created at 2025-01-01
3; 2615 2200 SCHEMA - public pg_database_owner
311; 1255 16745 FUNCTION public compliance_append_only() postgres
241; 1259 16594 TABLE public bridge_job postgres
240; 1259 16593 SEQUENCE public bridge_job_id_seq postgres
250; 1259 16451 TABLE public security_user postgres
3966; 0 16594 TABLE DATA public bridge_job postgres
3967; 0 16451 TABLE DATA public security_user postgres
4052; 0 0 SEQUENCE SET public bridge_job_id_seq postgres
3565; 2606 16600 CONSTRAINT public bridge_job bridge_job_pkey postgres
3566; 2606 16601 CONSTRAINT public security_user security_user_pkey postgres
3611; 1259 16744 INDEX public audit_action_idx postgres
3793; 2620 16746 TRIGGER public compliance_auditevent compliance_auditevent_append_only postgres
3768; 2606 16601 FK CONSTRAINT public bridge_job bridge_job_actor_id_fk postgres
3790; 2606 17163 FK CONSTRAINT public recovery_healoperation heal_job_id_fk postgres
3791; 2606 17164 FK CONSTRAINT public recovery_healoperation heal_service_id_fk postgres
4100; 0 0 COMMENT public TABLE bridge_job postgres
4101; 0 0 ACL public TABLE security_user postgres
4102; 0 0 COMMENT public COLUMN bridge_job.kind postgres
"""
    kept = KeptObjects(
        tables={("public", "bridge_job"), ("public", "compliance_auditevent")},
        indexes={("public", "audit_action_idx")},
        sequences={("public", "bridge_job_id_seq")},
        functions={("public", "compliance_append_only")},
        foreign_keys={("public", "recovery_healoperation", "heal_job_id_fk")},
    )
    entries = [entry for entry in parse_toc(toc) if not isinstance(entry, str)]
    skipped = {entry.line.split(";")[0] for entry in entries if kept.owns(entry)}
    assert skipped == {
        "311", "241", "240", "3966", "4052", "3565", "3611", "3793", "3768", "3790", "4100",
        "4102",
    }  # fmt: skip
    by_id = {entry.line.split(";")[0]: entry for entry in entries}
    assert by_id["3966"].kind == "TABLE DATA" and by_id["3966"].tag == "bridge_job"
    assert by_id["3768"].kind == "FK CONSTRAINT"
    assert by_id["3"].kind == "SCHEMA" and by_id["3"].schema == "-"


# --- Bridge's own database on SQLite ---------------------------------------------------------


def _sqlite_rows(path: str | Path, table: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()  # noqa: S608


def _live_path() -> str:
    return connection.settings_dict["NAME"]


def test_sqlite_round_trip_into_scratch_without_subject_keys(transactional_db, handler, tmp_path):
    sqlite_only()
    # given
    for name in ("alpha", "Zoë ☃ 日本", "gamma"):
        Group.objects.create(name=name)
    make_subject_key()
    unit = own_unit(handler)
    # when
    manifest, data = back_up(handler, unit)
    destination = Destination(live=False, scratch_dir=tmp_path / "drill", tag="t1")
    restored = restore(handler, unit, manifest, opener(data), destination)
    # then
    assert manifest["engine"] == "sqlite" and manifest["server_version"] == sqlite3.sqlite_version
    assert manifest["excluded_table_data"] == {"security_subjectkey": 1}
    assert "security_subjectkey" not in manifest["row_counts"]
    assert manifest["row_counts"]["auth_group"] == Group.objects.count()
    assert manifest["migrations"]["backups"] == latest_migration("backups")
    assert SUBJECT_MARKER.encode() not in data  # deleted, and vacuumed out of free pages
    checked = handler.check(unit, manifest, destination=destination)
    assert checked["ok"], [c for c in checked["checks"] if not c["ok"]]
    assert _sqlite_rows(restored["path"], "auth_group") == _sqlite_rows(_live_path(), "auth_group")
    assert _sqlite_rows(restored["path"], "security_subjectkey") == []
    handler.discard(unit, destination=destination)
    assert not Path(restored["path"]).exists()


def test_sqlite_live_restore_rewinds_the_data_and_keeps_the_history(transactional_db, handler):
    sqlite_only()
    # given: a backup, then changes, history and a subject key written after it
    roles = set(Group.objects.values_list("name", flat=True))
    Group.objects.create(name="before")
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    Group.objects.filter(name="before").delete()
    Group.objects.create(name="after")
    newcomer = User.objects.create_user(username="newcomer", password="x" * 20)
    job = Job.objects.create(kind="test.after_backup", actor=newcomer)
    event = record_event(action="test.after_backup", context=AuditContext.system())
    key = make_subject_key("subject-after")
    # when
    result = restore(handler, unit, manifest, opener(data), Destination(live=True))
    # then
    assert set(Group.objects.values_list("name", flat=True)) == roles | {"before"}
    assert not User.objects.filter(username="newcomer").exists()
    assert Job.objects.get(pk=job.pk).actor_id == newcomer.pk  # kept, as it was
    assert AuditEvent.objects.filter(pk=event).exists()
    assert SubjectKey.objects.filter(pk=key.pk).exists()
    assert "bridge_job -> security_user: 1" in result["dangling_references"]
    assert "compliance_auditevent" in result["preserved_tables"]


def _sqlite_counts() -> dict[str, int]:
    with sqlite3.connect(_live_path()) as db:
        tables = db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        return {
            t: db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]  # noqa: S608
            for (t,) in tables
        }


def test_sqlite_live_restore_is_refused_while_another_connection_writes(transactional_db, handler):
    sqlite_only()
    Group.objects.create(name="before")
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    Group.objects.create(name="after")
    before = _sqlite_counts()
    writer = sqlite3.connect(_live_path(), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO auth_group (name) VALUES ('uncommitted')")
        started = time.monotonic()
        with pytest.raises(RestoreRefused, match="in use") as caught:
            restore(handler, unit, manifest, opener(data), Destination(live=True))
        assert time.monotonic() - started < 10
        assert caught.value.code == "database_busy"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert _sqlite_counts() == before
    assert {"before", "after"} <= set(Group.objects.values_list("name", flat=True))


@pytest.mark.parametrize("damage", ["reader_fails", "truncated"])
def test_sqlite_live_restore_from_a_broken_stream_changes_nothing(
    transactional_db, handler, damage
):
    sqlite_only()
    Group.objects.create(name="before")
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    Group.objects.create(name="after")
    before = _sqlite_counts()
    if damage == "reader_fails":
        source = lambda: FailingReader(data, len(data) // 2)  # noqa: E731
        expected = OSError
    else:
        source = opener(data[: len(data) // 2])
        expected = ComponentError
    with pytest.raises(expected):
        restore(handler, unit, manifest, source, Destination(live=True))
    assert _sqlite_counts() == before


# --- Refusals (either engine) -------------------------------------------------------------------


def test_a_backup_of_another_engine_is_refused(transactional_db, handler):
    unit = own_unit(handler)
    manifest, _ = back_up(handler, unit)
    here = manifest["engine"]
    other = "sqlite" if here == "postgresql" else "postgresql"
    with pytest.raises(RestoreRefused) as caught:
        handler.preflight(unit, {**manifest, "engine": other}, destination=Destination(live=True))
    assert str(caught.value) == f"{OWN_UNIT}: the backup is {other}, this database is {here}"
    assert caught.value.code == "engine_mismatch"


def test_a_backup_with_a_migration_not_applied_here_is_refused(transactional_db, handler):
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    newer = {**manifest, "migrations": {**manifest["migrations"], "backups": "0999_future"}}
    Group.objects.create(name="untouched")
    with pytest.raises(RestoreRefused, match=r"migration backups\.0999_future") as caught:
        restore(handler, unit, newer, opener(data), Destination(live=True))
    assert caught.value.code == "schema_mismatch"
    assert Group.objects.filter(name="untouched").exists()


def test_a_backup_older_than_the_schema_here_is_refused(transactional_db, handler):
    unit = own_unit(handler)
    manifest, _ = back_up(handler, unit)
    migrations = dict(manifest["migrations"])
    app = "backups"
    del migrations[app]
    older = {**manifest, "migrations": migrations, "migrations_digest": "0" * 64}
    with pytest.raises(RestoreRefused, match=f"{app} is at migration .* and at none"):
        handler.preflight(unit, older, destination=Destination(live=True))


def test_incremental_backups_dump_the_database_whole(transactional_db, handler):
    unit = own_unit(handler)
    full, _ = back_up(handler, unit)
    incremental, _ = back_up(handler, unit, parent=full)
    assert incremental["mode"] == "full_dump" and "WAL" in incremental["reason"]
    assert not incremental.get("incremental")


# --- PostgreSQL -------------------------------------------------------------------------------


def _server() -> dict[str, str]:
    settings_dict = connection.settings_dict
    return {
        "host": settings_dict.get("HOST") or "127.0.0.1",
        "port": str(settings_dict.get("PORT") or 5432),
        "user": settings_dict.get("USER") or "postgres",
    }


def _pg(dbname: str) -> Any:
    server = _server()
    conn = psycopg2.connect(dbname=dbname, **server)
    conn.autocommit = True
    return conn


def _database_exists(name: str) -> bool:
    conn = _pg("postgres")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            return cursor.fetchone() is not None
    finally:
        conn.close()


def _drop(name: str) -> None:
    conn = _pg("postgres")
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [name],
            )
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        conn.close()


STACK_SCHEMA = """
CREATE TABLE items (
    id serial PRIMARY KEY,
    name text NOT NULL,
    doc jsonb,
    blob bytea,
    note text,
    price numeric(12, 2),
    at timestamptz DEFAULT now()
);
CREATE TABLE tags (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    item_id int NOT NULL REFERENCES items (id),
    tag varchar(40) NOT NULL
);
CREATE INDEX tags_tag_idx ON tags (tag);
CREATE VIEW tagged AS SELECT i.name, t.tag FROM items i JOIN tags t ON t.item_id = i.id;
CREATE TABLE empty_one (id int PRIMARY KEY);
"""


def _fill(conn: Any) -> None:
    with conn.cursor() as cursor:
        cursor.execute(STACK_SCHEMA)
        rows = [
            ("plain", '{"a": 1}', b"\x00\x01\xff", "a note", "12.50"),
            ("Zoë ☃ 日本 \U0001f600", '{"nested": {"list": [1, "two", null]}}', b"", None, None),
            ("nulls", None, None, None, None),
            ("quote ' \\ back\ttab", '{"text": "line\\nbreak"}', bytes(range(256)), "", "0"),
        ]  # fmt: skip
        for name, doc, blob, note, price in rows:
            cursor.execute(
                "INSERT INTO items (name, doc, blob, note, price) VALUES (%s, %s, %s, %s, %s)",
                [name, doc, psycopg2.Binary(blob) if blob is not None else None, note, price],
            )
        cursor.execute(
            "INSERT INTO tags (item_id, tag) "
            "SELECT id, 'tag-' || id FROM items, generate_series(1, 3)"
        )


def _rows(dbname: str) -> dict[str, list[tuple]]:
    conn = _pg(dbname)
    try:
        with conn.cursor() as cursor:
            found = {}
            for table in ("items", "tags", "empty_one"):
                cursor.execute(f"SELECT * FROM {table} ORDER BY 1")  # noqa: S608
                found[table] = [
                    tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                    for row in cursor.fetchall()
                ]
            cursor.execute("SELECT count(*) FROM tagged")
            found["tagged"] = cursor.fetchall()
            return found
    finally:
        conn.close()


@pytest.fixture
def stack_database(postgres, settings) -> Iterator[str]:
    """A database of the stack on the shared server, listed in BACKUP_DATABASES (with a
    password in its URL that the server's trust authentication ignores)."""
    name = f"h2src_{uuid.uuid4().hex[:10]}"
    admin = _pg("postgres")
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    conn = _pg(name)
    try:
        _fill(conn)
    finally:
        conn.close()
    server = _server()
    settings.BACKUP_DATABASES = [
        f"postgres://{server['user']}:n0t-a-real-pw@{server['host']}:{server['port']}/{name}"
    ]
    try:
        yield name
    finally:
        _drop(name)
        for tag in ("s1", "w1", "f1"):
            _drop(scratch_database_name(name, tag))


def _stack_unit(handler: DatabaseHandler, name: str) -> Unit:
    return next(unit for unit in handler.units() if unit.name == f"database-{name}")


def test_postgres_stack_database_round_trips_row_for_row(stack_database, handler, tmp_path):
    # given
    unit = _stack_unit(handler, stack_database)
    original = _rows(stack_database)
    # when: backed up, then restored into a scratch database
    manifest, data = back_up(handler, unit)
    destination = Destination(live=False, scratch_dir=tmp_path / "drill", tag="s1")
    restored = restore(handler, unit, manifest, opener(data), destination)
    # then
    assert "n0t-a-real-pw" not in repr(manifest) and "n0t-a-real-pw" not in repr(unit)
    assert manifest["engine"] == "postgresql" and manifest["database"] == stack_database
    assert manifest["row_counts"] == {"items": 4, "tags": 12, "empty_one": 0}
    assert manifest["system_identifier"] and manifest["pg_dump_version"] >= 15
    assert manifest["server_major"] >= 15 and "migrations" not in manifest
    assert data[:5] == b"PGDMP"  # the custom format, uncompressed (the pipeline compresses)
    assert restored["database"] == scratch_database_name(stack_database, "s1")
    assert _rows(restored["database"]) == original
    checked = handler.check(unit, manifest, destination=destination)
    assert checked["ok"], [c for c in checked["checks"] if not c["ok"]]
    handler.discard(unit, destination=destination)
    assert not _database_exists(restored["database"])

    # when: the source changes, then the backup is restored over it
    conn = _pg(stack_database)
    with conn.cursor() as cursor:
        cursor.execute("UPDATE items SET name = 'changed', doc = '{}' WHERE id = 1")
        cursor.execute("DELETE FROM tags WHERE item_id = 2")
        cursor.execute("INSERT INTO items (name) VALUES ('new')")
        cursor.execute("CREATE TABLE made_later (id int)")
    conn.close()
    result = restore(handler, unit, manifest, opener(data), Destination(live=True))
    # then: every row is the backup's, and the sequences continue from there
    assert result["live"] and result["preserved_tables"] == []
    assert _rows(stack_database) == original
    conn = _pg(stack_database)
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO items (name) VALUES ('next') RETURNING id")
        assert cursor.fetchone()[0] == 5
        cursor.execute("SELECT to_regclass('made_later') IS NOT NULL")
        assert cursor.fetchone()[0]  # objects the backup does not know are left alone
    conn.close()


def test_postgres_counts_match_the_dump_while_the_database_is_written(
    stack_database, handler, tmp_path
):
    # given: a writer inserting rows while the backup runs
    unit = _stack_unit(handler, stack_database)
    stop = threading.Event()
    written = []

    def write() -> None:
        conn = _pg(stack_database)
        with conn.cursor() as cursor:
            while not stop.is_set():
                cursor.execute("INSERT INTO tags (item_id, tag) VALUES (1, 'live') RETURNING id")
                written.append(cursor.fetchone()[0])
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while len(written) < 50:
            time.sleep(0.01)
        manifest, data = back_up(handler, unit)
        during = len(written)
        while len(written) < during + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        writer.join()
    # when
    destination = Destination(live=False, scratch_dir=tmp_path / "drill", tag="w1")
    restore(handler, unit, manifest, opener(data), destination)
    # then: the counts are the snapshot's, exactly
    checked = handler.check(unit, manifest, destination=destination)
    assert checked["ok"], [c for c in checked["checks"] if not c["ok"]]
    assert 12 + 50 <= manifest["row_counts"]["tags"] < 12 + len(written)


def test_postgres_backup_without_pg_dump_names_the_package(
    stack_database, handler, monkeypatch, tmp_path
):
    unit = _stack_unit(handler, stack_database)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ComponentError) as caught:
        handler.backup(unit, io.BytesIO(), parent=None, on_bytes=lambda n: None)
    message = str(caught.value)
    assert "pg_dump is not installed" in message
    assert "postgresql-client-15" in message and "apt-get install postgresql-client-15" in message
    assert caught.value.code == "pg_tools_missing"


def test_postgres_restore_of_a_stack_database_no_longer_configured_is_refused(
    stack_database, handler, settings
):
    unit = _stack_unit(handler, stack_database)
    manifest, data = back_up(handler, unit)
    settings.BACKUP_DATABASES = []
    with pytest.raises(RestoreRefused, match="no longer configured"):
        restore(handler, unit, manifest, opener(data), Destination(live=True))


def test_postgres_scratch_restore_from_a_failing_stream_leaves_no_database(
    stack_database, handler, tmp_path
):
    unit = _stack_unit(handler, stack_database)
    manifest, data = back_up(handler, unit)
    destination = Destination(live=False, scratch_dir=tmp_path / "drill", tag="f1")
    with pytest.raises(OSError, match="truncated"):
        restore(
            handler,
            unit,
            manifest,
            lambda: FailingReader(data, len(data) - 100),
            destination,
        )
    assert not _database_exists(scratch_database_name(stack_database, "f1"))
    drill = tmp_path / "drill"
    assert not drill.exists() or list(drill.iterdir()) == []  # no plaintext left behind


# Bridge's own database on PostgreSQL: transactional tests, so the dump (another connection)
# sees their rows.


def _own_counts() -> dict[str, int]:
    with connection.cursor() as cursor:
        tables = db_component._pg_tables(cursor)
        return db_component._pg_count(cursor, tables)


def test_postgres_own_database_drill_has_no_subject_keys(
    postgres, transactional_db, handler, tmp_path
):
    # given
    Group.objects.create(name="Zoë ☃")
    make_subject_key()
    unit = own_unit(handler)
    # when
    started = time.monotonic()
    manifest, data = back_up(handler, unit)
    destination = Destination(live=False, scratch_dir=tmp_path / "drill", tag="own1")
    restored = restore(handler, unit, manifest, opener(data), destination)
    elapsed = time.monotonic() - started
    try:
        # then
        assert manifest["excluded_table_data"] == {"security_subjectkey": 1}
        assert SUBJECT_MARKER.encode() not in data
        assert manifest["migrations"]["backups"] == latest_migration("backups")
        assert manifest["migration_count"] > 10
        checked = handler.check(unit, manifest, destination=destination)
        assert checked["ok"], [c for c in checked["checks"] if not c["ok"]]
        assert any(
            c["name"] == "rows security_subjectkey (not in backups)" for c in checked["checks"]
        )
        conn = _pg(restored["database"])
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM security_subjectkey")
            assert cursor.fetchone()[0] == 0
            cursor.execute("SELECT name FROM auth_group")
            assert ("Zoë ☃",) in cursor.fetchall()
        conn.close()
        assert elapsed < 30
    finally:
        handler.discard(unit, destination=destination)
    assert not _database_exists(restored["database"])


def test_postgres_live_restore_rewinds_the_data_and_keeps_the_history(
    postgres, transactional_db, handler
):
    # given: a backup, then changes, history and a subject key written after it
    roles = set(Group.objects.values_list("name", flat=True))
    Group.objects.create(name="before")
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    Group.objects.filter(name="before").delete()
    Group.objects.create(name="after")
    newcomer = User.objects.create_user(username="newcomer", password="x" * 20)
    job = Job.objects.create(kind="test.after_backup", actor=newcomer)
    event = record_event(action="test.after_backup", context=AuditContext.system())
    key = make_subject_key("subject-after")
    # when
    result = restore(handler, unit, manifest, opener(data), Destination(live=True))
    # then
    assert set(Group.objects.values_list("name", flat=True)) == roles | {"before"}
    assert not User.objects.filter(username="newcomer").exists()
    assert Job.objects.get(pk=job.pk).actor_id == newcomer.pk  # the job's row, untouched
    assert AuditEvent.objects.filter(pk=event).exists()
    assert SubjectKey.objects.filter(pk=key.pk).exists()
    assert set(result["preserved_tables"]) == set(preserved_tables())
    # the kept tables' sequences were not rewound either
    assert Job.objects.create(kind="test.next").pk > job.pk
    # the job's foreign key to its (now missing) user is kept, NOT VALID
    assert len(result["unvalidated_constraints"]) == 1
    assert result["unvalidated_constraints"][0].startswith("public.bridge_job.")
    # the constraint still holds for new rows
    with pytest.raises(Exception, match="foreign key"):
        Job.objects.create(kind="test.dangling", actor_id=10**9)
    checked = handler.check(unit, manifest, destination=Destination(live=True))
    failed = {c["name"] for c in checked["checks"] if not c["ok"]}
    # only the preserved tables differ from the backup
    kept = {f"rows {table}" for table in preserved_tables()}
    assert failed <= kept | {"tables", "rows security_subjectkey (not in backups)"}
    assert "rows auth_group" not in failed and "rows security_user" not in failed


def test_postgres_live_restore_is_refused_while_a_transaction_holds_a_lock(
    postgres, transactional_db, handler
):
    # given: a backup, a change, and another connection inside a transaction on a table
    Group.objects.create(name="before")
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    Group.objects.create(name="after")
    before = _own_counts()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = psycopg2.connect(dbname=connection.settings_dict["NAME"], **_server())
        with conn.cursor() as cursor:
            cursor.execute("UPDATE auth_group SET name = name WHERE name = 'after'")
            holding.set()
            release.wait(30)
        conn.rollback()
        conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        # when
        with pytest.raises(RestoreRefused, match=r"public\.auth_group is locked") as caught:
            restore(handler, unit, manifest, opener(data), Destination(live=True))
        # then
        assert time.monotonic() - started < 15
        assert caught.value.code == "database_busy"
    finally:
        release.set()
        holder.join()
    assert _own_counts() == before
    assert {"before", "after"} <= set(Group.objects.values_list("name", flat=True))


@pytest.mark.parametrize("damage", ["reader_fails", "truncated_toc", "truncated_data", "corrupted"])
def test_postgres_live_restore_from_a_broken_stream_changes_nothing(
    postgres, transactional_db, handler, damage
):
    Group.objects.create(name="before")
    unit = own_unit(handler)
    manifest, data = back_up(handler, unit)
    Group.objects.create(name="after")
    before = _own_counts()
    if damage == "reader_fails":
        source, expected = (lambda: FailingReader(data, len(data) * 2 // 3)), OSError
    elif damage == "truncated_toc":  # cut inside the table of contents
        source, expected = opener(data[: len(data) // 3]), ComponentError
    elif damage == "truncated_data":  # cut in the data: the script has begun, then fails
        source, expected = opener(data[: len(data) * 95 // 100]), ComponentError
    else:
        middle = len(data) * 2 // 3
        source, expected = (
            opener(data[:middle] + b"\xff" * 64 + data[middle + 64 :]),
            ComponentError,
        )
    with pytest.raises(expected):
        restore(handler, unit, manifest, source, Destination(live=True))
    assert _own_counts() == before
    assert {"before", "after"} <= set(Group.objects.values_list("name", flat=True))


def test_a_drill_is_refused_where_it_cannot_run(transactional_db, handler):
    unit = own_unit(handler)
    manifest, _ = back_up(handler, unit)
    if manifest["engine"] == "sqlite":
        # a drill of a SQLite backup needs no server
        handler.preflight(unit, manifest, destination=Destination(live=False, tag="x"))
        pg = {**manifest, "engine": "postgresql"}
        with pytest.raises(RestoreRefused, match="the backup is postgresql, the server a drill"):
            handler.preflight(unit, pg, destination=Destination(live=False, tag="x"))
    else:
        newer = {**manifest, "server_major": manifest["server_major"] + 1}
        with pytest.raises(RestoreRefused, match="does not restore into an older major"):
            handler.preflight(unit, newer, destination=Destination(live=False, tag="x"))


def latest_migration(app: str) -> str:
    from django.db.migrations.recorder import MigrationRecorder

    return max(MigrationRecorder.Migration.objects.filter(app=app).values_list("name", flat=True))
