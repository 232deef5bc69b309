"""The artifact format: byte-for-byte round trips, and every kind of damage refused naming the
artifact and the reason (a flipped bit, truncation, reordered chunks, appended bytes, a header
or chunk from another artifact, the wrong key), old artifacts readable after a master key
change, and memory that does not grow with the artifact."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import shutil
import struct
import tarfile
import tracemalloc

import pytest

from backups import stream
from backups.stream import ArtifactError, ArtifactWriter, open_artifact, verify_artifact
from security import crypto

# crypto.wrap/unwrap read the master keys from the settings only: no database needed.

OLD_MASTER = base64.b64encode(b"o" * 32).decode()
NEW_MASTER = base64.b64encode(b"n" * 32).decode()
CHUNK = 64 * 1024


@pytest.fixture(autouse=True)
def _master(settings):
    settings.BRIDGE_MASTER_KEY = OLD_MASTER
    settings.BRIDGE_MASTER_KEY_PREVIOUS = []
    settings.ENABLE_BACKUP_ENCRYPTION = True
    crypto.forget_keys()
    yield
    crypto.forget_keys()


def switch_master(settings, current: str, previous: list[str]) -> None:
    settings.BRIDGE_MASTER_KEY = current
    settings.BRIDGE_MASTER_KEY_PREVIOUS = previous
    crypto.forget_keys()


def mixed(size: int, seed: int = 7) -> bytes:
    """Half random, half text: neither trivially compressible nor incompressible."""
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"row", b"jsonb", b"'x'", b"\n"]
    text = b" ".join(rnd.choice(words) for _ in range(size // 8 + 1))
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(4096) + text[len(out) % len(text) :][:4096]
    return bytes(out[:size])


def write(data: bytes, *, name: str = "database-default", key=None, **options) -> bytes:
    out = io.BytesIO()
    options.setdefault("chunk_size", CHUNK)
    with ArtifactWriter([out], name=name, key=key, **options) as writer:
        writer.write(data)
    return out.getvalue()


def read(blob: bytes, *, name: str = "database-default", key=None) -> bytes:
    return open_artifact(io.BytesIO(blob), name=name, key=key).read()


def frames(blob: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, final) of each frame, the 4-byte length word included."""
    length = struct.unpack_from(">I", blob, 5)[0]
    position, found = 9 + length, []
    while position < len(blob):
        word = struct.unpack_from(">I", blob, position)[0]
        end = position + 4 + (word & 0x7FFF_FFFF)
        found.append((position, end, bool(word & 0x8000_0000)))
        position = end
    return found


def refused(blob: bytes, *, name: str = "database-default", key=None) -> ArtifactError:
    with pytest.raises(ArtifactError) as caught:
        verify_artifact(io.BytesIO(blob), name=name, key=key)
    assert str(caught.value).startswith(f"{name}: {caught.value.reason}: ")
    return caught.value


@pytest.fixture
def key():
    return stream.new_data_key()


@pytest.fixture
def artifact(key) -> tuple[bytes, bytes]:
    """(plaintext, artifact) of several chunks, compression off so chunks are plaintext-sized."""
    data = os.urandom(5 * CHUNK + 100)
    return data, write(data, key=key, compress=False)


# --- Round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * 1024 * 1024 + 17])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trips_byte_for_byte(key, size, compress):
    data = mixed(size)
    out = io.BytesIO()
    with ArtifactWriter([out], name="uploads", key=key, compress=compress, chunk_size=CHUNK) as w:
        for start in range(0, size, 100_000):  # writes of assorted sizes
            w.write(memoryview(data)[start : start + 100_000])
    blob = out.getvalue()
    info = w.info
    assert info.raw_bytes == size and info.stored_bytes == len(blob)
    assert info.sha256 == hashlib.sha256(blob).hexdigest()
    reader = open_artifact(io.BytesIO(blob), name="uploads")
    assert reader.read() == data
    assert reader.info == info
    assert verify_artifact(io.BytesIO(blob), name="uploads", key=key) == info


def test_compression_shrinks_text_and_chunks_hold_compressed_bytes(key):
    data = b"INSERT INTO t VALUES ('the same row again');\n" * 50_000
    compressed, plain = write(data, key=key), write(data, key=key, compress=False)
    assert len(compressed) < len(data) / 20 < len(plain)
    assert read(compressed) == data == read(plain)


def test_the_header_describes_the_artifact_and_holds_no_secret(key):
    data = b"card 4111 1111 1111 1111"
    blob = write(data, key=key, meta={"rows": 3}, level=5)
    header = stream.read_header(io.BytesIO(blob))
    assert header["name"] == "database-default" and header["version"] == stream.VERSION
    assert header["compression"] == "zstd" and header["level"] == 5
    assert header["encryption"] == "aes-256-gcm" and header["chunk_size"] == CHUNK
    assert (header["key_id"], header["master_key_id"], header["wrapped"]) == (
        key.key_id,
        key.master_key_id,
        key.wrapped,
    )
    assert header["meta"] == {"rows": 3}
    assert b"4111" not in blob and key.key not in blob
    assert key.key.hex() not in repr(key) and "key=" not in repr(key)


def test_an_artifact_opens_with_the_catalogs_wrapping_or_its_own_header(key):
    blob = write(b"hello", key=key)
    from_catalog = stream.data_key_from(
        key_id=key.key_id, master_key_id=key.master_key_id, wrapped=key.wrapped
    )
    assert read(blob, key=from_catalog) == b"hello" == read(blob)


def test_tarfile_and_copyfileobj_stream_through_it(key, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 10_000)
    (tmp_path / "b.bin").write_bytes(os.urandom(300_000))
    out = io.BytesIO()
    with ArtifactWriter([out], name="uploads", key=key, chunk_size=CHUNK) as writer:
        with tarfile.open(fileobj=writer, mode="w|") as archive:
            archive.add(tmp_path / "a.txt", arcname="a.txt")
            archive.add(tmp_path / "b.bin", arcname="b.bin")
    reader = open_artifact(io.BytesIO(out.getvalue()), name="uploads")
    with tarfile.open(fileobj=reader, mode="r|") as archive:
        contents = {member.name: archive.extractfile(member).read() for member in archive}
    assert contents == {"a.txt": b"a" * 10_000, "b.bin": (tmp_path / "b.bin").read_bytes()}
    copied = io.BytesIO()
    shutil.copyfileobj(open_artifact(io.BytesIO(out.getvalue()), name="uploads"), copied)
    assert len(copied.getvalue()) > 310_000


def test_closing_the_reader_closes_its_source_but_a_failed_open_does_not(key):
    source = io.BytesIO(write(b"rows", key=key))
    reader = open_artifact(source, name="database-default")
    assert reader.read() == b"rows"
    reader.close()
    assert source.closed
    other = io.BytesIO(write(b"rows", key=key))
    with pytest.raises(ArtifactError):
        open_artifact(other, name="database-default", key=stream.new_data_key())
    other.seek(0)  # still open: the caller may try again with the right key
    assert open_artifact(other, name="database-default", key=key).read() == b"rows"


def test_the_writer_tees_to_every_output(key):
    first, second = io.BytesIO(), io.BytesIO()
    with ArtifactWriter([first, second], name="redis", key=key) as writer:
        writer.write(b"x" * 1000)
    assert first.getvalue() == second.getvalue()
    assert writer.info.sha256 == hashlib.sha256(first.getvalue()).hexdigest()


def test_an_abandoned_writer_leaves_a_truncated_artifact_never_a_complete_one(key):
    out = io.BytesIO()
    with pytest.raises(RuntimeError), ArtifactWriter([out], name="redis", key=key) as writer:
        writer.write(os.urandom(300_000))
        raise RuntimeError("the source died")
    assert writer.info is None
    assert refused(out.getvalue(), name="redis").reason == "truncated"


def test_without_encryption_only_when_the_settings_allow_it(settings):
    with pytest.raises(ValueError, match="ENABLE_BACKUP_ENCRYPTION"):
        ArtifactWriter([io.BytesIO()], name="config", key=None)
    settings.ENABLE_BACKUP_ENCRYPTION = False
    data = mixed(300_000)
    blob = write(data, name="config")
    assert stream.read_header(io.BytesIO(blob))["encryption"] == "none"
    assert read(blob, name="config") == data
    # Unencrypted chunks still carry a check: damage and misplacement are caught.
    damaged = bytearray(blob)
    damaged[frames(blob)[1][0] + 50] ^= 1
    assert refused(bytes(damaged), name="config").reason == "tampered"
    # An unencrypted artifact is refused once encryption is required again.
    settings.ENABLE_BACKUP_ENCRYPTION = True
    assert refused(blob, name="config").reason == "tampered"


# --- Damage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "tag", "final"])
def test_a_single_flipped_bit_is_refused_as_tampered(artifact, where):
    _, blob = artifact
    spans = frames(blob)
    start, end, _ = {"first": spans[0], "middle": spans[2], "final": spans[-1]}.get(where, spans[3])
    offset = end - 3 if where == "tag" else start + 4 + (end - start - 4) // 2
    damaged = bytearray(blob)
    damaged[offset] ^= 0x04
    error = refused(bytes(damaged))
    assert error.reason == "tampered" and "does not authenticate" in error.detail


def test_nothing_of_a_bad_chunk_is_handed_out(key):
    data = os.urandom(4 * CHUNK)
    blob = write(data, key=key, compress=False)
    damaged = bytearray(blob)
    damaged[frames(blob)[2][0] + 10] ^= 1
    reader = open_artifact(io.BytesIO(bytes(damaged)), name="database-default")
    received = bytearray()
    with pytest.raises(ArtifactError, match="chunk 2 does not authenticate"):
        while chunk := reader.read(1000):
            received += chunk
    assert bytes(received) == data[: 2 * CHUNK]
    with pytest.raises(ArtifactError):  # and it stays refused
        reader.read(1)


def test_dropping_the_final_chunk_is_refused_as_truncated(artifact):
    _, blob = artifact
    start, _, final = frames(blob)[-1]
    assert final
    error = refused(blob[:start])
    assert error.reason == "truncated" and "no final chunk" in error.detail


@pytest.mark.parametrize("cut", [1, 4, 5, 1000])
def test_cutting_inside_a_frame_or_the_header_is_refused_as_truncated(artifact, cut):
    _, blob = artifact
    start, _, _ = frames(blob)[3]
    assert refused(blob[: start + cut]).reason == "truncated"
    assert refused(blob[:20]).reason == "truncated"
    assert refused(blob[:2]).reason == "truncated"


def test_two_chunks_swapped_are_refused_as_reordered(artifact):
    _, blob = artifact
    spans = frames(blob)
    (a0, a1, _), (b0, b1, _) = spans[1], spans[2]
    swapped = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
    error = refused(swapped)
    assert error.reason == "reordered" and "chunk 2 was found at position 1" in error.detail
    # The final chunk moved forward is caught too.
    (f0, f1, _) = spans[-1]
    moved = blob[:a0] + blob[f0:f1] + blob[a0:f0]
    assert refused(moved).reason == "reordered"


def test_bytes_after_the_final_chunk_are_refused_as_tampered(artifact):
    _, blob = artifact
    error = refused(blob + b"\x00")
    assert error.reason == "tampered" and "after the final chunk" in error.detail
    assert refused(blob + blob[frames(blob)[1][0] : frames(blob)[1][1]]).reason == "tampered"


def test_a_header_from_another_artifact_is_refused_as_tampered(key):
    data = os.urandom(3 * CHUNK)
    # Same name and key (another run of the same backup unit), and another backup's artifact.
    mine = write(data, key=key, compress=False)
    same_key = write(data, key=key, compress=False)
    other_backup = write(data, key=stream.new_data_key(), compress=False)
    for donor in (same_key, other_backup):
        spliced = donor[: frames(donor)[0][0]] + mine[frames(mine)[0][0] :]
        error = refused(spliced)
        assert error.reason == "tampered" and "chunk 0" in error.detail
    # A header edited to stay valid JSON (another name in meta) is caught by the chunks.
    edited = write(data, key=key, compress=False, meta={"label": "aaaa"})
    forged = edited.replace(b'"aaaa"', b'"bbbb"')
    assert refused(forged).reason == "tampered"
    # A whole artifact of another unit put in this one's place.
    assert "names another artifact" in refused(write(data, key=key, name="redis")).detail


def test_a_chunk_from_another_artifact_is_refused_as_tampered(key):
    data = os.urandom(3 * CHUNK)
    mine = write(data, key=key, compress=False)
    other = write(data, key=key, compress=False)
    (m0, m1, _), (o0, o1, _) = frames(mine)[1], frames(other)[1]
    assert refused(mine[:m0] + other[o0:o1] + mine[m1:]).reason == "tampered"


def test_a_broken_magic_or_version_is_malformed(artifact):
    _, blob = artifact
    assert refused(b"NOPE" + blob[4:]).reason == "malformed"
    assert refused(blob[:4] + b"\x09" + blob[5:]).reason == "malformed"


def test_an_unknown_master_key_is_refused_as_wrong_key(settings, key):
    blob = write(b"secret rows", key=key)
    switch_master(settings, NEW_MASTER, [])
    error = refused(blob)
    assert error.reason == "wrong_key" and key.master_key_id in error.detail
    with pytest.raises(ArtifactError, match="wrong_key"):
        stream.data_key_from(
            key_id=key.key_id, master_key_id=key.master_key_id, wrapped=key.wrapped
        )


def test_an_altered_wrapping_or_another_backups_key_is_refused_as_wrong_key(key):
    blob = write(b"secret rows", key=key)
    wrapped = bytearray(base64.b64decode(key.wrapped))
    wrapped[20] ^= 1
    with pytest.raises(ArtifactError) as caught:
        stream.data_key_from(
            key_id=key.key_id,
            master_key_id=key.master_key_id,
            wrapped=base64.b64encode(bytes(wrapped)).decode(),
            artifact="database-default",
        )
    assert str(caught.value).startswith("database-default: wrong_key: ")
    other = stream.new_data_key()
    error = refused(blob, key=other)
    assert error.reason == "wrong_key" and other.key_id in error.detail


def test_artifacts_written_before_a_master_key_change_still_open(settings, key):
    # given: an artifact under the old master key
    data = mixed(200_000)
    old = write(data, key=key)
    # when: the master key changes, the old one kept as previous
    switch_master(settings, NEW_MASTER, [OLD_MASTER])
    new_key = stream.new_data_key()
    # then: both the old artifact and new ones open; new keys are wrapped by the new master
    assert read(old) == data
    assert new_key.master_key_id != key.master_key_id
    assert read(write(data, key=new_key)) == data


# --- Memory -------------------------------------------------------------------------------------


def test_memory_stays_bounded_whatever_the_size(key, tmp_path):
    # given: 64 MiB of mixed data, produced and consumed block by block
    block = bytearray(mixed(1024 * 1024))
    total = 64
    path = tmp_path / "big.artifact"
    tracemalloc.start()
    try:
        # when
        with path.open("wb") as out, ArtifactWriter([out], name="uploads", key=key) as writer:
            for index in range(total):
                block[:8] = index.to_bytes(8, "big")
                writer.write(block)
        with path.open("rb") as source:
            reader = open_artifact(source, name="uploads")
            buffer = bytearray(1024 * 1024)
            received = 0
            while count := reader.readinto(buffer):
                received += count
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # then
    assert received == total * 1024 * 1024
    assert peak < 24 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
