from typing import ClassVar

from drf_spectacular.utils import (
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bridge.api import (
    BodyRequiredSchema,
    BridgeViewSet,
    ErrorSerializer,
    JobSerializer,
    StrictBooleanField,
    StrictCharField,
    audit_context,
    job_url,
)
from bridge.models import Job
from compliance import approvals
from compliance.api.sox_views import (
    AwaitingApprovalSerializer,
    awaiting_approval,
    change_reason,
    request_body,
)
from compliance.choices import ApprovalAction
from security import crypto, rotation, services
from security.api.serializers import (
    DecryptRequestSerializer,
    DecryptResultSerializer,
    EncryptRequestSerializer,
    EncryptResultSerializer,
    LoginSerializer,
    LogoutResultSerializer,
    RefreshSerializer,
    TokenPairSerializer,
)
from security.authentication import VersionedJWTAuthentication
from security.crypto import ALGORITHM


def _refusal(error: services.AuthError) -> Response:
    response = Response({"detail": str(error), "code": error.code}, status=error.status)
    if getattr(error, "retry_after", None) is not None:
        response["Retry-After"] = str(error.retry_after)
    return response


class LoginView(APIView):
    """Exchange a username and password (and the authenticator's current code, for a user
    who enrolled one) for an access and a refresh token."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        tags=["security"],
        request=LoginSerializer,
        responses={
            200: TokenPairSerializer,
            401: OpenApiResponse(
                ErrorSerializer,
                description="`invalid_credentials`; or the authenticator code is missing "
                "(`otp_required`), wrong (`otp_invalid`) or already used (`otp_reused`).",
            ),
            403: OpenApiResponse(
                ErrorSerializer,
                description="`otp_enrolment_required`: the user's role requires an "
                "authenticator (OTP_REQUIRED_ROLES); enrol one in the console first.",
            ),
            429: OpenApiResponse(
                ErrorSerializer,
                description="`locked_out` (failed passwords and codes per username and "
                "address), `login_rate_limited`, or `otp_throttled` (wrong codes in a row "
                "for this authenticator); Retry-After says when to come back.",
            ),
        },
    )
    def post(self, request: Request) -> Response:
        payload = LoginSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        try:
            pair = services.login(
                request=request._request,
                username=data["username"],
                password=data["password"],
                otp_code=data["otp"],
            )
        except services.AuthError as error:
            return _refusal(error)
        return Response(TokenPairSerializer(pair).data)


class RefreshView(APIView):
    """Rotate a refresh token: a new pair back, the old refresh token spent for good."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        tags=["security"],
        request=RefreshSerializer,
        responses={200: TokenPairSerializer, 401: ErrorSerializer},
    )
    def post(self, request: Request) -> Response:
        payload = RefreshSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        try:
            pair = services.refresh(
                request=request._request, refresh_token=payload.validated_data["refresh"]
            )
        except services.AuthError as error:
            return _refusal(error)
        return Response(TokenPairSerializer(pair).data)


class LogoutView(APIView):
    """Revoke every refresh token of the caller; their access tokens stop working at once."""

    authentication_classes = [VersionedJWTAuthentication]
    permission_classes = [IsAuthenticated]

    @extend_schema(tags=["security"], request=None, responses=LogoutResultSerializer)
    def post(self, request: Request) -> Response:
        revoked = services.logout(request=request._request, user=request.user)
        return Response(
            LogoutResultSerializer(
                {"detail": "Logged out everywhere.", "sessions_revoked": revoked}
            ).data
        )


class CryptoViewSet(BridgeViewSet):
    """Encryption at rest as a service: AES-256-GCM under per-purpose and per-subject data keys.
    Audited without the plaintext."""

    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "encrypt": ("security.use_crypto",),
        "decrypt": ("security.use_crypto",),
    }

    @extend_schema(
        tags=["security"],
        summary="Encrypt text (AES-256-GCM), bound to a context and optionally a data subject",
        request=EncryptRequestSerializer,
        responses={200: EncryptResultSerializer},
    )
    def encrypt(self, request: Request) -> Response:
        payload = EncryptRequestSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        ciphertext, key_id = services.encrypt_text(
            context=audit_context(request),
            plaintext=data["plaintext"],
            bound_to=data["context"],
            subject_id=data["subject_id"],
        )
        return Response({"ciphertext": ciphertext, "key_id": key_id, "algorithm": ALGORITHM})

    @extend_schema(
        tags=["security"],
        summary="Decrypt a ciphertext from POST /encrypt with the same context",
        request=DecryptRequestSerializer,
        responses={200: DecryptResultSerializer},
    )
    def decrypt(self, request: Request) -> Response:
        payload = DecryptRequestSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        try:
            plaintext = services.decrypt_text(
                context=audit_context(request),
                ciphertext=data["ciphertext"],
                bound_to=data["context"],
            )
        except crypto.CryptoError as exc:
            # A refusal naming the field at fault (the shape of every refusal, with `field`).
            return Response(
                {"detail": str(exc), "code": exc.code, "field": "ciphertext"}, status=400
            )
        return Response({"plaintext": plaintext})


class RotateRequest(serializers.Serializer):
    keep_data_keys = StrictBooleanField(
        required=False,
        default=False,
        help_text="Only re-wrap under the master key; no new data key versions.",
    )
    reason = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=2000,
        help_text="Why (kept with the second-approval request a rotation needs under SOX; "
        "else the X-Change-Reason header).",
    )


class KeysRotatedSerializer(serializers.Serializer):
    rotation = inline_serializer(
        "KeyRotationSummary",
        {
            "master_key_id": serializers.CharField(),
            "data_keys": serializers.IntegerField(),
            "rewrapped": serializers.IntegerField(),
            "new_data_keys": serializers.ListField(child=serializers.CharField()),
            "job_id": serializers.IntegerField(),
        },
    )
    job = JobSerializer()


class KeyRotationViewSet(BridgeViewSet):
    """Rotating the master and data keys (security/rotation.py), as `manage.py rotate_keys`."""

    schema = BodyRequiredSchema()
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "rotate": ("security.rotate_datakey",),
    }

    @extend_schema(
        tags=["security"],
        summary="Rotate keys: re-wrap under the master key, new data key versions, re-encrypt",
        description=(
            "Re-wraps every data key under the current master key (BRIDGE_MASTER_KEY), starts "
            "new data key versions and re-encrypts stored values in a job (Location: the job). "
            "With SOX_REQUIRE_SECOND_APPROVAL on nothing is rotated yet: the answer is an "
            "approval request (status awaiting_approval, Location: the request) that a second "
            "user with security.rotate_datakey approves at "
            "/api/compliance/approvals/{id}/approve, which rotates."
        ),
        request=RotateRequest,
        responses={
            202: PolymorphicProxySerializer(
                component_name="KeysRotatedOrAwaitingApproval",
                serializers=[KeysRotatedSerializer, AwaitingApprovalSerializer],
                resource_type_field_name=None,
            ),
            409: ErrorSerializer,
        },
    )
    def rotate(self, request: Request) -> Response:
        body = request_body(request, RotateRequest)
        new_data_keys = not body["keep_data_keys"]
        if approvals.requires_approval(ApprovalAction.KEY_ROTATION):
            return awaiting_approval(
                request,
                action=ApprovalAction.KEY_ROTATION,
                params={"new_data_keys": new_data_keys},
                reason=change_reason(request, body.get("reason"), "Key rotation"),
            )
        try:
            summary = rotation.rotate_keys(
                context=audit_context(request), new_data_keys=new_data_keys
            )
        except crypto.CryptoError as exc:
            return Response(
                {"detail": f"Rotation refused, nothing changed: {exc}", "code": "rotation_refused"},
                status=409,
            )
        job = Job.objects.get(pk=summary["job_id"])
        response = Response(
            {"rotation": summary, "job": JobSerializer(job, context={"request": request}).data},
            status=202,
        )
        response["Location"] = job_url(job, request)
        return response
