"""The `uploads` component: MEDIA_ROOT file by file, full or incremental, restored all or nothing.

The artifact is a POSIX tar stream (PAX headers: UTF-8 names of any length, sizes past 8 GiB):
one `data/<relative path>` member per archived file, then `index.json`, the unit's manifest, so
an artifact read without the catalog still says what it holds. Only regular files are members;
directories, their modes and times, and symlinks are restored from the manifest's listing.

Manifest: `files` {relpath: {sha256, size, mode, mtime_ns}} is always the whole tree as of this
backup (the effective listing), plus `dirs`, `links`, `changed` (the files archived in this
artifact) and `deleted` (listed by the parent, gone now).

Incremental (`parent` = the parent backup's uploads manifest, already a full listing): a file
whose size and mtime_ns equal the parent's entry is taken as unchanged without being read, as
git's index and restic do; any other file is hashed and archived only if its SHA-256 differs.
A file changed again within the same timestamp tick as the backup read it would keep its size
and mtime (git's "racy clean" problem): entries whose mtime lies within RACY_NS of the moment
they were read are flagged `racy`, and the next incremental hashes them instead of trusting
the stat. `chmod` alone or `touch` alone updates the listing without archiving the content.

Restore: the chain (full first, then each incremental's deletions and changed files) is
extracted into a staging directory next to the destination, every file's SHA-256 is checked
against the manifests as it is written and the tree against the last manifest's listing, modes
and times are set, and only then the staging directory is swapped in (atomically with
renameat2(RENAME_EXCHANGE) where the kernel and filesystem have it, else rename aside + rename
in). Any failure removes the staging directory: the destination is untouched. Only regular
`data/` members with relative paths inside the tree are accepted: absolute names, `..`, links
and devices are refused. Ownership is not restored (files belong to the restoring process's
user, as Django writes them); setuid/setgid/sticky bits are not kept.

Symlinks are recorded, never followed; one whose target leaves MEDIA_ROOT (absolute, or `..`
past the root) is skipped with a note in `skipped`, as are sockets, FIFOs, devices and names
that are not valid UTF-8 (the catalog stores JSON text).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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

FORMAT = "bridge-uploads/1"
DATA = "data/"
INDEX = "index.json"
# Large reads and writes: per-call overhead stays negligible next to hashing and encryption.
COPY_SIZE = 1024 * 1024
# A changed-by-stat file this small is read once into memory, hashed, and archived from there
# if its content did change; a larger one is read twice (hash, then archive) to bound memory.
IN_MEMORY = 8 * 1024 * 1024
# See "racy" in the module docstring: coarse filesystem clocks tick every few milliseconds,
# some (FAT, some network filesystems) every 1-2 s.
RACY_NS = 2_000_000_000
MODE_MASK = 0o777
# Names of this module's own temporary directories: never backed up, never restored.
STAGING = ".bridge-restore-"
OLD = ".bridge-old-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LISTING_KEYS = ("files", "dirs", "links", "changed", "deleted")


# --- The tar stream ---------------------------------------------------------------------------


class TarWriter:
    """A tar stream written straight onto `out`, as tarfile's "w|" mode writes it.

    tarfile itself is not used for writing because its stream mode keeps every member's
    TarInfo in memory (a million uploads, a million objects) and re-slices its buffer per
    10 KiB record; the headers are tarfile's own (TarInfo.tobuf), so any tar reads the result.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.written = 0
        self._buffer = bytearray(COPY_SIZE)

    def _write(self, data: Any) -> None:
        self.out.write(data)
        self.written += len(data)

    def add_file(
        self,
        name: str,
        source: BinaryIO,
        *,
        size: int,
        mode: int,
        mtime_ns: int,
        on_bytes: OnBytes | None = None,
    ) -> tuple[str, bool]:
        """Archive exactly `size` bytes of `source` as `name`; return (SHA-256, complete).

        A source that ends early (the file shrank while being read) is padded with zeros so
        the stream stays a valid tar: complete is then False and the SHA-256 is that of the
        archived bytes, which is what a restore will find.
        """
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = mode
        info.mtime = mtime_ns / 1e9
        info.type = tarfile.REGTYPE
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        digest = hashlib.sha256()
        view = memoryview(self._buffer)
        left, complete = size, True
        while left:
            want = min(COPY_SIZE, left)
            got = source.readinto(view[:want]) if complete else 0
            if not got:
                complete = False
                view[:want] = bytes(want)
                got = want
            digest.update(view[:got])
            self._write(view[:got])
            left -= got
            if on_bytes is not None:
                on_bytes(got)
        self._pad(size)
        return digest.hexdigest(), complete

    def add_bytes(self, name: str, data: bytes, *, mode: int = 0o600) -> str:
        sha, _ = self.add_file(
            name, io.BytesIO(data), size=len(data), mode=mode, mtime_ns=time.time_ns()
        )
        return sha

    def _pad(self, size: int) -> None:
        remainder = size % tarfile.BLOCKSIZE
        if remainder:
            self._write(bytes(tarfile.BLOCKSIZE - remainder))

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole tar record."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        remainder = self.written % tarfile.RECORDSIZE
        if remainder:
            self._write(bytes(tarfile.RECORDSIZE - remainder))


def tar_members(source: BinaryIO, *, label: str) -> Iterator[tuple[tarfile.TarInfo, BinaryIO]]:
    """Each member of a tar stream with a reader for its content (read it before the next).

    A damaged or truncated stream raises ComponentError naming `label`.
    """
    try:
        archive = tarfile.open(fileobj=source, mode="r|", bufsize=COPY_SIZE)
        while True:
            member = archive.next()
            if member is None:
                return
            # Stream mode appends every member to `members`; nothing here needs them again.
            archive.members.clear()
            content = archive.extractfile(member) if member.isreg() else None
            yield member, content if content is not None else io.BytesIO()
    except (tarfile.TarError, EOFError) as exc:
        raise ComponentError(
            f"{label}: the tar stream is damaged or truncated ({exc})", "artifact_damaged"
        ) from exc


def copy_member(
    member: tarfile.TarInfo, content: BinaryIO, fd: int, *, label: str, on_bytes: OnBytes
) -> str:
    """Write a member's content to `fd`; its SHA-256. Short content is a truncated stream."""
    digest = hashlib.sha256()
    written = 0
    try:
        while True:
            chunk = content.read(COPY_SIZE)
            if not chunk:
                break
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
            on_bytes(len(chunk))
    except (tarfile.TarError, EOFError) as exc:
        raise ComponentError(
            f"{label}: {member.name}: the tar stream is damaged or truncated ({exc})",
            "artifact_damaged",
        ) from exc
    if written != member.size:
        raise ComponentError(
            f"{label}: {member.name}: {written} of {member.size} bytes (truncated)",
            "artifact_damaged",
        )
    return digest.hexdigest()


def read_member(member: tarfile.TarInfo, content: BinaryIO, *, label: str, limit: int) -> bytes:
    """A small member's whole content (an index, a settings document)."""
    if member.size > limit:
        raise ComponentError(f"{label}: {member.name} is larger than expected", "artifact_damaged")
    try:
        data = content.read()
    except (tarfile.TarError, EOFError) as exc:
        raise ComponentError(
            f"{label}: {member.name}: the tar stream is damaged or truncated ({exc})",
            "artifact_damaged",
        ) from exc
    if len(data) != member.size:
        raise ComponentError(f"{label}: {member.name} is truncated", "artifact_damaged")
    return data


def read_index(member: tarfile.TarInfo, content: BinaryIO, *, label: str) -> dict[str, Any]:
    """An artifact's `index.json` member."""
    try:
        index = json.loads(read_member(member, content, label=label, limit=1 << 31))
    except ValueError as exc:
        raise ComponentError(f"{label}: its index is not JSON", "artifact_damaged") from exc
    if not isinstance(index, dict):
        raise ComponentError(f"{label}: its index is not an object", "artifact_damaged")
    return index


def safe_relpath(rel: Any, *, allow_root: bool = False) -> bool:
    """Whether `rel` is a relative POSIX path that stays inside its tree (no '..', no '/')."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return False
    if rel == ".":
        return allow_root
    if rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def link_inside(rel: str, target: Any) -> bool:
    """Whether the symlink `rel` -> `target` resolves inside the tree, judged on the text."""
    if not isinstance(target, str) or not target or "\x00" in target or target.startswith("/"):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    return resolved != ".." and not resolved.startswith("../") and not resolved.startswith("/")


def open_new(path: Path) -> int:
    """A new file for writing that is not reached through a symlink (O_EXCL | O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o600)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- Walking MEDIA_ROOT ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    rel: str
    path: str
    kind: str  # "dir", "file", "link"
    stat: os.stat_result


def _printable(rel: str) -> str:
    """A path for a note: undecodable bytes as \\xNN, so the note stays valid JSON text."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _walk(root: Path, skipped: list[dict[str, str]]) -> Iterator[_Entry]:
    """Everything under root, never following a symlink; skipped entries are noted."""
    pending = [("", str(root))]
    while pending:
        rel_dir, abs_dir = pending.pop()
        with os.scandir(abs_dir) as scan:
            entries = sorted(scan, key=lambda item: item.name)
        for item in entries:
            name = item.name
            if not rel_dir and name.startswith((STAGING, OLD)):
                continue  # a restore's own staging area inside a mount point
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                skipped.append({"path": _printable(rel), "reason": "name is not valid UTF-8"})
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while we walked: as if it had gone before
            if stat.S_ISDIR(info.st_mode):
                yield _Entry(rel, item.path, "dir", info)
                pending.append((rel, item.path))
            elif stat.S_ISREG(info.st_mode):
                yield _Entry(rel, item.path, "file", info)
            elif stat.S_ISLNK(info.st_mode):
                yield _Entry(rel, item.path, "link", info)
            else:
                skipped.append({"path": rel, "reason": "not a regular file (socket, FIFO, device)"})


def _dir_meta(info: os.stat_result) -> dict[str, int]:
    return {"mode": stat.S_IMODE(info.st_mode) & MODE_MASK, "mtime_ns": info.st_mtime_ns}


def _hash_rest(handle: BinaryIO, on_bytes: OnBytes) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while chunk := handle.read(COPY_SIZE):
        digest.update(chunk)
        total += len(chunk)
        on_bytes(len(chunk))
    return digest.hexdigest(), total


def _read_up_to(handle: BinaryIO, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = handle.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


# --- The handler -------------------------------------------------------------------------------


class UploadsHandler(ComponentHandler):
    """MEDIA_ROOT, file by file (see the module docstring)."""

    component = "uploads"

    def units(self) -> list[Unit] | str:
        root = Path(settings.MEDIA_ROOT)
        if not root.is_dir():
            return f"MEDIA_ROOT {root} does not exist"
        return [Unit(component=self.component, name="uploads")]

    # Backup

    def backup(
        self, unit: Unit, out: BinaryIO, *, parent: dict[str, Any] | None, on_bytes: OnBytes
    ) -> dict[str, Any]:
        root = Path(os.path.realpath(settings.MEDIA_ROOT))
        if not root.is_dir():
            raise ComponentError(f"MEDIA_ROOT {root} does not exist", "uploads_missing")
        previous: dict[str, Any] = {}
        if parent is not None:
            if parent.get("format") != FORMAT or not isinstance(parent.get("files"), dict):
                raise ComponentError(
                    "the parent backup's uploads manifest is not one this version reads",
                    "parent_unreadable",
                )
            previous = parent["files"]

        writer = TarWriter(out)
        files: dict[str, dict[str, Any]] = {}
        dirs: dict[str, dict[str, int]] = {".": _dir_meta(root.stat())}
        links: dict[str, str] = {}
        changed: list[str] = []
        skipped: list[dict[str, str]] = []
        warnings: list[str] = []
        archived_bytes = 0
        for entry in _walk(root, skipped):
            if entry.kind == "dir":
                dirs[entry.rel] = _dir_meta(entry.stat)
            elif entry.kind == "link":
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue
                if link_inside(entry.rel, target):
                    links[entry.rel] = target
                else:
                    skipped.append(
                        {"path": entry.rel, "reason": "symlink pointing outside MEDIA_ROOT"}
                    )
            else:
                meta, archived = self._file(writer, entry, previous.get(entry.rel), on_bytes)
                if meta is None:
                    continue
                if meta.pop("changed_while_read", False):
                    warnings.append(f"{entry.rel}: changed while being read")
                files[entry.rel] = meta
                if archived:
                    changed.append(entry.rel)
                    archived_bytes += meta["size"]

        manifest = {
            "format": FORMAT,
            "incremental": parent is not None,
            "root": str(root),
            "files": files,
            "dirs": dirs,
            "links": links,
            "changed": sorted(changed),
            "deleted": sorted(set(previous) - set(files)),
            "count": len(files),
            "bytes": sum(item["size"] for item in files.values()),
            "archived_count": len(changed),
            "archived_bytes": archived_bytes,
            "skipped": skipped,
            "warnings": warnings,
        }
        index = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        writer.add_bytes(INDEX, index.encode())
        writer.close()
        return manifest

    def _file(
        self,
        writer: TarWriter,
        entry: _Entry,
        old: dict[str, Any] | None,
        on_bytes: OnBytes,
    ) -> tuple[dict[str, Any] | None, bool]:
        """The file's listing entry, and whether its content went into this artifact."""
        info = entry.stat
        if (
            old is not None
            and not old.get("racy")
            and old.get("size") == info.st_size
            and old.get("mtime_ns") == info.st_mtime_ns
        ):
            # Unchanged by its stat: trusted without reading (see "racy" above).
            return self._meta(info, old["sha256"]), False
        # O_NONBLOCK: a file swapped for a FIFO since the walk must not hang the backup.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(entry.path, flags)
        except FileNotFoundError:
            return None, False  # deleted since the walk saw it
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None, False  # replaced by a symlink since the walk: not followed
            raise ComponentError(f"uploads: cannot read {entry.rel}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb", buffering=0) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None, False
            size = info.st_size
            source: BinaryIO = handle
            if old is not None:
                # Changed by its stat (or racy): archived only if the content differs.
                if size <= IN_MEMORY:
                    data = _read_up_to(handle, size)
                    on_bytes(len(data))
                    sha = hashlib.sha256(data).hexdigest()
                    if sha == old.get("sha256") and len(data) == size:
                        return self._meta(info, sha), False
                    source = io.BytesIO(data)
                else:
                    sha, read = _hash_rest(handle, on_bytes)
                    if sha == old.get("sha256") and read == size:
                        return self._meta(info, sha), False
                    handle.seek(0)
            mode = stat.S_IMODE(info.st_mode) & MODE_MASK
            sha, complete = writer.add_file(
                DATA + entry.rel,
                source,
                size=size,
                mode=mode,
                mtime_ns=info.st_mtime_ns,
                on_bytes=on_bytes if source is handle else None,
            )
            after = os.fstat(handle.fileno())
        meta = self._meta(info, sha)
        if not complete or (after.st_size, after.st_mtime_ns) != (size, info.st_mtime_ns):
            # What was archived may mix two versions; the next incremental must hash it again.
            meta["racy"] = True
            meta["changed_while_read"] = True
        return meta, True

    @staticmethod
    def _meta(info: os.stat_result, sha: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "sha256": sha,
            "size": info.st_size,
            "mode": stat.S_IMODE(info.st_mode) & MODE_MASK,
            "mtime_ns": info.st_mtime_ns,
        }
        if time.time_ns() - info.st_mtime_ns < RACY_NS:
            meta["racy"] = True
        return meta

    # Restore

    def preflight(self, unit: Unit, manifest: dict[str, Any], *, destination: Destination) -> None:
        _check_manifest(manifest)
        if not destination.live:
            if destination.scratch_dir is None:
                raise RestoreRefused("uploads: a scratch restore needs a scratch directory")
            return
        root = Path(os.path.realpath(settings.MEDIA_ROOT))
        existing = root.parent
        while not existing.exists():  # a rebuilt host: the missing directories will be made
            existing = existing.parent
        space = shutil.disk_usage(existing).free
        needed = int(manifest.get("bytes", 0)) + 16 * 1024 * 1024
        if space < needed:
            raise RestoreRefused(
                f"uploads: {needed} bytes are needed beside {root} to stage the restore, "
                f"{space} are free",
                "no_space",
            )

    def restore(
        self,
        unit: Unit,
        manifests: list[dict[str, Any]],
        chain: list[Opener],
        *,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        if not manifests or len(manifests) != len(chain):
            raise ComponentError("uploads: the chain and its manifests do not match")
        for manifest in manifests:
            _check_manifest(manifest)
        if manifests[0].get("incremental"):
            raise ComponentError("uploads: the chain does not start with a full backup")
        if any(not manifest.get("incremental") for manifest in manifests[1:]):
            raise ComponentError("uploads: a full backup in the middle of the chain")
        self.preflight(unit, manifests[-1], destination=destination)
        target = self._target(destination)
        staging, inside = _staging_for(target)
        try:
            _extract_chain(manifests, chain, staging, on_bytes)
            _shape_tree(manifests[-1], staging)
            if destination.live:
                os.sync()  # every restored byte on disk before the old tree goes
            _swap_in(staging, target, inside, manifests[-1]["dirs"]["."])
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = manifests[-1]
        return {
            "root": str(target),
            "files": final["count"],
            "bytes": final["bytes"],
            "links": len(final["links"]),
            "artifacts": len(chain),
            "skipped_at_backup": final.get("skipped", []),
        }

    def _target(self, destination: Destination) -> Path:
        if destination.live:
            return Path(os.path.realpath(settings.MEDIA_ROOT))
        if destination.scratch_dir is None:
            raise RestoreRefused("uploads: a scratch restore needs a scratch directory")
        return Path(destination.scratch_dir) / "uploads"

    # Drill

    def check(
        self, unit: Unit, manifest: dict[str, Any], *, destination: Destination
    ) -> dict[str, Any]:
        root = self._target(Destination(live=False, scratch_dir=destination.scratch_dir))
        if not root.is_dir():
            return {
                "ok": False,
                "checks": [
                    {"name": "restored", "expected": str(root), "actual": "missing", "ok": False}
                ],
            }
        checks = compare_tree(root, manifest)
        return {"ok": all(item["ok"] for item in checks), "checks": checks}

    def discard(self, unit: Unit, *, destination: Destination) -> None:
        if destination.live or destination.scratch_dir is None:
            return
        root = Path(destination.scratch_dir) / "uploads"
        shutil.rmtree(root, ignore_errors=True)


def compare_tree(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file's SHA-256, mode and mtime, every directory and symlink, against a manifest."""
    skipped: list[dict[str, str]] = []
    files: dict[str, dict[str, Any]] = {}
    dirs: dict[str, dict[str, int]] = {".": _dir_meta(root.stat())}
    links: dict[str, str] = {}
    for entry in _walk(root, skipped):
        if entry.kind == "dir":
            dirs[entry.rel] = _dir_meta(entry.stat)
        elif entry.kind == "link":
            links[entry.rel] = os.readlink(entry.path)
        else:
            with open(entry.path, "rb") as handle:
                sha, _ = _hash_rest(handle, lambda count: None)
            files[entry.rel] = {
                "sha256": sha,
                "size": entry.stat.st_size,
                "mode": stat.S_IMODE(entry.stat.st_mode) & MODE_MASK,
                "mtime_ns": entry.stat.st_mtime_ns,
            }
    expected: dict[str, dict[str, Any]] = manifest["files"]
    both = sorted(set(expected) & set(files))

    def differing(field: str) -> list[str]:
        return [rel for rel in both if files[rel][field] != expected[rel][field]]

    def check(name: str, expected_value: Any, actual: Any, paths: list[str] | None = None) -> dict:
        item = {"name": name, "expected": expected_value, "actual": actual}
        item["ok"] = expected_value == actual
        if paths:
            item["paths"] = paths[:20]
        return item

    missing = sorted(set(expected) - set(files))
    extra = sorted(set(files) - set(expected))
    sha_bad, mode_bad, mtime_bad = differing("sha256"), differing("mode"), differing("mtime_ns")
    dirs_bad = sorted(
        rel
        for rel in set(dirs) | set(manifest["dirs"])
        if dirs.get(rel) != manifest["dirs"].get(rel)
    )
    return [
        check("files", len(expected), len(files)),
        check("bytes", manifest["bytes"], sum(item["size"] for item in files.values())),
        check("missing files", 0, len(missing), missing),
        check("extra files", 0, len(extra), extra),
        check("sha256", 0, len(sha_bad), sha_bad),
        check("mode", 0, len(mode_bad), mode_bad),
        check("mtime", 0, len(mtime_bad), mtime_bad),
        check("directories", 0, len(dirs_bad), dirs_bad),
        check("symlinks", manifest["links"], links),
    ]


# --- Restore internals -------------------------------------------------------------------------


def _check_manifest(manifest: dict[str, Any]) -> None:
    """A manifest comes from the catalog: its paths are checked like the artifact's names."""
    if manifest.get("format") != FORMAT:
        raise RestoreRefused("uploads: the manifest is not one this version restores")
    files, dirs, links = manifest.get("files"), manifest.get("dirs"), manifest.get("links")
    if not isinstance(files, dict) or not isinstance(dirs, dict) or not isinstance(links, dict):
        raise RestoreRefused("uploads: the manifest lacks its listing")
    if "." not in dirs:
        raise RestoreRefused("uploads: the manifest lacks the root directory")
    for rel, meta in files.items():
        if not safe_relpath(rel):
            raise RestoreRefused(f"uploads: refused path in the manifest: {rel!r}")
        if (
            not isinstance(meta, dict)
            or not _SHA256.fullmatch(str(meta.get("sha256", "")))
            or not isinstance(meta.get("mode"), int)
            or not 0 <= meta["mode"] <= MODE_MASK
            or not isinstance(meta.get("mtime_ns"), int)
            or not isinstance(meta.get("size"), int)
        ):
            raise RestoreRefused(f"uploads: malformed manifest entry for {rel!r}")
    for rel, meta in dirs.items():
        if not safe_relpath(rel, allow_root=True) or not isinstance(meta, dict):
            raise RestoreRefused(f"uploads: refused directory in the manifest: {rel!r}")
    for rel, target in links.items():
        if not safe_relpath(rel) or not link_inside(rel, target):
            raise RestoreRefused(f"uploads: refused symlink in the manifest: {rel!r} -> {target!r}")
    for key in ("changed", "deleted"):
        names = manifest.get(key)
        if not isinstance(names, list) or not all(safe_relpath(rel) for rel in names):
            raise RestoreRefused(f"uploads: refused `{key}` list in the manifest")


def _staging_for(target: Path) -> tuple[Path, bool]:
    """A new empty staging directory on the destination's filesystem; True when inside it.

    Beside the destination when possible (one rename swaps the trees); inside it when the
    destination is a mount point or its parent is not writable (a container volume).
    """
    token = uuid.uuid4().hex[:12]
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    inside = target.is_dir() and (
        os.path.ismount(target) or target.stat().st_dev != parent.stat().st_dev
    )
    if not inside:
        staging = parent / f".{target.name}{STAGING}{token}"
        try:
            staging.mkdir(mode=0o700)
            return staging, False
        except PermissionError:
            if not target.is_dir():
                raise
    staging = target / f"{STAGING}{token}"
    staging.mkdir(mode=0o700)
    return staging, True


def _member_rel(member: tarfile.TarInfo, label: str) -> str:
    name = member.name
    if not member.isreg():
        kinds = [
            (member.issym, "symlink"),
            (member.islnk, "hard link"),
            (member.isfifo, "FIFO"),
            (member.isdev, "device"),
            (member.isdir, "directory"),
        ]
        kind = next((name for test, name in kinds if test()), "special file")
        raise ComponentError(f"{label}: refused tar member {name!r}: a {kind}", "member_refused")
    rel = name[len(DATA) :] if name.startswith(DATA) else ""
    if not safe_relpath(rel):
        raise ComponentError(
            f"{label}: refused tar member {name!r}: not a relative path inside the tree",
            "member_refused",
        )
    return rel


def _make_parents(staging: Path, rel: str) -> Path:
    """The file's path in staging, its directories made; a file in the way is a conflict."""
    current = staging
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            current.mkdir(mode=0o700)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise ComponentError(
                    f"uploads: {rel}: a file stands where a directory is needed"
                ) from None
    return current / rel.rsplit("/", 1)[-1]


def _extract_chain(
    manifests: list[dict[str, Any]], chain: list[Opener], staging: Path, on_bytes: OnBytes
) -> None:
    """Each artifact's deletions, then its changed files, verified against its manifest."""
    written: dict[str, str] = {}
    for number, (manifest, opener) in enumerate(zip(manifests, chain, strict=True), 1):
        label = f"uploads artifact {number} of {len(chain)}"
        listed: dict[str, Any] = manifest["files"]
        expected = set(manifest["changed"])
        seen: set[str] = set()
        index: dict[str, Any] | None = None
        # Deletions first: a path deleted here may be a directory that becomes a file (or the
        # reverse) in this very artifact; no path is both deleted and changed.
        for rel in manifest["deleted"]:
            _remove_file(staging, rel)
            written.pop(rel, None)
        source = opener()
        try:
            for member, content in tar_members(source, label=label):
                if index is not None:
                    raise ComponentError(f"{label}: member {member.name!r} after the index")
                if member.name == INDEX and member.isreg():
                    index = read_index(member, content, label=label)
                    continue
                rel = _member_rel(member, label)
                if rel not in expected or rel in seen:
                    raise ComponentError(
                        f"{label}: member {rel!r} is not listed as changed", "member_refused"
                    )
                path = _make_parents(staging, rel)
                if path.is_symlink() or path.exists():
                    if path.is_dir() and not path.is_symlink():
                        raise ComponentError(f"uploads: {rel}: a directory stands in the way")
                    path.unlink()
                fd = open_new(path)
                try:
                    sha = copy_member(member, content, fd, label=label, on_bytes=on_bytes)
                finally:
                    os.close(fd)
                if sha != listed[rel]["sha256"]:
                    raise ComponentError(
                        f"{label}: {rel}: SHA-256 {sha} differs from the manifest's", "sha_mismatch"
                    )
                written[rel] = sha
                seen.add(rel)
        finally:
            with contextlib.suppress(Exception):
                source.close()
        if index is None:
            raise ComponentError(f"{label}: the stream ends before its index (truncated)")
        if any(index.get(key) != manifest.get(key) for key in _LISTING_KEYS):
            raise ComponentError(f"{label}: the artifact's index differs from the catalog's")
        if expected - seen:
            missing = sorted(expected - seen)
            raise ComponentError(f"{label}: {len(missing)} changed files missing: {missing[:5]}")

    final: dict[str, Any] = manifests[-1]["files"]
    if set(written) != set(final):
        missing = sorted(set(final) - set(written))
        extra = sorted(set(written) - set(final))
        raise ComponentError(
            f"uploads: the chain does not rebuild the listing (missing {missing[:5]}, "
            f"left over {extra[:5]})",
            "chain_inconsistent",
        )
    wrong = [rel for rel, sha in written.items() if final[rel]["sha256"] != sha]
    if wrong:
        raise ComponentError(
            f"uploads: SHA-256 differs from the last manifest for {wrong[:5]}", "sha_mismatch"
        )


def _remove_file(staging: Path, rel: str) -> None:
    """Remove a deleted file and the directories that only it kept."""
    path = staging.joinpath(*rel.split("/"))
    if not (path.is_symlink() or path.is_file()):
        return
    path.unlink()
    parent = path.parent
    while parent != staging:
        try:
            parent.rmdir()
        except OSError:
            return  # not empty
        parent = parent.parent


def _shape_tree(manifest: dict[str, Any], staging: Path) -> None:
    """Directories (empty ones too), symlinks, then modes and times (directories last)."""
    dirs: dict[str, dict[str, int]] = manifest["dirs"]
    for rel in sorted(dirs):
        if rel != ".":
            path = _make_parents(staging, f"{rel}/x").parent
            if not path.is_dir():
                path.mkdir(mode=0o700)
    # Directories only the chain's deletions emptied are not in the listing: removed.
    for current, subdirs, _ in os.walk(staging, topdown=False):
        for name in subdirs:
            path = Path(current) / name
            rel = path.relative_to(staging).as_posix()
            if rel not in dirs and not path.is_symlink():
                try:
                    path.rmdir()
                except OSError:
                    raise ComponentError(
                        f"uploads: {rel} holds files but is not in the listing"
                    ) from None
    for rel, target in manifest["links"].items():
        path = _make_parents(staging, rel)
        if path.exists() or path.is_symlink():
            raise ComponentError(f"uploads: {rel}: a symlink and a file share the name")
        os.symlink(target, path)
    for rel, meta in manifest["files"].items():
        path = staging.joinpath(*rel.split("/"))
        os.chmod(path, meta["mode"])
        os.utime(path, ns=(meta["mtime_ns"], meta["mtime_ns"]))
    # Deepest first and the root last: a directory's mode may forbid writing into it.
    order = sorted((rel for rel in dirs if rel != "."), key=lambda item: -item.count("/"))
    for rel in [*order, "."]:
        path = staging if rel == "." else staging.joinpath(*rel.split("/"))
        os.chmod(path, dirs[rel]["mode"])
        os.utime(path, ns=(dirs[rel]["mtime_ns"], dirs[rel]["mtime_ns"]))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _swap_in(staging: Path, target: Path, inside: bool, root_meta: dict[str, int]) -> None:
    """Make the staged tree the destination; on failure the destination is as it was."""
    if inside:
        _swap_contents(staging, target, root_meta)
        return
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        fsync_dir(target.parent)
        return
    if _exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old tree
        return
    old = target.parent / f".{target.name}{OLD}{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _swap_contents(staging: Path, target: Path, root_meta: dict[str, int]) -> None:
    """The destination is a mount point: move its entries aside and the staged ones in, one
    rename each, all moved back if one fails."""
    old = target / f"{OLD}{uuid.uuid4().hex[:12]}"
    old.mkdir(mode=0o700)
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for name in os.listdir(target):
            if not name.startswith((STAGING, OLD)):
                os.rename(target / name, old / name)
                moved_old.append(name)
        for name in os.listdir(staging):
            os.rename(staging / name, target / name)
            moved_new.append(name)
    except BaseException:
        for name in moved_new:
            os.rename(target / name, staging / name)
        for name in moved_old:
            os.rename(old / name, target / name)
        old.rmdir()
        raise
    fsync_dir(target)
    shutil.rmtree(old, ignore_errors=True)
    staging.rmdir()
    os.chmod(target, root_meta["mode"])
    os.utime(target, ns=(root_meta["mtime_ns"], root_meta["mtime_ns"]))


register(UploadsHandler())
