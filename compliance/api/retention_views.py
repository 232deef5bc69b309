"""`/api/compliance/retention/*`: legal holds, the retention plan, retention runs, purges.

- `GET, POST /legal-holds`, `GET /legal-holds/{id}`, `POST /legal-holds/{id}/release`
- `GET /plan`: what a run would remove now, per category, and the holds that block it
- `POST /run` `{"dry_run": bool}`: 202 and the job (poll its Location)
- `GET /purges`: the audit ranges purged, each cut at a signed checkpoint

Every view is a thin caller of compliance/retention.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import QuerySet
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse

from bridge.api import (
    BridgeViewSet,
    ErrorSerializer,
    JobSerializer,
    StrictBooleanField,
    StrictCharField,
    accepted,
    audit_context,
    has_body,
)
from compliance import retention
from compliance.choices import RetentionCategory
from compliance.models import AuditPurge, LegalHold
from recovery.filters import StrictBooleanFilter

# --- Responses ----------------------------------------------------------------------------


class LegalHoldSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    categories = serializers.ListField(
        child=serializers.ChoiceField(choices=RetentionCategory.choices), read_only=True
    )
    active = serializers.BooleanField(read_only=True)
    created_by = serializers.SerializerMethodField()
    released_by = serializers.SerializerMethodField()

    class Meta:
        model = LegalHold
        fields = [
            "id",
            "url",
            "name",
            "reason",
            "categories",
            "subject_id",
            "covers_from",
            "covers_to",
            "active",
            "created_by",
            "created_at",
            "released_by",
            "released_at",
        ]
        read_only_fields = fields

    def get_url(self, hold: LegalHold) -> str:
        return reverse(
            "retention-legal-hold-detail",
            kwargs={"pk": hold.pk},
            request=self.context.get("request"),
        )

    def get_created_by(self, hold: LegalHold) -> str:
        return hold.created_by.get_username() if hold.created_by else ""

    def get_released_by(self, hold: LegalHold) -> str:
        return hold.released_by.get_username() if hold.released_by else ""


class AuditPurgeSerializer(serializers.ModelSerializer):
    job = serializers.IntegerField(source="job_id", read_only=True, allow_null=True)

    class Meta:
        model = AuditPurge
        fields = [
            "id",
            "first_seq",
            "last_seq",
            "events",
            "checkpoint_number",
            "anchor_hash",
            "newest_purged_at",
            "purged_at",
            "job",
        ]
        read_only_fields = fields


RetentionPlanSerializer = inline_serializer(
    "RetentionPlan",
    {
        "generated_at": serializers.DateTimeField(),
        "dry_run_scheduled": serializers.BooleanField(
            help_text="Whether the daily run only reports (RETENTION_DRY_RUN)."
        ),
        "categories": serializers.DictField(
            child=serializers.JSONField(),
            help_text="Per category (audit_events, api_requests, dsr_records, reports): days, "
            "cutoff, due, would_delete, held or kept, and the holds that block.",
        ),
        "audit_purge": serializers.JSONField(
            help_text="The range of sealed audit events a purge would remove now: status "
            "(ready, nothing_due, held, waiting, refused), first_seq, last_seq, events, the "
            "checkpoint that signs last_seq, and why not more."
        ),
        "holds": serializers.ListField(child=serializers.JSONField()),
    },
)

# --- Requests -------------------------------------------------------------------------------


class HoldRequest(serializers.Serializer):
    name = StrictCharField(max_length=200)
    reason = StrictCharField(max_length=4000)
    categories = serializers.ListField(
        child=serializers.ChoiceField(choices=RetentionCategory.choices),
        allow_empty=False,
        max_length=len(RetentionCategory.values),
        help_text="What it keeps: audit_events (the whole trail), api_requests, dsr_records, "
        "reports.",
    )
    subject_id = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=128,
        default="",
        help_text="Only this data subject's records (a username, customer id...).",
    )
    covers_from = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="Records from this time on."
    )
    covers_to = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="Records up to this time."
    )


class RunRequest(serializers.Serializer):
    dry_run = StrictBooleanField(help_text="true: only say what would be removed.")


def _body(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    if not has_body(request) or not isinstance(request.data, dict):
        raise ValidationError({"non_field_errors": ["Send a JSON object."]})
    body = serializer_class(data=request.data)
    # A misspelt field must not be read as "left out" (`{"dryRun": true}` would purge).
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


def _refused(error: retention.RetentionError) -> Response:
    if error.field:
        raise ValidationError({error.field: [str(error)]})
    return Response({"detail": str(error), "code": error.code}, status=status.HTTP_409_CONFLICT)


class LegalHoldFilter(filters.FilterSet):
    active = StrictBooleanFilter(
        field_name="released_at", lookup_expr="isnull", help_text="true: holds not released."
    )
    subject_id = filters.CharFilter(max_length=128, help_text="Exact subject id.")

    class Meta:
        model = LegalHold
        fields = ["active", "subject_id"]


# --- Views --------------------------------------------------------------------------------


class LegalHoldViewSet(BridgeViewSet):
    """Legal holds: while active, nothing they cover is purged."""

    serializer_class = LegalHoldSerializer
    filterset_class = LegalHoldFilter
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_legalhold",),
        "retrieve": ("compliance.view_legalhold",),
        "create": ("compliance.add_legalhold",),
        "release": ("compliance.release_legalhold",),
    }

    def get_queryset(self) -> QuerySet[LegalHold]:
        return LegalHold.objects.select_related("created_by", "released_by").order_by(
            "-created_at", "-id"
        )

    def _hold(self, pk: Any) -> LegalHold:
        hold = self.get_queryset().filter(pk=pk).first()
        if hold is None:
            raise NotFound(f"No legal hold {pk}.")
        return hold

    @extend_schema(tags=["compliance"], summary="Legal holds, newest first")
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        data = LegalHoldSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(
        tags=["compliance"],
        summary="Place a legal hold: what it covers is kept whatever its retention",
        request=HoldRequest,
        responses={201: LegalHoldSerializer},
    )
    def create(self, request: Request) -> Response:
        body = _body(request, HoldRequest)
        try:
            hold = retention.place_hold(
                name=body["name"],
                reason=body["reason"],
                categories=body["categories"],
                subject_id=body["subject_id"],
                covers_from=body["covers_from"],
                covers_to=body["covers_to"],
                context=audit_context(request),
                user=request.user,
            )
        except retention.RetentionError as error:
            return _refused(error)
        data = LegalHoldSerializer(self._hold(hold.pk), context={"request": request}).data
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(tags=["compliance"], summary="One legal hold")
    def retrieve(self, request: Request, pk: int) -> Response:
        return Response(LegalHoldSerializer(self._hold(pk), context={"request": request}).data)

    @extend_schema(
        tags=["compliance"],
        summary="Release a legal hold (what it kept is removed at the next run if due)",
        request=None,
        responses={200: LegalHoldSerializer, 409: ErrorSerializer},
    )
    def release(self, request: Request, pk: int) -> Response:
        hold = self._hold(pk)
        try:
            hold = retention.release_hold(
                hold=hold, context=audit_context(request), user=request.user
            )
        except retention.RetentionError as error:
            return _refused(error)
        return Response(LegalHoldSerializer(self._hold(hold.pk), context={"request": request}).data)


class RetentionViewSet(BridgeViewSet):
    """The retention plan, runs (jobs) and the audit purges they made."""

    serializer_class = AuditPurgeSerializer
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "plan": ("compliance.view_auditpurge",),
        "run": ("compliance.purge_auditevent",),
        "purges": ("compliance.view_auditpurge",),
    }

    def get_queryset(self) -> QuerySet[AuditPurge]:
        return AuditPurge.objects.order_by("-last_seq")

    @extend_schema(
        tags=["compliance"],
        summary="What a retention run would remove now, per category, and what blocks it",
        responses={200: RetentionPlanSerializer},
    )
    def plan(self, request: Request) -> Response:
        return Response(serializers.JSONField().to_representation(retention.retention_plan()))

    @extend_schema(
        tags=["compliance"],
        summary="Start a retention run (a job: poll its Location); dry_run only reports",
        request=RunRequest,
        responses={202: JobSerializer, 409: ErrorSerializer},
    )
    def run(self, request: Request) -> Response:
        body = _body(request, RunRequest)
        try:
            job = retention.start_retention(
                dry_run=body["dry_run"], context=audit_context(request), source="api"
            )
        except retention.RetentionBusy as busy:
            return Response(
                {"detail": str(busy), "code": "retention_running"},
                status=status.HTTP_409_CONFLICT,
            )
        return accepted(job, request)

    @extend_schema(
        tags=["compliance"],
        summary="Audit event ranges purged by retention, newest first",
        responses={200: AuditPurgeSerializer(many=True)},
    )
    def purges(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(AuditPurgeSerializer(page, many=True).data)
