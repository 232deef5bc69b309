from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from compliance.audit import AuditContext
from security import subject_keys


class Command(BaseCommand):
    help = (
        "Back up the data subjects' keys (wrapped, never in the clear) to SUBJECT_KEY_BACKUP_DIR "
        "and delete backups past SUBJECT_KEY_BACKUP_RETENTION_DAYS; with --restore FILE, add the "
        "keys of that backup the table lacks (a destroyed key stays destroyed)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--restore", metavar="FILE", help="Restore from this backup file.")

    def handle(self, *args: object, **options: object) -> None:
        context = AuditContext.system()
        if options["restore"]:
            try:
                done = subject_keys.restore_subject_keys(
                    path=Path(str(options["restore"])), context=context
                )
            except subject_keys.KeyBackupError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(
                f"{done['added']} key(s) restored, {done['present']} already present, "
                f"{done['kept_destroyed']} kept destroyed"
            )
            return
        done = subject_keys.backup_subject_keys(context=context)
        self.stdout.write(
            f"{done['keys']} subject key(s) backed up to {done['file']} (sha256 {done['sha256']}); "
            f"{len(done['pruned'])} old backup(s) deleted"
        )
