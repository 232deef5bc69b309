from django.core.management.base import BaseCommand, CommandError, CommandParser

from bridge.choices import JobStatus
from bridge.jobs import run_job
from bridge.models import Job
from compliance import approvals
from compliance.audit import AuditContext
from compliance.choices import ApprovalAction
from security import crypto, rotation


class Command(BaseCommand):
    help = (
        "Re-wrap every data key under the current master key (BRIDGE_MASTER_KEY; the old one in "
        "BRIDGE_MASTER_KEY_PREVIOUS), start new data key versions, and re-encrypt stored values "
        "under them with progress."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--keep-data-keys",
            action="store_true",
            help="Only re-wrap under the master key; no new data key versions.",
        )
        parser.add_argument(
            "--background",
            action="store_true",
            help="Leave the re-encryption to a Celery worker instead of running it here.",
        )
        parser.add_argument(
            "--requested-by",
            metavar="USERNAME",
            help="With SOX second approval on: who asks for the rotation (a user holding "
            "security.rotate_datakey); a second user approves it before it runs.",
        )
        parser.add_argument("--reason", default="", help="Why (kept with the approval request).")

    def handle(self, *args: object, **options: object) -> None:
        if approvals.requires_approval(ApprovalAction.KEY_ROTATION):
            self._request_approval(options)
            return
        try:
            summary = rotation.rotate_keys(
                context=AuditContext.system(),
                new_data_keys=not options["keep_data_keys"],
                enqueue=bool(options["background"]),
            )
        except crypto.CryptoError as exc:
            raise CommandError(f"rotation refused, nothing changed: {exc}") from exc
        self.stdout.write(
            f"{summary['rewrapped']} of {summary['data_keys']} data key(s) re-wrapped under "
            f"{summary['master_key_id']}; {len(summary['new_data_keys'])} new data key version(s)"
        )
        if options["background"]:
            self.stdout.write(f"re-encryption queued as job {summary['job_id']}")
            return

        def progress(job: Job) -> None:
            total = job.progress_total or 0
            percent = 100 * job.progress_done // total if total else 100
            self.stdout.write(f"  {percent:3d}%  {job.progress_done:,} of {total:,} values")

        job = run_job(summary["job_id"], rotation.reencrypt_job, listener=progress)
        if job is None or job.status != JobStatus.SUCCEEDED:
            error = job.error if job is not None else "not run"
            raise CommandError(f"re-encryption job {summary['job_id']} failed: {error}")
        result = job.result
        self.stdout.write(
            self.style.SUCCESS(
                f"re-encrypted {result['reencrypted']} value(s), {result['current']} already "
                f"current, {result['changed_meanwhile']} changed meanwhile (job {job.pk})"
            )
        )

    def _request_approval(self, options: dict[str, object]) -> None:
        """Segregation of duties (SOX): the rotation is asked for, and runs once a second
        user approves it (through the API or the console; a Celery worker re-encrypts)."""
        from django.contrib.auth import get_user_model

        username = options.get("requested_by")
        if not username:
            raise CommandError(
                "a key rotation needs a second approval (SOX_REQUIRE_SECOND_APPROVAL): say who "
                "asks with --requested-by USERNAME (and why with --reason)"
            )
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user {username}")
        try:
            approval = approvals.request_approval(
                action=ApprovalAction.KEY_ROTATION,
                params={"new_data_keys": not options["keep_data_keys"]},
                reason=str(options.get("reason") or "Key rotation asked from the command line"),
                context=AuditContext.system().with_actor(user),
                user=user,
            )
        except approvals.ApprovalError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.WARNING(
                f"Nothing rotated yet: approval request {approval.pk} waits for a second user "
                f"with security.rotate_datakey (until {approval.expires_at:%Y-%m-%d %H:%M} UTC)."
            )
        )
        self.stdout.write(
            f"  approve: POST /api/compliance/approvals/{approval.pk}/approve, or the console's "
            "Second approvals page; approving rotates the keys."
        )
