"""The operator console: django-unfold's admin site, with the panel dashboard as its index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from unfold.sites import UnfoldAdminSite


class BridgeAdminSite(UnfoldAdminSite):
    """Every area's console pages, and a dashboard built from the panels apps register."""

    site_header = "Bridge console"
    site_title = "Bridge"
    index_title = "Dashboard"
    # The login form asks for the authenticator code too (security/otp.py).
    login_template = "security/console_login.html"

    def __init__(self, name: str = "admin") -> None:
        super().__init__(name)
        from security.otp import ConsoleLoginForm

        self.login_form = ConsoleLoginForm

    def get_urls(self) -> list[URLPattern]:
        two_factor = path("account/two-factor/", self.admin_view(self.two_factor), name="otp_enrol")
        return [two_factor, *super().get_urls()]

    def two_factor(self, request: HttpRequest) -> HttpResponse:
        """Enrol an authenticator for one's own account (security/otp.py)."""
        from security.otp import enrolment_view

        return enrolment_view(request, self)

    def each_context(self, request: HttpRequest) -> dict[str, Any]:
        context = super().each_context(request)
        if getattr(request, "otp_enrolment_pending", False):
            # Nothing else to navigate to before an authenticator is enrolled.
            enrol = {
                "title": "Two-factor authentication",
                "icon": "password",
                "link": reverse("admin:otp_enrol"),
                "has_permission": True,
                "active": True,
            }
            context["sidebar_navigation"] = [{"title": "Your account", "items": [enrol]}]
            context["sidebar_show_all_applications"] = False
            context["available_apps"] = []
        return context

    def index(self, request: HttpRequest, extra_context: dict | None = None) -> TemplateResponse:
        from bridge.panels import build_panels

        context = {"panels": build_panels(request)}
        context.update(extra_context or {})
        return super().index(request, context)


# --- Sidebar (UNFOLD["SIDEBAR"]["navigation"] names this function) ------------------------


def can(*permissions: str) -> Callable[[HttpRequest], bool]:
    """A sidebar permission check: the user holds at least one of `permissions`."""

    def check(request: HttpRequest) -> bool:
        return any(request.user.has_perm(permission) for permission in permissions)

    return check


def can_see_jobs(request: HttpRequest) -> bool:
    from bridge import jobs

    return any(request.user.has_perm(kind.permission) for kind in jobs.KINDS.values())


def _item(title: str, icon: str, url_name: str, permission: Callable) -> dict[str, Any]:
    return {"title": title, "icon": icon, "link": reverse(url_name), "permission": permission}


def sidebar_navigation(request: HttpRequest) -> list[dict[str, Any]]:
    """The console's sidebar, one group per area; unfold shows an item only when its
    `permission` says yes, and hides a group left with no item."""
    return [
        {
            "title": "Overview",
            "items": [_item("Dashboard", "dashboard", "admin:index", can_see_console)],
        },
        {
            "title": "Compliance",
            "items": [
                _item(
                    "Audit events",
                    "receipt_long",
                    "admin:compliance_auditevent_changelist",
                    can("compliance.view_auditevent"),
                ),
                _item(
                    "Verifications",
                    "verified",
                    "admin:compliance_auditverification_changelist",
                    can("compliance.view_auditverification"),
                ),
                _item(
                    "Checkpoints",
                    "approval",
                    "admin:compliance_auditcheckpoint_changelist",
                    can("compliance.view_auditcheckpoint"),
                ),
                _item(
                    "Data subject requests",
                    "assignment_ind",
                    "admin:compliance_datasubjectrequest_changelist",
                    can("compliance.view_datasubjectrequest"),
                ),
                _item(
                    "Consent",
                    "how_to_reg",
                    "admin:compliance_consentevent_changelist",
                    can("compliance.view_consentevent"),
                ),
                _item(
                    "Privacy notices",
                    "policy",
                    "admin:compliance_privacynotice_changelist",
                    can("compliance.view_privacynotice"),
                ),
                _item(
                    "Violations",
                    "report",
                    "admin:compliance_complianceviolation_changelist",
                    can("compliance.view_complianceviolation"),
                ),
                _item(
                    "Reports",
                    "summarize",
                    "admin:compliance_compliancereport_changelist",
                    can("compliance.view_compliancereport"),
                ),
                _item(
                    "SOX changes",
                    "difference",
                    "admin:compliance_soxchange_changelist",
                    can("compliance.view_soxchange"),
                ),
                _item(
                    "Approvals",
                    "approval_delegation",
                    "admin:compliance_approvalrequest_changelist",
                    can("compliance.view_approvalrequest"),
                ),
                _item(
                    "Legal holds",
                    "gavel",
                    "admin:compliance_legalhold_changelist",
                    can("compliance.view_legalhold"),
                ),
                _item(
                    "Audit purges",
                    "delete_sweep",
                    "admin:compliance_auditpurge_changelist",
                    can("compliance.view_auditpurge"),
                ),
            ],
        },
        {
            "title": "Security",
            "items": [
                _item(
                    "Sessions",
                    "key",
                    "admin:security_tokenfamily_changelist",
                    can("security.view_tokenfamily"),
                ),
                _item(
                    "Lockouts",
                    "lock",
                    "admin:axes_accessattempt_changelist",
                    can("axes.view_accessattempt"),
                ),
                _item(
                    "Login failures",
                    "gpp_bad",
                    "admin:axes_accessfailurelog_changelist",
                    can("axes.view_accessfailurelog"),
                ),
                _item(
                    "Access log",
                    "login",
                    "admin:axes_accesslog_changelist",
                    can("axes.view_accesslog"),
                ),
                _item(
                    "IP bans",
                    "block",
                    "admin:security_ipban_changelist",
                    can("security.view_ipban"),
                ),
                _item(
                    "Signing keys",
                    "vpn_key",
                    "admin:security_signingkey_changelist",
                    can("security.view_signingkey"),
                ),
                _item(
                    "Threat events",
                    "crisis_alert",
                    "admin:security_threatevent_changelist",
                    can("security.view_threatevent"),
                ),
                _item(
                    "Address activity",
                    "lan",
                    "admin:security_ipactivity_changelist",
                    can("security.view_ipactivity"),
                ),
                _item(
                    "User activity",
                    "person_alert",
                    "admin:security_useractivity_changelist",
                    can("security.view_useractivity"),
                ),
                _item(
                    "Data keys",
                    "key",
                    "admin:security_datakey_changelist",
                    can("security.view_datakey"),
                ),
                _item(
                    "Subject keys",
                    "fingerprint",
                    "admin:security_subjectkey_changelist",
                    can("security.view_subjectkey"),
                ),
                _item(
                    "Stored secrets",
                    "lock",
                    "admin:security_storedsecret_changelist",
                    can("security.view_storedsecret"),
                ),
            ],
        },
        {
            "title": "Backups",
            "items": [
                _item(
                    "Backups",
                    "backup",
                    "admin:backups_backup_changelist",
                    can("backups.view_backup"),
                ),
                _item(
                    "Restores and drills",
                    "settings_backup_restore",
                    "admin:backups_restorejob_changelist",
                    can("backups.view_restorejob"),
                ),
                _item(
                    "Archived WAL",
                    "history",
                    "admin:backups_walsegment_changelist",
                    can("backups.view_walsegment"),
                ),
            ],
        },
        {
            "title": "Recovery & platform",
            "items": [
                _item(
                    "Services",
                    "monitor_heart",
                    "admin:recovery_service_changelist",
                    can("recovery.view_service"),
                ),
                _item(
                    "Health transitions",
                    "swap_vert",
                    "admin:recovery_healthtransition_changelist",
                    can("recovery.view_healthtransition"),
                ),
                _item(
                    "Health checks",
                    "ecg_heart",
                    "admin:recovery_healthcheck_changelist",
                    can("recovery.view_healthcheck"),
                ),
                _item(
                    "Alerts",
                    "notifications",
                    "admin:recovery_alert_changelist",
                    can("recovery.view_alert"),
                ),
                _item(
                    "Heal operations",
                    "healing",
                    "admin:recovery_healoperation_changelist",
                    can("recovery.view_healoperation"),
                ),
                _item("Jobs", "pending_actions", "admin:bridge_job_changelist", can_see_jobs),
                _item(
                    "Periodic tasks",
                    "schedule",
                    "admin:django_celery_beat_periodictask_changelist",
                    can("django_celery_beat.view_periodictask"),
                ),
                _item(
                    "Intervals",
                    "timer",
                    "admin:django_celery_beat_intervalschedule_changelist",
                    can("django_celery_beat.view_intervalschedule"),
                ),
                _item(
                    "Crontabs",
                    "calendar_month",
                    "admin:django_celery_beat_crontabschedule_changelist",
                    can("django_celery_beat.view_crontabschedule"),
                ),
            ],
        },
        {
            "title": "Users & groups",
            "items": [
                _item(
                    "Users",
                    "person",
                    "admin:security_user_changelist",
                    can("security.view_user"),
                ),
                _item("Groups", "group", "admin:auth_group_changelist", can("auth.view_group")),
                _item(
                    "Authenticators",
                    "phonelink_lock",
                    "admin:otp_totp_totpdevice_changelist",
                    can("otp_totp.view_totpdevice"),
                ),
                _item("Two-factor authentication", "password", "admin:otp_enrol", can_see_console),
            ],
        },
    ]


def can_see_console(request: HttpRequest) -> bool:
    return bool(request.user.is_active and request.user.is_staff)
