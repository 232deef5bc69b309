"""The API's shared pieces: the permission check, the base viewset, jobs' fields and routes.

Every area builds its endpoints from these, so that permission checks, filtering, paging and
the 202-and-poll pattern of long operations are written once.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import QuerySet
from django.http import HttpRequest
from django_filters import rest_framework as filters
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from bridge import jobs
from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext


class RolePermission(BasePermission):
    """`user.has_perm` on what the view declares, the same check the console makes.

    A view lists its needs in `required_permissions`, keyed by viewset action (`list`,
    `retrieve`, `create`, a custom action) or, on a plain APIView, by lower-case method; `*`
    is the fallback. An action it does not name is refused: forgetting to declare a
    permission closes an endpoint instead of opening it.
    """

    message = "You do not have permission to perform this action."

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active):
            return False
        if not hasattr(view, (request.method or "").lower()):
            # No handler for this method: let the view answer 405, which says more than 403.
            return True
        needed = required_permissions(view, request)
        if needed is None:
            return False
        missing = [perm for perm in needed if not user.has_perm(perm)]
        if missing:
            self.message = f"Requires the permission {', '.join(missing)}."
            return False
        return True


def required_permissions(view: APIView, request: Request) -> tuple[str, ...] | None:
    declared: dict[str, tuple[str, ...]] = getattr(view, "required_permissions", {})
    key = getattr(view, "action", None) or (request.method or "").lower()
    if key in declared:
        return declared[key]
    return declared.get("*")


def audit_context(request: Request | HttpRequest) -> AuditContext:
    """Who is calling and from where, for the services' audit events."""
    raw = getattr(request, "_request", request)
    return AuditContext.from_request(raw, user=getattr(request, "user", None))


class FilterBackend(filters.DjangoFilterBackend):
    """django-filter, refusing a blank filter parameter instead of ignoring it.

    django-filter reads `?status=` as "no filter", so a value outside the documented enum (or
    not a date-time) would be answered as if it were valid; a parameter given must hold a
    value, as the schema says, and leaving it out is how a client says "any".
    """

    def filter_queryset(self, request: Request, queryset: QuerySet, view: APIView) -> QuerySet:
        filterset = self.get_filterset(request, queryset, view)
        if filterset is not None:
            blank = {
                name: ["May not be blank: leave the parameter out to not filter by it."]
                for name in filterset.filters
                if request.query_params.get(name, None) == ""
            }
            if blank:
                raise serializers.ValidationError(blank)
        return super().filter_queryset(request, queryset, view)


class BridgeViewSet(viewsets.GenericViewSet):
    """Base of every viewset: role permissions, django-filter filtersets, strict paging."""

    permission_classes: ClassVar[list] = [RolePermission]
    filter_backends: ClassVar[list] = [FilterBackend]
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {}


# --- Request fields ---------------------------------------------------------------------


class StrictCharField(serializers.CharField):
    """A text field that takes a JSON string only.

    DRF's CharField also takes a number and stores its text, so `{"object_type": 5}` would be
    accepted although the schema (type: string) says it is invalid input.
    """

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false only: DRF's BooleanField also takes "yes", 1 and "on", values the
    schema (type: boolean) calls invalid."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only: DRF's IntegerField also takes "3" and 3.0, values the schema
    (type: integer) calls invalid."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


def has_body(request: Request) -> bool:
    """Whether the request carries a body at all (`{}` does; nothing sent does not)."""
    meta = request._request.META
    length = meta.get("CONTENT_LENGTH") or "0"
    return (length.isdigit() and int(length) > 0) or "chunked" in meta.get(
        "HTTP_TRANSFER_ENCODING", ""
    )


class BodyRequiredSchema(AutoSchema):
    """For operations whose fields are all optional but whose request is a JSON object (`{}`
    takes the defaults): documented as a required body, as the views enforce."""

    def _get_request_body(self, direction: str = "request") -> dict | None:
        body = super()._get_request_body(direction)
        if body is not None:
            body["required"] = True
        return body


class StrictRegexField(serializers.RegexField):
    """RegexField taking a JSON string only (see StrictCharField)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


# --- Jobs -------------------------------------------------------------------------------


class JobSerializer(serializers.ModelSerializer):
    """The job as every area's API shows it: state, progress, timings, outcome."""

    percent = serializers.IntegerField(
        read_only=True, allow_null=True, help_text="0-100; null while the total is unknown."
    )
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)
    cancellable = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id",
            "url",
            "kind",
            "status",
            "percent",
            "progress_done",
            "progress_total",
            "progress_message",
            "actor_username",
            "params",
            "result",
            "error",
            "created_at",
            "started_at",
            "finished_at",
            "heartbeat_at",
            "duration_seconds",
            "cancel_requested",
            "cancellable",
        ]
        read_only_fields = fields

    def get_cancellable(self, job: Job) -> bool:
        spec = jobs.kind_of(job)
        return bool(spec and spec.cancellable and not job.is_final)

    def get_url(self, job: Job) -> str:
        return job_url(job, self.context.get("request"))


def job_url(job: Job, request: Request | None = None) -> str:
    return reverse("job-detail", kwargs={"pk": job.pk}, request=request)


def accepted(job: Job, request: Request) -> Response:
    """The answer to a POST that started a job: 202, the job, and where to poll it."""
    body = JobSerializer(job, context={"request": request}).data
    response = Response(body, status=status.HTTP_202_ACCEPTED)
    response["Location"] = job_url(job, request)
    return response


class JobFilter(filters.FilterSet):
    kind = filters.CharFilter(
        max_length=64, help_text="Exact kind, e.g. compliance.verify_audit_chain."
    )
    status = filters.ChoiceFilter(choices=JobStatus.choices)

    class Meta:
        model = Job
        fields = ["kind", "status"]


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField()


@extend_schema_view(
    list=extend_schema(tags=["jobs"], summary="Jobs you may see, newest first"),
    retrieve=extend_schema(tags=["jobs"], summary="One job: poll it for progress"),
)
class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, BridgeViewSet):
    """Background runs of every area; each kind is visible with its own permission."""

    serializer_class = JobSerializer
    filterset_class = JobFilter
    # Visibility per kind is applied in get_queryset; being authenticated is enough to ask.
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {"*": ()}

    def get_queryset(self) -> QuerySet[Job]:
        return jobs.visible_jobs(self.request.user).order_by("-id")

    @extend_schema(
        tags=["jobs"],
        summary="Cancel a job",
        request=None,
        responses={202: JobSerializer, 403: ErrorSerializer, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: Any = None) -> Response:
        job = self.get_object()
        spec = jobs.kind_of(job)
        if spec is not None and not request.user.has_perm(spec.cancel_permission):
            raise PermissionDenied(f"Requires the permission {spec.cancel_permission}.")
        try:
            job = jobs.cancel_job(job=job, context=audit_context(request))
        except jobs.JobError as error:
            return Response(
                {"detail": str(error), "code": error.code}, status=status.HTTP_409_CONFLICT
            )
        return accepted(job, request)
