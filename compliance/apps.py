from django.apps import AppConfig


class ComplianceConfig(AppConfig):
    name = "compliance"

    def ready(self) -> None:
        from compliance import signals, tasks  # noqa: F401  (audit receivers; job kinds)
