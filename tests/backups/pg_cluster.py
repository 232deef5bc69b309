"""A private PostgreSQL cluster that archives its WAL through `manage.py archive_wal` into the
test's own backup targets; the shared server on 5432 is never reconfigured.

Use it from a test module with
`from tests.backups.pg_cluster import pg_cluster_fixture, postgres_python_fixture  # noqa: F401`
(pytest finds fixtures imported into the module; they are named "pg_cluster" and
"postgres_python").

We run as root, which PostgreSQL refuses: initdb and the postmaster run as the `postgres` OS
user (backups.pitr.as_cluster_user), in directories it owns. Its archive_command must run a
Python it can execute with Bridge's packages: ours when it can, else a small venv made from
the system's Python of the same version whose site-packages point at ours (the venv's own
interpreter usually lives under /root, which the postgres user cannot enter).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backups import pitr
from tests.conftest import ROOT, need, process_env

FS_STORAGE = "django.core.files.storage.FileSystemStorage"
IMPORT_CHECK = "import django, psycopg2, zstandard, cryptography, storages, backups"


def _can_run(python: str) -> bool:
    argv = pitr.as_cluster_user([python, "-c", IMPORT_CHECK])
    done = subprocess.run(
        argv, cwd=ROOT, env=pitr.cluster_env(), capture_output=True, check=False, timeout=60
    )
    return done.returncode == 0


def _shim_venv(base_python: str, where: Path) -> str:
    """A venv of `base_python` whose site-packages add ours (a .pth runs site.addsitedir, so
    our own .pth files are processed too)."""
    venv = where / "venv"
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    lines = [f"import site; site.addsitedir({path!r})" for path in sorted(ours)]
    Path(site_dir, "bridge-venv.pth").write_text("\n".join(lines) + "\n")
    for root, dirs, files in os.walk(where):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)  # noqa: S103 (the postgres user runs it)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)
    os.chmod(where, 0o755)  # noqa: S103
    return python


@pytest.fixture(scope="session", name="postgres_python")
def postgres_python_fixture() -> Iterator[str]:
    """A Python the PostgreSQL OS user can run, with Bridge's packages importable."""
    if _can_run(sys.executable):
        yield sys.executable
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    where = Path(tempfile.mkdtemp(prefix="bridge-py-"))
    try:
        for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
            if not os.access(candidate, os.X_OK):
                continue
            python = _shim_venv(candidate, where)
            if _can_run(python):
                yield python
                return
            shutil.rmtree(where / "venv", ignore_errors=True)
        need(
            False,
            f"no Python {version} the postgres user can run with Bridge's packages (it cannot "
            f"enter {sys.executable}'s directories, and no system python{version} works)",
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)


@dataclass
class ArchivingCluster:
    """A running private cluster with archive_mode on."""

    server: pitr.PrivateServer
    root: Path
    targets: dict[str, Path]
    env: dict[str, str]
    python: str
    scratch: Path
    system_identifier: str = field(default="")

    @property
    def url(self) -> str:
        return self.server.url

    def sql(self, sql: str, params: tuple | None = None) -> list:
        return self.server.query(sql, params)

    def switch_wal(self) -> str:
        """Close the current segment (writing a little first, so there is one to close) and
        return its name."""
        self.sql("SELECT txid_current()")
        return self.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0]

    def archiver(self) -> dict:
        row = self.sql(
            "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal "
            "FROM pg_stat_archiver"
        )[0]
        return dict(zip(("archived", "last_archived", "failed", "last_failed"), row, strict=True))

    def wait_archived(self, wal_file: str, *, timeout: float = 30) -> None:
        pitr.wait_archived(wal_file, self.system_identifier, timeout=timeout)

    def wait_for(self, condition, what: str, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.server.log_tail(40)}")
            time.sleep(0.2)

    def new_data_dir(self, name: str) -> Path:
        return self.scratch / name


def _owned_by_cluster_user(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    pitr.give_to_cluster_user(path)
    return path


@pytest.fixture(name="pg_cluster")
def pg_cluster_fixture(
    postgres, transactional_db, settings, postgres_python
) -> Iterator[ArchivingCluster]:
    """A PostgreSQL cluster on a free port archiving into two target directories of this test
    (BACKUP_TARGETS "local" and "local-mirror"); BACKUP_PITR_DATABASE points at it.

    The archiver's commands reach this test's database and master key (process_env), so their
    WalSegment rows are visible here (transactional_db)."""
    try:
        initdb = pitr.pg_binary("initdb", 15)
        pitr.pg_binary("postgres", 15)
        pitr.pg_binary("pg_basebackup")
    except pitr.PitrError as exc:
        need(False, str(exc))
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            need(False, "running as root, the private cluster needs the postgres OS user")
    from security import crypto

    root = Path(tempfile.mkdtemp(prefix="bridge-pitr-"))
    os.chmod(root, 0o755)  # noqa: S103 (the postgres user reaches its directories)
    server = None
    try:
        targets = {
            "local": _owned_by_cluster_user(root / "target-local"),
            "local-mirror": _owned_by_cluster_user(root / "target-mirror"),
        }
        for path in targets.values():
            _owned_by_cluster_user(path / "wal")
        var = _owned_by_cluster_user(root / "var", 0o700)
        scratch = _owned_by_cluster_user(root / "scratch")
        data_dir = _owned_by_cluster_user(root / "data", 0o700)
        spec = {
            name: {
                "backend": FS_STORAGE,
                "options": {"location": str(path)},
                "media": "disk",
                "offsite": False,
            }
            for name, path in targets.items()
        }
        settings.BACKUP_TARGETS = spec
        settings.BACKUP_SCRATCH_DIR = scratch
        settings.BRIDGE_MASTER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
        crypto.forget_keys()

        env = process_env(
            BACKUP_TARGETS=json.dumps(spec),
            BACKUP_EXTRA_TARGETS="{}",
            BRIDGE_VAR_DIR=str(var),
            BACKUP_SCRATCH_DIR=str(scratch),
            LOG_LEVEL="WARNING",
        )
        cluster_env = pitr.cluster_env(env)
        pitr._run(
            pitr.as_cluster_user(
                [
                    *(initdb, "-D", str(data_dir), "-U", "postgres", "-A", "trust", "-E"),
                    *("UTF8", "--no-sync", "--no-instructions", "--wal-segsize=1"),
                ]
            ),
            env=cluster_env,
        )
        archive_command = shlex.join([postgres_python, str(ROOT / "manage.py")])
        server = pitr.PrivateServer(
            data_dir,
            settings={
                "wal_level": "replica",
                "archive_mode": "on",
                "archive_command": f"{archive_command} archive_wal %p %f",
                "archive_timeout": 5,
                "max_wal_senders": 4,
                # A test cluster: durability across a machine crash does not matter, and no
                # autovacuum commit lands between a test's writes and its target time.
                "fsync": "off",
                "autovacuum": "off",
                "shared_buffers": "32MB",
            },
            hba=[
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
                "host replication all 127.0.0.1/32 trust",
            ],
            tcp=True,
            env=env,
        )
        server.start(timeout=60)
        settings.BACKUP_PITR_DATABASE = server.url
        env["BACKUP_PITR_DATABASE"] = server.url
        cluster = ArchivingCluster(
            server=server,
            root=root,
            targets=targets,
            env=env,
            python=postgres_python,
            scratch=scratch,
        )
        cluster.system_identifier = str(
            cluster.sql("SELECT system_identifier FROM pg_control_system()")[0][0]
        )
        yield cluster
    finally:
        if server is not None:
            server.stop()
        crypto.forget_keys()
        shutil.rmtree(root, ignore_errors=True)
