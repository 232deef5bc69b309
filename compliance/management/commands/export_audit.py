from datetime import UTC, datetime, time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_date, parse_datetime

from compliance.audit import AuditContext
from compliance.export import export_audit


def _moment(text: str) -> datetime:
    # A date means its midnight, UTC; a time without a zone is UTC too.
    moment = parse_datetime(text)
    if moment is None:
        day = parse_date(text)
        if day is None:
            raise CommandError(f"{text!r} is not a date (2026-11-28) or an ISO time")
        moment = datetime.combine(day, time.min)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Export the audit trail (events, seals, signed checkpoints, key rotations) as JSON lines "
        "for `python -m compliance.verify_export`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("out", type=Path, help="the file to write (replaced when complete)")
        parser.add_argument("--from", dest="start", help="first day or time (UTC), inclusive")
        parser.add_argument("--to", dest="end", help="last day or time (UTC), exclusive")

    def handle(self, *args: object, **options: object) -> None:
        start = _moment(options["start"]) if options["start"] else None
        end = _moment(options["end"]) if options["end"] else None
        if start and end and end <= start:
            raise CommandError("--to must be after --from")

        def progress(done: int, total: int) -> None:
            percent = 100 * done // total if total else 100
            self.stdout.write(f"  {percent:3d}%  {done:,} of {total:,} events")

        summary = export_audit(
            out=options["out"],
            start=start,
            end=end,
            context=AuditContext.system(),
            on_progress=progress,
        )
        span = f"seq {summary.first_seq}..{summary.last_seq}" if summary.events else "no events"
        self.stdout.write(
            self.style.SUCCESS(
                f"exported {summary.events:,} events ({span}), {summary.checkpoint_copies} "
                f"checkpoint copies, {summary.rotations} key rotation(s) to {summary.path} "
                f"({summary.bytes:,} bytes, sha256 {summary.sha256})"
            )
        )
