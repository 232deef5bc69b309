"""The `redis` component: a snapshot of one Redis database that restores exactly.

Backup: SCAN the database (BACKUP_REDIS_URL, by default REDIS_URL's), and per batch of keys
one Lua script (atomic, one round trip) returns each key's TYPE, absolute expiry (PEXPIRETIME;
before Redis 7, PTTL plus the server's TIME), DUMP payload and value. A key that expired or
vanished between SCAN and the script is skipped. Records are streamed a batch at a time, so
memory holds one batch (plus a 12-byte fingerprint per key: SCAN may return a key twice).
Needs a user allowed SCAN, EVAL, DUMP and RESTORE (and INFO, TIME) on that database.

The value read gives each key a canonical value digest (members of sets and hashes sorted,
scores as IEEE doubles, strings by their SHA-1 computed in Redis), because DUMP payloads are
not stable: a large set or hash dumped, restored and dumped again comes out in another order,
and the RDB version inside a payload changes with the server. The manifest's `digest` is the
sum mod 2**256 of one SHA-256 per key over (key, type, value digest, whether it expires):
order-independent, so neither the backup nor a check has to sort the keyspace.

Stream: MAGIC, a JSON header, then per key `K` + the lengths of key, type and payload, the
absolute expiry in ms (-1: none) and the value digest, then key, type and DUMP payload; at the
end `E` + key count + digest. A reader knows it has everything only when the trailer
matches what it read.

Restore (live), all or nothing. A MULTI/EXEC cannot do it safely: Redis does not roll a
transaction back when a RESTORE inside it fails (a payload from a newer server, memory), and
it cannot enumerate keys written by others meanwhile. So:
1. stage: every key is RESTOREd (persistent) under `bridge-restore:<token>:<key>`, its
   absolute expiry kept in a hash, in batches (STAGE); Redis itself validates every payload.
   A truncated or damaged stream, a refused payload, anything: the staged keys are deleted and
   the live keys were never touched.
2. swap: one Lua script, which Redis runs atomically (no client sees a state in between):
   under an allkeys-* eviction policy it first counts the staged keys and changes nothing if
   one is missing (evicted); then it UNLINKs every other key of the database (FLUSHDB's
   effect, keys written since the backup included), RENAMEs each staged key to its name and
   PEXPIREATs it (a key whose expiry passed meanwhile is deleted at once, as Redis would).
Limits: while staging, Redis holds the old and the new data (about twice the snapshot); the
swap blocks Redis for O(keys), like FLUSHDB does: 1.2-1.6 s for 200,000 keys on the 2-vCPU
development machine (a backup of those took 3.4 s, a whole live restore 2.8 s).
Keys whose expiry has passed when the restore starts are not restored. Redis Cluster is not
supported (SCAN and the swap work on one node's database).

Scratch restore (drills): each key is RESTOREd under `bridge-drill:<tag>:<key>` with its
absolute expiry (ABSTTL), in the same database; keys expiring within DRILL_MARGIN_MS are
counted (from their records) instead of restored, so none expires between the restore and the
check. check() reads the drill keys back like a backup does and compares the key count, the
counts per type, the digest and the expiries with the manifest; discard() deletes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from django.conf import settings

from backups.components import (
    ComponentError,
    ComponentHandler,
    Destination,
    OnBytes,
    Opener,
    RestoreRefused,
    Unit,
    register,
)
from compliance.redaction import redact_text

FORMAT = "bridge-redis/1"
MAGIC = b"BRIDGE-REDIS\x00\x01"
BATCH = 500
DRILL_PREFIX = b"bridge-drill:"
STAGING_PREFIX = b"bridge-restore:"
# Our own transient keys are never part of a snapshot.
OWN_PREFIXES = (DRILL_PREFIX, STAGING_PREFIX)
DRILL_MARGIN_MS = 10 * 60 * 1000
# Expiries read through PTTL (Redis < 7) are off by the round trip; also the check's slack.
TTL_TOLERANCE_MS = 1000
MAX_KEY = 512 * 1024 * 1024
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def redis_url() -> str:
    # settings.BACKUP_REDIS_URL defaults to REDIS_URL; set apart, it is the one snapshotted.
    return settings.BACKUP_REDIS_URL or ""


def _client(url: str, *, timeout: float | None) -> Any:
    import redis

    client = redis.Redis.from_url(
        url,
        protocol=2,
        socket_connect_timeout=settings.REDIS_TIMEOUT,
        socket_timeout=timeout,
        client_name="bridge-backup",
    )
    # Raw RESP2 replies (bytes, lists, ints): canonical digests must not depend on how a
    # client version chooses to parse them.
    client.response_callbacks.clear()
    return client


def _data_timeout() -> float:
    return max(float(settings.REDIS_TIMEOUT), 60.0)


def _version(client: Any) -> tuple[int, ...]:
    text = client.execute_command("INFO", "server").decode()
    for line in text.splitlines():
        if line.startswith("redis_version:"):
            return tuple(int(part) for part in line.split(":", 1)[1].strip().split(".")[:3])
    raise ComponentError("redis: the server did not say its version")


def _db(client: Any) -> int:
    return int(client.connection_pool.connection_kwargs.get("db", 0) or 0)


def _server_ms(client: Any) -> int:
    seconds, micros = client.execute_command("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


def _glob_escape(prefix: bytes) -> bytes:
    out = bytearray()
    for byte in prefix:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


# --- Digests -----------------------------------------------------------------------------------


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def value_digest(kind: bytes, reads: list[Any], payload: bytes) -> bytes:
    """A digest of a key's value that does not depend on how Redis laid it out."""
    digest = hashlib.sha256(b"bridge-redis-value/1\x00" + kind + b"\x00")

    def item(data: Any) -> None:
        data = data if isinstance(data, bytes) else str(data).encode()
        digest.update(_U64.pack(len(data)))
        digest.update(data)

    if kind == b"string":
        item(reads[0])  # the value's SHA-1, computed by Redis (see READ)
    elif kind == b"list":
        for element in reads[0]:
            item(element)
    elif kind == b"set":
        for member in sorted(reads[0]):
            item(member)
    elif kind == b"hash":
        for name, value in sorted(_pairs(reads[0])):
            item(name)
            item(value)
    elif kind == b"zset":
        for member, score in _pairs(reads[0]):
            item(member)
            item(struct.pack(">d", float(score)))  # "1.5" and "1.5000000000000000" alike
    elif kind == b"stream":
        entries, info, groups = reads
        for entry_id, fields in entries:
            item(entry_id)
            item(len(fields))
            for value in fields:
                item(value)
        item(dict(_pairs(info)).get(b"last-generated-id", b""))
        described = []
        for group in groups:
            facts = dict(_pairs(group))
            described.append(
                (
                    facts.get(b"name", b""),
                    facts.get(b"last-delivered-id", b""),
                    facts.get(b"pending", 0),
                    facts.get(b"consumers", 0),
                )
            )
        for name, last, pending, consumers in sorted(described):
            item(name)
            item(last)
            item(pending)
            item(consumers)
    else:
        item(payload)  # a module's type: only its serialisation is known
    return digest.digest()


def _key_digest(key: bytes, kind: bytes, value: bytes, expires: bool) -> int:
    digest = hashlib.sha256(b"bridge-redis-key/1\x00")
    digest.update(_U64.pack(len(key)))
    digest.update(key)
    digest.update(_U8.pack(len(kind)))
    digest.update(kind)
    digest.update(value)
    digest.update(b"\x01" if expires else b"\x00")
    return int.from_bytes(digest.digest(), "big")


@dataclass
class _Tally:
    """What a set of keys adds up to: comparable with a manifest whatever the key order."""

    keys: int = 0
    types: Counter = field(default_factory=Counter)
    digest: int = 0
    expiring: int = 0
    expiry_sum_ms: int = 0
    payload_bytes: int = 0

    def add(self, record: _Record) -> None:
        self.keys += 1
        self.types[record.kind.decode()] += 1
        expires = record.expire_at_ms >= 0
        self.digest = (
            self.digest + _key_digest(record.key, record.kind, record.value, expires)
        ) % (1 << 256)
        if expires:
            self.expiring += 1
            self.expiry_sum_ms += record.expire_at_ms
        self.payload_bytes += len(record.payload)

    def as_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "types": dict(sorted(self.types.items())),
            "digest": f"{self.digest:064x}",
            "expiring": self.expiring,
            "expiry_sum_ms": self.expiry_sum_ms,
            "bytes": self.payload_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Tally:
        return cls(
            keys=int(data.get("keys", 0)),
            types=Counter({str(k): int(v) for k, v in data.get("types", {}).items()}),
            digest=int(str(data.get("digest", "0")), 16),
            expiring=int(data.get("expiring", 0)),
            expiry_sum_ms=int(data.get("expiry_sum_ms", 0)),
            payload_bytes=int(data.get("bytes", 0)),
        )


@dataclass(frozen=True)
class _Record:
    key: bytes
    kind: bytes
    expire_at_ms: int  # absolute, server clock; -1: persistent
    value: bytes  # value_digest
    payload: bytes  # DUMP


# --- Reading keys ------------------------------------------------------------------------------


# One batch of keys read in one script: atomic (each key's type, expiry, DUMP and value agree)
# and one round trip, where a pipeline of five commands per key spent most of its time in
# the client packing and parsing them. A string's value comes back as its SHA-1, computed by
# Redis, so it does not cross the wire twice (DUMP holds it already).
READ = """
local exact = ARGV[1] == "1"
local out = {redis.call("TIME")}
for i, key in ipairs(KEYS) do
  local kind = redis.call("TYPE", key)["ok"]
  if kind == "none" then
    out[i + 1] = {kind}
  else
    local ttl
    if exact then ttl = redis.call("PEXPIRETIME", key) else ttl = redis.call("PTTL", key) end
    local reads = {}
    if kind == "string" then reads = {redis.sha1hex(redis.call("GET", key))}
    elseif kind == "list" then reads = {redis.call("LRANGE", key, 0, -1)}
    elseif kind == "set" then reads = {redis.call("SMEMBERS", key)}
    elseif kind == "hash" then reads = {redis.call("HGETALL", key)}
    elseif kind == "zset" then reads = {redis.call("ZRANGE", key, 0, -1, "WITHSCORES")}
    elseif kind == "stream" then
      reads = {redis.call("XRANGE", key, "-", "+"), redis.call("XINFO", "STREAM", key),
               redis.call("XINFO", "GROUPS", key)}
    end
    out[i + 1] = {kind, ttl, redis.call("DUMP", key), reads}
  end
end
return out
"""


def read_keys(client: Any, keys: list[bytes], *, exact: bool) -> tuple[list[_Record], int]:
    """The records of `keys` (read atomically, see READ); and how many vanished meanwhile."""
    replies = client.execute_command("EVAL", READ, len(keys), *keys, "1" if exact else "0")
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    records: list[_Record] = []
    vanished = 0
    for key, reply in zip(keys, replies[1:], strict=True):
        kind = reply[0]
        if kind == b"none" or reply[1] == -2 or reply[2] is None:
            vanished += 1  # expired or deleted between SCAN and now
            continue
        ttl, payload, reads = reply[1], reply[2], reply[3]
        expire_at = -1 if ttl == -1 else (int(ttl) if exact else now_ms + int(ttl))
        records.append(_Record(key, kind, expire_at, value_digest(kind, reads, payload), payload))
    return records, vanished


def scan_batches(client: Any, match: bytes | None = None) -> Iterator[list[bytes]]:
    """Batches of distinct keys (SCAN may return a key twice), our own keys left out unless
    `match` asks for them."""
    seen: set[bytes] = set()
    cursor: Any = b"0"
    while True:
        args: list[Any] = ["SCAN", cursor, "COUNT", BATCH]
        if match is not None:
            args[2:2] = ["MATCH", match]
        cursor, keys = client.execute_command(*args)
        fresh = []
        for key in keys:
            if match is None and key.startswith(OWN_PREFIXES):
                continue
            fingerprint = hashlib.blake2b(key, digest_size=12).digest()
            if fingerprint not in seen:
                seen.add(fingerprint)
                fresh.append(key)
        if fresh:
            yield fresh
        if cursor in (b"0", 0, "0"):
            return


def _delete_matching(client: Any, prefix: bytes) -> int:
    deleted = 0
    for keys in scan_batches(client, _glob_escape(prefix) + b"*"):
        deleted += int(client.execute_command("UNLINK", *keys))
    return deleted


# --- The stream --------------------------------------------------------------------------------


# A record: tag "K", then the fixed-size fields, then key, type and payload.
# After the tag "K": key length, type length, expiry, value digest, payload size.
_RECORD = struct.Struct(">IBq32sQ")
# After the tag "E": key count, digest.
_TRAILER = struct.Struct(">Q32s")


def _write_record(out: BinaryIO, record: _Record) -> None:
    head = b"K" + _RECORD.pack(
        len(record.key),
        len(record.kind),
        record.expire_at_ms,
        record.value,
        len(record.payload),
    )
    out.write(head + record.key + record.kind)
    out.write(record.payload)


class Snapshot:
    """The records of a snapshot stream, read one at a time (`for record in snapshot`).

    Iteration raises ComponentError unless the stream ends with a trailer that matches every
    record read: a truncated or spliced stream never reads as complete. After it, `tally` holds
    the verified totals.
    """

    def __init__(self, source: BinaryIO, on_bytes: OnBytes) -> None:
        # Records are read field by field: a buffer turns those into few reads of the source.
        self.source = io.BufferedReader(_Unclosed(source), 1 << 20)
        self.on_bytes = on_bytes
        self.tally = _Tally()
        self.header: dict[str, Any] = {}

    def _exact(self, size: int) -> bytes:
        data = self.source.read(size)
        if len(data) != size:
            raise ComponentError("redis: the snapshot stream is truncated", "artifact_damaged")
        self.on_bytes(size)
        return data

    def __iter__(self) -> Iterator[_Record]:
        if self._exact(len(MAGIC)) != MAGIC:
            raise ComponentError("redis: not a Bridge Redis snapshot", "artifact_damaged")
        header_size = _U32.unpack(self._exact(4))[0]
        if header_size > 1 << 20:
            raise ComponentError("redis: the snapshot header is malformed", "artifact_damaged")
        self.header = json.loads(self._exact(header_size))
        tally = self.tally
        while True:
            tag = self._exact(1)
            if tag == b"E":
                count, digest = _TRAILER.unpack(self._exact(_TRAILER.size))
                if self.source.read(1):
                    raise ComponentError(
                        "redis: bytes after the snapshot's end", "artifact_damaged"
                    )
                if count != tally.keys or int.from_bytes(digest, "big") != tally.digest:
                    raise ComponentError(
                        "redis: the snapshot's records do not add up to its trailer",
                        "artifact_damaged",
                    )
                return
            if tag != b"K":
                raise ComponentError("redis: the snapshot stream is malformed", "artifact_damaged")
            key_size, kind_size, expire_at, value, size = _RECORD.unpack(self._exact(_RECORD.size))
            if size > 8 * MAX_KEY:
                raise ComponentError("redis: the snapshot stream is malformed", "artifact_damaged")
            names = self._exact(key_size + kind_size)
            record = _Record(
                names[:key_size], names[key_size:], expire_at, value, self._exact(size)
            )
            tally.add(record)
            yield record


class _Unclosed(io.RawIOBase):
    """A raw view of a readable stream for io.BufferedReader, which never closes it."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# The swap of a live restore (see the module docstring). ARGV: the staging prefix, the expiry
# hash, the number of staged keys, the staging base (every key under it is ours), the prefix
# as a SCAN pattern, and "1" to count the staged keys first (an allkeys-* eviction policy may
# have evicted some; under any other policy a persistent staged key cannot disappear).
SWAP = """
local prefix, ttlkey, expected = ARGV[1], ARGV[2], tonumber(ARGV[3])
local base, pattern, count_first = ARGV[4], ARGV[5], ARGV[6] == "1"
local plen, blen = #prefix, #base
local cursor
if count_first then
  local seen, staged = {}, 0
  cursor = "0"
  repeat
    local reply = redis.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
    cursor = reply[1]
    for _, key in ipairs(reply[2]) do
      if not seen[key] then seen[key] = true; staged = staged + 1 end
    end
  until cursor == "0"
  if staged ~= expected then
    return redis.error_reply("BRIDGE staged " .. staged .. " of " .. expected ..
      " keys (evicted under maxmemory?); nothing was changed")
  end
end
local removed = 0
cursor = "0"
repeat
  local reply = redis.call("SCAN", cursor, "COUNT", 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    if string.sub(key, 1, blen) ~= base then removed = removed + redis.call("UNLINK", key) end
  end
until cursor == "0"
local clock = redis.call("TIME")
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local restored, expired = 0, 0
cursor = "0"
repeat
  local reply = redis.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    local name = string.sub(key, plen + 1)
    -- SCAN may return a key twice; the second RENAME finds nothing to move.
    local moved = redis.pcall("RENAME", key, name)
    if not moved.err then
      local at = redis.call("HGET", ttlkey, name)
      if at then redis.call("PEXPIREAT", name, at) end
      if at and tonumber(at) <= now then expired = expired + 1 else restored = restored + 1 end
    end
  end
until cursor == "0"
redis.call("DEL", ttlkey)
return {removed, restored, expired}
"""


class RedisHandler(ComponentHandler):
    """One Redis database (see the module docstring)."""

    component = "redis"

    def units(self) -> list[Unit] | str:
        if not redis_url():
            return "REDIS_URL (BACKUP_REDIS_URL) is not set"
        return [Unit(component=self.component, name="redis")]

    # Backup

    def backup(
        self, unit: Unit, out: BinaryIO, *, parent: dict[str, Any] | None, on_bytes: OnBytes
    ) -> dict[str, Any]:
        url = redis_url()
        if not url:
            raise ComponentError("redis: REDIS_URL (BACKUP_REDIS_URL) is not set", "not_configured")
        from redis import RedisError

        client = _client(url, timeout=_data_timeout())
        try:
            version = _version(client)
            exact = version >= (7, 0)
            started_ms = _server_ms(client)
            header = {
                "format": FORMAT,
                "redis_version": ".".join(map(str, version)),
                "db": _db(client),
                "time_ms": started_ms,
            }
            encoded = json.dumps(header).encode()
            out.write(MAGIC + _U32.pack(len(encoded)) + encoded)
            tally = _Tally()
            vanished = 0
            for keys in scan_batches(client):
                records, gone = read_keys(client, keys, exact=exact)
                vanished += gone
                for record in records:
                    _write_record(out, record)
                    tally.add(record)
                on_bytes(sum(len(record.payload) for record in records))
            out.write(b"E" + _TRAILER.pack(tally.keys, tally.digest.to_bytes(32, "big")))
        except RedisError as exc:
            raise ComponentError(f"redis: {redact_text(str(exc))}", "redis_failed") from exc
        finally:
            client.close()
        return {
            **header,
            "incremental": False,
            "source": redact_text(url),
            **tally.as_dict(),
            "vanished": vanished,
            "expiry_exact": exact,
        }

    # Restore

    def preflight(self, unit: Unit, manifest: dict[str, Any], *, destination: Destination) -> None:
        if manifest.get("format") != FORMAT:
            raise RestoreRefused("redis: the manifest is not one this version restores")
        url = redis_url()
        if not url:
            raise RestoreRefused(
                "redis: REDIS_URL (BACKUP_REDIS_URL) is not set here", "not_configured"
            )
        if not destination.live and not destination.tag:
            raise RestoreRefused("redis: a scratch restore needs a tag for its key prefix")
        client = _client(url, timeout=_data_timeout())
        try:
            here = _version(client)
        finally:
            client.close()
        source = tuple(int(part) for part in str(manifest.get("redis_version", "0")).split("."))
        # DUMP payloads carry an RDB version that older servers refuse (7.2's into 7.0...).
        if here[:2] < source[:2]:
            raise RestoreRefused(
                f"redis: the snapshot comes from Redis {manifest.get('redis_version')}; this "
                f"server runs {'.'.join(map(str, here))}, too old to load it",
                "version_too_old",
            )
        if here < (5, 0):
            raise RestoreRefused("redis: restores need Redis 5 or newer", "version_too_old")

    def restore(
        self,
        unit: Unit,
        manifests: list[dict[str, Any]],
        chain: list[Opener],
        *,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        # Every Redis artifact is a whole snapshot: of a chain only the newest one counts.
        manifest = manifests[-1]
        self.preflight(unit, manifest, destination=destination)
        from redis import RedisError

        client = _client(redis_url(), timeout=_data_timeout())
        source = chain[-1]()
        try:
            snapshot = Snapshot(source, on_bytes)
            if destination.live:
                return self._restore_live(client, manifest, snapshot)
            return self._restore_scratch(client, manifest, snapshot, destination.tag)
        except RedisError as exc:
            raise ComponentError(f"redis: {redact_text(str(exc))}", "redis_failed") from exc
        finally:
            with contextlib.suppress(Exception):
                source.close()
            client.close()

    @staticmethod
    def _matches(manifest: dict[str, Any], tally: _Tally) -> None:
        if tally.keys != manifest.get("keys") or f"{tally.digest:064x}" != manifest.get("digest"):
            raise ComponentError(
                "redis: the snapshot does not match its manifest (another backup's artifact?)",
                "artifact_mismatch",
            )

    def _restore_live(
        self, client: Any, manifest: dict[str, Any], snapshot: Snapshot
    ) -> dict[str, Any]:
        token = uuid.uuid4().hex.encode()
        base = STAGING_PREFIX + token
        prefix, ttlkey = base + b":", base + b"#expiry"
        now_ms = _server_ms(client)
        memory = client.execute_command("INFO", "memory").decode()
        evicting = "maxmemory_policy:allkeys" in memory
        skipped = 0
        stager = _Stager(client, prefix, ttlkey=ttlkey)
        try:
            for record in snapshot:
                if 0 <= record.expire_at_ms <= now_ms:
                    skipped += 1
                    continue
                stager.add(record)
            stager.flush()
            tally = snapshot.tally
            self._matches(manifest, tally)
            # The swap may take longer than any socket timeout; a timeout here would leave us
            # unsure whether it ran, so its connection waits.
            swapper = _client(redis_url(), timeout=None)
            try:
                removed, restored, expired = swapper.execute_command(
                    "EVAL",
                    SWAP,
                    0,
                    prefix,
                    ttlkey,
                    stager.count,
                    base,
                    _glob_escape(prefix) + b"*",
                    "1" if evicting else "0",
                )
            finally:
                swapper.close()
        except BaseException:
            # Before the swap nothing live changed; after it the staging keys are gone anyway.
            with contextlib.suppress(Exception):
                _delete_matching(client, prefix)
                client.execute_command("DEL", ttlkey)
            raise
        return {
            "keys": int(restored),
            "expired": skipped + int(expired),
            "removed": int(removed),
            "types": dict(sorted(tally.types.items())),
        }

    def _restore_scratch(
        self, client: Any, manifest: dict[str, Any], snapshot: Snapshot, tag: str
    ) -> dict[str, Any]:
        prefix, meta = _drill_names(tag)
        _delete_matching(client, prefix)
        client.execute_command("DEL", meta)
        now_ms = _server_ms(client)
        horizon = now_ms + DRILL_MARGIN_MS
        skipped = _Tally()
        stager = _Stager(client, prefix, ttlkey=None)
        try:
            for record in snapshot:
                if 0 <= record.expire_at_ms <= horizon:
                    skipped.add(record)
                    continue
                stager.add(record)
            stager.flush()
            tally = snapshot.tally
            self._matches(manifest, tally)
            client.execute_command(
                "HSET",
                meta,
                "restored_at_ms",
                now_ms,
                "skipped",
                json.dumps(skipped.as_dict()),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._discard_tag(client, tag)
            raise
        return {
            "keys": tally.keys - skipped.keys,
            "expiring_soon_not_restored": skipped.keys,
            "prefix": prefix.decode(),
            "types": dict(sorted(tally.types.items())),
        }

    # Drill

    def check(
        self, unit: Unit, manifest: dict[str, Any], *, destination: Destination
    ) -> dict[str, Any]:
        prefix, meta = _drill_names(destination.tag)
        client = _client(redis_url(), timeout=_data_timeout())
        try:
            facts = client.execute_command("HGETALL", meta)
            facts = dict(_pairs(facts))
            if b"skipped" not in facts:
                return {
                    "ok": False,
                    "checks": [
                        {
                            "name": "restored",
                            "expected": prefix.decode(),
                            "actual": "no scratch restore found",
                            "ok": False,
                        }
                    ],
                }
            exact = _version(client) >= (7, 0)
            found = _Tally.from_dict(json.loads(facts[b"skipped"]))
            for keys in scan_batches(client, _glob_escape(prefix) + b"*"):
                records, _gone = read_keys(client, keys, exact=exact)
                for record in records:
                    found.add(
                        _Record(
                            record.key[len(prefix) :],
                            record.kind,
                            record.expire_at_ms,
                            record.value,
                            record.payload,
                        )
                    )
            elapsed_ms = _server_ms(client) - int(facts[b"restored_at_ms"])
        finally:
            client.close()
        expected = _Tally.from_dict(manifest)

        def check(name: str, want: Any, got: Any, ok: bool | None = None) -> dict[str, Any]:
            passed = want == got if ok is None else ok
            return {"name": name, "expected": want, "actual": got, "ok": passed}

        slack = TTL_TOLERANCE_MS * max(expected.expiring, 1)
        checks = [
            check("keys", expected.keys, found.keys),
            check("types", dict(expected.types), dict(found.types)),
            check(
                "digest (keys, types, values)", f"{expected.digest:064x}", f"{found.digest:064x}"
            ),
            check("keys with a TTL", expected.expiring, found.expiring),
            check(
                "TTLs (sum of absolute expiries, ms)",
                expected.expiry_sum_ms,
                found.expiry_sum_ms,
                abs(expected.expiry_sum_ms - found.expiry_sum_ms) <= slack,
            ),
            check(
                "checked within the TTL margin (ms)",
                DRILL_MARGIN_MS,
                elapsed_ms,
                elapsed_ms < DRILL_MARGIN_MS,
            ),
        ]
        return {"ok": all(item["ok"] for item in checks), "checks": checks}

    def discard(self, unit: Unit, *, destination: Destination) -> None:
        if destination.live or not destination.tag or not redis_url():
            return
        client = _client(redis_url(), timeout=_data_timeout())
        try:
            self._discard_tag(client, destination.tag)
        finally:
            client.close()

    @staticmethod
    def _discard_tag(client: Any, tag: str) -> None:
        prefix, meta = _drill_names(tag)
        _delete_matching(client, prefix)
        client.execute_command("DEL", meta)


def _drill_names(tag: str) -> tuple[bytes, bytes]:
    """The drill's key prefix and its bookkeeping key (outside the prefix)."""
    base = DRILL_PREFIX + tag.encode()
    return base + b":", base + b"#drill"


# RESTOREs a batch of keys under a prefix in one script call (one round trip, one command to
# pack). ARGV[1]: "drill" to give each key its absolute expiry (ABSTTL); otherwise keys are
# staged persistent and their expiry kept in the hash ARGV[2], under the unprefixed name
# (ARGV[3] is the prefix's length). Then per key: payload, absolute expiry in ms or -1.
STAGE = """
local drill, ttlkey, plen = ARGV[1] == "drill", ARGV[2], tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local payload, at = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if at == "-1" then
    redis.call("RESTORE", key, 0, payload, "REPLACE")
  elseif drill then
    redis.call("RESTORE", key, at, payload, "REPLACE", "ABSTTL")
  else
    redis.call("RESTORE", key, 0, payload, "REPLACE")
    redis.call("HSET", ttlkey, string.sub(key, plen + 1), at)
  end
end
return #KEYS
"""
# A batch also ends at this many payload bytes: both sides hold a batch in memory.
BATCH_BYTES = 32 * 1024 * 1024


class _Stager:
    """Records RESTOREd under `prefix` in batches (see STAGE); `ttlkey` None: a drill."""

    def __init__(self, client: Any, prefix: bytes, *, ttlkey: bytes | None) -> None:
        self.client = client
        self.prefix = prefix
        self.ttlkey = ttlkey
        self.count = 0
        self._names: list[bytes] = []
        self._args: list[Any] = []
        self._bytes = 0

    def add(self, record: _Record) -> None:
        self._names.append(self.prefix + record.key)
        self._args += [record.payload, record.expire_at_ms]
        self._bytes += len(record.payload)
        if len(self._names) >= BATCH or self._bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._names:
            return
        mode = (b"stage", self.ttlkey, len(self.prefix)) if self.ttlkey else (b"drill", b"", 0)
        self.client.execute_command(
            "EVAL", STAGE, len(self._names), *self._names, *mode, *self._args
        )
        self.count += len(self._names)
        self._names, self._args, self._bytes = [], [], 0


register(RedisHandler())
