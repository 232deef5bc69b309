from __future__ import annotations

from django.conf import settings
from django.db import models

from bridge.choices import FINAL_JOB_STATUSES, JobStatus


class Job(models.Model):
    """One background run (after NetBox's core.Job): what, who, how far, and how it ended.

    Every long operation of every area is a row here, so the console, the API and the reaper
    see all of them the same way. `kind` names the registered job (bridge.jobs.JobKind) that
    says who may see it and whether it can be cancelled. State changes are compare-and-swap
    updates from one status to the next, so two workers can never both run a job and a
    cancel can never be overwritten by a late progress report.
    """

    kind = models.CharField(max_length=64, db_index=True)
    status = models.CharField(
        max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING, db_index=True
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_username = models.CharField(max_length=150, blank=True)
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(null=True, blank=True)
    progress_message = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    task_id = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["kind", "status", "-id"], name="job_kind_status_idx"),
            # The reaper's question: running jobs with an old heartbeat.
            models.Index(fields=["status", "heartbeat_at"], name="job_heartbeat_idx"),
        ]

    def __str__(self) -> str:
        return f"job {self.pk} {self.kind}: {self.status}"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_JOB_STATUSES

    @property
    def percent(self) -> int | None:
        """0-100, or None while the total is unknown; a succeeded job is at 100."""
        if self.status == JobStatus.SUCCEEDED:
            return 100
        if not self.progress_total:
            return None
        return max(0, min(100, int(100 * self.progress_done / self.progress_total)))

    @property
    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        from django.utils import timezone

        end = self.finished_at or timezone.now()
        return round((end - self.started_at).total_seconds(), 3)
