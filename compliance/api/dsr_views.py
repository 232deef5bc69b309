"""Data-subject request endpoints (compliance/dsr.py), under /api/compliance/gdpr/:

- `POST data-subject-request`: record a request (201, with its due date, history and links)
- `GET data-subject-request`: the queue, by due date; filters status, type, subject_id,
  due_before, due_after, open, overdue
- `GET data-subject-request/{id}`: one request, with its download link once there is one
- `POST data-subject-request/{id}/hold`: wait for proof of identity (the clock pauses)
- `POST data-subject-request/{id}/verify`: identity checked: the work starts as a job (202)
- `POST data-subject-request/{id}/extend`, `.../reject`: what they say, with a reason
- `POST data-subject-request/{id}/retry`: start the work again after its job failed (202)
- `GET data-subject-request/{id}/export`: the ZIP of an access or portability request

With ENABLE_GDPR_COMPLIANCE off, every write answers 503 `gdpr_disabled`: the feature is not
available on this deployment (503, not 404: the address exists and its records stay readable,
since requests already handled are evidence an auditor may still need).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, ClassVar

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q, QuerySet
from django.http import FileResponse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotAcceptable, NotFound, ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse

from bridge.api import (
    BridgeViewSet,
    ErrorSerializer,
    JobSerializer,
    StrictCharField,
    StrictIntegerField,
    StrictRegexField,
    accepted,
    audit_context,
    has_body,
)
from compliance import dsr
from compliance.choices import OPEN_DSR_STATUSES, DsrStatus, DsrType
from compliance.consent import SUBJECT_ID_PATTERN
from compliance.models import DataSubjectRequest
from recovery.filters import StrictBooleanFilter

TAGS = ["gdpr"]
DSR_ID = OpenApiParameter(
    "id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The request's id."
)


class GdprDisabled(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "GDPR compliance is turned off on this deployment (ENABLE_GDPR_COMPLIANCE): data "
        "subject requests cannot be recorded or processed."
    )
    default_code = "gdpr_disabled"


# --- Filters ----------------------------------------------------------------------------------

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


class ISODateField(forms.DateField):
    """YYYY-MM-DD only, as the schema's `format: date` says (Django alone would also take
    10/25/2026 and other local formats)."""

    def to_python(self, value: Any) -> date | None:
        if value in self.empty_values:
            return None
        if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
            raise DjangoValidationError("Enter a date as YYYY-MM-DD.", code="invalid")
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise DjangoValidationError(
                "Enter a real date as YYYY-MM-DD.", code="invalid"
            ) from None


class ISODateFilter(filters.DateFilter):
    field_class = ISODateField


class DataSubjectRequestFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=DsrStatus.choices)
    type = filters.ChoiceFilter(choices=DsrType.choices)
    subject_id = filters.CharFilter(max_length=128, help_text="Exact subject id.")
    due_before = ISODateFilter(
        field_name="due_date", lookup_expr="lte", help_text="Due on or before this day."
    )
    due_after = ISODateFilter(
        field_name="due_date", lookup_expr="gte", help_text="Due on or after this day."
    )
    open = StrictBooleanFilter(
        method="filter_open", help_text="true: received, verifying, in progress or extended."
    )
    overdue = StrictBooleanFilter(
        method="filter_overdue", help_text="true: open and past the due date."
    )

    class Meta:
        model = DataSubjectRequest
        fields = ["status", "type", "subject_id", "due_before", "due_after", "open", "overdue"]

    def filter_open(self, queryset: QuerySet, name: str, value: bool | None) -> QuerySet:
        if value is None:
            return queryset
        match = Q(status__in=OPEN_DSR_STATUSES)
        return queryset.filter(match) if value else queryset.exclude(match)

    def filter_overdue(self, queryset: QuerySet, name: str, value: bool | None) -> QuerySet:
        if value is None:
            return queryset
        match = Q(status__in=OPEN_DSR_STATUSES, due_date__lt=dsr._today())
        return queryset.filter(match) if value else queryset.exclude(match)


# --- Responses --------------------------------------------------------------------------------


class DsrHistoryEntrySerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    status = serializers.ChoiceField(choices=DsrStatus.choices)
    actor = serializers.CharField(help_text='Who made the change ("system" when no person did).')
    note = serializers.CharField(allow_blank=True)


class DsrLinksSerializer(serializers.Serializer):
    """Where to go next: null when the action does not apply in the request's state."""

    self = serializers.URLField()
    export = serializers.URLField(allow_null=True, help_text="The ZIP, once it can be downloaded.")
    hold = serializers.URLField(allow_null=True)
    verify = serializers.URLField(allow_null=True)
    extend = serializers.URLField(allow_null=True)
    reject = serializers.URLField(allow_null=True)
    retry = serializers.URLField(allow_null=True)
    job = serializers.URLField(allow_null=True)


class DsrExportSerializer(serializers.Serializer):
    url = serializers.URLField()
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    expires_at = serializers.DateTimeField()


def _link(name: str, request: DataSubjectRequest, http: Request | None) -> str:
    return reverse(f"dsr-{name}", kwargs={"id": request.pk}, request=http)


class DataSubjectRequestSerializer(serializers.ModelSerializer):
    type = serializers.ChoiceField(choices=DsrType.choices, read_only=True)
    status = serializers.ChoiceField(choices=DsrStatus.choices, read_only=True)
    details = serializers.JSONField(read_only=True)
    result = serializers.JSONField(read_only=True)
    verified_by = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        help_text="Who recorded the identity check.",
    )
    created_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True, help_text="Who recorded it."
    )
    history = DsrHistoryEntrySerializer(many=True, read_only=True)
    overdue = serializers.SerializerMethodField()
    days_left = serializers.SerializerMethodField()
    export = serializers.SerializerMethodField()
    job = JobSerializer(read_only=True, allow_null=True)
    links = serializers.SerializerMethodField()

    class Meta:
        model = DataSubjectRequest
        fields = [
            "id",
            "subject_id",
            "type",
            "status",
            "details",
            "received_at",
            "due_date",
            "days_left",
            "overdue",
            "paused_at",
            "paused_days",
            "verified_at",
            "verified_by",
            "verification_method",
            "extended_at",
            "extension_months",
            "extension_reason",
            "completed_at",
            "rejected_reason",
            "result",
            "export",
            "job",
            "history",
            "created_by",
            "links",
        ]
        read_only_fields = fields

    def _http(self) -> Request | None:
        return self.context.get("request")

    def get_overdue(self, request: DataSubjectRequest) -> bool:
        return request.status in OPEN_DSR_STATUSES and request.due_date < dsr._today()

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_days_left(self, request: DataSubjectRequest) -> int | None:
        """Days until the due date (negative once overdue); null once closed."""
        if request.status not in OPEN_DSR_STATUSES:
            return None
        return (request.due_date - dsr._today()).days

    @extend_schema_field(DsrExportSerializer(allow_null=True))
    def get_export(self, request: DataSubjectRequest) -> dict | None:
        if not dsr.export_available(request):
            return None
        return {
            "url": _link("export", request, self._http()),
            "sha256": request.export_sha256,
            "size": request.export_size,
            "expires_at": dsr.export_expires_at(request),
        }

    @extend_schema_field(DsrLinksSerializer)
    def get_links(self, request: DataSubjectRequest) -> dict[str, str | None]:
        http = self._http()
        state = request.status
        job_final = request.job is None or request.job.is_final
        retry = state in dsr.WORKING and request.job is not None and job_final
        retry = retry and request.job.status != "succeeded"
        allowed = {
            "export": dsr.export_available(request),
            "hold": state == DsrStatus.RECEIVED,
            "verify": state in (DsrStatus.RECEIVED, DsrStatus.VERIFYING),
            "extend": state == DsrStatus.IN_PROGRESS and not request.extension_months,
            "reject": state in OPEN_DSR_STATUSES and job_final,
            "retry": retry,
        }
        links: dict[str, str | None] = {"self": _link("detail", request, http)}
        for name, ok in allowed.items():
            links[name] = _link(name, request, http) if ok else None
        links["job"] = (
            reverse("job-detail", kwargs={"pk": request.job_id}, request=http)
            if request.job_id
            else None
        )
        return links


# --- Requests ---------------------------------------------------------------------------------


class DsrCreateSerializer(serializers.Serializer):
    subject_id = StrictRegexField(
        regex=f"^{SUBJECT_ID_PATTERN}$",
        max_length=128,
        help_text="The data subject: a Bridge user's username, or a customer id or email "
        "(1-128 characters, no control characters, no '/').",
    )
    type = serializers.ChoiceField(choices=DsrType.choices)
    details = serializers.DictField(
        required=False,
        help_text='Free notes (channel, references); rectification: {"corrections": '
        '{"<source>": {"<field>": "<value>"}}}, e.g. {"users": {"last_name": "Smith"}}.',
    )


class DsrVerifySerializer(serializers.Serializer):
    method = StrictCharField(
        max_length=dsr.METHOD_MAX_CHARS,
        help_text="How the identity was checked (e.g. 'signed-in account', 'ID document').",
    )


class DsrReasonSerializer(serializers.Serializer):
    reason = StrictCharField(max_length=dsr.REASON_MAX_CHARS)


class DsrExtendSerializer(DsrReasonSerializer):
    months = StrictIntegerField(
        required=False,
        default=dsr.EXTENSION_MAX_MONTHS,
        min_value=1,
        max_value=dsr.EXTENSION_MAX_MONTHS,
        help_text="Months added to the current due date (default 2, the most Art. 12(3) allows).",
    )


def _body(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    if not has_body(request) or not isinstance(request.data, dict):
        raise ValidationError({"non_field_errors": ["Send a JSON object."]})
    body = serializer_class(data=request.data)
    # A misspelt field is refused rather than read as left out.
    unknown = sorted(set(request.data) - set(body.fields))
    if unknown:
        raise ValidationError(
            {
                name: [f"Unknown field: expected one of {', '.join(body.fields)}."]
                for name in unknown
            }
        )
    body.is_valid(raise_exception=True)
    return body.validated_data


def _refused(refused: dsr.DsrRefused) -> Response:
    if refused.field:
        raise ValidationError({refused.field: [str(refused)]})
    return Response({"detail": str(refused), "code": refused.code}, status=status.HTTP_409_CONFLICT)


class DownloadNegotiation(DefaultContentNegotiation):
    """The export answers a ZIP whatever the client accepts; its refusals are JSON. DRF would
    refuse `Accept: application/zip` with 406 before the view runs, having no renderer for
    it."""

    def select_renderer(self, request: Request, renderers: list, format_suffix: Any = None):  # noqa: ANN201
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except NotAcceptable:
            return renderers[0], renderers[0].media_type


# --- The viewset ------------------------------------------------------------------------------

_CONFLICT = {409: ErrorSerializer}
_VIEW = ("compliance.view_datasubjectrequest",)
_PROCESS = ("compliance.process_datasubjectrequest",)


class DataSubjectRequestViewSet(BridgeViewSet):
    """GDPR data-subject requests: the queue, the workflow, the export download."""

    queryset = DataSubjectRequest.objects.all()
    serializer_class = DataSubjectRequestSerializer
    filterset_class = DataSubjectRequestFilter
    lookup_field = "id"
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": _VIEW,
        "retrieve": _VIEW,
        "export": _VIEW,
        "create": ("compliance.add_datasubjectrequest",),
        "hold": _PROCESS,
        "verify": _PROCESS,
        "extend": _PROCESS,
        "reject": _PROCESS,
        "retry": _PROCESS,
    }
    _WRITES = frozenset({"create", "hold", "verify", "extend", "reject", "retry"})

    def get_queryset(self) -> QuerySet[DataSubjectRequest]:
        return DataSubjectRequest.objects.select_related("job", "verified_by", "created_by")

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        # After authentication and permissions: outsiders learn nothing of the configuration.
        if self.action in self._WRITES and not settings.ENABLE_GDPR_COMPLIANCE:
            raise GdprDisabled()

    def get_content_negotiator(self) -> DefaultContentNegotiation:
        if getattr(self, "action", None) == "export":
            return DownloadNegotiation()
        return super().get_content_negotiator()

    def _request(self, id: Any) -> DataSubjectRequest:
        found = self.get_queryset().filter(pk=id).first()
        if found is None:
            raise NotFound(f"No data subject request {id}.")
        return found

    def _show(self, found: DataSubjectRequest, code: int = status.HTTP_200_OK) -> Response:
        found = self._request(found.pk)
        body = DataSubjectRequestSerializer(found, context={"request": self.request}).data
        return Response(body, status=code)

    @extend_schema(tags=TAGS, summary="Data subject requests, soonest due first")
    def list(self, request: Request) -> Response:
        queryset = self.filter_queryset(self.get_queryset().order_by("due_date", "received_at"))
        page = self.paginate_queryset(queryset)
        data = DataSubjectRequestSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(
        tags=TAGS,
        summary="Record a data subject request (access, rectification, erasure, portability)",
        request=DsrCreateSerializer,
        responses={201: DataSubjectRequestSerializer},
    )
    def create(self, request: Request) -> Response:
        body = _body(request, DsrCreateSerializer)
        try:
            created = dsr.create_request(
                subject_id=body["subject_id"],
                type=body["type"],
                details=body.get("details"),
                context=audit_context(request),
            )
        except dsr.DsrRefused as refused:
            return _refused(refused)
        response = self._show(created, status.HTTP_201_CREATED)
        response["Location"] = _link("detail", created, request)
        return response

    @extend_schema(
        tags=TAGS,
        summary="A data subject request: status, due date, history, download link",
        parameters=[DSR_ID],
    )
    def retrieve(self, request: Request, id: Any) -> Response:
        return self._show(self._request(id))

    @extend_schema(
        tags=TAGS,
        summary="Wait for proof of identity (the deadline's clock pauses)",
        parameters=[DSR_ID],
        request=DsrReasonSerializer,
        responses={200: DataSubjectRequestSerializer, **_CONFLICT},
    )
    def hold(self, request: Request, id: Any) -> Response:
        found = self._request(id)
        body = _body(request, DsrReasonSerializer)
        try:
            changed = dsr.hold_for_verification(
                request=found, reason=body["reason"], context=audit_context(request)
            )
        except dsr.DsrRefused as refused:
            return _refused(refused)
        return self._show(changed)

    @extend_schema(
        tags=TAGS,
        summary="Record the identity check and start the work (a job: poll its Location)",
        parameters=[DSR_ID],
        request=DsrVerifySerializer,
        responses={202: JobSerializer, **_CONFLICT},
    )
    def verify(self, request: Request, id: Any) -> Response:
        found = self._request(id)
        body = _body(request, DsrVerifySerializer)
        try:
            job = dsr.verify_request(
                request=found, method=body["method"], context=audit_context(request)
            )
        except dsr.DsrRefused as refused:
            return _refused(refused)
        return accepted(job, request)

    @extend_schema(
        tags=TAGS,
        summary="Extend the deadline once by up to two months, with a reason (Art. 12(3))",
        parameters=[DSR_ID],
        request=DsrExtendSerializer,
        responses={200: DataSubjectRequestSerializer, **_CONFLICT},
    )
    def extend(self, request: Request, id: Any) -> Response:
        found = self._request(id)
        body = _body(request, DsrExtendSerializer)
        try:
            changed = dsr.extend_request(
                request=found,
                reason=body["reason"],
                months=body["months"],
                context=audit_context(request),
            )
        except dsr.DsrRefused as refused:
            return _refused(refused)
        return self._show(changed)

    @extend_schema(
        tags=TAGS,
        summary="Reject a request, with the reason the subject is told",
        parameters=[DSR_ID],
        request=DsrReasonSerializer,
        responses={200: DataSubjectRequestSerializer, **_CONFLICT},
    )
    def reject(self, request: Request, id: Any) -> Response:
        found = self._request(id)
        body = _body(request, DsrReasonSerializer)
        try:
            changed = dsr.reject_request(
                request=found, reason=body["reason"], context=audit_context(request)
            )
        except dsr.DsrRefused as refused:
            return _refused(refused)
        return self._show(changed)

    @extend_schema(
        tags=TAGS,
        summary="Start the work again after its job failed (a job: poll its Location)",
        parameters=[DSR_ID],
        request=DsrReasonSerializer,
        responses={202: JobSerializer, **_CONFLICT},
    )
    def retry(self, request: Request, id: Any) -> Response:
        found = self._request(id)
        body = _body(request, DsrReasonSerializer)
        try:
            job = dsr.retry_request(
                request=found, reason=body["reason"], context=audit_context(request)
            )
        except dsr.DsrRefused as refused:
            return _refused(refused)
        return accepted(job, request)

    @extend_schema(
        tags=TAGS,
        summary="Download the export (ZIP: JSON and CSV per source, manifest with SHA-256)",
        parameters=[DSR_ID],
        filters=False,
        responses={
            (200, "application/zip"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The export, as an attachment."
            ),
            **_CONFLICT,
        },
    )
    def export(self, request: Request, id: Any) -> FileResponse | Response:
        found = self._request(id)
        try:
            handle = dsr.export_file(request=found, context=audit_context(request))
        except dsr.DsrRefused as refused:
            return _refused(refused)
        return FileResponse(
            handle,
            as_attachment=True,
            filename=f"data-subject-request-{found.pk}.zip",
            content_type="application/zip",
        )
