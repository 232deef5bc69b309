"""PostgreSQL's restore_command: `restore_command = 'python manage.py fetch_wal %f %p'`."""

from __future__ import annotations

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandParser

from backups import pitr


class Command(BaseCommand):
    help = (
        "Fetch one archived WAL file (PostgreSQL's restore_command, 'fetch_wal %f %p'), "
        "verified and decrypted. Exits 0 when written, 1 when it was never archived (the "
        f"normal end of a recovery), {pitr.FETCH_REFUSED_EXIT} when it is archived but no copy "
        "is usable (PostgreSQL then stops the recovery instead of promoting)."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="%%f: the file PostgreSQL asks for")
        parser.add_argument("path", help="%%p: where to write it")
        parser.add_argument(
            "--system-identifier",
            default="",
            help="The cluster whose archive to read (default: the data directory's, else the "
            "only one archived).",
        )

    def handle(self, *args: object, **options: object) -> None:
        name = str(options["name"])

        def report(message: str) -> None:
            sys.stderr.write(f"fetch_wal {name}: {message}\n")

        try:
            found = pitr.fetch_wal(
                name,
                Path(str(options["path"])),
                system_identifier=str(options["system_identifier"]) or None,
                report=report,
            )
        except pitr.WalFetchError as exc:
            report(str(exc))
            sys.exit(pitr.FETCH_REFUSED_EXIT)
        except Exception as exc:  # unknown whether it is archived: do not let recovery end here
            report(str(exc) if isinstance(exc, pitr.PitrError) else f"{type(exc).__name__}: {exc}")
            sys.exit(pitr.FETCH_REFUSED_EXIT)
        if not found:
            # PostgreSQL asks past the end of the archive (and for history files that do not
            # exist) as a matter of course: quiet unless asked.
            if int(str(options.get("verbosity", 1))) > 1:
                report("not archived")
            sys.exit(1)
