from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from bridge import tls


class Command(BaseCommand):
    help = (
        "Write a self-signed certificate and key (EC P-256) for localhost, 127.0.0.1 and ::1, "
        "for `make run-tls`; never for production."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dir",
            type=Path,
            default=None,
            help="where to write cert.pem and key.pem (default: var/tls under BRIDGE_VAR_DIR)",
        )
        parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
        parser.add_argument(
            "--force", action="store_true", help="replace an existing certificate and key"
        )
        parser.add_argument(
            "--if-missing",
            action="store_true",
            help="keep a pair that is already there and exit 0 (what `make run-tls` uses)",
        )

    def handle(self, *args: object, **options: object) -> None:
        directory = options["dir"] or Path(settings.VAR_DIR) / "tls"
        if options["days"] < 1:
            raise CommandError("--days must be at least 1")
        cert_path, key_path = directory / tls.DEV_CERT_NAME, directory / tls.DEV_KEY_NAME
        if options["if_missing"] and not options["force"]:
            present = [path.exists() for path in (cert_path, key_path)]
            if all(present):
                self.stdout.write(f"Keeping the development certificate {cert_path}")
                return
            if any(present):
                # Half a pair is someone's leftover: replacing it silently could drop their key.
                raise CommandError(
                    f"only one of {cert_path} and {key_path} exists; --force replaces both"
                )
        try:
            cert_path, key_path = tls.write_dev_certificate(
                directory, days=options["days"], force=options["force"]
            )
        except FileExistsError as exc:
            raise CommandError(f"{exc} exists; not overwritten (--force replaces it)") from exc
        self.stdout.write(
            f"Certificate: {cert_path}\n"
            f"Key (mode 600): {key_path}\n"
            f"SHA-256 fingerprint: {tls.fingerprint(cert_path)}\n"
            f"Self-signed for {', '.join(tls.DEV_HOSTS)}, valid {options['days']} days: clients "
            "trust it by taking the certificate as their CA file."
        )
