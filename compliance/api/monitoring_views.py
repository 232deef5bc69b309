"""Monitoring endpoints (compliance/monitoring.py):

- `GET /api/compliance/status`: what is on, the chain, DSRs, violations, retention, reports
- `GET /api/compliance/metrics`: DSRs on time, median days, extensions, consent rates,
  request-logging coverage, the newest verified checkpoint's age, open violations
- `POST /api/compliance/test`: the self-test as a job (202); pass/fail per check in its result
- `GET /api/compliance/violations` (filter by rule, status, severity), `.../violations/{id}`
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import QuerySet
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import BridgeViewSet, JobSerializer, accepted, audit_context, has_body
from compliance import monitoring
from compliance.choices import ViolationRule, ViolationSeverity, ViolationStatus
from compliance.models import ComplianceViolation

# --- Violations ----------------------------------------------------------------------------


class ViolationSerializer(serializers.ModelSerializer):
    class Meta:
        model = ComplianceViolation
        fields = [
            "id",
            "rule",
            "key",
            "severity",
            "status",
            "summary",
            "details",
            "opened_at",
            "last_seen_at",
            "resolved_at",
            "alerted_at",
            "alert_error",
        ]
        read_only_fields = fields


class ViolationFilter(filters.FilterSet):
    rule = filters.ChoiceFilter(choices=ViolationRule.choices)
    status = filters.ChoiceFilter(choices=ViolationStatus.choices)
    severity = filters.ChoiceFilter(choices=ViolationSeverity.choices)

    class Meta:
        model = ComplianceViolation
        fields = ["rule", "status", "severity"]


@extend_schema_view(
    list=extend_schema(tags=["compliance"], summary="Compliance violations, newest first"),
    retrieve=extend_schema(tags=["compliance"], summary="One compliance violation"),
)
class ViolationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, BridgeViewSet):
    """What the monitoring rules found: open while the condition holds, then resolved."""

    serializer_class = ViolationSerializer
    filterset_class = ViolationFilter
    lookup_value_regex = r"[0-9]+"
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_complianceviolation",),
        "retrieve": ("compliance.view_complianceviolation",),
    }

    def get_queryset(self) -> QuerySet[ComplianceViolation]:
        return ComplianceViolation.objects.order_by("-opened_at", "-id")


# --- Status --------------------------------------------------------------------------------


class EnabledSerializer(serializers.Serializer):
    gdpr = serializers.BooleanField(help_text="ENABLE_GDPR_COMPLIANCE")
    sox = serializers.BooleanField(help_text="ENABLE_SOX_COMPLIANCE")
    audit_logging = serializers.BooleanField(help_text="ENABLE_AUDIT_LOGGING (request logging)")


class VerificationBriefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    ok = serializers.BooleanField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    age_seconds = serializers.FloatField(allow_null=True)
    checked = serializers.IntegerField()
    reason = serializers.CharField(allow_blank=True)


class CheckpointBriefSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    seq = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    age_seconds = serializers.FloatField()
    status = serializers.CharField()


class ChainStatusSerializer(serializers.Serializer):
    head_seq = serializers.IntegerField()
    sealed_at = serializers.DateTimeField(allow_null=True)
    unsealed = serializers.IntegerField()
    last_verification = VerificationBriefSerializer(allow_null=True)
    newest_checkpoint = CheckpointBriefSerializer(
        allow_null=True, help_text="The newest checkpoint every sink holds."
    )
    pending_checkpoints = serializers.IntegerField()


class DsrStatusSerializer(serializers.Serializer):
    open = serializers.IntegerField()
    overdue = serializers.IntegerField(help_text="Past the due date (identity checks excluded).")
    due_soon = serializers.IntegerField(help_text="Due within DSR_REMINDER_DAYS.")
    by_status = serializers.DictField(child=serializers.IntegerField())


class ViolationCountsSerializer(serializers.Serializer):
    open = serializers.IntegerField()
    by_severity = serializers.DictField(child=serializers.IntegerField())
    by_rule = serializers.DictField(child=serializers.IntegerField())


class RetentionRunSerializer(serializers.Serializer):
    job_id = serializers.IntegerField()
    status = serializers.CharField()
    finished_at = serializers.DateTimeField(allow_null=True)
    error = serializers.CharField(allow_blank=True)
    result = serializers.JSONField()


class RetentionStatusSerializer(serializers.Serializer):
    dry_run = serializers.BooleanField(help_text="RETENTION_DRY_RUN")
    days = serializers.DictField(child=serializers.IntegerField(), help_text="Per category.")
    active_legal_holds = serializers.IntegerField()
    last_run = RetentionRunSerializer(allow_null=True)


class ReportCountsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    by_status = serializers.DictField(child=serializers.IntegerField())


class ComplianceStatusSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["ok", "warning", "critical"],
        help_text="The most severe open violation's severity; ok when none is open.",
    )
    generated_at = serializers.DateTimeField()
    enabled = EnabledSerializer()
    chain = ChainStatusSerializer()
    dsr = DsrStatusSerializer()
    violations = ViolationCountsSerializer()
    retention = RetentionStatusSerializer()
    reports = ReportCountsSerializer()


# --- Metrics -------------------------------------------------------------------------------


class DsrMetricsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    closed = serializers.IntegerField(help_text="Completed or rejected, with a known time.")
    closed_on_time = serializers.IntegerField(help_text="Answered on or before the due date.")
    closed_late = serializers.IntegerField()
    on_time_rate = serializers.FloatField(allow_null=True)
    median_days_to_close = serializers.FloatField(
        allow_null=True, help_text="From receipt to the answer, in days."
    )
    extensions = serializers.IntegerField()
    extension_rate = serializers.FloatField(allow_null=True)


class ConsentRateSerializer(serializers.Serializer):
    granted = serializers.IntegerField(help_text="Subjects whose latest event grants it.")
    withdrawn = serializers.IntegerField(help_text="Subjects whose latest event withdraws it.")
    rate = serializers.FloatField(allow_null=True, help_text="granted / (granted + withdrawn).")


class CoverageSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(help_text="ENABLE_AUDIT_LOGGING")
    window_seconds = serializers.IntegerField()
    api_requests = serializers.IntegerField(help_text="api.request events in the window.")
    requests_with_activity = serializers.IntegerField(
        help_text="Request ids on service events (requests that did something audited)."
    )
    covered = serializers.IntegerField(help_text="Of those, requests that have a request event.")
    coverage = serializers.FloatField(allow_null=True)


class ComplianceMetricsSerializer(serializers.Serializer):
    generated_at = serializers.DateTimeField()
    dsr = DsrMetricsSerializer()
    consent = serializers.DictField(child=ConsentRateSerializer(), help_text="Per purpose.")
    request_logging = CoverageSerializer()
    newest_verified_checkpoint = CheckpointBriefSerializer(allow_null=True)
    violations = ViolationCountsSerializer()


def refuse_fields(request: Request) -> None:
    """For a POST that takes no fields: nothing, or `{}`. A field sent is refused by name
    rather than silently ignored (the caller meant something by it)."""
    if not has_body(request):
        return
    data = request.data
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": ["Send no body, or {}."]})
    if data:
        raise ValidationError(
            {str(name)[:64]: ["Unknown field: this request takes none."] for name in sorted(data)}
        )


class MonitoringViewSet(BridgeViewSet):
    """Status, metrics and the self-test."""

    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "overview": ("compliance.view_complianceviolation",),
        "metrics": ("compliance.view_complianceviolation",),
        "self_test": ("compliance.run_compliance_test",),
    }

    @extend_schema(
        tags=["compliance"],
        summary="Compliance status: what is on, the audit chain, DSRs, violations, "
        "retention, reports",
        responses={200: ComplianceStatusSerializer},
    )
    def overview(self, request: Request) -> Response:
        return Response(ComplianceStatusSerializer(monitoring.compliance_status()).data)

    @extend_schema(
        tags=["compliance"],
        summary="Compliance metrics: DSRs on time, consent rates, request-logging coverage, "
        "verified checkpoint age, open violations",
        responses={200: ComplianceMetricsSerializer},
    )
    def metrics(self, request: Request) -> Response:
        return Response(ComplianceMetricsSerializer(monitoring.compliance_metrics()).data)

    @extend_schema(
        tags=["compliance"],
        summary="Run the compliance self-test (chain, a synthetic DSR end to end, a signed "
        "report): a job, pass/fail per check in its result",
        request=None,
        responses={202: JobSerializer},
    )
    def self_test(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        refuse_fields(request)
        job = monitoring.start_compliance_test(context=audit_context(request))
        return accepted(job, request)
