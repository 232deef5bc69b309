from datetime import UTC, datetime

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from bridge.api import StrictCharField, StrictRegexField
from compliance.models import AuditCheckpoint, AuditEvent, AuditVerification
from compliance.personal import Revealed, Revealer


def _personal_state(event: AuditEvent, shown: Revealed) -> str:
    if shown.problem:
        return "unreadable"
    if shown.erased:
        return "erased"
    return "sealed" if event.personal else "plain"


class AuditEventSerializer(serializers.ModelSerializer):
    # The actor, client IP and details as revealed: hash version 2 seals them under the data
    # subject's key, and they read "[erased]" (actor) / null (IP) once that key is destroyed.
    actor_username = serializers.SerializerMethodField(
        help_text='Username of the actor ("" anonymous, "[erased]" once the subject is erased).'
    )
    client_ip = serializers.SerializerMethodField(
        help_text="Client IP address (null when unknown or erased)."
    )
    details = serializers.SerializerMethodField()
    personal_data = serializers.SerializerMethodField(
        help_text=(
            "plain: recorded in clear (hash version 1, or anonymous); sealed: the actor, client "
            "IP and personal details are encrypted under the data subject's key and shown "
            'decrypted; erased: that key was destroyed, the actor reads "[erased]"; '
            "unreadable: the sealed data was altered or its key is missing."
        )
    )
    seq = serializers.IntegerField(read_only=True, allow_null=True)
    prev_hash = serializers.CharField(read_only=True, allow_null=True)
    hash = serializers.CharField(read_only=True, allow_null=True)
    sealed = serializers.BooleanField(source="is_sealed", read_only=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "seq",
            "occurred_at",
            "actor_id",
            "actor_username",
            "client_ip",
            "request_id",
            "action",
            "object_type",
            "object_id",
            "method",
            "path",
            "status_code",
            "latency_ms",
            "details",
            "personal_data",
            "prev_hash",
            "hash",
            "sealed",
        ]
        read_only_fields = fields

    def _shown(self, event: AuditEvent) -> Revealed:
        # Once per event, with one Revealer per serializer: a page's events unwrap each
        # subject key once.
        shown = getattr(event, "_revealed", None)
        if shown is None:
            revealer = getattr(self, "_revealer", None)
            if revealer is None:
                revealer = self._revealer = Revealer()
            shown = event._revealed = revealer.event(event)
        return shown

    @extend_schema_field(OpenApiTypes.STR)
    def get_actor_username(self, event: AuditEvent) -> str:
        return self._shown(event).actor_username

    @extend_schema_field(serializers.IPAddressField(allow_null=True))
    def get_client_ip(self, event: AuditEvent) -> str | None:
        return self._shown(event).client_ip

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_details(self, event: AuditEvent) -> dict:
        return self._shown(event).details

    @extend_schema_field(
        serializers.ChoiceField(choices=["plain", "sealed", "erased", "unreadable"])
    )
    def get_personal_data(self, event: AuditEvent) -> str:
        return _personal_state(event, self._shown(event))

    def to_representation(self, event: AuditEvent) -> dict:
        # Same output as the declared fields, built directly: this list is the busiest read
        # endpoint, and DRF's per-field machinery was most of its CPU time.
        link = event.link
        shown = self._shown(event)
        return {
            "id": event.id,
            "seq": link.seq if link else None,
            "occurred_at": _iso(event.occurred_at),
            "actor_id": event.actor_id,
            "actor_username": shown.actor_username,
            "client_ip": shown.client_ip,
            "request_id": event.request_id,
            "action": event.action,
            "object_type": event.object_type,
            "object_id": event.object_id,
            "method": event.method,
            "path": event.path,
            "status_code": event.status_code,
            "latency_ms": event.latency_ms,
            "details": shown.details,
            "personal_data": _personal_state(event, shown),
            "prev_hash": link.prev_hash if link else None,
            "hash": link.hash if link else None,
            "sealed": link is not None,
        }


def _iso(moment: datetime) -> str:
    # DRF's DateTimeField rendering of an aware UTC time: ISO 8601 with a Z.
    text = moment.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class AuditLogRequestSerializer(serializers.Serializer):
    action = StrictRegexField(
        r"^[a-z0-9][a-z0-9_.-]{0,49}$",
        help_text="Name of the event; stored as custom.<action>.",
        error_messages={"invalid": "Use 1-50 lowercase letters, digits, '.', '_' or '-'."},
    )
    object_type = StrictCharField(max_length=100, required=False, default="")
    object_id = StrictCharField(max_length=100, required=False, default="")
    details = serializers.DictField(required=False, default=dict)


class VerificationSerializer(serializers.Serializer):
    """A verification run: its outcome and how old it is."""

    verification_id = serializers.IntegerField(source="pk", help_text="The run's job id.")
    status = serializers.CharField(help_text="The job's status: succeeded, failed, running...")
    ok = serializers.BooleanField(
        allow_null=True, help_text="true intact, false broken, null if the run did not finish."
    )
    checked = serializers.IntegerField(help_text="Sealed events whose hash and link were checked.")
    first_broken_id = serializers.IntegerField(allow_null=True)
    first_broken_seq = serializers.IntegerField(
        allow_null=True, help_text="The first seq found wrong (also for events that are gone)."
    )
    checkpoint = serializers.IntegerField(
        allow_null=True, help_text="The signed checkpoint that proves the damage, if one does."
    )
    checkpoints = serializers.IntegerField(
        help_text="Signed checkpoints read from the sinks and held against the chain."
    )
    checkpoint_problems = serializers.ListField(
        child=serializers.CharField(), help_text="What is wrong with the checkpoints, if anything."
    )
    unsealed = serializers.IntegerField(help_text="Recorded events the sealer had not linked yet.")
    reason = serializers.CharField(allow_blank=True)
    source = serializers.CharField(allow_blank=True)
    requested_by = serializers.CharField(source="actor_username", allow_blank=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    age_seconds = serializers.SerializerMethodField(
        help_text="Seconds since the run finished (null while it runs)."
    )

    def get_age_seconds(self, run: AuditVerification) -> float | None:
        if run.finished_at is None:
            return None
        now = self.context.get("now") or timezone.now()
        return round((now - run.finished_at).total_seconds(), 3)


class CheckpointSerializer(serializers.ModelSerializer):
    """A signed checkpoint, Bridge's copy, and whether every sink holds it."""

    record = serializers.JSONField(
        source="record_data", help_text="The record exactly as signed and written to the sinks."
    )

    class Meta:
        model = AuditCheckpoint
        fields = [
            "number",
            "seq",
            "hash",
            "created_at",
            "key_id",
            "signature",
            "status",
            "sinks_written",
            "attempts",
            "last_error",
            "published_at",
            "record",
        ]
        read_only_fields = fields


class SigningKeySerializer(serializers.Serializer):
    key_id = serializers.CharField()
    public_key = serializers.CharField(help_text="Base64 of the 32 raw Ed25519 public key bytes.")
    public_key_pem = serializers.CharField()
    created_at = serializers.DateTimeField()
    retired_at = serializers.DateTimeField(allow_null=True)
    current = serializers.BooleanField()


class PublicKeySerializer(serializers.Serializer):
    """The key checkpoints are signed with now, every earlier one, and the rotation records
    (each signed by the old and the new key) that link them."""

    algorithm = serializers.CharField()
    key_id = serializers.CharField()
    public_key = serializers.CharField(help_text="Base64 of the 32 raw Ed25519 public key bytes.")
    public_key_pem = serializers.CharField(
        help_text="Give this file to `python -m compliance.verify_export --public-key`."
    )
    keys = SigningKeySerializer(many=True)
    rotations = serializers.ListField(child=serializers.DictField())
