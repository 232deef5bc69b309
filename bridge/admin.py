"""Console pieces shared by every area: read-only records, times in UTC, JSON shown formatted,
status labels, progress bars and the job mixin; on django-unfold's admin classes."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.db.models import Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from unfold.admin import ModelAdmin
from unfold.decorators import display

from bridge import jobs
from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext

# unfold's label colours (unfold/helpers/label.html) for each job status.
JOB_VARIANTS = {
    JobStatus.PENDING: "",
    JobStatus.RUNNING: "info",
    JobStatus.SUCCEEDED: "success",
    JobStatus.FAILED: "danger",
    JobStatus.CANCELLED: "warning",
}


# --- Display helpers ------------------------------------------------------------------------


def utc_text(moment: datetime | None) -> str:
    """Every time in the console: to the second, and saying it is UTC."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def utc_column(field: str, description: str | None = None) -> Callable[[Any, Model], str]:
    """A list/detail column showing the datetime `field` as `utc_text` (sortable by it).

    Django would format it with the locale's format (no seconds, no zone) in lists and
    detail pages alike; one helper keeps every Bridge page the same.
    """

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def column(model_admin: Any, obj: Model) -> str:
        # Never broken over lines: a time split after its date reads as two values.
        return format_html('<span class="bridge-nowrap">{}</span>', utc_text(getattr(obj, field)))

    column.__name__ = f"{field}_utc"
    return column


def label(text: str, variant: str = "") -> SafeString:
    """A coloured label in unfold's look: variant success, info, warning, danger or ''."""
    return mark_safe(  # noqa: S308 (a template with autoescaping renders it)
        render_to_string("unfold/helpers/label.html", {"text": text, "type": variant})
    )


def pretty_json(value: Any) -> SafeString:
    """JSON as an indented block (sorted keys) for a detail page."""
    if isinstance(value, str):
        try:
            value = json.loads(value or "{}")
        except ValueError:
            return format_html('<pre class="bridge-json">{}</pre>', value)
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre class="bridge-json">{}</pre>', text)


def truncated(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis; the whole of it in a tooltip."""
    if not text:
        return "-"
    if len(text) <= limit:
        return format_html('<span class="bridge-nowrap">{}</span>', text)
    return format_html('<span class="bridge-nowrap" title="{}">{}…</span>', text, text[: limit - 1])


def progress(
    percent: int | None, done: int, total: int | None, *, final: bool = False
) -> SafeString:
    """A progress bar in unfold's look, with the percentage written next to it ("…" while
    the total is unknown, "-" for a run that ended before it knew)."""
    return mark_safe(  # noqa: S308 (a template with autoescaping renders it)
        render_to_string(
            "bridge/progress.html",
            {
                "percent": percent,
                "unknown": "-" if final else "…",
                "title": f"{done} of {total if total is not None else '?'}",
            },
        )
    )


def job_progress(job: Job | None) -> SafeString | str:
    """The progress bar of a job row (an area's record shows its job's)."""
    if job is None:
        return "-"
    return progress(job.percent, job.progress_done, job.progress_total, final=job.is_final)


# --- Append-only and read-only records --------------------------------------------------------


class GuardedActionsMixin:
    """Actions that declare no permission need the change permission.

    Django offers such an action to anyone who may view the list: a view-only role could then
    disable beat's tasks (the audit sealer among them) from the periodic-task list.
    """

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        if self.has_change_permission(request):
            return actions
        return {
            name: action
            for name, action in actions.items()
            if getattr(action[0], "allowed_permissions", None)
        }


class AppendOnlyAdmin(ModelAdmin):
    """Records written once and never changed: no History button and no history page (there
    is no change to show: such rows are inserted once and never updated)."""

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> HttpResponse:
        context = {"show_history": False, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, context)

    def history_view(
        self, request: HttpRequest, object_id: str, extra_context: dict | None = None
    ) -> HttpResponse:
        raise Http404("Append-only records have no change history.")


class ReadOnlyAdmin(AppendOnlyAdmin):
    """Append-only records: visible to those allowed to view them, never edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list:
        # Display methods in the declared fieldsets must be read-only fields, or the form
        # factory would look for model fields of those names. (The declared ones, not
        # get_fieldsets(): without declared fieldsets that builds a form, which asks this.)
        declared = flatten_fieldsets(self.fieldsets) if self.fieldsets else []
        return [*super().get_readonly_fields(request, obj), *declared]


# --- Jobs -------------------------------------------------------------------------------------


class JobAdminMixin:
    """A job list in the console: status label, a progress bar, a cancel action, and a
    read-only detail page with the parameters and result formatted."""

    actions = ["cancel_jobs"]
    list_per_page = 50

    created = utc_column("created_at", "created")
    started = utc_column("started_at", "started")
    finished = utc_column("finished_at", "finished")
    heartbeat = utc_column("heartbeat_at", "last heartbeat")

    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "kind_title",
                    "status_label",
                    "progress_bar",
                    "progress_message",
                    "actor_username",
                    "cancel_requested",
                    "error",
                )
            },
        ),
        ("Times", {"fields": ("created", "started", "finished", "heartbeat", "duration")}),
        ("Parameters and result", {"fields": ("params_json", "result_json", "task_id")}),
    )

    @admin.display(description="status", ordering="status")
    def status_label(self, job: Job) -> str:
        return label(job.get_status_display(), JOB_VARIANTS.get(job.status, ""))

    @admin.display(description="progress")
    def progress_bar(self, job: Job) -> str:
        return job_progress(job)

    @admin.display(description="kind", ordering="kind")
    def kind_title(self, job: Job) -> str:
        spec = jobs.kind_of(job)
        return spec.title if spec else job.kind

    @display(description="kind", ordering="kind", header=True)
    def kind_and_actor(self, job: Job) -> tuple[str, str]:
        # Two lines in one column (unfold's header cell): what ran, and for whom.
        return self.kind_title(job), f"by {job.actor_username or 'the system'}"

    @admin.display(description="duration")
    def duration(self, job: Job) -> str:
        seconds = job.duration_seconds
        return "-" if seconds is None else f"{seconds:.1f} s"

    @admin.display(description="parameters")
    def params_json(self, job: Job) -> str:
        return pretty_json(job.params)

    @admin.display(description="result")
    def result_json(self, job: Job) -> str:
        return pretty_json(job.result)

    @admin.display(description="error")
    def error_short(self, job: Job) -> str:
        return truncated(job.error, 32)

    @admin.action(description="Cancel the selected jobs")
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        done, refused = 0, []
        for job in queryset:
            spec = jobs.kind_of(job)
            if spec is None or not request.user.has_perm(spec.cancel_permission):
                refused.append(f"{job.pk}: not allowed")
                continue
            try:
                jobs.cancel_job(job=job, context=AuditContext.from_request(request))
                done += 1
            except jobs.JobError as error:
                refused.append(f"{job.pk}: {error}")
        if done:
            self.message_user(request, f"Cancelled or asked to stop {done} job(s).")
        if refused:
            self.message_user(request, "Not cancelled: " + "; ".join(refused), messages.WARNING)


@admin.register(Job)
class JobAdmin(JobAdminMixin, ReadOnlyAdmin):
    list_display = (
        "id",
        "kind_and_actor",
        "status_label",
        "progress_bar",
        "created",
        "duration",
        "error_short",
    )
    list_filter = ("status", "kind")
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return jobs.visible_jobs(request.user)

    def has_view_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return any(request.user.has_perm(kind.permission) for kind in jobs.KINDS.values())

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)


# Third-party admins (auth groups, axes, django-celery-beat, simplejwt) in the same look.
from bridge import admin_thirdparty  # noqa: E402, F401
