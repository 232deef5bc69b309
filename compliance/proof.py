"""What proves the audit trail intact, with the standard library and `cryptography` only.

The hash of an event, the signed checkpoints that anchor the chain outside the database, the
key rotation records that carry trust from one signing key to the next, and the walk that
checks a chain against all of them. Bridge's own verification and the offline verifier
(`python -m compliance.verify_export`) both run this code, so an auditor on a machine the
operator does not control gets the same verdict, naming the same seq, as the API. No Django
here: nothing in this module may import it.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS_HASH = "0" * 64
_HASHED_FIELDS = (
    "id",
    "seq",
    "occurred_at",
    "actor_id",
    "actor_username",
    "client_ip",
    "request_id",
    "action",
    "object_type",
    "object_id",
    "method",
    "path",
    "status_code",
    "latency_ms",
    "details",
    "prev_hash",
)
# Version 2 (personal data sealed under the data subject's key, compliance.personal): the
# ciphertext and the two blind indexes join every column version 1 covers. The plain actor and
# client IP stay covered: they are blank where the personal data is sealed, and hold the values
# of an anonymous event (its client IP) or of an event recorded before the switch, so no column
# of any row escapes the hash whichever way it was written.
_PERSONAL_FIELDS = (
    *_HASHED_FIELDS[:-1],
    "personal",
    "actor_index",
    "ip_index",
    "prev_hash",
)
# The fields each hash version covers; every seal keeps the version it was made with, and
# verification recomputes each seal with its own, so old seals stay valid. From version 2 on the
# version number itself is hashed too.
HASH_VERSIONS: dict[int, tuple[str, ...]] = {1: _HASHED_FIELDS, 2: _PERSONAL_FIELDS}
# The version that seals personal data; the newest there is.
PERSONAL_HASH_VERSION = 2
CURRENT_HASH_VERSION = PERSONAL_HASH_VERSION
# Every column of an event any version hashes (the seal supplies seq and prev_hash), in the
# order of their first appearance.
EVENT_FIELDS = tuple(
    dict.fromkeys(
        name
        for version in sorted(HASH_VERSIONS)
        for name in HASH_VERSIONS[version]
        if name not in ("seq", "prev_hash")
    )
)
# The columns that hold an event's sealed personal data: a row with any of them set is sealed
# with a version that covers them (never version 1).
PERSONAL_COLUMNS = ("personal", "actor_index", "ip_index")
# A row as verification reads it: the seal's columns, then the event's.
ROW_COLUMNS = ("seq", "prev_hash", "hash", "hash_version", *EVENT_FIELDS)
_ID_AT = ROW_COLUMNS.index("id")

# Domain separation: a checkpoint signature can never pass for a rotation's, or the reverse.
CHECKPOINT_CONTEXT = b"bridge.audit.checkpoint.v1\n"
PURGE_CONTEXT = b"bridge.audit.purge.v1\n"
ROTATION_CONTEXT = b"bridge.audit.key-rotation.v1\n"


class UnknownHashVersion(ValueError):
    """A seal names a hash version this code does not know (forged, or from newer code)."""


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


# --- Event hashes -------------------------------------------------------------------------

_encode_text = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses


def json_value(value: Any) -> str:
    # The canonical_json spelling of one value of an event row (str, int, float or None).
    if value is None:
        return "null"
    if isinstance(value, str):
        return _encode_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not JSON")
        return float.__repr__(value)
    raise TypeError(f"{type(value).__name__} in an audit row")


def row_canonical(version: int, columns: tuple[str, ...]) -> Callable[[tuple], str]:
    """A function giving the canonical JSON an event's hash covers, for a row in `columns` order.

    `occurred_at` must already be ISO text in UTC (`compliance.audit.iso()`, or PostgreSQL's
    `to_char`, see verification). The same text as `compliance.chain.event_hash` builds (a
    test holds them equal on generated rows): it is joined from precomputed key prefixes in
    sorted order, instead of building, sorting and encoding a dict for each of a million events.
    """
    names = HASH_VERSIONS.get(version)
    if names is None:
        raise UnknownHashVersion(version)
    keys = sorted([*names, "hash_version"] if version > 1 else names)
    position = {name: index for index, name in enumerate(columns)}
    prefixes = [("{" if n == 0 else ",") + _encode_text(key) + ":" for n, key in enumerate(keys)]
    steps = list(zip(prefixes, [position.get(key, -1) for key in keys], strict=True))
    time_at = position["occurred_at"]
    version_text = str(version)
    value_text = json_value

    def canonical(row: tuple) -> str:
        parts = []
        append = parts.append
        for prefix, index in steps:
            append(prefix)
            if index == time_at:
                append('"' + row[index] + '"')
            elif index < 0:
                append(version_text)
            else:
                append(value_text(row[index]))
        append("}")
        return "".join(parts)

    return canonical


def row_hasher(version: int, columns: tuple[str, ...] = ROW_COLUMNS) -> Callable[[tuple], str]:
    """The SHA-256 hex of a row's canonical JSON (see `row_canonical`)."""
    canonical, sha256 = row_canonical(version, columns), hashlib.sha256
    return lambda row: sha256(canonical(row).encode("utf-8")).hexdigest()


# --- The export's event lines ----------------------------------------------------------------

# An event line of an export holds the exact bytes its hash covers, so that the offline verifier
# hashes them without parsing and re-encoding them (and an auditor can check one event by hand):
# {"type":"event","seq":S,"prev_hash":"P","hash":"H","hash_version":V,"event":<canonical JSON>}
_EVENT_LINE = re.compile(
    r'\{"type":"event","seq":([0-9]{1,18}),"prev_hash":"([0-9a-f]{64})","hash":"([0-9a-f]{64})",'
    r'"hash_version":([0-9]{1,5}),"event":'
)


def event_line(seq: int, prev_hash: str, hash_: str, version: int, canonical: str) -> str:
    return (
        f'{{"type":"event","seq":{int(seq)},"prev_hash":"{prev_hash}","hash":"{hash_}",'
        f'"hash_version":{int(version)},"event":{canonical}}}\n'
    )


def parse_event_line(line: str) -> tuple | None:
    """(seq, prev_hash, hash, hash_version, event id, canonical text) of an event line, or
    None when the line is not in that exact layout. The seq and prev_hash inside the event
    must be the line's: they are what its hash covers."""
    match = _EVENT_LINE.match(line)
    if match is None or (not line.endswith("}\n") and not line.endswith("}")):
        return None
    canonical = line[match.end() : len(line) - (2 if line.endswith("\n") else 1)]
    seq, prev_hash = int(match.group(1)), match.group(2)
    # Keys are sorted and any quote inside a string is escaped, so these spellings can only be
    # the keys themselves.
    holds_seq = f',"seq":{seq},' in canonical or canonical.endswith(f',"seq":{seq}}}')
    if not holds_seq or f',"prev_hash":"{prev_hash}",' not in canonical:
        prev_hash = ""  # reported as a broken link at this seq
    at = canonical.find(',"id":')
    end = canonical.find(",", at + 6)
    event_id = canonical[at + 6 : end] if at >= 0 else ""
    return (
        seq,
        prev_hash,
        match.group(3),
        int(match.group(4)),
        int(event_id) if re.fullmatch(r"[0-9]{1,18}", event_id) else None,
        canonical,
    )


def text_hasher(version: int) -> Callable[[tuple], str]:
    """The hash of a row whose last item is the canonical text itself.

    The text is hashed as it is, whatever version its line names; so that the version an
    export line names can be trusted too, a text that carries another version than its label
    (from version 2 on the version is one of the hashed keys, version 1 has none) hashes to
    nothing, and its event is reported as not matching its hash. Keys are sorted and quotes
    inside strings escaped, so `,"hash_version":` can only be the key itself.
    """
    sha256 = hashlib.sha256
    key = ',"hash_version":'
    label = f"{key}{int(version)}," if version > 1 else None

    def hasher(row: tuple) -> str:
        text = row[-1]
        if (label not in text) if label is not None else (key in text):
            return ""
        return sha256(text.encode("utf-8")).hexdigest()

    return hasher


# --- Keys ---------------------------------------------------------------------------------


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    return "ed25519:" + hashlib.sha256(public_bytes(key)).hexdigest()[:16]


def public_key_text(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_bytes(key)).decode("ascii")


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(data: bytes | str) -> Ed25519PublicKey:
    """A public key from PEM, or from the base64 of its 32 raw bytes. ValueError otherwise."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    if raw.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(raw)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except ValueError as exc:
        raise ValueError("neither PEM nor base64") from exc
    if len(decoded) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(decoded)


def _signature(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def verifies(key: Ed25519PublicKey, signature: Any, message: bytes) -> bool:
    if not isinstance(signature, str):
        return False
    try:
        key.verify(_signature(signature), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def purge_message(statement: dict[str, Any]) -> bytes:
    """The bytes a purge's signature covers: its statement (range, count, anchor) as canonical
    JSON, under a context of its own so it can never pass for a checkpoint's."""
    return PURGE_CONTEXT + canonical_json(statement).encode("utf-8")


# --- Checkpoints --------------------------------------------------------------------------


def checkpoint_message(record: dict[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers: every field but the signature."""
    unsigned = {key: value for key, value in record.items() if key != "signature"}
    return CHECKPOINT_CONTEXT + canonical_json(unsigned).encode("utf-8")


def sign_checkpoint(payload: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The payload as a checkpoint record, with `type` and its signature added."""
    record = {"type": "checkpoint", **payload}
    signature = private_key.sign(checkpoint_message(record))
    return {**record, "signature": base64.b64encode(signature).decode("ascii")}


def waypoint_seqs(previous_seq: int, seq: int, count: int) -> list[int]:
    """Which seqs in (previous_seq, seq] a checkpoint signs the hash of: all of them when there
    are at most `count`, otherwise `count` evenly spaced ones ending at `seq`. A rewrite is
    then named to the exact seq, or to within (seq - previous_seq) / count of it."""
    span = seq - previous_seq
    if span <= 0:
        return [seq] if seq > 0 else []
    if span <= count:
        return list(range(previous_seq + 1, seq + 1))
    return sorted({previous_seq + math.ceil(k * span / count) for k in range(1, count + 1)})


# --- Key rotation -------------------------------------------------------------------------


def rotation_message(record: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in record.items() if k not in ("signature_old", "signature_new")}
    return ROTATION_CONTEXT + canonical_json(unsigned).encode("utf-8")


def sign_rotation(
    old: Ed25519PrivateKey, new: Ed25519PrivateKey, time: str, reason: str = ""
) -> dict[str, Any]:
    """A rotation record signed by both keys: whoever trusts either one can trust the other,
    and nobody holding neither can add a key to the ring."""
    old_public, new_public = old.public_key(), new.public_key()
    record = {
        "type": "key_rotation",
        "time": time,
        "old_key_id": key_id_of(old_public),
        "old_public_key": public_key_text(old_public),
        "new_key_id": key_id_of(new_public),
        "new_public_key": public_key_text(new_public),
        "reason": reason,
    }
    message = rotation_message(record)
    return {
        **record,
        "signature_old": base64.b64encode(old.sign(message)).decode("ascii"),
        "signature_new": base64.b64encode(new.sign(message)).decode("ascii"),
    }


@dataclass
class KeyRing:
    """The public keys a verification trusts: its roots (the key Bridge signs with, or the key
    an auditor pinned), plus every key joined to a trusted one by a rotation record signed by
    both. A key that only an unsigned or half-signed record names is not trusted."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, roots: Iterable[Ed25519PublicKey], rotations: Iterable[dict[str, Any]]
    ) -> KeyRing:
        ring = cls({key_id_of(key): key for key in roots})
        valid: list[tuple[str, Ed25519PublicKey, str, Ed25519PublicKey]] = []
        for record in rotations:
            try:
                old = load_public_key(record["old_public_key"])
                new = load_public_key(record["new_public_key"])
                ids_match = (
                    key_id_of(old) == record["old_key_id"]
                    and key_id_of(new) == record["new_key_id"]
                )
                message = rotation_message(record)
                signed = verifies(old, record["signature_old"], message) and verifies(
                    new, record["signature_new"], message
                )
            except (KeyError, TypeError, ValueError, AttributeError):
                ids_match = signed = False
            if ids_match and signed:
                valid.append((record["old_key_id"], old, record["new_key_id"], new))
            else:
                name = record.get("new_key_id", "?") if isinstance(record, dict) else "?"
                ring.problems.append(
                    f"the rotation record to key {name} is not signed by both of its keys"
                )
        grew = True
        while grew:
            grew = False
            for old_id, old, new_id, new in valid:
                if old_id in ring.keys and new_id not in ring.keys:
                    ring.keys[new_id] = new
                    grew = True
                elif new_id in ring.keys and old_id not in ring.keys:
                    ring.keys[old_id] = old
                    grew = True
        return ring


class CheckpointCopy(NamedTuple):
    """One copy of a checkpoint: from a sink (`source` is the sink's name), or the database's
    row (`source` is DATABASE, `written_to` the sinks Bridge recorded writing it to)."""

    number: int
    record: Any
    source: str
    written_to: tuple[str, ...] = ()


DATABASE = "database"


class Anchor(NamedTuple):
    seq: int
    hash: str
    checkpoint: int


@dataclass(frozen=True)
class Problem:
    """What verification found wrong: the first seq it concerns (None when no event is named),
    the event id where one is known, the checkpoint proving it, and why."""

    reason: str
    seq: int | None = None
    event_id: int | None = None
    checkpoint: int | None = None


class CheckpointReview:
    """Checks every copy of every checkpoint, then yields the hashes they sign as anchors.

    Each copy must be a record of its own number carrying a signature of a trusted key; copies
    of one number must be identical; checkpoint N must name checkpoint N-1's signature (no gap,
    no reordering); every sink must hold every checkpoint from its first to its newest, and
    every one the database recorded writing to it. Only checkpoints found in a sink with a good
    signature count: a database row is the operator's own copy, which an insider can write to.

    `copies` is called twice (checking, then anchoring) and must give the copies of all
    sources sorted by number each time (`merge_by_number`), so memory stays constant however
    many checkpoints there are. Anchoring stops at the newest number the check saw.
    """

    def __init__(
        self,
        copies: Callable[[], Iterable[CheckpointCopy]],
        *,
        sinks: Iterable[str],
        ring: KeyRing,
        first_number: int | None = 1,
    ) -> None:
        self._copies = copies
        self._sinks = tuple(sinks)
        self._ring = ring
        self._first = first_number
        self.problems: list[Problem] = [Problem(reason) for reason in ring.problems]
        self.count = 0
        self.newest: dict[str, Any] | None = None
        self.first: dict[str, Any] | None = None
        self._rejected: set[int] = set()
        self._last_number = 0
        self._review()

    def _note(self, number: int, record: Any, reason: str) -> None:
        seq = record.get("seq") if isinstance(record, dict) else None
        if len(self.problems) < 50:
            self.problems.append(
                Problem(reason, seq=seq if isinstance(seq, int) else None, checkpoint=number)
            )

    def _invalid(self, copy: CheckpointCopy) -> str | None:
        """Why a copy is not a checkpoint Bridge signed (None: it is)."""
        record = copy.record
        if not isinstance(record, dict):
            return "not a checkpoint record"
        if record.get("number") != copy.number:
            return f"its record is numbered {record.get('number')!r}"
        key_id = record.get("key_id")
        key = self._ring.keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            return f"signed by key {key_id!r}, which is not trusted"
        try:
            message = checkpoint_message(record)
        except (TypeError, ValueError):
            return "not canonical JSON"
        if not verifies(key, record.get("signature"), message):
            return "its signature does not verify (forged or altered)"
        if not isinstance(record.get("seq"), int) or not isinstance(record.get("hash"), str):
            return "it lacks a seq or a hash"
        return None

    def _valid_copy(self, group: list[CheckpointCopy]) -> CheckpointCopy | None:
        """The first copy from a sink that is a checkpoint Bridge signed (None: none is)."""
        for copy in group:
            if copy.source != DATABASE and self._invalid(copy) is None:
                return copy
        return None

    def _review(self) -> None:
        previous: dict[str, Any] | None = None
        previous_number: int | None = None
        held: dict[str, list[int]] = {sink: [] for sink in self._sinks}
        for number, group in _grouped(self._copies()):
            self._last_number = max(self._last_number, number)
            in_sinks: set[str] = set()
            written_to: set[str] = set()
            for copy in group:
                written_to.update(copy.written_to)
                problem = self._invalid(copy)
                if problem:
                    where = "the database" if copy.source == DATABASE else f"sink {copy.source}"
                    self._note(number, copy.record, f"checkpoint #{number} in {where}: {problem}")
                elif copy.source != DATABASE:
                    in_sinks.add(copy.source)
            valid = self._valid_copy(group)
            record = valid.record if valid else group[0].record
            if len({_text(copy.record) for copy in group}) > 1:
                sources = ", ".join(sorted({copy.source for copy in group}))
                self._note(number, record, f"the copies of checkpoint #{number} differ ({sources})")
            for sink in self._sinks:
                if sink in in_sinks:
                    held[sink].append(number)
                elif sink in written_to:
                    self._note(
                        number,
                        record,
                        f"checkpoint #{number} is missing from sink {sink}, where it was written",
                    )
            if valid is None:
                # Not in any sink with a good signature (waiting to be written, or forged): it
                # anchors nothing and is no link of the checkpoint chain.
                self._rejected.add(number)
                continue
            self.count += 1
            self.first = self.first or record
            expected = self._first if previous_number is None else previous_number + 1
            if expected is not None and number != expected:
                self._note(
                    number,
                    record,
                    f"checkpoint(s) #{expected}..#{number - 1} are missing before #{number}",
                )
            elif previous is not None and record.get("prev_signature") != previous.get("signature"):
                self._note(
                    number,
                    record,
                    f"checkpoint #{number} does not name #{previous_number}'s signature",
                )
            elif previous is None and number == 1 and record.get("prev_signature"):
                self._note(number, record, "checkpoint #1 names a predecessor")
            if previous is not None and record["seq"] < previous["seq"]:
                self._note(number, record, f"checkpoint #{number} goes back in the chain")
            previous, previous_number, self.newest = record, number, record
        for sink, numbers in held.items():
            # A sink added later starts at its first checkpoint; within its range, none lacks.
            for before, after in itertools.pairwise(numbers):
                for number in range(before + 1, min(after, before + 51)):
                    self._note(number, None, f"checkpoint #{number} is missing from sink {sink}")

    def anchors(self) -> Iterator[Anchor]:
        """The hashes signed by the checkpoints found in a sink with a good signature, in seq
        order (a conflicting copy elsewhere is reported, and does not unseat them)."""
        for number, group in _grouped(self._copies()):
            if number > self._last_number:
                return  # written after the check: its seq may be past the head read
            if number in self._rejected:
                continue
            valid = self._valid_copy(group)
            if valid is None:
                continue
            record = valid.record
            for seq, hash_ in record.get("waypoints") or [[record["seq"], record["hash"]]]:
                yield Anchor(int(seq), str(hash_), number)


def _text(record: Any) -> str:
    try:
        return canonical_json(record)
    except (TypeError, ValueError):
        return repr(record)


def _grouped(copies: Iterable[CheckpointCopy]) -> Iterator[tuple[int, list[CheckpointCopy]]]:
    group: list[CheckpointCopy] = []
    for copy in copies:
        if group and copy.number != group[0].number:
            yield group[0].number, group
            group = []
        group.append(copy)
    if group:
        yield group[0].number, group


def merge_by_number(*sources: Iterable[CheckpointCopy]) -> Iterator[CheckpointCopy]:
    """The copies of several sources, each sorted by number, as one stream sorted by number."""
    return heapq.merge(*sources, key=lambda copy: copy.number)


# --- The walk -----------------------------------------------------------------------------


class ChainWalker:
    """Checks rows (seq ascending; seq, prev_hash, hash, hash_version first) against each
    other and the anchors.

    Each row must follow the previous one (seq + 1, its prev_hash the previous hash), hash to
    its stored hash with its own hash version, and, where a checkpoint signed the hash at its
    seq, equal that. A rewrite that recomputed every later hash passes the first three and
    fails the last, at the first signed seq it changed.

    Rows are ROW_COLUMNS tuples unless `hasher_for(version)` says how to hash another shape
    (verification on PostgreSQL reads the canonical text ready-made) and `id_at` where the
    event id is. `start_seq`/`start_hash` continue from a known point (the checkpointer walks
    the range since the last checkpoint); None starts at whatever the first row says (an
    export of a later range, which the checkpoints inside it anchor).
    """

    def __init__(
        self,
        anchors: Iterable[Anchor],
        *,
        start_hash: str | None = GENESIS_HASH,
        start_seq: int | None = 1,
        hasher_for: Callable[[int], Callable[[tuple], str]] | None = None,
        id_at: int | None = _ID_AT,
    ) -> None:
        self._anchors = iter(anchors)
        self._anchor = next(self._anchors, None)
        self._prev = start_hash
        self._expected = start_seq
        self._hasher_for = hasher_for or (lambda version: row_hasher(version, ROW_COLUMNS))
        self._hashers: dict[int, Callable[[tuple], str]] = {}
        self._id_at = id_at
        self.checked = 0
        self.last_seq = None if start_seq is None else start_seq - 1

    def _begin(self, row: tuple) -> None:
        # An export of a later range: the first row says where the walk starts.
        if self._expected is None:
            self._expected = row[0]
            self.last_seq = row[0] - 1
        if self._prev is None:
            self._prev = row[1]
        while self._anchor is not None and self._anchor.seq < self._expected:
            self._anchor = next(self._anchors, None)

    def _hasher(self, version: int) -> Callable[[tuple], str] | None:
        hasher = self._hashers.get(version)
        if hasher is None and version in HASH_VERSIONS:
            hasher = self._hashers[version] = self._hasher_for(version)
        return hasher

    def feed(self, row: tuple) -> Problem | None:
        """Check one row; the first problem found, or None."""
        return self.walk((row,))

    def walk(
        self,
        rows: Iterable[tuple],
        on_progress: Callable[[int], None] | None = None,
        every: int = 20_000,
    ) -> Problem | None:
        """Check rows until the first problem (returned) or their end (None).

        One loop with the state in locals: this runs a million times per verification.
        `on_progress(checked)` is called every `every` rows.
        """
        expected, prev, checked = self._expected, self._prev, self.checked
        anchor, anchors, id_at = self._anchor, self._anchors, self._id_at

        def ident(row: tuple) -> int | None:
            return None if id_at is None else row[id_at]

        hashers = self._hashers
        problem = None
        started = expected is not None and prev is not None
        while started and anchor is not None and anchor.seq < expected:
            anchor = next(anchors, None)  # signed before the rows begin
        for row in rows:
            if not started:
                self._begin(row)
                expected, prev, anchor = self._expected, self._prev, self._anchor
                started = True
            seq = row[0]
            if seq != expected:
                problem = Problem(
                    f"event(s) with seq {expected}..{seq - 1} are missing",
                    seq=expected,
                    event_id=ident(row),
                )
                break
            if row[1] != prev:
                problem = Problem("prev_hash does not match the event before", seq, ident(row))
                break
            hasher = hashers.get(row[3]) or self._hasher(row[3])
            if hasher is None:
                problem = Problem(f"unknown hash_version {row[3]}", seq, ident(row))
                break
            stored = row[2]
            try:
                matches = hasher(row) == stored
            except (ValueError, TypeError) as exc:  # a value no canonical JSON can hold
                problem = Problem(f"content is not canonical JSON ({exc})", seq, ident(row))
                break
            if not matches:
                problem = Problem("content does not match its hash", seq, ident(row))
                break
            while anchor is not None and anchor.seq == seq:
                if anchor.hash != stored:
                    problem = Problem(
                        f"seq {seq} differs from the hash signed in checkpoint "
                        f"#{anchor.checkpoint}: history was rewritten",
                        seq,
                        ident(row),
                        anchor.checkpoint,
                    )
                    break
                anchor = next(anchors, None)
            if problem is not None:
                break
            prev, expected = stored, seq + 1
            checked += 1
            if on_progress is not None and checked % every == 0:
                on_progress(checked)
        self._expected, self._prev, self._anchor, self.checked = expected, prev, anchor, checked
        if checked and expected is not None:
            self.last_seq = expected - 1
        return problem

    @property
    def last_hash(self) -> str | None:
        return self._prev

    def finish(self) -> Problem | None:
        """After the last row: a signed seq the chain never reached means its tail was cut."""
        if self._anchor is None:
            return None
        last = self.last_seq or 0
        anchor = self._anchor
        return Problem(
            f"the chain ends at seq {last} but checkpoint #{anchor.checkpoint} signs seq "
            f"{anchor.seq}: events were removed from the end",
            seq=last + 1,
            checkpoint=anchor.checkpoint,
        )
