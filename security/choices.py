from django.db import models

from bridge.roles import Role  # noqa: F401  (roles are platform-wide; re-exported here)


class FamilyRevocation(models.TextChoices):
    """Why a refresh-token family stopped being refreshable."""

    LOGOUT = "logout", "Logout"
    REUSE_DETECTED = "reuse_detected", "Refresh token reuse detected"
    ADMIN = "admin", "Revoked by an administrator"
