"""The artifact format: a stream compressed with zstd, then encrypted with AES-256-GCM in framed
chunks, readable with nothing but the master key(s) (no catalog needed: disaster recovery of
Bridge itself starts from a directory of artifacts).

Layout (integers big-endian)::

    b"BRBK"  version (1 byte)  header length (u32)  header (JSON, UTF-8)
    frame 0  frame 1  ...  frame n (the final one)

A frame is a u32 whose bit 31 is the final flag and bits 0-30 the payload length, then the
payload: the chunk's ciphertext and its 16-byte GCM tag. Chunk i is encrypted under the
artifact's data key with nonce = the header's 8 random bytes + u32 i, and associated data
AAD = sha256(magic, version, length and header) + u64 i + 1 byte final flag. So every chunk
is bound to this header (a header swapped in, or a chunk of another artifact, does not
authenticate), to its place (reordering is detected) and to being last or not (a stream cut
at a chunk boundary lacks its final chunk: truncated). Bytes after the final chunk are refused.

Chunks hold compressed bytes (compress, then encrypt: ciphertext does not compress). The
final chunk's plaintext ends with the u64 count of uncompressed bytes, so a short zstd frame is
caught as well. Without encryption (only allowed when ENABLE_BACKUP_ENCRYPTION is off, which
settings allow only with DEBUG) the tag is an unkeyed BLAKE2b-128 over the same AAD and chunk:
it detects corruption and misplacement, not forgery.

The data key is random per backup and stored wrapped (security.crypto.wrap, purpose "backup")
in the catalog and in every artifact's header, with the id of the master key that wrapped it:
after a master key rotation, BRIDGE_MASTER_KEY_PREVIOUS keeps old artifacts readable.

Memory stays bounded whatever the size: one chunk of ciphertext and zstd's own window, never
the artifact; decompression hands out at most what the caller asked for (a chunk of zeros can
expand a thousandfold).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import struct
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings

from security import crypto

MAGIC = b"BRBK"
VERSION = 1
FORMAT = "bridge-backup"
KEY_PURPOSE = "backup"
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 8
FINAL_BIT = 0x8000_0000
MAX_HEADER = 16 * 1024 * 1024  # the header is read whole: a bound against a forged length
MIN_CHUNK, MAX_CHUNK = 4096, 64 * 1024 * 1024
# How far either side of a failing chunk's index the reader looks for the index it was
# written at, to say "reordered" rather than "tampered".
REORDER_WINDOW = 8
# zstd's worker threads: at low levels one thread compresses slower than pg_dump writes, and
# the workers run while this thread encrypts, hashes and writes. Jobs of 2 MiB keep their
# buffers to about 10 MB (zstd's default job is 4 windows: +40 MB RSS at level 3 for no
# measurable gain). Above THREADED_MAX_LEVEL the window itself is large, so one thread.
THREADED_MAX_LEVEL = 9
MAX_THREADS = 4
JOB_SIZE = 2 * 1024 * 1024

REASONS = ("tampered", "truncated", "reordered", "wrong_key", "malformed")

_PREAMBLE = struct.Struct(">4sBI")
_FRAME = struct.Struct(">I")
_AAD_TAIL = struct.Struct(">QB")
_RAW_COUNT = struct.Struct(">Q")


class ArtifactError(Exception):
    """An artifact that must not be restored: `reason` is one of REASONS and the message names
    the artifact (`artifact`), the reason and what was found."""

    def __init__(self, artifact: str, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"reason: one of {', '.join(REASONS)}")
        self.artifact, self.reason, self.detail = artifact, reason, detail
        super().__init__(f"{artifact}: {reason}: {detail}")

    @property
    def code(self) -> str:
        return f"artifact_{self.reason}"


@dataclass(frozen=True)
class DataKey:
    """A backup's data key, with its wrapping (what the catalog and the headers store)."""

    key_id: str
    master_key_id: str
    wrapped: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("a data key is 32 bytes (AES-256)")


def new_data_key() -> DataKey:
    """A random data key, wrapped under the current master key."""
    key_id = "bk:" + uuid.uuid4().hex
    key = AESGCM.generate_key(bit_length=256)
    master_key_id, wrapped = crypto.wrap(key_id=key_id, purpose=KEY_PURPOSE, subject_id="", key=key)
    return DataKey(key_id=key_id, master_key_id=master_key_id, wrapped=wrapped, key=key)


def data_key_from(*, key_id: str, master_key_id: str, wrapped: str, artifact: str = "") -> DataKey:
    """The data key of a stored wrapping; ArtifactError (wrong_key) when no known master key
    unwraps it (another master key, no BRIDGE_MASTER_KEY_PREVIOUS, or an altered wrapping).
    `artifact` names what the error is about (default: the key)."""
    try:
        key = crypto.unwrap(
            key_id=key_id,
            purpose=KEY_PURPOSE,
            subject_id="",
            master_key_id=master_key_id,
            wrapped=wrapped,
        )
    except crypto.CryptoError as exc:
        raise ArtifactError(artifact or f"data key {key_id}", "wrong_key", str(exc)) from exc
    try:
        return DataKey(key_id=key_id, master_key_id=master_key_id, wrapped=wrapped, key=key)
    except ValueError as exc:
        raise ArtifactError(artifact or f"data key {key_id}", "wrong_key", str(exc)) from exc


@dataclass(frozen=True)
class ArtifactInfo:
    """What was written (or read back): sizes, the SHA-256 of the stored bytes, chunk count."""

    name: str
    raw_bytes: int
    stored_bytes: int
    sha256: str
    chunks: int


def _aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return header_hash + _AAD_TAIL.pack(index, 1 if final else 0)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(4, "big")


def _check_tag(header_hash: bytes, index: int, final: bool, data: Any) -> bytes:
    digest = hashlib.blake2b(digest_size=TAG_SIZE, person=b"bridge-backup-v1")
    digest.update(_aad(header_hash, index, final))
    digest.update(data)
    return digest.digest()


def _threads(level: int) -> int:
    cpus = os.cpu_count() or 1
    if cpus < 2 or level > THREADED_MAX_LEVEL:
        return 0
    return min(MAX_THREADS, cpus)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    threads = _threads(level)
    if not threads:
        return zstandard.ZstdCompressor(level=level, write_content_size=False)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads, job_size=JOB_SIZE, write_content_size=False
    )
    return zstandard.ZstdCompressor(compression_params=params)


# --- Writing ------------------------------------------------------------------------------------


class ArtifactWriter(io.RawIOBase):
    """A writable binary file that turns what it is given into an artifact on every `outs`
    (the same bytes to each, hashed once).

    `finish()` (or leaving the `with` block without an exception) writes the final chunk and
    returns the ArtifactInfo. `close()` alone never does: an artifact abandoned half way (its
    source failed) has no final chunk and reads as truncated, never as a complete backup.
    The outs are never closed here.
    """

    def __init__(
        self,
        outs: list[BinaryIO],
        *,
        name: str,
        key: DataKey | None,
        compress: bool | None = None,
        level: int | None = None,
        chunk_size: int | None = None,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        if key is None and settings.ENABLE_BACKUP_ENCRYPTION:
            raise ValueError(
                f"{name}: an artifact without a data key is allowed only with "
                "ENABLE_BACKUP_ENCRYPTION off"
            )
        self.name = name
        self._outs = list(outs)
        self._compress = settings.ENABLE_BACKUP_COMPRESSION if compress is None else compress
        self._level = settings.BACKUP_COMPRESSION_LEVEL if level is None else level
        self._chunk_size = settings.BACKUP_CHUNK_SIZE if chunk_size is None else chunk_size
        if not MIN_CHUNK <= self._chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size: from {MIN_CHUNK} to {MAX_CHUNK} bytes")
        if self._compress and not 1 <= self._level <= 22:
            raise ValueError("level: zstd levels go from 1 to 22")
        self._key = key
        self._cipher = AESGCM(key.key) if key is not None else None
        self._prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "compression": "zstd" if self._compress else "none",
            "level": self._level if self._compress else None,
            "encryption": "aes-256-gcm" if key is not None else "none",
            "key_id": key.key_id if key is not None else "",
            "master_key_id": key.master_key_id if key is not None else "",
            "wrapped": key.wrapped if key is not None else "",
            "nonce_prefix": self._prefix.hex(),
            "chunk_size": self._chunk_size,
            "created_at": datetime.now(UTC).isoformat(),
            "meta": meta or {},
        }
        try:
            body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: meta must be JSON-serialisable ({exc})") from exc
        if len(body) > MAX_HEADER:
            raise ValueError(f"{name}: the header is over {MAX_HEADER} bytes (meta too large)")
        preamble = _PREAMBLE.pack(MAGIC, VERSION, len(body)) + body
        self.header = header
        self._header_hash = hashlib.sha256(preamble).digest()
        self._sha = hashlib.sha256()
        self._raw = 0
        self._stored = 0
        self._index = 0
        self._info: ArtifactInfo | None = None
        # One frame buffer, reused: encrypt_into writes each chunk's ciphertext into it.
        self._frame = bytearray(_FRAME.size + self._chunk_size + _RAW_COUNT.size + TAG_SIZE)
        self._pending = bytearray()
        if self._compress:
            self._chunker = _compressor(self._level).chunker(chunk_size=self._chunk_size)
        self._emit_raw(preamble)

    # io.RawIOBase

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._info is not None or self.closed:
            raise ValueError(f"{self.name}: write to a finished or closed artifact")
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        size = len(view)
        if not size:
            return 0
        self._raw += size
        if self._compress:
            for chunk in self._chunker.compress(view):
                self._emit(chunk, final=False)
        else:
            self._buffer(memoryview(view))
        return size

    def flush(self) -> None:
        for out in self._outs:
            if not getattr(out, "closed", False):  # close() flushes too, maybe after the outs'
                out.flush()

    def close(self) -> None:
        # Deliberately not finish(): see the class docstring.
        super().close()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        try:
            if kind is None and self._info is None:
                self.finish()
        finally:
            self.close()

    # The artifact

    def finish(self) -> ArtifactInfo:
        """Write the final chunk (once) and return what was written."""
        if self._info is not None:
            return self._info
        if self.closed:
            raise ValueError(f"{self.name}: closed before it was finished")
        if self._compress:
            held: bytes | None = None
            for chunk in self._chunker.finish():
                if held is not None:
                    self._emit(held, final=False)
                held = chunk
            tail = held or b""
        else:
            tail = bytes(self._pending)
            self._pending.clear()
        self._emit(tail + _RAW_COUNT.pack(self._raw), final=True)
        self.flush()
        self._info = ArtifactInfo(
            name=self.name,
            raw_bytes=self._raw,
            stored_bytes=self._stored,
            sha256=self._sha.hexdigest(),
            chunks=self._index,
        )
        return self._info

    @property
    def info(self) -> ArtifactInfo | None:
        return self._info

    def _buffer(self, view: memoryview) -> None:
        """Uncompressed: cut the input into chunk_size chunks, copying only the remainders."""
        size = self._chunk_size
        if self._pending:
            take = min(size - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < size:
                return
            self._emit(self._pending, final=False)
            self._pending.clear()
        while len(view) >= size:
            self._emit(view[:size], final=False)
            view = view[size:]
        if len(view):
            self._pending += view

    def _emit(self, plain: Any, *, final: bool) -> None:
        index = self._index
        if index >= 2**32:
            raise ValueError(f"{self.name}: more than 2**32 chunks; use a larger chunk size")
        length = len(plain) + TAG_SIZE
        frame = self._frame
        if len(frame) < _FRAME.size + length:
            frame = self._frame = bytearray(_FRAME.size + length)
        _FRAME.pack_into(frame, 0, length | (FINAL_BIT if final else 0))
        view = memoryview(frame)
        aad = _aad(self._header_hash, index, final)
        if self._cipher is not None:
            self._cipher.encrypt_into(
                _nonce(self._prefix, index), plain, aad, view[_FRAME.size : _FRAME.size + length]
            )
        else:
            end = _FRAME.size + len(plain)
            view[_FRAME.size : end] = plain
            view[end : end + TAG_SIZE] = _check_tag(self._header_hash, index, final, plain)
        self._index += 1
        self._emit_raw(view[: _FRAME.size + length])

    def _emit_raw(self, data: Any) -> None:
        self._sha.update(data)
        self._stored += len(data)
        for out in self._outs:
            out.write(data)


# --- Reading ------------------------------------------------------------------------------------


def _read_exact(source: BinaryIO, buffer: memoryview) -> int:
    """Fill `buffer` from `source`; returns how many bytes came before EOF."""
    filled = 0
    total = len(buffer)
    readinto = getattr(source, "readinto", None)
    while filled < total:
        if readinto is not None:
            got = readinto(buffer[filled:])
        else:
            data = source.read(total - filled)
            got = len(data) if data else 0
            buffer[filled : filled + got] = data or b""
        if not got:
            break
        filled += got
    return filled


def _label(source: Any, name: str) -> str:
    if name:
        return name
    found = getattr(source, "name", "")
    return found if isinstance(found, str) and found else "artifact"


def _parse_header(source: BinaryIO, name: str, sha: Any) -> tuple[dict, bytes]:
    """(header, sha256 of the preamble and header); `sha` is fed what was read."""
    preamble = bytearray(_PREAMBLE.size)
    got = _read_exact(source, memoryview(preamble))
    sha.update(memoryview(preamble)[:got])
    if got < 4 and MAGIC.startswith(bytes(preamble[:got])):
        raise ArtifactError(name, "truncated", f"ends after {got} bytes, inside the header")
    if bytes(preamble[:4]) != MAGIC:
        raise ArtifactError(name, "malformed", "not a Bridge backup artifact (no BRBK magic)")
    if got < _PREAMBLE.size:
        raise ArtifactError(name, "truncated", f"ends after {got} bytes, inside the header")
    _, version, length = _PREAMBLE.unpack(preamble)
    if version != VERSION:
        raise ArtifactError(name, "malformed", f"format version {version} is not supported")
    if length > MAX_HEADER:
        raise ArtifactError(name, "tampered", f"the header length ({length}) is out of range")
    body = bytearray(length)
    got = _read_exact(source, memoryview(body))
    sha.update(memoryview(body)[:got])
    if got < length:
        raise ArtifactError(name, "truncated", "ends inside the header")
    try:
        header = json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(name, "tampered", "the header is not valid JSON") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(name, "tampered", "the header is not a Bridge artifact header")
    try:
        prefix = bytes.fromhex(header["nonce_prefix"])
        chunk_size = header["chunk_size"]
        valid = (
            len(prefix) == NONCE_PREFIX_SIZE
            and isinstance(chunk_size, int)
            and MIN_CHUNK <= chunk_size <= MAX_CHUNK
            and header["compression"] in ("zstd", "none")
            and header["encryption"] in ("aes-256-gcm", "none")
            and isinstance(header["name"], str)
        )
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ArtifactError(name, "tampered", "the header lacks or garbles a required field")
    return header, hashlib.sha256(bytes(preamble) + bytes(body)).digest()


def read_header(source: BinaryIO, *, name: str = "") -> dict:
    """The header of the artifact at the start of `source` (left just after it).

    Not authenticated on its own: the chunks are (they bind its hash), so trust it only once
    the artifact reads back."""
    return _parse_header(source, _label(source, name), hashlib.sha256())[0]


class _Chunks:
    """The decrypted chunks of an artifact, in order, each one checked; at the end, the
    final chunk's raw byte count and nothing after it. read(n) serves zstd's stream reader."""

    def __init__(
        self,
        source: BinaryIO,
        *,
        name: str,
        header: dict,
        header_hash: bytes,
        cipher: AESGCM | None,
        sha: Any,
    ) -> None:
        self.source = source
        self.name = name
        self.header_hash = header_hash
        self.cipher = cipher
        self.sha = sha
        self.prefix = bytes.fromhex(header["nonce_prefix"])
        self.max_payload = header["chunk_size"] + _RAW_COUNT.size + TAG_SIZE
        self.buffer = bytearray(_FRAME.size + self.max_payload)
        self.index = 0
        self.done = False
        self.raw_count: int | None = None
        self.left: memoryview | None = None

    def next_chunk(self) -> bytes | None:
        """The next chunk's plaintext, or None after the final one."""
        if self.done:
            return None
        view = memoryview(self.buffer)
        got = _read_exact(self.source, view[: _FRAME.size])
        self.sha.update(view[:got])
        if got < _FRAME.size:
            where = "ends" if got == 0 else "ends inside a frame's length"
            raise ArtifactError(
                self.name, "truncated", f"{where} after chunk {self.index - 1} (no final chunk)"
            )
        word = _FRAME.unpack_from(self.buffer)[0]
        final, length = bool(word & FINAL_BIT), word & ~FINAL_BIT
        if not TAG_SIZE + (_RAW_COUNT.size if final else 0) <= length <= self.max_payload:
            raise ArtifactError(
                self.name, "tampered", f"chunk {self.index}: frame length {length} out of range"
            )
        payload = view[_FRAME.size : _FRAME.size + length]
        got = _read_exact(self.source, payload)
        self.sha.update(payload[:got])
        if got < length:
            raise ArtifactError(
                self.name, "truncated", f"ends inside chunk {self.index} ({got} of {length} bytes)"
            )
        plain = self._open(payload, self.index, final)
        if plain is None:
            self._refuse(payload, final)
        self.index += 1
        if final:
            self.done = True
            self.raw_count = _RAW_COUNT.unpack_from(plain, len(plain) - _RAW_COUNT.size)[0]
            plain = plain[: -_RAW_COUNT.size]
            extra = self.source.read(1)
            if extra:
                raise ArtifactError(self.name, "tampered", "extra bytes after the final chunk")
        return plain

    def _open(self, payload: memoryview, index: int, final: bool) -> bytes | None:
        if self.cipher is not None:
            try:
                return self.cipher.decrypt(
                    _nonce(self.prefix, index), payload, _aad(self.header_hash, index, final)
                )
            except InvalidTag:
                return None
        data = payload[:-TAG_SIZE]
        if secrets.compare_digest(
            _check_tag(self.header_hash, index, final, data), bytes(payload[-TAG_SIZE:])
        ):
            return bytes(data)
        return None

    def _refuse(self, payload: memoryview, final: bool) -> None:
        """Chunk `index` does not authenticate: written elsewhere in this stream (reordered),
        or altered / of another artifact or key (tampered)."""
        index = self.index
        low, high = max(0, index - REORDER_WINDOW), index + REORDER_WINDOW
        for other in range(low, high + 1):
            if other != index and self._open(payload, other, final) is not None:
                raise ArtifactError(
                    self.name,
                    "reordered",
                    f"chunk {other} was found at position {index} (chunks moved)",
                )
        if index == 0:
            detail = (
                "chunk 0 does not authenticate: the artifact was altered, its header replaced, "
                "or it was not written with this data key"
            )
        else:
            detail = f"chunk {index} does not authenticate (altered or from another artifact)"
        raise ArtifactError(self.name, "tampered", detail)

    # zstd's source

    def read(self, size: int = -1) -> bytes:
        left = self.left
        if left is None or not len(left):
            chunk = self.next_chunk()
            while chunk is not None and not chunk:
                chunk = self.next_chunk()
            if chunk is None:
                return b""
            if size < 0 or len(chunk) <= size:
                self.left = None
                return chunk
            left = memoryview(chunk)
        taken = left if size < 0 else left[:size]
        self.left = left[len(taken) :]
        return bytes(taken)


class ArtifactReader(io.RawIOBase):
    """The plaintext of an artifact, as a readable binary file; every chunk is checked before
    any of its bytes are handed out, and the first bad one raises ArtifactError (again on every
    later read). End of file is reported only after the final chunk checked out. Closing it
    closes the source (so `open_artifact(target.open(...))` can be handed on as one file)."""

    def __init__(self, source: BinaryIO, *, name: str, key: DataKey | None = None) -> None:
        super().__init__()
        self._opened = False  # a reader that failed to open leaves its source to the caller
        self.name = name
        self._sha = hashlib.sha256()
        self._source = _Counting(source)
        self._error: ArtifactError | None = None
        self._raw = 0
        self._eof = False
        header, header_hash = _parse_header(self._source, name, self._sha)
        self.header = header
        if header["name"] != name:
            raise ArtifactError(
                name, "tampered", f"the header names another artifact: {header['name']!r}"
            )
        cipher = self._cipher(header, key)
        self._chunks = _Chunks(
            self._source,
            name=name,
            header=header,
            header_hash=header_hash,
            cipher=cipher,
            sha=self._sha,
        )
        if header["compression"] == "zstd":
            self._inflate: Any = zstandard.ZstdDecompressor().stream_reader(
                self._chunks,
                read_size=self._chunks.max_payload,
                read_across_frames=False,
                closefd=False,
            )
        else:
            self._inflate = self._chunks
        self._opened = True

    def _cipher(self, header: dict, key: DataKey | None) -> AESGCM | None:
        name = self.name
        if header["encryption"] == "none":
            if key is not None:
                raise ArtifactError(
                    name, "tampered", "the header says unencrypted, the catalog has a data key"
                )
            if settings.ENABLE_BACKUP_ENCRYPTION:
                raise ArtifactError(
                    name,
                    "tampered",
                    "the header says unencrypted while ENABLE_BACKUP_ENCRYPTION requires "
                    "encrypted artifacts",
                )
            return None
        if key is None:
            key = data_key_from(
                key_id=str(header.get("key_id", "")),
                master_key_id=str(header.get("master_key_id", "")),
                wrapped=str(header.get("wrapped", "")),
                artifact=name,
            )
        elif key.key_id != header.get("key_id"):
            raise ArtifactError(
                name,
                "wrong_key",
                f"written with data key {header.get('key_id')!r}, not {key.key_id!r}",
            )
        return AESGCM(key.key)

    # io.RawIOBase

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            try:
                if self._opened:
                    self._source.source.close()
            finally:
                super().close()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if self._error is not None:
            raise self._error
        if self._eof or size == 0:
            return b""
        try:
            data = self._inflate.read(size)
            if not data:
                self._finish()
        except ArtifactError as exc:
            self._error = exc
            raise
        except zstandard.ZstdError as exc:
            self._error = ArtifactError(self.name, "malformed", f"zstd: {exc}")
            raise self._error from exc
        self._raw += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while True:
            data = self.read(1024 * 1024)
            if not data:
                return b"".join(parts)
            parts.append(data)

    def _finish(self) -> None:
        """zstd's frame (or the chunks) ended: the final chunk must have come, with nothing
        after it, and the byte count it carries must match."""
        chunks = self._chunks
        leftover = chunks.read()
        if leftover:
            raise ArtifactError(self.name, "malformed", "data follows the end of the zstd frame")
        if chunks.raw_count != self._raw:
            raise ArtifactError(
                self.name,
                "malformed",
                f"{self._raw} bytes decompressed, the final chunk says {chunks.raw_count}",
            )
        self._eof = True

    @property
    def info(self) -> ArtifactInfo:
        """What was read; only once the whole artifact was read."""
        if not self._eof:
            raise ValueError(f"{self.name}: not read to its end yet")
        return ArtifactInfo(
            name=self.name,
            raw_bytes=self._raw,
            stored_bytes=self._source.count,
            sha256=self._sha.hexdigest(),
            chunks=self._chunks.index,
        )


class _Counting:
    """The source, counting what was read from it."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.count = 0
        self.name = getattr(source, "name", "")
        self.readinto = self._readinto if hasattr(source, "readinto") else None

    def _readinto(self, buffer: memoryview) -> int:
        got = self.source.readinto(buffer) or 0
        self.count += got
        return got

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data or b"")
        return data or b""


def open_artifact(source: BinaryIO, *, name: str, key: DataKey | None = None) -> ArtifactReader:
    """A reader of the artifact `name` in `source`. `key` None: the data key is unwrapped from
    the header; given (from the catalog), it must be the key the header names."""
    return ArtifactReader(source, name=name, key=key)


def verify_artifact(source: BinaryIO, *, name: str, key: DataKey | None = None) -> ArtifactInfo:
    """Read the whole artifact, checking every chunk; ArtifactError on the first problem."""
    reader = open_artifact(source, name=name, key=key)
    buffer = bytearray(1024 * 1024)
    while reader.readinto(buffer):
        pass
    return reader.info
