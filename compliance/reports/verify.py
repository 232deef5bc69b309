"""Verify a compliance report offline: `python -m compliance.reports.verify FILE --public-key K`.

A report is three files: the report itself (`<id>.csv`, `.json` or `.pdf`), its manifest
(`<id>.manifest.json`: parameters, counts, the report file's size and SHA-256, the audit
checkpoint it was checked against) and a detached Ed25519 signature over the manifest's
canonical JSON (`<id>.sig`). Verifying means: the signature was made by a trusted key over
exactly this manifest, and the report file is exactly the one the manifest describes.

Standard library plus `cryptography` (through `compliance.proof`): no Django, no database, no
settings, so an auditor can run it on a machine the operator does not control, trusting only
the public key(s) given (PEM, or the base64 of the 32 raw bytes, as
GET /api/compliance/audit/public-key publishes them). Keys reached from those by rotation
records signed by both keys (carried in the signature file) are trusted too. Bridge's own
`manage.py verify_report` runs this same code with the keys Bridge trusts.

Exit status: 0 intact, 1 not intact (changed, or not signed by a trusted key), 2 the files or
keys could not be read.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compliance import proof

MANIFEST_FORMAT = "bridge-compliance-report"
SIGNATURE_FORMAT = "bridge-compliance-report-signature"
# Domain separation: a report signature can never pass for a checkpoint's or a rotation's
# (they sign with the same audit key), nor the reverse.
REPORT_CONTEXT = b"bridge.report.v1\n"
MANIFEST_SUFFIX = ".manifest.json"
SIGNATURE_SUFFIX = ".sig"

# How Bridge names a report file (`<id>.<format>`): a file so named must be the one its signed
# manifest describes; a file renamed by hand is checked by its content alone.
_REPORT_NAME = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.(?:csv|json|pdf)"
)

# Verdict problems: what went wrong decides the exit status.
UNREADABLE = "unreadable"
TAMPERED = "tampered"
UNTRUSTED = "untrusted"


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one report: `ok`, and `reason` in words either way."""

    ok: bool
    reason: str
    problem: str = ""
    report_id: str = ""
    key_id: str = ""
    manifest: dict[str, Any] | None = field(default=None, compare=False, repr=False)


def manifest_message(manifest: dict[str, Any]) -> bytes:
    """The bytes a report signature covers: the context, then the manifest's canonical JSON."""
    return REPORT_CONTEXT + proof.canonical_json(manifest).encode("utf-8")


def signature_record(
    manifest: dict[str, Any],
    private_key: Any,
    key_id: str,
    rotations: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The detached signature file's content for `manifest`, signed with `private_key`.

    `rotations` are key rotation records (each signed by both of its keys): an auditor who
    pinned an older key then still trusts a report signed after a rotation.
    """
    signature = private_key.sign(manifest_message(manifest))
    return {
        "format": SIGNATURE_FORMAT,
        "version": 1,
        "algorithm": "Ed25519",
        "context": REPORT_CONTEXT.decode("ascii").strip(),
        "key_id": key_id,
        "signature": base64.b64encode(signature).decode("ascii"),
        "rotations": list(rotations),
    }


def companion_paths(path: Path) -> tuple[Path, Path]:
    """Where the manifest and signature of a report file lie by default: `<id>.csv` ->
    `<id>.manifest.json` and `<id>.sig` beside it."""
    stem = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    return path.with_name(stem + MANIFEST_SUFFIX), path.with_name(stem + SIGNATURE_SUFFIX)


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 hex and size of a file, read in 1 MiB blocks (reports can be large)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _Unreadable(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Unreadable(f"the {what} {path} is not JSON") from exc
    if not isinstance(data, dict):
        raise _Unreadable(f"the {what} {path} is not a JSON object")
    return data


class _Unreadable(Exception):
    pass


def verify_report(
    path: Path,
    *,
    ring_for: Callable[[list[dict[str, Any]]], proof.KeyRing],
    manifest_path: Path | None = None,
    signature_path: Path | None = None,
) -> Verdict:
    """Check a report file against its manifest and the manifest against its signature.

    `ring_for(rotations)` gives the trusted keys, told the rotation records the signature file
    carries (a ring built with `proof.KeyRing.build` accepts only those signed by both keys).
    The signature is checked first: a changed manifest is named as such, and only a manifest
    Bridge signed is trusted to say what the file's SHA-256 must be.
    """
    path = Path(path)
    default_manifest, default_signature = companion_paths(path)
    manifest_path = Path(manifest_path) if manifest_path else default_manifest
    signature_path = Path(signature_path) if signature_path else default_signature
    try:
        manifest = _json_object(manifest_path, "manifest")
        signed = _json_object(signature_path, "signature file")
        if not path.is_file():
            raise _Unreadable(f"the report file {path} does not exist")
    except _Unreadable as exc:
        return Verdict(False, str(exc), UNREADABLE)
    described_report = manifest.get("report")
    report_id = str(described_report.get("id", "")) if isinstance(described_report, dict) else ""
    if manifest.get("format") != MANIFEST_FORMAT:
        return Verdict(False, "the manifest is not a Bridge compliance report manifest", TAMPERED)
    if signed.get("format") != SIGNATURE_FORMAT or signed.get("algorithm") != "Ed25519":
        return Verdict(False, "the signature file is not a Bridge report signature", UNREADABLE)
    key_id = signed.get("key_id")
    if not isinstance(key_id, str) or manifest.get("signing_key_id") != key_id:
        return Verdict(
            False,
            "the signature names another key than the manifest does: the manifest was changed",
            TAMPERED,
            report_id,
        )
    rotations = signed.get("rotations") or []
    if not isinstance(rotations, list):
        return Verdict(False, "the signature file's rotations are not a list", UNREADABLE)
    ring = ring_for([record for record in rotations if isinstance(record, dict)])
    key = ring.keys.get(key_id)
    if key is None:
        return Verdict(
            False,
            f"the report is signed by key {key_id}, which is not trusted",
            UNTRUSTED,
            report_id,
            key_id,
        )
    try:
        message = manifest_message(manifest)
    except (TypeError, ValueError):
        return Verdict(False, "the manifest is not canonical JSON", TAMPERED, report_id, key_id)
    if not proof.verifies(key, signed.get("signature"), message):
        return Verdict(
            False,
            "the signature does not verify: the manifest was changed after signing "
            "(or the signature is not Bridge's)",
            TAMPERED,
            report_id,
            key_id,
        )
    described = manifest.get("file")
    if not isinstance(described, dict):
        return Verdict(False, "the manifest describes no file", TAMPERED, report_id, key_id)
    if _REPORT_NAME.fullmatch(path.name) and described.get("name") != path.name:
        # Another report's file, manifest and signature copied over this report's names: each
        # verifies on its own, but the signed manifest names the file it describes.
        return Verdict(
            False,
            f"the signed manifest describes {described.get('name')!r}, not {path.name!r}: "
            "another report's files stand in for this one",
            TAMPERED,
            report_id,
            key_id,
        )
    try:
        sha256, size = file_digest(path)
    except OSError as exc:
        return Verdict(False, f"cannot read the report file {path}: {exc}", UNREADABLE)
    if sha256 != described.get("sha256"):
        return Verdict(
            False,
            f"the report file's SHA-256 is {sha256}, the signed manifest says "
            f"{described.get('sha256')}: the file was changed",
            TAMPERED,
            report_id,
            key_id,
        )
    if size != described.get("size"):
        return Verdict(
            False,
            f"the report file is {size} bytes, the signed manifest says {described.get('size')}",
            TAMPERED,
            report_id,
            key_id,
        )
    return Verdict(True, _summary(manifest, key_id), "", report_id, key_id, manifest)


def _summary(manifest: dict[str, Any], key_id: str) -> str:
    report = manifest.get("report") or {}
    parameters = manifest.get("parameters") or {}
    checkpoint = manifest.get("checkpoint") or {}
    parts = [
        f"report {report.get('id')} ({report.get('type')}, {report.get('format')}, "
        f"{parameters.get('from')} to {parameters.get('to')}) is intact",
        f"{manifest.get('rows')} row(s){' (truncated)' if manifest.get('truncated') else ''}",
        f"signed by {key_id}",
    ]
    if checkpoint.get("number") is not None:
        parts.append(f"audit checkpoint #{checkpoint['number']} at seq {checkpoint.get('seq')}")
    else:
        parts.append("no audit checkpoint")
    return "; ".join(parts)


def pinned_ring(keys: Iterable[Any]) -> Callable[[list[dict[str, Any]]], proof.KeyRing]:
    """A `ring_for` trusting only the given public keys (and keys rotated from them)."""
    roots = list(keys)
    return lambda rotations: proof.KeyRing.build(roots, rotations)


def load_public_keys(paths: Iterable[Path]) -> list[Any]:
    """Public keys from files (PEM, or base64 of the raw 32 bytes); ValueError names the file."""
    keys = []
    for path in paths:
        try:
            keys.append(proof.load_public_key(Path(path).read_bytes()))
        except OSError as exc:
            raise ValueError(f"cannot read the public key {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ValueError(f"{path} is not an Ed25519 public key: {exc}") from exc
    return keys


def exit_status(verdict: Verdict) -> int:
    if verdict.ok:
        return 0
    return 2 if verdict.problem == UNREADABLE else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compliance.reports.verify",
        description="Verify a Bridge compliance report: its signature and its SHA-256.",
    )
    parser.add_argument("file", type=Path, help="The report file (<id>.csv, .json or .pdf).")
    parser.add_argument(
        "--public-key",
        type=Path,
        action="append",
        required=True,
        help="A trusted public key file (PEM or base64); may be given more than once.",
    )
    parser.add_argument("--manifest", type=Path, help="Default: <id>.manifest.json beside FILE.")
    parser.add_argument("--signature", type=Path, help="Default: <id>.sig beside FILE.")
    parser.add_argument("--json", action="store_true", help="Print the verdict as JSON.")
    args = parser.parse_args(argv)
    try:
        keys = load_public_keys(args.public_key)
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    verdict = verify_report(
        args.file,
        ring_for=pinned_ring(keys),
        manifest_path=args.manifest,
        signature_path=args.signature,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "ok": verdict.ok,
                    "reason": verdict.reason,
                    "problem": verdict.problem,
                    "report_id": verdict.report_id,
                    "key_id": verdict.key_id,
                }
            )
        )
    else:
        print(("OK: " if verdict.ok else "FAILED: ") + verdict.reason)
    return exit_status(verdict)


if __name__ == "__main__":
    sys.exit(main())
