"""Bridge's signing keys. The security app owns every key; other apps ask here.

The audit signing key is an Ed25519 private key in a PEM file outside the database
(AUDIT_SIGNING_KEY_FILE). Each process loads it once and again whenever the file changes, so a
rotation reaches every gunicorn and Celery process without a restart. The database holds only
public keys and the rotation records signed by both keys (`SigningKey`).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from compliance import proof
from security.choices import KeyPurpose
from security.models import SigningKey

log = logging.getLogger(__name__)


class SigningKeyError(ImproperlyConfigured):
    """The signing key file is missing, unreadable, readable by others or not Ed25519."""


@dataclass(frozen=True)
class AuditSigningKey:
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    key_id: str
    path: Path

    def sign_checkpoint(self, payload: dict) -> dict:
        return proof.sign_checkpoint({**payload, "key_id": self.key_id}, self.private)


_lock = threading.Lock()
_cached: tuple[tuple, AuditSigningKey] | None = None


def _pem(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key_file(path: Path, private: Ed25519PrivateKey, *, replace: bool) -> None:
    """Write a key file readable by its owner only, whole or not at all (temp file, then a
    rename, or a link that fails when another process wrote the file first)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_pem(private))
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # FileExistsError: another process made it first, keep theirs
    finally:
        tmp.unlink(missing_ok=True)


def read_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"AUDIT_SIGNING_KEY_FILE: cannot read {path}: {exc.strerror}"
        ) from exc
    if info.st_mode & (stat.S_IRWXO):
        raise SigningKeyError(
            f"AUDIT_SIGNING_KEY_FILE: {path} is readable by other users; chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # Never the key's bytes in the message, only what is wrong with them.
        raise SigningKeyError(f"AUDIT_SIGNING_KEY_FILE: {path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"AUDIT_SIGNING_KEY_FILE: {path} is not an Ed25519 key")
    return key


def _generate_dev_key(path: Path) -> None:
    if settings.PRODUCTION:
        raise SigningKeyError(f"AUDIT_SIGNING_KEY_FILE: {path} does not exist")
    try:
        write_key_file(path, Ed25519PrivateKey.generate(), replace=False)
        log.warning("generated a development audit signing key at %s", path)
    except FileExistsError:
        pass


def audit_signing_key() -> AuditSigningKey:
    """The current audit signing key, reloaded when its file changes (a rotation)."""
    global _cached
    path = Path(settings.AUDIT_SIGNING_KEY_FILE)
    try:
        info = path.stat()
    except FileNotFoundError:
        _generate_dev_key(path)
        info = path.stat()
    stamp = (str(path), info.st_ino, info.st_mtime_ns, info.st_size)
    with _lock:
        if _cached is not None and _cached[0] == stamp:
            return _cached[1]
        private = read_key_file(path)
        public = private.public_key()
        key = AuditSigningKey(private, public, proof.key_id_of(public), path)
        _cached = (stamp, key)
    register_public_key(key.public)
    return key


def register_public_key(public: Ed25519PublicKey, rotation: dict | None = None) -> SigningKey:
    """The key's row (made on first use), so the console and the API can list every key."""
    text = proof.canonical_json(rotation) if rotation else ""
    row, made = SigningKey.objects.get_or_create(
        key_id=proof.key_id_of(public),
        defaults={
            "purpose": KeyPurpose.AUDIT_SIGNING,
            "public_key": proof.public_key_text(public),
            "created_at": timezone.now(),
            "rotation": text,
        },
    )
    if not made and text and row.rotation != text:
        # A host loaded the new key before the rotation was recorded: the row exists, and
        # the record that links it to the old key must not be lost.
        if row.rotation:
            raise ValueError(f"key {row.key_id} was already rotated in by another record")
        SigningKey.objects.filter(pk=row.pk, rotation="").update(rotation=text)
        row.refresh_from_db()
    return row


def rotation_records() -> list[dict]:
    """Every rotation record the database holds (trust comes from their signatures)."""
    import json

    rows = SigningKey.objects.exclude(rotation="").order_by("created_at", "id")
    records = []
    for text in rows.values_list("rotation", flat=True):
        try:
            record = json.loads(text)
        except ValueError:
            continue  # not a record at all: it can link no key
        if isinstance(record, dict):
            records.append(record)
    return records


def trusted_keys(extra_rotations: list[dict] | None = None) -> proof.KeyRing:
    """The keys Bridge's own verification trusts: the key it signs with, and every key a
    rotation record signed by both links to it."""
    return proof.KeyRing.build(
        [audit_signing_key().public], [*rotation_records(), *(extra_rotations or [])]
    )


def check_signing_key_at_startup() -> None:
    """Production refuses to start on a missing, unreadable or shared key file."""
    if settings.PRODUCTION and settings.ENABLE_AUDIT_LOGGING:
        read_key_file(Path(settings.AUDIT_SIGNING_KEY_FILE))
