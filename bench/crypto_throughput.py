"""Encryption at rest against raw AES-256-GCM, same run (the issue's target: at least 0.80 for
1 MiB payloads).

Measures `security.crypto.seal` / `unseal` (the binary layout for files, exports and backups) and
`encrypt` / `decrypt` (the base64url text the API and encrypted fields use), each with the data
key found and unwrapped as in production (kept per process for DATA_KEY_CACHE_SECONDS) and the
context bound in, against cryptography's AESGCM on the same payloads with a key already in hand,
for 1 KiB, 64 KiB and 1 MiB.

Usage: .venv/bin/python bench/crypto_throughput.py [--seconds 3]
Needs PostgreSQL on 127.0.0.1:5432 (user postgres); uses (and recreates) bridge_bench_crypto.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "bridge_bench_crypto"
os.environ.update(
    DATABASE_URL=f"{PG}/{DB_NAME}",
    DJANGO_SETTINGS_MODULE="bridge.settings",
    DEBUG="false",
    SECRET_KEY="bench-" + "k" * 40,
    ALLOWED_HOSTS="testserver",
    BRIDGE_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
)
sys.path.insert(0, str(ROOT))


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def rate(work, seconds: float) -> float:  # noqa: ANN001
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        work()
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    sh("psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB_NAME}")
    sh("psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB_NAME}")
    sh(str(ROOT / ".venv/bin/python"), str(ROOT / "manage.py"), "migrate", "--noinput", "-v0")
    import django

    django.setup()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from security import crypto

    raw = AESGCM(AESGCM.generate_key(bit_length=256))
    print(f"{'payload':>8}  {'op':13}  {'raw AESGCM':>12}  {'Bridge':>12}  ratio")
    for size in (1024, 64 * 1024, 1024 * 1024):
        data = secrets.token_bytes(size)
        nonce = secrets.token_bytes(12)
        sealed_raw = raw.encrypt(nonce, data, b"ctx")
        text = crypto.encrypt(data, purpose="bench", context="ctx")
        blob = crypto.seal(data, purpose="bench", context="ctx")
        assert crypto.unseal(blob, context="ctx") == data
        assert crypto.decrypt(text, context="ctx") == data
        pairs = [
            (
                "seal",
                lambda d=data: raw.encrypt(secrets.token_bytes(12), d, b"ctx"),
                lambda d=data: crypto.seal(d, purpose="bench", context="ctx"),
            ),
            (
                "unseal",
                lambda s=sealed_raw, n=nonce: raw.decrypt(n, s, b"ctx"),
                lambda b=blob: crypto.unseal(b, context="ctx"),
            ),
            (
                "encrypt text",
                lambda d=data: raw.encrypt(secrets.token_bytes(12), d, b"ctx"),
                lambda d=data: crypto.encrypt(d, purpose="bench", context="ctx"),
            ),
            (
                "decrypt text",
                lambda s=sealed_raw, n=nonce: raw.decrypt(n, s, b"ctx"),
                lambda t=text: crypto.decrypt(t, context="ctx"),
            ),
        ]
        for name, baseline, ours in pairs:
            # Interleaved halves, so a neighbour's burst of CPU hits both sides alike.
            base_rate = our_rate = 0.0
            for _ in range(2):
                base_rate += rate(baseline, args.seconds / 2) / 2
                our_rate += rate(ours, args.seconds / 2) / 2
            mib = size / 2**20
            print(
                f"{size // 1024:>6} KiB  {name:13}  {base_rate * mib:>8.1f} MiB/s  "
                f"{our_rate * mib:>8.1f} MiB/s  {our_rate / base_rate:.2f}"
            )


if __name__ == "__main__":
    main()
