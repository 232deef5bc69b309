from django.core.management.base import BaseCommand, CommandError, CommandParser

from bridge.jobs import run_job
from bridge.models import Job
from compliance import chain, verification
from compliance.audit import AuditContext
from compliance.choices import VerificationSource
from compliance.models import AuditVerification


class Command(BaseCommand):
    help = "Recompute the audit hash chain now with progress; exit 1 naming the first broken event."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--seal", action="store_true", help="Seal waiting events first, then verify."
        )

    def handle(self, *args: object, **options: object) -> None:
        if options["seal"]:
            sealed = chain.seal_all_pending()
            self.stdout.write(f"sealed {sealed} waiting event(s)")

        def progress(job: Job) -> None:
            total = job.progress_total or 0
            percent = 100 * job.progress_done // total if total else 100
            self.stdout.write(f"  {percent:3d}%  {job.progress_done:,} of {total:,} events")

        # The same job the API and the schedule run, run here in-process to show its progress.
        job = verification.start_verification(
            context=AuditContext.system(),
            source=VerificationSource.CLI,
            enqueue=False,
            reuse_active=False,
        )
        run_job(job.pk, verification.verify_chain_job, listener=progress)
        run = AuditVerification.objects.get(pk=job.pk)
        if run.ok is None:
            raise CommandError(f"verification job {run.pk} did not finish: {run.error}")
        if not run.ok:
            seq = run.result.get("first_broken_seq")
            checkpoint = run.result.get("checkpoint")
            where = f" at seq {seq}" if seq else ""
            event = f" (event id {run.first_broken_id})" if run.first_broken_id else ""
            proven = f", proven by checkpoint #{checkpoint}" if checkpoint else ""
            raise CommandError(
                f"audit chain BROKEN{where}{event}{proven}: {run.reason} "
                f"({run.checked} events verified before it)",
                returncode=1,
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"audit chain intact: {run.checked} sealed events verified against "
                f"{run.result.get('checkpoints', 0)} signed checkpoint(s), "
                f"{run.unsealed} not sealed yet (job {run.pk})"
            )
        )
