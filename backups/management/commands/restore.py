from datetime import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backups import services
from backups.choices import Component, RestoreStatus
from backups.management.commands._progress import Bar
from backups.models import Backup, RestoreJob
from bridge.jobs import run_job
from compliance.audit import AuditContext


class Command(BaseCommand):
    help = (
        "Restore a backup (its whole chain) onto the live system with a progress bar, or "
        "PostgreSQL to a time (--target-time). Verifies every artifact first; a restore of the "
        "database takes a safety backup first. The same service the API calls."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("backup_id", help="The backup to restore.")
        parser.add_argument("--components", nargs="+", choices=Component.values)
        parser.add_argument("--target-time", help="ISO 8601 time with its offset (PITR).")
        parser.add_argument(
            "--dry-run", action="store_true", help="Verify and say what would be overwritten."
        )
        parser.add_argument(
            "--yes", action="store_true", help="Do not ask for confirmation (scripts)."
        )

    def handle(self, *args: object, **options: object) -> None:
        backup = Backup.objects.filter(pk=options["backup_id"]).first()
        if backup is None:
            raise CommandError(f"no backup {options['backup_id']}")
        target_time = None
        if options["target_time"]:
            try:
                target_time = datetime.fromisoformat(str(options["target_time"]))
            except ValueError as exc:
                raise CommandError(f"--target-time: {exc}") from exc
            if target_time.tzinfo is None:
                raise CommandError("--target-time needs its UTC offset, e.g. +00:00")
        if not (options["dry_run"] or options["yes"]):
            components = options["components"] or services._restorable_components(backup)
            self.stdout.write("This overwrites live data:")
            for name in components:
                self.stdout.write(f"  - {services.overwrite_text(name)}")
            if input("Type 'restore' to go on: ").strip() != "restore":
                raise CommandError("not confirmed; nothing was changed")
        try:
            restore = services.start_restore(
                backup=backup,
                context=AuditContext.system(),
                components=options["components"],
                target_time=target_time,
                dry_run=bool(options["dry_run"]),
                enqueue=False,
            )
        except services.BackupRefused as refused:
            raise CommandError(str(refused)) from refused
        bar = Bar(self.stdout)
        run_job(restore.job_id, services.run_restore_job, listener=bar)
        bar.done()
        restore = RestoreJob.objects.get(pk=restore.pk)
        if restore.status != RestoreStatus.SUCCEEDED:
            raise CommandError(
                f"restore {restore.pk} {restore.status}: {restore.error}", returncode=1
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"restore {restore.pk} of backup {backup.pk} succeeded in "
                f"{restore.rto_seconds:.1f} s"
            )
        )
        for key in ("would_overwrite", "restored", "data_dir"):
            if key in restore.result:
                self.stdout.write(f"  {key}: {restore.result[key]}")
