"""What a call through the circuit breaker and the retry executor costs, same run, same machine.

1. The local path: a successful call on a closed breaker through `retry.call` (breaker, budget,
   statistics) and through `breaker.get(name).call` alone, against calling the function
   directly; the figure is the time added per call, in microseconds (target: under 5).
2. Concurrency: 8 threads each making calls around 10 ms of I/O (time.sleep(0.01)) through one
   breaker, against the same threads without a breaker; the figure is the ratio of wall times
   (target: at most 1.2x). pybreaker, if installed (`pip install pybreaker`; not a requirement
   of Bridge), is measured in the same run as the reference: it holds its lock for the whole
   call, so its threads run one at a time.

Both the shared store on Redis (REDIS_URL) and on the database (a throwaway SQLite file,
migrated at start) are measured.

Usage: .venv/bin/python bench/recovery_overhead.py [--calls 200000] [--io-calls 25]
       [--redis redis://127.0.0.1:6379/5] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup(redis_url: str, db_path: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "bridge.settings"
    os.environ["DATABASE_URL"] = f"sqlite:///{db_path}"
    os.environ["REDIS_URL"] = redis_url
    import django

    django.setup()


def per_call(fn: Callable[[], object], calls: int, repeat: int) -> float:
    """Median seconds per call of `fn()` over `repeat` runs of `calls` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - started) / calls)
    return statistics.median(times)


def threaded(call: Callable[[], object], threads: int, calls: int) -> float:
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(calls):
            call()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - started


def measure(store: str, args: argparse.Namespace) -> dict:
    from django.conf import settings

    from recovery import breaker, retry

    settings.REDIS_URL = args.redis if store == "redis" else ""
    breaker._clear_registry()
    name = f"bench-{store}-{os.getpid()}"
    b = breaker.get(name)
    policy = retry.default_policy()

    def work() -> int:
        return 1

    # Warm up: the first sync with the store and the first statistics flush.
    for _ in range(1000):
        retry.call(work, service=name, policy=policy)
        b.call(work)
    plain = per_call(work, args.calls, args.repeat)
    via_breaker = per_call(lambda: b.call(work), args.calls, args.repeat)
    via_executor = per_call(
        lambda: retry.call(work, service=name, policy=policy), args.calls, args.repeat
    )
    io = lambda: time.sleep(0.01)  # noqa: E731
    bare = statistics.median(threaded(io, 8, args.io_calls) for _ in range(3))
    through = statistics.median(threaded(lambda: b.call(io), 8, args.io_calls) for _ in range(3))
    executor = statistics.median(
        threaded(lambda: retry.call(io, service=name, policy=policy), 8, args.io_calls)
        for _ in range(3)
    )
    retry.flush()
    return {
        "store": store,
        "plain_us": plain * 1e6,
        "breaker_added_us": (via_breaker - plain) * 1e6,
        "executor_added_us": (via_executor - plain) * 1e6,
        "io_bare_s": bare,
        "io_breaker_ratio": through / bare,
        "io_executor_ratio": executor / bare,
    }


def pybreaker_ratio(args: argparse.Namespace) -> float | None:
    try:
        import pybreaker
    except ImportError:
        return None
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    io = lambda: time.sleep(0.01)  # noqa: E731
    bare = statistics.median(threaded(io, 8, args.io_calls) for _ in range(3))
    through = statistics.median(threaded(lambda: cb.call(io), 8, args.io_calls) for _ in range(3))
    return through / bare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--io-calls", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    parser.add_argument(
        "--kill-runs",
        type=int,
        default=3,
        help="Runs of the kill drill (bench/recovery_detection.py) at the end; 0 to skip.",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.sqlite3")
        env = dict(os.environ, DATABASE_URL=f"sqlite:///{db}", DJANGO_SETTINGS_MODULE="")
        env.pop("DJANGO_SETTINGS_MODULE")
        subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], env=env, check=True
        )
        setup(args.redis, db)
        rows = [measure("database", args)]
        try:
            import redis

            redis.Redis.from_url(args.redis).ping()
            rows.append(measure("redis", args))
        except Exception as exc:
            print(f"(Redis at {args.redis} not measured: {exc})")
        reference = pybreaker_ratio(args)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(
        f"{'store':10} {'plain call':>11} {'+breaker':>10} {'+executor':>10} "
        f"{'8x10ms bare':>12} {'breaker':>8} {'executor':>9}"
    )
    for r in rows:
        print(
            f"{r['store']:10} {r['plain_us']:9.3f}us {r['breaker_added_us']:8.3f}us "
            f"{r['executor_added_us']:8.3f}us {r['io_bare_s']:11.3f}s "
            f"{r['io_breaker_ratio']:7.3f}x {r['io_executor_ratio']:8.3f}x"
        )
    if reference is None:
        print("pybreaker: not installed (pip install pybreaker to measure it here)")
    else:
        print(f"pybreaker, 8 threads x 10 ms through one breaker: {reference:.2f}x")
    if args.kill_runs:
        # The third figure in the same run: detection and recovery of a killed service.
        print("kill drill: seconds from SIGKILL to down + breaker open, and to up + closed:")
        sys.stdout.flush()
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("recovery_detection.py")),
                "--runs",
                str(args.kill_runs),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
