from __future__ import annotations

from typing import Any, ClassVar

from django.core.paginator import Paginator as DjangoPaginator
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.functional import cached_property
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bridge.api import BridgeViewSet, ErrorSerializer, JobSerializer, accepted, audit_context
from bridge.pagination import Pagination
from compliance import chain, services, verification
from compliance.api.serializers import (
    AuditEventSerializer,
    AuditLogRequestSerializer,
    CheckpointSerializer,
    PublicKeySerializer,
    VerificationSerializer,
)
from compliance.choices import VerificationSource
from compliance.filters import AuditEventFilter, CheckpointFilter
from compliance.models import AuditCheckpoint, AuditEvent, AuditVerification


class HeadCountPaginator(DjangoPaginator):
    """Exact total of all events from the chain head, without COUNT(*) over the table."""

    @cached_property
    def count(self) -> int:
        return chain.total_event_count()


class AuditEventPagination(Pagination):
    def paginate_queryset(
        self, queryset: QuerySet, request: Request, view: APIView | None = None
    ) -> list | None:
        filtered = getattr(view, "filtered", True)
        self.django_paginator_class = DjangoPaginator if filtered else HeadCountPaginator
        return super().paginate_queryset(queryset, request, view)


@extend_schema_view(
    list=extend_schema(tags=["compliance"], summary="Audit events, newest first"),
    retrieve=extend_schema(tags=["compliance"], summary="One audit event with its seal"),
)
class AuditEventViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, BridgeViewSet):
    """The audit trail, read-only."""

    serializer_class = AuditEventSerializer
    pagination_class = AuditEventPagination
    filterset_class = AuditEventFilter
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_auditevent",),
        "retrieve": ("compliance.view_auditevent",),
    }
    filtered = True

    def get_queryset(self) -> QuerySet[AuditEvent]:
        return AuditEvent.objects.select_related("seal").order_by("-id")

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        filterset = AuditEventFilter(self.request.query_params, queryset, request=self.request)
        self.filtered = filterset.is_filtering
        return super().filter_queryset(queryset)


class AuditLogViewSet(BridgeViewSet):
    """Custom events recorded by operators and integrations."""

    serializer_class = AuditLogRequestSerializer
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "create": ("compliance.log_custom_event",)
    }

    @extend_schema(
        tags=["compliance"],
        summary="Record a custom event (stored as custom.<action>)",
        request=AuditLogRequestSerializer,
        responses={201: AuditEventSerializer},
    )
    def create(self, request: Request) -> Response:
        payload = AuditLogRequestSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        event = services.log_custom_event(
            context=audit_context(request),
            name=data["action"],
            object_type=data["object_type"],
            object_id=data["object_id"],
            details=data["details"],
        )
        return Response(AuditEventSerializer(event).data, status=status.HTTP_201_CREATED)


@extend_schema_view(
    list=extend_schema(tags=["compliance"], summary="Verification runs, newest first"),
    retrieve=extend_schema(tags=["compliance"], summary="One verification run"),
)
class AuditVerificationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, BridgeViewSet):
    """Runs of the chain verification (jobs). No web request walks the chain itself."""

    serializer_class = VerificationSerializer
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_auditverification",),
        "retrieve": ("compliance.view_auditverification",),
        "latest": ("compliance.view_auditverification",),
        "start": ("compliance.verify_chain",),
    }

    def get_queryset(self) -> QuerySet[AuditVerification]:
        return AuditVerification.objects.order_by("-id")

    @extend_schema(
        tags=["compliance"],
        summary="The latest finished verification and its age (nothing is recomputed)",
        responses={200: VerificationSerializer, 404: ErrorSerializer},
    )
    def latest(self, request: Request) -> Response:
        run = verification.latest_verification()
        if run is None:
            raise NotFound("No verification has finished yet; POST to this address to start one.")
        return Response(VerificationSerializer(run, context={"now": timezone.now()}).data)

    @extend_schema(
        tags=["compliance"],
        summary="Start a verification of the whole chain (a job: poll its Location)",
        request=None,
        responses={202: JobSerializer},
    )
    def start(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        job = verification.start_verification(
            context=audit_context(request), source=VerificationSource.API
        )
        return accepted(job, request)


@extend_schema_view(
    list=extend_schema(tags=["compliance"], summary="Signed checkpoints, newest first"),
    retrieve=extend_schema(tags=["compliance"], summary="One signed checkpoint by its number"),
)
class AuditCheckpointViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, BridgeViewSet):
    """Bridge's copies of the signed checkpoints and their publishing state. Verification
    trusts the sinks' copies; these show what was signed and whether every sink has it."""

    serializer_class = CheckpointSerializer
    filterset_class = CheckpointFilter
    lookup_field = "number"
    lookup_value_regex = r"[0-9]+"
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_auditcheckpoint",),
        "retrieve": ("compliance.view_auditcheckpoint",),
        "public_key": ("compliance.view_auditcheckpoint",),
    }

    def get_queryset(self) -> QuerySet[AuditCheckpoint]:
        return AuditCheckpoint.objects.order_by("-number")

    @extend_schema(
        tags=["compliance"],
        summary="The public keys that verify the checkpoints, with their key ids",
        responses={200: PublicKeySerializer},
        filters=False,
    )
    def public_key(self, request: Request) -> Response:
        return Response(PublicKeySerializer(services.public_keys()).data)
