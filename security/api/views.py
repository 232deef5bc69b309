from typing import ClassVar

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bridge.api import BridgeViewSet, ErrorSerializer, audit_context
from security import crypto, services
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
