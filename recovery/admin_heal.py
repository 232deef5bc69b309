"""Heal operations in the console: read-only history with a coloured outcome and every step
(imported by recovery/admin.py)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from bridge.admin import ReadOnlyAdmin, label, truncated, utc_column
from recovery.choices import HealOutcome
from recovery.models import HealOperation

OUTCOME_VARIANTS = {
    HealOutcome.PENDING: "info",
    HealOutcome.HEALED: "success",
    HealOutcome.NOT_HEALED: "danger",
    HealOutcome.SKIPPED: "warning",
    HealOutcome.DRY_RUN: "",
}
_STEP_MARKS = {True: "ok", False: "failed", None: "-"}


@admin.register(HealOperation)
class HealOperationAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "started",
        "service",
        "outcome_label",
        "trigger",
        "strategy_or_all",
        "dry_run",
        "step_count",
        "last_step",
        "actor_username",
    )
    list_filter = ("outcome", "trigger", "dry_run", "service")
    search_fields = ("service__name", "actor_username")
    list_select_related = ("service", "job")
    date_hierarchy = "started_at"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "service",
                    "outcome_label",
                    "trigger",
                    "strategy_or_all",
                    "dry_run",
                    "actor_username",
                    "job_link",
                )
            },
        ),
        ("Times", {"fields": ("started", "finished")}),
        ("Steps", {"fields": ("steps_table",)}),
    )

    started = utc_column("started_at", "started")
    finished = utc_column("finished_at", "finished")

    @admin.display(description="outcome", ordering="outcome")
    def outcome_label(self, operation: HealOperation) -> SafeString:
        return label(operation.get_outcome_display(), OUTCOME_VARIANTS.get(operation.outcome, ""))

    @admin.display(description="strategy", ordering="strategy")
    def strategy_or_all(self, operation: HealOperation) -> str:
        return operation.get_strategy_display() if operation.strategy else "its list, in order"

    @admin.display(description="steps")
    def step_count(self, operation: HealOperation) -> int:
        return len(operation.steps or [])

    @admin.display(description="last step")
    def last_step(self, operation: HealOperation) -> str:
        if not operation.steps:
            return "-"
        step = operation.steps[-1]
        return truncated(f"{step.get('strategy') or step.get('action')}: {step.get('detail')}", 60)

    @admin.display(description="job")
    def job_link(self, operation: HealOperation) -> str:
        if operation.job_id is None:
            return "-"
        url = reverse("admin:bridge_job_change", args=[operation.job_id])
        return format_html('<a href="{}">#{}</a>', url, operation.job_id)

    @admin.display(description="steps")
    def steps_table(self, operation: HealOperation) -> SafeString:
        if not operation.steps:
            return format_html("{}", "-")
        rows = format_html_join(
            "",
            "<tr><td class='bridge-nowrap'>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td><pre class='bridge-json'>{}</pre></td></tr>",
            (
                (
                    step.get("at", ""),
                    step.get("strategy") or "-",
                    step.get("action", ""),
                    _STEP_MARKS.get(step.get("ok"), "-"),
                    step.get("detail", ""),
                )
                for step in operation.steps
            ),
        )
        return format_html(
            "<table><thead><tr><th>at</th><th>strategy</th><th>action</th><th>ok</th>"
            "<th>detail</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )
