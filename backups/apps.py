from django.apps import AppConfig


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "Backups"

    def ready(self) -> None:
        from backups import services, tasks  # noqa: F401  (registers the job kinds everywhere)
        from security import rotation

        # Backups keep their data keys in their own rows: rotate_keys re-wraps them too.
        if services.rewrap_keys not in rotation.REWRAP_HOOKS:
            rotation.register_rewrap(services.rewrap_keys)
