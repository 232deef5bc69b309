from rest_framework import serializers

from compliance.models import AuditEvent


class AuditEventSerializer(serializers.ModelSerializer):
    details = serializers.JSONField(source="details_data", read_only=True)
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
