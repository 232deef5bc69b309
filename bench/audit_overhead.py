"""Requests/s of a realistic read endpoint with audit request logging on and off.

Same run, same machine, same database: GET /api/compliance/audit/events?page_size=10 with a
JWT, served by gunicorn (2 workers) on PostgreSQL and loaded by wrk from another process. Two
servers run side by side, one with logging off and one with it on, and short wrk runs alternate
between them (off-on, on-off, ...), so that the machine's drift and its neighbours' noise hit
both alike; the median of each side is compared. A sealer runs beside them at the production
interval (as Celery beat does). Afterwards the script checks that every request wrk saw
answered is in the trail and that the chain verifies.

Usage: .venv/bin/python bench/audit_overhead.py [--pairs 12] [--seconds 4] [--connections 16]
       [--configs gthread:8,sync:1]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and wrk (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "bridge_bench"
PG = "postgres://postgres@127.0.0.1:5432"
os.environ["DATABASE_URL"] = f"{PG}/{DB_NAME}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bridge.settings")
# Production mode (DEBUG would keep every SQL query in memory); one key for the token signer
# (this script) and the servers.
os.environ.update(DEBUG="false", SECRET_KEY="bench-" + "k" * 40, ALLOWED_HOSTS="127.0.0.1")
# These benchmarks load one endpoint from one address: the rate limiter (measured on its own in
# bench/security_overhead.py) would turn them into a benchmark of 429s.
os.environ["ENABLE_DDOS_PROTECTION"] = "false"
sys.path.insert(0, str(ROOT))

PATH = "/api/compliance/audit/events?page_size=10"
SERVER_DB_OPTIONS = ""


def sh(*args: str, env: dict | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout


def reset_database() -> None:
    sh("psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB_NAME}")
    sh("psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB_NAME}")
    sh(str(ROOT / ".venv/bin/python"), str(ROOT / "manage.py"), "migrate", "--noinput", "-v0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    audit: bool, port: int, worker_class: str, threads: int, connections: int
) -> subprocess.Popen:
    env = dict(
        os.environ,
        DATABASE_URL=os.environ["DATABASE_URL"] + SERVER_DB_OPTIONS,
        ENABLE_AUDIT_LOGGING="true" if audit else "false",
        LOG_LEVEL="ERROR",
    )
    command = [
        str(ROOT / ".venv/bin/gunicorn"),
        "bridge.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--log-level",
        "error",
    ]
    if worker_class == "gthread":
        # wrk opens all its keep-alive connections at once and keeps them; a gthread worker
        # accepts as many as it can, so one worker could hold most of them (and be bound by its
        # GIL) while the other idles: 255..501 req/s for the same setting. Capping each worker
        # at half the connections splits them evenly, as many short-lived clients would.
        command += ["--worker-connections", str(max(1, connections // 2))]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=1)
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("gunicorn did not start")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def wrk(port: int, token: str, seconds: int, connections: int) -> tuple[float, int, int]:
    out = sh(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{PATH}",
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(errors.group(1)) if errors else 0


class Sealer(threading.Thread):
    """Seals every `interval` seconds, as the Celery beat schedule (AUDIT_SEAL_INTERVAL) does."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.halt = threading.Event()
        self.interval = interval
        self.sealed = 0

    def run(self) -> None:
        from django.db import connection

        from compliance.chain import seal_all_pending

        while not self.halt.wait(self.interval):
            self.sealed += seal_all_pending()
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="length of one wrk run")
    parser.add_argument("--pairs", type=int, default=12, help="off/on pairs per configuration")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seed-events", type=int, default=20000)
    parser.add_argument(
        "--configs",
        default="gthread:8,sync:1",
        help="gunicorn worker class:threads pairs to measure (gthread:8 is what bin/run starts)",
    )
    parser.add_argument(
        "--seal-interval",
        type=float,
        default=None,
        help="seconds between seal runs (default: AUDIT_SEAL_INTERVAL, as in production)",
    )
    parser.add_argument(
        "--diagnose-async-commit",
        action="store_true",
        help="diagnostic only: servers commit without waiting for the WAL flush (NOT durable)",
    )
    args = parser.parse_args()
    if args.diagnose_async_commit:
        global SERVER_DB_OPTIONS
        SERVER_DB_OPTIONS = "?options=-c%20synchronous_commit%3Doff"
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")

    reset_database()
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import Group
    from django.db import connection
    from rest_framework_simplejwt.tokens import RefreshToken

    from compliance.audit import AuditContext, record_event
    from compliance.chain import seal_all_pending
    from compliance.models import AuditEvent
    from compliance.verification import check_chain
    from security.models import TokenFamily, User

    seal_interval = args.seal_interval or float(settings.AUDIT_SEAL_INTERVAL)
    user = User.objects.create_user("bench", password="Bench-Password-123")
    user.groups.add(Group.objects.get(name="compliance_officer"))
    family = TokenFamily.objects.create(user=user)
    refresh = RefreshToken.for_user(user)
    refresh["fam"], refresh["ver"] = str(family.pk), user.token_version
    token = str(refresh.access_token)
    seeder = AuditContext().with_actor(user)
    for n in range(args.seed_events):
        record_event(action="custom.seed", context=seeder, details={"n": n})
    seal_all_pending()
    with connection.cursor() as cursor:
        # Steady state, as autovacuum leaves it: fresh statistics, no dead row versions.
        cursor.execute("VACUUM ANALYZE compliance_auditevent")
    connection.close()

    configs = [tuple(item.split(":")) for item in args.configs.split(",")]
    results: dict[tuple, list[float]] = {}
    answered_with_audit = 0
    before = AuditEvent.objects.filter(action="api.request").count()
    for worker_class, threads in configs:
        ports = {False: free_port(), True: free_port()}
        while ports[True] == ports[False]:
            ports[True] = free_port()
        servers = {
            audit: start_server(audit, ports[audit], worker_class, int(threads), args.connections)
            for audit in (False, True)
        }
        sealer = Sealer(seal_interval)
        sealer.start()
        try:
            for audit in (False, True):
                wrk(ports[audit], token, 2, args.connections)  # warm-up, not counted
            for pair in range(args.pairs):
                for audit in (False, True) if pair % 2 == 0 else (True, False):
                    if not audit:
                        # The server without logging must not pay for counting events the
                        # other one left unsealed: it starts from a sealed trail.
                        seal_all_pending()
                    rps, total, errors = wrk(ports[audit], token, args.seconds, args.connections)
                    if errors:
                        sys.exit(f"{errors} non-2xx responses with audit={audit}")
                    results.setdefault((worker_class, threads, audit), []).append(rps)
                    if audit:
                        answered_with_audit += total
                off = results[(worker_class, threads, False)][-1]
                on = results[(worker_class, threads, True)][-1]
                print(
                    f"{worker_class:7} x{threads:<2} pair {pair + 1}: off {off:7.1f} req/s, "
                    f"on {on:7.1f} req/s, on/off {on / off:.3f}",
                    flush=True,
                )
        finally:
            for server in servers.values():
                stop(server)
            sealer.halt.set()
            sealer.join()
        connection.close()

    seal_all_pending()
    recorded = AuditEvent.objects.filter(action="api.request").count() - before
    chain = check_chain()
    print()
    print(
        f"endpoint: GET {PATH}, gunicorn 2 workers, wrk -c{args.connections}, "
        f"{args.pairs} off/on pairs of {args.seconds} s, sealer every {seal_interval:g} s"
    )
    print("workers          median off   median on   on/off (target >= 0.85)   per pair")
    for worker_class, threads in configs:
        offs = results[(worker_class, threads, False)]
        ons = results[(worker_class, threads, True)]
        off, on = statistics.median(offs), statistics.median(ons)
        ratios = [b / a for a, b in zip(offs, ons, strict=True)]
        print(
            f"{worker_class:7} x{threads:<2}      {off:8.1f}    {on:8.1f}     {on / off:6.3f}"
            f"                    {min(ratios):.2f}..{max(ratios):.2f}"
            f" (median {statistics.median(ratios):.3f})"
        )
    print(
        f"audit events recorded: {recorded} for {answered_with_audit} responses wrk counted "
        "(warm-ups included in events; in-flight requests at wrk's stop are recorded too)"
    )
    print(
        f"chain verifies: {chain.ok}, {chain.checked} sealed events checked, "
        f"{chain.unsealed} unsealed"
    )
    if not chain.ok or recorded < answered_with_audit:
        sys.exit("the audit trail lost events or broke under load")


if __name__ == "__main__":
    main()
