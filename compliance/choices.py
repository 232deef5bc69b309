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
    DSR_RECEIVED = "gdpr.request.received", "Data subject request received"
    DSR_VERIFYING = "gdpr.request.verifying", "Data subject request waits for identity proof"
    DSR_VERIFIED = "gdpr.request.verified", "Data subject identity verified"
    DSR_EXTENDED = "gdpr.request.extended", "Data subject request deadline extended"
    DSR_REJECTED = "gdpr.request.rejected", "Data subject request rejected"
    DSR_COMPLETED = "gdpr.request.completed", "Data subject request completed"
    DSR_FAILED = "gdpr.request.failed", "Data subject request processing failed"
    DSR_RETRIED = "gdpr.request.retried", "Data subject request processing started again"
    DSR_EXPORT_DOWNLOADED = "gdpr.export.downloaded", "Data subject export downloaded"
    DSR_RECTIFIED = "gdpr.rectified", "Personal data rectified"
    DSR_ERASED = "gdpr.erased", "Personal data erased"
    ERASURES_REAPPLIED = "gdpr.erasures_reapplied", "Erasures applied again after a restore"
    CONSENT_RECORDED = "gdpr.consent.recorded", "Consent granted or withdrawn"
    CONSENT_RECEIPT = "gdpr.consent.receipt", "Consent receipt exported"
    NOTICE_PUBLISHED = "gdpr.notice.published", "Privacy notice published"
    SOX_TRIGGERS_SYNCED = "sox.triggers_synced", "SOX change capture installed or updated"
    APPROVAL_REQUESTED = "sox.approval.requested", "Second approval requested"
    APPROVAL_APPROVED = "sox.approval.approved", "Second approval given"
    APPROVAL_REJECTED = "sox.approval.rejected", "Second approval refused"
    APPROVAL_CANCELLED = "sox.approval.cancelled", "Approval request cancelled"
    APPROVAL_EXPIRED = "sox.approval.expired", "Approval request expired"
    LEGAL_HOLD_PLACED = "retention.hold.placed", "Legal hold placed"
    LEGAL_HOLD_RELEASED = "retention.hold.released", "Legal hold released"
    RETENTION_RUN = "retention.run", "Retention applied"
    AUDIT_PURGED = "audit.purged", "Sealed audit events purged"
    AUDIT_PURGE_REFUSED = "audit.purge_refused", "Audit purge refused"
    REPORT_REQUESTED = "report.requested", "Compliance report requested"
    REPORT_GENERATED = "report.generated", "Compliance report generated"
    REPORT_FAILED = "report.failed", "Compliance report failed"
    REPORT_DOWNLOADED = "report.downloaded", "Compliance report downloaded"
    VIOLATION_OPENED = "compliance.violation.opened", "Compliance violation opened"
    VIOLATION_RESOLVED = "compliance.violation.resolved", "Compliance violation resolved"
    COMPLIANCE_TEST = "compliance.test", "Compliance self-test run"


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


# --- Issue 11: GDPR, consent, SOX, retention, reports, monitoring ---------------------------

DSR_JOB_KIND = "compliance.dsr"
REPORT_JOB_KIND = "compliance.report"
RETENTION_JOB_KIND = "compliance.retention"
COMPLIANCE_TEST_JOB_KIND = "compliance.test"


class DsrType(models.TextChoices):
    """What the data subject asks for (GDPR Art. 15, 16, 17 and 20)."""

    ACCESS = "access", "Access (Art. 15)"
    RECTIFICATION = "rectification", "Rectification (Art. 16)"
    ERASURE = "erasure", "Erasure (Art. 17)"
    PORTABILITY = "portability", "Portability (Art. 20)"


class DsrStatus(models.TextChoices):
    """received -> verifying (clock paused) -> in_progress -> [extended] -> completed | rejected."""

    RECEIVED = "received", "Received"
    VERIFYING = "verifying", "Verifying identity (clock paused)"
    IN_PROGRESS = "in_progress", "In progress"
    EXTENDED = "extended", "Extended"
    COMPLETED = "completed", "Completed"
    REJECTED = "rejected", "Rejected"


OPEN_DSR_STATUSES = (
    DsrStatus.RECEIVED,
    DsrStatus.VERIFYING,
    DsrStatus.IN_PROGRESS,
    DsrStatus.EXTENDED,
)


class ConsentMethod(models.TextChoices):
    """How consent was given or withdrawn."""

    CHECKBOX = "checkbox", "Checkbox (opt-in)"
    FORM = "form", "Signed form"
    API = "api", "API"
    VERBAL = "verbal", "Verbal (recorded)"
    EMAIL = "email", "Email"
    IMPORT = "import", "Imported"


class SoxOperation(models.TextChoices):
    INSERT = "INSERT", "Insert"
    UPDATE = "UPDATE", "Update"
    DELETE = "DELETE", "Delete"


class ApprovalAction(models.TextChoices):
    """Actions that, with ENABLE_SOX_COMPLIANCE, need a second authorised person."""

    LIVE_RESTORE = "backup.live_restore", "Restore a backup onto the live system"
    KEY_ROTATION = "security.key_rotation", "Rotate the master and data keys"


class ApprovalStatus(models.TextChoices):
    PENDING = "pending", "Waiting for a second approver"
    APPROVED = "approved", "Approved (carried out)"
    REJECTED = "rejected", "Rejected"
    EXPIRED = "expired", "Expired"
    CANCELLED = "cancelled", "Cancelled by the requester"
    FAILED = "failed", "Approved, but carrying it out failed"


class RetentionCategory(models.TextChoices):
    """What retention applies to, each with its own number of days."""

    AUDIT_EVENTS = "audit_events", "Audit events"
    API_REQUESTS = "api_requests", "API request records"
    DSR_RECORDS = "dsr_records", "Data subject requests"
    REPORTS = "reports", "Compliance reports"


class ReportType(models.TextChoices):
    AUDIT_TRAIL = "audit_trail", "Audit trail"
    ACCESS_REVIEW = "access_review", "Access review"
    GDPR_REQUESTS = "gdpr_requests", "GDPR requests"
    SOX_CHANGES = "sox_changes", "SOX changes and segregation of duties"
    SECURITY_EVENTS = "security_events", "Security events"
    BACKUP_EVIDENCE = "backup_evidence", "Backup evidence"


class ReportFormat(models.TextChoices):
    CSV = "csv", "CSV"
    PDF = "pdf", "PDF"
    JSON = "json", "JSON"


class ReportStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class ViolationRule(models.TextChoices):
    DSR_DUE_SOON = "dsr_due_soon", "Data subject request nearing its deadline"
    DSR_OVERDUE = "dsr_overdue", "Data subject request overdue"
    AUDIT_CHAIN_BROKEN = "audit_chain_broken", "Audit chain broken"
    BACKUP_STALE = "backup_stale", "Newest backup older than the recovery point objective"
    RETENTION_FAILED = "retention_failed", "Retention job failed"
    EXPORT_VOLUME = "export_volume", "Unusual export volume"
    SOD_CONFLICT = "sod_conflict", "Segregation-of-duties conflict"
    NO_CONSENT = "no_consent", "Processing without consent"


class ViolationSeverity(models.TextChoices):
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class ViolationStatus(models.TextChoices):
    OPEN = "open", "Open"
    RESOLVED = "resolved", "Resolved"
