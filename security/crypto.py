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
import time
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from security.keys import SigningKeyError
from security.models import DataKey, SubjectKey, WrappedKey

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


def _parse_master(raw: str, name: str) -> tuple[str, bytes]:
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise SigningKeyError(f"{name}: not base64") from exc
    if len(key) != 32:
        raise SigningKeyError(f"{name}: must be 32 bytes (base64 of them)")
    return master_key_id(key), key


def master_key_id(key: bytes) -> str:
    return "mk:" + hashlib.sha256(b"bridge-master-key-id" + key).hexdigest()[:16]


def master_key() -> tuple[str, bytes]:
    """(key id, 32 bytes) of the current master key; production refuses to run without one."""
    global _master
    with _lock:
        if _master is None:
            raw = (settings.BRIDGE_MASTER_KEY or "").strip()
            _master = _parse_master(raw or _dev_master_key(), "BRIDGE_MASTER_KEY")
    return _master


def master_keys() -> dict[str, bytes]:
    """Every master key this process can unwrap with: the current one and, during a rotation,
    the previous ones (BRIDGE_MASTER_KEY_PREVIOUS), by key id."""
    current_id, current = master_key()
    found = {current_id: current}
    for raw in settings.BRIDGE_MASTER_KEY_PREVIOUS:
        key_id, key = _parse_master(raw, "BRIDGE_MASTER_KEY_PREVIOUS")
        found.setdefault(key_id, key)
    return found


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


def _unwrap(row: WrappedKey) -> bytes:
    if row.destroyed_at is not None or not row.wrapped:
        raise KeyDestroyed("the key of this ciphertext was destroyed")
    master = master_keys().get(row.master_key_id)
    if master is None:
        raise CryptoError(
            f"the key is wrapped by master key {row.master_key_id}, which this process does not "
            "have (set it in BRIDGE_MASTER_KEY_PREVIOUS until rotate_keys has re-wrapped it)"
        )
    blob = base64.b64decode(row.wrapped)
    try:
        return AESGCM(master).decrypt(
            blob[:12], blob[12:], _key_aad(row.key_id, row.purpose, row.subject_id)
        )
    except InvalidTag as exc:
        raise CryptoError("the data key does not unwrap (altered or moved)") from exc


def wrap(*, key_id: str, purpose: str, subject_id: str, key: bytes) -> tuple[str, str]:
    """(master key id, wrapped text) of a data key under the current master key."""
    master_id, master = master_key()
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(master).encrypt(nonce, key, _key_aad(key_id, purpose, subject_id))
    return master_id, base64.b64encode(nonce + sealed).decode()


def unwrap(
    *, key_id: str, purpose: str, subject_id: str, master_key_id: str, wrapped: str
) -> bytes:
    """A key that `wrap` wrapped and that its owner keeps itself (a backup's data key, in the
    catalog and in each artifact's header): unwrapped under whichever known master key it names.
    """
    master = master_keys().get(master_key_id)
    if master is None:
        raise CryptoError(
            f"the key {key_id} is wrapped by master key {master_key_id}, which this process does "
            "not have (BRIDGE_MASTER_KEY or BRIDGE_MASTER_KEY_PREVIOUS)"
        )
    try:
        blob = base64.b64decode(wrapped, validate=True)
        return AESGCM(master).decrypt(blob[:12], blob[12:], _key_aad(key_id, purpose, subject_id))
    except (InvalidTag, ValueError) as exc:
        raise CryptoError(f"the key {key_id} does not unwrap (altered, or another key)") from exc


# Unwrapped purpose keys, per process, for DATA_KEY_CACHE_SECONDS: the database round trip and
# the unwrap would otherwise cost more than encrypting a megabyte. Subject keys are never cached:
# shredding one must stop every process at once, so each use reads its row.
_cache: dict[tuple[str, str], tuple[float, WrappedKey, AESGCM]] = {}


def forget_keys() -> None:
    """Drop this process's cached keys (tests, and after a master key change)."""
    global _master
    with _lock:
        _cache.clear()
        _master = None


def _cached(kind: str, name: str) -> tuple[WrappedKey, AESGCM] | None:
    found = _cache.get((kind, name))
    if found is None or found[0] < time.monotonic():
        return None
    return found[1], found[2]


def _remember(row: WrappedKey, cipher: AESGCM, *, current: bool) -> None:
    if row.subject_id:
        return
    expires = time.monotonic() + settings.DATA_KEY_CACHE_SECONDS
    with _lock:
        if len(_cache) > 4096:  # a bound, not a policy: purposes are few
            _cache.clear()
        _cache[("id", row.key_id)] = (expires, row, cipher)
        if current:
            _cache[("current", row.purpose)] = (expires, row, cipher)


# Subject keys live in a table of their own, which database dumps leave out (a shredded key must
# not come back with a restored backup); see backup_subject_keys for their own backup.
SUBJECT_KEY_TABLES = (SubjectKey._meta.db_table,)


def _key_model(subject_id: str) -> type[WrappedKey]:
    return SubjectKey if subject_id else DataKey


def current_key(*, purpose: str, subject_id: str = "") -> WrappedKey:
    """The purpose's (and subject's) current data key, made on first use."""
    model = _key_model(subject_id)
    found = (
        model.objects.filter(purpose=purpose, subject_id=subject_id, destroyed_at__isnull=True)
        .order_by("-version")
        .first()
    )
    if found is not None:
        return found
    version = (
        model.objects.filter(purpose=purpose, subject_id=subject_id)
        .order_by("-version")
        .values_list("version", flat=True)
        .first()
        or 0
    ) + 1
    return _new_key(purpose=purpose, subject_id=subject_id, version=version)


def _new_key(*, purpose: str, subject_id: str, version: int) -> WrappedKey:
    key_id = ("sk:" if subject_id else "dk:") + uuid.uuid4().hex[:24]
    master_id, wrapped = wrap(
        key_id=key_id,
        purpose=purpose,
        subject_id=subject_id,
        key=AESGCM.generate_key(bit_length=256),
    )
    try:
        with transaction.atomic():
            return _key_model(subject_id).objects.create(
                key_id=key_id,
                purpose=purpose,
                subject_id=subject_id,
                version=version,
                master_key_id=master_id,
                wrapped=wrapped,
                created_at=timezone.now(),
            )
    except IntegrityError:  # another process made it first
        return current_key(purpose=purpose, subject_id=subject_id)


def find_key(key_id: str) -> WrappedKey | None:
    # Subject keys made before they had a table of their own kept their "dk:" ids.
    first, second = (SubjectKey, DataKey) if key_id.startswith("sk:") else (DataKey, SubjectKey)
    return (
        first.objects.filter(key_id=key_id).first() or second.objects.filter(key_id=key_id).first()
    )


def _current_cipher(purpose: str, subject_id: str) -> tuple[WrappedKey, AESGCM]:
    if not subject_id:
        found = _cached("current", purpose)
        if found is not None:
            return found
    row = current_key(purpose=purpose, subject_id=subject_id)
    cipher = AESGCM(_unwrap(row))
    _remember(row, cipher, current=True)
    return row, cipher


def _cipher_for(key_id: str) -> AESGCM:
    found = _cached("id", key_id)
    if found is not None:
        return found[1]
    row = find_key(key_id)
    if row is None:
        raise CryptoError("the ciphertext names a key Bridge does not have")
    cipher = AESGCM(_unwrap(row))
    _remember(row, cipher, current=False)
    return cipher


def _aad(key_id: str, context: str) -> bytes:
    return f"bridge.data.v1|{key_id}|{context}".encode()


def encrypt(plaintext: bytes, *, purpose: str, context: str = "", subject_id: str = "") -> str:
    """AES-256-GCM under the purpose's (and subject's) data key, bound to `context`."""
    row, cipher = _current_cipher(purpose, subject_id)
    nonce = secrets.token_bytes(12)
    sealed = cipher.encrypt(nonce, plaintext, _aad(row.key_id, context))
    return f"v1.{row.key_id}.{_b64(nonce)}.{_b64(sealed)}"


def key_id_of(ciphertext: str) -> str:
    parts = ciphertext.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].startswith(("dk:", "sk:")):
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
    try:
        return _cipher_for(key_id).decrypt(nonce, sealed, _aad(key_id, context))
    except InvalidTag as exc:
        raise CryptoError("the ciphertext was altered, or the context differs") from exc


# Binary form for large payloads (files, exports, backups): no base64, no copy of the payload
# beyond the one AES-GCM writes. Layout: MAGIC, one byte key id length, key id, 12-byte nonce,
# ciphertext and 16-byte tag.
MAGIC = b"BRG\x01"


def seal(plaintext: bytes, *, purpose: str, context: str = "", subject_id: str = "") -> bytearray:
    """Like `encrypt`, in the binary layout, written in place into one buffer."""
    row, cipher = _current_cipher(purpose, subject_id)
    key_id = row.key_id.encode("ascii")
    nonce = secrets.token_bytes(12)
    head = MAGIC + bytes([len(key_id)]) + key_id + nonce
    out = bytearray(len(head) + len(plaintext) + 16)
    out[: len(head)] = head
    cipher.encrypt_into(nonce, plaintext, _aad(row.key_id, context), memoryview(out)[len(head) :])
    return out


def unseal(blob: bytes | bytearray | memoryview, *, context: str = "") -> bytes:
    """The plaintext of `seal`'s output, or CryptoError."""
    view = memoryview(blob)
    if len(view) < 5 or bytes(view[:4]) != MAGIC:
        raise MalformedCiphertext("not a Bridge sealed blob")
    end = 5 + view[4]
    key_id = bytes(view[5:end]).decode("ascii", "replace")
    if not key_id.startswith(("dk:", "sk:")) or len(view) < end + 12 + 16:
        raise MalformedCiphertext("the sealed blob is too short or names no key")
    try:
        return _cipher_for(key_id).decrypt(
            bytes(view[end : end + 12]), view[end + 12 :], _aad(key_id, context)
        )
    except InvalidTag as exc:
        raise CryptoError("the ciphertext was altered, or the context differs") from exc


def shred_subject_key(*, subject_id: str) -> int:
    """Destroy every data key of a data subject: their ciphertexts (in backups too) are then
    unreadable for good. Returns how many keys were destroyed."""
    return SubjectKey.objects.filter(subject_id=subject_id, destroyed_at__isnull=True).update(
        wrapped="", destroyed_at=timezone.now()
    )
