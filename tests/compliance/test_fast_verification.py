"""The verifier's fast hashing gives exactly the bytes `event_hash` defines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compliance import audit, chain, verification
from compliance.audit import iso
from compliance.chain import _EVENT_FIELDS, event_hash, row_hasher

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
        "prev_hash": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    }
)


def _row(fields: dict, version: int) -> tuple:
    values = {**fields, "occurred_at": iso(fields["occurred_at"])}
    return (fields["seq"], fields["prev_hash"], "", version, *(values[n] for n in _EVENT_FIELDS))


@settings(max_examples=300, deadline=None)
@given(events)
def test_the_fast_hash_equals_the_defining_hash_on_any_event(fields):
    assert row_hasher(1, COLUMNS)(_row(fields, 1)) == event_hash(fields, 1)


@settings(max_examples=100, deadline=None)
@given(events)
def test_the_fast_hash_equals_the_defining_hash_for_a_later_version_too(fields):
    v2 = tuple(name for name in chain.HASH_VERSIONS[1] if name != "client_ip")
    chain.HASH_VERSIONS[2] = v2
    try:
        assert row_hasher(2, COLUMNS)(_row(fields, 2)) == event_hash(fields, 2)
    finally:
        del chain.HASH_VERSIONS[2]


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
def test_verification_streams_the_chain_in_batches_and_finds_a_break_in_a_later_one(monkeypatch):
    from tests.conftest import bypass_triggers

    # given more events than one batch, with one far into the chain rewritten
    monkeypatch.setattr(verification, "_BATCH", 7)
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
