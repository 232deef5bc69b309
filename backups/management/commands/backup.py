from django.core.management.base import BaseCommand, CommandError, CommandParser

from backups import services
from backups.choices import BackupKind, BackupStatus, Component
from backups.management.commands._progress import Bar
from backups.models import Backup
from bridge.jobs import run_job
from compliance.audit import AuditContext


class Command(BaseCommand):
    help = (
        "Take a backup now (full, incremental or point-in-time) with a progress bar; the same "
        "service the API and the schedule call. Exit 1 when it fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "kind", choices=["full", "incremental", "point-in-time"], help="What to take."
        )
        parser.add_argument(
            "--components",
            nargs="+",
            choices=Component.values,
            help="Only these components (default: all).",
        )
        parser.add_argument("--parent", help="An incremental's parent backup id.")
        parser.add_argument("--label", default="", help="A label to find it by.")

    def handle(self, *args: object, **options: object) -> None:
        kind = str(options["kind"]).replace("-", "_")
        parent = None
        if options["parent"]:
            parent = Backup.objects.filter(pk=options["parent"]).first()
            if parent is None:
                raise CommandError(f"no backup {options['parent']}")
        try:
            backup = services.start_backup(
                kind=BackupKind(kind),
                context=AuditContext.system(),
                components=options["components"],
                parent=parent,
                label=str(options["label"]),
                enqueue=False,
            )
        except services.BackupRefused as refused:
            raise CommandError(str(refused)) from refused
        bar = Bar(self.stdout)
        run_job(backup.job_id, services.run_backup_job, listener=bar)
        bar.done()
        backup.refresh_from_db()
        if backup.status != BackupStatus.SUCCEEDED:
            raise CommandError(f"backup {backup.pk} failed: {backup.error}", returncode=1)
        rule = backup.rule_321
        self.stdout.write(
            self.style.SUCCESS(
                f"backup {backup.pk} ({backup.kind}) succeeded: {backup.raw_bytes:,} bytes read, "
                f"{backup.stored_bytes:,} stored per copy, {rule.get('copies', 0)} copies"
            )
        )
        for name, entry in backup.manifest.items():
            if isinstance(entry, dict) and entry.get("state") == "skipped":
                self.stdout.write(f"  {name}: skipped ({entry.get('reason')})")
        if not backup.rule_321_ok:
            self.stdout.write(
                self.style.WARNING("3-2-1 rule violated: " + "; ".join(rule.get("problems", [])))
            )
