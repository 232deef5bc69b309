"""How fast the audit chain is verified, against the physical limit of hashing its bytes.

Seeds --events sealed events on PostgreSQL, then in the same run measures:
- the previous verifier (rows through the ORM, each hashed by `event_hash`, the definition),
- the verification job as the API, beat and the command run it (`verify_chain_job`: a
  server-side cursor read by a second thread, the canonical JSON joined from precomputed parts),
- the first checkpoint (it walks the whole chain once before signing; later ones walk only
  the events since the previous one),
- `manage.py export_audit` and `python -m compliance.verify_export` (offline: no Django, no
  database) over the whole chain,
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
# A key and a sink of the bench's own, never the developer's var/keys or var/audit-checkpoints.
_SCRATCH = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
os.environ.update(
    AUDIT_SIGNING_KEY_FILE=str(_SCRATCH / "audit.pem"),
    AUDIT_CHECKPOINT_DIR=str(_SCRATCH / "checkpoints"),
)
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
    from compliance.proof import row_canonical

    canonical = row_canonical(1, verification._COLUMNS)
    size = 0
    with path.open("w", encoding="utf-8") as out:
        for row in verification.chain_rows(head_seq):
            line = canonical(row) + "\n"
            size += len(line.encode("utf-8"))
            out.write(line)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the events of an earlier run's database"
    )
    args = parser.parse_args()

    if not args.reuse:
        sh("psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB_NAME}")
        sh("psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB_NAME}")
    sh(str(ROOT / ".venv/bin/python"), str(ROOT / "manage.py"), "migrate", "--noinput", "-v0")
    # A reused database keeps its events; its checkpoints were signed with an earlier run's
    # scratch key into an earlier sink, so they go.
    sh(
        "psql",
        f"{PG}/{DB_NAME}",
        "-qc",
        "TRUNCATE compliance_auditcheckpoint, security_signingkey",
    )
    import django

    django.setup()
    from django.db import connection

    from bridge.jobs import run_job
    from compliance import verification
    from compliance.audit import AuditContext
    from compliance.chain import chain_head, seal_all_pending
    from compliance.choices import VerificationSource
    from compliance.models import AuditEvent

    grow(max(0, args.events - AuditEvent.objects.count()))
    seal_all_pending()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE compliance_auditevent")
        cursor.execute("VACUUM ANALYZE compliance_auditseal")
    head_seq = chain_head().last_seq

    started = time.perf_counter()
    old_checked = previous_verifier(head_seq)
    old_seconds = time.perf_counter() - started

    from compliance.checkpoints import make_checkpoint

    started = time.perf_counter()
    make_checkpoint()
    checkpoint_seconds = time.perf_counter() - started

    job = verification.start_verification(
        context=AuditContext.system(), source=VerificationSource.CLI, enqueue=False
    )
    started = time.perf_counter()
    run = run_job(job.pk, verification.verify_chain_job)
    job_seconds = time.perf_counter() - started
    if not run.result.get("ok"):
        raise SystemExit(f"the chain did not verify: {run.result or run.error}")

    with tempfile.TemporaryDirectory() as folder:
        export = Path(folder) / "export.jsonl"
        started = time.perf_counter()
        sh(str(ROOT / ".venv/bin/python"), str(ROOT / "manage.py"), "export_audit", str(export))
        export_seconds = time.perf_counter() - started
        key = Path(folder) / "public.pem"
        from compliance import proof
        from security.keys import audit_signing_key

        key.write_text(proof.public_key_pem(audit_signing_key().public))
        started = time.perf_counter()
        sh(
            str(ROOT / ".venv/bin/python"),
            "-m",
            "compliance.verify_export",
            str(export),
            "--public-key",
            str(key),
        )
        offline_seconds = time.perf_counter() - started
        export_mb = export.stat().st_size / 1e6
        export.unlink()
        path = Path(folder) / "canonical.jsonl"
        size = write_canonical(path, head_seq)
        started = time.perf_counter()
        sh("sha256sum", str(path))
        sha_seconds = time.perf_counter() - started

    def rate(count: int, seconds: float) -> str:
        return f"{count / seconds:>10,.0f} events/s"

    checked = run.result["checked"]
    print(
        f"{head_seq:,} sealed events, {size / 1e6:,.0f} MB of canonical JSON, "
        f"{export_mb:,.0f} MB exported"
    )
    rows = [
        ("previous verifier (ORM + event_hash)", old_seconds, old_checked),
        ("first checkpoint (walks it all once)", checkpoint_seconds, head_seq),
        ("verification job (the API's)", job_seconds, checked),
        ("export_audit (manage.py)", export_seconds, head_seq),
        ("verify_export offline (no Django)", offline_seconds, head_seq),
        ("sha256sum over the same bytes", sha_seconds, head_seq),
    ]
    for label, seconds, count in rows:
        print(f"{label:38} {seconds:6.1f} s {rate(count, seconds)}")
    print(
        f"job / previous: {old_seconds / job_seconds:.2f}x faster; "
        f"job / sha256sum: {sha_seconds / job_seconds:.2f} of the physical limit; "
        f"offline / sha256sum: {sha_seconds / offline_seconds:.2f}"
    )


if __name__ == "__main__":
    main()
