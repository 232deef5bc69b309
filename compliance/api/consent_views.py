"""Consent endpoints (compliance/consent.py):

- `GET`, `POST /api/compliance/gdpr/notices`: privacy notice versions, each with its SHA-256
- `GET`, `PUT /api/compliance/gdpr/consent/{subject_id}`: the current state per purpose and the
  history; the PUT records grants and withdrawals (one event per purpose named)
- `GET /api/compliance/gdpr/consent/{subject_id}/receipt`: a signed consent receipt

Consent events are append-only: there is no update or delete of an event, here or anywhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import (
    BridgeViewSet,
    ErrorSerializer,
    StrictBooleanField,
    StrictCharField,
    audit_context,
    has_body,
)
from compliance import consent
from compliance.choices import ConsentMethod
from compliance.models import PrivacyNotice

SUBJECT_PARAMETER = OpenApiParameter(
    "subject_id",
    {
        "type": "string",
        "pattern": f"^{consent.SUBJECT_ID_PATTERN}$",
        "minLength": 1,
        "maxLength": 128,
    },
    OpenApiParameter.PATH,
    description="The data subject: a Bridge user's username, or a customer id or email "
    "(1-128 characters, no control characters, no '/').",
)


def gdpr_disabled() -> Response | None:
    """Writes are refused while ENABLE_GDPR_COMPLIANCE is off; what was recorded stays
    readable (it is evidence)."""
    if settings.ENABLE_GDPR_COMPLIANCE:
        return None
    return Response(
        {
            "detail": "GDPR compliance is disabled (ENABLE_GDPR_COMPLIANCE).",
            "code": "gdpr_disabled",
        },
        status=status.HTTP_503_SERVICE_UNAVAILABLE,
    )


def strict_body(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    """A JSON object holding only the serializer's fields, validated."""
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


def refused(error: consent.ConsentError) -> ValidationError:
    return ValidationError({error.field: [str(error)]})


# --- Notices -------------------------------------------------------------------------------


class NoticeSerializer(serializers.ModelSerializer):
    class Meta:
        model = PrivacyNotice
        fields = ["version", "sha256", "published_at", "text"]
        read_only_fields = fields


class NoticeRequest(serializers.Serializer):
    version = StrictCharField(
        max_length=40, help_text="A new version name: letters, digits, '.', '_', '-'."
    )
    text = StrictCharField(
        max_length=consent.NOTICE_MAX_CHARS,
        trim_whitespace=False,
        help_text="The notice exactly as shown to data subjects; its SHA-256 is recorded.",
    )


class NoticeViewSet(BridgeViewSet):
    """Privacy notice versions (immutable once published)."""

    serializer_class = NoticeSerializer
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_privacynotice",),
        "create": ("compliance.add_privacynotice",),
    }

    def get_queryset(self) -> QuerySet[PrivacyNotice]:
        return PrivacyNotice.objects.order_by("-published_at", "-id")

    @extend_schema(tags=["compliance"], summary="Privacy notice versions, newest first")
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(NoticeSerializer(page, many=True).data)

    @extend_schema(
        tags=["compliance"],
        summary="Publish a privacy notice version (its text and SHA-256 are kept)",
        request=NoticeRequest,
        responses={201: NoticeSerializer, 409: ErrorSerializer},
    )
    def create(self, request: Request) -> Response:
        off = gdpr_disabled()
        if off is not None:
            return off
        body = strict_body(request, NoticeRequest)
        try:
            notice = consent.publish_notice(
                version=body["version"], text=body["text"], context=audit_context(request)
            )
        except consent.ConsentError as error:
            raise refused(error) from error
        return Response(NoticeSerializer(notice).data, status=status.HTTP_201_CREATED)


# --- Consent -------------------------------------------------------------------------------


@extend_schema_field(
    {
        "type": "object",
        "minProperties": 1,
        "properties": {purpose: {"type": "boolean"} for purpose in consent.configured_purposes()},
        "additionalProperties": False,
        "description": "Purpose -> true to grant, false to withdraw (GDPR_CONSENT_PURPOSES).",
    }
)
class PurposesField(serializers.DictField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(child=StrictBooleanField(), allow_empty=False, **kwargs)


class ConsentRequest(serializers.Serializer):
    purposes = PurposesField()
    notice_version = StrictCharField(
        max_length=40, help_text="The privacy notice version the subject was shown."
    )
    method = serializers.ChoiceField(choices=ConsentMethod.choices)
    channel = StrictCharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=consent.CHANNEL_MAX_CHARS,
        help_text="Where it happened: web, app, call centre...",
    )


class PurposeStateSerializer(serializers.Serializer):
    granted = serializers.BooleanField()
    since = serializers.DateTimeField(
        allow_null=True, help_text="When the current state began (null: never asked)."
    )
    updated_at = serializers.DateTimeField(
        allow_null=True, help_text="The latest event (a re-confirmation moves only this)."
    )
    notice_version = serializers.CharField(allow_null=True)
    notice_sha256 = serializers.CharField(allow_null=True)
    method = serializers.CharField(allow_null=True)
    channel = serializers.CharField(allow_null=True, allow_blank=True)


class ConsentEventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    purpose = serializers.CharField()
    granted = serializers.BooleanField()
    notice_version = serializers.CharField()
    notice_sha256 = serializers.CharField()
    method = serializers.CharField()
    channel = serializers.CharField(allow_blank=True)
    client_ip = serializers.IPAddressField(allow_null=True)
    actor_id = serializers.IntegerField(allow_null=True, help_text="The Bridge user who sent it.")
    request_id = serializers.CharField(allow_blank=True)
    occurred_at = serializers.DateTimeField()


class ConsentStateSerializer(serializers.Serializer):
    subject_id = serializers.CharField()
    purposes = serializers.DictField(child=PurposeStateSerializer())
    history = ConsentEventSerializer(many=True, help_text="Every event, oldest first.")


class ReceiptPurposeSerializer(serializers.Serializer):
    purpose = serializers.CharField()
    consent_type = serializers.CharField()
    granted = serializers.BooleanField()
    since = serializers.CharField()
    updated_at = serializers.CharField()
    notice_version = serializers.CharField()
    notice_sha256 = serializers.CharField()
    method = serializers.CharField()
    channel = serializers.CharField(allow_blank=True)
    events = serializers.ListField(child=serializers.DictField())


class ReceiptNoticeSerializer(serializers.Serializer):
    version = serializers.CharField()
    sha256 = serializers.CharField(allow_null=True)
    published_at = serializers.CharField(allow_null=True)


class ReceiptSignatureSerializer(serializers.Serializer):
    algorithm = serializers.CharField()
    key_id = serializers.CharField()
    context = serializers.CharField()
    value = serializers.CharField(
        help_text="Base64 Ed25519 signature of the context line and the canonical JSON of "
        "the receipt without `signature`; the key is at /api/compliance/audit/public-key."
    )


class ReceiptSerializer(serializers.Serializer):
    """A consent receipt (after the Kantara Initiative's Consent Receipt v1.1)."""

    version = serializers.CharField()
    jurisdiction = serializers.CharField()
    consent_receipt_id = serializers.UUIDField()
    generated_at = serializers.CharField()
    consent_timestamp = serializers.CharField()
    collection_method = serializers.CharField()
    subject = serializers.CharField()
    controller = serializers.CharField()
    language = serializers.CharField()
    purposes = ReceiptPurposeSerializer(many=True)
    notices = ReceiptNoticeSerializer(many=True)
    signature = ReceiptSignatureSerializer()


class ConsentViewSet(BridgeViewSet):
    """A data subject's consent: the projection, the history, recording, the receipt."""

    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "retrieve": ("compliance.view_consentevent",),
        "update": ("compliance.record_consent",),
        "receipt": ("compliance.view_consentevent",),
    }

    @extend_schema(
        tags=["compliance"],
        summary="A subject's consent per purpose (the latest event decides) and its history",
        parameters=[SUBJECT_PARAMETER],
        responses={200: ConsentStateSerializer, 404: ErrorSerializer},
    )
    def retrieve(self, request: Request, subject_id: str) -> Response:
        return Response(ConsentStateSerializer(consent.consent_state(subject_id)).data)

    @extend_schema(
        tags=["compliance"],
        summary="Grant or withdraw consent per purpose (one event each; withdrawing is the "
        "same call with false)",
        parameters=[SUBJECT_PARAMETER],
        request=ConsentRequest,
        responses={200: ConsentStateSerializer, 404: ErrorSerializer, 409: ErrorSerializer},
    )
    def update(self, request: Request, subject_id: str) -> Response:
        off = gdpr_disabled()
        if off is not None:
            return off
        body = strict_body(request, ConsentRequest)
        try:
            consent.record_consent(
                subject_id=subject_id,
                purposes=body["purposes"],
                notice_version=body["notice_version"],
                method=body["method"],
                channel=body["channel"],
                context=audit_context(request),
            )
        except consent.ConsentError as error:
            raise refused(error) from error
        return Response(ConsentStateSerializer(consent.consent_state(subject_id)).data)

    @extend_schema(
        tags=["compliance"],
        summary="A signed consent receipt for the subject (Kantara-style JSON)",
        parameters=[SUBJECT_PARAMETER],
        responses={200: ReceiptSerializer, 404: ErrorSerializer},
    )
    def receipt(self, request: Request, subject_id: str) -> Response:
        receipt = consent.consent_receipt(subject_id=subject_id, context=audit_context(request))
        if receipt is None:
            raise NotFound(f"No consent was ever recorded for {subject_id!r}.")
        return Response(receipt)
