from django.core.management.base import BaseCommand, CommandError, CommandParser

from compliance import chain, checkpoints


class Command(BaseCommand):
    help = "Sign a checkpoint of the audit chain now and write it to every sink."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--seal", action="store_true", help="Seal waiting events first.")

    def handle(self, *args: object, **options: object) -> None:
        if options["seal"]:
            self.stdout.write(f"sealed {chain.seal_all_pending()} waiting event(s)")
        try:
            made = checkpoints.make_checkpoint()
        except checkpoints.CheckpointRefused as exc:
            raise CommandError(f"checkpoint NOT signed: {exc}", returncode=1) from exc
        health = checkpoints.checkpoint_health()
        if made is None:
            self.stdout.write("nothing new to sign since the last checkpoint")
        else:
            self.stdout.write(f"checkpoint #{made.number} at seq {made.seq}: {made.status}")
        if not health.ok:
            raise CommandError(health.message, returncode=1)
