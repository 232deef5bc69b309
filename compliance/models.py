import json
from typing import Any

from django.db import models

from bridge.choices import JobStatus
from bridge.models import Job
from compliance.choices import VERIFY_JOB_KIND, CheckpointStatus


class AuditEvent(models.Model):
    """One tamper-evident audit record.

    Rows are inserted by requests and services (durable before the response) and never
    change; the sealer links each committed event into the hash chain by inserting its
    AuditSeal (`seq`, `prev_hash`, `hash`). On PostgreSQL triggers refuse every UPDATE, DELETE
    and TRUNCATE of both tables.
    """

    occurred_at = models.DateTimeField(db_index=True)
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_username = models.CharField(max_length=150, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.CharField(max_length=100, blank=True)
    method = models.CharField(max_length=10, blank=True)
    path = models.CharField(max_length=500, blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    # Canonical JSON text, not jsonb: the hash covers these exact bytes, and jsonb would
    # reorder keys, rewrite numbers and refuse NUL characters.
    details = models.TextField(default="{}")

    class Meta:
        ordering = ["-id"]
        permissions = [("log_custom_event", "Can record custom audit events")]
        indexes = [
            models.Index(fields=["action", "-id"], name="audit_action_idx"),
            models.Index(fields=["actor_username", "-id"], name="audit_actor_idx"),
            models.Index(fields=["request_id"], name="audit_request_idx"),
            # Forensics ask "what did this address do": the console's IP search uses it.
            models.Index(fields=["client_ip", "-id"], name="audit_ip_idx"),
            # The console's status filter (5xx are rare: without it, counting them scans all).
            models.Index(fields=["status_code", "-id"], name="audit_status_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.id} {self.action} by {self.actor_username or 'anonymous'}"

    @property
    def details_data(self) -> dict:
        return json.loads(self.details or "{}")

    @property
    def link(self) -> "AuditSeal | None":
        try:
            return self.seal
        except AuditSeal.DoesNotExist:
            return None

    @property
    def is_sealed(self) -> bool:
        return self.link is not None

    @property
    def seq(self) -> int | None:
        return self.link.seq if self.link else None

    @property
    def prev_hash(self) -> str | None:
        return self.link.prev_hash if self.link else None

    @property
    def hash(self) -> str | None:
        return self.link.hash if self.link else None


class AuditSeal(models.Model):
    """An event's place in the hash chain: written once by the sealer, in its own table so
    that events are only ever inserted (one write each) and never updated."""

    # No database foreign key: removing a sealed event must stay possible to detect (a gap in
    # the chain), not turn into a constraint error that hides which event went missing.
    event = models.OneToOneField(
        AuditEvent,
        on_delete=models.PROTECT,
        primary_key=True,
        related_name="seal",
        db_constraint=False,
    )
    seq = models.BigIntegerField(unique=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)
    # Which field set `hash` covers (compliance.chain.HASH_VERSIONS); seals keep theirs.
    hash_version = models.PositiveSmallIntegerField(default=1)

    def __str__(self) -> str:
        return f"seal {self.seq} of event {self.event_id}"


class AuditChainHead(models.Model):
    """The single row naming the newest sealed event; the sealer locks it to never fork."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    last_seq = models.BigIntegerField(default=0)
    last_hash = models.CharField(max_length=64)
    last_event_id = models.BigIntegerField(null=True, blank=True)
    sealed_at = models.DateTimeField(null=True, blank=True)
    stragglers_checked_at = models.DateTimeField(null=True, blank=True)
    # Set when sealing was reported lagging (audit.seal_lag), cleared once it caught up.
    lag_reported_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"audit chain head at seq {self.last_seq}"


class VerificationManager(models.Manager):
    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(kind=VERIFY_JOB_KIND)


class AuditVerification(Job):
    """A verification run of the hash chain: a job of its own kind, with its own console
    page and permissions (a proxy, so no table of its own)."""

    objects = VerificationManager()

    class Meta:
        proxy = True
        ordering = ["-id"]
        verbose_name = "audit verification"
        permissions = [
            ("verify_chain", "Can start an audit chain verification"),
            ("cancel_verification", "Can cancel a running audit chain verification"),
        ]

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.kind = VERIFY_JOB_KIND
        super().save(*args, **kwargs)

    @property
    def ok(self) -> bool | None:
        """True intact, False broken, None when the run did not finish."""
        if self.status != JobStatus.SUCCEEDED:
            return None
        return bool(self.result.get("ok"))

    @property
    def checked(self) -> int:
        return int(self.result.get("checked", self.progress_done or 0))

    @property
    def unsealed(self) -> int:
        return int(self.result.get("unsealed", 0))

    @property
    def first_broken_id(self) -> int | None:
        return self.result.get("first_broken_id")

    @property
    def first_broken_seq(self) -> int | None:
        return self.result.get("first_broken_seq")

    @property
    def checkpoint(self) -> int | None:
        return self.result.get("checkpoint")

    @property
    def checkpoints(self) -> int:
        return int(self.result.get("checkpoints", 0))

    @property
    def checkpoint_problems(self) -> list[str]:
        return list(self.result.get("checkpoint_problems", []))

    @property
    def reason(self) -> str:
        return self.result.get("reason", "") or self.error

    @property
    def source(self) -> str:
        return self.params.get("source", "")


class AuditCheckpoint(models.Model):
    """A signed statement of the chain's state (seq, hash, hashes at waypoints), kept in the
    checkpoint sinks outside the database; this row is Bridge's own copy and its publishing
    state. Verification trusts the sinks' copies, never this row alone: an insider can write
    here."""

    number = models.PositiveBigIntegerField(unique=True)
    seq = models.BigIntegerField()
    hash = models.CharField(max_length=64)
    created_at = models.DateTimeField()
    key_id = models.CharField(max_length=40)
    signature = models.CharField(max_length=100)
    # The record exactly as signed and written to the sinks (canonical JSON).
    record = models.TextField()
    status = models.CharField(
        max_length=16, choices=CheckpointStatus.choices, default=CheckpointStatus.PENDING
    )
    sinks_written = models.JSONField(default=list, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]

    def __str__(self) -> str:
        return f"checkpoint #{self.number} at seq {self.seq}"

    @property
    def record_data(self) -> dict:
        return json.loads(self.record)
