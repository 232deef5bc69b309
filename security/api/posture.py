"""GET /api/security/status, POST /api/security/test, POST /api/security/reset."""

from __future__ import annotations

from typing import ClassVar

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import BridgeViewSet, audit_context
from security import posture


class DeployCheckSerializer(serializers.Serializer):
    id = serializers.CharField()
    level = serializers.ChoiceField(choices=["warning", "error"])
    message = serializers.CharField()


class WindowCountsSerializer(serializers.Serializer):
    lockouts = serializers.IntegerField()
    failed_logins = serializers.IntegerField()
    bans = serializers.IntegerField()
    token_reuse = serializers.IntegerField()


class StatusSerializer(serializers.Serializer):
    time = serializers.DateTimeField()
    tls = serializers.DictField(help_text="TLS 1.3 only or not, minimum version, HSTS, cookies")
    jwt = serializers.DictField(help_text="Token lifetimes (seconds), rotation, reuse detection")
    lockout = serializers.DictField(help_text="django-axes: failure limit and cool-off")
    rate_limiting = serializers.DictField(
        help_text="Limits per endpoint class, bans, and the shared store's health"
    )
    keys = serializers.DictField(
        help_text="Master key id, data keys per purpose with version and age, subject keys, "
        "the audit signing key"
    )
    deploy_checks = DeployCheckSerializer(many=True)
    active_bans = serializers.IntegerField()
    last_hour = WindowCountsSerializer()
    last_day = WindowCountsSerializer()


class CheckResultSerializer(serializers.Serializer):
    name = serializers.CharField()
    ok = serializers.BooleanField()
    detail = serializers.CharField()
    ms = serializers.FloatField()


class SelfTestSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    passed = serializers.IntegerField()
    failed = serializers.IntegerField()
    checks = CheckResultSerializer(many=True)


class ResetResultSerializer(serializers.Serializer):
    bans_lifted = serializers.IntegerField()
    lockouts_cleared = serializers.IntegerField()
    scores_cleared = serializers.IntegerField(
        help_text="Addresses and users whose threat score was reset"
    )


class PostureViewSet(BridgeViewSet):
    """The security posture, its self-test, and the reset of bans and counters."""

    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "status": ("security.view_datakey",),
        "self_test": ("security.run_security_selftest",),
        "reset": ("security.run_security_selftest",),
    }

    @extend_schema(
        tags=["security"],
        summary="The live security posture: TLS, tokens, lockout, limits, keys, deploy checks",
        responses={200: StatusSerializer},
    )
    def status(self, request: Request) -> Response:
        return Response(posture.security_status())

    @extend_schema(
        tags=["security"],
        summary="Run the security self-checks for real; pass or fail per check",
        request=None,
        responses={200: SelfTestSerializer},
    )
    def self_test(self, request: Request) -> Response:
        return Response(posture.run_self_test(context=audit_context(request)))

    @extend_schema(
        tags=["security"],
        summary="Lift every ban; clear rate counters, lockouts and threat scores (superusers only)",
        request=None,
        responses={200: ResetResultSerializer},
    )
    def reset(self, request: Request) -> Response:
        if not request.user.is_superuser:
            raise PermissionDenied("Only a superuser may clear bans and counters.")
        return Response(posture.reset_protection(context=audit_context(request)))
