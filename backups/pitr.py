"""Point-in-time recovery of a PostgreSQL server: base backups, the WAL archive, and replays to
a time or a named restore point.

- `archive_wal` is PostgreSQL's archive_command (`manage.py archive_wal %p %f`): each WAL file
  is compressed and encrypted (backups/stream.py, a data key of its own), written to every
  target (backups/targets.py) under `wal/<system identifier>/<file name>`, read back and
  checked, recorded as a WalSegment row, and only then does the command exit 0. Anything else
  exits 1, so PostgreSQL keeps the file and retries.
- `fetch_wal` is the matching restore_command (`manage.py fetch_wal %f %p`). It needs neither
  the catalog nor the database being restored: the artifacts are self-describing, so the
  archive of Bridge's own database can be replayed after Bridge itself was lost.
- `base_backup` streams `pg_basebackup` (tar, WAL fetched into it) into a backup's artifact.
- `restore_to_time` unpacks a base backup into a new data directory and replays the archive
  there in a postmaster of its own (never the live server), up to a time or a restore point.

PostgreSQL refuses to run as root: when Bridge runs as root, the private postmasters run as
the PostgreSQL OS user (BACKUP_PITR_OS_USER, "postgres") through runuser, in data
directories that user owns; otherwise they run as Bridge's own user.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction

from backups import stream
from backups.models import WalSegment

OnBytes = Callable[[int], None]
BaseOpener = Callable[[], BinaryIO]

MANAGE_PY = Path(settings.BASE_DIR) / "manage.py"
WAL_PREFIX = "wal"
# The file names PostgreSQL archives and asks back: segments, partial segments (a promoted
# standby's last one), timeline histories and backup history files. Anything else is refused:
# the name becomes part of a target location and of a path in pg_wal.
WAL_NAME = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)
SEGMENT_NAME = re.compile(r"^[0-9A-F]{24}$")
# XLogLongPageHeaderData, the header of a segment's first page (native byte order: the file is
# the server's own): magic, info, timeline, page address, remaining length, padding, then the
# system identifier, the segment size and the block size.
_LONG_HEADER = struct.Struct("=HHIQI4xQII")
XLP_LONG_HEADER = 0x0002
COPY_CHUNK = 1024 * 1024
# A base tar's first member is backup_label (PostgreSQL sends it first); this much of the
# stream is kept to read it.
LABEL_PEEK = 64 * 1024
# The exit code fetch_wal uses for "archived, but no copy is usable" (damaged, unreadable
# target, ambiguous): above 125, which PostgreSQL treats like a shell error ("command not
# found") and aborts the recovery, instead of taking it for the end of the archive (exit 1)
# and promoting at the damage.
FETCH_REFUSED_EXIT = 200


class PitrError(Exception):
    """Point-in-time recovery failed or was refused; the message says what and why."""

    def __init__(self, message: str, code: str = "pitr_failed") -> None:
        super().__init__(message)
        self.code = code


class WalArchiveError(PitrError):
    """A WAL file was not archived; PostgreSQL keeps it and retries."""


class WalFetchError(PitrError):
    """A WAL file is archived but no copy could be used: recovery must stop, not promote."""


def archiving_configured() -> bool:
    """True when a PostgreSQL server's WAL is archived (BACKUP_PITR_DATABASE is set)."""
    return bool(settings.BACKUP_PITR_DATABASE)


# --- PostgreSQL binaries, users and private postmasters --------------------------------------


def _versioned_bin_dirs() -> list[tuple[int, Path]]:
    found = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            found.append((int(path.parent.name), path))
    return sorted(found, reverse=True)


def pg_binary(name: str, major: int | None = None) -> str:
    """The path of a PostgreSQL program: of `major` when given (server programs must match the
    data directory's version), else the newest installed (clients read older servers)."""
    for version, directory in _versioned_bin_dirs():
        if major is not None and version != major:
            continue
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found and major is not None:
        output = _run([found, "--version"], check=False).stdout
        match = re.search(r"\b(\d+)(?:\.\d+)?", output)
        if not match or int(match.group(1)) != major:
            found = None
    if not found:
        package = f"postgresql-{major}" if major else "postgresql-client"
        raise PitrError(
            f"{name} (PostgreSQL {major or 'any version'}) is not installed: install the "
            f"{package} package",
            "pg_binary_missing",
        )
    return found


def cluster_os_user() -> str | None:
    """The OS user private postmasters run as: None (ourselves) unless we are root, who
    PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    name = getattr(settings, "BACKUP_PITR_OS_USER", "") or "postgres"
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise PitrError(
            f"running as root, PostgreSQL must run as another user, and the OS user {name!r} "
            "does not exist (BACKUP_PITR_OS_USER)",
            "pg_os_user_missing",
        ) from exc
    return name


def as_cluster_user(argv: list[str]) -> list[str]:
    """`argv` run as the cluster's OS user (the environment passed along as it is)."""
    user = cluster_os_user()
    if user is None:
        return argv
    return ["runuser", "-u", user, "-p", "--", *argv]


def cluster_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a private postmaster and of the commands it runs."""
    result = dict(os.environ if env is None else env)
    user = cluster_os_user()
    if user is not None:
        # runuser -p keeps root's HOME otherwise; libpq and Python look there.
        result["HOME"] = pwd.getpwnam(user).pw_dir
    # Messages PostgreSQL writes are parsed below (the replay's outcome).
    result["LC_MESSAGES"] = "C"
    return result


def give_to_cluster_user(path: Path) -> None:
    """Make `path` (recursively) the cluster user's, as PostgreSQL requires of its files."""
    user = cluster_os_user()
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _run(
    argv: list[str], *, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    process = subprocess.run(  # noqa: S603  (argv built here from program paths, no shell)
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and process.returncode != 0:
        output = (process.stderr or process.stdout).strip()[-2000:]
        raise PitrError(f"{Path(argv[0]).name} failed ({process.returncode}): {output}")
    return process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_dir_major(data_dir: Path) -> int:
    """The PostgreSQL major version of a data directory (its PG_VERSION file)."""
    try:
        return int((Path(data_dir) / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError) as exc:
        raise PitrError(f"{data_dir} is not a PostgreSQL data directory (no PG_VERSION)") from exc


class PrivateServer:
    """A postmaster of Bridge's own on a data directory: a port nobody else uses, a Unix socket
    in a private directory, its own pg_hba.conf, settings given on the command line (they win
    over the data directory's postgresql.conf and postgresql.auto.conf, so a restored copy can
    neither archive into the live archive nor follow a data_directory setting elsewhere).

    The data directory's configuration files are left as they are; ours live in the runtime
    directory, removed by `stop()`.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        settings: dict[str, Any] | None = None,
        hba: Iterable[str] = ("local all all trust",),
        tcp: bool = False,
        env: dict[str, str] | None = None,
        user: str = "postgres",
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.major = data_dir_major(self.data_dir)
        self.settings = dict(settings or {})
        self.hba = list(hba)
        self.tcp = tcp
        self.env = cluster_env(env)
        self.user = user
        self.port = _free_port()
        self.runtime_dir: Path | None = None
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log_text = ""

    # --- life cycle

    def start(self, *, wait: bool = True, timeout: float = 60) -> PrivateServer:
        """Start the postmaster; with `wait`, return once it accepts connections."""
        # Short and private: a Unix socket path is limited to about 100 bytes, and whoever can
        # reach the socket can connect (trust).
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
        os.chmod(self.runtime_dir, 0o700)
        hba_file = self.runtime_dir / "pg_hba.conf"
        hba_file.write_text("\n".join(self.hba) + "\n")
        ident_file = self.runtime_dir / "pg_ident.conf"
        ident_file.write_text("")
        self.log_path = self.runtime_dir / "postmaster.log"
        give_to_cluster_user(self.runtime_dir)
        options = {
            "data_directory": str(self.data_dir),
            "hba_file": str(hba_file),
            "ident_file": str(ident_file),
            "port": self.port,
            "listen_addresses": "127.0.0.1" if self.tcp else "",
            "unix_socket_directories": str(self.runtime_dir),
            "logging_collector": "off",
            "ssl": "off",
            # A copy of a production server's configuration might preload libraries this host
            # lacks, or log elsewhere: a private run keeps to its own.
            "shared_preload_libraries": "",
            "log_destination": "stderr",
            **self.settings,
        }
        argv = [pg_binary("postgres", self.major), "-D", str(self.data_dir)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(  # noqa: S603  (our argv, no shell)
                as_cluster_user(argv),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.runtime_dir,
                start_new_session=True,
            )
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> str:
        """The postmaster's state from postmaster.pid ("starting", "standby", "ready",
        "stopping"), "" before it wrote one."""
        with contextlib.suppress(OSError, IndexError):
            return (self.data_dir / "postmaster.pid").read_text().splitlines()[7].strip()
        return ""

    def wait_ready(self, *, timeout: float = 60) -> None:
        """Until the server accepts connections and is out of recovery."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise PitrError(
                    f"PostgreSQL on {self.data_dir} stopped: {self.log_tail()}", "pg_stopped"
                )
            # Connect only once it says "ready": during a replay (hot_standby off) every
            # attempt would add a "the database system is starting up" line to its log.
            if self.status() == "ready" and self._out_of_recovery():
                return
            if time.monotonic() > deadline:
                raise PitrError(
                    f"PostgreSQL on {self.data_dir} was not ready after {timeout:.0f} s: "
                    f"{self.log_tail()}",
                    "pg_timeout",
                )
            time.sleep(0.2)

    def _out_of_recovery(self) -> bool:
        try:
            with contextlib.closing(self.connect(connect_timeout=2)) as connection:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_is_in_recovery()")
                    return not cursor.fetchone()[0]
        except Exception:  # not accepting connections yet (or just restarting): poll again
            return False

    def stop(self, *, mode: str = "fast", timeout: float = 60) -> None:
        """Shut down cleanly (a checkpoint; the data directory is consistent afterwards)."""
        try:
            if self.running():
                pg_ctl = pg_binary("pg_ctl", self.major)
                argv = [pg_ctl, "stop", "-D", str(self.data_dir), "-m", mode, "-w"]
                argv += ["-t", str(int(timeout))]
                stopped = _run(
                    as_cluster_user(argv), env=self.env, check=False, timeout=timeout + 10
                )
                if stopped.returncode != 0 and self.process is not None:
                    self._signal_postmaster(signal.SIGINT)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_postmaster(signal.SIGQUIT)
                    self.process.wait(timeout=10)
        finally:
            self._keep_log()
            if self.runtime_dir is not None:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
                self.runtime_dir = None

    def _signal_postmaster(self, which: signal.Signals) -> None:
        """The postmaster's own pid (ours is runuser's when running as root)."""
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().splitlines()[0]), which)

    def __enter__(self) -> PrivateServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- use

    def connect(self, dbname: str = "postgres", **options: Any) -> Any:
        import psycopg2

        return psycopg2.connect(
            host=str(self.runtime_dir),
            port=self.port,
            user=self.user,
            dbname=dbname,
            **options,
        )

    @property
    def url(self) -> str:
        """A TCP URL (only when started with tcp=True)."""
        return f"postgres://{self.user}@127.0.0.1:{self.port}/postgres"

    def query(self, sql: str, params: tuple | None = None, *, dbname: str = "postgres") -> list:
        with contextlib.closing(self.connect(dbname)) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []

    def log_text(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            with contextlib.suppress(OSError):
                return self.log_path.read_text(errors="replace")
        return self._log_text

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_text().strip().splitlines()[-lines:]
        return "\n".join(text) if text else "(the server log is empty)"

    def _keep_log(self) -> None:
        text = self.log_text()
        if text:
            self._log_text = text


# --- System identifiers ----------------------------------------------------------------------


def _segment_system_identifier(path: Path) -> str | None:
    """The system identifier in a WAL segment's first page header, or None (not a segment)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_LONG_HEADER.size)
    except OSError:
        return None
    if len(head) < _LONG_HEADER.size:
        return None
    _, info, _, _, _, sysid, seg_size, block_size = _LONG_HEADER.unpack(head)
    plausible = (
        info & XLP_LONG_HEADER
        and sysid
        and seg_size >= 1024 * 1024
        and seg_size & (seg_size - 1) == 0
        and block_size >= 1024
        and block_size & (block_size - 1) == 0
    )
    return str(sysid) if plausible else None


def _control_file_system_identifier(data_dir: Path) -> str | None:
    """The system identifier in global/pg_control (its first field)."""
    try:
        with (data_dir / "global" / "pg_control").open("rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if len(head) < 8:
        return None
    return str(struct.unpack("=Q", head)[0]) or None


def _server_system_identifier() -> str | None:
    if not archiving_configured():
        return None
    with contextlib.suppress(Exception):
        return str(_pitr_query("SELECT system_identifier FROM pg_control_system()")[0][0])
    return None


def system_identifier_of(path: Path) -> str:
    """The identifier of the cluster that wrote the WAL file `path`.

    A segment carries it in its first page; history and backup files do not, so the cluster's
    pg_control is read: the archiver runs in the data directory and `path` is pg_wal/<name>.
    """
    found = _segment_system_identifier(path)
    if found:
        return found
    absolute = Path(os.path.abspath(path))
    for data_dir in (absolute.parent.parent, Path.cwd()):
        found = _control_file_system_identifier(data_dir)
        if found:
            return found
    found = _server_system_identifier()
    if found:
        return found
    raise WalArchiveError(
        f"{path.name}: cannot tell which cluster wrote it (no WAL page header, no "
        "global/pg_control beside pg_wal, BACKUP_PITR_DATABASE unreachable)",
        "wal_system_unknown",
    )


def wal_location(system_identifier: str, name: str) -> str:
    return f"{WAL_PREFIX}/{system_identifier}/{name}"


def check_wal_name(name: str) -> str:
    if not WAL_NAME.match(name or ""):
        raise PitrError(f"{name!r} is not a WAL file name PostgreSQL archives", "wal_bad_name")
    return name


# --- archive_command ---------------------------------------------------------------------------


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(COPY_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _stored_copy_sha(target: Any, location: str, name: str, sha: str) -> str | None:
    """A copy already at `location` (an earlier attempt that failed later, or a catalog that was
    rebuilt): its stored SHA-256 if it holds this very content, None if there is none; a copy of
    other content is never overwritten."""
    if not target.exists(location):
        return None
    with contextlib.closing(target.open(location)) as source:
        try:
            meta = stream.read_header(source, name=location).get("meta") or {}
        except stream.ArtifactError as exc:
            raise WalArchiveError(
                f"{name}: {target.name} already holds an unreadable file at {location} ({exc}); "
                "refusing to overwrite it",
                "wal_conflict",
            ) from exc
    if meta.get("sha256") != sha:
        raise WalArchiveError(
            f"{name}: {target.name} already holds other content at {location}; refusing to "
            "overwrite an archived WAL file",
            "wal_conflict",
        )
    return target.sha256(location)


def _key_of_copy(target: Any, location: str) -> stream.DataKey:
    with contextlib.closing(target.open(location)) as source:
        header = stream.read_header(source, name=location)
    return stream.data_key_from(
        key_id=header["key_id"],
        master_key_id=header["master_key_id"],
        wrapped=header["wrapped"],
        artifact=location,
    )


def _write_copies(
    path: Path,
    location: str,
    targets: list,
    *,
    key: stream.DataKey | None,
    meta: dict,
) -> tuple[stream.ArtifactInfo, list[dict]]:
    """One pass over the file, tee'd into a temporary upload on every local target (each
    committed only once its read-back SHA-256 matches), then uploaded to the remote ones."""
    local = [target for target in targets if not target.remote]
    remote = [target for target in targets if target.remote]
    uploads: list = []
    spool = None
    try:
        for target in local:
            uploads.append((target, target.begin(location)))
        outs = [upload.file for _, upload in uploads]
        if remote:
            spool = tempfile.NamedTemporaryFile(prefix="bridge-wal-", suffix=".tmp")
            outs.append(spool)
        with path.open("rb") as source:
            writer = stream.ArtifactWriter(outs, name=location, key=key, meta=meta)
            shutil.copyfileobj(source, writer, COPY_CHUNK)
            info = writer.finish()
            writer.close()
        copies = []
        committed = []
        for target, upload in uploads:
            upload.commit(sha256=info.sha256)
            committed.append(upload)
            copies.append({"target": target.name, "location": location, "sha256": info.sha256})
        if spool is not None:
            spool.flush()
            for target in remote:
                target.put(Path(spool.name), location, sha256=info.sha256)
                copies.append({"target": target.name, "location": location, "sha256": info.sha256})
        return info, copies
    except BaseException:
        for _, upload in uploads:
            with contextlib.suppress(Exception):
                upload.abort()
        raise
    finally:
        if spool is not None:
            spool.close()


def _read_back(target: Any, location: str, key: stream.DataKey | None, sha: str) -> None:
    """Decrypt one stored copy end to end and compare it with the WAL file: the upload's
    checksum proves the bytes arrived, this proves they restore."""
    digest = hashlib.sha256()
    with contextlib.closing(target.open(location)) as source:
        reader = stream.open_artifact(source, name=location, key=key)
        while block := reader.read(COPY_CHUNK):
            digest.update(block)
    if digest.hexdigest() != sha:
        raise WalArchiveError(
            f"{location} on {target.name} does not read back as the WAL file", "wal_readback"
        )


def archive_wal(path: Path, name: str) -> WalSegment:
    """PostgreSQL's archive_command: store the WAL file `path` (named `name`) on every target.

    Returns the WalSegment row once every target holds a verified copy; raises (the command
    exits 1, PostgreSQL keeps the file and retries) on any failure. Archiving the same content
    twice succeeds (PostgreSQL retries after a crash); other content under an archived name is
    refused, never overwritten.
    """
    from backups.targets import configured_targets

    check_wal_name(name)
    path = Path(path)
    if not path.is_file():
        raise WalArchiveError(f"{name}: {path} is not a file", "wal_missing")
    sysid = system_identifier_of(path)
    location = wal_location(sysid, name)
    sha, raw_bytes = _sha256_file(path)
    targets = configured_targets()
    if not targets:
        raise WalArchiveError(f"{name}: no backup target is configured (BACKUP_TARGETS)")

    row = WalSegment.objects.filter(system_identifier=sysid, name=name).first()
    key: stream.DataKey | None = None
    copies: list[dict] = []
    if row is not None:
        if row.sha256 != sha:
            raise WalArchiveError(
                f"{name}: a different file is already archived under this name for system "
                f"{sysid} (sha256 {row.sha256[:16]}..., this one {sha[:16]}...); refusing to "
                "overwrite it",
                "wal_conflict",
            )
        if row.key_id:
            key = stream.data_key_from(
                key_id=row.key_id,
                master_key_id=row.master_key_id,
                wrapped=row.wrapped_key,
                artifact=location,
            )
        copies = [copy for copy in row.copies if isinstance(copy, dict)]

    recorded = {copy["target"] for copy in copies}
    missing = []
    for target in targets:
        if target.name in recorded and target.exists(location):
            continue
        copies = [copy for copy in copies if copy["target"] != target.name]
        stored = _stored_copy_sha(target, location, name, sha)
        if stored is None:
            missing.append(target)
            continue
        copies.append({"target": target.name, "location": location, "sha256": stored})
        if key is None and settings.ENABLE_BACKUP_ENCRYPTION:
            # Reuse the key of the copy found: every copy of a segment shares one data key.
            key = _key_of_copy(target, location)

    if row is not None and not missing:
        return row
    if key is None and settings.ENABLE_BACKUP_ENCRYPTION:
        key = stream.new_data_key()
    stored_bytes = row.stored_bytes if row is not None else 0
    if missing:
        meta = {
            "kind": "wal",
            "segment": name,
            "system_identifier": sysid,
            "sha256": sha,
            "raw_bytes": raw_bytes,
        }
        info, written = _write_copies(path, location, missing, key=key, meta=meta)
        _read_back(missing[0], location, key, sha)
        copies += written
        stored_bytes = info.stored_bytes
    elif not stored_bytes:
        stored_bytes = targets[0].size(location)

    values = {
        "raw_bytes": raw_bytes,
        "stored_bytes": stored_bytes,
        "sha256": sha,
        "copies": copies,
        "key_id": key.key_id if key else "",
        "master_key_id": key.master_key_id if key else "",
        "wrapped_key": key.wrapped if key else "",
    }
    if row is not None:
        WalSegment.objects.filter(pk=row.pk).update(**values)
        row.refresh_from_db()
        return row
    try:
        with transaction.atomic():
            return WalSegment.objects.create(system_identifier=sysid, name=name, **values)
    except IntegrityError:
        # Two archivers raced (PostgreSQL runs one; an operator's manual call could be the
        # other): the row that won must hold this same content.
        row = WalSegment.objects.get(system_identifier=sysid, name=name)
        if row.sha256 != sha:
            raise WalArchiveError(
                f"{name}: a different file was archived under this name meanwhile", "wal_conflict"
            ) from None
        return row


# --- restore_command ---------------------------------------------------------------------------


def _catalog_rows(name: str, sysid: str | None) -> tuple[list[WalSegment], str | None]:
    """The catalog's rows for `name` and None, or [] and why the catalog could not be asked."""
    try:
        rows = WalSegment.objects.filter(name=name)
        if sysid:
            rows = rows.filter(system_identifier=sysid)
        return list(rows[:2]), None
    except DatabaseError as exc:
        return [], f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


def _archived_systems(targets: list) -> set[str]:
    found: set[str] = set()
    for target in targets:
        with contextlib.suppress(Exception):
            for location in target.listdir(f"{WAL_PREFIX}/"):
                parts = location.strip("/").split("/")
                if len(parts) >= 2 and parts[0] == WAL_PREFIX and parts[1].isdigit():
                    found.add(parts[1])
    return found


def _restore_copy(
    target: Any,
    location: str,
    dest: Path,
    *,
    key: stream.DataKey | None,
    expected_sha: str | None,
) -> int:
    """Decrypt one copy into dest (through dest.tmp, renamed only once it checked out)."""
    tmp = dest.with_name(dest.name + ".tmp")
    digest = hashlib.sha256()
    size = 0
    try:
        with contextlib.closing(target.open(location)) as source, tmp.open("wb") as out:
            reader = stream.open_artifact(source, name=location, key=key)
            wanted = expected_sha or (reader.header.get("meta") or {}).get("sha256")
            while block := reader.read(COPY_CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
            out.flush()
            os.fsync(out.fileno())
        if wanted and digest.hexdigest() != wanted:
            raise stream.ArtifactError(
                location, "tampered", "the decrypted WAL file does not match its recorded SHA-256"
            )
        os.replace(tmp, dest)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def fetch_wal(
    name: str,
    dest: Path,
    *,
    system_identifier: str | None = None,
    report: Callable[[str], None] | None = None,
) -> bool:
    """PostgreSQL's restore_command: the archived WAL file `name`, verified and decrypted, to
    `dest` (written as dest.tmp and renamed). False when it was never archived (PostgreSQL asks
    past the end of the archive: that is how recovery ends); WalFetchError when it is archived
    but no copy is usable (damaged, unreadable): recovery must stop there, not promote.

    The cluster is `system_identifier`, else the data directory's (restore_command runs in it),
    else the only one the catalog or the targets know. The catalog is asked first; when it is
    unreachable (Bridge's own database is the one being recovered) the targets are looked at.
    """
    from backups.targets import configured_targets

    check_wal_name(name)
    dest = Path(dest)
    say = report or (lambda message: None)
    targets = configured_targets()
    sysid = system_identifier or _control_file_system_identifier(Path.cwd())
    rows, catalog_error = _catalog_rows(name, sysid)
    if catalog_error:
        say(f"the backup catalog is unreachable ({catalog_error}); looking on the targets")
    if len({row.system_identifier for row in rows}) > 1:
        raise WalFetchError(
            f"{name}: archived for several clusters; pass --system-identifier", "wal_ambiguous"
        )
    row = rows[0] if rows else None
    if row is not None:
        sysid = row.system_identifier
    if not sysid:
        systems = _archived_systems(targets)
        if len(systems) > 1:
            raise WalFetchError(
                f"{name}: the targets hold WAL of several clusters ({', '.join(sorted(systems))})"
                "; pass --system-identifier",
                "wal_ambiguous",
            )
        if not systems:
            return False
        sysid = systems.pop()

    key = None
    if row is not None and row.key_id:
        try:
            key = stream.data_key_from(
                key_id=row.key_id,
                master_key_id=row.master_key_id,
                wrapped=row.wrapped_key,
                artifact=name,
            )
        except stream.ArtifactError as exc:
            raise WalFetchError(f"{name}: {exc}", "wal_wrong_key") from exc
    by_name = {target.name: target for target in targets}
    candidates: list[tuple[Any, str]] = []
    for copy in row.copies if row is not None else []:
        target = by_name.get(copy.get("target", ""))
        if target is not None and copy.get("location"):
            candidates.append((target, copy["location"]))
    location = wal_location(sysid, name)
    for target in targets:
        if (target, location) not in candidates:
            candidates.append((target, location))

    problems = []
    for target, where in candidates:
        try:
            if not target.exists(where):
                continue
            _restore_copy(
                target,
                where,
                dest,
                key=key,
                expected_sha=row.sha256 if row is not None else None,
            )
            return True
        except stream.ArtifactError as exc:
            problems.append(f"{target.name}: {exc}")
        except Exception as exc:  # a target that cannot be read: try the next copy
            problems.append(f"{target.name}: {type(exc).__name__}: {exc}")
        say(f"{name}: copy on {problems[-1]}; trying the next copy")
    if problems or row is not None:
        detail = "; ".join(problems) or "the catalog lists it but no target holds a copy"
        raise WalFetchError(
            f"{name}: archived but no usable copy, recovery must stop here: {detail}",
            "wal_unusable",
        )
    return False


# --- The archived server -------------------------------------------------------------------------


def _url_without_password(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and the environment that gives it to libpq instead (an
    argument is visible to every local user in the process list; the environment is not)."""
    parts = urllib.parse.urlsplit(url)
    extra: dict[str, str] = {}
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon:
        extra["PGPASSWORD"] = urllib.parse.unquote(password)
        parts = parts._replace(netloc=f"{user}@{hostport}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        extra["PGPASSWORD"] = next(value for key, value in query if key == "password")
        kept = [(key, value) for key, value in query if key != "password"]
        parts = parts._replace(query=urllib.parse.urlencode(kept))
    return urllib.parse.urlunsplit(parts), extra


def _pitr_connect() -> Any:
    import psycopg2

    return psycopg2.connect(settings.BACKUP_PITR_DATABASE, connect_timeout=10)


def _pitr_query(sql: str, params: tuple | None = None) -> list:
    with contextlib.closing(_pitr_connect()) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []


def _require_archiving() -> None:
    if not archiving_configured():
        raise PitrError(
            "WAL archiving is not configured (BACKUP_PITR_DATABASE is not set)",
            "pitr_not_configured",
        )


def create_restore_point(name: str) -> dict[str, Any]:
    """A named restore point on the archived server, its WAL segment switched out so that it
    reaches the archive now rather than when the segment fills up."""
    _require_archiving()
    if not name or len(name) >= 64:
        raise PitrError("a restore point name is 1 to 63 characters", "pitr_bad_name")
    with contextlib.closing(_pitr_connect()) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT lsn, pg_walfile_name(lsn), now(), "
                "(SELECT system_identifier FROM pg_control_system()) "
                "FROM pg_create_restore_point(%s) AS lsn",
                (name,),
            )
            lsn, wal_file, at, sysid = cursor.fetchone()
            cursor.execute("SELECT pg_switch_wal()")
    return {
        "name": name,
        "lsn": str(lsn),
        "wal_file": wal_file,
        "time": at.astimezone(UTC).isoformat(),
        "system_identifier": str(sysid),
    }


def is_archived(wal_file: str, system_identifier: str) -> bool:
    return WalSegment.objects.filter(system_identifier=system_identifier, name=wal_file).exists()


def wait_archived(wal_file: str, system_identifier: str, *, timeout: float = 60) -> None:
    """Until the archive holds `wal_file` (a restore point is only usable once it does)."""
    deadline = time.monotonic() + timeout
    while not is_archived(wal_file, system_identifier):
        if time.monotonic() > deadline:
            raise PitrError(
                f"{wal_file} was not archived within {timeout:.0f} s: check archive_command and "
                "pg_stat_archiver on the server",
                "wal_not_archived",
            )
        time.sleep(0.2)


def _parse_backup_label(head: bytes) -> dict[str, str]:
    """START WAL LOCATION, CHECKPOINT LOCATION, START TIME... from the tar's backup_label."""
    found: dict[str, str] = {}
    with contextlib.suppress(tarfile.TarError, EOFError, OSError):
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as archive:
            member = archive.next()
            if member is not None and member.name.lstrip("./") == "backup_label":
                data = archive.extractfile(member)
                text = data.read().decode("utf-8", "replace") if data else ""
                for line in text.splitlines():
                    key, _, value = line.partition(":")
                    found[key.strip()] = value.strip()
    return found


def base_backup(out: BinaryIO, *, on_bytes: OnBytes) -> dict[str, Any]:
    """A base backup of the archived server (pg_basebackup: one tar with the WAL it needs) to
    `out`, plaintext; returns its manifest entry."""
    _require_archiving()
    with contextlib.closing(_pitr_connect()) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT (SELECT system_identifier FROM pg_control_system()), "
                "current_setting('server_version'), current_setting('server_version_num')::int, "
                "(SELECT rolname FROM pg_roles WHERE oid = 10), "
                "current_setting('wal_level'), current_setting('archive_mode'), "
                "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
            )
            sysid, version, version_num, superuser, wal_level, archive_mode, seg = cursor.fetchone()
    if wal_level == "minimal" or archive_mode == "off":
        raise PitrError(
            f"the server does not archive its WAL (wal_level={wal_level}, "
            f"archive_mode={archive_mode}): see the README on turning on WAL archiving",
            "pitr_not_archiving",
        )
    major = version_num // 10000
    label = f"bridge {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
    try:
        program = pg_binary("pg_basebackup", major)
    except PitrError:
        program = pg_binary("pg_basebackup")  # a newer client reads older servers
    url, secret_env = _url_without_password(settings.BACKUP_PITR_DATABASE)
    argv = [
        program,
        "-d",
        url,
        "-D",
        "-",
        "-F",
        "tar",
        "-X",
        "fetch",
        "--checkpoint=fast",
        "-l",
        label,
    ]
    started = datetime.now(UTC)
    head = bytearray()
    total = 0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(  # noqa: S603  (our argv, no shell)
            argv,
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **secret_env},
        )
        try:
            assert process.stdout is not None
            while block := process.stdout.read(COPY_CHUNK):
                if len(head) < LABEL_PEEK:
                    head += block[: LABEL_PEEK - len(head)]
                out.write(block)
                total += len(block)
                on_bytes(len(block))
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        errors.seek(0)
        message = errors.read().decode("utf-8", "replace").strip()[-2000:]
    if code != 0:
        raise PitrError(f"pg_basebackup failed ({code}): {message}", "pg_basebackup_failed")
    finished = datetime.now(UTC)
    label_fields = _parse_backup_label(bytes(head))
    with contextlib.closing(_pitr_connect()) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            # At or after the backup's end: recovery is consistent from here on, so this is
            # where the point-in-time window starts.
            cursor.execute(
                "SELECT lsn, pg_walfile_name(lsn), now(), "
                "(SELECT timeline_id FROM pg_control_checkpoint()) "
                "FROM pg_current_wal_lsn() AS lsn"
            )
            stop_lsn, stop_wal, stop_time, timeline = cursor.fetchone()
    start_wal = re.search(r"\(file ([0-9A-F]{24})\)", label_fields.get("START WAL LOCATION", ""))
    start_lsn = label_fields.get("START WAL LOCATION", "").split(" ")[0]
    return {
        "engine": "postgresql",
        "system_identifier": str(sysid),
        "server_version": version,
        "major": major,
        "superuser": superuser,
        "wal_segment_size": int(seg) if seg else None,
        "timeline": int(label_fields.get("START TIMELINE") or timeline),
        "start_lsn": start_lsn,
        "start_wal_file": start_wal.group(1) if start_wal else "",
        "stop_lsn": str(stop_lsn),
        "stop_wal_file": stop_wal,
        "label": label,
        "started_at": started.isoformat(),
        "time": stop_time.astimezone(UTC).isoformat(),
        "finished_at": finished.isoformat(),
        "bytes": total,
        "format": "pg_basebackup tar, WAL fetched (-X fetch)",
    }


# --- The point-in-time window ------------------------------------------------------------------


def _as_datetime(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value))


def wal_window(
    base_times: Iterable[datetime] | None = None, *, system_identifier: str | None = None
) -> dict[str, datetime | None]:
    """{"base_from", "wal_until"}: the earliest time a restore can reach (the oldest base
    backup's end) and the latest (the newest archived WAL). `base_times` are the base backups'
    end times; None reads them from the catalog (succeeded backups whose database manifest
    holds a base backup)."""
    if base_times is None:
        base_times = [
            when
            for manifest in _catalog_base_manifests(system_identifier)
            if (when := _as_datetime(manifest.get("time"))) is not None
        ]
    times = sorted(base_times)
    segments = WalSegment.objects.all()
    if system_identifier:
        segments = segments.filter(system_identifier=system_identifier)
    newest = segments.order_by("-archived_at").values_list("archived_at", flat=True).first()
    return {"base_from": times[0] if times else None, "wal_until": newest}


def _catalog_base_manifests(system_identifier: str | None) -> list[dict]:
    from backups.choices import BackupStatus
    from backups.models import Backup

    found = []
    for manifest in Backup.objects.filter(status=BackupStatus.SUCCEEDED).values_list(
        "manifest", flat=True
    ):
        for entry in _find_base_entries(manifest):
            if system_identifier and entry.get("system_identifier") != system_identifier:
                continue
            found.append(entry)
    return found


def _find_base_entries(value: Any) -> Iterable[dict]:
    """Base backup manifests anywhere in a backup's manifest (they carry a start WAL file)."""
    if isinstance(value, dict):
        if value.get("engine") == "postgresql" and "start_wal_file" in value:
            yield value
            return
        for item in value.values():
            yield from _find_base_entries(item)
    elif isinstance(value, list):
        for item in value:
            yield from _find_base_entries(item)


# --- Replay ------------------------------------------------------------------------------------


def fetch_command(*, python: str | None = None, system_identifier: str | None = None) -> str:
    """The restore_command running this installation's fetch_wal."""
    interpreter = python or getattr(settings, "BACKUP_PITR_PYTHON", "") or sys.executable
    argv = [interpreter, str(MANAGE_PY), "fetch_wal"]
    if system_identifier:
        argv += ["--system-identifier", system_identifier]
    return shlex.join(argv) + " %f %p"


# How many segments the prefetcher keeps decrypted ahead of a replay, and how many it keeps
# after use (PostgreSQL asks for the last one again at the end of recovery): disk for that
# many WAL segments in the staging directory.
PREFETCH_AHEAD = 8
KEEP_USED = 2
HISTORY_NAME = re.compile(r"^[0-9A-F]{8}\.history$")
HISTORIES_STAGED = ".histories-staged"
USED_PREFIX = ".used."
RESTORE_SCRIPT = """#!/bin/sh
# restore_command of a Bridge replay ($1 = %f, $2 = %p). Files staged by the prefetcher were
# already fetched and verified by fetch_wal; anything else is asked of fetch_wal itself.
staging={staging}
used="$staging/{used}$1"
if [ -f "$staging/$1" ]; then mv -f "$staging/$1" "$used"; fi
if [ -f "$used" ] && cp "$used" "$2"; then exit 0; fi
case "$1" in
  *.history) if [ -f "$staging/{histories}" ]; then exit 1; fi ;;
esac
exec {fetch} "$1" "$2"
"""


class _Prefetcher(threading.Thread):
    """Fetches what a replay will ask for into a staging directory, ahead of it: a fetch_wal
    per file costs a Python and Django start-up (about a second), which would bound a replay
    of thousands of segments.

    Every staged file went through fetch_wal (each chunk authenticated, the SHA-256 compared)
    and is renamed into place complete. First the system's timeline history files, all of
    them, then a marker: PostgreSQL probes for history files that do not exist (to pick the
    new timeline), and the restore script answers those at once. Then the segments of the
    base backup's timeline, from its first, at most PREFETCH_AHEAD unused at a time. What this
    thread does not stage (an error, the catalog unreachable, a later timeline, a history
    file archived after it started) is fetched by fetch_wal, never skipped: a history file
    archived meanwhile is the one thing answered from the state at the start.
    """

    def __init__(self, staging: Path, system_identifier: str, first: str) -> None:
        super().__init__(name="pitr-prefetch", daemon=True)
        self.staging = staging
        self.system_identifier = system_identifier
        self.first = first
        self.done = threading.Event()
        self.staged = 0

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=60)

    def _stage(self, name: str) -> bool:
        part = self.staging / f".{name}.part"
        if not fetch_wal(name, part, system_identifier=self.system_identifier):
            return False
        give_to_cluster_user(part)
        os.replace(part, self.staging / name)
        self.staged += 1
        return True

    def _make_room(self) -> bool:
        """Wait until fewer than PREFETCH_AHEAD staged segments are unused, dropping used ones
        but the last KEEP_USED; False once stopped."""
        while True:
            waiting, used = 0, []
            for path in self.staging.iterdir():
                if SEGMENT_NAME.match(path.name):
                    waiting += 1
                elif path.name.startswith(USED_PREFIX) and SEGMENT_NAME.match(
                    path.name.removeprefix(USED_PREFIX)
                ):
                    used.append(path)
            for path in sorted(used)[:-KEEP_USED]:
                path.unlink(missing_ok=True)
            if waiting < PREFETCH_AHEAD:
                return not self.done.is_set()
            if self.done.wait(0.05):
                return False

    def run(self) -> None:
        from django.db import connection

        try:
            names = list(
                WalSegment.objects.filter(system_identifier=self.system_identifier)
                .order_by("name")
                .values_list("name", flat=True)
            )
            for name in names:
                if HISTORY_NAME.match(name) and not self._stage(name):
                    return
            (self.staging / HISTORIES_STAGED).touch()
            for name in names:
                if not SEGMENT_NAME.match(name) or name < self.first:
                    continue
                if name[:8] != self.first[:8]:
                    continue  # another timeline: fetch_wal serves it if it is asked for
                if not self._make_room() or not self._stage(name):
                    return
        except Exception:  # noqa: S110 (fetch_wal, run by the restore script, reports it)
            pass
        finally:
            connection.close()


def _restore_script(staging: Path, fetch: str) -> str:
    """Write the restore script into `staging`; returns the restore_command running it."""
    script = staging / "restore.sh"
    script.write_text(
        RESTORE_SCRIPT.format(
            staging=shlex.quote(str(staging)),
            used=USED_PREFIX,
            histories=HISTORIES_STAGED,
            fetch=fetch.removesuffix(" %f %p"),
        )
    )
    os.chmod(script, 0o700)  # run by /bin/sh as the cluster user, who owns it
    give_to_cluster_user(script)
    return f"/bin/sh {shlex.quote(str(script))} %f %p"


def _check_reachable(data_dir: Path) -> None:
    user = cluster_os_user()
    if user is None:
        return
    probe = _run(as_cluster_user(["test", "-r", str(data_dir / "PG_VERSION")]), check=False)
    if probe.returncode != 0:
        raise PitrError(
            f"the PostgreSQL OS user {user!r} cannot reach {data_dir}: every directory above it "
            "must be searchable by that user (chmod o+x, or a BACKUP_SCRATCH_DIR elsewhere)",
            "pitr_data_dir_unreachable",
        )


_checked_commands: set[tuple[str, int]] = set()


def _check_fetch_command(command: str, env: dict[str, str] | None) -> None:
    """Run the restore_command's program once, as the server will (its user, environment and
    directory), before a replay depends on it: an interpreter the PostgreSQL user cannot run,
    or settings that do not load, would otherwise surface as a replay that ends early."""
    checked = (command, hash(frozenset((env if env is not None else os.environ).items())))
    if checked in _checked_commands:
        return
    argv = [*shlex.split(command.removesuffix(" %f %p")), "--help"]
    done = subprocess.run(  # noqa: S603  (our own restore_command, no shell)
        as_cluster_user(argv),
        env=cluster_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )
    if done.returncode != 0:
        user = cluster_os_user() or "this user"
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PitrError(
            f"the restore_command ({argv[0]} {argv[1]} fetch_wal) does not run as {user}: "
            f"{detail[0]}. Set BACKUP_PITR_PYTHON to an interpreter with Bridge's packages "
            "that this user can run.",
            "pitr_fetch_command_broken",
        )
    _checked_commands.add(checked)


class _CountingReader(io.RawIOBase):
    def __init__(self, source: BinaryIO, on_bytes: OnBytes) -> None:
        super().__init__()
        self.source = source
        self.on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        count = len(data or b"")
        buffer[:count] = data or b""
        if count:
            self.on_bytes(count)
        return count


def _extract_base(base_opener: BaseOpener, data_dir: Path, on_bytes: OnBytes) -> None:
    source = base_opener()
    try:
        with tarfile.open(fileobj=_CountingReader(source, on_bytes), mode="r|") as archive:
            # "data": no absolute paths, nothing outside data_dir, no device files.
            archive.extractall(data_dir, filter="data")
    except tarfile.TarError as exc:
        raise PitrError(f"the base backup does not unpack: {exc}", "pitr_bad_base") from exc
    finally:
        with contextlib.suppress(Exception):
            source.close()
    if not (data_dir / "PG_VERSION").exists():
        raise PitrError("the base backup holds no PostgreSQL data directory", "pitr_bad_base")


def _verify_base(data_dir: Path, major: int) -> None:
    """pg_verifybackup against the manifest pg_basebackup put in the tar, when there is one."""
    if not (data_dir / "backup_manifest").exists():
        return
    try:
        program = pg_binary("pg_verifybackup", major)
    except PitrError:
        return
    _run([program, "--no-parse-wal", str(data_dir)])


_STOPPING = re.compile(r"recovery stopping (?P<what>.*?), time (?P<time>[0-9][^\n]*)")
_LAST_TX = re.compile(r"last completed transaction was at log time (?P<time>[0-9][^\n]*)")
_RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
_TIMELINE = re.compile(r"selected new timeline ID: (\d+)")
NOT_REACHED = "recovery ended before configured recovery target was reached"


def _check_window(manifest: dict, target_time: datetime) -> None:
    base_end = _as_datetime(manifest.get("time"))
    if base_end is not None and target_time < base_end:
        raise PitrError(
            f"target time {target_time.isoformat()} is before this base backup was consistent "
            f"({base_end.isoformat()}): choose an older base backup or a later time",
            "target_time_out_of_window",
        )
    sysid = manifest.get("system_identifier") or None
    try:
        newest = wal_window([], system_identifier=sysid)["wal_until"]
    except DatabaseError:
        return  # no catalog (disaster recovery): the replay itself says how far it got
    if newest is None or target_time > newest:
        window = f"{base_end.isoformat() if base_end else '?'} .. "
        window += newest.isoformat() if newest else "(no WAL archived yet)"
        raise PitrError(
            f"target time {target_time.isoformat()} is after the newest archived WAL: the "
            f"window of this base backup is {window}",
            "target_time_out_of_window",
        )


def restore_to_time(
    base_manifest: dict,
    base_opener: BaseOpener,
    *,
    target_time: datetime | None,
    restore_point: str | None,
    data_dir: Path,
    on_bytes: OnBytes,
    env: dict[str, str] | None = None,
    python: str | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Rebuild the archived server as it was at `target_time` (or at the named
    `restore_point`; neither: at the end of the archive) in the new directory `data_dir`.

    The base backup is unpacked there and checked, then a private postmaster replays the
    archived WAL (restore_command: fetch_wal) until the target, promotes, and is shut down
    cleanly: `data_dir` is then a consistent data directory of the server at that moment,
    owned by the PostgreSQL user. `env` is the environment of the fetch_wal commands (default:
    ours), `python` their interpreter (default BACKUP_PITR_PYTHON, else ours).
    """
    if target_time is not None and restore_point:
        raise PitrError("give a target time or a restore point, not both", "pitr_bad_target")
    if target_time is not None:
        if target_time.tzinfo is None:
            raise PitrError("target_time must carry its time zone", "pitr_bad_target")
        target_time = target_time.astimezone(UTC)
        _check_window(base_manifest, target_time)
    data_dir = Path(data_dir).absolute()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise PitrError(f"{data_dir} exists and is not empty", "pitr_data_dir_in_use")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    started = time.monotonic()
    try:
        result = _replay(
            base_manifest,
            base_opener,
            target_time=target_time,
            restore_point=restore_point,
            data_dir=data_dir,
            on_bytes=on_bytes,
            env=env,
            python=python,
            timeout=timeout,
        )
    except BaseException:
        # A replay that did not reach its target is of no use, and can be large.
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _replay(
    base_manifest: dict,
    base_opener: BaseOpener,
    *,
    target_time: datetime | None,
    restore_point: str | None,
    data_dir: Path,
    on_bytes: OnBytes,
    env: dict[str, str] | None,
    python: str | None,
    timeout: float,
) -> dict[str, Any]:
    _extract_base(base_opener, data_dir, on_bytes)
    major = data_dir_major(data_dir)
    _verify_base(data_dir, major)
    for stale in ("postmaster.pid", "postmaster.opts", "standby.signal"):
        (data_dir / stale).unlink(missing_ok=True)
    (data_dir / "recovery.signal").write_text("")
    give_to_cluster_user(data_dir)
    _check_reachable(data_dir)
    sysid = base_manifest.get("system_identifier") or _control_file_system_identifier(data_dir)
    command = fetch_command(python=python, system_identifier=sysid)
    _check_fetch_command(command, env)
    staging = data_dir.parent / f".{data_dir.name}.wal"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    give_to_cluster_user(staging)
    prefetch = _Prefetcher(staging, sysid, base_manifest.get("start_wal_file") or "")
    try:
        if sysid:
            prefetch.start()
        result = _replay_with(
            data_dir,
            restore_command=_restore_script(staging, command),
            sysid=sysid,
            target_time=target_time,
            restore_point=restore_point,
            user=base_manifest.get("superuser") or "postgres",
            env=env,
            timeout=timeout,
        )
    finally:
        if prefetch.is_alive():
            prefetch.stop()
        shutil.rmtree(staging, ignore_errors=True)
    result["wal_prefetched"] = prefetch.staged
    return result


def _replay_with(
    data_dir: Path,
    *,
    restore_command: str,
    sysid: str | None,
    target_time: datetime | None,
    restore_point: str | None,
    user: str,
    env: dict[str, str] | None,
    timeout: float,
) -> dict[str, Any]:
    recovery = {
        "restore_command": restore_command,
        "recovery_target_action": "promote",
        # Never archive into the archive it is replayed from (a second timeline of the
        # same system would mix with the live one's WAL).
        "archive_mode": "off",
        "archive_command": "",
        "hot_standby": "off",
    }
    if target_time is not None:
        recovery["recovery_target_time"] = target_time.strftime("%Y-%m-%d %H:%M:%S.%f+00")
    elif restore_point:
        recovery["recovery_target_name"] = restore_point
    log = ""
    server = PrivateServer(data_dir, settings=recovery, env=env, user=user)
    to_end = False
    try:
        server.start(wait=False)
        try:
            server.wait_ready(timeout=timeout)
        except PitrError:
            log = server.log_text()
            server.stop()
            # No commit after target_time in the whole archive (the window was checked, so the
            # archive reaches target_time): every archived change is older, and replaying
            # all of it is the state at target_time.
            if target_time is None or NOT_REACHED not in log or "could not restore" in log:
                raise _replay_error(log, restore_point) from None
            to_end = True
            recovery.pop("recovery_target_time")
            (data_dir / "recovery.signal").touch()
            give_to_cluster_user(data_dir / "recovery.signal")
            server = PrivateServer(data_dir, settings=recovery, env=env, user=user)
            server.start(wait=False)
            try:
                server.wait_ready(timeout=timeout)
            except PitrError:
                raise _replay_error(log + server.log_text(), restore_point) from None
        timeline = server.query("SELECT timeline_id FROM pg_control_checkpoint()")[0][0]
        log += server.log_text()
    finally:
        server.stop()
    stopping = None if to_end else _STOPPING.search(log)
    last_tx = _LAST_TX.findall(log)
    return {
        "data_dir": str(data_dir),
        "system_identifier": sysid,
        "target_time": target_time.isoformat() if target_time else None,
        "restore_point": restore_point or None,
        "recovered_to": (
            f"stopped {stopping.group('what')} (time {stopping.group('time')})"
            if stopping
            else "the end of the archived WAL"
        ),
        "replayed_to_end": stopping is None,
        "last_transaction_time": last_tx[-1].strip() if last_tx else None,
        "wal_replayed": len(set(_RESTORED.findall(log))),
        "timeline": int(timeline),
    }


def _replay_error(log: str, restore_point: str | None) -> PitrError:
    lines = [line for line in log.strip().splitlines() if line.strip()][-25:]
    tail = "\n".join(lines) or "(the server log is empty)"
    if restore_point and NOT_REACHED in log:
        return PitrError(
            f"restore point {restore_point!r} is not in the archived WAL:\n{tail}",
            "restore_point_not_found",
        )
    if "could not restore file" in log:
        return PitrError(f"the replay stopped on an archived WAL file it could not use:\n{tail}")
    return PitrError(f"the replay failed:\n{tail}")
