"""The backups area's console: backups with coloured status, sizes, copies and 3-2-1 state,
progress bars while they run, and actions to back up, drill and restore (the restore behind a
confirmation page naming what will be overwritten). Restores and archived WAL are read-only
history. Every action calls backups/services.py, like the API."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from backups import services
from backups.choices import (
    BackupKind,
    BackupStatus,
    Component,
    CopyStatus,
    RestoreStatus,
)
from backups.models import Backup, RestoreJob, WalSegment
from backups.sizes import size_text
from bridge.admin import (
    ReadOnlyAdmin,
    job_progress,
    label,
    pretty_json,
    truncated,
    utc_column,
)
from compliance import approvals
from compliance.audit import AuditContext
from compliance.choices import ApprovalAction

STATUS_VARIANTS = {
    BackupStatus.PENDING: "",
    BackupStatus.RUNNING: "info",
    BackupStatus.SUCCEEDED: "success",
    BackupStatus.FAILED: "danger",
}
RESTORE_VARIANTS = {
    RestoreStatus.PENDING: "",
    RestoreStatus.RUNNING: "info",
    RestoreStatus.SUCCEEDED: "success",
    RestoreStatus.FAILED: "danger",
    RestoreStatus.REFUSED: "warning",
}


def _context(request: HttpRequest) -> AuditContext:
    return AuditContext.from_request(request, user=request.user)


@admin.register(Backup)
class BackupAdmin(ReadOnlyAdmin):
    list_display = (
        "short_id",
        "created",
        "kind",
        "status_label",
        "progress_bar",
        "stored_size",
        "copies",
        "rule_label",
        "drill",
    )
    list_filter = ("status", "kind", "rule_321_ok")
    search_fields = ("id", "label", "created_by")
    list_select_related = ("job",)
    date_hierarchy = "created_at"
    actions = ["run_drill", "restore_backup", "delete_backups"]
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "kind",
                    "status_label",
                    "progress_bar",
                    "label",
                    "parent_link",
                    "created_by",
                    "error",
                )
            },
        ),
        ("Sizes and protection", {"fields": ("raw_size", "stored_size", "rule_detail", "key_id")}),
        ("Copies", {"fields": ("copies_table",)}),
        ("Times", {"fields": ("created", "started", "finished", "verified")}),
        ("Manifest", {"fields": ("manifest_json",)}),
    )

    created = utc_column("created_at", "created")
    started = utc_column("started_at", "started")
    finished = utc_column("finished_at", "finished")
    verified = utc_column("verified_at", "drill passed")

    list_before_template = "backups/start_buttons.html"

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        services.reap_backups()
        kinds = [
            (BackupKind.FULL, "Back up now: full"),
            (BackupKind.INCREMENTAL, "Back up now: incremental"),
            (BackupKind.POINT_IN_TIME, "Restore point now"),
        ]
        context = {"backup_start_kinds": kinds, **(extra_context or {})}
        return super().changelist_view(request, context)

    @admin.display(description="id", ordering="id")
    def short_id(self, backup: Backup) -> str:
        return str(backup.pk)[:8]

    @admin.display(description="status", ordering="status")
    def status_label(self, backup: Backup) -> SafeString:
        return label(backup.get_status_display(), STATUS_VARIANTS.get(backup.status, ""))

    @admin.display(description="progress")
    def progress_bar(self, backup: Backup) -> str:
        return job_progress(backup.job)

    @admin.display(description="stored", ordering="stored_bytes")
    def stored_size(self, backup: Backup) -> str:
        return format_html(
            '<span class="bridge-nowrap" title="{} read from the sources">{}</span>',
            size_text(backup.raw_bytes),
            size_text(backup.stored_bytes),
        )

    @admin.display(description="drill", ordering="verified_at")
    def drill(self, backup: Backup) -> SafeString:
        if backup.verified_at is None:
            return format_html("{}", "-")
        return format_html(
            '<span title="restore drill passed {}">{}</span>',
            backup.verified_at.strftime("%Y-%m-%d %H:%M UTC"),
            label("passed", "success"),
        )

    @admin.display(description="source", ordering="raw_bytes")
    def raw_size(self, backup: Backup) -> str:
        return size_text(backup.raw_bytes)

    @admin.display(description="copies")
    def copies(self, backup: Backup) -> str:
        return str(backup.rule_321.get("copies", 0)) if backup.rule_321 else "-"

    @admin.display(description="3-2-1", ordering="rule_321_ok")
    def rule_label(self, backup: Backup) -> SafeString:
        if backup.status != BackupStatus.SUCCEEDED:
            return format_html("{}", "-")
        if backup.rule_321_ok:
            return label("met", "success")
        problems = "; ".join(backup.rule_321.get("problems", []))
        return format_html('<span title="{}">{}</span>', problems, label("violated", "danger"))

    @admin.display(description="3-2-1 rule")
    def rule_detail(self, backup: Backup) -> SafeString:
        rule = backup.rule_321 or {}
        if not rule:
            return format_html("{}", "-")
        problems = format_html_join("", "<li>{}</li>", ((p,) for p in rule.get("problems", [])))
        return format_html(
            "{} {} complete copies on {}; media: {}; offsite: {}<ul>{}</ul>",
            label("met", "success") if rule.get("ok") else label("violated", "danger"),
            rule.get("copies", 0),
            ", ".join(rule.get("targets", [])) or "none",
            ", ".join(rule.get("media", [])) or "none",
            ", ".join(rule.get("offsite", [])) or "none",
            problems,
        )

    @admin.display(description="parent")
    def parent_link(self, backup: Backup) -> str:
        if backup.parent_id is None:
            return "-"
        url = reverse("admin:backups_backup_change", args=[backup.parent_id])
        return format_html('<a href="{}">{}</a>', url, str(backup.parent_id)[:8])

    @admin.display(description="copies")
    def copies_table(self, backup: Backup) -> SafeString:
        rows = []
        for artifact in backup.artifacts.prefetch_related("copies"):
            for copy in artifact.copies.all():
                variant = {
                    CopyStatus.COMMITTED: "success",
                    CopyStatus.FAILED: "danger",
                    CopyStatus.WRITING: "info",
                }.get(copy.status, "")
                rows.append(
                    (
                        artifact.name,
                        copy.target,
                        copy.media,
                        "yes" if copy.offsite else "no",
                        label(copy.get_status_display(), variant),
                        size_text(copy.size),
                        truncated(copy.sha256, 16),
                        truncated(copy.error, 40),
                    )
                )
        if not rows:
            return format_html("{}", "-")
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>",
            rows,
        )
        return format_html(
            "<table><thead><tr><th>artifact</th><th>target</th><th>media</th><th>offsite</th>"
            "<th>status</th><th>size</th><th>SHA-256</th><th>error</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            body,
        )

    @admin.display(description="manifest")
    def manifest_json(self, backup: Backup) -> str:
        return pretty_json(backup.manifest)

    # --- Actions --------------------------------------------------------------------------

    def has_verify_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("backups.verify_backup")

    def has_restore_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("backups.restore_backup")

    def has_remove_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("backups.delete_backup")

    @admin.action(description="Run a restore drill of the selected backups", permissions=["verify"])
    def run_drill(self, request: HttpRequest, queryset: QuerySet[Backup]) -> None:
        for backup in queryset:
            try:
                restore = services.start_drill(context=_context(request), backup=backup)
            except services.BackupRefused as refused:
                self.message_user(request, f"{str(backup.pk)[:8]}: {refused}", messages.ERROR)
                continue
            self.message_user(
                request,
                f"Drill {restore.pk} of backup {str(backup.pk)[:8]} started "
                f"(job {restore.job_id}).",
                messages.SUCCESS,
            )

    @admin.action(description="Restore the selected backup…", permissions=["restore"])
    def restore_backup(self, request: HttpRequest, queryset: QuerySet[Backup]) -> Any:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one backup to restore.", messages.ERROR)
            return None
        backup = queryset.get()
        available = services._restorable_components(backup)
        if request.POST.get("confirm") == "yes":
            chosen = [name for name in request.POST.getlist("components") if name in available]
            if not chosen:
                self.message_user(
                    request, "Nothing restored: no component was ticked.", messages.ERROR
                )
                return None
            dry_run = request.POST.get("dry_run") == "on"
            if not dry_run and approvals.requires_approval(ApprovalAction.LIVE_RESTORE):
                return self._request_approval(request, backup, chosen)
            try:
                restore = services.start_restore(
                    backup=backup,
                    context=_context(request),
                    components=chosen or None,
                    dry_run=dry_run,
                )
            except services.BackupRefused as refused:
                self.message_user(request, str(refused), messages.ERROR)
                return None
            url = reverse("admin:backups_restorejob_change", args=[restore.pk])
            self.message_user(
                request,
                format_html('Restore <a href="{}">{}</a> started.', url, restore.pk),
                messages.WARNING,
            )
            return None
        overwrites = [(name, services.overwrite_text(name)) for name in available]
        context = {
            **self.admin_site.each_context(request),
            "title": f"Restore backup {str(backup.pk)[:8]}?",
            "backup": backup,
            "overwrites": overwrites,
            "safety": Component.DATABASE in available,
            "queryset": queryset,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "backups/restore_confirm.html", context)

    def _request_approval(self, request: HttpRequest, backup: Backup, chosen: list[str]) -> None:
        """Segregation of duties (SOX): a live restore waits for a second operator."""
        try:
            approval = approvals.request_approval(
                action=ApprovalAction.LIVE_RESTORE,
                params=services.restore_approval_params(
                    backup=backup, components=chosen, target_time=None
                ),
                reason=f"Live restore of backup {backup.pk} asked from the console",
                context=_context(request),
                user=request.user,
            )
        except (services.BackupRefused, approvals.ApprovalError) as refused:
            self.message_user(request, str(refused), messages.ERROR)
            return
        url = reverse("admin:compliance_approvalrequest_change", args=[approval.pk])
        self.message_user(
            request,
            format_html(
                'Nothing restored yet: a second operator must approve <a href="{}">request '
                "{}</a> (SOX second approval), which then starts the restore.",
                url,
                str(approval.pk)[:8],
            ),
            messages.WARNING,
        )

    @admin.action(
        description="Delete the selected backups and their copies", permissions=["remove"]
    )
    def delete_backups(self, request: HttpRequest, queryset: QuerySet[Backup]) -> None:
        # Newest first, so an incremental goes before the backup it stands on.
        for backup in queryset.order_by("-created_at"):
            try:
                services.delete_backup(backup=backup, context=_context(request))
            except services.BackupRefused as refused:
                self.message_user(request, str(refused), messages.ERROR)
                continue
            self.message_user(request, f"Backup {str(backup.pk)[:8]} deleted.", messages.SUCCESS)

    def get_urls(self) -> list:
        from django.urls import path

        return [
            path(
                "start/<str:kind>/",
                self.admin_site.admin_view(self.start_view),
                name="backups_backup_start",
            ),
            *super().get_urls(),
        ]

    def start_view(self, request: HttpRequest, kind: str) -> HttpResponse:
        from django.core.exceptions import PermissionDenied
        from django.shortcuts import redirect

        if request.method != "POST":
            return redirect("admin:backups_backup_changelist")
        if not request.user.has_perm("backups.run_backup"):
            raise PermissionDenied
        try:
            backup = services.start_backup(kind=kind, context=_context(request))
        except services.BackupRefused as refused:
            self.message_user(request, str(refused), messages.ERROR)
        else:
            self.message_user(
                request,
                f"{BackupKind(backup.kind).label} backup {str(backup.pk)[:8]} started.",
                messages.SUCCESS,
            )
        return redirect("admin:backups_backup_changelist")


@admin.register(RestoreJob)
class RestoreJobAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "created",
        "kind",
        "status_label",
        "progress_bar",
        "backup_link",
        "component_list",
        "rto",
        "dry_run",
        "error_short",
    )
    list_filter = ("kind", "status", "dry_run")
    list_select_related = ("job",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "kind",
                    "status_label",
                    "progress_bar",
                    "backup_link",
                    "component_list",
                    "target_time",
                    "dry_run",
                    "safety_backup",
                    "created_by",
                    "error",
                )
            },
        ),
        ("Times", {"fields": ("created", "started", "finished", "rto")}),
        ("Result", {"fields": ("result_json",)}),
    )

    created = utc_column("created_at", "created")
    started = utc_column("started_at", "started")
    finished = utc_column("finished_at", "finished")

    @admin.display(description="status", ordering="status")
    def status_label(self, restore: RestoreJob) -> SafeString:
        return label(restore.get_status_display(), RESTORE_VARIANTS.get(restore.status, ""))

    @admin.display(description="progress")
    def progress_bar(self, restore: RestoreJob) -> str:
        return job_progress(restore.job)

    @admin.display(description="backup")
    def backup_link(self, restore: RestoreJob) -> str:
        if restore.backup_id is None:
            return f"{restore.backup_ref[:8]} (deleted)"
        url = reverse("admin:backups_backup_change", args=[restore.backup_id])
        return format_html('<a href="{}">{}</a>', url, str(restore.backup_id)[:8])

    @admin.display(description="components")
    def component_list(self, restore: RestoreJob) -> str:
        return ", ".join(restore.components)

    @admin.display(description="restore time", ordering="rto_seconds")
    def rto(self, restore: RestoreJob) -> str:
        return "-" if restore.rto_seconds is None else f"{restore.rto_seconds:.1f} s"

    @admin.display(description="error")
    def error_short(self, restore: RestoreJob) -> str:
        return truncated(restore.error, 40)

    @admin.display(description="result")
    def result_json(self, restore: RestoreJob) -> str:
        return pretty_json(restore.result)


@admin.register(WalSegment)
class WalSegmentAdmin(ReadOnlyAdmin):
    list_display = ("name", "archived", "system_identifier", "stored", "target_count")
    search_fields = ("name",)
    fieldsets = (
        (
            None,
            {"fields": ("name", "system_identifier", "archived", "stored", "sha256", "copies")},
        ),
    )

    archived = utc_column("archived_at", "archived")

    @admin.display(description="stored", ordering="stored_bytes")
    def stored(self, segment: WalSegment) -> str:
        return size_text(segment.stored_bytes)

    @admin.display(description="targets")
    def target_count(self, segment: WalSegment) -> int:
        return len(segment.copies or [])
