"""Detection and recovery times of the kill test (tests/recovery/test_kill.py), medians of runs.

For a Redis and an HTTP server this script starts, each run registers the server as a service
(checked every 2 s, 500 ms timeout, 2 failures to go down, 2 passes to come back), kills it
with SIGKILL, and drives the monitor as beat does (`run_due_checks` in a loop) until the service
is `up` with its breaker closed again: healed by its allow-listed restart command, or restarted
by the script a second after it was seen down (no strategy). It prints, per case, the median
and range of: kill -> transition to down (detection), kill -> up with the breaker closed
(recovery). Celery runs eagerly, so the heal job runs in the monitor's thread, as a worker would
run it right after the transition commits.

Usage: .venv/bin/python bench/recovery_detection.py [--runs 5]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres), Redis on 127.0.0.1:6379 and redis-server.
`main(runs)` returns the figures, for bench/recovery_overhead.py to print in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "bridge_bench_recovery"
CASES = [("redis", True), ("redis", False), ("http", True), ("http", False)]


def _setup() -> None:
    os.environ["DATABASE_URL"] = f"{PG}/{DB_NAME}"
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/6")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bridge.settings")
    for sql in (f"DROP DATABASE IF EXISTS {DB_NAME}", f"CREATE DATABASE {DB_NAME}"):
        subprocess.run(["psql", f"{PG}/postgres", "-qc", sql], check=True)
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "migrate", "--noinput", "-v0"],
        check=True,
        env=os.environ,
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.conf import settings

    from bridge.celery import app

    app.conf.task_always_eager = True
    settings.ENABLE_SELF_HEALING = True
    settings.HEALTH_FAILURES_TO_DOWN = 2
    settings.HEALTH_PASSES_TO_UP = 2


def _one(kind: str, heal: bool, workdir: Path) -> tuple[float, float]:
    from tests.recovery import kill_drill

    target_class = kill_drill.RedisTarget if kind == "redis" else kill_drill.HttpTarget
    target = target_class(workdir)
    target.start()
    try:
        service = kill_drill.register(target, heal=heal)
        kill_drill.warm_up(service)
        result = kill_drill.run(target, service, restart_by_hand_after=None if heal else 1.0)
    finally:
        target.kill()
    # Gone, so the next run's monitor ticks do not also probe this dead server.
    service.delete()
    if result.detected_s is None or result.recovered_s is None:
        raise RuntimeError(f"{kind}: did not recover: {result.transitions}")
    return result.detected_s, result.recovered_s


def main(runs: int = 5) -> dict[str, dict[str, float]]:
    """Run every case `runs` times; print and return the medians (seconds)."""
    _setup()
    figures: dict[str, dict[str, float]] = {}
    print(f"kill test, {runs} runs per case (median, min-max), seconds from SIGKILL:")
    for kind, heal in CASES:
        detected, recovered = [], []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as workdir:
                d, r = _one(kind, heal, Path(workdir))
            detected.append(d)
            recovered.append(r)
        label = f"{kind}, {'healed by its restart command' if heal else 'restarted by hand'}"
        figures[label] = {
            "detected": statistics.median(detected),
            "recovered": statistics.median(recovered),
        }
        print(
            f"  {label:42} down {statistics.median(detected):5.2f} "
            f"({min(detected):.2f}-{max(detected):.2f})   up, breaker closed "
            f"{statistics.median(recovered):5.2f} ({min(recovered):.2f}-{max(recovered):.2f})"
        )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    main(parser.parse_args().runs)
