"""`/api/compliance/reports/*`: signed compliance reports (compliance/reports/).

- `POST /generate` `{"type", "from", "to", "format", "filters"?}`: 202, the report and its job
- `GET /list` (filter by type, status, format, creation time; paginated)
- `GET /{id}`: metadata, manifest, download links
- `GET /{id}/download`: the file (audited as report.downloaded)
- `GET /{id}/manifest`, `GET /{id}/signature`: what `manage.py verify_report` and
  `python -m compliance.reports.verify` check, as files to save beside the report

Every view is a thin caller of compliance/reports/services.py.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, ClassVar

from django.db import transaction
from django.db.models import QuerySet
from django.http import FileResponse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.settings import api_settings

from bridge.api import (
    BridgeViewSet,
    ErrorSerializer,
    JobSerializer,
    audit_context,
    has_body,
)
from bridge.models import Job
from compliance import reports
from compliance.choices import ReportFormat, ReportStatus, ReportType
from compliance.filters import UTCDateTimeFilter
from compliance.models import ComplianceReport
from compliance.reports import verify
from compliance.reports.writers import MEDIA_TYPES

TAGS = ["compliance"]
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)


class StrictDateField(serializers.DateField):
    """A JSON string YYYY-MM-DD only (RFC 3339 full-date, as the schema's `format: date`
    says): DRF's DateField also takes "2026-1-5" and date objects."""

    def to_internal_value(self, value: Any) -> Any:
        if not isinstance(value, str) or not _DATE.fullmatch(value):
            self.fail("invalid", format="YYYY-MM-DD")
        return super().to_internal_value(value)


# --- Responses ------------------------------------------------------------------------------


class ReportJobSerializer(serializers.ModelSerializer):
    percent = serializers.IntegerField(read_only=True, allow_null=True)

    class Meta:
        model = Job
        fields = [
            "id",
            "status",
            "percent",
            "progress_done",
            "progress_total",
            "progress_message",
            "error",
        ]
        read_only_fields = fields


def _link(name: str, report: ComplianceReport, request: Request | None) -> str | None:
    if report.status != ReportStatus.SUCCEEDED:
        return None
    return reverse(name, kwargs={"id": report.pk}, request=request)


class ComplianceReportSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    created_by = serializers.CharField(
        source="created_by.username",
        read_only=True,
        allow_null=True,
        help_text="Who asked for it (null: the system, or a user since deleted).",
    )
    job = ReportJobSerializer(read_only=True, allow_null=True)
    download_url = serializers.SerializerMethodField()
    manifest_url = serializers.SerializerMethodField()
    signature_url = serializers.SerializerMethodField()

    class Meta:
        model = ComplianceReport
        fields = [
            "id",
            "url",
            "type",
            "format",
            "status",
            "period_from",
            "period_to",
            "filters",
            "rows",
            "truncated",
            "size",
            "sha256",
            "key_id",
            "checkpoint_number",
            "error",
            "created_by",
            "created_at",
            "finished_at",
            "job",
            "download_url",
            "manifest_url",
            "signature_url",
        ]
        read_only_fields = fields
        extra_kwargs: ClassVar[dict[str, dict[str, str]]] = {
            "period_from": {"help_text": "Start of the period (UTC, inclusive)."},
            "period_to": {"help_text": "End of the period (UTC, exclusive: the day after 'to')."},
        }

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # "from" is a Python keyword (and no model field): declared here, shown after status.
        dates = {
            "from": serializers.SerializerMethodField(method_name="get_date_from"),
            "to": serializers.SerializerMethodField(method_name="get_date_to"),
        }
        ordered: dict[str, serializers.Field] = {}
        for name, field in fields.items():
            ordered[name] = field
            if name == "status":
                ordered.update(dates)
        return ordered

    @extend_schema_field(OpenApiTypes.DATE)
    def get_date_from(self, report: ComplianceReport) -> str:
        return report.period_from.date().isoformat()

    @extend_schema_field(OpenApiTypes.DATE)
    def get_date_to(self, report: ComplianceReport) -> str:
        """The last day covered, as asked for (the period ends the day after it)."""
        return (report.period_to.date() - timedelta(days=1)).isoformat()

    def get_url(self, report: ComplianceReport) -> str:
        return reverse(
            "compliance-report-detail",
            kwargs={"id": report.pk},
            request=self.context.get("request"),
        )

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_download_url(self, report: ComplianceReport) -> str | None:
        return _link("compliance-report-download", report, self.context.get("request"))

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_manifest_url(self, report: ComplianceReport) -> str | None:
        return _link("compliance-report-manifest", report, self.context.get("request"))

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_signature_url(self, report: ComplianceReport) -> str | None:
        return _link("compliance-report-signature", report, self.context.get("request"))


class ComplianceReportDetailSerializer(ComplianceReportSerializer):
    manifest = serializers.JSONField(
        read_only=True,
        help_text="Parameters, counts, the file's SHA-256, the checkpoint it was checked against.",
    )
    signature = serializers.CharField(
        read_only=True, help_text="Base64 Ed25519 signature of the manifest's canonical JSON."
    )

    class Meta(ComplianceReportSerializer.Meta):
        fields = [*ComplianceReportSerializer.Meta.fields, "manifest", "signature"]
        read_only_fields = fields


class StartedReportSerializer(serializers.Serializer):
    report = ComplianceReportSerializer()
    job = JobSerializer()


# --- Requests -------------------------------------------------------------------------------


class GenerateReportRequest(serializers.Serializer):
    type = serializers.ChoiceField(choices=ReportType.choices, help_text="What the report covers.")
    format = serializers.ChoiceField(choices=ReportFormat.choices)
    filters = serializers.DictField(
        required=False,
        help_text=(
            "Per type: audit_trail {action, actor}; access_review {user, role, active}; "
            "gdpr_requests {status, type}; sox_changes {table, operation}; security_events "
            "{source, action, actor}; backup_evidence {kind, status}. An unknown filter is "
            "refused, naming it."
        ),
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # "from" is a Python keyword: the dates are declared here.
        fields["from"] = StrictDateField(help_text="First day (UTC), YYYY-MM-DD.")
        fields["to"] = StrictDateField(
            help_text="Last day (UTC), YYYY-MM-DD, included whole (up to 23:59:59.999999)."
        )
        return fields


def _body(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    if not has_body(request) or not isinstance(request.data, dict):
        raise ValidationError({"non_field_errors": ["Send a JSON object."]})
    body = serializer_class(data=request.data)
    # A misspelt field must not be read as "left out" (`{"filter": ...}` would report all).
    unknown = sorted(set(request.data) - set(body.fields))
    if unknown:
        raise ValidationError(
            {
                str(name)[:64]: [f"Unknown field: expected one of {', '.join(body.fields)}."]
                for name in unknown[:20]
            }
        )
    body.is_valid(raise_exception=True)
    return body.validated_data


# --- Filters --------------------------------------------------------------------------------


class ComplianceReportFilter(filters.FilterSet):
    type = filters.ChoiceFilter(choices=ReportType.choices)
    status = filters.ChoiceFilter(choices=ReportStatus.choices)
    format = filters.ChoiceFilter(choices=ReportFormat.choices)
    created_after = UTCDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UTCDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = ComplianceReport
        fields = ["type", "status", "format", "created_after", "created_before"]


# --- Views ----------------------------------------------------------------------------------


class _FormatIsAFilter:
    """DRF's settings, less URL_FORMAT_OVERRIDE: here `?format=csv` filters reports by their
    format; DRF would read it as a renderer to answer with, and answer 404 (none is "csv")."""

    URL_FORMAT_OVERRIDE = None

    def __getattr__(self, name: str) -> Any:
        return getattr(api_settings, name)


class ReportContentNegotiation(DefaultContentNegotiation):
    settings = _FormatIsAFilter()


REPORT_ID = OpenApiParameter(
    "id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The report's id."
)
_NOT_READY = {
    409: OpenApiResponse(
        ErrorSerializer,
        description="The report has not succeeded (yet), or its files on disk are not the ones "
        "generated (code report_tampered).",
    )
}
_SIGNED_FILE = inline_serializer(
    "ComplianceReportSignature",
    {
        "format": serializers.CharField(),
        "version": serializers.IntegerField(),
        "algorithm": serializers.CharField(),
        "context": serializers.CharField(),
        "key_id": serializers.CharField(),
        "signature": serializers.CharField(),
        "rotations": serializers.ListField(child=serializers.JSONField()),
    },
)


def _not_ready(report: ComplianceReport) -> Response:
    return Response(
        {
            "detail": f"The report is {report.status}: it has no file"
            + (f" ({report.error})." if report.error else "."),
            "code": "report_not_ready",
        },
        status=status.HTTP_409_CONFLICT,
    )


def _tampered(tampered: Exception) -> Response:
    return Response(
        {"detail": str(tampered), "code": "report_tampered"}, status=status.HTTP_409_CONFLICT
    )


class ComplianceReportViewSet(BridgeViewSet):
    """Compliance reports: generate, list, show, download, and what verifies them."""

    filterset_class = ComplianceReportFilter
    serializer_class = ComplianceReportSerializer
    content_negotiation_class = ReportContentNegotiation
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "generate": ("compliance.generate_report",),
        "list": ("compliance.view_compliancereport",),
        "retrieve": ("compliance.view_compliancereport",),
        "download": ("compliance.view_compliancereport",),
        "manifest": ("compliance.view_compliancereport",),
        "signature": ("compliance.view_compliancereport",),
    }

    def get_queryset(self) -> QuerySet[ComplianceReport]:
        return ComplianceReport.objects.select_related("job", "created_by").order_by(
            "-created_at", "-id"
        )

    def _report(self, report_id: Any) -> ComplianceReport:
        reports.reap_reports()
        found = self.get_queryset().filter(pk=report_id).first()
        if found is None:
            raise NotFound(f"No report {report_id}.")
        return found

    @extend_schema(
        tags=TAGS,
        summary="Generate a signed report (a job: 202 with the report; poll it or its job)",
        request=GenerateReportRequest,
        responses={202: StartedReportSerializer},
    )
    def generate(self, request: Request) -> Response:
        body = _body(request, GenerateReportRequest)
        try:
            report = reports.start_report(
                type=body["type"],
                format=body["format"],
                date_from=body["from"],
                date_to=body["to"],
                filters=body.get("filters") or {},
                context=audit_context(request),
                user=request.user,
            )
        except reports.ReportRefused as refused:
            raise ValidationError({refused.field or "non_field_errors": [str(refused)]}) from None
        report = self.get_queryset().get(pk=report.pk)
        context = {"request": request}
        data = {
            "report": ComplianceReportSerializer(report, context=context).data,
            "job": JobSerializer(report.job, context=context).data,
        }
        response = Response(data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = data["report"]["url"]
        return response

    @extend_schema(tags=TAGS, summary="Compliance reports (newest first)")
    def list(self, request: Request) -> Response:
        reports.reap_reports()
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        data = ComplianceReportSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(
        tags=TAGS,
        summary="A report: status, parameters, manifest, signature and download links",
        parameters=[REPORT_ID],
        responses={200: ComplianceReportDetailSerializer},
    )
    def retrieve(self, request: Request, id: Any) -> Response:
        report = self._report(id)
        return Response(ComplianceReportDetailSerializer(report, context={"request": request}).data)

    @extend_schema(
        tags=TAGS,
        summary="Download the report file (audited); verify it with its manifest and signature",
        parameters=[REPORT_ID],
        filters=False,
        responses={
            (200, MEDIA_TYPES["json"]): OpenApiResponse(
                OpenApiTypes.OBJECT, description="A JSON report, as an attachment."
            ),
            (200, MEDIA_TYPES["csv"]): OpenApiResponse(
                OpenApiTypes.BINARY, description="A CSV report, as an attachment."
            ),
            (200, MEDIA_TYPES["pdf"]): OpenApiResponse(
                OpenApiTypes.BINARY, description="A PDF report, as an attachment."
            ),
            **_NOT_READY,
        },
    )
    def download(self, request: Request, id: Any) -> FileResponse | Response:
        report = self._report(id)
        if report.status != ReportStatus.SUCCEEDED:
            return _not_ready(report)
        path = reports.report_path(report)
        try:
            handle = reports.open_report_file(report)  # FileResponse closes it
        except FileNotFoundError:
            raise NotFound(
                f"The file of report {report.pk} no longer exists (removed by retention?)."
            ) from None
        except reports.ReportTampered as tampered:
            return _tampered(tampered)
        try:
            with transaction.atomic():
                reports.record_download(report=report, context=audit_context(request))
        except BaseException:
            handle.close()
            raise
        return FileResponse(
            handle,
            as_attachment=True,
            filename=path.name,
            content_type=MEDIA_TYPES.get(report.format, "application/octet-stream"),
        )

    def _companion(self, report: ComplianceReport, index: int) -> Response:
        if report.status != ReportStatus.SUCCEEDED:
            return _not_ready(report)
        path = verify.companion_paths(reports.report_path(report))[index]
        try:
            data = reports.read_companion(report, index)
        except FileNotFoundError:
            raise NotFound(f"The {path.name} of report {report.pk} no longer exists.") from None
        except reports.ReportTampered as tampered:
            return _tampered(tampered)
        response = Response(data)
        # Saved under this name beside the report file, the verifiers find it by default.
        response["Content-Disposition"] = f'attachment; filename="{path.name}"'
        return response

    @extend_schema(
        tags=TAGS,
        summary="The report's manifest, exactly as signed (save it as <id>.manifest.json)",
        parameters=[REPORT_ID],
        filters=False,
        responses={200: OpenApiTypes.OBJECT, **_NOT_READY},
    )
    def manifest(self, request: Request, id: Any) -> Response:
        return self._companion(self._report(id), 0)

    @extend_schema(
        tags=TAGS,
        summary="The manifest's detached Ed25519 signature (save it as <id>.sig)",
        parameters=[REPORT_ID],
        filters=False,
        responses={200: _SIGNED_FILE, **_NOT_READY},
    )
    def signature(self, request: Request, id: Any) -> Response:
        return self._companion(self._report(id), 1)
