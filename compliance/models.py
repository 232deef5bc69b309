import json

from django.db import models

from compliance.choices import VerificationSource, VerificationStatus


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

    def __str__(self) -> str:
        return f"audit chain head at seq {self.last_seq}"


class AuditVerification(models.Model):
    """One run of the chain verification, from the API, the CLI, the admin or the schedule."""

    status = models.CharField(
        max_length=16, choices=VerificationStatus.choices, default=VerificationStatus.RUNNING
    )
    source = models.CharField(max_length=16, choices=VerificationSource.choices)
    requested_by = models.CharField(max_length=150, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    checked = models.BigIntegerField(default=0)
    total = models.BigIntegerField(default=0, help_text="Sealed events to check.")
    unsealed = models.BigIntegerField(default=0)
    first_broken_id = models.BigIntegerField(null=True, blank=True)
    reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"verification {self.id}: {self.status}"

    @property
    def percent(self) -> int:
        if self.status != "running":
            return 100
        return min(100, int(100 * self.checked / self.total)) if self.total else 0
