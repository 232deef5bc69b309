"""Encryption at rest beyond the round trip: the encrypted model field, the binary layout,
master key rotation with re-encryption, and the subject keys' own short-lived backup."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from django.core import serializers
from django.core.management import call_command
from django.db import connection

from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import crypto, rotation, subject_keys
from security.models import DataKey, StoredSecret, SubjectKey
from security.tasks import reencrypt_task

pytestmark = pytest.mark.django_db

OLD = base64.b64encode(b"o" * 32).decode()
NEW = base64.b64encode(b"n" * 32).decode()


@pytest.fixture(autouse=True)
def _old_master(settings):
    settings.BRIDGE_MASTER_KEY = OLD
    settings.BRIDGE_MASTER_KEY_PREVIOUS = []
    crypto.forget_keys()
    yield
    crypto.forget_keys()


def stored(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT value FROM security_storedsecret WHERE name = %s", [name])
        return cursor.fetchone()[0]


def switch_master(settings, current: str, previous: list[str]) -> None:
    settings.BRIDGE_MASTER_KEY = current
    settings.BRIDGE_MASTER_KEY_PREVIOUS = previous
    crypto.forget_keys()


# --- the field -------------------------------------------------------------------------


def test_the_database_holds_a_ciphertext_and_reading_gives_the_plaintext():
    StoredSecret.objects.create(name="smtp", value="hunter2-password")
    raw = stored("smtp")
    assert raw.startswith("v1.dk:") and "hunter2" not in raw
    assert StoredSecret.objects.get(name="smtp").value == "hunter2-password"
    # fixtures and dumpdata carry the ciphertext, never the plaintext
    dumped = serializers.serialize("json", StoredSecret.objects.all())
    assert raw in dumped and "hunter2" not in dumped


def test_a_row_saved_without_reading_its_secret_keeps_the_same_ciphertext():
    StoredSecret.objects.create(name="s3", value="AKIA-secret")
    before = stored("s3")
    row = StoredSecret.objects.get(name="s3")
    row.description = "offsite target"
    row.save()
    assert stored("s3") == before
    row.value = "rotated"
    row.save()
    assert stored("s3") != before
    assert StoredSecret.objects.get(name="s3").value == "rotated"


def test_a_ciphertext_copied_to_another_row_fails_loudly_instead_of_passing_for_plaintext():
    StoredSecret.objects.create(name="prod-db", value="prod password")
    StoredSecret.objects.create(name="test-db", value="test password")
    # an insider with database rights moves production's secret under another name
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE security_storedsecret SET value = %s WHERE name = 'test-db'",
            [stored("prod-db")],
        )
    moved = StoredSecret.objects.get(name="test-db")
    with pytest.raises(crypto.CryptoError, match="altered, or the context differs"):
        moved.value  # noqa: B018
    # and a value that is not a ciphertext at all is refused, not handed back
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_storedsecret SET value = 'plain' WHERE name = 'test-db'")
    with pytest.raises(crypto.MalformedCiphertext):
        StoredSecret.objects.get(name="test-db").value  # noqa: B018


def test_a_query_on_the_plaintext_of_an_encrypted_field_is_refused():
    StoredSecret.objects.create(name="hook", value="token")
    with pytest.raises(TypeError, match="encrypted"):
        StoredSecret.objects.filter(value="token").count()
    with pytest.raises(TypeError, match="encrypted"):
        StoredSecret.objects.filter(value__startswith="tok").count()
    assert StoredSecret.objects.filter(value__isnull=False).count() == 1


# --- the binary layout ---------------------------------------------------------------------


def test_seal_and_unseal_round_trip_and_refuse_tampering_truncation_and_context_swap():
    data = os.urandom(70_000)
    blob = crypto.seal(data, purpose="export", context="export:7")
    assert crypto.unseal(blob, context="export:7") == data
    assert data not in bytes(blob)
    flipped = bytearray(blob)
    flipped[-20] ^= 1
    for bad, context in ((flipped, "export:7"), (blob, "export:8"), (blob[:-1], "export:7")):
        with pytest.raises(crypto.CryptoError):
            crypto.unseal(bad, context=context)
    with pytest.raises(crypto.MalformedCiphertext):
        crypto.unseal(b"PK\x03\x04 a zip file", context="export:7")


# --- rotation ------------------------------------------------------------------------------


def test_rotation_rewraps_every_key_reencrypts_values_and_old_data_stays_readable(settings):
    for n in range(7):
        StoredSecret.objects.create(name=f"svc-{n}", value=f"password {n}")
    subject_text = crypto.encrypt(b"alice's address", purpose="gdpr", subject_id="alice")
    api_text = crypto.encrypt(b"api data", purpose="api", context="c")
    old_master = crypto.master_key()[0]
    before = {n: stored(f"svc-{n}") for n in range(7)}

    # every process now has the new master key, and the old one as previous
    switch_master(settings, NEW, [OLD])
    assert StoredSecret.objects.get(name="svc-3").value == "password 3"  # readable throughout
    new_master = crypto.master_key()[0]
    assert new_master != old_master

    call_command("rotate_keys", stdout=open(os.devnull, "w"))

    assert set(DataKey.objects.values_list("master_key_id", flat=True)) == {new_master}
    assert set(SubjectKey.objects.values_list("master_key_id", flat=True)) == {new_master}
    # a new version for each purpose; the stored secrets moved to it
    current = DataKey.objects.filter(purpose="stored_secret").order_by("-version").first()
    assert current.version == 2
    for n in range(7):
        assert stored(f"svc-{n}") != before[n]
        assert crypto.key_id_of(stored(f"svc-{n}")) == current.key_id
    job = Job.objects.get(kind="security.reencrypt")
    assert job.status == JobStatus.SUCCEEDED
    assert job.result["reencrypted"] == 7 and job.result["failed"] == 0
    assert (job.progress_done, job.progress_total) == (7, 7)
    event = AuditEvent.objects.get(action=AuditAction.KEYS_ROTATED)
    assert json.loads(event.details)["rewrapped"] >= 3 and NEW not in event.details

    # the old master key can go: everything, old ciphertexts included, still opens
    switch_master(settings, NEW, [])
    assert StoredSecret.objects.get(name="svc-6").value == "password 6"
    assert crypto.decrypt(subject_text) == b"alice's address"
    assert crypto.decrypt(api_text, context="c") == b"api data"


def test_without_the_previous_master_key_old_data_is_refused_by_name_and_rotation_changes_nothing(
    settings,
):
    StoredSecret.objects.create(name="svc", value="pw")
    switch_master(settings, NEW, [])
    with pytest.raises(crypto.CryptoError, match="BRIDGE_MASTER_KEY_PREVIOUS"):
        StoredSecret.objects.get(name="svc").value  # noqa: B018
    wrapped_before = list(DataKey.objects.values_list("key_id", "master_key_id", "wrapped"))
    with pytest.raises(Exception, match="rotation refused, nothing changed"):
        call_command("rotate_keys", stdout=open(os.devnull, "w"))
    assert list(DataKey.objects.values_list("key_id", "master_key_id", "wrapped")) == (
        wrapped_before
    )
    assert not Job.objects.filter(kind="security.reencrypt").exists()


def test_a_value_that_no_longer_decrypts_fails_the_reencryption_job_loudly(settings):
    StoredSecret.objects.create(name="good", value="ok")
    StoredSecret.objects.create(name="bad", value="ok too")
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE security_storedsecret SET value = %s WHERE name = 'bad'", [stored("good")]
        )
    summary = rotation.rotate_keys(context=AuditContext.system(), enqueue=False)
    reencrypt_task(summary["job_id"])
    job = Job.objects.get(pk=summary["job_id"])
    assert job.status == JobStatus.FAILED and "1 stored value(s) did not decrypt" in job.error
    assert StoredSecret.objects.get(name="good").value == "ok"  # the others were done


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_reencrypts_after_a_rotation(settings, request):
    for n in range(3):
        StoredSecret.objects.create(name=f"w-{n}", value=f"secret {n}")
    switch_master(settings, NEW, [OLD])
    # the worker starts with the keys every process has during the rotation
    worker_queue = request.getfixturevalue("worker_queue")
    summary = rotation.rotate_keys(context=AuditContext.system(), enqueue=False)
    reencrypt_task.apply_async(args=[summary["job_id"]], queue=worker_queue)
    deadline = time.monotonic() + 60
    job = Job.objects.get(pk=summary["job_id"])
    while job.status in (JobStatus.PENDING, JobStatus.RUNNING) and time.monotonic() < deadline:
        time.sleep(0.25)
        job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result["reencrypted"] == 3
    assert {crypto.key_id_of(stored(f"w-{n}")) for n in range(3)} == set(summary["new_data_keys"])


# --- subject keys: their own table and their own short backup ------------------------------


def test_subject_keys_live_in_a_table_of_their_own_that_dumps_leave_out():
    crypto.encrypt(b"x", purpose="gdpr", subject_id="bob")
    assert SubjectKey.objects.filter(subject_id="bob").count() == 1
    assert not DataKey.objects.filter(subject_id="bob").exists()
    assert crypto.SUBJECT_KEY_TABLES == (SubjectKey._meta.db_table,)


def test_a_key_backup_restores_living_keys_but_never_a_shredded_one(settings, tmp_path):
    settings.SUBJECT_KEY_BACKUP_DIR = tmp_path / "keys"
    alice = crypto.encrypt(b"alice data", purpose="gdpr", subject_id="alice")
    bob = crypto.encrypt(b"bob data", purpose="gdpr", subject_id="bob")
    done = subject_keys.backup_subject_keys(context=AuditContext.system())
    path = settings.SUBJECT_KEY_BACKUP_DIR / done["file"]
    assert done["keys"] == 2 and oct(path.stat().st_mode & 0o777) == "0o600"
    content = path.read_text()
    assert "alice" in content  # the subject id, but the key only wrapped:
    raw_keys = [crypto._unwrap(row) for row in SubjectKey.objects.all()]
    assert not any(base64.b64encode(key).decode() in content for key in raw_keys)

    # the table is lost; alice is erased meanwhile (her row kept as destroyed)
    crypto.shred_subject_key(subject_id="alice")
    SubjectKey.objects.filter(subject_id="bob").delete()
    result = subject_keys.restore_subject_keys(path=path, context=AuditContext.system())
    assert result == {"added": 1, "present": 0, "kept_destroyed": 1}
    assert crypto.decrypt(bob) == b"bob data"
    with pytest.raises(crypto.KeyDestroyed):
        crypto.decrypt(alice)


def test_key_backups_past_their_retention_are_deleted(settings, tmp_path):
    settings.SUBJECT_KEY_BACKUP_DIR = tmp_path / "keys"
    settings.SUBJECT_KEY_BACKUP_RETENTION_DAYS = 7
    crypto.encrypt(b"x", purpose="gdpr", subject_id="carol")
    first = subject_keys.backup_subject_keys(context=AuditContext.system())["file"]
    old = Path(settings.SUBJECT_KEY_BACKUP_DIR) / first
    eight_days_ago = time.time() - 8 * 86400
    os.utime(old, (eight_days_ago, eight_days_ago))
    second = subject_keys.backup_subject_keys(context=AuditContext.system())
    assert second["pruned"] == [first] and not old.exists()
    assert (Path(settings.SUBJECT_KEY_BACKUP_DIR) / second["file"]).exists()


def test_a_retention_past_the_erasure_deadline_is_refused(tmp_path):
    from tests.test_settings import load_settings

    result = load_settings(tmp_path, SUBJECT_KEY_BACKUP_RETENTION_DAYS="30")
    assert result.returncode != 0
    assert "SUBJECT_KEY_BACKUP_RETENTION_DAYS must stay under 28" in result.stderr
