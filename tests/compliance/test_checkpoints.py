"""Signed checkpoints: the attacks an insider with database superuser rights would make, each
replayed with raw SQL (triggers off) and caught by the API, the CLI and the offline verifier,
naming the right seq and the checkpoint that proves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import call_command
from django.core.management.base import CommandError

from compliance import audit, chain, checkpoints, proof
from compliance.audit import AuditContext
from compliance.choices import AuditAction, CheckpointStatus
from compliance.export import export_audit
from compliance.models import AuditChainHead, AuditCheckpoint, AuditEvent, AuditSeal
from compliance.verify_export import verify_export
from security import keys, services
from tests.conftest import ROOT, bypass_triggers, on_postgres

pytestmark = pytest.mark.django_db(transaction=True)


# --- The attacker's tools -----------------------------------------------------------------


def record(count: int, prefix: str = "e") -> None:
    for n in range(count):
        audit.record_event(action=f"custom.{prefix}{n}", details={"n": n})


def sealed_events(count: int) -> int:
    """`count` events, sealed after whatever the fixtures recorded; returns the seq before
    them, so that event n of these is seq base + n."""
    base = chain.seal_all_pending() and chain.chain_head().last_seq
    record(count)
    chain.seal_all_pending()
    assert chain.chain_head().last_seq == base + count
    return base


def rewrite_with_recomputed_seals(seq: int, action: str) -> None:
    """Change the event at `seq`, recompute every later seal and the head: the chain is
    internally consistent again, as the issue's attacker left it."""
    victim = AuditSeal.objects.get(seq=seq)
    bypass_triggers(
        "UPDATE compliance_auditevent SET action = %s WHERE id = %s", [action, victim.event_id]
    )
    prev = victim.prev_hash
    seals = AuditSeal.objects.filter(seq__gte=seq).order_by("seq").select_related("event")
    for seal in list(seals):
        fields = {name: getattr(seal.event, name) for name in chain._EVENT_FIELDS}
        fields.update(seq=seal.seq, prev_hash=prev)
        new_hash = chain.event_hash(fields, seal.hash_version)
        bypass_triggers(
            "UPDATE compliance_auditseal SET prev_hash = %s, hash = %s WHERE event_id = %s",
            [prev, new_hash, seal.event_id],
        )
        prev = new_hash
    bypass_triggers("UPDATE compliance_auditchainhead SET last_hash = %s WHERE id = 1", [prev])


def truncate_tail(keep: int) -> None:
    """Delete every event and seal above seq `keep` and move the head back to it."""
    gone = list(AuditSeal.objects.filter(seq__gt=keep).values_list("event_id", flat=True))
    marks = ",".join(["%s"] * len(gone))
    bypass_triggers(f"DELETE FROM compliance_auditseal WHERE event_id IN ({marks})", gone)  # noqa: S608
    bypass_triggers(f"DELETE FROM compliance_auditevent WHERE id IN ({marks})", gone)  # noqa: S608
    last = AuditSeal.objects.get(seq=keep)
    bypass_triggers(
        "UPDATE compliance_auditchainhead SET last_seq = %s, last_hash = %s, last_event_id = %s "
        "WHERE id = 1",
        [keep, last.hash, last.event_id],
    )


def insert_checkpoint_signed_by_a_stranger(*, after: AuditCheckpoint) -> None:
    """An insider's checkpoint row following `after`, signed with a key of their own."""
    forger = Ed25519PrivateKey.generate()
    payload = {**after.record_data, "number": after.number + 1, "prev_signature": after.signature}
    payload.pop("signature")
    forged = proof.sign_checkpoint(
        {**payload, "key_id": proof.key_id_of(forger.public_key())}, forger
    )
    AuditCheckpoint.objects.create(
        number=after.number + 1,
        seq=after.seq,
        hash=after.hash,
        created_at=after.created_at,
        key_id=forged["key_id"],
        signature=forged["signature"],
        record=proof.canonical_json(forged),
        status=CheckpointStatus.PUBLISHED,
    )


def internally_consistent() -> bool:
    """What verification without checkpoints would say: every link and hash holds."""
    from compliance.verification import chain_rows

    walker = proof.ChainWalker([])
    head = chain.chain_head()
    for row in chain_rows(head.last_seq):
        if walker.feed(row) is not None:
            return False
    return walker.last_hash == head.last_hash


# --- Three verifiers ----------------------------------------------------------------------


def public_key_file(tmp_path: Path, key: Ed25519PrivateKey | None = None) -> Path:
    public = (key or keys.audit_signing_key().private).public_key()
    path = tmp_path / f"{proof.key_id_of(public).replace(':', '_')}.pem"
    path.write_text(proof.public_key_pem(public))
    return path


def offline(tmp_path: Path, *public_keys: Path) -> tuple[int, str]:
    """Export, then run the offline verifier in a fresh interpreter without Django."""
    out = tmp_path / "audit.jsonl"
    export_audit(out=out, start=None, end=None, context=AuditContext.system())
    args = [str(out)]
    for key in public_keys or (public_key_file(tmp_path),):
        args += ["--public-key", str(key)]
    return run_offline(args)


def run_offline(args: list[str]) -> tuple[int, str]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    script = (
        "import sys\n"
        "from compliance.verify_export import main\n"
        "code = main(sys.argv[1:])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'django'], 'imported Django'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def cli() -> str:
    with pytest.raises(CommandError) as failure:
        call_command("verify_audit_chain")
    return str(failure.value)


def assert_named_everywhere(
    verify, tmp_path: Path, *, seq: int, checkpoint: int | None, words: str
) -> None:
    body = verify()
    assert body["ok"] is False, body
    assert (body["first_broken_seq"], body["checkpoint"]) == (seq, checkpoint), body
    assert words in body["reason"], body
    message = cli()
    assert f"at seq {seq}" in message and words in message, message
    if checkpoint:
        assert f"checkpoint #{checkpoint}" in message, message
    code, output = offline(tmp_path)
    assert code == 1, output
    assert f"BROKEN at seq {seq}" in output and words in output, output
    if checkpoint:
        assert f"(checkpoint #{checkpoint})" in output, output


def assert_checkpoint_named(verify, tmp_path: Path, number: int, *words: str) -> None:
    """The API, the CLI and the offline verifier all report checkpoint `number`, saying
    `words`."""
    body = verify()
    assert body["ok"] is False and body["checkpoint"] == number, body
    message, (code, output) = cli(), offline(tmp_path)
    assert code == 1, output
    for text in (body["reason"], message, output):
        assert all(word in text for word in words), text


# --- The attacks --------------------------------------------------------------------------


def test_a_rewrite_with_recomputed_seals_is_named_at_its_seq_by_the_api_the_cli_and_offline(
    verify, settings, tmp_path
):
    # given 300 sealed events under two checkpoints that sign every hash in their ranges
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    base = sealed_events(150)
    assert checkpoints.make_checkpoint().number == 1
    record(150, "f")
    chain.seal_all_pending()
    assert checkpoints.make_checkpoint().seq == base + 300
    # when a database superuser rewrites event 200 and recomputes every later seal and the head
    rewrite_with_recomputed_seals(base + 200, "custom.innocent")
    assert internally_consistent()  # the hash chain alone no longer tells
    # then the checkpointer refuses to sign the events sealed on top of it
    record(3, "after")
    chain.seal_all_pending()
    with pytest.raises(checkpoints.CheckpointRefused):
        checkpoints.make_checkpoint()
    # and all three verifiers name seq 200 and checkpoint #2, which signed its old hash
    assert_named_everywhere(
        verify, tmp_path, seq=base + 200, checkpoint=2, words="history was rewritten"
    )
    # and no checkpoint was signed over the rewritten chain meanwhile
    assert AuditCheckpoint.objects.count() == 2
    assert AuditEvent.objects.filter(action=AuditAction.CHECKPOINT_NOT_SIGNED).exists()


def test_with_fewer_waypoints_a_rewrite_is_named_within_its_share_of_the_range(settings):
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 10
    assert sealed_events(100) == 0
    checkpoints.make_checkpoint()
    rewrite_with_recomputed_seals(42, "custom.innocent")
    result = _check()
    # waypoints every 10 seqs: the first signed hash after the change is seq 50
    assert (result.ok, result.first_broken_seq, result.checkpoint) == (False, 50, 1)


def _check():
    from compliance.verification import check_chain

    return check_chain()


def test_tail_truncation_with_the_head_moved_back_is_named_by_all_three(verify, tmp_path):
    # given 300 sealed events and a checkpoint at seq 300
    base = sealed_events(300)
    checkpoints.make_checkpoint()
    # when the newest 50 events and seals are deleted and the head moved back to seq 250
    truncate_tail(base + 250)
    assert internally_consistent()
    # then each verifier names seq 251, the first one gone, proven by checkpoint #1
    assert_named_everywhere(
        verify, tmp_path, seq=base + 251, checkpoint=1, words="removed from the end"
    )


def test_a_forged_checkpoint_row_in_the_database_is_reported(verify, tmp_path):
    # given a checkpointed chain
    sealed_events(20)
    real = checkpoints.make_checkpoint()
    # when an insider inserts a checkpoint row signed with a key of their own
    insert_checkpoint_signed_by_a_stranger(after=real)
    # then the API, the CLI and the offline verifier report checkpoint #2 as untrusted
    assert_checkpoint_named(
        verify, tmp_path, 2, "checkpoint #2 in the database: signed by key", "which is not trusted"
    )


def test_a_checkpoint_row_whose_signature_fails_is_refused_and_never_published(tmp_path):
    sealed_events(5)
    real = checkpoints.make_checkpoint()
    record_data = {**real.record_data, "number": 2, "prev_signature": real.signature}
    record_data["signature"] = real.signature  # a signature over other bytes
    AuditCheckpoint.objects.create(
        number=2,
        seq=real.seq,
        hash=real.hash,
        created_at=real.created_at,
        key_id=real.key_id,
        signature=real.signature,
        record=proof.canonical_json(record_data),
    )
    # when the checkpointer retries pending checkpoints
    checkpoints.publish_pending()
    # then the forged row is refused, recorded, and no sink got it
    assert AuditCheckpoint.objects.get(number=2).status == CheckpointStatus.REFUSED
    assert AuditEvent.objects.filter(action=AuditAction.CHECKPOINT_REFUSED).count() == 1
    lines = "".join(p.read_text() for p in Path(checkpoints.configured_sinks()[0].path).glob("c*"))
    assert lines.count('"type":"checkpoint"') == 1
    result = _check()
    assert result.ok is False and "signature does not verify" in result.reason
    assert checkpoints.checkpoint_health().ok is False


def _sink_lines(checkpoint_dir: Path) -> tuple[Path, list[str]]:
    (day_file,) = checkpoint_dir.glob("checkpoints-*.jsonl")
    return day_file, day_file.read_text().splitlines(keepends=True)


def test_a_deleted_checkpoint_line_is_reported_by_all_three(verify, checkpoint_dir, tmp_path):
    # given three checkpoints in the directory sink
    for _ in range(3):
        record(10)
        chain.seal_all_pending()
        checkpoints.make_checkpoint()
    day_file, lines = _sink_lines(checkpoint_dir)
    assert len(lines) == 3
    # when the line of checkpoint #2 is deleted from the file
    day_file.write_text(lines[0] + lines[2])
    # then it is reported missing from the sink where it was written
    assert_checkpoint_named(
        verify, tmp_path, 2, "checkpoint #2 is missing from sink directory", "where it was written"
    )


def test_a_deleted_line_and_row_leave_a_gap_in_the_checkpoint_chain(checkpoint_dir):
    for _ in range(3):
        record(10)
        chain.seal_all_pending()
        checkpoints.make_checkpoint()
    day_file, lines = _sink_lines(checkpoint_dir)
    day_file.write_text(lines[0] + lines[2])
    AuditCheckpoint.objects.filter(number=2).delete()
    result = _check()
    assert result.ok is False and result.checkpoint == 3
    assert "#2..#2 are missing before #3" in result.reason


def test_an_altered_checkpoint_line_fails_its_signature(checkpoint_dir):
    sealed_events(10)
    checkpoints.make_checkpoint()
    day_file, lines = _sink_lines(checkpoint_dir)
    line = json.loads(lines[0])
    line["seq"] = 5
    day_file.write_text(json.dumps(line) + "\n")
    result = _check()
    assert result.ok is False and result.checkpoint == 1
    assert "in sink directory: its signature does not verify" in result.reason


def test_an_intact_chain_stays_ok_across_a_key_rotation_everywhere(verify, tmp_path, settings):
    # given a key file of this test's own, and a checkpoint signed with it
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "keys" / "audit.pem"
    sealed_events(30)
    first = checkpoints.make_checkpoint()
    old_public = public_key_file(tmp_path)
    # when the key is rotated and later checkpoints are signed with the new one
    row = services.rotate_audit_signing_key(context=AuditContext.system(), reason="yearly")
    assert keys.audit_signing_key().key_id == row.key_id != first.key_id
    record(30, "g")
    chain.seal_all_pending()
    second = checkpoints.make_checkpoint()
    assert second.key_id == row.key_id
    assert os.stat(settings.AUDIT_SIGNING_KEY_FILE).st_mode & 0o777 == 0o600
    # then the API and the CLI say ok
    body = verify()
    assert body["ok"] is True and body["checkpoints"] >= 2, body
    call_command("verify_audit_chain")
    # and offline, trusting only the old key or only the new one, too (the rotation record is
    # signed by both and travels in the sink and the export)
    new_public = public_key_file(tmp_path)
    for pinned in (old_public, new_public):
        code, output = offline(tmp_path, pinned)
        assert code == 0, output
    assert "key_rotation" in (Path(settings.AUDIT_CHECKPOINT_DIR) / "keys.jsonl").read_text()


def test_a_key_an_insider_adds_to_the_database_is_not_trusted(tmp_path, settings):
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "audit.pem"
    sealed_events(5)
    checkpoints.make_checkpoint()
    # an insider forges a rotation to a key of their own, signed by that key only
    mine, theirs = keys.audit_signing_key().private, Ed25519PrivateKey.generate()
    record_data = proof.sign_rotation(theirs, theirs, "2026-11-28T00:00:00+00:00")
    record_data["old_key_id"] = proof.key_id_of(mine.public_key())
    record_data["old_public_key"] = proof.public_key_text(mine.public_key())
    keys.register_public_key(theirs.public_key(), rotation=record_data)
    ring = keys.trusted_keys()
    assert proof.key_id_of(theirs.public_key()) not in ring.keys
    assert "not signed by both of its keys" in ring.problems[0]


def test_an_unknown_public_key_makes_the_offline_verifier_refuse_every_checkpoint(tmp_path):
    sealed_events(5)
    checkpoints.make_checkpoint()
    stranger = public_key_file(tmp_path, Ed25519PrivateKey.generate())
    code, output = offline(tmp_path, stranger)
    assert code == 1 and "which is not trusted" in output, output


# --- Sinks --------------------------------------------------------------------------------


def test_a_checkpoint_is_a_fsynced_json_line_in_the_file_of_its_day(checkpoint_dir):
    assert sealed_events(3) == 0
    made = checkpoints.make_checkpoint()
    assert made.status == CheckpointStatus.PUBLISHED and made.sinks_written == ["directory"]
    day_file, lines = _sink_lines(checkpoint_dir)
    assert day_file.name == f"checkpoints-{made.created_at:%Y-%m-%d}.jsonl"
    line = json.loads(lines[0])
    assert (line["number"], line["seq"], line["hash"], line["events"]) == (1, 3, made.hash, 3)
    assert line["key_id"] == keys.audit_signing_key().key_id and line["prev_signature"] == ""
    assert [seq for seq, _ in line["waypoints"]] == [1, 2, 3]
    assert day_file.stat().st_mode & 0o777 == 0o640
    # nothing new: no second checkpoint; new events: the next names this one's signature
    assert checkpoints.make_checkpoint() is None
    record(2)
    chain.seal_all_pending()
    nxt = checkpoints.make_checkpoint()
    assert json.loads(nxt.record)["prev_signature"] == made.signature


def test_a_failing_sink_degrades_readiness_is_recorded_once_and_is_retried(settings, tmp_path):
    from recovery.health import readiness_report

    # given a sink path that cannot be a directory
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings.AUDIT_CHECKPOINT_DIR = blocker / "checkpoints"
    sealed_events(4)
    # when checkpoints are made and retried while it fails
    made = checkpoints.make_checkpoint()
    checkpoints.publish_pending()
    record(2, "more")
    chain.seal_all_pending()
    assert checkpoints.make_checkpoint().status == CheckpointStatus.PENDING
    # then the checkpoint waits, readiness is degraded naming it, one event was recorded
    made.refresh_from_db()
    assert made.status == CheckpointStatus.PENDING and "sink directory" in made.last_error
    check = readiness_report()["checks"]["checkpoints"]
    assert check["state"] == "degraded" and "checkpoint #1 not written" in check["detail"]
    assert AuditEvent.objects.filter(action=AuditAction.CHECKPOINT_FAILED).count() == 1
    # and once the sink works again, the next run writes it
    settings.AUDIT_CHECKPOINT_DIR = tmp_path / "fixed"
    assert checkpoints.publish_pending() == 0
    made.refresh_from_db()
    assert made.status == CheckpointStatus.PUBLISHED and made.attempts == 4
    assert AuditCheckpoint.objects.filter(status=CheckpointStatus.PUBLISHED).count() == 2
    assert readiness_report()["checks"]["checkpoints"]["state"] == "ok"
    assert _check().ok is True


def test_a_django_storages_sink_holds_every_checkpoint_and_a_deleted_object_is_reported(
    settings, tmp_path
):
    # given a second sink on the storage API django-storages backends implement
    spec = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(tmp_path / "offsite")},
    }
    settings.AUDIT_CHECKPOINT_STORAGES = {"offsite": spec}
    settings.STORAGES = {**settings.STORAGES, "audit_checkpoints_offsite": spec}
    sealed_events(5)
    made = checkpoints.make_checkpoint()
    assert sorted(made.sinks_written) == ["directory", "storage:offsite"]
    (stored,) = (tmp_path / "offsite" / "checkpoints").rglob("*.json")
    assert json.loads(stored.read_text())["signature"] == made.signature
    assert _check().ok is True
    # when the object is deleted from the storage
    stored.unlink()
    # then verification says which sink lost which checkpoint
    result = _check()
    assert result.ok is False and "missing from sink storage:offsite" in result.reason


def test_two_checkpointers_at_once_make_one_checkpoint_per_number(checkpoint_dir, postgres):
    from concurrent.futures import ThreadPoolExecutor

    sealed_events(50)

    def make(_: int) -> int | None:
        from django.db import connection as own

        try:
            made = checkpoints.make_checkpoint()
            return made.number if made else None
        finally:
            own.close()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(make, range(4)))
    assert [n for n in results if n] == [1]
    _, lines = _sink_lines(checkpoint_dir)
    assert len({json.loads(line)["number"] for line in lines}) == 1
    assert _check().ok is True


# --- Export and offline verification ------------------------------------------------------


def test_an_export_of_a_later_range_verifies_offline_and_a_changed_line_is_named(tmp_path):
    from datetime import timedelta

    from django.utils import timezone

    # given events on two days and checkpoints over them
    assert sealed_events(40) == 0
    checkpoints.make_checkpoint()
    later = timezone.now() + timedelta(microseconds=1)
    bypass_triggers(
        "UPDATE compliance_auditevent SET occurred_at = occurred_at - interval '1 day'"
        if on_postgres()
        else "UPDATE compliance_auditevent SET occurred_at = datetime(occurred_at, '-1 day')"
    )
    _reseal_everything()
    checkpoints.make_checkpoint(force=True)
    record(20, "late")
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    # when only today's events are exported
    out = tmp_path / "today.jsonl"
    summary = export_audit(
        out=out, start=later - timedelta(hours=1), end=None, context=AuditContext.system()
    )
    assert (summary.first_seq, summary.last_seq, summary.events) == (41, 60, 20)
    key = public_key_file(tmp_path)
    # then the offline verifier accepts it, from the checkpoint before the range on
    code, output = run_offline([str(out), "--public-key", str(key)])
    assert code == 0 and "20 events (seq 41..60)" in output, output
    # and an event changed in the export is named by its seq
    lines = out.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if '"seq":50,' in line)
    lines[at] = lines[at].replace('"custom.late9"', '"custom.nothing"')
    out.write_text("\n".join(lines) + "\n")
    code, output = run_offline([str(out), "--public-key", str(key)])
    assert code == 1 and "BROKEN at seq 50" in output, output
    # and a cut-off export is unreadable, not "intact"
    out.write_text("\n".join(lines[:-3]) + "\n")
    code, output = run_offline([str(out), "--public-key", str(key)])
    assert code == 2 and "cut off" in output, output


def _reseal_everything() -> None:
    # The test moved events a day back by SQL: start the chain over so that it is intact.
    bypass_triggers("DELETE FROM compliance_auditseal")
    bypass_triggers("DELETE FROM compliance_auditcheckpoint")
    AuditChainHead.objects.filter(pk=1).update(
        last_seq=0, last_hash=chain.GENESIS_HASH, last_event_id=None
    )
    for path in Path(checkpoints.configured_sinks()[0].path).glob("*"):
        path.unlink()
    chain.seal_all_pending()


def test_the_export_command_streams_with_progress_and_verify_export_checks_it(
    tmp_path, capsys, monkeypatch
):
    from compliance import export

    monkeypatch.setattr(export, "PROGRESS_EVERY", 10)
    assert sealed_events(25) == 0
    checkpoints.make_checkpoint()
    out = tmp_path / "all.jsonl"
    call_command("export_audit", str(out), "--from", "2000-01-01")
    printed = capsys.readouterr().out
    assert " 40%  10 of 25 events" in printed and "exported 25 events (seq 1..25)" in printed
    verdict = verify_export(out, [keys.audit_signing_key().public])
    assert (verdict.ok, verdict.events, verdict.checkpoints) == (True, 25, 1)
    exported = AuditEvent.objects.get(action=AuditAction.AUDIT_EXPORTED)
    assert exported.details_data["events"] == 25 and len(exported.details_data["sha256"]) == 64
    with pytest.raises(CommandError, match="not a date"):
        call_command("export_audit", str(out), "--from", "yesterday")


def test_the_offline_verifier_says_what_is_wrong_with_its_input(tmp_path):
    not_export = tmp_path / "x.jsonl"
    not_export.write_text('{"type": "something"}\n')
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    code, output = run_offline([str(not_export), "--public-key", str(key)])
    assert code == 2 and "cannot use the public key" in output
    key = public_key_file(tmp_path, Ed25519PrivateKey.generate())
    code, output = run_offline([str(not_export), "--public-key", str(key)])
    assert code == 2 and "not a Bridge audit export" in output


# --- API and keys -------------------------------------------------------------------------


def test_the_public_key_is_published_with_its_id_and_verifies_the_checkpoints(
    compliance_api, outsider_api, anon_api, tmp_path, settings
):
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "k" / "audit.pem"
    sealed_events(5)
    made = checkpoints.make_checkpoint()
    assert anon_api.get("/api/compliance/audit/public-key").status_code == 401
    assert outsider_api.get("/api/compliance/audit/public-key").status_code == 403
    body = compliance_api.get("/api/compliance/audit/public-key").json()
    assert body["algorithm"] == "Ed25519" and body["key_id"] == made.key_id
    assert [key["key_id"] for key in body["keys"] if key["current"]] == [made.key_id]
    # the PEM an auditor downloads verifies an export offline
    pem = tmp_path / "published.pem"
    pem.write_text(body["public_key_pem"])
    code, output = offline(tmp_path, pem)
    assert code == 0, output
    # and after a rotation both keys and the record linking them are listed
    services.rotate_audit_signing_key(context=AuditContext.system())
    body = compliance_api.get("/api/compliance/audit/public-key").json()
    assert len(body["keys"]) == 2 and body["keys"][0]["retired_at"] is not None
    assert body["rotations"][0]["old_key_id"] == made.key_id


def test_checkpoints_are_listed_with_their_publishing_state(compliance_api, outsider_api):
    sealed_events(5)
    made = checkpoints.make_checkpoint()
    listing = compliance_api.get("/api/compliance/audit/checkpoints?status=published").json()
    assert [item["number"] for item in listing["results"]] == [made.number]
    one = compliance_api.get(f"/api/compliance/audit/checkpoints/{made.number}").json()
    assert one["record"]["signature"] == made.signature and one["sinks_written"] == ["directory"]
    assert outsider_api.get("/api/compliance/audit/checkpoints").status_code == 403
    bad = compliance_api.get("/api/compliance/audit/checkpoints?status=lost")
    assert bad.status_code == 400 and "status" in bad.json()


def test_a_development_key_is_generated_once_for_its_owner_only(tmp_path, settings):
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "fresh" / "audit.pem"
    first = keys.audit_signing_key()
    assert os.stat(settings.AUDIT_SIGNING_KEY_FILE).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "fresh").st_mode & 0o777 == 0o700
    assert keys.audit_signing_key().key_id == first.key_id  # loaded, not generated again
    os.chmod(settings.AUDIT_SIGNING_KEY_FILE, 0o644)
    Path(settings.AUDIT_SIGNING_KEY_FILE).touch()
    with pytest.raises(keys.SigningKeyError, match="readable by other users"):
        keys.audit_signing_key()


def test_production_refuses_to_start_without_a_signing_key_file(tmp_path):
    from tests.test_settings import load_settings

    production = {
        "BRIDGE_ENV": "production",
        "SECRET_KEY": "x" * 50,
        "ALLOWED_HOSTS": "bridge.example.org",
    }
    refused = load_settings(tmp_path, **production)
    assert refused.returncode != 0 and "AUDIT_SIGNING_KEY_FILE is not set" in refused.stderr
    key_file = tmp_path / "audit.pem"
    keys.write_key_file(key_file, Ed25519PrivateKey.generate(), replace=False)
    started = load_settings(tmp_path, AUDIT_SIGNING_KEY_FILE=str(key_file), **production)
    assert started.returncode == 0, started.stderr
    without_audit = load_settings(tmp_path, ENABLE_AUDIT_LOGGING="false", **production)
    assert without_audit.returncode == 0, without_audit.stderr


# --- Console ------------------------------------------------------------------------------


def test_the_console_shows_checkpoints_keys_and_a_failing_sink(admin_user, settings, tmp_path):
    from tests.test_console import console_for

    client = console_for(admin_user)
    sealed_events(3)
    made = checkpoints.make_checkpoint()
    # the panel: anchored, naming the last checkpoint and the key
    content = next(
        shown.content
        for shown in client.get("/admin/").context["panels"]
        if shown.panel.key == "compliance-checkpoints"
    )
    figures = {figure.label: figure.value for figure in content.figures}
    assert content.state == "ok" and figures["last checkpoint"] == f"#1 at seq {made.seq}"
    key = next(figure for figure in content.figures if figure.label == "signing key")
    assert made.key_id in key.hint
    assert made.key_id.split(":")[1].startswith(key.value) and len(key.value) == 8
    # the checkpoint and key pages, the PEM an auditor copies
    page = client.get("/admin/compliance/auditcheckpoint/").content.decode()
    assert made.key_id in page and "Published to every sink" in page
    key = keys.register_public_key(keys.audit_signing_key().public)
    detail = client.get(f"/admin/security/signingkey/{key.pk}/change/").content.decode()
    assert "BEGIN PUBLIC KEY" in detail
    # a sink that fails turns the panel to warn, naming the checkpoint
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings.AUDIT_CHECKPOINT_DIR = blocker / "sink"
    record(2, "x")
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    content = next(
        shown.content
        for shown in client.get("/admin/").context["panels"]
        if shown.panel.key == "compliance-checkpoints"
    )
    figures = {figure.label: figure for figure in content.figures}
    assert content.state == "warn" and content.badge == "sink failing"
    assert "checkpoint #2 not written" in figures["waiting for a sink"].hint
    assert [row.value for row in content.rows] == ["failing"]


def test_each_exported_event_holds_the_exact_bytes_its_hash_covers(tmp_path):
    import hashlib

    assert sealed_events(6) == 0
    checkpoints.make_checkpoint()
    out = tmp_path / "x.jsonl"
    export_audit(out=out, start=None, end=None, context=AuditContext.system())
    lines = out.read_text().splitlines(keepends=True)
    events = [line for line in lines if line.startswith('{"type":"event",')]
    assert len(events) == 6
    # an auditor can check one event by hand: the "event" object's bytes hash to "hash"
    item = json.loads(events[2])
    canonical = events[2][events[2].index('"event":') + 8 : -2]
    assert hashlib.sha256(canonical.encode()).hexdigest() == item["hash"]
    assert json.loads(canonical)["seq"] == item["seq"] == 3
    key = public_key_file(tmp_path)

    def verdict(text: str) -> tuple[int, str]:
        out.write_text(text)
        return run_offline([str(out), "--public-key", str(key)])

    head = [line for line in lines if not line.startswith('{"type":"event",')]
    end_line = head.pop()
    # two events swapped, their line seqs rewritten to fit: the event's own seq betrays them
    third = events[2].replace('"seq":3,', '"seq":4,', 1)
    fourth = events[3].replace('"seq":4,', '"seq":3,', 1)
    swapped = [*events[:2], fourth, third, *events[4:]]
    code, output = verdict("".join([*head, *swapped, end_line]))
    assert code == 1 and "BROKEN at seq 3" in output, output
    # a reformatted event line is not an export's any more; nor is a line after the end
    spaced = events[1].replace('"seq":2,', '"seq": 2,', 1)
    code, output = verdict("".join([*head, events[0], spaced, *events[2:], end_line]))
    assert code == 2 and "line" in output and "not an event line" in output, output
    code, output = verdict("".join([*head, *events, end_line, events[0]]))
    assert code == 2 and "follows the end line" in output, output
    code, output = verdict("".join([*head, *events, end_line]))
    assert code == 0, output


def test_the_checkpointer_never_chains_from_a_forged_newest_row(settings):
    from recovery.health import readiness_report

    # given a real checkpoint, then an insider's row after it, signed with their own key
    sealed_events(5)
    real = checkpoints.make_checkpoint()
    insert_checkpoint_signed_by_a_stranger(after=real)
    record(3, "later")
    chain.seal_all_pending()
    # when the checkpointer runs, it refuses rather than sign on top of it, and says why
    with pytest.raises(checkpoints.CheckpointRefused, match="newest checkpoint in the database"):
        checkpoints.make_checkpoint()
    assert AuditCheckpoint.objects.count() == 2
    check = readiness_report()["checks"]["checkpoints"]
    assert check["state"] == "degraded" and "#2 in the database" in check["detail"]


def test_a_row_whose_columns_differ_from_its_signed_record_is_refused():
    sealed_events(5)
    real = checkpoints.make_checkpoint()
    bypass_triggers(
        "UPDATE compliance_auditcheckpoint SET hash = %s WHERE id = %s", ["f" * 64, real.pk]
    )
    record(2, "later")
    chain.seal_all_pending()
    with pytest.raises(checkpoints.CheckpointRefused, match="columns differ"):
        checkpoints.make_checkpoint()


def test_a_conflicting_database_copy_does_not_unseat_the_sinks_anchor(settings):
    # given a checkpoint that signs every hash, and a rewrite under it
    settings.AUDIT_CHECKPOINT_WAYPOINTS = 1000
    base = sealed_events(20)
    real = checkpoints.make_checkpoint()
    rewrite_with_recomputed_seals(base + 12, "custom.innocent")
    # when the insider also rewrites the database's copy to sign the forged chain (with a
    # signature they cannot make)
    forged = {**real.record_data, "hash": chain.chain_head().last_hash, "waypoints": []}
    bypass_triggers(
        "UPDATE compliance_auditcheckpoint SET record = %s WHERE id = %s",
        [proof.canonical_json(forged), real.pk],
    )
    # then the sink's copy still names the rewritten seq, and the conflict is reported too
    result = _check()
    assert (result.ok, result.first_broken_seq, result.checkpoint) == (False, base + 12, 1)
    assert any("copies of checkpoint #1 differ" in text for text in result.checkpoint_problems)


# --- Found in review: each of these once passed tampering or raised a false alarm -----------


def test_a_database_row_carrying_another_checkpoints_record_is_reported_and_anchors_nothing(
    tmp_path,
):
    # given checkpoints over 40 events
    sealed_events(20)
    first = checkpoints.make_checkpoint()
    record(20, "g")
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    # when an insider files #1's genuine record under number 999 and rewrites seq 30
    AuditCheckpoint.objects.create(
        number=999,
        seq=first.seq,
        hash=first.hash,
        created_at=first.created_at,
        key_id=first.key_id,
        signature=first.signature,
        record=first.record,
    )
    rewrite_with_recomputed_seals(30, "custom.innocent")
    # then Bridge reports the row, and a range export still starts from a sink's signed
    # checkpoint, so the offline verifier names the rewrite
    result = _check()
    assert any(
        "#999 in the database: its record is numbered 1" in p for p in result.checkpoint_problems
    )
    out = tmp_path / "range.jsonl"
    later = AuditEvent.objects.get(seal__seq=21).occurred_at
    export_audit(out=out, start=later, end=None, context=AuditContext.system())
    code, output = run_offline([str(out), "--public-key", str(public_key_file(tmp_path))])
    assert code == 1 and "BROKEN at seq 30" in output, output


def test_deleted_checkpoint_rows_stop_the_checkpointer_from_signing_over_a_rewrite():
    sealed_events(20)
    checkpoints.make_checkpoint()
    record(5, "g")
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    rewrite_with_recomputed_seals(15, "custom.innocent")
    bypass_triggers("DELETE FROM compliance_auditcheckpoint WHERE number = 2")
    record(2, "h")
    chain.seal_all_pending()
    with pytest.raises(checkpoints.CheckpointRefused, match="checkpoint rows were deleted"):
        checkpoints.make_checkpoint()
    assert AuditCheckpoint.objects.filter(number=2).count() == 0


def test_in_production_a_missing_sink_directory_is_an_error_not_a_fresh_sink(settings, tmp_path):
    settings.PRODUCTION = True
    settings.AUDIT_CHECKPOINT_DIR = tmp_path / "unmounted" / "checkpoints"
    sealed_events(3)
    made = checkpoints.make_checkpoint()
    assert made.status == CheckpointStatus.PENDING and "does not exist" in made.last_error
    assert not (tmp_path / "unmounted").exists()
    assert any("cannot be read" in p for p in _check().checkpoint_problems)


def test_a_checkpoint_written_after_the_review_is_not_held_against_the_chain():
    sealed_events(5)
    checkpoints.make_checkpoint()
    review = checkpoints.review_checkpoints()
    record(3, "late")
    chain.seal_all_pending()
    checkpoints.make_checkpoint()  # signs a seq the walk of this review will not reach
    assert [anchor.checkpoint for anchor in review.anchors()] == [1] * 5


def test_a_storage_sink_added_later_is_not_flagged_for_the_checkpoints_before_it(
    settings, tmp_path
):
    sealed_events(4)
    checkpoints.make_checkpoint()
    spec = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(tmp_path / "offsite")},
    }
    settings.AUDIT_CHECKPOINT_STORAGES = {"offsite": spec}
    settings.STORAGES = {**settings.STORAGES, "audit_checkpoints_offsite": spec}
    record(2, "g")
    chain.seal_all_pending()
    assert sorted(checkpoints.make_checkpoint().sinks_written) == ["directory", "storage:offsite"]
    result = _check()
    assert result.ok, result.reason


def test_a_rotation_survives_its_database_record_being_deleted(settings, tmp_path):
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "k" / "audit.pem"
    sealed_events(5)
    checkpoints.make_checkpoint()
    services.rotate_audit_signing_key(context=AuditContext.system())
    # the record is in the sink already, before any checkpoint with the new key
    assert "key_rotation" in (Path(settings.AUDIT_CHECKPOINT_DIR) / "keys.jsonl").read_text()
    bypass_triggers("UPDATE security_signingkey SET rotation = ''")
    record(3, "g")
    chain.seal_all_pending()
    assert checkpoints.make_checkpoint().number == 2
    result = _check()
    assert result.ok, result.reason


def test_an_insiders_rotation_row_is_never_published_and_tampered_rows_are_reported(settings):
    sealed_events(5)
    checkpoints.make_checkpoint()
    from security.models import SigningKey

    SigningKey.objects.create(
        key_id="ed25519:0000000000000000",
        purpose="audit_signing",
        public_key="AAAA",
        created_at=AuditEvent.objects.first().occurred_at,
        rotation='{"type":"key_rotation","insider":"was here"}',
    )
    record(2, "g")
    chain.seal_all_pending()
    checkpoints.make_checkpoint()
    keys_file = Path(settings.AUDIT_CHECKPOINT_DIR) / "keys.jsonl"
    assert not keys_file.exists() or "insider" not in keys_file.read_text()
    # records that are not checkpoints at all are reported, not raised
    for text in ("[]", '{"key_id": [1], "number": 2}', '{"number": 2, "seq": NaN}'):
        bypass_triggers(
            "UPDATE compliance_auditcheckpoint SET record = %s WHERE number = 2", [text]
        )
        result = _check()
        assert result.ok is False, text
        assert any("checkpoint #2 in the database" in p for p in result.checkpoint_problems)
        assert checkpoints.checkpoint_health().ok is False


def test_the_offline_verifier_reports_malformed_exports_as_unreadable(tmp_path):
    sealed_events(3)
    checkpoints.make_checkpoint()
    out = tmp_path / "x.jsonl"
    export_audit(out=out, start=None, end=None, context=AuditContext.system())
    good = out.read_text().splitlines(keepends=True)
    key = str(public_key_file(tmp_path))
    header = json.loads(good[0])
    cases = {
        "sinks": json.dumps({**header, "sinks": 5}) + "\n",
        "utf8": None,
    }
    out.write_text(cases["sinks"] + "".join(good[1:]))
    code, output = run_offline([str(out), "--public-key", key])
    assert code == 2 and "sinks" in output, output
    out.write_bytes(b"".join(line.encode() for line in good[:1]) + b"\xff\xfe\n")
    code, output = run_offline([str(out), "--public-key", key])
    assert code == 2 and "cannot verify" in output, output


def test_an_export_of_an_empty_range_verifies(tmp_path):
    from datetime import timedelta

    from django.utils import timezone

    sealed_events(3)
    checkpoints.make_checkpoint()
    out = tmp_path / "empty.jsonl"
    summary = export_audit(
        out=out, start=timezone.now() + timedelta(hours=1), end=None, context=AuditContext.system()
    )
    assert summary.events == 0
    code, output = run_offline([str(out), "--public-key", str(public_key_file(tmp_path))])
    assert code == 0, output


def test_checkpoint_times_only_grow_whatever_the_hosts_clock_says():
    from datetime import timedelta

    sealed_events(3)
    first = checkpoints.make_checkpoint()
    ahead = first.created_at + timedelta(days=1)
    bypass_triggers("UPDATE compliance_auditcheckpoint SET created_at = %s", [ahead])
    record(2, "g")
    chain.seal_all_pending()
    second = checkpoints.make_checkpoint()
    assert second.created_at > ahead
