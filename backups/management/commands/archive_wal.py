"""PostgreSQL's archive_command: `archive_command = 'python manage.py archive_wal %p %f'`."""

from __future__ import annotations

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandParser

from backups import pitr


class Command(BaseCommand):
    help = (
        "Archive one WAL file (PostgreSQL's archive_command, 'archive_wal %p %f'): compress, "
        "encrypt, store on every backup target, verify, record. Exits 0 only once every "
        "target holds a verified copy; otherwise 1, and PostgreSQL keeps the file and retries."
    )
    # PostgreSQL runs this for every WAL segment: no system checks on the way.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="%%p: the file's path (relative to the data directory)")
        parser.add_argument("name", help="%%f: the file's name")

    def handle(self, *args: object, **options: object) -> None:
        try:
            segment = pitr.archive_wal(Path(str(options["path"])), str(options["name"]))
        except Exception as exc:  # any failure: PostgreSQL must keep the file and retry
            message = (
                str(exc) if isinstance(exc, pitr.PitrError) else f"{type(exc).__name__}: {exc}"
            )
            sys.stderr.write(f"archive_wal {options['name']}: {message}\n")
            sys.stderr.flush()
            sys.exit(1)
        if int(str(options.get("verbosity", 1))) > 1:
            self.stdout.write(
                f"{segment.name}: {len(segment.copies)} copies, {segment.stored_bytes} bytes"
            )
