"""A real SFTP server for the offsite target: Debian's OpenSSH (`/usr/sbin/sshd`) on a free
loopback port, key authentication only, with its own host key, client key, authorized_keys and
known_hosts under a temporary directory. One server per test session; each test gets a root
directory of its own and can stop and start the server (an offsite outage).

Use it from a test module with `from tests.backups.sftp import sftp_server, sftp_target`.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port, need

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SFTP_BACKEND = "storages.backends.sftpstorage.SFTPStorage"


def _keygen(path: Path) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "bridge-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (sshd's per-connection processes leave its process group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


@dataclass
class SFTPServer:
    """The running sshd and how to reach it."""

    base: Path
    port: int
    host: str = "127.0.0.1"
    username: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen | None = None

    @property
    def key_filename(self) -> str:
        return str(self.base / "client_key")

    @property
    def known_hosts(self) -> str:
        return str(self.base / "known_hosts")

    @property
    def config(self) -> Path:
        return self.base / "sshd_config"

    def prepare(self) -> None:
        _keygen(self.base / "host_key")
        _keygen(self.base / "client_key")
        (self.base / "authorized_keys").write_text((self.base / "client_key.pub").read_text())
        host_key = (self.base / "host_key.pub").read_text().split()
        # Known in advance, as an operator would pin it: no trust on first use in the tests.
        Path(self.known_hosts).write_text(
            f"[{self.host}]:{self.port} {host_key[0]} {host_key[1]}\n"
        )
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {self.base / 'host_key'}",
                    f"PidFile {self.base / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.base / 'authorized_keys'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UseDNS no",
                    "Subsystem sftp internal-sftp",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        log = (self.base / "sshd.log").open("ab")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.base / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    if sock.recv(8).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("sshd did not answer within 15 s")

    def stop(self) -> None:
        """An outage: the listener and every session it started end (connections reset)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        sessions = _descendants(process.pid)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class SFTPTargetFixture:
    """One test's view of the server: its own root directory (on this machine's disk, which
    is where the server writes), a BACKUP_TARGETS spec for it, and the outage switches."""

    server: SFTPServer
    root: Path

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def username(self) -> str:
        return self.server.username

    @property
    def key_filename(self) -> str:
        return self.server.key_filename

    def spec(self, *, key: bool = True, **extra: object) -> dict:
        """A BACKUP_TARGETS entry for this server (offsite, "sftp" media); `extra` is merged
        in ("secret", "retry", "timeout"...). key=False: no client key (password only)."""
        params: dict = {
            "port": self.port,
            "username": self.username,
            "allow_agent": False,
            "look_for_keys": False,
            "timeout": 5,
            "banner_timeout": 5,
            "auth_timeout": 5,
        }
        if key:
            params["key_filename"] = self.key_filename
        return {
            "backend": SFTP_BACKEND,
            "options": {
                "host": self.host,
                "params": params,
                "root_path": str(self.root),
                "known_host_file": self.server.known_hosts,
            },
            "media": "sftp",
            "offsite": True,
            **extra,
        }

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SFTPServer]:
    need(Path(SSHD).exists(), f"needs {SSHD} (apt-get install openssh-server)")
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation dir
    if not privsep.exists():
        need(os.geteuid() == 0, "sshd needs /run/sshd, which only root can create")
        privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    server = SFTPServer(base=tmp_path_factory.mktemp("sshd"), port=free_port())
    server.prepare()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sftp_target(sftp_server: SFTPServer, tmp_path: Path) -> Iterator[SFTPTargetFixture]:
    """The session's SFTP server, running, with a fresh root for this test; a server a test
    stopped is started again afterwards."""
    sftp_server.start()
    root = tmp_path / "sftp-root"
    root.mkdir(mode=0o700)
    yield SFTPTargetFixture(server=sftp_server, root=root)
    sftp_server.start()
