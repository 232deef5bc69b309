"""Bridge's backups against pg_dump and pg_restore on a ~1 GiB PostgreSQL database, same run.

1. The dataset (made once, reused while its parameters match; `--rebuild` remakes it): database
   `bridge_bench_backup`, `pgbench -i -s SCALE` plus `bench_docs`, a table of jsonb documents
   made of words drawn from a 4,096-word vocabulary, random amounts and hex references (it
   compresses about 3-4x, like real text, not 50x like pgbench's blank filler).
2. Baselines: `pg_dump -Fc` (gzip, its default level) to one file, `pg_dump -Fc -Z0` (the dump
   alone, no compression) to one file, and `pg_restore -j2` of the -Fc dump into a fresh
   database (createdb included).
3. Bridge, exactly as operators run it: `services.start_backup(kind="full",
   components=["database"])` run by `bridge.jobs.run_job`, in a child process (so that its peak
   RSS is its own), with the bench database in BACKUP_DATABASES, three local file-system targets
   (one stream tee'd to three directories, each copy fsynced, read back, hashed and renamed),
   zstd level 3 and AES-256-GCM under a random master key. Bridge's own database is a small
   catalog database (`bridge_bench_catalog`, migrated at start): Bridge always backs itself up
   too, so the backup's time includes that unit (a few MB). Its restore is the restore drill
   (`services.start_drill`): it verifies every copy it reads (decrypts the whole artifact once),
   restores into a fresh scratch database, compares every table's row count (and the applied
   migrations) with the manifest and drops the scratch database: the same end state as
   `pg_restore -j2` into a fresh database, plus the checks. A live restore is not comparable:
   it first takes a safety backup.
4. Peak RSS: the backup child's own high-water mark (VmHWM in /proc, read at its end), and
   separately that of the pg_dump it ran and of the baseline pg_dumps (VmHWM sampled every
   20-50 ms while they run; getrusage cannot be used: a process started by vfork+exec inherits
   its parent's high-water mark in ru_maxrss). Wall times and phases (a timer around the
   handler's backup/restore/check/discard and the copies' commit) come from the child too.
5. Uploads: MEDIA_ROOT with 2,000 files (~400 MB, sizes from 1 KiB to 8 MiB, 70% random
   bytes like images and archives, 30% text), all last modified two days ago; a full backup of
   the `uploads` component, then 1% of the files rewritten, then an incremental on that full.

Each round measures every pair back to back (the baseline first in rounds 1, 3, ..., Bridge
first in rounds 2, 4, ...); the ratios are per round, and the table shows their medians.
Targets (issue 10): backup time <= 0.5x pg_dump -Fc and <= 1.3x pg_dump -Z0; stored size of
one copy <= 1.0x pg_dump -Fc's file; restore <= 1.2x pg_restore -j2; incremental <= 5% of the
full's time; peak RSS of the backup process < 200 MB.

Usage: .venv/bin/python bench/backup_speed.py [--scale 48] [--docs 500000] [--rounds 3]
       [--media-files 2000] [--media-mb 400] [--quick] [--rebuild] [--keep] [--profile DIR]
Needs PostgreSQL (127.0.0.1:5432, user postgres, trust) and its client programs (pg_dump,
pg_restore, pgbench, createdb) on PATH.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import io
import json
import os
import random
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_DB = "bridge_bench_backup"
CATALOG_DB = "bridge_bench_catalog"
RESTORE_DB = "bridge_bench_restore"
MiB = 1024 * 1024
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


# --- PostgreSQL helpers ---------------------------------------------------------------------


def pg_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment for the PostgreSQL client programs."""
    env = dict(os.environ)
    env.update(PGHOST=args.host, PGPORT=str(args.port), PGUSER=args.user)
    env.pop("PGDATABASE", None)
    return env


def db_url(args: argparse.Namespace, name: str) -> str:
    return f"postgres://{args.user}@{args.host}:{args.port}/{name}"


def connect(args: argparse.Namespace, name: str = "postgres") -> Any:
    import psycopg2

    conn = psycopg2.connect(host=args.host, port=args.port, user=args.user, dbname=name)
    conn.autocommit = True
    return conn


def sql(args: argparse.Namespace, query: str, params: Any = None, db: str = "postgres") -> list:
    conn = connect(args, db)
    try:
        with conn.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def drop_database(args: argparse.Namespace, name: str) -> None:
    sql(args, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_size(args: argparse.Namespace, name: str) -> int:
    return int(sql(args, "SELECT pg_database_size(%s)", [name])[0][0])


# --- The dataset ----------------------------------------------------------------------------


def vocabulary(count: int = 4096) -> list[str]:
    """Pronounceable made-up words: text that compresses like prose, not like a constant."""
    rng = random.Random(10)
    onsets = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl pr sh st th tr".split()
    vowels = "a e i o u ai ea ee io ou".split()
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "rk", "ng"]
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(1, 3)
        words.add(
            "".join(
                rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                for _ in range(syllables)
            )
        )
    return sorted(words)


def documents(first: int, last: int, words: list[str]) -> io.StringIO:
    """Rows of bench_docs in COPY text format: orders with a customer, amounts, tags, a note of
    10-40 words and a hex reference."""
    rng = random.Random(first)
    tiers = ["free", "pro", "team", "enterprise"]
    statuses = ["open", "paid", "shipped", "refunded", "void"]
    buffer = io.StringIO()
    for number in range(first, last + 1):
        doc = {
            "customer": {
                "name": f"{rng.choice(words).title()} {rng.choice(words).title()}",
                "email": f"{rng.choice(words)}{rng.randrange(10000)}@{rng.choice(words)}.example",
                "tier": tiers[number % 4],
            },
            "amount": round(rng.uniform(0, 10000), 2),
            "quantity": rng.randrange(50),
            "status": rng.choice(statuses),
            "tags": rng.choices(words, k=1 + number % 5),
            "note": " ".join(rng.choices(words, k=10 + number % 30)),
            "ref": rng.randbytes(16).hex(),
        }
        created = (EPOCH + timedelta(seconds=7 * number)).isoformat()
        text = json.dumps(doc).replace("\\", "\\\\")
        buffer.write(f"{number}\t{created}\t{text}\n")
    buffer.seek(0)
    return buffer


def dataset_label(args: argparse.Namespace) -> str:
    return f"bridge bench: pgbench scale={args.scale} docs={args.docs} v1"


def ensure_dataset(args: argparse.Namespace) -> bool:
    """Make the bench database unless one with the same parameters exists; True if made."""
    found = sql(
        args,
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        [args.db],
    )
    if found and found[0][0] == dataset_label(args) and not args.rebuild:
        return False
    drop_database(args, args.db)
    sql(args, f'CREATE DATABASE "{args.db}"')
    started = time.perf_counter()
    print(f"creating {args.db}: pgbench -i -s {args.scale} ...", flush=True)
    pgbench = ["pgbench", "-i", "-q", "-s", str(args.scale), args.db]
    checked(run(pgbench, env=pg_env(args)), "pgbench -i")
    print(f"  {args.docs:,} jsonb documents ...", flush=True)
    words = vocabulary()
    conn = connect(args, args.db)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE bench_docs (id bigint PRIMARY KEY, created_at timestamptz NOT NULL,"
                " doc jsonb NOT NULL)"
            )
            batch = 50_000
            for first in range(1, args.docs + 1, batch):
                rows = documents(first, min(first + batch - 1, args.docs), words)
                cursor.copy_expert("COPY bench_docs (id, created_at, doc) FROM STDIN", rows)
            cursor.execute("VACUUM ANALYZE bench_docs")
            cursor.execute(f"COMMENT ON DATABASE \"{args.db}\" IS '{dataset_label(args)}'")
    finally:
        conn.close()
    sql(args, "CHECKPOINT")
    print(f"  made in {time.perf_counter() - started:.0f} s", flush=True)
    return True


def make_media(root: Path, files: int, total_mb: int, seed: int = 7) -> list[Path]:
    """MEDIA_ROOT: `files` files of mixed sizes adding up to about `total_mb` MB, in 40
    directories; 70% random bytes (images, PDFs, archives: incompressible), 30% text. All are
    dated two days back: uploads are not all written the second before a backup (and a file
    modified within 2 s of being read is re-hashed by the next incremental, see uploads.py)."""
    rng = random.Random(seed)
    # Log-uniform sizes between 1 KiB and 8 MiB, then scaled to the total.
    sizes = [int(1024 * 2 ** rng.uniform(0, 13)) for _ in range(files)]
    scale = total_mb * 1_000_000 / sum(sizes)
    sizes = [max(1, int(size * scale)) for size in sizes]
    words = " ".join(vocabulary(512)).encode() + b"\n"
    past = time.time() - 2 * 86400
    paths = []
    for index, size in enumerate(sizes):
        folder = root / f"uploads/2026/{index % 40:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.7:
            path = folder / f"file-{index:05d}.bin"
            data = rng.randbytes(size)
        else:
            path = folder / f"file-{index:05d}.txt"
            start = rng.randrange(len(words))
            data = (words[start:] + words * (size // len(words) + 1))[:size]
        path.write_bytes(data)
        os.utime(path, (past, past))
        paths.append(path)
    return paths


def change_media(paths: list[Path], fraction: float, seed: int) -> tuple[int, int]:
    """Rewrite `fraction` of the files with new content of the same size (mtime: now)."""
    rng = random.Random(seed)
    chosen = rng.sample(paths, max(1, round(len(paths) * fraction)))
    total = 0
    for path in chosen:
        size = path.stat().st_size
        path.write_bytes(rng.randbytes(size))
        total += size
    return len(chosen), total


# --- Measuring processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A finished child process: wall seconds, its own peak RSS, its exit code and output."""

    seconds: float
    maxrss_kib: int
    code: int
    out: str
    err: str


def vm_hwm_kib(pid: int | str) -> tuple[str, int]:
    """(program name, peak RSS so far in KiB) of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return fields["Name"].strip(), int(fields.get("VmHWM", "0 kB").split()[0])


def run(argv: list[str], *, env: dict[str, str]) -> Run:
    """Run argv, timing it. Its peak RSS is sampled from /proc (VmHWM) while it runs:
    getrusage/wait4 would report this process's size for a child forked from it."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=ROOT)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    peak[0] = max(peak[0], vm_hwm_kib(process.pid)[1])
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        process.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        return Run(
            seconds,
            peak[0],
            process.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def checked(result: Run, what: str) -> Run:
    if result.code != 0:
        sys.exit(f"{what} failed (exit {result.code}):\n{result.err[-4000:]}")
    return result


def child(env: dict[str, str], *argv: str, profile: Path | None = None) -> dict[str, Any]:
    """This script in child mode (a Bridge backup, incremental or drill); its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    if profile is not None:
        command += ["--profile-out", str(profile)]
    result = run(command, env=env)
    lines = [line for line in result.out.splitlines() if line.startswith("{")]
    if result.code != 0 or not lines:
        return {
            "ok": False,
            "error": f"exit {result.code}",
            "stderr": result.err[-8000:],
            "process_seconds": result.seconds,
        }
    found = json.loads(lines[-1])
    found["process_seconds"] = result.seconds
    found["process_maxrss_kib"] = result.maxrss_kib
    if result.err.strip():
        found["stderr"] = result.err[-8000:]
    return found


# --- Child mode (runs inside Django) --------------------------------------------------------


def _traced(work: Callable) -> Callable:
    """The job function, printing its traceback to stderr: run_job only keeps the message."""

    def call(job: Any, progress: Any) -> Any:
        try:
            return work(job, progress)
        except BaseException:
            traceback.print_exc()
            raise

    return call


class ChildWatch:
    """Peak RSS (VmHWM) of the programs this process runs (pg_dump, pg_restore), sampled from
    /proc every 50 ms. getrusage(RUSAGE_CHILDREN) cannot tell them: a child forked from this
    process counts this process's pages until it execs."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self) -> list[str]:
        found = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                found += (task / "children").read_text().split()
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self._children():
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                    name = fields["Name"].strip()
                    peak = int(fields.get("VmHWM", "0 kB").split()[0])
                    self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def cpu_seconds() -> float:
    """CPU time of this process so far, all its threads, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Phases:
    """Wall time spent in some functions of the code under test, by label: each one is
    wrapped in place (a timer around the call, nothing else changes) to say where a backup or
    a drill spends its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)
        seconds = self.seconds

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)


def child_main(args: argparse.Namespace) -> None:
    import django

    django.setup()
    from backups import services, targets
    from backups.choices import BackupStatus, CopyStatus, RestoreStatus
    from backups.components import handler_for
    from backups.models import Backup, RestoreJob
    from bridge.jobs import run_job
    from compliance.audit import AuditContext

    phases = Phases()
    handler = type(handler_for("uploads" if args.components == ["uploads"] else "database"))
    if args.child == "drill":
        phases.wrap(services, "_plan", "verify every artifact (read whole, decrypt)")
        phases.wrap(handler, "restore", "restore into scratch")
        phases.wrap(handler, "check", "check row counts")
        phases.wrap(handler, "discard", "drop the scratch database")
    else:
        phases.wrap(handler, "backup", "read the source, compress, encrypt, write 3 copies")
        commit = "commit copies (fsync, read back, rename; summed)"
        phases.wrap(targets._FileUpload, "commit", commit)
        phases.wrap(services, "_estimate", "estimate the size (progress)")
    profiler = cProfile.Profile() if args.profile_out else None
    watch = ChildWatch()
    cpu_before = cpu_seconds()
    context = AuditContext.system()
    result: dict[str, Any]
    if args.child in ("full", "incremental"):
        parent = Backup.objects.get(pk=args.parent) if args.parent else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        backup = services.start_backup(
            kind=args.child,
            context=context,
            components=args.components,
            parent=parent,
            enqueue=False,
        )
        run_job(backup.job_id, _traced(services.run_backup_job))
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - started
        backup.refresh_from_db()
        result = {
            "ok": backup.status == BackupStatus.SUCCEEDED,
            "id": str(backup.pk),
            "error": backup.error,
            "seconds": seconds,
            "raw_bytes": backup.raw_bytes,
            "stored_bytes": backup.stored_bytes,
            "rule_321": backup.rule_321,
            "artifacts": [
                {
                    "name": artifact.name,
                    "raw": artifact.raw_bytes,
                    "stored": artifact.stored_bytes,
                    "copies": artifact.copies.filter(status=CopyStatus.COMMITTED).count(),
                }
                for artifact in backup.artifacts.all()
            ],
            "manifest": _manifest_summary(backup.manifest),
        }
    else:
        backup = Backup.objects.get(pk=args.backup)
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        restore = services.start_drill(context=context, backup=backup, enqueue=False)
        run_job(restore.job_id, _traced(services.run_restore_job))
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - started
        restore = RestoreJob.objects.get(pk=restore.pk)
        units = (restore.result or {}).get("units", {})
        result = {
            "ok": restore.status == RestoreStatus.SUCCEEDED,
            "id": restore.pk,
            "error": restore.error,
            "seconds": seconds,
            "rto_seconds": restore.rto_seconds,
            "units": {
                name: {
                    "ok": entry.get("ok"),
                    "seconds": entry.get("seconds"),
                    "restore_seconds": (entry.get("restored") or {}).get("seconds"),
                    "failed": [c.get("name") for c in entry.get("checks", []) if not c.get("ok")],
                }
                for name, entry in units.items()
            },
            "failed_checks": (restore.result or {}).get("failed_checks", []),
        }
    if profiler:
        profiler.dump_stats(args.profile_out)
    result["phases"] = phases.seconds
    result["cpu_seconds"] = cpu_seconds() - cpu_before
    # VmHWM, not getrusage's ru_maxrss: the latter starts from the parent's RSS (the exec
    # after a vfork hands this process the parent's high-water mark).
    result["maxrss_self_kib"] = vm_hwm_kib("self")[1]
    # pg_dump / pg_restore run by the handler, by program name.
    result["tools_maxrss_kib"] = watch.stop()
    print(json.dumps(result, default=str))


def _manifest_summary(manifest: dict) -> dict:
    """What each component did, without per-file listings (a full uploads manifest is big)."""
    summary = {}
    for component, entry in manifest.items():
        if not isinstance(entry, dict):
            continue
        units = {}
        for name, unit in entry.get("units", {}).items():
            inner = unit.get("manifest", {})
            units[name] = {
                key: inner[key]
                for key in ("incremental", "engine", "server_version", "format", "tool")
                if key in inner
            }
            if isinstance(inner.get("changed"), list | dict):
                units[name]["changed"] = len(inner["changed"])
        summary[component] = {"state": entry.get("state"), "reason": entry.get("reason")}
        summary[component]["units"] = units
    return summary


# --- The run ------------------------------------------------------------------------------------


def bridge_env(args: argparse.Namespace, scratch: Path) -> dict[str, str]:
    """Everything Bridge reads, and nothing from the caller's environment but the basics."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL") if key in os.environ}
    targets = {
        name: {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": str(scratch / "targets" / name)},
            "media": "disk",
            "offsite": False,
        }
        for name in ("local-a", "local-b", "local-c")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="bridge.settings",
        BRIDGE_VAR_DIR=str(scratch / "var"),
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="localhost",
        DATABASE_URL=db_url(args, CATALOG_DB),
        BACKUP_DATABASES=db_url(args, args.db),
        BACKUP_TARGETS=json.dumps(targets),
        BACKUP_EXTRA_TARGETS="{}",
        BRIDGE_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        ENABLE_BACKUP_COMPRESSION="true",
        BACKUP_COMPRESSION_LEVEL="3",
        ENABLE_BACKUP_ENCRYPTION="true",
        MEDIA_ROOT=str(scratch / "media"),
        BACKUP_SCRATCH_DIR=str(scratch / "restore-scratch"),
        BACKUP_CONFIG_PATHS="",
        BACKUP_PITR_DATABASE="",
        REDIS_URL="",
        BACKUP_REDIS_URL="",
        PYTHONUNBUFFERED="1",
    )
    return env


def prepare_catalog(args: argparse.Namespace, env: dict[str, str]) -> None:
    drop_database(args, CATALOG_DB)
    sql(args, f'CREATE DATABASE "{CATALOG_DB}"')
    checked(
        run([sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], env=env),
        "migrating the catalog database",
    )


def clear_targets(scratch: Path) -> None:
    for target in (scratch / "targets").glob("*"):
        shutil.rmtree(target, ignore_errors=True)


def baseline_dumps(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    env = pg_env(args)
    fc, z0 = scratch / "dump.fc", scratch / "dump.z0"
    plain = checked(run(["pg_dump", "-Fc", "-Z0", "-f", str(z0), args.db], env=env), "pg_dump -Z0")
    z0_size = z0.stat().st_size
    z0.unlink()
    gzip = checked(run(["pg_dump", "-Fc", "-f", str(fc), args.db], env=env), "pg_dump -Fc")
    return {
        "z0_seconds": plain.seconds,
        "z0_bytes": z0_size,
        "z0_rss_kib": plain.maxrss_kib,
        "fc_seconds": gzip.seconds,
        "fc_bytes": fc.stat().st_size,
        "fc_rss_kib": gzip.maxrss_kib,
    }


def baseline_restore(args: argparse.Namespace, scratch: Path) -> float:
    """createdb + pg_restore -j2 of the -Fc dump: a fresh database, as the drill makes one."""
    env = pg_env(args)
    drop_database(args, RESTORE_DB)
    started = time.perf_counter()
    checked(run(["createdb", RESTORE_DB], env=env), "createdb")
    checked(
        run(["pg_restore", "-j2", "-d", RESTORE_DB, str(scratch / "dump.fc")], env=env),
        "pg_restore -j2",
    )
    seconds = time.perf_counter() - started
    drop_database(args, RESTORE_DB)
    return seconds


def bench_unit(backup: dict[str, Any], db: str) -> dict[str, Any]:
    for artifact in backup.get("artifacts", []):
        if artifact["name"] == f"database-{db}":
            return artifact
    raise SystemExit(f"the backup has no artifact database-{db}: {backup.get('artifacts')}")


def fail(what: str, found: dict[str, Any]) -> None:
    sys.stderr.write(f"\n{what} FAILED: {found.get('error')}\n{found.get('stderr', '')}\n")
    sys.exit(1)


def measure_round(
    args: argparse.Namespace,
    scratch: Path,
    env: dict[str, str],
    media: list[Path],
    index: int,
) -> dict[str, Any]:
    print(f"round {index + 1}/{args.rounds}", flush=True)

    def profile(name: str) -> Path | None:
        return Path(args.profile) / f"{name}-{index + 1}.prof" if args.profile else None

    bridge_first = index % 2 == 1
    row: dict[str, Any] = {}

    def bridge_backup() -> None:
        found = child(
            env,
            "--child",
            "full",
            "--components",
            "database",
            profile=profile("backup"),
        )
        if not found.get("ok"):
            fail("Bridge's full backup of the database", found)
        row["backup"] = found

    for step in (bridge_backup, None) if bridge_first else (None, bridge_backup):
        if step is None:
            row["dumps"] = baseline_dumps(args, scratch)
        else:
            step()
    backup = row["backup"]
    print(
        f"  pg_dump -Z0 {row['dumps']['z0_seconds']:.1f} s, -Fc {row['dumps']['fc_seconds']:.1f} s,"
        f" Bridge {backup['seconds']:.1f} s",
        flush=True,
    )

    def bridge_drill() -> None:
        found = child(
            env,
            "--child",
            "drill",
            "--backup",
            backup["id"],
            profile=profile("drill"),
        )
        if not found.get("ok"):
            fail("Bridge's restore drill", found)
        row["drill"] = found

    for step in (bridge_drill, None) if bridge_first else (None, bridge_drill):
        if step is None:
            row["pg_restore_seconds"] = baseline_restore(args, scratch)
        else:
            step()
    print(
        f"  pg_restore -j2 {row['pg_restore_seconds']:.1f} s,"
        f" Bridge drill {row['drill']['seconds']:.1f} s",
        flush=True,
    )
    (scratch / "dump.fc").unlink(missing_ok=True)
    clear_targets(scratch)

    full = child(env, "--child", "full", "--components", "uploads")
    if not full.get("ok"):
        fail("Bridge's full backup of the uploads", full)
    changed, changed_bytes = change_media(media, 0.01, seed=1000 + index)
    incremental = child(
        env,
        "--child",
        "incremental",
        "--components",
        "uploads",
        "--parent",
        full["id"],
        profile=profile("incremental"),
    )
    if not incremental.get("ok"):
        fail("Bridge's incremental backup of the uploads", incremental)
    row["uploads"] = {
        "full": full,
        "incremental": incremental,
        "changed": changed,
        "changed_bytes": changed_bytes,
    }
    print(
        f"  uploads full {full['seconds']:.2f} s, incremental ({changed} files changed)"
        f" {incremental['seconds']:.2f} s",
        flush=True,
    )
    clear_targets(scratch)
    return row


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def human(size: float) -> str:
    return f"{size / MiB:,.1f} MiB"


def report(args: argparse.Namespace, db_bytes: int, rows: list[dict[str, Any]]) -> bool:
    med = statistics.median

    def per_round(fn: Callable[[dict], float]) -> float:
        return med(fn(row) for row in rows)

    backup_s = per_round(lambda r: r["backup"]["seconds"])
    fc_s = per_round(lambda r: r["dumps"]["fc_seconds"])
    z0_s = per_round(lambda r: r["dumps"]["z0_seconds"])
    fc_bytes = per_round(lambda r: r["dumps"]["fc_bytes"])

    def unit_of(row: dict) -> dict:
        return bench_unit(row["backup"], args.db)

    stored = per_round(lambda r: unit_of(r)["stored"])
    restore_s = per_round(lambda r: r["pg_restore_seconds"])
    drill_s = per_round(lambda r: r["drill"]["seconds"])

    def unit_restore(row: dict) -> float:
        return row["drill"]["units"][f"database-{args.db}"]["restore_seconds"]

    unit_restore_s = per_round(unit_restore)
    full_s = per_round(lambda r: r["uploads"]["full"]["seconds"])
    incr_s = per_round(lambda r: r["uploads"]["incremental"]["seconds"])
    rss = max(r["backup"]["maxrss_self_kib"] for r in rows) * 1024
    lines = [
        (
            "full backup time / pg_dump -Fc",
            f"{fc_s:.2f} s",
            f"{backup_s:.2f} s",
            per_round(lambda r: r["backup"]["seconds"] / r["dumps"]["fc_seconds"]),
            0.5,
            True,
        ),
        (
            "full backup time / pg_dump -Fc -Z0",
            f"{z0_s:.2f} s",
            f"{backup_s:.2f} s",
            per_round(lambda r: r["backup"]["seconds"] / r["dumps"]["z0_seconds"]),
            1.3,
            True,
        ),
        (
            "stored size of one copy / pg_dump -Fc file",
            human(fc_bytes),
            human(stored),
            per_round(
                lambda r: bench_unit(r["backup"], args.db)["stored"] / r["dumps"]["fc_bytes"]
            ),
            1.0,
            True,
        ),
        (
            "restore (drill) / pg_restore -j2",
            f"{restore_s:.2f} s",
            f"{drill_s:.2f} s",
            per_round(lambda r: r["drill"]["seconds"] / r["pg_restore_seconds"]),
            1.2,
            True,
        ),
        (
            "  its restore step alone (bench unit) / same",
            f"{restore_s:.2f} s",
            f"{unit_restore_s:.2f} s",
            per_round(lambda r: unit_restore(r) / r["pg_restore_seconds"]),
            1.2,
            False,
        ),
        (
            "uploads incremental (1% changed) / full",
            f"{full_s:.2f} s",
            f"{incr_s:.3f} s",
            per_round(
                lambda r: r["uploads"]["incremental"]["seconds"] / r["uploads"]["full"]["seconds"]
            ),
            0.05,
            True,
        ),
    ]
    header = ("figure", "baseline", "Bridge", "ratio", "target", "verdict")
    table = [header]
    ok = True
    for name, base, bridge, ratio, target, judged in lines:
        passed = ratio <= target
        if judged:
            ok &= passed
        shown = verdict(passed) if judged else "(info)"
        table.append((name, base, bridge, f"{ratio:.3f}", f"<= {target}", shown))
    passed = rss < 200 * 1_000_000
    ok &= passed
    table.append(
        (
            "peak RSS of the backup process",
            "",
            f"{rss / 1e6:.1f} MB",
            "",
            "< 200 MB",
            verdict(passed),
        )
    )
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    print()
    print(
        f"database {args.db}: {human(db_bytes)} (pg_database_size); "
        f"{len(rows)} round(s), medians of per-round ratios"
    )
    for number, line in enumerate(table):
        print(" | ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(line)))
        if number == 0:
            print("-+-".join("-" * width for width in widths))
    first = rows[0]
    dump_rss = max(r["dumps"]["fc_rss_kib"] for r in rows) * 1024
    z0_rss = max(r["dumps"]["z0_rss_kib"] for r in rows) * 1024
    inner = max(r["backup"]["tools_maxrss_kib"].get("pg_dump", 0) for r in rows) * 1024
    unit = bench_unit(first["backup"], args.db)
    print()
    print(
        f"pg_dump -Z0 file {human(per_round(lambda r: r['dumps']['z0_bytes']))};"
        f" Bridge read {human(unit['raw'])} from pg_dump for {args.db}"
        f" ({unit['copies']} copies committed); the whole backup (with the catalog,"
        f" {len(first['backup']['artifacts'])} artifacts) stores"
        f" {human(first['backup']['stored_bytes'])} per copy"
    )
    print(
        f"peak RSS: pg_dump -Fc {human(dump_rss)}, pg_dump -Z0 {human(z0_rss)};"
        f" Bridge's backup process {human(rss)}, the pg_dump it ran {human(inner)};"
        f" backup process wall time incl. interpreter and Django start"
        f" {per_round(lambda r: r['backup']['process_seconds']):.2f} s, its CPU time during the"
        f" job (all its threads, user+sys) {per_round(lambda r: r['backup']['cpu_seconds']):.2f} s"
    )
    for what in ("backup", "drill"):
        phases = first[what].get("phases", {})
        print(
            f"{what} (round 1, {first[what]['seconds']:.2f} s): "
            + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in phases.items())
        )
    for what in ("full", "incremental"):
        phases = first["uploads"][what].get("phases", {})
        print(
            f"uploads {what} (round 1, {first['uploads'][what]['seconds']:.3f} s): "
            + ", ".join(f"{label} {seconds:.3f} s" for label, seconds in phases.items())
        )
    units = first["drill"].get("units", {})
    print(
        "drill: "
        + ", ".join(
            f"{name} {entry['restore_seconds']} s restore, {entry['seconds']} s with its check"
            for name, entry in units.items()
        )
        + f"; RTO recorded {first['drill'].get('rto_seconds')} s"
    )
    uploads = first["uploads"]
    print(
        f"uploads: {args.media_files} files, {human(uploads['full']['raw_bytes'])} read,"
        f" {human(uploads['full']['stored_bytes'])} stored per copy; incremental: "
        f"{uploads['changed']} files ({human(uploads['changed_bytes'])}) changed,"
        f" {human(uploads['incremental']['stored_bytes'])} stored"
    )
    if len(rows) > 1:
        print()
        print("per round: backup/-Fc, backup/-Z0, drill/pg_restore, incremental/full")
        for number, r in enumerate(rows, 1):
            print(
                f"  {number}: {r['backup']['seconds'] / r['dumps']['fc_seconds']:.3f},"
                f" {r['backup']['seconds'] / r['dumps']['z0_seconds']:.3f},"
                f" {r['drill']['seconds'] / r['pg_restore_seconds']:.3f},"
                f" {r['uploads']['incremental']['seconds'] / r['uploads']['full']['seconds']:.3f}"
            )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--scale", type=int, default=48, help="pgbench scale (about 16 MB each)")
    parser.add_argument("--docs", type=int, default=500_000, help="jsonb documents (600 B each)")
    parser.add_argument("--media-files", type=int, default=2000)
    parser.add_argument("--media-mb", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="a small dataset for a smoke run (one round)"
    )
    parser.add_argument("--rebuild", action="store_true", help="remake the bench database")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory and catalog database"
    )
    parser.add_argument("--profile", help="directory for cProfile dumps of the Bridge children")
    # Child mode: a Bridge backup or drill inside Django (the parent sets the environment).
    parser.add_argument("--child", choices=["full", "incremental", "drill"], help=argparse.SUPPRESS)
    parser.add_argument("--components", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--parent", help=argparse.SUPPRESS)
    parser.add_argument("--backup", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    args.db = BENCH_DB
    if args.quick:
        args.db = BENCH_DB + "_quick"
        args.scale, args.docs = 2, 30_000
        args.media_files, args.media_mb, args.rounds = 200, 20, 1
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    ensure_dataset(args)
    db_bytes = database_size(args, args.db)
    print(f"{args.db}: {human(db_bytes)} (pg_database_size)", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bridge-bench-backup-"))
    try:
        env = bridge_env(args, scratch)
        prepare_catalog(args, env)
        media = make_media(scratch / "media", args.media_files, args.media_mb)
        rows = [measure_round(args, scratch, env, media, index) for index in range(args.rounds)]
        ok = report(args, db_bytes, rows)
    finally:
        drop_database(args, RESTORE_DB)
        if args.keep:
            print(f"kept: {scratch} and database {CATALOG_DB}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            drop_database(args, CATALOG_DB)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
