from django.apps import AppConfig


class RecoveryConfig(AppConfig):
    name = "recovery"

    def ready(self) -> None:
        from recovery import heal_tasks  # noqa: F401  (registers the heal job kind everywhere)
