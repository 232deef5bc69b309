"""GET /api/security/threats: the threat picture (security/threats.py) for security officers
and auditors."""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import BridgeViewSet
from security import threats
from security.choices import ThreatLayer, ThreatLevel


class ThreatThresholdsSerializer(serializers.Serializer):
    alert = serializers.IntegerField(help_text="THREAT_ALERT_SCORE: crossing it is audited.")
    ban = serializers.IntegerField(help_text="THREAT_BAN_SCORE: an address reaching it is banned.")
    half_life_seconds = serializers.FloatField(help_text="THREAT_SCORE_HALF_LIFE.")


class ThreatBanSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    network = serializers.CharField(help_text="The address (an IPv6 /64).")
    reason = serializers.CharField()
    started_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    ban_number = serializers.IntegerField(help_text="1 for the first ban; each repeat doubles.")


class ThreatAddressSerializer(serializers.Serializer):
    network = serializers.CharField(source="name", help_text="The address (an IPv6 /64).")
    score = serializers.FloatField(help_text="Decayed to now.")
    events = serializers.IntegerField()
    last_seen = serializers.DateTimeField()
    banned_until = serializers.DateTimeField(allow_null=True)


class ThreatUserSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="user_id")
    username = serializers.CharField(source="name")
    score = serializers.FloatField(help_text="Decayed to now.")
    events = serializers.IntegerField()
    last_seen = serializers.DateTimeField()


class ThreatOffendersSerializer(serializers.Serializer):
    addresses = ThreatAddressSerializer(many=True)
    users = ThreatUserSerializer(many=True)


class LayerCountsSerializer(serializers.Serializer):
    """Events per layer (security/threats.py names the kinds of each)."""

    total = serializers.IntegerField(min_value=0)
    network = serializers.IntegerField(min_value=0, help_text="Over-limit episodes, bans.")
    authentication = serializers.IntegerField(
        min_value=0, help_text="Failed logins, lockouts, refresh-token reuse."
    )
    application = serializers.IntegerField(
        min_value=0, help_text="Injection, XSS and traversal probes, 404 bursts, oversized bodies."
    )
    data = serializers.IntegerField(
        min_value=0, help_text="Unusual decrypt or export volume, refused decryptions."
    )


class ThreatWindowSerializer(LayerCountsSerializer):
    """Events per layer since a moment: the last hour or the last 24 hours."""

    # Text, not an enum: a `window` enum of another view would collide in the schema's names.
    window = serializers.CharField(help_text="1h or 24h.")
    since = serializers.DateTimeField()


class ThreatHourSerializer(LayerCountsSerializer):
    """Events per layer in one hour (UTC)."""

    start = serializers.DateTimeField(help_text="The hour (UTC) the bucket starts.")


class ThreatOverviewSerializer(serializers.Serializer):
    generated_at = serializers.DateTimeField()
    level = serializers.ChoiceField(
        choices=ThreatLevel.choices,
        help_text=(
            "critical: a score at the ban threshold; high: past the alert threshold, an "
            "address banned, or 200 events in the last hour; elevated: past half the alert "
            "threshold, or 20 events in the last hour; low otherwise."
        ),
    )
    reasons = serializers.ListField(child=serializers.CharField(), help_text="Why this level.")
    top_score = serializers.FloatField()
    thresholds = ThreatThresholdsSerializer()
    active_bans = ThreatBanSerializer(many=True)
    top_offenders = ThreatOffendersSerializer()
    counts = ThreatWindowSerializer(many=True, help_text="The last hour and the last 24 hours.")
    series = ThreatHourSerializer(
        many=True, help_text="24 hourly buckets, the current (partial) hour last."
    )


def _per_layer(counts: dict[str, int]) -> dict[str, int]:
    return {layer: counts.get(layer, 0) for layer in ThreatLayer.values}


def picture_data(picture: threats.ThreatPicture) -> dict[str, Any]:
    """The picture as the serializer above reads it."""
    return {
        "generated_at": picture.generated_at,
        "level": picture.level,
        "reasons": picture.reasons,
        "top_score": picture.top_score,
        "thresholds": {
            "alert": settings.THREAT_ALERT_SCORE,
            "ban": settings.THREAT_BAN_SCORE,
            "half_life_seconds": threats.half_life().total_seconds(),
        },
        "active_bans": picture.active_bans,
        "top_offenders": {"addresses": picture.addresses, "users": picture.users},
        "counts": [
            {
                "window": window.window,
                "since": window.since,
                "total": window.total,
                **_per_layer(window.counts),
            }
            for window in picture.windows
        ],
        "series": [
            {"start": bucket.start, "total": bucket.total, **_per_layer(bucket.counts)}
            for bucket in picture.series
        ],
    }


class ThreatViewSet(BridgeViewSet):
    """The threat picture: level, bans, offenders, counts per layer and window, hourly series."""

    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "overview": ("security.view_threatevent",),
    }

    @extend_schema(
        tags=["security"],
        summary="The threat picture: level, active bans, top offenders, events per layer",
        responses={200: ThreatOverviewSerializer},
    )
    def overview(self, request: Request) -> Response:
        return Response(ThreatOverviewSerializer(picture_data(threats.assess())).data)
