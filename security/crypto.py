"""Envelope encryption at rest: AES-256-GCM data keys wrapped by a master key.

The master key (key-encryption key) comes from BRIDGE_MASTER_KEY or BRIDGE_MASTER_KEY_FILE (the
base64 of 32 random bytes), never from SECRET_KEY; development generates one under var/keys/.
Data keys are per purpose and per data subject, stored only wrapped and bound (as associated
data) to their id, purpose and subject, so a wrapped key moved to another row does not unwrap.
Each ciphertext is bound to its key id and the caller's context (model, row, field...): moved
elsewhere, it fails to decrypt. Nonces are random 96-bit values.

Ciphertext text: `v1.<key id>.<base64url nonce>.<base64url ciphertext and tag>`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from security.keys import SigningKeyError
from security.models import DataKey

ALGORITHM = "AES-256-GCM"
_lock = threading.Lock()
_master: tuple[str, bytes] | None = None


class CryptoError(ValueError):
    """A ciphertext that cannot be decrypted; `code` says why, the message never holds data."""

    code = "decryption_failed"


class KeyDestroyed(CryptoError):
    code = "key_destroyed"


class MalformedCiphertext(CryptoError):
    code = "malformed_ciphertext"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def master_key() -> tuple[str, bytes]:
    """(key id, 32 bytes) of the master key; production refuses to run without one."""
    global _master
    with _lock:
        if _master is None:
            raw = (settings.BRIDGE_MASTER_KEY or "").strip()
            if not raw:
                raw = _dev_master_key()
            try:
                key = base64.b64decode(raw, validate=True)
            except ValueError as exc:
                raise SigningKeyError("BRIDGE_MASTER_KEY: not base64") from exc
            if len(key) != 32:
                raise SigningKeyError("BRIDGE_MASTER_KEY: must be 32 bytes (base64 of them)")
            _master = ("mk:" + hashlib.sha256(b"bridge-master-key-id" + key).hexdigest()[:16], key)
    return _master


def _dev_master_key() -> str:
    if settings.PRODUCTION:
        raise SigningKeyError(
            "BRIDGE_MASTER_KEY (or BRIDGE_MASTER_KEY_FILE) is not set: production never makes up "
            "its own master key"
        )
    path = Path(settings.VAR_DIR) / "keys" / "master.key"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".master.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def _key_aad(key_id: str, purpose: str, subject_id: str) -> bytes:
    return f"bridge.data-key.v1|{key_id}|{purpose}|{subject_id}".encode()


def _unwrap(row: DataKey) -> bytes:
    if row.destroyed_at is not None or not row.wrapped:
        raise KeyDestroyed("the key of this ciphertext was destroyed")
    master_id, master = master_key()
    if row.master_key_id != master_id:
        raise CryptoError(f"the key is wrapped by master key {row.master_key_id}, not the current")
    blob = base64.b64decode(row.wrapped)
    try:
        return AESGCM(master).decrypt(
            blob[:12], blob[12:], _key_aad(row.key_id, row.purpose, row.subject_id)
        )
    except InvalidTag as exc:
        raise CryptoError("the data key does not unwrap (altered or moved)") from exc


def current_key(*, purpose: str, subject_id: str = "") -> DataKey:
    """The purpose's (and subject's) current data key, made on first use."""
    found = (
        DataKey.objects.filter(purpose=purpose, subject_id=subject_id, destroyed_at__isnull=True)
        .order_by("-version")
        .first()
    )
    if found is not None:
        return found
    version = (
        DataKey.objects.filter(purpose=purpose, subject_id=subject_id)
        .order_by("-version")
        .values_list("version", flat=True)
        .first()
        or 0
    ) + 1
    master_id, master = master_key()
    key_id = "dk:" + uuid.uuid4().hex[:24]
    nonce = secrets.token_bytes(12)
    wrapped = AESGCM(master).encrypt(
        nonce, AESGCM.generate_key(bit_length=256), _key_aad(key_id, purpose, subject_id)
    )
    try:
        with transaction.atomic():
            return DataKey.objects.create(
                key_id=key_id,
                purpose=purpose,
                subject_id=subject_id,
                version=version,
                master_key_id=master_id,
                wrapped=base64.b64encode(nonce + wrapped).decode(),
                created_at=timezone.now(),
            )
    except IntegrityError:  # another process made it first
        return current_key(purpose=purpose, subject_id=subject_id)


def _aad(key_id: str, context: str) -> bytes:
    return f"bridge.data.v1|{key_id}|{context}".encode()


def encrypt(plaintext: bytes, *, purpose: str, context: str = "", subject_id: str = "") -> str:
    """AES-256-GCM under the purpose's (and subject's) data key, bound to `context`."""
    row = current_key(purpose=purpose, subject_id=subject_id)
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_unwrap(row)).encrypt(nonce, plaintext, _aad(row.key_id, context))
    return f"v1.{row.key_id}.{_b64(nonce)}.{_b64(sealed)}"


def key_id_of(ciphertext: str) -> str:
    parts = ciphertext.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].startswith("dk:"):
        raise MalformedCiphertext("not a Bridge ciphertext (v1.<key id>.<nonce>.<data>)")
    return parts[1]


def decrypt(ciphertext: str, *, context: str = "") -> bytes:
    """The plaintext, or CryptoError: never the ciphertext passed off as plaintext."""
    key_id = key_id_of(ciphertext)
    _, _, nonce_text, sealed_text = ciphertext.split(".")
    try:
        nonce, sealed = _unb64(nonce_text), _unb64(sealed_text)
    except ValueError as exc:
        raise MalformedCiphertext("the ciphertext is not base64url") from exc
    if len(nonce) != 12 or len(sealed) < 16:
        raise MalformedCiphertext("the ciphertext is too short")
    row = DataKey.objects.filter(key_id=key_id).first()
    if row is None:
        raise CryptoError("the ciphertext names a key Bridge does not have")
    try:
        return AESGCM(_unwrap(row)).decrypt(nonce, sealed, _aad(key_id, context))
    except InvalidTag as exc:
        raise CryptoError("the ciphertext was altered, or the context differs") from exc


def shred_subject_key(*, subject_id: str) -> int:
    """Destroy every data key of a data subject: their ciphertexts (in backups too) are then
    unreadable for good. Returns how many keys were destroyed."""
    return DataKey.objects.filter(subject_id=subject_id, destroyed_at__isnull=True).update(
        wrapped="", destroyed_at=timezone.now()
    )
