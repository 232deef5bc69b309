"""Personal data in the audit trail (hash version 2): sealing it under the data subject's key,
reading it back, and the blind indexes that keep exact search working.

An event recorded for an authenticated actor keeps no personal data in its plain columns: the
actor's username, the client IP and the detail keys listed in AUDIT_PERSONAL_DETAIL_KEYS (found
at any depth of the details, request bodies included) are moved into `personal`, one AES-256-GCM
ciphertext of the canonical JSON `{"actor_username", "client_ip", "details"}` under the
actor's own subject key (`security.crypto`, purpose "audit-personal", subject id = username, the
subject id convention). The chain hashes that ciphertext, so destroying the subject's key
(`shred_subject_key`) erases the data and leaves every hash as it was: the events stay, the
chain verifies, and the subject's personal data reads as erased.

Anonymous events (no actor) keep their client IP in the plain column: an address that probed
the login form has no data subject whose key could seal it, and security forensics ("what did
this address do") is a legitimate interest (GDPR Art. 6(1)(f), Recital 49) that the retention
period bounds. Their personal detail keys are sealed under the subject the event names (a
`subject_id` among them, e.g. a request about that subject), so erasing that subject erases
them too; with no subject named they stay as recorded (there is nobody to erase them for).

Two keyed blind indexes keep exact search working on sealed events:

- `actor_index`: HMAC-SHA256 of the username under a key derived from the subject's own key
  material. Only someone holding that subject's live key can compute it, so once the key is
  destroyed nothing, not even Bridge, can link the index back to the username: the erased
  subject's events can no longer be found by name.
- `ip_index`: HMAC-SHA256 of the normalised address under a Bridge-wide key derived from a data
  key of its own (purpose "audit-ip-index", wrapped by the master key, kept across master key
  rotations and, per version, across data key rotations). It is pseudonymous, not anonymous:
  anyone holding that key can test every IPv4 address, and erasing a subject does not change
  it (it must match across subjects to find what one address did). It never leaves Bridge
  with the data it indexes in clear.

Readers of events (the console, the API, reports, DSR exports) call `reveal` or a `Revealer`
instead of reading `actor_username`, `client_ip` and `details` directly: version 1 rows keep
those in their plain columns, version 2 rows in the sealed `personal` column.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from compliance.proof import canonical_json
from security import crypto
from security.models import DataKey, SubjectKey, WrappedKey

if TYPE_CHECKING:
    from compliance.models import AuditEvent

log = logging.getLogger(__name__)

ERASED = "[erased]"
# Shown instead of an actor whose sealed data cannot be read for another reason than erasure:
# an altered ciphertext, a key Bridge does not have. Never taken for an erasure.
UNREADABLE = "[unreadable]"

PURPOSE = "audit-personal"
IP_INDEX_PURPOSE = "audit-ip-index"
# What each ciphertext is bound to (AES-GCM associated data): a ciphertext of another purpose
# or field under the same subject's key does not pass for an event's personal data.
CONTEXT = "compliance.auditevent.personal"
_ACTOR_INDEX_LABEL = b"bridge.audit.actor-index.v1"
_IP_INDEX_LABEL = b"bridge.audit.ip-index.v1"

# How long a process keeps a subject's unwrapped key for sealing new events. Recording runs on
# every request, and reading the key row each time would add a database round trip to each one.
# Only sealing uses this cache, never reading: after `shred_subject_key`, another process may
# seal an event for that subject for up to this long with the destroyed key, and that event is
# unreadable like the subject's earlier ones. The key stays in that process's memory as long.
WRITE_KEY_SECONDS = 60
_CACHE_LIMIT = 10_000
SUBJECT_ID_MAX = 128


# --- Subject ids and details --------------------------------------------------------------


def is_subject_id(value: Any) -> bool:
    """A valid data subject id: text of 1-128 characters with no control characters."""
    return isinstance(value, str) and 0 < len(value) <= SUBJECT_ID_MAX and value.isprintable()


@functools.cache
def _lowered(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(str(name).strip().lower() for name in names if str(name).strip())


def personal_detail_keys() -> frozenset[str]:
    """AUDIT_PERSONAL_DETAIL_KEYS, lower-cased (keys match case-insensitively)."""
    return _lowered(tuple(settings.AUDIT_PERSONAL_DETAIL_KEYS))


_NOTHING: Any = object()


def split_details(value: Any, keys: frozenset[str]) -> tuple[Any, Any]:
    """(`value` without its personal keys, the personal part or None).

    The personal part mirrors the structure it was taken from: a dict holds the personal keys
    with their whole values, and the containers on the way to deeper ones; a list holds one
    item per item (None where that item held nothing personal). `merge_details` puts it back.
    """
    plain, personal = _split(value, keys)
    return plain, (None if personal is _NOTHING else personal)


def _split(value: Any, keys: frozenset[str]) -> tuple[Any, Any]:
    if isinstance(value, dict):
        plain: dict = {}
        personal: dict = {}
        for key, item in value.items():
            if isinstance(key, str) and key.lower() in keys:
                personal[key] = item
                continue
            kept, taken = _split(item, keys)
            plain[key] = kept
            if taken is not _NOTHING:
                personal[key] = taken
        return plain, (personal if personal else _NOTHING)
    if isinstance(value, list):
        kept_items, taken_items, found = [], [], False
        for item in value:
            kept, taken = _split(item, keys)
            kept_items.append(kept)
            if taken is _NOTHING:
                taken_items.append(None)
            else:
                taken_items.append(taken)
                found = True
        return kept_items, (taken_items if found else _NOTHING)
    return value, _NOTHING


def merge_details(plain: Any, personal: Any) -> Any:
    """`plain` with the personal part `split_details` took out of it put back."""
    if isinstance(personal, dict) and isinstance(plain, dict):
        for key, item in personal.items():
            # A key the plain side lacks was taken whole; one it has was a way to deeper ones.
            plain[key] = merge_details(plain[key], item) if key in plain else item
        return plain
    if isinstance(personal, list) and isinstance(plain, list):
        for index, item in enumerate(personal[: len(plain)]):
            if item is not None:
                plain[index] = merge_details(plain[index], item)
        return plain
    return plain


def _named_subject(personal: Any) -> str | None:
    """The first valid `subject_id` in the personal part of anonymous details, depth first."""
    if isinstance(personal, dict):
        for key, item in personal.items():
            if isinstance(key, str) and key.lower() == "subject_id" and is_subject_id(item):
                return item
        items = personal.values()
    elif isinstance(personal, list):
        items = personal
    else:
        return None
    for item in items:
        if isinstance(item, dict | list):
            found = _named_subject(item)
            if found:
                return found
    return None


def normal_ip(value: str) -> str:
    """An address as the index hashes it (IPv6 compressed, IPv4 dotted), else as given."""
    try:
        return ipaddress.ip_address(value.strip()).compressed
    except ValueError:
        return value


# --- Keys ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aad(key_id: str) -> bytes:
    # security.crypto's associated data for a ciphertext of key `key_id` bound to CONTEXT, so
    # `crypto.decrypt(personal, context=CONTEXT)` reads what this module seals (a test holds
    # them equal): the ciphertexts are ordinary Bridge ciphertexts.
    return f"bridge.data.v1|{key_id}|{CONTEXT}".encode()


def _key_bytes(row: WrappedKey) -> bytes:
    """A live key row's key material (crypto.CryptoError if it does not unwrap)."""
    if row.destroyed_at is not None or not row.wrapped:
        raise crypto.KeyDestroyed("the key of this ciphertext was destroyed")
    return crypto.unwrap(
        key_id=row.key_id,
        purpose=row.purpose,
        subject_id=row.subject_id,
        master_key_id=row.master_key_id,
        wrapped=row.wrapped,
    )


def _derived(key: bytes, label: bytes) -> bytes:
    # A key of its own for each index, never the encryption key itself.
    return hmac.new(key, label, hashlib.sha256).digest()


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class _SubjectSealer:
    """A subject's current audit key, unwrapped, and their actor index under it."""

    key_id: str
    cipher: AESGCM
    actor_index: str
    expires: float
    master: object

    def encrypt(self, text: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self.cipher.encrypt(nonce, text.encode("utf-8"), _aad(self.key_id))
        return f"v1.{self.key_id}.{_b64(nonce)}.{_b64(sealed)}"


@dataclass(frozen=True)
class _IpIndexer:
    index_key: bytes
    expires: float
    master: object
    # Addresses already indexed under this key: requests come from few addresses at a time,
    # and parsing and hashing each again was a third of the cost of sealing an event.
    known: dict[str, str] = field(default_factory=dict)

    def index(self, ip: str) -> str:
        found = self.known.get(ip)
        if found is None:
            if len(self.known) >= _CACHE_LIMIT:
                self.known.clear()
            found = self.known[ip] = _mac(self.index_key, normal_ip(ip))
        return found


_lock = threading.Lock()
_sealers: dict[str, _SubjectSealer] = {}
_ip_indexers: list[_IpIndexer] = []


def forget_keys(subject_id: str | None = None) -> None:
    """Drop this process's cached sealing keys: one subject's (call it after shredding that
    subject's key in this process), or all. `security.crypto.forget_keys()` (tests, a master
    key change) drops them too: each entry remembers the master key it was made under."""
    with _lock:
        if subject_id is None:
            _sealers.clear()
            _ip_indexers.clear()
        else:
            _sealers.pop(subject_id, None)


def _remember(cache_put: Any) -> None:
    # A key made or read inside the caller's transaction is only known to exist once that
    # transaction commits: cached then, never if it rolls back (the key row with it).
    if connection.in_atomic_block:
        transaction.on_commit(cache_put)
    else:
        cache_put()


def _sealer(subject_id: str) -> _SubjectSealer:
    master = crypto.master_key()
    found = _sealers.get(subject_id)
    if found is not None and found.master is master and found.expires > time.monotonic():
        return found
    row = crypto.current_key(purpose=PURPOSE, subject_id=subject_id)
    key = _key_bytes(row)
    sealer = _SubjectSealer(
        key_id=row.key_id,
        cipher=AESGCM(key),
        actor_index=_mac(_derived(key, _ACTOR_INDEX_LABEL), subject_id),
        expires=time.monotonic() + WRITE_KEY_SECONDS,
        master=master,
    )

    def put() -> None:
        with _lock:
            if len(_sealers) >= _CACHE_LIMIT:
                _sealers.clear()  # a bound, not a policy
            _sealers[subject_id] = sealer

    _remember(put)
    return sealer


def _ip_indexer() -> _IpIndexer:
    master = crypto.master_key()
    found = _ip_indexers[0] if _ip_indexers else None
    if found is not None and found.master is master and found.expires > time.monotonic():
        return found
    row = crypto.current_key(purpose=IP_INDEX_PURPOSE)
    indexer = _IpIndexer(
        index_key=_derived(_key_bytes(row), _IP_INDEX_LABEL),
        expires=time.monotonic() + settings.DATA_KEY_CACHE_SECONDS,
        master=master,
    )

    def put() -> None:
        with _lock:
            _ip_indexers[:] = [indexer]

    _remember(put)
    return indexer


def ip_index(ip: str) -> str:
    """The blind index of a client IP (under the current IP index key)."""
    return _ip_indexer().index(ip)


# --- Sealing an event ---------------------------------------------------------------------


@dataclass(frozen=True)
class SealedEvent:
    """What an event's columns hold once its personal data is sealed."""

    actor_username: str
    client_ip: str | None
    details: Any
    personal: str = ""
    actor_index: str = ""
    ip_index: str = ""


def seal_event(*, actor_username: str, client_ip: str | None, details: Any) -> SealedEvent:
    """Move an event's personal data into its sealed column (see the module's docstring).

    `details` are already redacted (JSON-ready). Called for every event while
    AUDIT_PERSONAL_DATA is on; runs on every request, so the subject's key and the IP index
    key are cached for a short while (WRITE_KEY_SECONDS, DATA_KEY_CACHE_SECONDS).
    """
    keys = personal_detail_keys()
    plain, taken = split_details(details, keys) if keys else (details, None)
    if actor_username:
        if not is_subject_id(actor_username):
            # No key can be made for it (subject ids are at most 128 characters): recorded as
            # before, in the plain columns, rather than not at all.
            log.warning(
                "audit actor name of %d characters is not a valid data subject id: its "
                "personal data is recorded unsealed",
                len(actor_username),
            )
            return SealedEvent(actor_username, client_ip, details)
        sealer = _sealer(actor_username)
        payload = {"actor_username": actor_username, "client_ip": client_ip, "details": taken or {}}
        return SealedEvent(
            actor_username="",
            client_ip=None,
            details=plain,
            personal=sealer.encrypt(canonical_json(payload)),
            actor_index=sealer.actor_index,
            ip_index=ip_index(client_ip) if client_ip else "",
        )
    subject = _named_subject(taken) if taken is not None else None
    if subject is None:
        return SealedEvent("", client_ip, details)
    payload = {"actor_username": "", "client_ip": None, "details": taken}
    return SealedEvent(
        actor_username="",
        client_ip=client_ip,
        details=plain,
        personal=_sealer(subject).encrypt(canonical_json(payload)),
    )


# --- Search -------------------------------------------------------------------------------


def _live_keys(model: type[WrappedKey], purpose: str, subject_id: str) -> list[bytes]:
    """Key material of every live version of a purpose's (and subject's) key. Read-only: a
    search never makes a key, so searching for an erased subject does not bring one back."""
    rows = model.objects.filter(
        purpose=purpose, subject_id=subject_id, destroyed_at__isnull=True
    ).exclude(wrapped="")
    found = []
    for row in rows.order_by("version"):
        try:
            found.append(_key_bytes(row))
        except crypto.CryptoError:
            log.error("audit search: key %s does not unwrap; its events are not found", row.key_id)
    return found


def actor_indexes(username: str) -> list[str]:
    """The actor index of `username` under each live version of their audit key (none once
    erased)."""
    if not is_subject_id(username):
        return []
    return [
        _mac(_derived(key, _ACTOR_INDEX_LABEL), username)
        for key in _live_keys(SubjectKey, PURPOSE, username)
    ]


def ip_indexes(ip: str) -> list[str]:
    """The blind index of an IP under each version of the IP index key (rotations keep the
    older versions, and the events indexed with them)."""
    value = normal_ip(ip)
    return [
        _mac(_derived(key, _IP_INDEX_LABEL), value)
        for key in _live_keys(DataKey, IP_INDEX_PURPOSE, "")
    ]


def actor_match(username: str) -> Q:
    """Events whose actor is exactly `username`: sealed ones by their blind index, version 1
    (and unsealable) ones by the plain column."""
    match = Q(actor_username=username)
    indexes = actor_indexes(username)
    return match | Q(actor_index__in=indexes) if indexes else match


def ip_match(ip: str) -> Q:
    """Events from exactly the address `ip`: by blind index where it is sealed, by the plain
    column elsewhere (anonymous events, version 1 events)."""
    value = normal_ip(ip)
    match = Q(client_ip=value)
    indexes = ip_indexes(value)
    return match | Q(ip_index__in=indexes) if indexes else match


# --- Reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revealed:
    """An event's personal data as a reader may show it.

    `erased`: the subject's key was destroyed (the actor reads ERASED when the actor was the
    sealed subject). `problem`: why sealed data could not be read although not erased (an
    altered ciphertext, a key Bridge lacks); the actor then reads UNREADABLE. Both are never
    set together.
    """

    actor_username: str
    client_ip: str | None
    details: dict = field(default_factory=dict)
    erased: bool = False
    problem: str = ""


def _details_of(details: dict | str | None) -> Any:
    if isinstance(details, str):
        return json.loads(details or "{}")
    # A copy: the sealed part is merged into it, and the caller's dict stays as it was.
    return copy.deepcopy(details) if details else {}


class Revealer:
    """Reads sealed personal data, keeping each subject key it unwraps for its own lifetime:
    make one per page, report or export (a million rows of a few actors unwrap a few keys),
    not one per process, so an erasure is seen by the next batch."""

    def __init__(self) -> None:
        self._ciphers: dict[str, AESGCM | crypto.CryptoError] = {}

    def _cipher(self, key_id: str) -> AESGCM:
        found = self._ciphers.get(key_id)
        if found is None:
            try:
                found = self._load(key_id)
            except crypto.CryptoError as exc:
                found = exc
                if not isinstance(exc, crypto.KeyDestroyed):
                    # Once per key and batch: a missing master key would otherwise log a line
                    # for every one of a million rows.
                    log.error("audit personal data under key %s is unreadable: %s", key_id, exc)
            if len(self._ciphers) >= _CACHE_LIMIT:
                self._ciphers.clear()
            self._ciphers[key_id] = found
        if isinstance(found, crypto.CryptoError):
            raise found
        return found

    @staticmethod
    def _load(key_id: str) -> AESGCM:
        row = crypto.find_key(key_id)
        if row is None:
            raise crypto.CryptoError("the ciphertext names a key Bridge does not have")
        if row.purpose != PURPOSE:
            raise crypto.CryptoError("the ciphertext names a key of another purpose")
        return AESGCM(_key_bytes(row))

    def open(self, personal: str) -> dict:
        """The sealed payload; crypto.KeyDestroyed once erased, crypto.CryptoError (or
        ValueError) when altered."""
        key_id = crypto.key_id_of(personal)
        _, _, nonce_text, sealed_text = personal.split(".")
        try:
            nonce, sealed = _unb64(nonce_text), _unb64(sealed_text)
        except ValueError as exc:
            raise crypto.MalformedCiphertext("the ciphertext is not base64url") from exc
        if len(nonce) != 12 or len(sealed) < 16:
            raise crypto.MalformedCiphertext("the ciphertext is too short")
        cipher = self._cipher(key_id)
        try:
            plaintext = cipher.decrypt(nonce, sealed, _aad(key_id))
        except InvalidTag as exc:
            raise crypto.CryptoError("the ciphertext was altered, or moved from elsewhere") from exc
        payload = json.loads(plaintext)
        if not isinstance(payload, dict) or not isinstance(payload.get("details", {}), dict):
            raise ValueError("the sealed personal data is not an event's")
        return payload

    def reveal(
        self,
        *,
        actor_username: str,
        client_ip: str | None,
        personal: str,
        details: dict | str | None,
        actor_index: str | None = None,
        hash_version: int | None = None,
        event_id: int | None = None,
    ) -> Revealed:
        """The actor, client IP and details of an event row, personal data included where it
        can still be read.

        `actor_index` (when the reader has it) tells whether the actor was the sealed subject,
        so an anonymous event whose details were sealed under a named subject is not shown
        with an erased actor; without it, a sealed event without a plain actor is taken to
        have had one. `hash_version` (when known): a version 1 seal never covered sealed
        data, so any found on such an event was put there afterwards and is not shown.
        """
        plain = _details_of(details)
        if not personal:
            return Revealed(actor_username, client_ip, plain)
        actor_sealed = bool(actor_index) if actor_index is not None else not actor_username
        try:
            if hash_version == 1:
                raise crypto.CryptoError("sealed data on a version 1 event, which never has any")
            payload = self.open(personal)
        except crypto.KeyDestroyed:
            return Revealed(
                ERASED if actor_sealed else actor_username,
                None if actor_sealed else client_ip,
                plain,
                erased=True,
            )
        except (crypto.CryptoError, ValueError, TypeError, AttributeError) as exc:
            code = getattr(exc, "code", "malformed_personal_data")
            # Loud, whatever the batch: an altered row is not an erased one.
            log.error("AUDIT PERSONAL DATA UNREADABLE for event %s (%s): %s", event_id, code, exc)
            return Revealed(
                UNREADABLE if actor_sealed else actor_username,
                None if actor_sealed else client_ip,
                plain,
                problem=code,
            )
        return Revealed(
            payload.get("actor_username") or actor_username,
            payload.get("client_ip") or client_ip,
            merge_details(plain, payload.get("details") or {}),
        )

    def event(self, event: AuditEvent) -> Revealed:
        """`reveal` of an AuditEvent instance (its seal's hash version is used when the seal
        was loaded with it, as the console and the API do)."""
        seal = event._state.fields_cache.get("seal") if hasattr(event, "_state") else None
        return self.reveal(
            actor_username=event.actor_username,
            client_ip=event.client_ip,
            personal=event.personal,
            details=event.details,
            actor_index=event.actor_index,
            hash_version=seal.hash_version if seal is not None else None,
            event_id=event.pk,
        )


def reveal(
    *,
    actor_username: str,
    client_ip: str | None,
    personal: str,
    details: dict | str | None,
    actor_index: str | None = None,
    hash_version: int | None = None,
) -> Revealed:
    """The actor, client IP and details of one event row (see `Revealer.reveal`); `erased`
    when the subject's key was destroyed. Never raises for erased or altered data. For many
    rows, use one `Revealer`: it unwraps each subject key once."""
    return Revealer().reveal(
        actor_username=actor_username,
        client_ip=client_ip,
        personal=personal,
        details=details,
        actor_index=actor_index,
        hash_version=hash_version,
    )


def revealed(event: AuditEvent) -> Revealed:
    """`Revealer().event(event)`: one event's personal data as a reader may show it."""
    return Revealer().event(event)
