from django.apps import AppConfig


class SecurityConfig(AppConfig):
    name = "security"

    def ready(self) -> None:
        from security import schema, tasks  # noqa: F401  (the OpenAPI bearer scheme; job kinds)
        from security.keys import check_signing_key_at_startup
        from security.otp import check_required_roles
        from security.ratelimit import check_rate_limits
        from security.threats import check_threat_settings, observe_audit_trail

        check_signing_key_at_startup()
        check_rate_limits()
        check_threat_settings()
        observe_audit_trail()  # failed logins, token reuse, decryptions and exports are scored
        check_required_roles()

        # Segregation of duties: an approved key-rotation request is carried out here.
        from compliance import approvals
        from compliance.choices import ApprovalAction
        from security.rotation import rotate_approved

        approvals.register_executor(ApprovalAction.KEY_ROTATION, rotate_approved)
