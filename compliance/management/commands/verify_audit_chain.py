from django.core.management.base import BaseCommand, CommandError, CommandParser

from compliance import services
from compliance.choices import VerificationSource, VerificationStatus


class Command(BaseCommand):
    help = "Recompute the audit hash chain; exit 1 naming the first broken event."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--seal", action="store_true", help="Seal waiting events first, then verify."
        )

    def handle(self, *args: object, **options: object) -> None:
        if options["seal"]:
            sealed = services.seal_all_pending()
            self.stdout.write(f"sealed {sealed} waiting event(s)")

        def progress(checked: int, total: int) -> None:
            percent = 100 * checked // total if total else 100
            self.stdout.write(f"  {percent:3d}%  {checked:,} of {total:,} events")

        run = services.verify_chain(source=VerificationSource.CLI, on_progress=progress)
        if run.status != VerificationStatus.OK:
            raise CommandError(
                f"audit chain BROKEN at event id {run.first_broken_id}: {run.reason} "
                f"({run.checked} events verified before it)",
                returncode=1,
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"audit chain intact: {run.checked} sealed events verified, "
                f"{run.unsealed} not sealed yet"
            )
        )
