import secrets

from django.conf import settings
from django.core.management.base import BaseCommand

from bridge.env import env_str
from compliance.choices import AuditAction
from compliance.audit import AuditContext, record_event
from security.models import User


class Command(BaseCommand):
    help = (
        "Make sure the admin account BRIDGE_ADMIN_USERNAME exists. Its password comes from "
        "BRIDGE_ADMIN_PASSWORD; when unset, a new account gets a random one, printed once."
    )

    def handle(self, *args: object, **options: object) -> None:
        username = settings.BRIDGE_ADMIN_USERNAME
        password = env_str("BRIDGE_ADMIN_PASSWORD") or None
        user = User.objects.filter(username=username).first()
        if user is None:
            generated = password is None
            password = password or secrets.token_urlsafe(18)
            user = User.objects.create_superuser(username=username, email="", password=password)
            record_event(
                action=AuditAction.ADMIN_ACCOUNT,
                context=AuditContext.system().with_actor(user),
                object_type="security.user",
                object_id=user.pk,
                details={"created": True, "generated": generated},
            )
            if generated:
                # Printed to the operator's terminal once; it is never logged or stored.
                self.stdout.write(
                    self.style.WARNING(
                        f"Created admin account '{username}' with password: {password}\n"
                        "It is shown only this once: note it now or set BRIDGE_ADMIN_PASSWORD."
                    )
                )
            else:
                self.stdout.write(f"Created admin account '{username}'.")
            return
        changed = []
        if password is not None and not user.check_password(password):
            user.set_password(password)
            changed.append("password")
        if not (user.is_superuser and user.is_staff and user.is_active):
            user.is_superuser = user.is_staff = user.is_active = True
            changed.append("flags")
        if changed:
            user.save()
            record_event(
                action=AuditAction.ADMIN_ACCOUNT,
                context=AuditContext.system().with_actor(user),
                object_type="security.user",
                object_id=user.pk,
                details={"created": False, "updated": changed},
            )
        self.stdout.write(f"Admin account '{username}' is ready.")
