"""The verifier's fast hashing gives exactly the bytes `event_hash` defines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compliance import audit, chain, proof, verification
from compliance.audit import iso
from compliance.chain import _EVENT_FIELDS, event_hash, row_hasher
from compliance.proof import row_canonical

COLUMNS = ("seq", "prev_hash", "hash", "hash_version", *_EVENT_FIELDS)
text = st.text(max_size=40)  # every code point: quotes, backslashes, controls, astral
maybe_int = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)

events = st.fixed_dictionaries(
    {
        "id": st.integers(min_value=1, max_value=2**62),
        "seq": st.integers(min_value=1, max_value=2**62),
        "occurred_at": st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ),
        "actor_id": maybe_int,
        "actor_username": text,
        "client_ip": st.none() | st.ip_addresses().map(str),
        "request_id": text,
        "action": text,
        "object_type": text,
        "object_id": text,
        "method": text,
        "path": text,
        "status_code": st.none() | st.integers(min_value=0, max_value=999),
        "latency_ms": st.none() | finite,
        "details": text,
        "personal": text,
        "actor_index": text,
        "ip_index": text,
        "prev_hash": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    }
)


def _row(fields: dict, version: int) -> tuple:
    values = {**fields, "occurred_at": iso(fields["occurred_at"])}
    return (fields["seq"], fields["prev_hash"], "", version, *(values[n] for n in _EVENT_FIELDS))


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from(sorted(chain.HASH_VERSIONS)))
def test_the_fast_hash_equals_the_defining_hash_on_any_event(fields, version):
    assert row_hasher(version, COLUMNS)(_row(fields, version)) == event_hash(fields, version)


@settings(max_examples=100, deadline=None)
@given(events)
def test_the_fast_hash_equals_the_defining_hash_for_a_later_version_too(fields):
    later = max(chain.HASH_VERSIONS) + 1
    chain.HASH_VERSIONS[later] = tuple(
        name for name in chain.HASH_VERSIONS[later - 1] if name != "client_ip"
    )
    try:
        assert row_hasher(later, COLUMNS)(_row(fields, later)) == event_hash(fields, later)
    finally:
        del chain.HASH_VERSIONS[later]


def test_the_fast_hash_refuses_what_canonical_json_refuses():
    fields = {name: "" for name in _EVENT_FIELDS} | {
        "id": 1,
        "seq": 1,
        "occurred_at": iso(datetime(2026, 1, 1, tzinfo=UTC)),
        "latency_ms": float("nan"),
        "prev_hash": "0" * 64,
    }
    row = (1, "0" * 64, "", 1, *(fields[n] for n in _EVENT_FIELDS))
    with pytest.raises(ValueError, match="not JSON"):
        row_hasher(1, COLUMNS)(row)


@pytest.mark.django_db(transaction=True)
def test_verification_streams_the_chain_in_ranges_and_finds_a_break_in_a_later_one(monkeypatch):
    from tests.conftest import bypass_triggers

    # given more events than one batch and one range per reader, one far into the chain
    # rewritten
    monkeypatch.setattr(verification, "_BATCH", 7)
    monkeypatch.setattr(verification, "CHUNK", 10)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(40):
        audit.record_event(action=f"custom.s{n}", occurred_at=base + timedelta(microseconds=n))
    chain.seal_all_pending()
    assert verification.check_chain().ok
    victim = audit.AuditEvent.objects.order_by("id")[33]
    bypass_triggers("UPDATE compliance_auditevent SET path = 'x' WHERE id = %s", [victim.pk])
    # then the break is named, whichever batch it is in
    result = verification.check_chain()
    assert (result.ok, result.first_broken_id, result.checked) == (False, victim.pk, 33)


# PostgreSQL text holds no NUL; column widths as the model declares them.
pg_characters = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
pg_text = st.text(alphabet=pg_characters, max_size=30)
CIPHERTEXT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:"
stored_events = st.lists(
    st.fixed_dictionaries(
        {
            "occurred_at": st.datetimes(
                min_value=datetime(2000, 1, 1),
                max_value=datetime(2100, 1, 1),
                timezones=st.just(UTC),
            ),
            "actor_id": maybe_int,
            "actor_username": pg_text,
            "client_ip": st.none() | st.ip_addresses().map(str),
            "request_id": pg_text,
            "action": pg_text,
            "object_type": pg_text,
            "object_id": pg_text,
            "method": st.text(alphabet=pg_characters, max_size=10),
            "path": pg_text,
            "status_code": st.none() | st.integers(min_value=0, max_value=32767),
            "latency_ms": st.none() | finite,
            "details": pg_text,
            # What hash version 2 adds, as Bridge writes it: a ciphertext and hex blind indexes
            # (the server concatenates them unescaped; see the next test for anything else).
            "personal": st.just("") | st.text(alphabet=CIPHERTEXT_ALPHABET, max_size=200),
            "actor_index": st.just("") | st.text(alphabet="0123456789abcdef", max_size=64),
            "ip_index": st.just("") | st.text(alphabet="0123456789abcdef", max_size=64),
        }
    ),
    min_size=1,
    max_size=25,
)


# The examples share one test's database: each adds events to the chain and verifies it all.
@pytest.mark.django_db
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stored_events, st.booleans())
def test_postgresql_writes_the_canonical_json_python_hashes_for_any_stored_event(
    postgres, rows, personal_data
):
    from django.db import connection
    from django.test import override_settings

    from compliance.audit import bulk_insert
    from compliance.models import AuditEvent

    # given any events, stored as they are and sealed by the sealer (Python's canonical JSON),
    # with hash version 1 or 2 (a row holding sealed personal data is always version 2)
    columns = tuple(rows[0])
    bulk_insert(AuditEvent, columns, [tuple(row[name] for name in columns) for row in rows])
    with override_settings(AUDIT_PERSONAL_DATA=personal_data):
        chain.seal_all_pending()
    head = chain.chain_head().last_seq
    # then the text PostgreSQL builds hashes to every seal, and the fast walk verifies them
    python_rows = {row[0]: row for row in verification.chain_rows(head)}
    with connection.cursor() as cursor:
        cursor.execute(verification._canonical_sql(), [0, head])
        for row in cursor.fetchall():
            canonical = row[4] if row[6] is None else row[4] + proof.json_value(row[5]) + row[6]
            expected = row_canonical(row[3], COLUMNS)(python_rows[row[0]])
            assert canonical == expected
            assert verification.canonical_hasher(row[3])(row) == row[2]
    result = verification.check_chain()
    assert result.ok, result.reason


@pytest.mark.django_db
@pytest.mark.parametrize("column", ["personal", "actor_index", "ip_index"])
def test_a_sealed_column_the_server_would_spell_otherwise_fails_and_never_passes(postgres, column):
    from tests.conftest import bypass_triggers

    # given a chain whose sealed columns hold what Bridge writes
    for n in range(3):
        audit.record_event(
            action=f"custom.q{n}",
            context=audit.AuditContext(actor_id=1, actor_username="alice", client_ip="192.0.2.1"),
        )
    chain.seal_all_pending()
    assert verification.check_chain().ok
    # when one is rewritten to something JSON escapes (and its seal recomputed, so that only
    # the server's spelling, never the content, could tell)
    victim = audit.AuditEvent.objects.select_related("seal").order_by("id")[1]
    value = 'v1.sk:x"\\\n'
    bypass_triggers(
        f"UPDATE compliance_auditevent SET {column} = %s WHERE id = %s",  # noqa: S608
        [value, victim.pk],
    )
    victim.refresh_from_db()
    fields = {name: getattr(victim, name) for name in chain._EVENT_FIELDS}
    fields.update(seq=victim.seal.seq, prev_hash=victim.seal.prev_hash)
    rehashed = chain.event_hash(fields, victim.seal.hash_version)
    bypass_triggers(
        "UPDATE compliance_auditseal SET hash = %s WHERE event_id = %s", [rehashed, victim.pk]
    )
    # then the fast path reports that event: a difference of spelling only ever fails
    result = verification.check_chain()
    assert (result.ok, result.first_broken_id) == (False, victim.pk)


@pytest.mark.django_db
def test_postgresql_spells_latencies_at_every_float_boundary_as_python_does(postgres):
    from compliance.audit import bulk_insert
    from compliance.models import AuditEvent

    # Where PostgreSQL's float text and Python's repr() part ways: exponents from 1e15 vs
    # 1e16, integral values without ".0", tiny values, negative zero.
    latencies = [
        None, 0.0, -0.0, 12.0, 3.5, 1e-4, 9.99e-5, 1e-5, 2.5e-7, 0.0001234, 5e14,
        999999999999999.9, 1e15, 1e15 + 0.5, 1234567890123456.0, 9.999999999999998e15, 1e16,
        1.5e300, -1e15, -0.1, 5e-324,
    ]  # fmt: skip
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    blank = ("actor_username", "request_id", "object_type", "object_id", "method", "path")
    columns = ("occurred_at", "action", "latency_ms", "details", *blank)
    rows = [(moment, "custom.f", x, "{}", *[""] * len(blank)) for x in latencies]
    bulk_insert(AuditEvent, columns, rows)
    chain.seal_all_pending()
    result = verification.check_chain()
    assert (result.ok, result.checked) == (True, len(latencies)), result.reason
