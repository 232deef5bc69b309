from django.core.management.base import BaseCommand

from compliance import services


class Command(BaseCommand):
    help = "Link every recorded, unsealed audit event into the hash chain now."

    def handle(self, *args: object, **options: object) -> None:
        sealed = services.seal_all_pending()
        self.stdout.write(f"sealed {sealed} event(s)")
