"""Requests/s of a realistic read endpoint with audit request logging on and off.

Same run, same machine, same database: gunicorn (2 workers) on PostgreSQL serving
GET /api/compliance/audit/events?page_size=10 with a JWT, loaded by wrk from another process.
Runs alternate off/on several times and the medians are compared. With logging on, a sealer
runs beside the server (as Celery beat would) and afterwards the script checks that every
request wrk saw answered is in the trail and that the chain verifies.

Usage: .venv/bin/python bench/audit_overhead.py [--seconds 8] [--rounds 6] [--connections 8]
       [--configs sync:1,gthread:4]
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


def start_server(audit: bool, port: int, worker_class: str, threads: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        DATABASE_URL=os.environ["DATABASE_URL"] + SERVER_DB_OPTIONS,
        ENABLE_AUDIT_LOGGING="true" if audit else "false",
        LOG_LEVEL="ERROR",
    )
    process = subprocess.Popen(
        [
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
        ],
        cwd=ROOT,
        env=env,
    )
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

        from compliance.services import seal_all_pending

        while not self.halt.wait(self.interval):
            self.sealed += seal_all_pending()
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seed-events", type=int, default=20000)
    parser.add_argument(
        "--configs",
        default="sync:1,gthread:4",
        help="gunicorn worker class:threads pairs to compare, interleaved round by round",
    )
    parser.add_argument(
        "--seal-interval",
        type=float,
        default=5.0,
        help="seconds between seal runs (the production default AUDIT_SEAL_INTERVAL is 5)",
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
    from django.contrib.auth.models import Group
    from django.db import connection
    from rest_framework_simplejwt.tokens import RefreshToken

    from compliance.models import AuditEvent
    from compliance.services import check_chain, record_event, seal_all_pending
    from security.models import TokenFamily, User

    user = User.objects.create_user("bench", password="Bench-Password-123")
    user.groups.add(Group.objects.get(name="compliance_officer"))
    family = TokenFamily.objects.create(user=user)
    refresh = RefreshToken.for_user(user)
    refresh["fam"], refresh["ver"] = str(family.pk), user.token_version
    token = str(refresh.access_token)
    for n in range(args.seed_events):
        record_event(action="custom.seed", actor=user, details={"n": n})
    seal_all_pending()
    with connection.cursor() as cursor:
        # Steady state, as autovacuum leaves it: fresh statistics, no dead row versions.
        cursor.execute("VACUUM ANALYZE compliance_auditevent")

    port = free_port()
    configs = [tuple(item.split(":")) for item in args.configs.split(",")]
    results: dict[tuple, list[float]] = {}
    answered_with_audit = 0
    before = AuditEvent.objects.filter(action="api.request").count()
    for round_no in range(args.rounds):
        for worker_class, threads in configs:
            for audit in (False, True):
                server = start_server(audit, port, worker_class, int(threads))
                sealer = Sealer(args.seal_interval)
                if audit:
                    sealer.start()
                try:
                    wrk(port, token, 2, args.connections)  # warm-up, not counted
                    rps, total, errors = wrk(port, token, args.seconds, args.connections)
                finally:
                    stop(server)
                    sealer.halt.set()
                    if audit:
                        sealer.join()
                if errors:
                    sys.exit(f"{errors} non-2xx responses with audit={'on' if audit else 'off'}")
                results.setdefault((worker_class, threads, audit), []).append(rps)
                if audit:
                    answered_with_audit += total
                state = "on " if audit else "off"
                print(
                    f"round {round_no + 1} {worker_class:7} x{threads} audit {state}: "
                    f"{rps:8.1f} req/s ({total} requests)",
                    flush=True,
                )

    connection.close()
    seal_all_pending()
    recorded = AuditEvent.objects.filter(action="api.request").count() - before
    chain = check_chain()
    print()
    print(
        f"endpoint: GET {PATH}, gunicorn 2 workers, wrk -c{args.connections}, {args.rounds} rounds"
    )
    print("worker class      median off   median on   ratio on/off (target >= 0.85)")
    for worker_class, threads in configs:
        off = statistics.median(results[(worker_class, threads, False)])
        on = statistics.median(results[(worker_class, threads, True)])
        ratios = [
            b / a
            for a, b in zip(
                results[(worker_class, threads, False)],
                results[(worker_class, threads, True)],
                strict=True,
            )
        ]
        print(
            f"{worker_class:7} x{threads:<2}      {off:8.1f}    {on:8.1f}     {on / off:6.3f}"
            f"   (per round {min(ratios):.2f}..{max(ratios):.2f})"
        )
    print(
        f"audit events recorded: {recorded} for {answered_with_audit} responses wrk counted "
        "(warm-ups included in events; in-flight requests at wrk's stop are recorded too)"
    )
    print(
        f"chain verifies: {chain.ok}, {chain.checked} sealed events checked, "
        f"{chain.unsealed} unsealed"
    )


if __name__ == "__main__":
    main()
