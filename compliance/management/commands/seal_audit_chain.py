from django.core.management.base import BaseCommand, CommandParser

from compliance import chain


class Command(BaseCommand):
    help = "Link every recorded, unsealed audit event into the hash chain now."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--sweep",
            action="store_true",
            help="Search the whole table for late-committed events, not only recent ids.",
        )

    def handle(self, *args: object, **options: object) -> None:
        sealed = chain.seal_all_pending(sweep=bool(options["sweep"]))
        self.stdout.write(f"sealed {sealed} event(s)")
