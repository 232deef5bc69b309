from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from compliance.audit import AuditContext
from security import keys, services
from security.keys import SigningKeyError


class Command(BaseCommand):
    help = (
        "Rotate the audit signing key: a record signed by the old and the new key hands over; "
        "checkpoints signed by the old key stay verifiable."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--new-key-file",
            type=Path,
            help="use this Ed25519 key (PEM, mode 600) instead of generating one; point "
            "AUDIT_SIGNING_KEY_FILE at it afterwards",
        )
        parser.add_argument(
            "--generate",
            type=Path,
            metavar="PATH",
            help="only write a new key to PATH (mode 600) and exit (a first production key)",
        )
        parser.add_argument("--reason", default="", help="why (kept in the rotation record)")

    def handle(self, *args: object, **options: object) -> None:
        if options["generate"]:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            try:
                keys.write_key_file(
                    options["generate"], Ed25519PrivateKey.generate(), replace=False
                )
            except FileExistsError as exc:
                raise CommandError(f"{options['generate']} exists; not overwritten") from exc
            self.stdout.write(self.style.SUCCESS(f"new key written to {options['generate']}"))
            return
        try:
            row = services.rotate_audit_signing_key(
                context=AuditContext.system(),
                new_key_file=options["new_key_file"],
                reason=options["reason"],
            )
        except (SigningKeyError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(f"audit signing key rotated to {row.key_id}"))
        if options["new_key_file"]:
            self.stdout.write(
                f"now set AUDIT_SIGNING_KEY_FILE={options['new_key_file']} and restart Bridge"
            )
