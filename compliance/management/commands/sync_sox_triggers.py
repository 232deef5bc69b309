from django.core.management.base import BaseCommand

from compliance import sox


class Command(BaseCommand):
    help = (
        "Install, update or drop the SOX change triggers to match SOX_AUDITED_MODELS and "
        "ENABLE_SOX_COMPLIANCE (migrate does this too). A change is audited."
    )

    def handle(self, *args: object, **options: object) -> None:
        changes = sox.sync_triggers()
        for change in changes:
            self.stdout.write(f"  {change}")
        tables = sorted(set(sox.installed_triggers().values()))
        summary = f"{len(tables)} table(s) audited" + (f": {', '.join(tables)}" if tables else "")
        if changes:
            self.stdout.write(self.style.SUCCESS(f"{len(changes)} change(s); {summary}"))
        else:
            self.stdout.write(f"already in step; {summary}")
