import json
import uuid
from typing import Any

from django.conf import settings
from django.db import models

from bridge.choices import JobStatus
from bridge.models import Job
from compliance.choices import (
    VERIFY_JOB_KIND,
    ApprovalAction,
    ApprovalStatus,
    CheckpointStatus,
    ConsentMethod,
    DsrStatus,
    DsrType,
    ReportFormat,
    ReportStatus,
    ReportType,
    SoxOperation,
    ViolationRule,
    ViolationSeverity,
    ViolationStatus,
)


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
    # Hash version 2 (issue 11): the personal data of an event (actor username, client IP,
    # personal detail keys) sealed under the data subject's key; the chain hashes this
    # ciphertext, so destroying the key erases the data and leaves the chain intact. Blank on
    # version 1 events, which keep those values in the plain columns above.
    personal = models.TextField(blank=True, default="", db_default="")
    # Keyed blind indexes so exact search still works on sealed personal data. Database
    # defaults: events are inserted by raw SQL naming only the columns each writer knows.
    actor_index = models.CharField(max_length=64, blank=True, default="", db_default="")
    ip_index = models.CharField(max_length=64, blank=True, default="", db_default="")

    class Meta:
        ordering = ["-id"]
        permissions = [
            ("log_custom_event", "Can record custom audit events"),
            ("purge_auditevent", "Can purge sealed audit events past retention"),
        ]
        indexes = [
            models.Index(fields=["action", "-id"], name="audit_action_idx"),
            models.Index(fields=["actor_username", "-id"], name="audit_actor_idx"),
            models.Index(fields=["request_id"], name="audit_request_idx"),
            # Forensics ask "what did this address do": the console's IP search uses it.
            models.Index(fields=["client_ip", "-id"], name="audit_ip_idx"),
            # The console's status filter (5xx are rare: without it, counting them scans all).
            models.Index(fields=["status_code", "-id"], name="audit_status_idx"),
            models.Index(fields=["actor_index", "-id"], name="audit_actor_index_idx"),
            models.Index(fields=["ip_index", "-id"], name="audit_ip_index_idx"),
        ]

    def __str__(self) -> str:
        if self.actor_username:
            return f"#{self.id} {self.action} by {self.actor_username}"
        # Version 2 seals an authenticated actor's name in `personal`; only the id is plain.
        who = f"user #{self.actor_id}" if self.actor_id is not None else "anonymous"
        return f"#{self.id} {self.action} by {who}"

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


# --- Issue 11: GDPR, consent, SOX, retention, reports, monitoring ---------------------------

_USER = settings.AUTH_USER_MODEL


class DataSubjectRequest(models.Model):
    """A GDPR data-subject request and its deadline (Art. 12(3): one calendar month after
    receipt, up to two more on extension; the clock pauses while identity is being verified).

    Status changes are compare-and-swap updates; every change appends to `history` and records
    one audit event (compliance/dsr.py).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    subject_id = models.CharField(max_length=128, db_index=True)
    type = models.CharField(max_length=16, choices=DsrType.choices)
    status = models.CharField(
        max_length=16, choices=DsrStatus.choices, default=DsrStatus.RECEIVED, db_index=True
    )
    # What the subject asked for: rectification corrections, the channel it came by, notes.
    details = models.JSONField(default=dict, blank=True)
    received_at = models.DateTimeField(db_index=True)
    # The last day to answer (inclusive, UTC); moves with pauses and the extension.
    due_date = models.DateField(db_index=True)
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_days = models.PositiveIntegerField(default=0)
    verified_at = models.DateTimeField(null=True, blank=True)
    verified_by = models.ForeignKey(
        _USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    verification_method = models.CharField(max_length=200, blank=True)
    extended_at = models.DateTimeField(null=True, blank=True)
    extension_reason = models.TextField(blank=True)
    extension_months = models.PositiveSmallIntegerField(default=0)
    completed_at = models.DateTimeField(null=True, blank=True)
    rejected_reason = models.TextField(blank=True)
    reminded_at = models.DateTimeField(null=True, blank=True)
    job = models.ForeignKey(
        "bridge.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Counts per registry source, and for access/portability the export's name, size, SHA-256.
    result = models.JSONField(default=dict, blank=True)
    export_path = models.CharField(max_length=500, blank=True)
    export_sha256 = models.CharField(max_length=64, blank=True)
    export_size = models.BigIntegerField(null=True, blank=True)
    history = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(
        _USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["due_date", "received_at"]
        verbose_name = "data subject request"
        permissions = [
            ("process_datasubjectrequest", "Can verify, extend, reject and process DSRs")
        ]

    def __str__(self) -> str:
        return f"{self.type} request {str(self.id)[:8]} ({self.status})"


class ErasureRecord(models.Model):
    """A subject erased: kept (outside what a restore overwrites) so the erasure is applied
    again after any backup restore. The subject id is the minimum needed to find the data
    again (a suppression list, GDPR Recital 66 practice)."""

    subject_id = models.CharField(max_length=128, db_index=True)
    request = models.ForeignKey(
        DataSubjectRequest, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    erased_at = models.DateTimeField()
    # Per registry source: rows deleted or anonymised, and keys destroyed.
    counts = models.JSONField(default=dict, blank=True)
    reapplied_at = models.DateTimeField(null=True, blank=True)
    reapplied_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-erased_at"]

    def __str__(self) -> str:
        return f"erasure of {self.subject_id} at {self.erased_at:%Y-%m-%d}"


class PrivacyNotice(models.Model):
    """A version of the privacy notice consent was given against; its SHA-256 is recorded
    with each consent event, so what the subject saw can be proven later."""

    version = models.CharField(max_length=40, unique=True)
    text = models.TextField()
    sha256 = models.CharField(max_length=64)
    published_at = models.DateTimeField()

    class Meta:
        ordering = ["-published_at"]

    def __str__(self) -> str:
        return f"notice {self.version}"


class ConsentEvent(models.Model):
    """One grant or withdrawal of consent for one purpose (append-only; the current state per
    purpose is a projection of these, compliance/consent.py)."""

    id = models.BigAutoField(primary_key=True)
    subject_id = models.CharField(max_length=128)
    purpose = models.CharField(max_length=64)
    granted = models.BooleanField()
    notice_version = models.CharField(max_length=40)
    notice_sha256 = models.CharField(max_length=64)
    method = models.CharField(max_length=16, choices=ConsentMethod.choices)
    channel = models.CharField(max_length=64, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    actor_id = models.BigIntegerField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    occurred_at = models.DateTimeField()

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["subject_id", "purpose", "-id"], name="consent_subject_idx"),
            models.Index(fields=["purpose", "-id"], name="consent_purpose_idx"),
        ]
        permissions = [("record_consent", "Can record consent for a data subject")]

    def __str__(self) -> str:
        return f"{self.subject_id} {'granted' if self.granted else 'withdrew'} {self.purpose}"


class SoxChange(models.Model):
    """A before/after record of one row change in a SOX-audited table, written by a database
    trigger (compliance/sox.py), so bulk and raw updates are caught too. Append-only."""

    id = models.BigAutoField(primary_key=True)
    occurred_at = models.DateTimeField(db_index=True)
    table_name = models.CharField(max_length=100)
    model = models.CharField(max_length=100, blank=True)
    object_pk = models.CharField(max_length=100, blank=True)
    operation = models.CharField(max_length=8, choices=SoxOperation.choices)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    changed_fields = models.JSONField(default=list, blank=True)
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_username = models.CharField(max_length=150, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    reason = models.TextField(blank=True)
    transaction_id = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["table_name", "-id"], name="sox_table_idx")]

    def __str__(self) -> str:
        return f"{self.operation} {self.table_name} {self.object_pk}"


class ApprovalRequest(models.Model):
    """Segregation of duties: an action that needs a second authorised person (with SOX on).
    The requester can never approve their own request; the approval carries the action out."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    action = models.CharField(max_length=40, choices=ApprovalAction.choices, db_index=True)
    params = models.JSONField(default=dict, blank=True)
    reason = models.TextField()
    status = models.CharField(
        max_length=16, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING, db_index=True
    )
    requested_by = models.ForeignKey(_USER, null=True, on_delete=models.SET_NULL, related_name="+")
    requested_by_username = models.CharField(max_length=150, blank=True)
    requested_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    decided_by = models.ForeignKey(
        _USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_by_username = models.CharField(max_length=150, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.TextField(blank=True)
    # What carrying it out produced (restore id, job id) or why it failed.
    result = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-requested_at"]
        permissions = [
            ("decide_approvalrequest", "Can approve or reject a second-approval request")
        ]

    def __str__(self) -> str:
        return f"{self.action} by {self.requested_by_username} ({self.status})"


class LegalHold(models.Model):
    """Blocks purging of the named categories (optionally one subject, optionally a time
    range) until released."""

    name = models.CharField(max_length=200)
    reason = models.TextField()
    categories = models.JSONField(default=list)  # RetentionCategory values
    subject_id = models.CharField(max_length=128, blank=True)
    covers_from = models.DateTimeField(null=True, blank=True)
    covers_to = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(_USER, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField()
    released_at = models.DateTimeField(null=True, blank=True)
    released_by = models.ForeignKey(
        _USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at"]
        permissions = [("release_legalhold", "Can release a legal hold")]

    def __str__(self) -> str:
        return self.name

    @property
    def active(self) -> bool:
        return self.released_at is None


class AuditPurge(models.Model):
    """A range of sealed audit events removed by retention: seqs first_seq..last_seq, cut at
    a signed checkpoint (its number and the hash it signs at last_seq), so verification can
    start from there."""

    first_seq = models.BigIntegerField()
    last_seq = models.BigIntegerField(unique=True)
    events = models.BigIntegerField()
    checkpoint_number = models.PositiveBigIntegerField()
    anchor_hash = models.CharField(max_length=64)
    newest_purged_at = models.DateTimeField()
    purged_at = models.DateTimeField()
    job = models.ForeignKey(
        "bridge.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Ed25519 over the purge's statement (compliance.retention.purge_statement) by the audit
    # signing key, made by the purge itself: a row an insider writes has no valid one.
    key_id = models.CharField(max_length=40, blank=True)
    signature = models.TextField(blank=True)

    class Meta:
        ordering = ["-last_seq"]

    def __str__(self) -> str:
        return f"purge of seq {self.first_seq}..{self.last_seq}"


class ComplianceReport(models.Model):
    """A generated report: a file, its manifest and a detached Ed25519 signature."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    type = models.CharField(max_length=24, choices=ReportType.choices, db_index=True)
    format = models.CharField(max_length=8, choices=ReportFormat.choices)
    status = models.CharField(
        max_length=16, choices=ReportStatus.choices, default=ReportStatus.PENDING, db_index=True
    )
    period_from = models.DateTimeField()
    period_to = models.DateTimeField()  # exclusive: the day after the last day asked for
    filters = models.JSONField(default=dict, blank=True)
    job = models.ForeignKey(
        "bridge.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    file_path = models.CharField(max_length=500, blank=True)
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    rows = models.BigIntegerField(null=True, blank=True)
    truncated = models.BooleanField(default=False)
    manifest = models.JSONField(default=dict, blank=True)
    signature = models.TextField(blank=True)
    key_id = models.CharField(max_length=40, blank=True)
    checkpoint_number = models.PositiveBigIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        _USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("generate_report", "Can generate compliance reports")]

    def __str__(self) -> str:
        return f"{self.type} report {str(self.id)[:8]} ({self.status})"


class ComplianceViolation(models.Model):
    """A monitoring rule's finding: open while its condition holds, resolved when it clears.
    At most one open row per (rule, key)."""

    rule = models.CharField(max_length=24, choices=ViolationRule.choices, db_index=True)
    # What it is about within the rule (a DSR id, a user, a backup...); "" for global rules.
    key = models.CharField(max_length=200, blank=True)
    severity = models.CharField(max_length=10, choices=ViolationSeverity.choices)
    status = models.CharField(
        max_length=10, choices=ViolationStatus.choices, default=ViolationStatus.OPEN, db_index=True
    )
    summary = models.CharField(max_length=300)
    details = models.JSONField(default=dict, blank=True)
    opened_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    alerted_at = models.DateTimeField(null=True, blank=True)
    alert_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-opened_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "key"],
                condition=models.Q(status="open"),
                name="one_open_violation_per_rule_key",
            )
        ]
        permissions = [("run_compliance_test", "Can run the compliance self-test")]

    def __str__(self) -> str:
        return f"{self.rule} {self.key} ({self.status})"
