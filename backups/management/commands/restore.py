from datetime import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backups import services
from backups.choices import Component, RestoreStatus
from backups.management.commands._progress import Bar
from backups.models import Backup, RestoreJob
from bridge.jobs import run_job
from compliance import approvals
from compliance.audit import AuditContext
from compliance.choices import ApprovalAction


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
        parser.add_argument(
            "--requested-by",
            metavar="USERNAME",
            help="With SOX second approval on: who asks for the live restore (a user holding "
            "backups.restore_backup); a second user approves it before it starts.",
        )
        parser.add_argument("--reason", default="", help="Why (kept with the approval request).")

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
        if not options["dry_run"] and approvals.requires_approval(ApprovalAction.LIVE_RESTORE):
            self._request_approval(backup, options, target_time)
            return
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

    def _request_approval(
        self, backup: Backup, options: dict[str, object], target_time: datetime | None
    ) -> None:
        """Segregation of duties (SOX): the restore is asked for, and starts once a second
        user approves it (through the API or the console)."""
        from django.contrib.auth import get_user_model

        username = options.get("requested_by")
        if not username:
            raise CommandError(
                "a live restore needs a second approval (SOX_REQUIRE_SECOND_APPROVAL): say who "
                "asks with --requested-by USERNAME (and why with --reason)"
            )
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user {username}")
        try:
            params = services.restore_approval_params(
                backup=backup, components=options["components"], target_time=target_time
            )
            approval = approvals.request_approval(
                action=ApprovalAction.LIVE_RESTORE,
                params=params,
                reason=str(options.get("reason") or f"Live restore of backup {backup.pk}"),
                context=AuditContext.system().with_actor(user),
                user=user,
            )
        except (services.BackupRefused, approvals.ApprovalError) as refused:
            raise CommandError(str(refused)) from refused
        self.stdout.write(
            self.style.WARNING(
                f"Nothing restored yet: approval request {approval.pk} waits for a second user "
                f"with backups.restore_backup (until {approval.expires_at:%Y-%m-%d %H:%M} UTC)."
            )
        )
        self.stdout.write(
            f"  approve: POST /api/compliance/approvals/{approval.pk}/approve, or the console's "
            "Second approvals page; approving starts the restore (a Celery worker runs it)."
        )
