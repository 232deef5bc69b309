"""Other apps' admins in the console's look: unregistered and registered again on unfold.

Each class subclasses the app's own admin first (its forms, actions, filters and querysets
stay exactly as they were) and unfold's ModelAdmin second, as unfold's documentation does for
third-party admins. The apps' admin modules are imported here first so that their own
registrations exist to be replaced (bridge's admin module is discovered before theirs).
"""

from __future__ import annotations

from axes import admin as axes_admin
from axes.models import AccessAttempt, AccessAttemptExpiration, AccessFailureLog, AccessLog
from django.contrib import admin
from django.contrib.auth import admin as auth_admin
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest
from django_celery_beat import admin as beat_admin
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)
from django_otp.plugins.otp_totp import admin as totp_admin  # noqa: F401  (replaced below)
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework_simplejwt.token_blacklist import admin as blacklist_admin
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from unfold.admin import ModelAdmin, TabularInline
from unfold.widgets import UnfoldAdminSelectWidget, UnfoldAdminTextInputWidget

from bridge.admin import AppendOnlyAdmin, GuardedActionsMixin, utc_column

for model in (
    Group,
    AccessAttempt,
    AccessLog,
    AccessFailureLog,
    AccessAttemptExpiration,
    PeriodicTask,
    IntervalSchedule,
    CrontabSchedule,
    SolarSchedule,
    ClockedSchedule,
    OutstandingToken,
    BlacklistedToken,
    TOTPDevice,
):
    if admin.site.is_registered(model):
        admin.site.unregister(model)


# --- Groups -------------------------------------------------------------------------------


@admin.register(Group)
class GroupAdmin(auth_admin.GroupAdmin, ModelAdmin):
    pass


# --- django-axes: lockouts and login logs ---------------------------------------------------


def _with_utc(columns: tuple | list, *fields: str) -> tuple:
    """axes' list columns with its datetime fields shown as the console's UTC text."""
    return tuple(f"{name}_utc" if name in fields else name for name in columns)


@admin.register(AccessAttempt)
class AccessAttemptAdmin(axes_admin.AccessAttemptAdmin, ModelAdmin):
    # Not append-only: deleting an attempt is how an administrator lifts a lockout.
    attempt_time_utc = utc_column("attempt_time", "attempt time")
    list_display = _with_utc(axes_admin.AccessAttemptAdmin.list_display, "attempt_time")


@admin.register(AccessLog)
class AccessLogAdmin(axes_admin.AccessLogAdmin, AppendOnlyAdmin):
    attempt_time_utc = utc_column("attempt_time", "attempt time")
    logout_time_utc = utc_column("logout_time", "logout time")
    list_display = _with_utc(axes_admin.AccessLogAdmin.list_display, "attempt_time", "logout_time")


@admin.register(AccessFailureLog)
class AccessFailureLogAdmin(axes_admin.AccessFailureLogAdmin, AppendOnlyAdmin):
    attempt_time_utc = utc_column("attempt_time", "attempt time")
    list_display = _with_utc(axes_admin.AccessFailureLogAdmin.list_display, "attempt_time")


@admin.register(AccessAttemptExpiration)
class AccessAttemptExpirationAdmin(ModelAdmin):
    expires_at_utc = utc_column("expires_at", "expires at")
    list_display = ("access_attempt", "expires_at_utc")
    list_select_related = ("access_attempt",)
    readonly_fields = ("access_attempt", "expires_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


# --- django-celery-beat: the schedule Celery beat runs ----------------------------------------


class UnfoldTaskSelectWidget(UnfoldAdminSelectWidget, beat_admin.TaskSelectWidget):
    pass


class PeriodicTaskForm(beat_admin.PeriodicTaskForm):
    """beat's form (task choices, JSON checks) with unfold's widgets for its own fields."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.fields["task"].widget = UnfoldAdminTextInputWidget()
        self.fields["regtask"].widget = UnfoldTaskSelectWidget()


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(GuardedActionsMixin, beat_admin.PeriodicTaskAdmin, ModelAdmin):
    form = PeriodicTaskForm
    # beat's own template adds an inline <script> (crontab help text), which the
    # Content-Security-Policy refuses; the read-only "crontab translation" field says the same.
    change_form_template = None
    last_run_at_utc = utc_column("last_run_at", "last run at")
    start_time_utc = utc_column("start_time", "start time")
    list_display = _with_utc(beat_admin.PeriodicTaskAdmin.list_display, "last_run_at", "start_time")


class PeriodicTaskInline(beat_admin.PeriodicTaskInline, TabularInline):
    pass


class ScheduleAdmin(ModelAdmin):
    inlines = [PeriodicTaskInline]


@admin.register(IntervalSchedule)
class IntervalScheduleAdmin(ScheduleAdmin):
    pass


@admin.register(CrontabSchedule)
class CrontabScheduleAdmin(beat_admin.CrontabScheduleAdmin, ScheduleAdmin):
    inlines = [PeriodicTaskInline]


@admin.register(SolarSchedule)
class SolarScheduleAdmin(ScheduleAdmin):
    pass


@admin.register(ClockedSchedule)
class ClockedScheduleAdmin(beat_admin.ClockedScheduleAdmin, ScheduleAdmin):
    inlines = [PeriodicTaskInline]


# --- simplejwt's token blacklist (read-only there already) ----------------------------------


@admin.register(OutstandingToken)
class OutstandingTokenAdmin(blacklist_admin.OutstandingTokenAdmin, AppendOnlyAdmin):
    created_at_utc = utc_column("created_at", "created at")
    expires_at_utc = utc_column("expires_at", "expires at")
    list_display = ("jti", "user", "created_at_utc", "expires_at_utc")


@admin.register(BlacklistedToken)
class BlacklistedTokenAdmin(blacklist_admin.BlacklistedTokenAdmin, AppendOnlyAdmin):
    blacklisted_at_utc = utc_column("blacklisted_at", "blacklisted at")
    list_display = _with_utc(blacklist_admin.BlacklistedTokenAdmin.list_display, "blacklisted_at")


# --- django-otp: users' authenticators -------------------------------------------------------


@admin.register(TOTPDevice)
class TOTPDeviceAdmin(ModelAdmin):
    """Who enrolled an authenticator, and when it was last used. Not django-otp's own admin:
    that one shows the secret and its QR code to whoever may view the row, which would let an
    administrator copy anyone's second factor. Here the secret never shows; removing a device
    (a lost phone) is audited, and its owner enrols again at the next login (security/otp.py).
    """

    list_display = ("user", "name", "confirmed", "created_at_utc", "last_used_at_utc")
    list_filter = ("confirmed",)
    list_select_related = ("user",)
    search_fields = ("user__username",)
    fields = ("user", "name", "confirmed", "created_at", "last_used_at", "throttling_failure_count")
    readonly_fields = fields
    created_at_utc = utc_column("created_at", "enrolled at")
    last_used_at_utc = utc_column("last_used_at", "last used at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # each user enrols their own, on their own page

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: TOTPDevice) -> None:
        self.delete_queryset(request, TOTPDevice.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        from compliance.audit import AuditContext
        from security import otp

        otp.remove_devices(
            devices=queryset, context=AuditContext.from_request(request), reason="console"
        )
