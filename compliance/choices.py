from django.db import models


class AuditAction(models.TextChoices):
    """Actions Bridge itself records; custom events from the API are `custom.<name>`."""

    API_REQUEST = "api.request", "API request"
    LOGIN_SUCCEEDED = "auth.login.succeeded", "Login succeeded"
    LOGIN_FAILED = "auth.login.failed", "Login failed"
    LOCKED_OUT = "auth.lockout", "Locked out"
    LOGOUT = "auth.logout", "Logout"
    TOKEN_REFRESHED = "auth.token.refreshed", "Token refreshed"
    TOKEN_REUSE_DETECTED = "auth.token.reuse_detected", "Refresh token reuse detected"
    TOKEN_REFRESH_RETRIED = "auth.token.refresh_retried", "Refresh retried within the grace window"
    SESSIONS_REVOKED = "auth.sessions.revoked", "Sessions revoked by an administrator"
    OTP_ENROLLED = "auth.otp.enrolled", "Authenticator enrolled"
    OTP_VERIFIED = "auth.otp.verified", "Authentication code accepted"
    OTP_FAILED = "auth.otp.failed", "Authentication code refused"
    OTP_REMOVED = "auth.otp.removed", "Authenticator removed"
    ADMIN_CHANGE = "admin.change", "Admin change"
    ADMIN_REQUEST = "admin.request", "Admin form or action sent"
    AUDIT_VERIFIED = "audit.verified", "Audit chain verified"
    AUDIT_BROKEN = "audit.broken", "Audit chain broken"
    SEAL_LAG = "audit.seal_lag", "Audit sealing lags behind"
    CHECKPOINT_FAILED = "audit.checkpoint_failed", "Audit checkpoint not written to a sink"
    CHECKPOINT_REFUSED = "audit.checkpoint_refused", "Audit checkpoint refused (bad signature)"
    CHECKPOINT_NOT_SIGNED = (
        "audit.checkpoint_not_signed",
        "Audit checkpoint not signed: chain broken",
    )
    AUDIT_EXPORTED = "audit.exported", "Audit trail exported"
    SIGNING_KEY_ROTATED = "security.signing_key_rotated", "Signing key rotated"
    RATE_LIMITED = "security.rate_limited", "Rate limit exceeded"
    IP_BANNED = "security.ip_banned", "IP address banned"
    IP_UNBANNED = "security.ip_unbanned", "IP ban lifted"
    DATA_ENCRYPTED = "security.encrypted", "Data encrypted"
    DATA_DECRYPTED = "security.decrypted", "Data decrypted"
    DECRYPTION_FAILED = "security.decryption_failed", "Decryption refused"
    KEYS_ROTATED = "security.keys_rotated", "Data keys re-wrapped and new versions started"
    SUBJECT_KEYS_BACKED_UP = "security.subject_keys_backed_up", "Subject keys backed up"
    SUBJECT_KEYS_RESTORED = "security.subject_keys_restored", "Subject keys restored"
    SECURITY_SELF_TEST = "security.self_test", "Security self-test run"
    SECURITY_RESET = "security.reset", "Bans and counters cleared"
    ADMIN_ACCOUNT = "admin.account", "Admin account ensured"
    JOB_REQUESTED = "job.requested", "Job requested"
    JOB_SUCCEEDED = "job.succeeded", "Job succeeded"
    JOB_FAILED = "job.failed", "Job failed"
    JOB_CANCELLED = "job.cancelled", "Job cancelled"
    JOB_CANCEL_REQUESTED = "job.cancel_requested", "Job cancel requested"
    THREAT_ALERT = "security.threat_alert", "Threat score over the alert threshold"
    HEAL_REQUESTED = "recovery.heal.requested", "Self-healing started"
    HEAL_SKIPPED = "recovery.heal.skipped", "Self-healing refused by a guardrail"
    HEAL_STEP = "recovery.heal.step", "Self-healing action taken"
    HEAL_FINISHED = "recovery.heal.finished", "Self-healing finished"
    RECOVERY_RESET = "recovery.reset", "Breakers, retry statistics and stuck heals cleared"
    BREAKER_RESET = "recovery.breaker.reset", "Circuit breaker closed by hand"
    BREAKER_FORCED_OPEN = "recovery.breaker.forced_open", "Circuit breaker forced open"
    BREAKER_DISABLED = "recovery.breaker.disabled", "Circuit breaker disabled"
    RETRY_TESTED = "recovery.retry.tested", "Retry executor test run"
    SERVICE_CREATED = "recovery.service.created", "Monitored service added"
    SERVICE_UPDATED = "recovery.service.updated", "Monitored service changed"
    SERVICE_DELETED = "recovery.service.deleted", "Monitored service removed"
    SERVICE_CHECKED = "recovery.service.checked", "Service checked by hand"
    BACKUP_REQUESTED = "backup.requested", "Backup started"
    BACKUP_SUCCEEDED = "backup.succeeded", "Backup succeeded"
    BACKUP_FAILED = "backup.failed", "Backup failed"
    BACKUP_DELETED = "backup.deleted", "Backup deleted"
    BACKUP_RULE_321_VIOLATED = "backup.rule_321_violated", "Backup breaks the 3-2-1 rule"
    BACKUP_RESTORE_REQUESTED = "backup.restore.requested", "Restore started"
    BACKUP_RESTORED = "backup.restore.succeeded", "Restore succeeded"
    BACKUP_RESTORE_FAILED = "backup.restore.failed", "Restore failed or refused"
    BACKUP_DRILL = "backup.drill", "Restore drill run"
    BACKUP_CLEANUP = "backup.cleanup", "Backup retention applied"
    WAL_ARCHIVED = "backup.wal_archived", "WAL segment archived"


CUSTOM_ACTION_PREFIX = "custom."


VERIFY_JOB_KIND = "compliance.verify_audit_chain"


class VerificationSource(models.TextChoices):
    API = "api", "API"
    CLI = "cli", "Command line"
    ADMIN = "admin", "Admin console"
    SCHEDULE = "schedule", "Schedule"


class CheckpointStatus(models.TextChoices):
    """Where a checkpoint stands: it counts once every sink holds it."""

    PENDING = "pending", "Pending (not yet in every sink)"
    PUBLISHED = "published", "Published to every sink"
    REFUSED = "refused", "Refused (its signature does not verify)"
