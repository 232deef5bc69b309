"""POST /api/recovery/heal/{service} (a heal job: 202 and its Location) and
DELETE /api/recovery/reset (superusers: breakers, retry statistics and stuck heals cleared)."""

from __future__ import annotations

from typing import ClassVar

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import (
    BodyRequiredSchema,
    BridgeViewSet,
    ErrorSerializer,
    JobSerializer,
    StrictBooleanField,
    accepted,
    audit_context,
    has_body,
)
from recovery import healing
from recovery.choices import HealStrategy
from recovery.models import Service


class HealRequestSerializer(serializers.Serializer):
    strategy = serializers.ChoiceField(
        choices=HealStrategy.choices,
        required=False,
        help_text="Run this strategy only; left out, the service's own list in order.",
    )
    dry_run = StrictBooleanField(
        required=False, default=False, help_text="Record what would run; run nothing."
    )


class RecoveryResetSerializer(serializers.Serializer):
    breakers = serializers.IntegerField(help_text="Circuit breakers closed")
    retry_stats = serializers.IntegerField(help_text="Retry statistics rows deleted")
    stuck_heals = serializers.IntegerField(help_text="Heal operations closed as stuck")


SERVICE_PARAMETER = OpenApiParameter(
    "service", str, OpenApiParameter.PATH, description="The service's name."
)


class HealViewSet(BridgeViewSet):
    """Self-healing by hand, and the recovery area's reset."""

    schema = BodyRequiredSchema()
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "heal": ("recovery.heal_service",),
        "reset": ("recovery.reset_recovery",),
    }

    @extend_schema(
        tags=["recovery"],
        summary="Heal a service now (a job: poll its Location)",
        parameters=[SERVICE_PARAMETER],
        request=HealRequestSerializer,
        responses={202: JobSerializer, 409: ErrorSerializer},
    )
    def heal(self, request: Request, service: str) -> Response:
        target = Service.objects.filter(name=service).first()
        if target is None:
            raise NotFound(f"No service named {service!r}.")
        if not has_body(request):
            raise ValidationError(
                {"non_field_errors": ["Send a JSON object: {} heals with the service's list."]}
            )
        body = HealRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            operation = healing.start_heal(
                service=target,
                context=audit_context(request),
                strategy=body.validated_data.get("strategy") or None,
                dry_run=body.validated_data["dry_run"],
            )
        except healing.HealRefused as refused:
            if refused.code in ("unknown_strategy", "no_strategy"):
                raise ValidationError({"strategy": [str(refused)]}) from refused
            return Response(
                {"detail": str(refused), "code": refused.code}, status=status.HTTP_409_CONFLICT
            )
        return accepted(operation.job, request)

    @extend_schema(
        tags=["recovery"],
        summary="Close every breaker, clear retry statistics and stuck heals (superusers only)",
        request=None,
        responses={200: RecoveryResetSerializer},
    )
    def reset(self, request: Request) -> Response:
        if not request.user.is_superuser:
            raise PermissionDenied("Only a superuser may reset breakers, statistics and heals.")
        return Response(healing.reset_recovery(context=audit_context(request)))
