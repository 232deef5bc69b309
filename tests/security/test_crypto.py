"""Envelope encryption: round trips, refusals of tampering and of a moved ciphertext, crypto-
shredding, the API with its permission and an audit trail without plaintext."""

from __future__ import annotations

import base64

import pytest

from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import crypto
from security.models import DataKey, SubjectKey

pytestmark = pytest.mark.django_db

ENCRYPT, DECRYPT = "/api/security/encrypt", "/api/security/decrypt"


@pytest.fixture(autouse=True)
def _master_key(settings):
    settings.BRIDGE_MASTER_KEY = base64.b64encode(b"k" * 32).decode()
    crypto._master = None
    crypto.forget_keys()
    yield
    crypto._master = None


def test_a_round_trip_and_a_fresh_nonce_each_time():
    first = crypto.encrypt(b"card 4111", purpose="test", context="order:1:card")
    second = crypto.encrypt(b"card 4111", purpose="test", context="order:1:card")
    assert first != second and b"4111" not in first.encode()
    assert crypto.decrypt(first, context="order:1:card") == b"card 4111"
    row = DataKey.objects.get()
    assert base64.b64decode(row.wrapped)[12:] != b"k" * 32 and row.master_key_id.startswith("mk:")


def test_a_tampered_ciphertext_or_another_context_is_refused_never_returned():
    sealed = crypto.encrypt(b"secret", purpose="test", context="a")
    version, key_id, nonce, data = sealed.split(".")
    flipped = data[:-2] + ("A" if data[-2] != "A" else "B") + data[-1]
    for bad, context in ((f"{version}.{key_id}.{nonce}.{flipped}", "a"), (sealed, "b")):
        with pytest.raises(crypto.CryptoError, match="altered, or the context differs"):
            crypto.decrypt(bad, context=context)
    with pytest.raises(crypto.MalformedCiphertext):
        crypto.decrypt("secret", context="a")


def test_a_wrapped_key_moved_to_another_subject_does_not_unwrap():
    crypto.encrypt(b"x", purpose="test", subject_id="alice")
    bob = crypto.current_key(purpose="test", subject_id="bob")
    alice = SubjectKey.objects.get(subject_id="alice")
    SubjectKey.objects.filter(pk=bob.pk).update(wrapped=alice.wrapped)
    with pytest.raises(crypto.CryptoError, match="does not unwrap"):
        crypto.encrypt(b"y", purpose="test", subject_id="bob")


def test_a_shredded_subjects_data_is_unreadable_for_good():
    mine = crypto.encrypt(b"alice's address", purpose="test", subject_id="alice")
    other = crypto.encrypt(b"bob's address", purpose="test", subject_id="bob")
    assert crypto.shred_subject_key(subject_id="alice") == 1
    with pytest.raises(crypto.KeyDestroyed, match="destroyed"):
        crypto.decrypt(mine)
    assert crypto.decrypt(other) == b"bob's address"
    assert SubjectKey.objects.get(subject_id="alice").wrapped == ""


def test_production_never_makes_up_a_master_key(settings):
    settings.BRIDGE_MASTER_KEY = ""
    settings.PRODUCTION = True
    crypto._master = None
    with pytest.raises(Exception, match="BRIDGE_MASTER_KEY"):
        crypto.master_key()


def test_the_api_encrypts_and_decrypts_for_security_officers_only(
    security_officer, compliance_api, anon_api
):
    from tests.conftest import client_for

    api = client_for(security_officer)
    body = {"plaintext": "IBAN DE89 3704", "context": "invoice:7:iban", "subject_id": "s-1"}
    sealed = api.post(ENCRYPT, body, format="json")
    assert sealed.status_code == 200, sealed.content
    result = sealed.json()
    assert result["algorithm"] == "AES-256-GCM" and result["key_id"].startswith("sk:")
    opened = api.post(
        DECRYPT, {"ciphertext": result["ciphertext"], "context": "invoice:7:iban"}, format="json"
    )
    assert opened.json() == {"plaintext": "IBAN DE89 3704"}
    wrong = api.post(DECRYPT, {"ciphertext": result["ciphertext"], "context": "x"}, format="json")
    assert wrong.status_code == 400 and wrong.json()["field"] == "ciphertext"
    assert wrong.json()["code"] == "decryption_failed" and "context" in wrong.json()["detail"]
    assert compliance_api.post(ENCRYPT, body, format="json").status_code == 403
    assert anon_api.post(ENCRYPT, body, format="json").status_code == 401
    # audited, but never with the plaintext
    trail = "".join(AuditEvent.objects.values_list("details", flat=True))
    assert "DE89" not in trail
    assert AuditEvent.objects.filter(action=AuditAction.DATA_ENCRYPTED).count() == 1
    assert AuditEvent.objects.filter(action=AuditAction.DECRYPTION_FAILED).count() == 1


def test_a_body_over_the_upload_limit_is_413_not_500(security_officer):
    from tests.conftest import client_for

    api = client_for(security_officer)
    body = '{"plaintext": "' + "\\ud94b\\udcd6" * 300_000 + '"}'
    response = api.post(ENCRYPT, body, content_type="application/json")
    assert response.status_code == 413 and response.json()["code"] == "body_too_large"
    too_long = api.post(ENCRYPT, {"plaintext": "x" * 100_001}, format="json")
    assert too_long.status_code == 400 and "plaintext" in too_long.json()
