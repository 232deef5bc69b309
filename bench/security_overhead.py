"""What the rate limiter costs, and what it buys under a flood.

Same run, same machine: GET /api/jobs with a JWT, served by two gunicorns (2 threaded workers
each) on PostgreSQL with Redis, one with ENABLE_DDOS_PROTECTION on (limits high enough that the
measured client is never refused) and one with it off. Short wrk runs alternate between them
and the medians are compared. Then the flood: a client (by X-Forwarded-For from this host, a
trusted proxy) floods the limited server while another client's latency is measured, against
that client's latency with no flood, in the same run.

Then encryption throughput against raw AES-GCM (the issue's third figure): it runs
bench/crypto_throughput.py.

Usage: .venv/bin/python bench/security_overhead.py [--pairs 8] [--seconds 4] [--connections 16]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres), Redis on 127.0.0.1:6379 and wrk.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import audit_overhead as base  # noqa: E402  (bench/ is this script's own folder)

base.DB_NAME = "bridge_bench_security"
os.environ["DATABASE_URL"] = f"{base.PG}/{base.DB_NAME}"
os.environ.update(REDIS_URL="redis://127.0.0.1:6379/5", TRUSTED_PROXIES="127.0.0.1/32")
PATH = "/api/jobs"


def start(limited: bool, port: int, connections: int) -> subprocess.Popen:
    os.environ.update(
        ENABLE_DDOS_PROTECTION="true" if limited else "false",
        RATE_LIMIT_READ="1000000/1m",  # the measured client is never refused...
    )
    try:
        return base.start_server(True, port, "gthread", 8, connections)
    finally:
        os.environ["ENABLE_DDOS_PROTECTION"] = "false"


def wrk(port: int, token: str, seconds: int, connections: int, client: str) -> dict:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f'wrk.headers["X-Forwarded-For"] = "{client}"\n')
    out = base.sh(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        "-H",
        f"Authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{PATH}",
    )
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * scale,
        "non2xx": int(errors.group(1)) if errors else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    base.reset_database()
    import django

    django.setup()
    import redis
    from rest_framework_simplejwt.tokens import RefreshToken

    from security.models import TokenFamily, User

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    user = User.objects.create_superuser("bench", password="Bench-Password-123", email="")
    family = TokenFamily.objects.create(user=user)
    refresh = RefreshToken.for_user(user)
    refresh["fam"], refresh["ver"] = str(family.pk), user.token_version
    token = str(refresh.access_token)

    ports = {False: base.free_port(), True: base.free_port()}
    servers = {limited: start(limited, ports[limited], args.connections) for limited in ports}
    try:
        for limited in ports:
            wrk(ports[limited], token, 2, args.connections, "198.51.100.1")  # warm-up
        rates: dict[bool, list[float]] = {False: [], True: []}
        for pair in range(args.pairs):
            for limited in (False, True) if pair % 2 == 0 else (True, False):
                run = wrk(ports[limited], token, args.seconds, args.connections, "198.51.100.1")
                if run["non2xx"]:
                    sys.exit(f"the measured client was refused {run['non2xx']} times")
                rates[limited].append(run["rps"])
        off, on = statistics.median(rates[False]), statistics.median(rates[True])

        # The flood: restart the limited server with a realistic read limit.
        base.stop(servers[True])
        # A limit the measured clients stay under (a few hundred requests each), the flood not.
        os.environ.update(ENABLE_DDOS_PROTECTION="true", RATE_LIMIT_READ="1000/1m")
        servers[True] = base.start_server(True, ports[True], "gthread", 8, args.connections)
        os.environ["ENABLE_DDOS_PROTECTION"] = "false"
        quiet = wrk(ports[True], token, args.seconds, 1, "198.51.100.2")
        flood: dict = {}

        def flooding() -> None:
            flood.update(wrk(ports[True], token, args.seconds + 6, 64, "203.0.113.66"))

        flooder = threading.Thread(target=flooding)
        flooder.start()
        time.sleep(5)  # the flood has spent its share of the window by then
        busy = wrk(ports[True], token, args.seconds, 1, "198.51.100.3")
        flooder.join()
    finally:
        for server in servers.values():
            base.stop(server)

    print(f"GET {PATH}, gunicorn 2x8 threads, PostgreSQL + Redis, {args.pairs} pairs of runs")
    print(f"  limiter off: {off:8.1f} req/s (median)")
    print(f"  limiter on:  {on:8.1f} req/s (median)  ratio {on / off:.3f} (target >= 0.90)")
    print(
        f"flood: {flood['rps']:.0f} req/s from one address ({flood['non2xx']} refused); "
        f"another address's p99 {busy['p99_ms']:.1f} ms vs {quiet['p99_ms']:.1f} ms without "
        f"the flood (ratio {busy['p99_ms'] / quiet['p99_ms']:.2f}); its requests refused: "
        f"{busy['non2xx']}"
    )
    # The third figure the issue asks of this script: encryption against raw AES-GCM.
    print("encryption at rest against raw AESGCM (target >= 0.80 at 1 MiB):", flush=True)
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("crypto_throughput.py"))], check=True
    )


if __name__ == "__main__":
    main()
