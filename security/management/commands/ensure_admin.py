import os
import secrets
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from bridge.env import env_str
from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from security.models import User


class Command(BaseCommand):
    help = (
        "Make sure the admin account BRIDGE_ADMIN_USERNAME exists. Its password comes from "
        "BRIDGE_ADMIN_PASSWORD; when unset, a new account gets a random one, left in "
        "var/admin_password (readable by its owner only) for `make run` to show once."
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
                # Never logged nor audited. bin/run prints it once the server is up and then
                # deletes the file, so that it is not lost in the start-up logs.
                path = write_private(Path(settings.VAR_DIR) / "admin_password", password)
                self.stdout.write(
                    self.style.WARNING(
                        f"Created admin account '{username}' with a generated password, kept in "
                        f"{path} (readable by you only) until `make run` shows it once.\n"
                        "Or set BRIDGE_ADMIN_PASSWORD and run again to choose it."
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


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable and writable by the owner only from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    tmp.replace(path)
    return path
