"""How the audit trail behaves at a million events: console pages, API list, sealer, verifier.

Measures each console/API page with a small table (the baseline) and again after growing the
table to --events rows, in the same run, and prints the ratio. Also prints the sealer's and the
verifier's throughput (events/s) on the large table.

Usage: .venv/bin/python bench/audit_scale.py [--events 1000000]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres). Uses (and recreates) database bridge_scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "bridge_scale"
PG = "postgres://postgres@127.0.0.1:5432"
os.environ["DATABASE_URL"] = f"{PG}/{DB_NAME}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bridge.settings")
os.environ.update(DEBUG="false", SECRET_KEY="bench-" + "k" * 40, ALLOWED_HOSTS="testserver")
# These benchmarks load one endpoint from one address: the rate limiter (measured on its own in
# bench/security_overhead.py) would turn them into a benchmark of 429s.
os.environ["ENABLE_DDOS_PROTECTION"] = "false"
sys.path.insert(0, str(ROOT))
from _seed import grow  # noqa: E402  (bench/ is this script's own folder)

PAGES = {
    "console list, page 1": "/admin/compliance/auditevent/",
    "console list, page 100": "/admin/compliance/auditevent/?p=100",
    "console filter by action": "/admin/compliance/auditevent/?action=auth.login.failed",
    "console search by username": "/admin/compliance/auditevent/?q=user7",
    "console search by client IP": "/admin/compliance/auditevent/?q=10.0.0.7",
    "console filter 5xx (rare)": "/admin/compliance/auditevent/?status_class=5",
    "console filter 2xx (most)": "/admin/compliance/auditevent/?status_class=2",
    "console filter waiting for seal": "/admin/compliance/auditevent/?sealed=no",
    "console dashboard": "/admin/",
    "API list, page size 10": "/api/compliance/audit/events?page_size=10",
    "API list filtered by actor": "/api/compliance/audit/events?actor=user7&page_size=10",
}


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def time_pages(client: object, repeat: int = 7) -> dict[str, float]:
    timings = {}
    for label, url in PAGES.items():
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get(url)
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (url, response.status_code)
        timings[label] = statistics.median(samples)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--baseline-events", type=int, default=10_000)
    args = parser.parse_args()

    sh("psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB_NAME}")
    sh("psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB_NAME}")
    sh(str(ROOT / ".venv/bin/python"), str(ROOT / "manage.py"), "migrate", "--noinput", "-v0")
    import django

    django.setup()
    from django.db import connection
    from django.test import Client
    from django.test.utils import override_settings

    from compliance.chain import seal_all_pending
    from compliance.verification import check_chain
    from security.models import User

    admin = User.objects.create_superuser("root", password="Bench-Password-123", email="")
    client = Client()
    client.force_login(admin)

    with override_settings(ENABLE_AUDIT_LOGGING=False):
        grow(args.baseline_events)
        seal_all_pending()
        small = time_pages(client)

        grow(args.events - args.baseline_events)
        started = time.perf_counter()
        sealed = seal_all_pending()
        seal_seconds = time.perf_counter() - started
        with connection.cursor() as cursor:
            # What autovacuum would do soon after: without fresh statistics the planner still
            # believes every row is unsealed and scans the table to count the unsealed ones.
            cursor.execute("VACUUM ANALYZE compliance_auditevent")
        started = time.perf_counter()
        result = check_chain()
        verify_seconds = time.perf_counter() - started
        large = time_pages(client)

    print(f"{'page':32} {args.baseline_events:>10,} rows {args.events:>10,} rows   ratio")
    for label in PAGES:
        ratio = large[label] / small[label]
        print(f"{label:32} {small[label]:11.1f} ms {large[label]:11.1f} ms {ratio:7.2f}")
    print()
    rate = sealed / seal_seconds
    print(f"sealer:   {sealed:,} events in {seal_seconds:.1f} s = {rate:,.0f} events/s")
    print(
        f"verifier: {result.checked:,} events in {verify_seconds:.1f} s = "
        f"{result.checked / verify_seconds:,.0f} events/s, ok={result.ok}"
    )


if __name__ == "__main__":
    main()
