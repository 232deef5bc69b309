from django.apps import AppConfig


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "Backups"

    def ready(self) -> None:
        # Importing tasks registers the job kinds in every process.
        from backups import services, targets, tasks  # noqa: F401
        from recovery import monitor
        from security import rotation

        # Remote targets are probed by the recovery monitor: their health and breaker show
        # in /api/recovery/status beside the retries of their uploads.
        monitor.register_builtin_provider(targets.monitored_services)

        # Backups keep their data keys in their own rows: rotate_keys re-wraps them too.
        if services.rewrap_keys not in rotation.REWRAP_HOOKS:
            rotation.register_rewrap(services.rewrap_keys)

        # Segregation of duties: an approved live-restore request is carried out here.
        from compliance import approvals
        from compliance.choices import ApprovalAction

        approvals.register_executor(ApprovalAction.LIVE_RESTORE, services.restore_approved)
