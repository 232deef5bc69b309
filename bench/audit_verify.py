"""How fast the audit chain is verified, against the physical limit of hashing its bytes.

Seeds --events sealed events on PostgreSQL, then in the same run measures:
- the previous verifier (rows through the ORM, each hashed by `event_hash`, the definition),
- the verification job as the API, beat and the command run it (`verify_chain_job`: a
  server-side cursor read by a second thread, the canonical JSON joined from precomputed parts),
- `sha256sum` over a file of the same canonical JSON, one event per line: the hashing alone,
  in C, with no database: what no verifier of these bytes can beat on this machine.

Usage: .venv/bin/python bench/audit_verify.py [--events 1000000]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and sha256sum (coreutils). Uses (and
recreates) database bridge_verify.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "bridge_verify"
PG = "postgres://postgres@127.0.0.1:5432"
os.environ["DATABASE_URL"] = f"{PG}/{DB_NAME}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bridge.settings")
os.environ.update(DEBUG="false", SECRET_KEY="bench-" + "k" * 40, ALLOWED_HOSTS="testserver")
sys.path.insert(0, str(ROOT))
from _seed import grow  # noqa: E402  (bench/ is this script's own folder)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def previous_verifier(head_seq: int) -> int:
    """The verifier before issue 7: ORM rows, a dict per event, `event_hash` on each."""
    from compliance.chain import _EVENT_FIELDS, event_hash
    from compliance.models import AuditSeal

    columns = ("seq", "prev_hash", "hash", "hash_version", *(f"event__{n}" for n in _EVENT_FIELDS))
    rows = AuditSeal.objects.filter(seq__lte=head_seq).order_by("seq").values_list(*columns)
    checked = 0
    for row in rows.iterator(chunk_size=2000):
        fields = dict(zip(_EVENT_FIELDS, row[4:], strict=True))
        fields.update(seq=row[0], prev_hash=row[1])
        if event_hash(fields, row[3]) != row[2]:
            raise SystemExit(f"seq {row[0]} does not verify")
        checked += 1
    return checked


def write_canonical(path: Path, head_seq: int) -> int:
    """The bytes the chain hashes, one event per line, for sha256sum."""
    from compliance import verification
    from compliance.chain import row_canonical

    canonical = row_canonical(1, verification._COLUMNS)
    size = 0
    with path.open("w", encoding="utf-8") as out:
        for row in verification._rows_postgres(head_seq):
            line = canonical(row) + "\n"
            size += len(line.encode("utf-8"))
            out.write(line)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()

    sh("psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB_NAME}")
    sh("psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB_NAME}")
    sh(str(ROOT / ".venv/bin/python"), str(ROOT / "manage.py"), "migrate", "--noinput", "-v0")
    import django

    django.setup()
    from django.db import connection

    from bridge.jobs import run_job
    from compliance import verification
    from compliance.audit import AuditContext
    from compliance.chain import chain_head, seal_all_pending
    from compliance.choices import VerificationSource

    grow(args.events)
    seal_all_pending()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE compliance_auditevent")
        cursor.execute("VACUUM ANALYZE compliance_auditseal")
    head_seq = chain_head().last_seq

    started = time.perf_counter()
    old_checked = previous_verifier(head_seq)
    old_seconds = time.perf_counter() - started

    job = verification.start_verification(
        context=AuditContext.system(), source=VerificationSource.CLI, enqueue=False
    )
    started = time.perf_counter()
    run = run_job(job.pk, verification.verify_chain_job)
    job_seconds = time.perf_counter() - started
    if not run.result.get("ok"):
        raise SystemExit(f"the chain did not verify: {run.result or run.error}")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "canonical.jsonl"
        size = write_canonical(path, head_seq)
        started = time.perf_counter()
        sh("sha256sum", str(path))
        sha_seconds = time.perf_counter() - started

    def rate(count: int, seconds: float) -> str:
        return f"{count / seconds:>10,.0f} events/s"

    checked = run.result["checked"]
    print(f"{head_seq:,} sealed events, {size / 1e6:,.0f} MB of canonical JSON")
    rows = [
        ("previous verifier (ORM + event_hash)", old_seconds, old_checked),
        ("verification job (the API's)", job_seconds, checked),
        ("sha256sum over the same bytes", sha_seconds, head_seq),
    ]
    for label, seconds, count in rows:
        print(f"{label:38} {seconds:6.1f} s {rate(count, seconds)}")
    print(
        f"job / previous: {old_seconds / job_seconds:.2f}x faster; "
        f"job / sha256sum: {sha_seconds / job_seconds:.2f} of the physical limit"
    )


if __name__ == "__main__":
    main()
