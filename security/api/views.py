from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bridge.api import ErrorSerializer
from security import services
from security.api.serializers import (
    LoginSerializer,
    LogoutResultSerializer,
    RefreshSerializer,
    TokenPairSerializer,
)
from security.authentication import VersionedJWTAuthentication


def _refusal(error: services.AuthError) -> Response:
    response = Response({"detail": str(error), "code": error.code}, status=error.status)
    if isinstance(error, services.LockedOut):
        response["Retry-After"] = str(error.retry_after)
    return response


class LoginView(APIView):
    """Exchange a username and password for an access and a refresh token."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        tags=["security"],
        request=LoginSerializer,
        responses={200: TokenPairSerializer, 401: ErrorSerializer, 429: ErrorSerializer},
    )
    def post(self, request: Request) -> Response:
        payload = LoginSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        try:
            pair = services.login(request=request._request, **payload.validated_data)
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
