from django.db import models

from bridge.roles import Role  # noqa: F401  (roles are platform-wide; re-exported here)


class FamilyRevocation(models.TextChoices):
    """Why a refresh-token family stopped being refreshable."""

    LOGOUT = "logout", "Logout"
    REUSE_DETECTED = "reuse_detected", "Refresh token reuse detected"
    ADMIN = "admin", "Revoked by an administrator"


class KeyPurpose(models.TextChoices):
    """What a key is for; each purpose has one current key."""

    AUDIT_SIGNING = "audit_signing", "Audit checkpoint signing (Ed25519)"
