from django.core.paginator import Paginator as DjangoPaginator
from django.db.models import QuerySet
from django.utils.functional import cached_property
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bridge.pagination import Pagination
from compliance import services
from compliance.api.serializers import (
    AuditEventFilterSerializer,
    AuditEventSerializer,
    AuditLogRequestSerializer,
    VerifyResultSerializer,
)
from compliance.choices import VerificationSource
from compliance.models import AuditEvent
from security.permissions import HasAnyRole, IsComplianceOfficer


class HeadCountPaginator(DjangoPaginator):
    """Exact total of all events from the chain head, without COUNT(*) over the table."""

    @cached_property
    def count(self) -> int:
        return services.total_event_count()


class AuditEventPagination(Pagination):
    def paginate_queryset(
        self, queryset: QuerySet, request: Request, view: APIView | None = None
    ) -> list | None:
        filtered = getattr(view, "filtered", True)
        self.django_paginator_class = DjangoPaginator if filtered else HeadCountPaginator
        return super().paginate_queryset(queryset, request, view)


@extend_schema(
    tags=["compliance"],
    parameters=[
        OpenApiParameter("actor", str, description="Exact username of the actor."),
        OpenApiParameter("action", str, description="Exact action, e.g. api.request."),
        OpenApiParameter("from", str, description="ISO 8601 time; events at or after it."),
        OpenApiParameter("to", str, description="ISO 8601 time; events before it."),
    ],
)
class AuditEventListView(generics.ListAPIView):
    """Audit events, newest first."""

    permission_classes = [IsComplianceOfficer]
    serializer_class = AuditEventSerializer
    pagination_class = AuditEventPagination

    def get_queryset(self) -> QuerySet[AuditEvent]:
        filters = AuditEventFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        params = filters.validated_data
        queryset = AuditEvent.objects.select_related("seal").order_by("-id")
        if "actor" in params:
            queryset = queryset.filter(actor_username=params["actor"])
        if "action" in params:
            queryset = queryset.filter(action=params["action"])
        if "from" in params:
            queryset = queryset.filter(occurred_at__gte=params["from"])
        if "to" in params:
            queryset = queryset.filter(occurred_at__lt=params["to"])
        self.filtered = bool(params)
        return queryset


class AuditVerifyView(APIView):
    """Recompute the whole chain now; a broken chain is recorded and logged as an error."""

    permission_classes = [IsComplianceOfficer]

    @extend_schema(tags=["compliance"], responses=VerifyResultSerializer)
    def get(self, request: Request) -> Response:
        run = services.verify_chain(
            source=VerificationSource.API, actor=request.user, request=request._request
        )
        body = {
            "ok": run.status == "ok",
            "checked": run.checked,
            "first_broken_id": run.first_broken_id,
            "unsealed": run.unsealed,
            "reason": run.reason,
            "verification_id": run.pk,
        }
        return Response(VerifyResultSerializer(body).data)


class AuditLogView(APIView):
    """Record a custom event (stored as `custom.<action>`)."""

    permission_classes = [HasAnyRole]

    @extend_schema(
        tags=["compliance"],
        request=AuditLogRequestSerializer,
        responses={201: AuditEventSerializer},
    )
    def post(self, request: Request) -> Response:
        payload = AuditLogRequestSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        event = services.log_custom_event(
            actor=request.user,
            request=request._request,
            name=data["action"],
            object_type=data["object_type"],
            object_id=data["object_id"],
            details=data["details"],
        )
        return Response(AuditEventSerializer(event).data, status=status.HTTP_201_CREATED)
