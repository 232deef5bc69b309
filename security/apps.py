from django.apps import AppConfig


class SecurityConfig(AppConfig):
    name = "security"

    def ready(self) -> None:
        from security import schema  # noqa: F401  (registers the OpenAPI bearer scheme)
        from security.keys import check_signing_key_at_startup
        from security.ratelimit import check_rate_limits

        check_signing_key_at_startup()
        check_rate_limits()
