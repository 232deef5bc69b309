"""The kill drill: a server the drill starts is killed, the monitor notices, self-healing (or
the drill itself) restarts it, and the times are measured. Used by tests/recovery/test_kill.py
and bench/recovery_detection.py (which takes medians of a few runs)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from recovery import breaker, healing, monitor
from recovery.choices import HealStrategy, HealthStatus
from recovery.models import HealOperation, HealthTransition, Service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Target(ABC):
    """A server the drill owns: started, killed, restarted by an allow-listed argv."""

    kind = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.pidfile = workdir / f"{self.kind}-{self.port}.pid"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.first_argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port)

    def kill(self) -> None:
        """SIGKILL, whichever copy runs: the first, or one a restart command started."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        pid = self._restarted_pid()
        if pid:
            _kill(pid)
        self.pidfile.unlink(missing_ok=True)

    def restart_by_hand(self) -> None:
        subprocess.run(self.restart_argv(), check=True, timeout=10, stdout=subprocess.DEVNULL)
        wait_listening(self.port)

    def _restarted_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None

    @abstractmethod
    def first_argv(self) -> list[str]: ...

    @abstractmethod
    def restart_argv(self) -> list[str]: ...

    @abstractmethod
    def service_fields(self) -> dict[str, Any]: ...


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


class RedisTarget(Target):
    kind = "redis"

    def _base(self) -> list[str]:
        binary = shutil.which("redis-server") or "redis-server"
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        # (--appendonly no is the default; stated below for the record)

    def first_argv(self) -> list[str]:
        return [*self._base(), "--appendonly", "no"]

    def restart_argv(self) -> list[str]:
        # Daemonised, with a pid file: the command returns once the server is forked off.
        return [
            *self._base(),
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--pidfile",
            str(self.pidfile),
            "--logfile",
            str(self.workdir / f"redis-{self.port}.log"),
        ]

    def service_fields(self) -> dict[str, Any]:
        return {"kind": "redis", "target": f"127.0.0.1:{self.port}"}


class HttpTarget(Target):
    kind = "http"

    def _server(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "http.server",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(self.workdir),
        ]

    def first_argv(self) -> list[str]:
        return self._server()

    def restart_argv(self) -> list[str]:
        # A launcher that leaves the server running in its own session and records its pid.
        code = (
            "import subprocess, sys; "
            f"p = subprocess.Popen({self._server()!r}, stdin=subprocess.DEVNULL, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); "
            f"open({str(self.pidfile)!r}, 'w').write(str(p.pid)); print('started', p.pid)"
        )
        return [sys.executable, "-c", code]

    def service_fields(self) -> dict[str, Any]:
        return {"kind": "http", "target": f"http://127.0.0.1:{self.port}/", "expect_status": 200}


@dataclass
class DrillResult:
    detected_s: float | None = None  # kill -> the transition to down
    breaker_at_detection: str = ""  # the breaker's state when healing was asked for
    recovered_s: float | None = None  # kill -> status up and breaker closed, seen by a poll
    up_transition_s: float | None = None  # kill -> the transition back to up
    heals: list[HealOperation] = field(default_factory=list)
    transitions: list[tuple[str, str, str]] = field(default_factory=list)


def register(target: Target, *, heal: bool, name: str | None = None) -> Service:
    """The target as a service: checked every 2 s (every second once the monitor's due
    tolerance is counted), half a second to answer."""
    name = name or f"drill-{target.kind}-{target.port}"
    if heal:
        settings.RECOVERY_RESTART_COMMANDS = {
            **settings.RECOVERY_RESTART_COMMANDS,
            name: target.restart_argv(),
        }
    return Service.objects.create(
        name=name,
        check_interval=2,
        timeout_ms=500,
        heal_strategies=[HealStrategy.RESTART_COMMAND] if heal else [],
        restart_command=name if heal else "",
        **target.service_fields(),
    )


def warm_up(service: Service, limit: float = 10.0) -> None:
    """Checks until the service is `up` (as it would be after running for a while)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        monitor.check_now(service)
        if service.status == HealthStatus.UP:
            return
        time.sleep(0.1)
    raise AssertionError(f"{service.name} never came up: {service.status_reason}")


def run(
    target: Target,
    service: Service,
    *,
    restart_by_hand_after: float | None = None,
    limit: float = 30.0,
    tick: float = 0.2,
) -> DrillResult:
    """Kill the target and drive the monitor (as beat would) until it is back or `limit`."""
    result = DrillResult()
    original = healing.maybe_heal

    def spy(*, service: Service, trigger: str) -> HealOperation | None:
        # Called by the monitor right after it opened the breaker: what did it look like?
        result.breaker_at_detection = breaker.get(service.name).snapshot()["state"]
        return original(service=service, trigger=trigger)

    healing.maybe_heal = spy
    killed = time.monotonic()
    killed_at = timezone.now()
    target.kill()
    restarted = False
    try:
        while time.monotonic() - killed < limit:
            monitor.run_due_checks()
            service.refresh_from_db()
            seen_down = HealthTransition.objects.filter(
                service=service, to_status=HealthStatus.DOWN, at__gte=killed_at
            ).exists()
            if restart_by_hand_after is not None and seen_down and not restarted:
                time.sleep(restart_by_hand_after)
                target.restart_by_hand()
                restarted = True
            state = breaker.get(service.name).snapshot()["state"]
            if seen_down and service.status == HealthStatus.UP and state == "closed":
                result.recovered_s = time.monotonic() - killed
                break
            time.sleep(tick)
    finally:
        healing.maybe_heal = original
    transitions = HealthTransition.objects.filter(service=service, at__gte=killed_at).order_by("at")
    result.transitions = [(t.from_status, t.to_status, t.reason) for t in transitions]
    for transition in transitions:
        elapsed = (transition.at - killed_at).total_seconds()
        if transition.to_status == HealthStatus.DOWN and result.detected_s is None:
            result.detected_s = elapsed
        if transition.to_status == HealthStatus.UP and result.detected_s is not None:
            result.up_transition_s = elapsed
    result.heals = list(HealOperation.objects.filter(service=service).order_by("started_at"))
    return result
