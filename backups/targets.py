"""Where backup copies go: the targets of settings.BACKUP_TARGETS, each a Django storage
backend with a media type and an offsite flag.

Every copy is written under a temporary name in its final directory (".tmp-<uuid>-<name>"),
read back and hashed, and only renamed into place when its SHA-256 matches; a mismatch removes
the temporary copy. So a name under a target always holds a complete, verified copy.

Backends:
- FileSystemStorage: os.pwrite, fsync, read back and hash (then the pages are dropped from the
  cache), os.replace and an fsync of the directory; files 0o600 and directories 0o700 unless
  the options say otherwise.
- SFTPStorage (django-storages, paramiko): uploads in segments, each one retried on its own
  (a dropped connection resumes at the segment it was in, not at byte 0), read back over SFTP,
  then posix-rename. Connections time out (a hung server fails, it does not hang the backup).
- Any other storage: the Storage API (save the temporary name, verify, save the final name,
  verify it, delete the temporary one): there is no rename to rely on.

Remote targets (offsite, or any backend but the local file system) run every network or I/O
operation through recovery.retry.call under the service "backup-target-<name>": back-off with
jitter, the retry budget, and the circuit breaker, whose state and statistics show in the
recovery status. Errors are TargetError naming the target and what failed; their text is
redacted and never holds the target's password (a StoredSecret named by the spec's "secret").
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage
from django.utils.module_loading import import_string

from compliance.redaction import REDACTED, redact_text
from recovery import breaker, retry

T = TypeVar("T")

TEMP_PREFIX = ".tmp-"
BLOCK = 1024 * 1024  # local reads and writes
# One retried unit of a remote transfer: small enough that a retry repeats little and each
# call stays well under the breaker's slow-call threshold on a decent link, large enough that
# opening the remote file per segment costs nothing measurable.
SEGMENT = 8 * 1024 * 1024
IO_TIMEOUT = 60.0  # seconds without an answer before a remote operation fails
SFTP_DEFAULT_PARAMS = {"timeout": 30.0, "banner_timeout": 30.0, "auth_timeout": 30.0}
FILESYSTEM = "django.core.files.storage.FileSystemStorage"
SFTP = "storages.backends.sftpstorage.SFTPStorage"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
_SPEC_KEYS = {
    "backend",
    "options",
    "media",
    "offsite",
    "secret",
    "secret_option",
    "retry",
    "timeout",
}
_RETRY_KEYS = {"max_retries", "base_delay", "cap", "deadline", "jitter"}


class TargetError(Exception):
    """A target operation failed; the message names the target and what failed, never a
    password."""

    def __init__(self, target: str, message: str) -> None:
        self.target = target
        super().__init__(f"target {target}: {message}")


class _Transient(Exception):
    """A failure worth retrying (a connection, a timeout, an I/O error); text redacted."""


class _Permanent(Exception):
    """A failure a retry would repeat (not found, denied, bad credentials); text redacted."""


class _Short(Exception):
    """A remote file ended before its size said."""


def _is_permanent(exc: BaseException) -> bool:
    try:
        import paramiko

        ssh_permanent: tuple = (paramiko.AuthenticationException, paramiko.BadHostKeyException)
    except ImportError:
        ssh_permanent = ()
    return isinstance(
        exc,
        (
            FileNotFoundError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            FileExistsError,
            ImproperlyConfigured,
            SuspiciousFileOperation,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            LookupError,
            _Short,
            *ssh_permanent,
        ),
    )


def check_location(location: str) -> str:
    """A relative POSIX path without "..", empty parts or a temporary name; ValueError if not."""
    parts = location.split("/")
    if (
        not location
        or location.startswith("/")
        or "\\" in location
        or "\x00" in location
        or any(part in ("", ".", "..") for part in parts)
        or parts[-1].startswith(TEMP_PREFIX)
    ):
        raise ValueError(f"not a valid backup location: {location!r}")
    return location


def temporary_name(location: str) -> str:
    """The temporary name of `location`: same directory, ".tmp-<uuid>-<name>"."""
    head, _, tail = location.rpartition("/")
    temp = f"{TEMP_PREFIX}{uuid.uuid4().hex}-{tail}"
    return f"{head}/{temp}" if head else temp


def _hash_stream(stream: Any) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    readinto = getattr(stream, "readinto", None)
    while True:
        if readinto is not None:
            got = readinto(view)
            if not got:
                break
            digest.update(view[:got])
        else:
            data = stream.read(BLOCK)
            if not data:
                break
            digest.update(data)
    return digest.hexdigest()


# --- Uploads ------------------------------------------------------------------------------------


class _PositionalWriter(io.RawIOBase):
    """A writable file sending what it is given to `write_at(offset, bytes-like)` in pieces of
    at least `size` bytes (smaller writes are gathered first) and, for large writes, at most
    `limit`: each piece can be written again at the same offset if an attempt fails."""

    def __init__(self, write_at: Callable[[int, Any], None], size: int, limit: int) -> None:
        super().__init__()
        self._write_at = write_at
        self._size = size
        self._limit = limit
        self._buffer = bytearray()
        self.offset = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed upload")
        view = memoryview(data).cast("B")
        count = len(view)
        if self._buffer or count < self._size:
            self._buffer += view
            if len(self._buffer) >= self._size:
                self.flush()
            return count
        while len(view):  # large: straight from the caller's memory, no copy
            piece = view[: self._limit]
            self._send(piece)
            view = view[len(piece) :]
        return count

    def flush(self) -> None:
        if self._buffer:
            self._send(self._buffer)
            self._buffer = bytearray()

    def _send(self, data: Any) -> None:
        self._write_at(self.offset, data)
        self.offset += len(data)

    def close(self) -> None:
        # Closing does not send: what was not flushed is abandoned with the upload.
        self._buffer = bytearray()
        super().close()


class Upload(ABC):
    """A copy being written under its temporary name: write to `file`, then `commit` (read
    back, compare, rename into place) or `abort`. As a context manager, leaving without a
    commit aborts."""

    file: BinaryIO

    def __init__(self, target: Target, location: str) -> None:
        self.target = target
        self.location = check_location(location)
        self.temporary = temporary_name(location)
        self._done = False

    @abstractmethod
    def commit(self, *, sha256: str) -> None:
        """Make the copy visible under its name if its read-back SHA-256 is `sha256`; else
        TargetError, and the temporary copy is removed."""

    @abstractmethod
    def abort(self) -> None:
        """Remove the temporary copy (idempotent)."""

    def _start_commit(self) -> None:
        if self._done:
            raise TargetError(self.target.name, f"{self.location}: upload already finished")
        self._done = True

    def _mismatch(self, expected: str, found: str) -> TargetError:
        return TargetError(
            self.target.name,
            f"{self.location}: the copy read back has SHA-256 {found}, not {expected}; "
            "it was discarded",
        )

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if not self._done:
            self.abort()


# --- Targets ------------------------------------------------------------------------------------


class Target(ABC):
    """One configured target. `remote`: its operations go through the retry executor and the
    circuit breaker of `service`."""

    name: str
    media: str
    offsite: bool
    remote: bool
    backend: str

    def __init__(self, name: str, spec: dict) -> None:
        self.name = name
        self.backend = spec["backend"]
        self.media = spec.get("media", "disk")
        self.offsite = bool(spec.get("offsite", False))
        self.options = copy.deepcopy(spec.get("options") or {})
        self.secret_name = spec.get("secret") or ""
        self.timeout = float(spec.get("timeout") or IO_TIMEOUT)
        self._retry = dict(spec.get("retry") or {})
        self._secrets: set[str] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.media}, offsite={self.offsite})>"

    @property
    def service(self) -> str:
        """The retry/breaker service name of this target."""
        return f"backup-target-{self.name}"

    def policy(self) -> retry.RetryPolicy:
        """The settings' retry policy with the spec's "retry" overrides (seconds)."""
        return retry.default_policy(retry_on=(_Transient,), **self._retry)

    # The contract

    @abstractmethod
    def begin(self, location: str) -> Upload:
        """A writable copy under a temporary name, committed by Upload.commit."""

    def put(
        self,
        path: Path,
        location: str,
        *,
        sha256: str,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a finished local file; TargetError if it cannot be stored and verified."""
        with self.begin(location) as upload, open(path, "rb") as source:
            buffer = bytearray(BLOCK)
            view = memoryview(buffer)
            while got := source.readinto(view):
                upload.file.write(view[:got])
                if on_bytes is not None:
                    on_bytes(got)
            upload.commit(sha256=sha256)

    @abstractmethod
    def open(self, location: str) -> BinaryIO:
        """The copy at `location`, for reading; TargetError when it is missing."""

    @abstractmethod
    def sha256(self, location: str) -> str:
        """Read the copy back and hash it; TargetError when it is missing."""

    @abstractmethod
    def size(self, location: str) -> int: ...

    @abstractmethod
    def exists(self, location: str) -> bool: ...

    @abstractmethod
    def delete(self, location: str) -> None:
        """Remove the copy; a missing one is fine."""

    def listdir(self, prefix: str) -> list[str]:
        """Every committed location under the directory `prefix` ("" for all), sorted."""
        return sorted(loc for loc, _ in self._walk(prefix) if not _is_temporary(loc))

    def purge_temporaries(self, *, older_than: float) -> list[str]:
        """Remove temporary copies older than `older_than` seconds (left by a worker that died
        mid-copy); returns their names."""
        limit = time.time() - older_than
        stale = [loc for loc, mtime in self._walk("") if _is_temporary(loc) and mtime < limit]
        for location in stale:
            self._delete_any(location)
        return stale

    def local_path(self, location: str) -> Path | None:
        """The copy's path on this machine (file system targets only)."""
        return None

    def close(self) -> None:  # noqa: B027 (optional: only connection-holding targets close)
        """Drop open connections (they are made again when needed)."""

    # For subclasses

    @abstractmethod
    def _walk(self, prefix: str) -> list[tuple[str, float]]:
        """(location, modification time) of every file under `prefix`, temporaries included."""

    @abstractmethod
    def _delete_any(self, location: str, *, once: bool = False) -> None:
        """Delete a committed or temporary file; missing is fine."""

    def _after_failure(self, exc: BaseException) -> None:  # noqa: B027 (an optional hook)
        """A failed attempt: drop what may be broken (a connection) before the next one."""

    def _describe(self, exc: BaseException) -> str:
        text = str(exc)
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, REDACTED)
        text = redact_text(text)
        name = type(exc).__name__
        return (f"{name}: {text}" if text else name)[:400]

    def _call(self, what: str, fn: Callable[[], T], *, once: bool = False) -> T:
        """Run `fn`: through the retry executor and the breaker for a remote target, directly
        otherwise; any failure becomes a TargetError saying `what` failed. `once`: a single
        attempt (cleaning up after a failure, which must not double the wait)."""

        def attempt() -> T:
            try:
                return fn()
            except TargetError:
                raise
            except Exception as exc:
                self._after_failure(exc)
                failure = (_Permanent if _is_permanent(exc) else _Transient)(self._describe(exc))
            # Raised outside the handler: the client's exception (whose text may quote a
            # secret) is not chained to ours, not even as a suppressed __context__.
            raise failure

        if not self.remote:
            try:
                return attempt()
            except (_Transient, _Permanent) as exc:
                raise TargetError(self.name, f"{what} failed: {exc}") from None
        try:
            policy = self.policy()
            if once:
                policy = retry.default_policy(
                    retry_on=(_Transient,), **{**self._retry, "max_retries": 0}
                )
            return retry.call(attempt, service=self.service, policy=policy)
        except retry.RetryExhausted as exc:
            attempts = len(exc.attempts)
            raise TargetError(
                self.name, f"{what} failed after {attempts} attempts: {exc.__cause__}"
            ) from None
        except retry.BudgetExhausted as exc:
            raise TargetError(
                self.name, f"{what} failed (the retry budget is spent): {exc.__cause__}"
            ) from None
        except breaker.BreakerOpen as exc:
            raise TargetError(
                self.name,
                f"{what} refused: circuit breaker {self.service} is {exc.state} "
                f"(next try in {exc.retry_after:.0f}s)",
            ) from None
        except (_Transient, _Permanent) as exc:
            raise TargetError(self.name, f"{what} failed: {exc}") from None

    def _secret(self) -> str:
        """The password of the spec's StoredSecret, read at each connection (a rotated secret
        is used at once)."""
        from security.models import StoredSecret

        found = StoredSecret.objects.filter(name=self.secret_name).first()
        if found is None:
            raise ImproperlyConfigured(f"no StoredSecret named {self.secret_name!r}")
        value = found.value
        self._secrets.add(value)
        return value


def _is_temporary(location: str) -> bool:
    return location.rpartition("/")[2].startswith(TEMP_PREFIX)


# --- The local file system ----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class FileSystemTarget(Target):
    """A directory (FileSystemStorage's location). Remote only if marked offsite (a mount)."""

    def __init__(self, name: str, spec: dict) -> None:
        super().__init__(name, spec)
        if not self.options.get("location"):
            # FileSystemStorage would fall back to MEDIA_ROOT: backups inside what is backed up.
            raise ImproperlyConfigured(f"BACKUP_TARGETS[{name!r}]: needs options.location")
        self.storage = FileSystemStorage(**self.options)
        self.root = Path(self.storage.location)
        self.file_mode = self.options.get("file_permissions_mode") or 0o600
        self.dir_mode = self.options.get("directory_permissions_mode") or 0o700
        self.remote = self.offsite

    def _path(self, location: str) -> Path:
        return Path(self.storage.path(check_location(location)))

    def _makedirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=self.dir_mode)
            except FileExistsError:
                continue  # another backup made it at the same moment
            os.chmod(path, self.dir_mode)  # mkdir's mode is masked by the umask
            _fsync_dir(path.parent)  # the new entry survives a crash

    def begin(self, location: str) -> Upload:
        return _FileUpload(self, location)

    def open(self, location: str) -> BinaryIO:
        path = self._path(location)
        found = self._call(f"open {location}", lambda: _open_or_none(path))
        if found is None:
            raise TargetError(self.name, f"{location}: not found")
        return found

    def sha256(self, location: str) -> str:
        found = self._hash_file(self._path(location), f"read {location}")
        if found is None:
            raise TargetError(self.name, f"{location}: not found")
        return found

    def _hash_file(self, path: Path, what: str) -> str | None:
        """SHA-256 of a file, None if missing; each segment read is a call of its own (short
        calls for the breaker of an offsite mount). Its cached pages are dropped after: a
        backup read once must not push out what the database keeps hot."""

        def open_fd() -> int | None:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None

        fd = self._call(what, open_fd)
        if fd is None:
            return None
        try:
            digest = hashlib.sha256()
            # 1 MiB: copies are read back in parallel, one buffer per thread.
            view = memoryview(bytearray(BLOCK))
            offset = 0
            while got := self._call(what, lambda at=offset: os.preadv(fd, [view], at)):
                digest.update(view[:got])
                offset += got
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return digest.hexdigest()
        finally:
            os.close(fd)

    def size(self, location: str) -> int:
        path = self._path(location)
        found = self._call(f"stat {location}", lambda: _stat_or_none(path))
        if found is None:
            raise TargetError(self.name, f"{location}: not found")
        return found.st_size

    def exists(self, location: str) -> bool:
        path = self._path(location)
        return self._call(f"stat {location}", lambda: _stat_or_none(path)) is not None

    def delete(self, location: str) -> None:
        self._delete_any(check_location(location))

    def _delete_any(self, location: str, *, once: bool = False) -> None:
        path = Path(self.storage.path(location))

        def remove() -> None:
            path.unlink(missing_ok=True)
            # Remove directories left empty (a deleted backup's), never the root.
            parent = path.parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

        self._call(f"delete {location}", remove, once=once)

    def _walk(self, prefix: str) -> list[tuple[str, float]]:
        base = self.root / prefix if prefix else self.root
        if prefix:
            check_location(prefix.rstrip("/"))

        def walk() -> list[tuple[str, float]]:
            found = []
            for directory, _, files in os.walk(base):
                for file in files:
                    path = Path(directory) / file
                    try:
                        mtime = path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    found.append((path.relative_to(self.root).as_posix(), mtime))
            return found

        return self._call(f"list {prefix or '/'}", walk)

    def local_path(self, location: str) -> Path | None:
        return self._path(location)


def _open_or_none(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        return None


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


class _FileUpload(Upload):
    def __init__(self, target: FileSystemTarget, location: str) -> None:
        super().__init__(target, location)
        self.final = target._path(location)
        self.path = Path(target.storage.path(self.temporary))

        def create() -> int:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            for _ in range(3):
                target._makedirs(self.path.parent)
                try:
                    fd = os.open(self.path, flags, target.file_mode)
                    break
                except FileNotFoundError:
                    continue  # the directory emptied by another copy's delete just now
            else:
                fd = os.open(self.path, flags, target.file_mode)
            os.fchmod(fd, target.file_mode)
            return fd

        self.fd: int | None = target._call(f"create {self.temporary}", create)
        self.file = _PositionalWriter(self._write_at, BLOCK, SEGMENT)

    def _write_at(self, offset: int, data: Any) -> None:
        fd = self.fd
        if fd is None:
            raise ValueError("write to a finished upload")
        self.target._call(f"write {self.temporary}", lambda: _pwrite_all(fd, data, offset))

    def commit(self, *, sha256: str) -> None:
        self._start_commit()
        target = self.target
        try:
            self.file.flush()
            fd = self.fd

            target._call(f"sync {self.temporary}", lambda: os.fsync(fd))
            self._close_fd()
            found = target._hash_file(self.path, f"read back {self.temporary}")
            if found != sha256:
                raise self._mismatch(sha256, found)

            def rename() -> None:
                os.replace(self.path, self.final)
                _fsync_dir(self.final.parent)

            target._call(f"commit {self.location}", rename)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        self._done = True
        self._discard()

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.file.close()

    def _discard(self) -> None:
        self._close_fd()
        try:
            self.target._delete_any(self.temporary, once=True)
        except TargetError:
            pass  # the target is failing anyway; purge_temporaries removes it later


# --- SFTP ---------------------------------------------------------------------------------------


class SFTPTarget(Target):
    """An SFTP server through django-storages' SFTPStorage (host, params, root_path...)."""

    remote = True

    def __init__(self, name: str, spec: dict) -> None:
        super().__init__(name, spec)
        self.host = self.options.get("host") or ""
        if not self.host:
            raise ImproperlyConfigured(f"BACKUP_TARGETS[{name!r}]: SFTP needs options.host")
        self.root_path = self.options.get("root_path") or ""
        self.file_mode = self.options.get("file_mode") or 0o600
        self.dir_mode = self.options.get("dir_mode") or 0o700
        self._lock = threading.Lock()
        self._storage: Any = None
        self._client: Any = None
        self.generation = 0  # bumped at each new connection: file handles of older ones are dead

    def _remote(self, location: str) -> str:
        return posixpath.join(self.root_path, location) if self.root_path else location

    def connection(self) -> tuple[Any, int]:
        """(paramiko SFTPClient, its generation), connecting if needed."""
        with self._lock:
            if self._client is not None:
                transport = self._client.get_channel().get_transport()
                if transport is not None and transport.is_active():
                    return self._client, self.generation
                # The server closed it (restarted, idle timeout): a new one, no failed attempt.
                self._storage.close()
                self._storage = self._client = None
            from storages.backends.sftpstorage import SFTPStorage

            options = copy.deepcopy(self.options)
            params = options.setdefault("params", {})
            for key, value in SFTP_DEFAULT_PARAMS.items():
                params.setdefault(key, value)
            if self.secret_name:
                params["password"] = self._secret()
            options["interactive"] = False  # never prompt on a terminal
            storage = SFTPStorage(**options)
            try:
                client = storage.sftp
                client.get_channel().settimeout(self.timeout)
            except BaseException:
                storage.close()
                raise
            self._storage, self._client = storage, client
            self.generation += 1
            return client, self.generation

    def close(self) -> None:
        with self._lock:
            storage, self._storage, self._client = self._storage, None, None
        if storage is not None:
            try:
                storage.close()
            except Exception:  # noqa: S110 (a dead connection may fail to close; it is dropped)
                pass

    def _after_failure(self, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError | FileExistsError):
            self.close()

    def _makedirs(self, client: Any, directory: str) -> None:
        missing = []
        while directory not in ("", "/", "."):
            try:
                client.stat(directory)
                break
            except FileNotFoundError:
                missing.append(directory)
                directory = posixpath.dirname(directory)
        for path in reversed(missing):
            try:
                client.mkdir(path, self.dir_mode)
            except OSError:
                client.stat(path)  # made by another backup meanwhile (else this raises)
                continue
            client.chmod(path, self.dir_mode)

    def begin(self, location: str) -> Upload:
        return _SFTPUpload(self, location)

    def _stat(self, location: str) -> Any:
        path = self._remote(location)

        def stat_() -> Any:
            client, _ = self.connection()
            try:
                return client.stat(path)
            except FileNotFoundError:
                return None

        return self._call(f"stat {location}", stat_)

    def open(self, location: str) -> BinaryIO:
        check_location(location)
        found = self._stat(location)
        if found is None:
            raise TargetError(self.name, f"{location}: not found")
        return _SFTPReader(self, location, found.st_size)

    def sha256(self, location: str) -> str:
        # Not one retried call around the whole read: each segment is retried on its own.
        with self.open(location) as stream:
            return _hash_stream(stream)

    def size(self, location: str) -> int:
        check_location(location)
        found = self._stat(location)
        if found is None:
            raise TargetError(self.name, f"{location}: not found")
        return found.st_size

    def exists(self, location: str) -> bool:
        check_location(location)
        return self._stat(location) is not None

    def delete(self, location: str) -> None:
        self._delete_any(check_location(location))

    def _delete_any(self, location: str, *, once: bool = False) -> None:
        path = self._remote(location)
        root = self.root_path.rstrip("/")

        def remove() -> None:
            client, _ = self.connection()
            try:
                client.remove(path)
            except FileNotFoundError:
                pass
            parent = posixpath.dirname(path)
            while parent and (not root or parent.startswith(root + "/")):
                try:
                    client.rmdir(parent)
                except OSError:
                    break  # not empty: done
                parent = posixpath.dirname(parent)

        self._call(f"delete {location}", remove, once=once)

    def _walk(self, prefix: str) -> list[tuple[str, float]]:
        if prefix:
            check_location(prefix.rstrip("/"))
        base = self._remote(prefix.rstrip("/")) if prefix else (self.root_path or ".")
        root = self.root_path or "."

        def walk() -> list[tuple[str, float]]:
            client, _ = self.connection()
            found: list[tuple[str, float]] = []
            pending = [base]
            while pending:
                directory = pending.pop()
                try:
                    entries = client.listdir_attr(directory)
                except FileNotFoundError:
                    continue
                for entry in entries:
                    path = posixpath.join(directory, entry.filename)
                    if stat.S_ISDIR(entry.st_mode or 0):
                        pending.append(path)
                    else:
                        relative = posixpath.relpath(path, root)
                        found.append((relative, float(entry.st_mtime or 0)))
            return found

        return self._call(f"list {prefix or '/'}", walk)


class _SFTPUpload(Upload):
    def __init__(self, target: SFTPTarget, location: str) -> None:
        super().__init__(target, location)
        self.path = target._remote(self.temporary)
        self.final = target._remote(location)
        self.file = _PositionalWriter(self._write_at, SEGMENT, SEGMENT)

    def _write_at(self, offset: int, data: Any) -> None:
        target: SFTPTarget = self.target  # type: ignore[assignment]
        payload = bytes(data)  # paramiko wants bytes; also stable across attempts

        def send() -> None:
            client, _ = target.connection()
            if offset == 0:
                for _ in range(3):
                    target._makedirs(client, posixpath.dirname(self.path))
                    try:
                        handle = client.open(self.path, "wb")
                        break
                    except FileNotFoundError:
                        continue  # the directory emptied by another copy's delete just now
                else:
                    handle = client.open(self.path, "wb")
                handle.chmod(target.file_mode)
            else:
                handle = client.open(self.path, "r+b")
            try:
                handle.set_pipelined(True)
                handle.seek(offset)
                handle.write(payload)
            finally:
                handle.close()  # waits for every pipelined write's answer

        target._call(f"upload {self.location}", send)

    def commit(self, *, sha256: str) -> None:
        self._start_commit()
        target: SFTPTarget = self.target  # type: ignore[assignment]
        try:
            if self.file.offset == 0 and not self.file._buffer:
                self.file._send(b"")  # an empty copy still needs its file
            self.file.flush()
            size = self.file.offset
            found = target._stat(self.temporary)
            if found is None or found.st_size != size:
                raise TargetError(
                    target.name,
                    f"{self.location}: the temporary copy is "
                    f"{'missing' if found is None else f'{found.st_size} bytes'}, not {size}",
                )
            with _SFTPReader(target, self.temporary, size) as stream:
                digest = _hash_stream(stream)  # each segment a retried call of its own
            if digest != sha256:
                raise self._mismatch(sha256, digest)

            def rename() -> None:
                client, _ = target.connection()
                try:
                    client.posix_rename(self.path, self.final)
                except FileNotFoundError:
                    # An earlier attempt's rename went through before its answer was lost.
                    if client.stat(self.final).st_size != size:
                        raise
                    try:
                        client.stat(self.path)
                    except FileNotFoundError:
                        return
                    raise

            target._call(f"commit {self.location}", rename)
        except BaseException:
            self._discard()
            raise
        finally:
            self.file.close()

    def abort(self) -> None:
        self._done = True
        self.file.close()
        self._discard()

    def _discard(self) -> None:
        try:
            self.target._delete_any(self.temporary, once=True)
        except TargetError:
            pass  # the target is failing anyway; purge_temporaries removes it later


class _SFTPReader(io.RawIOBase):
    """A remote file read segment by segment, each segment one retried call that (re)opens the
    file at its offset if the connection was made again; memory: one segment."""

    def __init__(self, target: SFTPTarget, location: str, size: int) -> None:
        super().__init__()
        self.target = target
        self.location = location
        self.path = target._remote(location)
        self.size = size
        self.offset = 0  # of the next segment to fetch
        self._parts: deque[bytes] = deque()
        self._current = memoryview(b"")
        self._handle: Any = None
        self._generation = -1

    def readable(self) -> bool:
        return True

    def _fetch(self) -> bool:
        if self.offset >= self.size:
            return False
        offset, end = self.offset, min(self.offset + SEGMENT, self.size)

        def fetch() -> list[bytes]:
            client, generation = self.target.connection()
            if self._handle is None or generation != self._generation:
                self._handle, self._generation = client.open(self.path, "rb"), generation
            handle = self._handle
            handle.seek(offset)
            handle.prefetch(end)  # pipelined reads of this segment only (bounded memory)
            parts, position = [], offset
            while position < end:
                data = handle.read(min(BLOCK, end - position))
                if not data:
                    raise _Short(f"{self.location} ends at {position}, not {self.size}")
                parts.append(data)
                position += len(data)
            return parts

        self._parts = deque(self.target._call(f"download {self.location}", fetch))
        self.offset = end
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not len(self._current):
            if not self._parts and not self._fetch():
                return 0
            self._current = memoryview(self._parts.popleft())
        count = min(len(view), len(self._current))
        view[:count] = self._current[:count]
        self._current = self._current[count:]
        return count

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: S110 (the connection may be gone; nothing to release)
                pass
        super().close()


# --- Any other storage --------------------------------------------------------------------------


class StorageTarget(Target):
    """Any Django storage, through the Storage API only (no rename: save, verify, save the
    final name, verify it). Always remote."""

    remote = True

    def __init__(self, name: str, spec: dict) -> None:
        super().__init__(name, spec)
        self.secret_option = spec.get("secret_option") or "password"
        self._storage: Storage | None = None
        self._class = import_string(self.backend)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            options = copy.deepcopy(self.options)
            if self.secret_name:
                options[self.secret_option] = self._secret()
            self._storage = self._class(**options)
        return self._storage

    def begin(self, location: str) -> Upload:
        return _SpooledUpload(self, location)

    def _save(self, name: str, spool: Any) -> None:
        def save() -> None:
            self.storage.delete(name)  # a failed attempt may have left it: same name again
            spool.seek(0)
            saved = self.storage.save(name, File(spool, name=posixpath.basename(name)))
            if saved != name:
                self.storage.delete(saved)
                raise FileExistsError(f"the storage saved {name} as {saved}")

        self._call(f"upload {name}", save)

    def _hash(self, name: str) -> str:
        def read() -> str:
            with self.storage.open(name, "rb") as stream:
                return _hash_stream(stream)

        return self._call(f"read back {name}", read)

    def open(self, location: str) -> BinaryIO:
        check_location(location)

        def open_() -> Any:
            if not self.storage.exists(location):
                return None
            return self.storage.open(location, "rb")

        found = self._call(f"open {location}", open_)
        if found is None:
            raise TargetError(self.name, f"{location}: not found")
        return found

    def sha256(self, location: str) -> str:
        if not self.exists(location):
            raise TargetError(self.name, f"{location}: not found")
        return self._hash(location)

    def size(self, location: str) -> int:
        check_location(location)
        if not self.exists(location):
            raise TargetError(self.name, f"{location}: not found")
        return self._call(f"stat {location}", lambda: self.storage.size(location))

    def exists(self, location: str) -> bool:
        check_location(location)
        return self._call(f"stat {location}", lambda: self.storage.exists(location))

    def delete(self, location: str) -> None:
        self._delete_any(check_location(location))

    def _delete_any(self, location: str, *, once: bool = False) -> None:
        def remove() -> None:
            try:
                self.storage.delete(location)
            except FileNotFoundError:
                pass

        self._call(f"delete {location}", remove, once=once)

    def _walk(self, prefix: str) -> list[tuple[str, float]]:
        base = prefix.rstrip("/")

        def walk() -> list[tuple[str, float]]:
            found: list[tuple[str, float]] = []
            pending = [base]
            while pending:
                directory = pending.pop()
                try:
                    directories, files = self.storage.listdir(directory)
                except FileNotFoundError:
                    continue
                for sub in directories:
                    pending.append(posixpath.join(directory, sub) if directory else sub)
                for file in files:
                    location = posixpath.join(directory, file) if directory else file
                    try:
                        mtime = self.storage.get_modified_time(location).timestamp()
                    except (NotImplementedError, OSError):
                        # A backend that keeps no modification times (Django's base Storage
                        # raises NotImplementedError for it): treated as old.
                        mtime = 0.0
                    found.append((location, mtime))
            return found

        return self._call(f"list {prefix or '/'}", walk)


class _SpooledUpload(Upload):
    """Spooled to a local temporary file (BACKUP_SCRATCH_DIR), uploaded at commit."""

    def __init__(self, target: StorageTarget, location: str) -> None:
        super().__init__(target, location)
        scratch = Path(settings.BACKUP_SCRATCH_DIR)
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(dir=scratch)  # closed by commit/abort

    def commit(self, *, sha256: str) -> None:
        self._start_commit()
        target: StorageTarget = self.target  # type: ignore[assignment]
        stored_final = False
        try:
            self.file.flush()
            target._save(self.temporary, self.file)
            found = target._hash(self.temporary)
            if found != sha256:
                raise self._mismatch(sha256, found)
            target._save(self.location, self.file)
            stored_final = True
            found = target._hash(self.location)
            if found != sha256:
                raise self._mismatch(sha256, found)
            target._delete_any(self.temporary)
        except BaseException:
            if stored_final:
                try:
                    target._delete_any(self.location, once=True)
                except TargetError:
                    pass
            self.abort()
            raise
        finally:
            self.file.close()

    def abort(self) -> None:
        self._done = True
        self.file.close()
        try:
            self.target._delete_any(self.temporary, once=True)
        except TargetError:
            pass


# --- Configuration ------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: tuple[str, dict[str, Target]] | None = None


def _check_spec(name: str, spec: Any) -> dict:
    where = f"BACKUP_TARGETS[{name!r}]"
    if not isinstance(name, str) or not _NAME.match(name):
        raise ImproperlyConfigured(f"{where}: a target's name is letters, digits, - and _")
    if not isinstance(spec, dict) or not isinstance(spec.get("backend"), str):
        raise ImproperlyConfigured(f"{where}: needs a 'backend' (a storage class path)")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ImproperlyConfigured(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    if not isinstance(spec.get("options", {}), dict):
        raise ImproperlyConfigured(f"{where}: 'options' must be a mapping")
    if not isinstance(spec.get("offsite", False), bool):
        raise ImproperlyConfigured(f"{where}: 'offsite' must be true or false")
    unknown = set(spec.get("retry") or {}) - _RETRY_KEYS
    if unknown:
        raise ImproperlyConfigured(f"{where}: unknown retry keys {', '.join(sorted(unknown))}")
    return spec


def make_target(name: str, spec: dict) -> Target:
    """The Target for one BACKUP_TARGETS entry (no connection is made yet)."""
    spec = _check_spec(name, spec)
    try:
        backend = import_string(spec["backend"])
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"BACKUP_TARGETS[{name!r}]: cannot import {spec['backend']} ({exc})"
        ) from exc
    if isinstance(backend, type) and issubclass(backend, FileSystemStorage):
        return FileSystemTarget(name, spec)
    if spec["backend"] == SFTP or backend.__name__ == "SFTPStorage":
        return SFTPTarget(name, spec)
    return StorageTarget(name, spec)


def _targets() -> dict[str, Target]:
    global _cache
    configured = settings.BACKUP_TARGETS
    key = json.dumps(configured, sort_keys=True, default=str)
    with _cache_lock:
        if _cache is not None and _cache[0] == key:
            return _cache[1]
    made = {name: make_target(name, spec) for name, spec in configured.items()}
    with _cache_lock:
        previous, _cache = _cache, (key, made)
    if previous is not None:
        for target in previous[1].values():
            target.close()
    return made


def configured_targets() -> list[Target]:
    """The targets of settings.BACKUP_TARGETS, in their order (made once per settings value)."""
    return list(_targets().values())


def get_target(name: str) -> Target:
    """The configured target called `name`; TargetError if there is none."""
    found = _targets().get(name)
    if found is None:
        raise TargetError(name, "not configured in BACKUP_TARGETS")
    return found


def monitored_services() -> dict[str, tuple[str, str]]:
    """service name -> ("tcp", "host:port") of every remote target with a network address:
    what the recovery monitor can probe so the target's breaker shows in its status."""
    found = {}
    for target in configured_targets():
        if isinstance(target, SFTPTarget):
            port = (target.options.get("params") or {}).get("port") or 22
            host = f"[{target.host}]" if ":" in target.host else target.host
            found[target.service] = ("tcp", f"{host}:{port}")
    return found
