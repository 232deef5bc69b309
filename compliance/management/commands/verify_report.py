from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from compliance.reports import verify_report_file
from compliance.reports.verify import exit_status, load_public_keys


class Command(BaseCommand):
    help = (
        "Verify a compliance report: the manifest's Ed25519 signature, then the file's SHA-256. "
        "Exit 0 intact, 1 changed or not signed by a trusted key, 2 unreadable."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="The report file (<id>.csv, .json or .pdf).")
        parser.add_argument(
            "--manifest", type=Path, help="The manifest (default: <id>.manifest.json beside it)."
        )
        parser.add_argument(
            "--signature", type=Path, help="The signature (default: <id>.sig beside it)."
        )
        parser.add_argument(
            "--public-key",
            type=Path,
            action="append",
            help=(
                "Trust only this public key file (PEM or base64; repeatable), not the keys "
                "Bridge trusts: a key pinned when an earlier report was checked."
            ),
        )

    def handle(self, *args: object, **options: object) -> None:
        pinned = None
        if options["public_key"]:
            try:
                pinned = load_public_keys(options["public_key"])
            except ValueError as exc:
                raise CommandError(str(exc), returncode=2) from exc
        verdict = verify_report_file(
            options["file"],
            signature_path=options["signature"],
            manifest_path=options["manifest"],
            public_keys=pinned,
        )
        if not verdict.ok:
            raise CommandError(
                f"report NOT verified: {verdict.reason}", returncode=exit_status(verdict)
            )
        self.stdout.write(self.style.SUCCESS(f"OK: {verdict.reason}"))
