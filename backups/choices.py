"""Status and kind values of the backups area (TextChoices, never bare strings)."""

from django.db import models


class BackupKind(models.TextChoices):
    FULL = "full", "Full"
    INCREMENTAL = "incremental", "Incremental"
    POINT_IN_TIME = "point_in_time", "Point in time"


class BackupStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class Component(models.TextChoices):
    DATABASE = "database", "Database"
    REDIS = "redis", "Redis"
    CONFIG = "config", "Configuration"
    UPLOADS = "uploads", "Uploads"


class ComponentState(models.TextChoices):
    DONE = "done", "Backed up"
    SKIPPED = "skipped", "Skipped"
    FAILED = "failed", "Failed"


class CopyStatus(models.TextChoices):
    WRITING = "writing", "Writing"
    COMMITTED = "committed", "Committed"
    FAILED = "failed", "Failed"
    DELETED = "deleted", "Deleted"


class RestoreKind(models.TextChoices):
    RESTORE = "restore", "Restore"
    DRILL = "drill", "Restore drill"


class RestoreStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    REFUSED = "refused", "Refused"


BACKUP_JOB_KIND = "backups.backup"
RESTORE_JOB_KIND = "backups.restore"
DRILL_JOB_KIND = "backups.drill"
