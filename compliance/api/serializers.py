from datetime import UTC, datetime

from rest_framework import serializers

from compliance.models import AuditEvent


class AuditEventSerializer(serializers.ModelSerializer):
    details = serializers.JSONField(source="details_data", read_only=True)
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
            "prev_hash",
            "hash",
            "sealed",
        ]
        read_only_fields = fields

    def to_representation(self, event: AuditEvent) -> dict:
        # Same output as the declared fields, built directly: this list is the busiest read
        # endpoint, and DRF's per-field machinery was most of its CPU time.
        link = event.link
        return {
            "id": event.id,
            "seq": link.seq if link else None,
            "occurred_at": _iso(event.occurred_at),
            "actor_id": event.actor_id,
            "actor_username": event.actor_username,
            "client_ip": event.client_ip,
            "request_id": event.request_id,
            "action": event.action,
            "object_type": event.object_type,
            "object_id": event.object_id,
            "method": event.method,
            "path": event.path,
            "status_code": event.status_code,
            "latency_ms": event.latency_ms,
            "details": event.details_data,
            "prev_hash": link.prev_hash if link else None,
            "hash": link.hash if link else None,
            "sealed": link is not None,
        }


def _iso(moment: datetime) -> str:
    # DRF's DateTimeField rendering of an aware UTC time: ISO 8601 with a Z.
    text = moment.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class AuditLogRequestSerializer(serializers.Serializer):
    action = serializers.RegexField(
        r"^[a-z0-9][a-z0-9_.-]{0,49}$",
        help_text="Name of the event; stored as custom.<action>.",
        error_messages={"invalid": "Use 1-50 lowercase letters, digits, '.', '_' or '-'."},
    )
    object_type = serializers.CharField(max_length=100, required=False, default="")
    object_id = serializers.CharField(max_length=100, required=False, default="")
    details = serializers.DictField(required=False, default=dict)


class AuditEventFilterSerializer(serializers.Serializer):
    actor = serializers.CharField(max_length=150, required=False, help_text="Exact username.")
    action = serializers.CharField(max_length=64, required=False, help_text="Exact action.")
    to = serializers.DateTimeField(required=False, help_text="Events before this time.")

    def get_fields(self) -> dict:
        fields = super().get_fields()
        # `from` is a Python keyword, so it cannot be a class attribute.
        fields["from"] = serializers.DateTimeField(
            required=False, help_text="Events at or after this time."
        )
        return fields

    def validate(self, attrs: dict) -> dict:
        start, end = attrs.get("from"), attrs.get("to")
        if start and end and start > end:
            raise serializers.ValidationError({"to": "Must not be earlier than 'from'."})
        return attrs


class VerifyResultSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    checked = serializers.IntegerField(help_text="Sealed events whose hash and link were checked.")
    first_broken_id = serializers.IntegerField(allow_null=True)
    unsealed = serializers.IntegerField(help_text="Recorded events the sealer has not linked yet.")
    reason = serializers.CharField(allow_blank=True)
    verification_id = serializers.IntegerField()
