"""The backup catalog: backups, their artifacts and copies, restores and drills, archived WAL.

The catalog says what exists and where; the artifacts themselves are self-describing (each
carries its wrapped data key and its manifest), so Bridge's own database can be rebuilt from a
target directory and the master key when the catalog itself is what was lost.
"""

from __future__ import annotations

import uuid

from django.db import models

from backups.choices import (
    BackupKind,
    BackupStatus,
    CopyStatus,
    RestoreKind,
    RestoreStatus,
)


class Backup(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=BackupKind.choices, db_index=True)
    status = models.CharField(
        max_length=16, choices=BackupStatus.choices, default=BackupStatus.PENDING, db_index=True
    )
    # The Component values asked for; what became of each is in `manifest`.
    components = models.JSONField(default=list)
    # An incremental's base; PROTECT: a backup others depend on cannot be deleted.
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    label = models.CharField(max_length=200, blank=True)
    job = models.ForeignKey(
        "bridge.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.CharField(max_length=150, blank=True)
    raw_bytes = models.BigIntegerField(default=0, help_text="Bytes read from the sources.")
    stored_bytes = models.BigIntegerField(default=0, help_text="Bytes of one copy, as stored.")
    # Per component: state (done/skipped/failed), reason, engine facts, row counts, files...
    manifest = models.JSONField(default=dict, blank=True)
    # The per-backup data key, wrapped under the master key (security.crypto.wrap); the same
    # wrapping is in each artifact's header. Re-wrapped by security's rotate_keys.
    key_id = models.CharField(max_length=64, blank=True)
    master_key_id = models.CharField(max_length=64, blank=True)
    wrapped_key = models.TextField(blank=True)
    # The 3-2-1 rule as checked when the backup finished: copies, media, offsite, problems.
    rule_321 = models.JSONField(default=dict, blank=True)
    rule_321_ok = models.BooleanField(default=False)
    # Point in time: the restore point's name and where it is in the WAL.
    restore_point = models.CharField(max_length=64, blank=True)
    wal_lsn = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [
            ("run_backup", "Start backups"),
            ("restore_backup", "Restore backups"),
            ("verify_backup", "Verify backups and run restore drills"),
            ("cleanup_backups", "Apply the retention policy"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} backup {str(self.id)[:8]} ({self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if not (self.started_at and self.finished_at):
            return None
        return (self.finished_at - self.started_at).total_seconds()


class Artifact(models.Model):
    """One stream of a backup (a dump, a snapshot, an archive of files), stored on every target."""

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="artifacts")
    component = models.CharField(max_length=16)
    name = models.CharField(max_length=200)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    chunks = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["backup", "name"], name="backup_artifact_unique")
        ]

    def __str__(self) -> str:
        return self.name


class BackupCopy(models.Model):
    """One artifact on one target: where, its checksum, when it was last read back and matched."""

    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="copies")
    target = models.CharField(max_length=64)
    media = models.CharField(max_length=32)
    offsite = models.BooleanField(default=False)
    location = models.CharField(max_length=500)
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    status = models.CharField(
        max_length=16, choices=CopyStatus.choices, default=CopyStatus.WRITING, db_index=True
    )
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    verified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "backup copies"

    def __str__(self) -> str:
        return f"{self.location} on {self.target}"


class RestoreJob(models.Model):
    """A restore or a restore drill, on the shared job rows (progress, heartbeat, reaper)."""

    # Restores and drills outlive the backup (retention deletes backups; the record that a
    # restore or drill happened is evidence): the id stays in `backup_ref`.
    backup = models.ForeignKey(
        Backup, null=True, blank=True, on_delete=models.SET_NULL, related_name="restores"
    )
    backup_ref = models.CharField(max_length=36, blank=True)
    kind = models.CharField(max_length=16, choices=RestoreKind.choices, db_index=True)
    status = models.CharField(
        max_length=16, choices=RestoreStatus.choices, default=RestoreStatus.PENDING, db_index=True
    )
    job = models.ForeignKey(
        "bridge.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    components = models.JSONField(default=list)
    target_time = models.DateTimeField(null=True, blank=True)
    dry_run = models.BooleanField(default=False)
    safety_backup = models.ForeignKey(
        Backup, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.CharField(max_length=150, blank=True)
    # Per component: what was restored where, comparisons (drills), the plan (dry runs).
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    rto_seconds = models.FloatField(null=True, blank=True, help_text="Measured restore time.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} {self.pk} of {str(self.backup_id)[:8]} ({self.status})"


class WalSegment(models.Model):
    """A WAL file stored by `manage.py archive_wal` (PostgreSQL's archive_command)."""

    name = models.CharField(max_length=64)
    system_identifier = models.CharField(max_length=32, blank=True)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    # [{"target", "location", "sha256"}] for every target it was verified on.
    copies = models.JSONField(default=list)
    key_id = models.CharField(max_length=64, blank=True)
    master_key_id = models.CharField(max_length=64, blank=True)
    wrapped_key = models.TextField(blank=True)
    archived_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["system_identifier", "name"], name="wal_segment_unique")
        ]

    def __str__(self) -> str:
        return self.name
