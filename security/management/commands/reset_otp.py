from django.core.management.base import BaseCommand, CommandError
from django_otp.plugins.otp_totp.models import TOTPDevice

from compliance.audit import AuditContext
from security import otp
from security.models import User


class Command(BaseCommand):
    help = (
        "Remove a user's authenticator (a lost phone), e.g. the only superuser's, who cannot "
        "reach the console without it. At their next login they enrol a new one when their "
        "role requires it (OTP_REQUIRED_ROLES), or log in with the password alone. Audited."
    )

    def add_arguments(self, parser: object) -> None:
        parser.add_argument("username")
        parser.add_argument("--reason", default="", help="Recorded in the audit event.")

    def handle(self, *args: object, **options: object) -> None:
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user named {options['username']!r}")
        removed = otp.remove_devices(
            devices=TOTPDevice.objects.filter(user=user),
            context=AuditContext.system(),
            reason=options["reason"] or "command line",
        )
        self.stdout.write(f"Removed {removed} authenticator(s) of '{user.username}'.")
