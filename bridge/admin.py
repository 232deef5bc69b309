"""Console pieces shared by every area: read-only records and the job mixin."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from bridge import jobs
from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext

_JOB_COLOURS = {
    JobStatus.PENDING: "#777",
    JobStatus.RUNNING: "#417690",
    JobStatus.SUCCEEDED: "#2e9e44",
    JobStatus.FAILED: "#d1302f",
    JobStatus.CANCELLED: "#e0a100",
}


class ReadOnlyAdmin(admin.ModelAdmin):
    """Append-only records: visible to those allowed to view them, never edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class JobAdminMixin:
    """A job list in the console: coloured status, a progress bar, a cancel action."""

    actions = ["cancel_jobs"]
    readonly_fields = [field.name for field in Job._meta.fields]

    @admin.display(description="status", ordering="status")
    def coloured_status(self, job: Job) -> str:
        colour = _JOB_COLOURS.get(job.status, "#777")
        return format_html('<b style="color:{}">{}</b>', colour, job.get_status_display())

    @admin.display(description="progress")
    def progress_bar(self, job: Job) -> str:
        percent = job.percent
        shown = 0 if percent is None else percent
        label = "…" if percent is None else f"{percent}%"
        return format_html(
            '<div class="bridge-progress" title="{} of {}">'
            '<div class="bridge-progress-fill" style="width:{}%"></div>'
            "<span>{}</span></div>",
            job.progress_done,
            job.progress_total if job.progress_total is not None else "?",
            shown,
            label,
        )

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
        "kind",
        "coloured_status",
        "progress_bar",
        "actor_username",
        "created_at",
        "finished_at",
        "error",
    )
    list_filter = ("status", "kind")
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return jobs.visible_jobs(request.user)

    def has_view_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return any(request.user.has_perm(kind.permission) for kind in jobs.KINDS.values())

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)
