from django.apps import AppConfig


class ComplianceConfig(AppConfig):
    name = "compliance"

    def ready(self) -> None:
        from compliance import signals, tasks  # noqa: F401  (audit receivers; job kinds)
        from compliance.monitoring import check_settings, observe_audit_trail

        check_settings()
        observe_audit_trail()  # rules evaluated on the events that change their answer

        # SOX change capture: triggers follow the settings after every migrate (and a test
        # database's flush); SQLite installs them per connection.
        from django.db.backends.signals import connection_created
        from django.db.models.signals import post_migrate, pre_migrate

        from compliance import sox

        pre_migrate.connect(sox.before_migrate, sender=self, dispatch_uid="bridge_sox_pre")
        post_migrate.connect(sox.after_migrate, sender=self, dispatch_uid="bridge_sox_post")
        connection_created.connect(sox.on_connection_created, dispatch_uid="bridge_sox_conn")

        # Retention: the append-only guard that lets only a purge's own range through
        # (no migration replaces the function, so every migrate installs it).
        from compliance.retention import install_purge_guard_after_migrate

        post_migrate.connect(
            install_purge_guard_after_migrate, sender=self, dispatch_uid="bridge_purge_guard"
        )
