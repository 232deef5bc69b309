"""Personal data in the audit trail (hash version 2): sealed under the data subject's key, the
chain hashing the ciphertext, exact search through blind indexes, and erasure by destroying the
key that leaves every event in place and the chain verifying, online and offline."""

from __future__ import annotations

import json
import logging

import pytest
from django.db import connection
from django.test import Client, override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compliance import audit, chain, checkpoints, personal, proof, verification
from compliance.audit import AuditContext
from compliance.export import export_audit
from compliance.models import AuditEvent
from compliance.personal import ERASED, UNREADABLE, Revealer, revealed
from compliance.verify_export import verify_export
from security import crypto, keys
from security.models import SubjectKey
from tests.conftest import bypass_triggers, make_user

EVENTS = "/api/compliance/audit/events"
ADMIN_EVENTS = "/admin/compliance/auditevent/"
IP = "203.0.113.9"
DETAILS = {
    "note": "moved the schedule",
    "email": "alice@example.org",
    "body": {"items": [{"phone": "+44 20 7946 0000", "n": 1}, {"n": 2}], "kept": True},
}


def alice_context(user=None, ip: str = IP) -> AuditContext:
    if user is not None:
        return AuditContext(client_ip=ip, request_id="req-1").with_actor(user)
    return AuditContext(actor_id=7, actor_username="alice", client_ip=ip, request_id="req-1")


def raw_row(event_id: int) -> dict:
    """Every column of the stored row, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM compliance_auditevent WHERE id = %s", [event_id])
        names = [column[0] for column in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))


def verified() -> verification.ChainCheck:
    chain.seal_all_pending()
    return verification.check_chain()


# --- What is stored --------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_sealed_event_keeps_no_username_ip_or_personal_detail_in_any_column():
    # when an authenticated actor's event is recorded
    event_id = audit.record_event(action="custom.p", context=alice_context(), details=DETAILS)
    # then no column of the stored row holds the username, the address or a personal detail
    row = raw_row(event_id)
    stored = json.dumps({name: str(value) for name, value in row.items()})
    for secret in ("alice", IP, "alice@example.org", "+44 20 7946 0000"):
        assert secret not in stored, secret
    assert (row["actor_username"], row["client_ip"]) == ("", None)
    assert row["personal"].startswith("v1.sk:")
    assert len(row["actor_index"]) == len(row["ip_index"]) == 64
    # and what is not personal stays readable in clear
    assert json.loads(row["details"]) == {
        "note": "moved the schedule",
        "body": {"items": [{"n": 1}, {"n": 2}], "kept": True},
    }
    assert (row["actor_id"], row["request_id"]) == (7, "req-1")
    # and it is sealed with hash version 2, whose hash covers the ciphertext
    assert verified().ok
    event = AuditEvent.objects.select_related("seal").get(pk=event_id)
    assert event.seal.hash_version == 2
    fields = {name: getattr(event, name) for name in chain._EVENT_FIELDS}
    fields.update(seq=event.seal.seq, prev_hash=event.seal.prev_hash)
    assert chain.event_hash(fields, 2) == event.seal.hash
    assert chain.event_hash({**fields, "personal": fields["personal"] + "x"}, 2) != event.seal.hash


@pytest.mark.django_db
def test_reveal_gives_back_exactly_what_was_recorded():
    event_id = audit.record_event(action="custom.p", context=alice_context(), details=DETAILS)
    shown = revealed(AuditEvent.objects.get(pk=event_id))
    assert (shown.actor_username, shown.client_ip, shown.erased, shown.problem) == (
        "alice",
        IP,
        False,
        "",
    )
    assert shown.details == DETAILS


@pytest.mark.django_db
def test_the_sealed_column_is_an_ordinary_bridge_ciphertext_under_the_subjects_key():
    event_id = audit.record_event(action="custom.p", context=alice_context(), details=DETAILS)
    sealed = AuditEvent.objects.get(pk=event_id).personal
    payload = json.loads(crypto.decrypt(sealed, context=personal.CONTEXT))
    assert payload == {
        "actor_username": "alice",
        "client_ip": IP,
        "details": {
            "email": "alice@example.org",
            "body": {"items": [{"phone": "+44 20 7946 0000"}, None]},
        },
    }
    key = SubjectKey.objects.get(key_id=crypto.key_id_of(sealed))
    assert (key.purpose, key.subject_id) == (personal.PURPOSE, "alice")
    # bound to its field: under any other context it does not decrypt
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(sealed, context="security.user.email")


@pytest.mark.django_db
def test_an_anonymous_event_keeps_its_address_and_seals_details_under_the_subject_it_names():
    anonymous = AuditContext(client_ip=IP)
    # a request about a subject: its personal details sealed under that subject's key
    about = audit.record_event(
        action="custom.dsr", context=anonymous, details={"subject_id": "bob", "type": "access"}
    )
    # nobody named: nothing to erase them for, kept as recorded
    nobody = audit.record_event(action="custom.x", context=anonymous, details={"email": "x@y.z"})
    about_row, nobody_row = raw_row(about), raw_row(nobody)
    assert about_row["client_ip"] == nobody_row["client_ip"] == IP
    assert "bob" not in about_row["details"] and about_row["personal"].startswith("v1.sk:")
    assert about_row["actor_index"] == about_row["ip_index"] == ""
    assert json.loads(nobody_row["details"]) == {"email": "x@y.z"} and nobody_row["personal"] == ""
    assert revealed(AuditEvent.objects.get(pk=about)).details == {
        "subject_id": "bob",
        "type": "access",
    }
    # erasing bob erases that detail, and the event stays anonymous (not "[erased]")
    crypto.shred_subject_key(subject_id="bob")
    shown = revealed(AuditEvent.objects.get(pk=about))
    assert (shown.actor_username, shown.client_ip, shown.details, shown.erased) == (
        "",
        IP,
        {"type": "access"},
        True,
    )
    assert verified().ok


@pytest.mark.django_db
def test_with_the_setting_off_events_are_recorded_and_sealed_as_in_version_1():
    with override_settings(AUDIT_PERSONAL_DATA=False):
        event_id = audit.record_event(action="custom.p", context=alice_context(), details=DETAILS)
        chain.seal_all_pending()
    event = AuditEvent.objects.select_related("seal").get(pk=event_id)
    assert (event.actor_username, event.client_ip, event.details_data) == ("alice", IP, DETAILS)
    assert (event.personal, event.actor_index, event.ip_index) == ("", "", "")
    assert event.seal.hash_version == 1
    assert revealed(event).actor_username == "alice"
    assert verification.check_chain().ok


@pytest.mark.django_db
def test_the_sealer_never_seals_sealed_personal_data_with_version_1():
    # given an event written with its personal data sealed, the setting switched off since
    event_id = audit.record_event(action="custom.p", context=alice_context())
    with override_settings(AUDIT_PERSONAL_DATA=False):
        chain.seal_all_pending()
    # then it was sealed with the version that covers the ciphertext
    assert AuditEvent.objects.get(pk=event_id).seal.hash_version == 2
    assert verification.check_chain().ok


@pytest.mark.django_db
def test_a_name_too_long_to_be_a_subject_id_is_recorded_unsealed_rather_than_lost(caplog):
    name = "n" * 140
    event_id = audit.record_event(
        action="custom.p", context=AuditContext(actor_id=1, actor_username=name, client_ip=IP)
    )
    row = raw_row(event_id)
    assert (row["actor_username"], row["personal"]) == (name, "")
    assert "not a valid data subject id" in caplog.text
    assert verified().ok


def _keys_in(value: object) -> set[str]:
    """Every dict key anywhere in `value`, lower-cased."""
    if isinstance(value, dict):
        return {str(k).lower() for k in value} | set().union(*map(_keys_in, value.values()))
    if isinstance(value, list):
        return set().union(*map(_keys_in, value))
    return set()


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["email", "Email", "note", "subject_id", "body", "n", "phone"]),
                inner,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
def test_splitting_out_personal_keys_and_merging_them_back_gives_the_same_details(value):
    keys_ = frozenset({"email", "phone", "subject_id"})
    plain, taken = personal.split_details(value, keys_)
    assert not _keys_in(plain) & keys_
    merged = personal.merge_details(json.loads(json.dumps(plain)), taken)
    assert merged == value


# --- Reading it back -------------------------------------------------------------------------


@pytest.mark.django_db
def test_erasure_leaves_the_events_and_the_chain_and_reads_as_erased():
    # given alice's events, sealed and verified
    ids = [
        audit.record_event(action=f"custom.p{n}", context=alice_context(), details=DETAILS)
        for n in range(3)
    ]
    before = verified()
    assert before.ok
    # when her key is destroyed
    assert crypto.shred_subject_key(subject_id="alice") == 1
    # then every event is still there and the chain verifies as before
    assert AuditEvent.objects.filter(pk__in=ids).count() == 3
    after = verification.check_chain()
    assert (after.ok, after.checked) == (True, before.checked)
    # and her personal data reads as erased, never as an error
    revealer = Revealer()
    for event in AuditEvent.objects.filter(pk__in=ids):
        shown = revealer.event(event)
        assert (shown.actor_username, shown.client_ip, shown.erased, shown.problem) == (
            ERASED,
            None,
            True,
            "",
        )
        assert shown.details == {
            "note": "moved the schedule",
            "body": {"items": [{"n": 1}, {"n": 2}], "kept": True},
        }


@pytest.mark.django_db
def test_altered_sealed_data_is_reported_loudly_not_taken_for_an_erasure(caplog):
    event_id = audit.record_event(action="custom.p", context=alice_context(), details=DETAILS)
    event = AuditEvent.objects.get(pk=event_id)
    prefix, key_id, nonce, data = event.personal.split(".")
    flipped = data[:-2] + ("A" if data[-2] != "A" else "B") + data[-1]
    caplog.set_level(logging.ERROR, logger="compliance.personal")
    shown = personal.reveal(
        actor_username="",
        client_ip=None,
        personal=".".join([prefix, key_id, nonce, flipped]),
        details=event.details,
        actor_index=event.actor_index,
    )
    assert (shown.actor_username, shown.erased, shown.problem) == (
        UNREADABLE,
        False,
        "decryption_failed",
    )
    assert "AUDIT PERSONAL DATA UNREADABLE" in caplog.text
    # and garbage, or sealed data on a version 1 event (which never has any), alike
    garbage = personal.reveal(actor_username="", client_ip=None, personal="nonsense", details="{}")
    assert (garbage.actor_username, garbage.problem) == (UNREADABLE, "malformed_ciphertext")
    v1 = personal.reveal(
        actor_username="",
        client_ip=None,
        personal=event.personal,
        details=event.details,
        hash_version=1,
    )
    assert (v1.actor_username, v1.erased, bool(v1.problem)) == (UNREADABLE, False, True)


@pytest.mark.django_db
def test_a_revealer_unwraps_each_subject_key_once_per_batch(django_assert_max_num_queries):
    for n in range(20):
        audit.record_event(action=f"custom.p{n}", context=alice_context())
    events = list(AuditEvent.objects.all())
    revealer = Revealer()
    with django_assert_max_num_queries(1):
        names = {revealer.event(event).actor_username for event in events}
    assert names == {"alice"}


# --- Tampering and verification --------------------------------------------------------------


@pytest.mark.django_db
def test_changing_the_sealed_column_breaks_verification_at_that_event():
    audit.record_event(action="custom.a", context=alice_context())
    victim = audit.record_event(action="custom.b", context=alice_context())
    audit.record_event(action="custom.c", context=alice_context())
    assert verified().ok
    other = AuditEvent.objects.get(action="custom.a").personal
    # an insider swaps in another event's (valid) ciphertext
    bypass_triggers("UPDATE compliance_auditevent SET personal = %s WHERE id = %s", [other, victim])
    result = verification.check_chain()
    seq = AuditEvent.objects.get(pk=victim).seal.seq
    assert (result.ok, result.first_broken_id, result.first_broken_seq) == (False, victim, seq)
    assert result.reason == "content does not match its hash"


@pytest.mark.django_db
def test_changing_a_blind_index_breaks_verification_too():
    victim = audit.record_event(action="custom.b", context=alice_context())
    assert verified().ok
    bypass_triggers(
        "UPDATE compliance_auditevent SET ip_index = %s WHERE id = %s", ["0" * 64, victim]
    )
    assert verification.check_chain().first_broken_id == victim


@pytest.mark.django_db
def test_a_chain_of_version_1_then_version_2_events_verifies_and_survives_erasure(admin_user):
    with override_settings(AUDIT_PERSONAL_DATA=False):
        for n in range(3):
            audit.record_event(action=f"custom.old{n}", context=alice_context(admin_user))
        chain.seal_all_pending()
    for n in range(3):
        audit.record_event(action=f"custom.new{n}", context=alice_context(admin_user))
    assert verified().ok
    versions = dict(AuditEvent.objects.values_list("action", "seal__hash_version"))
    assert {versions[f"custom.old{n}"] for n in range(3)} == {1}
    assert {versions[f"custom.new{n}"] for n in range(3)} == {2}
    crypto.shred_subject_key(subject_id="root")
    assert verification.check_chain().ok
    shown = {e.action: revealed(e).actor_username for e in AuditEvent.objects.all()}
    # version 1 events never sealed the name: they keep it (the registry's concern)
    assert {shown[f"custom.old{n}"] for n in range(3)} == {"root"}
    assert {shown[f"custom.new{n}"] for n in range(3)} == {ERASED}


@pytest.mark.django_db
def test_the_postgresql_fast_path_verifies_sealed_events_before_and_after_erasure(postgres):
    # The fast path builds every event's canonical JSON in SQL: hold it to Python's.
    for n in range(30):
        audit.record_event(
            action=f"custom.p{n}",
            context=alice_context(ip=f"2001:db8::{n:x}" if n % 2 else IP),
            details={**DETAILS, "n": n, "quote": 'a "b" \\ \u2028'},
            latency_ms=n / 3,
        )
    assert verified().ok
    _same_canonical_text_in_sql_and_python()
    crypto.shred_subject_key(subject_id="alice")
    assert verification.check_chain().ok


def _same_canonical_text_in_sql_and_python() -> None:
    head = chain.chain_head().last_seq
    python_rows = {row[0]: row for row in verification.chain_rows(head)}
    with connection.cursor() as cursor:
        cursor.execute(verification._canonical_sql(), [0, head])
        rows = cursor.fetchall()
    assert rows
    for row in rows:
        text = row[4] if row[6] is None else row[4] + proof.json_value(row[5]) + row[6]
        assert text == proof.row_canonical(row[3], proof.ROW_COLUMNS)(python_rows[row[0]])


recorded_events = st.lists(
    st.fixed_dictionaries(
        {
            "actor": st.sampled_from(["", "alice", "bob", "Émile ü", "x" * 128]),
            "ip": st.none() | st.ip_addresses().map(str),
            "details": st.dictionaries(
                st.sampled_from(["email", "note", "subject_id", "phone", "n"]),
                st.text(
                    alphabet=st.characters(
                        blacklist_categories=("Cs",), blacklist_characters="\x00"
                    ),
                    max_size=12,
                )
                | st.integers(),
                max_size=4,
            ),
            "latency": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        }
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.django_db
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(recorded_events)
def test_postgresql_writes_the_canonical_json_python_hashes_for_any_sealed_event(postgres, rows):
    # given any events recorded through record_event (their personal data sealed or not)
    for row in rows:
        context = AuditContext(
            actor_id=1 if row["actor"] else None, actor_username=row["actor"], client_ip=row["ip"]
        )
        audit.record_event(
            action="custom.h", context=context, details=row["details"], latency_ms=row["latency"]
        )
    # then the server's canonical text is Python's, and the chain verifies
    assert verified().ok
    _same_canonical_text_in_sql_and_python()


# --- Export and the offline verifier ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_export_of_a_mixed_chain_verifies_offline_before_and_after_erasure(tmp_path):
    with override_settings(AUDIT_PERSONAL_DATA=False):
        for n in range(3):
            audit.record_event(action=f"custom.old{n}", context=alice_context())
        chain.seal_all_pending()
    for n in range(3):
        audit.record_event(action=f"custom.new{n}", context=alice_context(), details=DETAILS)
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    trusted = [keys.audit_signing_key().public]
    out = tmp_path / "audit.jsonl"
    export_audit(out=out, start=None, end=None, context=AuditContext.system())
    text = out.read_text()
    # the export carries the sealed events' ciphertexts, never their personal data in clear
    new_lines = [line for line in text.splitlines() if '"custom.new' in line]
    assert len(new_lines) == 3 and all('"hash_version":2' in line for line in new_lines)
    assert not any("alice" in line or IP in line for line in new_lines)
    verdict = verify_export(out, trusted)
    assert (verdict.ok, verdict.events) == (True, 6), verdict.reason
    # after the erasure, a new export verifies too (the chain is as it was)
    crypto.shred_subject_key(subject_id="alice")
    personal.forget_keys("alice")
    again = tmp_path / "again.jsonl"
    export_audit(out=again, start=None, end=None, context=AuditContext.system())
    assert verify_export(again, trusted).ok
    # and an event line relabelled with another hash version than its content is caught
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if '"custom.new1"' in line)
    lines[at] = lines[at].replace('"hash_version":2,"event"', '"hash_version":1,"event"', 1)
    out.write_text("\n".join(lines) + "\n")
    broken = verify_export(out, trusted)
    assert (broken.ok, broken.reason) == (False, "content does not match its hash")


# --- Search and display: the console and the API ---------------------------------------------


@pytest.mark.django_db
def test_blind_index_search_finds_a_users_events_in_the_console_and_the_api(
    admin_user, compliance_api
):
    alice = make_user("alice")
    with override_settings(AUDIT_PERSONAL_DATA=False):
        audit.record_event(action="custom.v1", context=alice_context(alice))
    audit.record_event(action="custom.v2", context=alice_context(alice), details=DETAILS)
    audit.record_event(action="custom.other", context=AuditContext(client_ip="198.51.100.1"))
    client = Client()
    client.force_login(admin_user)
    for term in ("alice", "=alice", IP, f"={IP}"):
        page = client.get(ADMIN_EVENTS, {"q": term})
        shown = {event.action for event in page.context["cl"].result_list}
        assert {"custom.v1", "custom.v2"} <= shown and "custom.other" not in shown, term
    assert client.get(ADMIN_EVENTS, {"q": "Alice"}).context["cl"].result_count == 0
    by_actor = compliance_api.get(EVENTS, {"actor": "alice"}).json()
    assert {e["action"] for e in by_actor["results"]} == {"custom.v1", "custom.v2"}
    assert {e["actor_username"] for e in by_actor["results"]} == {"alice"}
    by_ip = compliance_api.get(EVENTS, {"ip": IP}).json()
    assert {e["action"] for e in by_ip["results"]} == {"custom.v1", "custom.v2"}
    anonymous = compliance_api.get(EVENTS, {"ip": "198.51.100.1"}).json()
    assert [e["action"] for e in anonymous["results"]] == ["custom.other"]
    assert compliance_api.get(EVENTS, {"ip": "not-an-ip"}).status_code == 400


@pytest.mark.django_db
def test_the_console_and_the_api_show_revealed_values_then_erased(admin_user, compliance_api):
    alice = make_user("alice")
    event_id = audit.record_event(action="custom.v2", context=alice_context(alice), details=DETAILS)
    client = Client()
    client.force_login(admin_user)
    # revealed while the key lives
    listing = client.get(ADMIN_EVENTS, {"action": "custom.v2"}).content.decode()
    assert "alice" in listing and IP in listing
    detail = client.get(f"{ADMIN_EVENTS}{event_id}/change/").content.decode()
    assert "alice@example.org" in detail and "sealed under the data subject" in detail
    body = compliance_api.get(f"{EVENTS}/{event_id}").json()
    assert (body["actor_username"], body["client_ip"], body["personal_data"]) == (
        "alice",
        IP,
        "sealed",
    )
    assert body["details"] == DETAILS
    # erased once alice's key is destroyed
    crypto.shred_subject_key(subject_id="alice")
    listing = client.get(ADMIN_EVENTS, {"action": "custom.v2"}).content.decode()
    assert ERASED in listing and IP not in listing
    detail = client.get(f"{ADMIN_EVENTS}{event_id}/change/").content.decode()
    assert "alice@example.org" not in detail and "erased" in detail
    body = compliance_api.get(f"{EVENTS}/{event_id}").json()
    assert (body["actor_username"], body["client_ip"], body["personal_data"]) == (
        ERASED,
        None,
        "erased",
    )
    assert "email" not in body["details"]
    listed = compliance_api.get(EVENTS, {"action": "custom.v2"}).json()["results"]
    assert [e["actor_username"] for e in listed] == [ERASED]


@pytest.mark.django_db
def test_after_erasure_a_search_by_name_finds_nothing_it_sealed(admin_user, compliance_api):
    alice = make_user("alice")
    audit.record_event(action="custom.before", context=alice_context(alice))
    crypto.shred_subject_key(subject_id="alice")
    # the search makes no key for her
    client = Client()
    client.force_login(admin_user)
    assert client.get(ADMIN_EVENTS, {"q": "alice"}).context["cl"].result_count == 0
    assert compliance_api.get(EVENTS, {"actor": "alice"}).json()["count"] == 0
    assert not SubjectKey.objects.filter(subject_id="alice", destroyed_at__isnull=True).exists()
    # a later event of that name (a new key) is found, the erased ones still are not
    audit.record_event(action="custom.after", context=alice_context(alice))
    page = client.get(ADMIN_EVENTS, {"q": "alice"})
    assert [event.action for event in page.context["cl"].result_list] == ["custom.after"]


@pytest.mark.django_db
def test_ip_search_finds_events_indexed_before_and_after_a_key_rotation(compliance_api):
    from security.rotation import rotate_keys

    audit.record_event(action="custom.before", context=alice_context())
    rotate_keys(context=AuditContext.system(), enqueue=False)
    personal.forget_keys()
    audit.record_event(action="custom.after", context=alice_context())
    indexes = set(
        AuditEvent.objects.filter(action__startswith="custom.").values_list("ip_index", flat=True)
    )
    assert len(indexes) == 2  # the new version's key indexes the newer one
    found = AuditEvent.objects.filter(personal.ip_match(IP), action__startswith="custom.")
    assert {event.action for event in found} == {"custom.before", "custom.after"}


# --- The cache on the hot path ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_sealing_key_is_cached_outside_transactions_and_dropped_with_crypto_keys(
    django_assert_max_num_queries,
):
    audit.record_event(action="custom.first", context=alice_context())
    # cached: one INSERT per event, no key lookup
    with django_assert_max_num_queries(1):
        audit.record_event(action="custom.second", context=alice_context())
    crypto.forget_keys()
    with django_assert_max_num_queries(3):
        audit.record_event(action="custom.third", context=alice_context())
    assert {revealed(e).actor_username for e in AuditEvent.objects.all()} == {"alice"}


@pytest.mark.django_db
def test_a_key_made_in_a_transaction_that_rolls_back_is_not_cached():
    from django.db import transaction

    with pytest.raises(RuntimeError), transaction.atomic():
        audit.record_event(action="custom.gone", context=alice_context())
        raise RuntimeError("rolled back")
    assert "alice" not in personal._sealers
    event_id = audit.record_event(action="custom.kept", context=alice_context())
    assert revealed(AuditEvent.objects.get(pk=event_id)).actor_username == "alice"
