from django.db import models

from bridge.roles import Role  # noqa: F401  (roles are platform-wide; re-exported here)

# The job that re-encrypts stored values after a key rotation (security/rotation.py).
REENCRYPT_JOB_KIND = "security.reencrypt"


class FamilyRevocation(models.TextChoices):
    """Why a refresh-token family stopped being refreshable."""

    LOGOUT = "logout", "Logout"
    REUSE_DETECTED = "reuse_detected", "Refresh token reuse detected"
    ADMIN = "admin", "Revoked by an administrator"


class KeyPurpose(models.TextChoices):
    """What a key is for; each purpose has one current key."""

    AUDIT_SIGNING = "audit_signing", "Audit checkpoint signing (Ed25519)"


class SecretKind(models.TextChoices):
    """What a stored secret opens."""

    SERVICE = "service", "Service credential"
    BACKUP_TARGET = "backup_target", "Backup target"
    WEBHOOK = "webhook", "Webhook"
    OTHER = "other", "Other"


class ThreatLayer(models.TextChoices):
    """Where a threat event was seen (security/threats.py)."""

    NETWORK = "network", "Network"
    AUTHENTICATION = "authentication", "Authentication"
    APPLICATION = "application", "Application"
    DATA = "data", "Data"


class ThreatKind(models.TextChoices):
    """What was seen; each kind belongs to one layer and has its score (security/threats.py)."""

    OVER_LIMIT = "over_limit", "Over a rate limit"
    RATE_BAN = "rate_ban", "Banned by the rate limiter"
    LOGIN_FAILED = "login_failed", "Failed login"
    LOCKED_OUT = "locked_out", "Locked out"
    TOKEN_REUSE = "token_reuse", "Refresh token reuse"
    SQL_INJECTION = "sql_injection", "SQL injection probe"
    XSS = "xss", "Cross-site scripting probe"
    PATH_TRAVERSAL = "path_traversal", "Path traversal probe"
    NOT_FOUND_BURST = "not_found_burst", "Burst of 404s (a scanner)"
    OVERSIZED_BODY = "oversized_body", "Oversized request body"
    DECRYPTION_FAILED = "decryption_failed", "Decryption refused"
    DECRYPT_VOLUME = "decrypt_volume", "Unusual decrypt volume"
    EXPORT_VOLUME = "export_volume", "Unusual export volume"


class ThreatLevel(models.TextChoices):
    """The threat picture at a glance (security.threats.assess)."""

    LOW = "low", "Low"
    ELEVATED = "elevated", "Elevated"
    HIGH = "high", "High"
    CRITICAL = "critical", "Critical"
