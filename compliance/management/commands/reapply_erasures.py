from django.core.management.base import BaseCommand

from compliance import dsr
from compliance.audit import AuditContext


class Command(BaseCommand):
    help = (
        "Run every recorded GDPR erasure again (after restoring Bridge's database by other "
        "means than Bridge's own restore, which does it by itself)."
    )

    def handle(self, *args: object, **options: object) -> None:
        applied = dsr.reapply_erasures(context=AuditContext.system())
        self.stdout.write(f"{applied} recorded erasure(s) applied again")
