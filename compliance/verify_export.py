"""Verify an audit export offline: `python -m compliance.verify_export OUT --public-key FILE`.

Standard library plus `cryptography`: no Django, no database, no settings, so an auditor can
run it on a machine the operator does not control, trusting nothing but the public key(s) it
is given (PEM, or the base64 of the 32 raw bytes, as GET /api/compliance/audit/public-key
publishes them). Keys reached from those by rotation records signed by both keys are trusted
too. The checks are Bridge's own (`compliance.proof`), so the verdict names the same seq.

Exit status: 0 intact, 1 broken (the first problem is named), 2 the export could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compliance import proof

FORMAT = "bridge-audit-export"


class ExportUnreadable(Exception):
    """Not an export, or one that ends before its end line."""


@dataclass
class Verdict:
    ok: bool
    events: int
    checkpoints: int
    first_seq: int | None
    last_seq: int | None
    first_broken_seq: int | None = None
    first_broken_id: int | None = None
    checkpoint: int | None = None
    reason: str = ""
    problems: list[str] = field(default_factory=list)
    # The newest checkpoint the export holds: compare it with the one you last saw published.
    newest_checkpoint: dict[str, Any] | None = None


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The lines before the events (header, rotations, checkpoint copies), parsed."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.startswith('{"type":"event",'):
                return
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ExportUnreadable(f"line {number} is not JSON") from exc
            if not isinstance(item, dict):
                raise ExportUnreadable(f"line {number} is not a JSON object")
            yield item


def _header(path: Path) -> dict[str, Any]:
    first = next(_lines(path), None)
    if not first or first.get("type") != "export" or first.get("format") != FORMAT:
        raise ExportUnreadable("not a Bridge audit export (no export header)")
    if first.get("version") != 1:
        raise ExportUnreadable(f"export format version {first.get('version')} is not known")
    return first


def _copies(path: Path) -> Iterator[proof.CheckpointCopy]:
    previous = 0
    for item in _lines(path):
        if item.get("type") == "checkpoint_copy":
            record = item.get("record")
            if not isinstance(record, dict) or not isinstance(record.get("number"), int):
                raise ExportUnreadable("a checkpoint copy without a record and its number")
            if record["number"] < previous:
                raise ExportUnreadable("the checkpoint copies are not in number order")
            previous = record["number"]
            written = item.get("written_to")
            yield proof.CheckpointCopy(
                record["number"],
                record,
                str(item.get("source", "")),
                tuple(name for name in written if isinstance(name, str))
                if isinstance(written, list)
                else (),
            )


def _signed_at(record: dict[str, Any], seq: int) -> str | None:
    """The hash a checkpoint signs at `seq`, as its own seq or as a waypoint (an export made
    after a retention purge starts where the purge cut the chain, which may be a waypoint)."""
    if record.get("seq") == seq and isinstance(record.get("hash"), str):
        return record["hash"]
    for point in record.get("waypoints") or []:
        if isinstance(point, list) and len(point) == 2 and point[0] == seq:
            return point[1] if isinstance(point[1], str) else None
    return None


def verify_export(path: Path, public_keys: list[Any]) -> Verdict:
    """Check an export against the trusted public keys; raises ExportUnreadable."""
    header = _header(path)
    rotations = [item for item in _lines(path) if item.get("type") == "key_rotation"]
    ring = proof.KeyRing.build(public_keys, rotations)
    sinks = header.get("sinks")
    first_number = header.get("first_checkpoint")
    first_seq = header.get("first_seq")
    if not isinstance(sinks, list) or not all(isinstance(name, str) for name in sinks):
        raise ExportUnreadable("the header's sinks are not a list of names")
    if not isinstance(first_number, int) or not isinstance(first_seq, int | None):
        raise ExportUnreadable("the header's first checkpoint or first seq is not a number")
    review = proof.CheckpointReview(
        lambda: _copies(path), sinks=sinks, ring=ring, first_number=first_number
    )
    # Where the walk starts is never the export's word: seq 1 from the genesis hash, or right
    # after the first checkpoint it carries, from the hash that checkpoint signs.
    base = review.first
    start_problem = None
    if first_seq in (None, 1):
        start_seq, start_hash = 1, proof.GENESIS_HASH
    elif base is not None and base["number"] == first_number and _signed_at(base, first_seq - 1):
        start_seq, start_hash = first_seq, _signed_at(base, first_seq - 1)
    else:
        start_seq, start_hash = first_seq, proof.GENESIS_HASH
        start_problem = proof.Problem(
            f"no signed checkpoint anchors the start of the range (seq {first_seq})",
            seq=first_seq,
        )
    walker = proof.ChainWalker(
        review.anchors(),
        start_hash=start_hash,
        start_seq=start_seq,
        hasher_for=proof.text_hasher,
        id_at=4,
    )
    ends: list[dict[str, Any]] = []

    def event_rows() -> Iterator[tuple]:
        in_events = False
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if ends:
                    raise ExportUnreadable(f"line {number} follows the end line")
                if line.startswith('{"type":"event",'):
                    in_events = True
                    row = proof.parse_event_line(line)
                    if row is None:
                        raise ExportUnreadable(f"line {number} is not an event line as exported")
                    yield row
                elif in_events and not line.startswith('{"type":"end",'):
                    raise ExportUnreadable(f"line {number} is not an event or the end line")
                elif line.startswith('{"type":"end",'):
                    try:
                        ends.append(json.loads(line))
                    except ValueError as exc:
                        raise ExportUnreadable(f"line {number} is not JSON") from exc

    rows = event_rows()
    problem = start_problem or walker.walk(rows)
    for _ in rows:  # after a problem: read on to the end line, to tell a cut-off file
        pass
    end = ends[-1] if ends else None
    if end is None:
        raise ExportUnreadable("the export ends before its end line (cut off?)")
    if problem is None and first_seq is not None:
        problem = walker.finish()  # an empty range has no tail to cut
    if problem is None and walker.checked and review.count == 0:
        problem = proof.Problem("no signed checkpoint anchors these events")
    if problem is None and end.get("events") != walker.checked:
        problem = proof.Problem(
            f"the end line counts {end.get('events')} events, not {walker.checked}"
        )
    if problem is None and header.get("last_seq") not in (None, walker.last_seq):
        problem = proof.Problem(
            f"the header names seq {header.get('last_seq')} as the last, the events end at "
            f"{walker.last_seq}"
        )
    problems = [item.reason for item in review.problems]
    if problem is None and review.problems:
        problem = review.problems[0]
    verdict = Verdict(
        ok=problem is None,
        events=walker.checked,
        checkpoints=review.count,
        first_seq=first_seq,
        last_seq=walker.last_seq,
        problems=problems[:20],
    )
    if review.newest is not None:
        verdict.newest_checkpoint = {
            key: review.newest.get(key) for key in ("number", "seq", "time", "key_id")
        }
    if problem is not None:
        verdict.first_broken_seq = problem.seq
        verdict.first_broken_id = problem.event_id
        verdict.checkpoint = problem.checkpoint
        verdict.reason = problem.reason
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compliance.verify_export",
        description="Verify a Bridge audit export offline against trusted public keys.",
    )
    parser.add_argument("export", type=Path, help="the file `manage.py export_audit` wrote")
    parser.add_argument(
        "--public-key",
        type=Path,
        action="append",
        required=True,
        help="a trusted Ed25519 public key (PEM or base64); may be given more than once",
    )
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = parser.parse_args(argv)
    try:
        keys = [proof.load_public_key(path.read_bytes()) for path in args.public_key]
    except (OSError, ValueError) as exc:
        print(f"cannot use the public key: {exc}", file=sys.stderr)
        return 2
    try:
        verdict = verify_export(args.export, keys)
    except (OSError, ExportUnreadable, UnicodeDecodeError) as exc:
        print(f"cannot verify {args.export}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        # Whatever else a malformed file provokes: unreadable, never a traceback that could
        # be taken for a verdict.
        print(f"cannot verify {args.export}: malformed ({type(exc).__name__})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(verdict), indent=2))
    elif verdict.ok:
        print(
            f"audit export intact: {verdict.events} events (seq {verdict.first_seq}.."
            f"{verdict.last_seq}) verified against {verdict.checkpoints} signed checkpoint(s)"
        )
        if verdict.newest_checkpoint:
            newest = verdict.newest_checkpoint
            print(
                f"newest checkpoint: #{newest['number']} at seq {newest['seq']}, signed "
                f"{newest['time']} by {newest['key_id']} (compare with the newest you have seen)"
            )
    else:
        where = f" at seq {verdict.first_broken_seq}" if verdict.first_broken_seq else ""
        proof_of = f" (checkpoint #{verdict.checkpoint})" if verdict.checkpoint else ""
        print(f"audit export BROKEN{where}{proof_of}: {verdict.reason}")
        for extra in verdict.problems[1:]:
            print(f"  also: {extra}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
