from django.db import models


class Role(models.TextChoices):
    """The Django groups that grant access to each area of the API and console."""

    OPERATOR = "operator", "Operator (recovery, backups)"
    SECURITY_OFFICER = "security_officer", "Security officer (security)"
    COMPLIANCE_OFFICER = "compliance_officer", "Compliance officer (compliance, reports)"


class FamilyRevocation(models.TextChoices):
    """Why a refresh-token family stopped being refreshable."""

    LOGOUT = "logout", "Logout"
    REUSE_DETECTED = "reuse_detected", "Refresh token reuse detected"
    ADMIN = "admin", "Revoked by an administrator"
