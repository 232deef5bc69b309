from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import AuthenticationFailed
from rest_framework_simplejwt.tokens import Token

from security.models import User


class VersionedJWTAuthentication(JWTAuthentication):
    """simplejwt's authenticator plus the per-user token version check.

    The user row is loaded by simplejwt anyway, so revoking every access token of a user
    (logout, refresh-token theft) costs no extra query per request.
    """

    def get_user(self, validated_token: Token) -> User:
        user = super().get_user(validated_token)
        if validated_token.get("ver") != user.token_version:
            raise AuthenticationFailed("Token has been revoked.", code="token_revoked")
        return user
