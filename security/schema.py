from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme


class VersionedJWTScheme(SimpleJWTScheme):
    """Tells the OpenAPI schema that our JWT authenticator is a bearer scheme."""

    target_class = "security.authentication.VersionedJWTAuthentication"
    name = "jwtAuth"
