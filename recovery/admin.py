"""The recovery area's console: services with their health, latency and breaker at a glance,
actions to check, heal and reset a breaker, and the read-only history behind them (checks,
transitions, alerts; heal operations in admin_heal.py)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString
from unfold.admin import ModelAdmin

from bridge.admin import GuardedActionsMixin, ReadOnlyAdmin, label, truncated, utc_column
from compliance.audit import AuditContext
from recovery import (
    admin_heal,  # noqa: F401  (registers the heal operations' admin)
    catalog,
    monitor,
)
from recovery.choices import HealthStatus
from recovery.models import Alert, HealthCheck, HealthTransition, Service

STATUS_VARIANTS = {
    HealthStatus.UP: "success",
    HealthStatus.DEGRADED: "warning",
    HealthStatus.DOWN: "danger",
    HealthStatus.UNKNOWN: "",
    HealthStatus.MAINTENANCE: "info",
}
BREAKER_VARIANTS = {
    "closed": "success",
    "open": "danger",
    "half_open": "warning",
    "forced_open": "danger",
    "disabled": "",
}
SPARK_POINTS = 30
SPARK_WIDTH, SPARK_HEIGHT = 120, 24


def status_label(status: str) -> SafeString:
    return label(
        HealthStatus(status).label if status in HealthStatus.values else status,
        STATUS_VARIANTS.get(status, ""),
    )


def sparkline(checks: list[HealthCheck]) -> SafeString:
    """Latency of the last checks as an inline SVG line (oldest left), failed checks as red
    dots on the baseline: no script, so nothing for the Content-Security-Policy to allow."""
    if not checks:
        return format_html("{}", "-")
    checks = list(reversed(checks))
    peak = max((check.latency_ms or 0.0) for check in checks) or 1.0
    step = SPARK_WIDTH / max(len(checks) - 1, 1)
    points, dots = [], []
    for index, check in enumerate(checks):
        x = round(index * step, 1)
        if check.ok and check.latency_ms is not None:
            y = round(SPARK_HEIGHT - 2 - (check.latency_ms / peak) * (SPARK_HEIGHT - 4), 1)
            points.append(f"{x},{y}")
        else:
            dots.append(f'<circle cx="{x}" cy="{SPARK_HEIGHT - 2}" r="1.8" fill="#dc2626"/>')
    latest = checks[-1].latency_ms
    title = f"last {len(checks)} checks; peak {peak:.0f} ms" + (
        f", latest {latest:.0f} ms" if latest is not None else ""
    )
    # Only numbers go into the markup built here; the title is escaped by format_html.
    return format_html(
        '<svg width="{}" height="{}" viewBox="0 0 {} {}" role="img" aria-label="{}">'
        "<title>{}</title>"
        '<polyline points="{}" fill="none" stroke="#2563eb" stroke-width="1.5"/>{}</svg>',
        SPARK_WIDTH,
        SPARK_HEIGHT,
        SPARK_WIDTH,
        SPARK_HEIGHT,
        title,
        title,
        " ".join(points),
        SafeString("".join(dots)),
    )


class ServiceForm(forms.ModelForm):
    class Meta:
        model = Service
        fields = [
            "name",
            "kind",
            "target",
            "credential",
            "check_interval",
            "timeout_ms",
            "critical",
            "depends_on",
            "expect_status",
            "expect_body",
            "enabled",
            "maintenance",
            "heal_strategies",
            "restart_command",
            "standby_target",
        ]

    def clean(self) -> dict:
        data = super().clean()
        values = {key: value for key, value in data.items() if key in self.changed_data}
        if "depends_on" in values:
            values["depends_on"] = list(values["depends_on"])
        try:
            catalog.validate_service(values, instance=self.instance if self.instance.pk else None)
        except ValidationError as error:
            for field, errors in error.error_dict.items():
                self.add_error(field if field in self.fields else None, errors)
        return data


@admin.register(Service)
class ServiceAdmin(GuardedActionsMixin, ModelAdmin):
    form = ServiceForm
    list_display = (
        "name",
        "kind",
        "health",
        "latency",
        "breaker_state",
        "last_checked",
        "critical",
        "enabled",
        "builtin",
    )
    list_filter = ("status", "kind", "critical", "enabled", "builtin", "maintenance")
    search_fields = ("name", "target")
    list_select_related = ("credential",)
    filter_horizontal = ("depends_on",)
    actions = ["check_now", "reset_breaker", "heal_now"]
    last_checked = utc_column("last_checked_at", "last checked")
    status_since_utc = utc_column("status_since", "status since")
    fieldsets = (
        (None, {"fields": ("name", "kind", "target", "credential", "builtin")}),
        (
            "Checks",
            {
                "fields": (
                    "check_interval",
                    "timeout_ms",
                    "critical",
                    "depends_on",
                    "expect_status",
                    "expect_body",
                    "enabled",
                    "maintenance",
                )
            },
        ),
        ("Self-healing", {"fields": ("heal_strategies", "restart_command", "standby_target")}),
        (
            "Health",
            {
                "fields": (
                    "health",
                    "reason",
                    "status_since_utc",
                    "latency",
                    "breaker_state",
                    "consecutive_failures",
                    "consecutive_successes",
                )
            },
        ),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Service | None = None) -> tuple:
        shown = (
            "builtin",
            "health",
            "reason",
            "status_since_utc",
            "latency",
            "breaker_state",
            "consecutive_failures",
            "consecutive_successes",
        )
        if obj is not None and obj.builtin:
            return (*shown, "name", "kind", "target", "credential")
        if obj is not None:
            return (*shown, "name")
        return shown

    def has_delete_permission(self, request: HttpRequest, obj: Service | None = None) -> bool:
        if obj is not None and obj.builtin:
            return False
        return super().has_delete_permission(request, obj)

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        monitor.ensure_builtin_services()
        return super().changelist_view(request, extra_context)

    def save_model(self, request: HttpRequest, obj: Service, form: Any, change: bool) -> None:
        was = Service.objects.filter(pk=obj.pk).values_list("maintenance", flat=True).first()
        if change:
            # Only what the form changed: the monitor may have written status and counters
            # since this page was loaded.
            written = [name for name in form.changed_data if name != "depends_on"]
            obj.save(update_fields=[*written, "updated_at"])
        else:
            super().save_model(request, obj, form, change)
        catalog.maintenance_changed(obj, bool(was))

    @admin.display(description="health", ordering="status")
    def health(self, service: Service) -> SafeString:
        status, _ = monitor.effective_status(service)
        return status_label(status)

    @admin.display(description="reason")
    def reason(self, service: Service) -> str:
        return truncated(monitor.effective_status(service)[1], 120)

    @admin.display(description="latency")
    def latency(self, service: Service) -> SafeString:
        return sparkline(list(service.checks.all()[:SPARK_POINTS]))

    @admin.display(description="breaker")
    def breaker_state(self, service: Service) -> SafeString:
        from recovery.api.services import breaker_snapshot

        snapshot = breaker_snapshot(service.name)
        state = snapshot.get("state") or "unreadable"
        return label(state.replace("_", " "), BREAKER_VARIANTS.get(state, "warning"))

    # --- Actions ---------------------------------------------------------------------------

    def has_check_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("recovery.check_service")

    def has_heal_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("recovery.heal_service")

    @admin.action(description="Check now", permissions=["check"])
    def check_now(self, request: HttpRequest, queryset: QuerySet[Service]) -> None:
        context = AuditContext.from_request(request)
        results = []
        for service in queryset:
            check = catalog.check_service(context=context, service=service)
            results.append(f"{service.name}: {service.status} ({check.detail or 'ok'})")
        self.message_user(request, "Checked " + "; ".join(results))

    @admin.action(description="Reset breaker", permissions=["heal"])
    def reset_breaker(self, request: HttpRequest, queryset: QuerySet[Service]) -> None:
        from recovery import breaker

        context = AuditContext.from_request(request)
        names = []
        for service in queryset:
            breaker.reset(service.name, context=context)
            names.append(service.name)
        self.message_user(request, f"Closed the breaker of {', '.join(names)}.")

    @admin.action(description="Heal now", permissions=["heal"])
    def heal_now(self, request: HttpRequest, queryset: QuerySet[Service]) -> None:
        from recovery import healing

        context = AuditContext.from_request(request)
        started, refused = [], []
        for service in queryset:
            try:
                operation = healing.start_heal(service=service, context=context)
            except Exception as error:  # a guardrail's refusal (HealRefused) names itself
                refused.append(f"{service.name}: {error}")
                continue
            started.append(f"{service.name} (#{operation.pk})")
        if started:
            self.message_user(request, "Healing started: " + ", ".join(started))
        if refused:
            self.message_user(request, "Not started: " + "; ".join(refused), messages.WARNING)


@admin.register(HealthCheck)
class HealthCheckAdmin(ReadOnlyAdmin):
    list_display = ("service", "checked", "result", "latency_ms", "detail_short", "forced")
    list_filter = ("ok", "forced", "service")
    list_select_related = ("service",)
    search_fields = ("=service__name",)
    date_hierarchy = "checked_at"
    fields = ("service", "checked", "ok", "latency_ms", "detail", "forced")
    checked = utc_column("checked_at", "checked")

    @admin.display(description="result", ordering="ok")
    def result(self, check: HealthCheck) -> SafeString:
        return label("passed", "success") if check.ok else label("failed", "danger")

    @admin.display(description="detail")
    def detail_short(self, check: HealthCheck) -> str:
        return truncated(check.detail, 60)


@admin.register(HealthTransition)
class HealthTransitionAdmin(ReadOnlyAdmin):
    list_display = ("service", "when", "from_label", "to_label", "reason_short")
    list_filter = ("to_status", "service")
    list_select_related = ("service",)
    search_fields = ("=service__name", "reason")
    date_hierarchy = "at"
    fields = ("service", "when", "from_status", "to_status", "reason")
    when = utc_column("at", "at")

    @admin.display(description="from", ordering="from_status")
    def from_label(self, transition: HealthTransition) -> SafeString:
        return status_label(transition.from_status)

    @admin.display(description="to", ordering="to_status")
    def to_label(self, transition: HealthTransition) -> SafeString:
        return status_label(transition.to_status)

    @admin.display(description="reason")
    def reason_short(self, transition: HealthTransition) -> str:
        return truncated(transition.reason, 80)


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    list_display = ("created", "channel", "subject", "service", "delivery", "attempts")
    list_filter = ("channel", "delivered")
    list_select_related = ("service",)
    search_fields = ("subject",)
    date_hierarchy = "created_at"
    fields = (
        "created",
        "channel",
        "service",
        "subject",
        "body",
        "delivered",
        "delivery_result",
        "attempts",
    )
    created = utc_column("created_at", "created")

    @admin.display(description="delivery", ordering="delivered")
    def delivery(self, alert: Alert) -> SafeString:
        if alert.delivered:
            return label("delivered", "success")
        return label(f"not delivered: {alert.delivery_result[:60]}", "danger")
