from django.apps import AppConfig
from django.contrib.admin.apps import AdminConfig


class BridgeAdminConfig(AdminConfig):
    default_site = "bridge.admin_site.BridgeAdminSite"


class BridgeConfig(AppConfig):
    """The small shared platform: jobs, API base classes, roles, console panels."""

    name = "bridge"
    label = "bridge"
    verbose_name = "Platform"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from bridge import permission_cache, roles  # noqa: F401  (roles: the post_migrate sync)

        permission_cache.connect_invalidation()
