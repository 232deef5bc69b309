"""Compliance speed (issue 11), each figure against a baseline measured in the same run.

Seeds --events audit events on PostgreSQL (database bridge_compliance_bench) through the real
recording path (`compliance.audit.event_values`: 100 users, each event's actor and client IP
sealed under that user's subject key, hash version 2), seals and checkpoints them, then measures:

1. Verifying the chain: `check_chain` as the verification job runs it (target: at least
   200,000 events/s), against `sha256sum` over the same canonical bytes (the hashing alone, in
   C, no database: the limit no verifier can pass here).
2. A CSV report of the audit trail over every event (`generate_inline`, in a child process so
   its peak RSS is its own; target: under 30 s and 200 MB), against PostgreSQL's own
   `\\copy (SELECT ...) TO file CSV` of the same table through psql.
3. An access export (the DSR job: ZIP of every source) for one subject with --subject-records
   audit events (target: under 2 s), against reading those rows and writing them as JSON
   (`values_list` + `json.dumps`, no decryption, no ZIP).

Usage: .venv/bin/python bench/compliance_speed.py [--events 1000000] [--reuse]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres), psql and sha256sum.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "bridge_compliance_bench"
PG = "postgres://postgres@127.0.0.1:5432"
USERS = 100
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", tempfile.gettempdir())) / "bridge-compliance-bench"
ENV = {
    "DATABASE_URL": f"{PG}/{DB_NAME}",
    "DJANGO_SETTINGS_MODULE": "bridge.settings",
    "DEBUG": "false",
    "SECRET_KEY": "bench-" + "k" * 40,
    "ALLOWED_HOSTS": "testserver",
    # The bench's own keys, sinks and files, never the developer's var/.
    "BRIDGE_VAR_DIR": str(SCRATCH / "var"),
    "AUDIT_SIGNING_KEY_FILE": str(SCRATCH / "audit.pem"),
    "AUDIT_CHECKPOINT_DIR": str(SCRATCH / "checkpoints"),
    "REPORT_DIR": str(SCRATCH / "reports"),
    "DSR_EXPORT_DIR": str(SCRATCH / "dsr"),
    # A report reads for longer than the web's 30 s statement limit allows a single query.
    "DB_STATEMENT_TIMEOUT": "0",
}
os.environ.update(ENV)
sys.path.insert(0, str(ROOT))


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def setup_django() -> None:
    import django

    django.setup()


def create_database() -> None:
    sh("psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB_NAME}")
    sh("psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB_NAME}")
    sh(sys.executable, str(ROOT / "manage.py"), "migrate", "--noinput", "-v0")


def seed(total: int) -> None:
    """`total` events through the recording path, `USERS` actors, 2.6 s apart, newest now."""
    from django.utils import timezone

    from compliance.audit import _INSERT_COLUMNS, AuditContext, bulk_insert, event_values
    from compliance.models import AuditEvent
    from security.models import User

    for n in range(USERS):
        User.objects.get_or_create(username=f"user{n:03d}", defaults={"email": f"u{n}@x.test"})
    contexts = [
        AuditContext(
            actor_id=n + 1,
            actor_username=f"user{n:03d}",
            client_ip=f"10.0.{n % 7}.{n % 250}",
            request_id="",
        )
        for n in range(USERS)
    ]
    now = timezone.now()
    batch: list[tuple] = []
    started = time.perf_counter()
    for g in range(total):
        batch.append(
            event_values(
                action=("api.request", "api.request", "auth.login.succeeded")[g % 3],
                context=contexts[g % USERS],
                method="GET",
                path="/api/compliance/audit/events",
                status_code=500 if g % 997 == 0 else 200,
                latency_ms=3.5,
                details={"n": g},
                occurred_at=now - timedelta(seconds=2.6 * (total - g)),
            )
        )
        if len(batch) == 10_000:
            bulk_insert(AuditEvent, _INSERT_COLUMNS, batch)
            batch.clear()
            print(f"\r  seeded {g + 1:,} events", end="", flush=True)
    if batch:
        bulk_insert(AuditEvent, _INSERT_COLUMNS, batch)
    print(f"\r  seeded {total:,} events in {time.perf_counter() - started:.1f} s")


def seal_and_checkpoint() -> None:
    from compliance.chain import seal_pending_events
    from compliance.checkpoints import make_checkpoint

    started, sealed = time.perf_counter(), 0
    while done := seal_pending_events(batch=20_000):
        sealed += done
        print(f"\r  sealed {sealed:,} events", end="", flush=True)
    print(f"\r  sealed {sealed:,} events in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    make_checkpoint(force=True)
    print(f"  first checkpoint (walks the chain) in {time.perf_counter() - started:.1f} s")


def bench_verify() -> tuple[float, float, int]:
    """(check_chain seconds, sha256sum seconds over the same bytes, events)."""
    from compliance.chain import chain_head
    from compliance.verification import canonical_rows, check_chain

    head = chain_head().last_seq
    started = time.perf_counter()
    result = check_chain()
    verify_s = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"the chain does not verify: {result.reason}")
    text = SCRATCH / "canonical.txt"
    with text.open("w", encoding="utf-8") as out:
        for row in canonical_rows(head):
            out.write(row[-1])
            out.write("\n")
    started = time.perf_counter()
    sh("sha256sum", str(text))
    sha_s = time.perf_counter() - started
    text.unlink()
    return verify_s, sha_s, result.checked


_REPORT_CHILD = """
import json, resource, sys, time
import django
django.setup()
from datetime import date, timedelta
from compliance.audit import AuditContext
from compliance.reports import generate_inline
today = date.today()
started = time.perf_counter()
report = generate_inline(type="audit_trail", format="csv", date_from=today - timedelta(days=400),
                         date_to=today, context=AuditContext.system())
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "status": report.status, "error": report.error,
                  "rows": report.rows, "size": report.size,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def bench_report() -> tuple[dict, float]:
    """(the report child's figures, psql \\copy seconds for the same table)."""
    out = sh(sys.executable, "-c", _REPORT_CHILD)
    figures = json.loads(out.strip().splitlines()[-1])
    if figures["status"] != "succeeded":
        raise SystemExit(f"the report failed: {figures['error']}")
    target = SCRATCH / "copy.csv"
    started = time.perf_counter()
    # Only our own column names and scratch path: no input reaches this text.
    copy = (
        "\\copy (SELECT e.id, s.seq, e.occurred_at, e.actor_id, e.actor_username, e.client_ip,"
        " e.action, e.object_type, e.object_id, e.method, e.path, e.status_code, e.request_id,"
        " e.details, e.personal FROM compliance_auditevent e"
        " LEFT JOIN compliance_auditseal s ON s.event_id = e.id ORDER BY e.id)"
    )
    sh("psql", f"{PG}/{DB_NAME}", "-qc", f"{copy} TO '{target}' CSV HEADER")
    copy_s = time.perf_counter() - started
    target.unlink()
    return figures, copy_s


def bench_access_export(subject: str) -> tuple[float, float, int, dict]:
    """(DSR access job seconds, plain read + JSON seconds, records, the job's result)."""
    from bridge.jobs import run_job
    from compliance import dsr
    from compliance.audit import AuditContext
    from compliance.models import AuditEvent
    from compliance.personal import actor_match

    context = AuditContext.system()
    request = dsr.create_request(subject_id=subject, type="access", details={}, context=context)
    job = dsr.verify_request(request=request, method="bench", context=context, enqueue=False)
    started = time.perf_counter()
    finished = run_job(job.pk, dsr.run_dsr_job)
    export_s = time.perf_counter() - started
    if finished is None or finished.status != "succeeded":
        raise SystemExit(f"the access export failed: {finished and finished.error}")
    started = time.perf_counter()
    rows = list(
        AuditEvent.objects.filter(actor_match(subject))
        .order_by("id")
        .values_list("id", "occurred_at", "action", "path", "status_code", "details", "personal")
    )
    (SCRATCH / "plain.json").write_text(json.dumps(rows, default=str))
    plain_s = time.perf_counter() - started
    (SCRATCH / "plain.json").unlink()
    return export_s, plain_s, len(rows), finished.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--reuse", action="store_true", help="keep an earlier run's events")
    args = parser.parse_args()
    if not args.reuse:
        # A fresh database needs fresh sinks: old checkpoints would say rows were deleted.
        shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        print(f"creating {DB_NAME} and seeding {args.events:,} events")
        create_database()
    setup_django()
    if not args.reuse:
        seed(args.events)
    seal_and_checkpoint()
    subject = "user042"

    verify_s, sha_s, checked = bench_verify()
    report, copy_s = bench_report()
    export_s, plain_s, records, result = bench_access_export(subject)

    print()
    print("| figure | time | rate | baseline | ratio | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| verify {checked:,} events (check_chain) | {verify_s:.1f} s | "
        f"{checked / verify_s:,.0f} events/s | sha256sum of the same bytes {sha_s:.1f} s "
        f"({checked / sha_s:,.0f}/s) | {verify_s / sha_s:.2f}x | >= 200,000/s: "
        f"{'met' if checked / verify_s >= 200_000 else 'NOT met'} |"
    )
    peak_mb = report["peak_rss_kb"] / 1024
    print(
        f"| CSV audit-trail report, {report['rows']:,} rows, {report['size'] / 2**20:,.0f} MiB "
        f"| {report['seconds']:.1f} s, peak RSS {peak_mb:.0f} MB | "
        f"{report['rows'] / report['seconds']:,.0f} rows/s | psql \\copy {copy_s:.1f} s | "
        f"{report['seconds'] / copy_s:.2f}x | < 30 s and < 200 MB: "
        f"{'met' if report['seconds'] < 30 and peak_mb < 200 else 'NOT met'} |"
    )
    print(
        f"| access export, subject with {records:,} audit events | {export_s:.2f} s | "
        f"{records / export_s:,.0f} records/s | read + json.dumps {plain_s:.2f} s | "
        f"{export_s / plain_s:.2f}x | < 2 s: {'met' if export_s < 2 else 'NOT met'} |"
    )
    print()
    print("export result:", json.dumps(result.get("counts", result), default=str)[:400])
    print("peak RSS of this process:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


if __name__ == "__main__":
    main()
