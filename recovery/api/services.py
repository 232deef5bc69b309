"""Monitored services and their health:

- `GET, POST /api/recovery/services`, `GET, PATCH, DELETE /api/recovery/services/{service}`
- `GET /api/recovery/health/{service}` (`?fresh=true` probes first; needs check_service)
- `GET /api/recovery/status`: every service worst first, breakers, active heals, retries.

`{service}` is the service's name everywhere.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.fields import get_error_detail
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import (
    BridgeViewSet,
    ErrorSerializer,
    StrictBooleanField,
    StrictCharField,
    StrictIntegerField,
    StrictRegexField,
    audit_context,
)
from recovery import catalog, monitor
from recovery.choices import HealOutcome, HealStrategy, HealthStatus, ServiceKind
from recovery.filters import ServiceFilter
from recovery.models import HealOperation, HealthCheck, HealthTransition, Service
from security.models import StoredSecret

SLUG = r"^[-a-zA-Z0-9_]+\Z"
RECENT_CHECKS = 50
RECENT_TRANSITIONS = 20
# The retry statistics /status summarises.
RETRY_WINDOW = timedelta(hours=1)


def _inline_enum(values: list[str], description: str = "") -> dict:
    schema: dict[str, Any] = {"type": "string", "enum": list(values)}
    if description:
        schema["description"] = description
    return schema


# A read-only status is documented as text naming its values, not as an enum: one choice set
# under several field names (status, from_status, to_status) and beside other areas' `status`
# enums would make drf-spectacular invent hashed component names, which it warns about.
@extend_schema_field(
    {
        "type": "string",
        "description": "One of " + ", ".join(HealthStatus.values) + ".",
    }
)
class HealthStatusField(serializers.ChoiceField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(choices=HealthStatus.choices, **kwargs)


@extend_schema_field(_inline_enum(HealStrategy.values))
class HealStrategyField(serializers.ChoiceField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(choices=HealStrategy.choices, **kwargs)


@extend_schema_field(_inline_enum(ServiceKind.values))
class ServiceKindField(serializers.ChoiceField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(choices=ServiceKind.choices, **kwargs)


class DependsOnField(serializers.ListField):
    """Names of the services this one depends on."""

    child = StrictRegexField(SLUG, max_length=64)

    def to_representation(self, data: Any) -> list[str]:
        if hasattr(data, "values_list"):
            return sorted(data.values_list("name", flat=True))
        return [getattr(item, "name", item) for item in data]


class ServiceSerializer(serializers.ModelSerializer):
    name = StrictRegexField(
        SLUG,
        max_length=64,
        help_text="Letters, digits, - and _; names its breaker and its URLs. Fixed once made.",
    )
    kind = ServiceKindField()
    target = StrictCharField(
        max_length=500,
        help_text="host:port (postgres, redis, rabbitmq may add /database, /db or /vhost), an "
        "http(s) URL, or for celery the queue names (comma separated). Never credentials: "
        "those go in `credential`.",
    )
    credential = serializers.SlugRelatedField(
        slug_field="name",
        queryset=StoredSecret.objects.all(),
        allow_null=True,
        required=False,
        help_text="Name of the stored secret the probe logs in with (`user:password`, or a "
        "password or bearer token alone). Setting it needs security.change_storedsecret.",
    )
    check_interval = StrictIntegerField(min_value=1, max_value=86400, required=False)
    # At most 15 s: a check asked for over the API waits for it, within a client's patience.
    timeout_ms = StrictIntegerField(min_value=100, max_value=15000, required=False)
    critical = StrictBooleanField(required=False)
    depends_on = DependsOnField(
        required=False, max_length=50, help_text="Names of services this one needs."
    )
    heal_strategies = serializers.ListField(
        child=HealStrategyField(),
        required=False,
        max_length=len(HealStrategy.values),
        help_text="In order of escalation; empty: no self-healing.",
    )
    restart_command = StrictCharField(
        max_length=64,
        required=False,
        allow_blank=True,
        help_text="A key of RECOVERY_RESTART_COMMANDS (the allow-list in settings).",
    )
    standby_target = StrictCharField(max_length=500, required=False, allow_blank=True)
    expect_status = StrictIntegerField(
        min_value=100, max_value=599, required=False, allow_null=True
    )
    expect_body = StrictCharField(
        max_length=200, required=False, allow_blank=True, trim_whitespace=False
    )
    enabled = StrictBooleanField(required=False)
    maintenance = StrictBooleanField(required=False)
    status = HealthStatusField(
        read_only=True,
        help_text="As readers see it: unknown when the latest result is older than "
        "HEALTH_STALE_AFTER, maintenance when set by hand.",
    )

    class Meta:
        model = Service
        fields = [
            "name",
            "kind",
            "target",
            "credential",
            "check_interval",
            "timeout_ms",
            "critical",
            "depends_on",
            "heal_strategies",
            "restart_command",
            "standby_target",
            "expect_status",
            "expect_body",
            "enabled",
            "maintenance",
            "builtin",
            "status",
            "status_reason",
            "status_since",
            "consecutive_failures",
            "consecutive_successes",
            "last_checked_at",
            "last_latency_ms",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "builtin",
            "status_reason",
            "status_since",
            "consecutive_failures",
            "consecutive_successes",
            "last_checked_at",
            "last_latency_ms",
            "created_at",
            "updated_at",
        ]

    def to_representation(self, instance: Service) -> dict:
        data = super().to_representation(instance)
        data["status"], data["status_reason"] = monitor.effective_status(instance)
        return data

    def validate_name(self, name: str) -> str:
        # Here rather than a UniqueValidator on the field: validators all run, and a name the
        # pattern refuses (a NUL character) must never reach the database's query.
        taken = Service.objects.filter(name=name)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise serializers.ValidationError("A service has this name.", code="unique")
        return name

    def validate_credential(self, secret: StoredSecret | None) -> StoredSecret | None:
        # Whoever names a secret decides where the probe sends it: that is the secret's
        # keepers' call, not every operator's.
        request = self.context.get("request")
        current = self.instance.credential_id if self.instance is not None else None
        changing = (secret.pk if secret is not None else None) != current
        if changing and secret is not None and request is not None:
            if not request.user.has_perm("security.change_storedsecret"):
                raise serializers.ValidationError(
                    "Attaching a stored secret needs security.change_storedsecret.",
                    code="permission",
                )
        return secret

    def validate(self, attrs: dict) -> dict:
        try:
            return catalog.validate_service(attrs, instance=self.instance)
        except DjangoValidationError as error:
            raise serializers.ValidationError(get_error_detail(error)) from None

    def create(self, validated_data: dict) -> Service:
        return catalog.create_service(
            context=audit_context(self.context["request"]), values=validated_data
        )

    def update(self, instance: Service, validated_data: dict) -> Service:
        return catalog.update_service(
            context=audit_context(self.context["request"]),
            service=instance,
            values=validated_data,
        )


@extend_schema_field(
    {
        "type": "object",
        "description": "The service's circuit breaker: name, state (closed, open, half_open, "
        "forced_open, disabled), failure_rate, slow_rate, calls, open_until, trips, "
        "last_reason; `error` instead when its state could not be read.",
        "additionalProperties": True,
    }
)
class BreakerField(serializers.Field):
    def to_representation(self, value: Any) -> dict:
        return _json(value)

    def get_attribute(self, instance: Any) -> Any:
        return breaker_snapshot(instance.name)


def _json(value: Any) -> Any:
    """Datetimes as ISO text, recursively: the snapshot is shown as JSON."""
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json(item) for item in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def breaker_snapshot(name: str) -> dict:
    from recovery import breaker

    try:
        return breaker.get(name).snapshot()
    except Exception as exc:  # a Redis outage must not take the health pages down with it
        return {"name": name, "error": type(exc).__name__}


class HealthCheckEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = HealthCheck
        fields = ["checked_at", "ok", "latency_ms", "detail", "forced"]


class HealthTransitionEntrySerializer(serializers.ModelSerializer):
    from_status = HealthStatusField(read_only=True)
    to_status = HealthStatusField(read_only=True)

    class Meta:
        model = HealthTransition
        fields = ["at", "from_status", "to_status", "reason"]


class ServiceDeletedSerializer(serializers.Serializer):
    name = serializers.CharField()
    detail = serializers.CharField()


class ServiceHealthSerializer(serializers.Serializer):
    service = ServiceSerializer()
    breaker = serializers.DictField(help_text="The breaker's snapshot (see /status).")
    checks = HealthCheckEntrySerializer(
        many=True, help_text=f"The last {RECENT_CHECKS}, newest first."
    )
    transitions = HealthTransitionEntrySerializer(
        many=True, help_text=f"The last {RECENT_TRANSITIONS}, newest first."
    )
    fresh = serializers.BooleanField(help_text="Whether a probe ran for this answer.")


class HealthQuerySerializer(serializers.Serializer):
    fresh = serializers.ChoiceField(
        choices=["true", "false"],
        required=False,
        default="false",
        help_text="true: probe the service now (needs recovery.check_service).",
    )


class ServiceStatusSerializer(serializers.ModelSerializer):
    status = HealthStatusField(read_only=True)
    kind = ServiceKindField(read_only=True)
    breaker = BreakerField(read_only=True)

    class Meta:
        model = Service
        fields = [
            "name",
            "kind",
            "critical",
            "builtin",
            "enabled",
            "status",
            "status_reason",
            "status_since",
            "last_checked_at",
            "last_latency_ms",
            "breaker",
        ]

    def to_representation(self, instance: Service) -> dict:
        data = super().to_representation(instance)
        data["status"], data["status_reason"] = monitor.effective_status(instance)
        return data


class ActiveHealSerializer(serializers.ModelSerializer):
    service = serializers.SlugRelatedField(slug_field="name", read_only=True)
    job = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

    class Meta:
        model = HealOperation
        fields = ["id", "job", "service", "trigger", "strategy", "dry_run", "started_at"]


@extend_schema_field(
    {
        "type": "string",
        "description": "up, degraded, down or unknown. down: a critical service is down; "
        "degraded: anything else is not up; unknown: nothing to judge.",
    }
)
class OverallStatusField(serializers.CharField):
    pass


class RecoveryStatusSerializer(serializers.Serializer):
    status = OverallStatusField()
    services = ServiceStatusSerializer(many=True, help_text="Worst status first.")
    active_heals = ActiveHealSerializer(many=True)
    retries = serializers.ListField(
        child=serializers.DictField(), help_text="Retry statistics per service, last hour."
    )
    generated_at = serializers.DateTimeField()


# The name's pattern is in the schema: clients (and the schema fuzz) know which names can exist.
SERVICE_PARAMETER = OpenApiParameter(
    "service",
    {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$", "maxLength": 64},
    OpenApiParameter.PATH,
    description="The service's name.",
)


@extend_schema_view(
    list=extend_schema(
        tags=["recovery"], summary="Monitored services (Bridge's own registered first)"
    ),
    retrieve=extend_schema(
        tags=["recovery"], summary="One service", parameters=[SERVICE_PARAMETER]
    ),
    create=extend_schema(
        tags=["recovery"],
        summary="Add a service to watch",
        responses={201: ServiceSerializer},
    ),
    partial_update=extend_schema(
        tags=["recovery"],
        summary="Change a service",
        parameters=[SERVICE_PARAMETER],
    ),
    destroy=extend_schema(
        tags=["recovery"],
        summary="Stop watching a service (Bridge's own cannot be removed)",
        parameters=[SERVICE_PARAMETER],
        responses={200: ServiceDeletedSerializer, 409: ErrorSerializer},
    ),
)
class ServiceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    BridgeViewSet,
):
    serializer_class = ServiceSerializer
    filterset_class = ServiceFilter
    lookup_field = "name"
    lookup_url_kwarg = "service"
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("recovery.view_service",),
        "retrieve": ("recovery.view_service",),
        "create": ("recovery.add_service",),
        "partial_update": ("recovery.change_service",),
        "destroy": ("recovery.delete_service",),
    }

    def get_queryset(self) -> QuerySet[Service]:
        return (
            Service.objects.select_related("credential")
            .prefetch_related("depends_on")
            .order_by("-builtin", "name")
        )

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        monitor.ensure_builtin_services()
        return super().list(request, *args, **kwargs)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        service = self.get_object()
        try:
            catalog.delete_service(context=audit_context(request), service=service)
        except catalog.ServiceError as error:
            return Response(
                {"detail": str(error), "code": error.code}, status=status.HTTP_409_CONFLICT
            )
        # A body (not 204): every operation answers JSON, as the schema tests hold.
        return Response({"name": service.name, "detail": "No longer watched; history removed."})


class HealthViewSet(BridgeViewSet):
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "health": ("recovery.view_service",),
        "overview": ("recovery.view_service",),
    }

    @extend_schema(
        tags=["recovery"],
        summary="One service's health with recent history; ?fresh=true probes it first",
        parameters=[SERVICE_PARAMETER, HealthQuerySerializer],
        responses={200: ServiceHealthSerializer, 403: ErrorSerializer, 404: ErrorSerializer},
    )
    def health(self, request: Request, service: str) -> Response:
        query = HealthQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        fresh = query.validated_data["fresh"] == "true"
        found = Service.objects.select_related("credential").filter(name=service).first()
        if found is None:
            return Response(
                {"detail": f"No service named {service}.", "code": "not_found"}, status=404
            )
        if fresh:
            if not request.user.has_perm("recovery.check_service"):
                raise PermissionDenied("Requires the permission recovery.check_service.")
            catalog.check_service(context=audit_context(request), service=found)
        body = {
            "service": ServiceSerializer(found, context={"request": request}).data,
            "breaker": _json(breaker_snapshot(found.name)),
            "checks": HealthCheckEntrySerializer(
                found.checks.all()[:RECENT_CHECKS], many=True
            ).data,
            "transitions": HealthTransitionEntrySerializer(
                found.transitions.all()[:RECENT_TRANSITIONS], many=True
            ).data,
            "fresh": fresh,
        }
        return Response(body)

    @extend_schema(
        tags=["recovery"],
        summary="Every service's health and breaker, active heals and retries; worst first",
        responses={200: RecoveryStatusSerializer},
    )
    def overview(self, request: Request) -> Response:
        from recovery import retry

        monitor.ensure_builtin_services()
        now = timezone.now()
        services = monitor.sort_worst_first(list(Service.objects.all()))
        statuses = [(monitor.effective_status(s, now)[0], s.critical) for s in services]
        heals = HealOperation.objects.filter(outcome=HealOutcome.PENDING).select_related("service")
        try:
            retries = retry.stats(since=now - RETRY_WINDOW)
        except Exception:  # statistics are a summary: never a reason for this page to fail
            retries = []
        body = {
            "status": monitor.overall_status(statuses),
            "services": ServiceStatusSerializer(services, many=True).data,
            "active_heals": ActiveHealSerializer(heals, many=True).data,
            "retries": _json(retries),
            "generated_at": now,
        }
        return Response(body)
