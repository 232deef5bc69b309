from django.core.management.base import BaseCommand, CommandError, CommandParser

from bridge.choices import JobStatus
from bridge.jobs import run_job
from bridge.models import Job
from compliance.audit import AuditContext
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

    def handle(self, *args: object, **options: object) -> None:
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
