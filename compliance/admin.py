import ipaddress
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.views.decorators.http import require_POST
from unfold.decorators import display

from bridge.admin import (
    JobAdminMixin,
    ReadOnlyAdmin,
    label,
    pretty_json,
    truncated,
    utc_column,
)
from bridge.choices import JobStatus
from compliance import chain, personal, verification
from compliance.audit import AuditContext
from compliance.choices import AuditAction, CheckpointStatus, VerificationSource
from compliance.models import AuditCheckpoint, AuditEvent, AuditVerification

# unfold's label colours per status class: 2xx success, 3xx info, 4xx warning, 5xx danger.
_STATUS_VARIANTS = {2: "success", 3: "info", 4: "warning", 5: "danger"}


class ChainHeadPaginator(Paginator):
    """Counts the unfiltered list from the chain head: no COUNT(*) over a million rows."""

    known_count: int | None = None

    @cached_property
    def count(self) -> int:
        if self.known_count is not None:
            return self.known_count
        if not self.object_list.query.where:
            return chain.total_event_count()
        return super().count


class ActionFilter(admin.SimpleListFilter):
    # Fixed choices: Django's default would run SELECT DISTINCT over the whole table.
    title = "action"
    parameter_name = "action"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [*AuditAction.choices, ("custom.", "Custom events")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        if value == "custom.":
            return queryset.filter(action__startswith="custom.")
        return queryset.filter(action=value)


class StatusClassFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status_class"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("2", "2xx"), ("3", "3xx"), ("4", "4xx"), ("5", "5xx")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in {"2", "3", "4", "5"}:
            low = int(self.value()) * 100
            return queryset.filter(status_code__gte=low, status_code__lt=low + 100)
        return queryset


def _sealed_floor() -> int:
    head = chain.chain_head()
    return (head.last_event_id or 0) if head else 0


class SealedFilter(admin.SimpleListFilter):
    title = "sealed"
    parameter_name = "sealed"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("yes", "Sealed"), ("no", "Waiting for seal")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(seal__isnull=False)
        if self.value() == "no":
            # Above the last sealed id: a primary-key range, and nothing there has a seal. A
            # straggler (committed after a newer event was sealed; sealed within the minute) is
            # not listed, as it is left out of the unfiltered total: finding it by anti-join
            # took 0.25-0.6 s per page at a million events.
            return queryset.filter(id__gt=_sealed_floor())
        return queryset


def _latest_completed_run() -> AuditVerification | None:
    # A run that failed did not finish checking, so it proves nothing either way.
    return (
        AuditVerification.objects.filter(status=JobStatus.SUCCEEDED)
        .order_by("-finished_at", "-id")
        .first()
    )


def _revealed(event: AuditEvent) -> personal.Revealed:
    """The event's personal data as shown: revealed once per event (a page's events share one
    Revealer, see RevealingChangeList)."""
    shown = getattr(event, "_revealed", None)
    if shown is None:
        shown = event._revealed = personal.revealed(event)
    return shown


class RevealingChangeList(ChangeList):
    """Reveals a page's events with one Revealer, so each subject key is unwrapped once per
    page rather than once per row and column."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        revealer = personal.Revealer()
        page = list(self.result_list)
        for event in page:
            event._revealed = revealer.event(event)
        self.result_list = page


def chain_standing(event: AuditEvent) -> tuple[str, str]:
    """Where the event stands in the hash chain, in words, with its label colour.

    Verified means sealed and within the part of the chain that the latest completed
    verification recomputed and found intact (its seq at most that run's checked count).
    """
    seq = event.seq
    if seq is None:
        return "waiting for seal", ""
    run = _latest_completed_run()
    if run is None:
        return "sealed, not yet covered by a verification", "info"
    when = f"verification #{run.pk}, {run.finished_at:%Y-%m-%d %H:%M:%S} UTC"
    if seq <= run.checked:
        if run.ok:
            return f"verified ({when})", "success"
        return (
            f"verified up to the break ({when} found the chain broken at event "
            f"#{run.first_broken_id}, after this one)",
            "warning",
        )
    if not run.ok:
        return f"NOT verified: {when} found the chain broken at event #{run.first_broken_id}", (
            "danger"
        )
    return "sealed, not yet covered by a verification", "info"


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "occurred",
        "actor",
        "action_name",
        "method",
        "short_path",
        "status",
        "latency",
        "ip",
        "seal_seq",
    )
    list_filter = (ActionFilter, StatusClassFilter, SealedFilter)
    # Exact, case-sensitive matches on indexed columns (see get_search_results); the request
    # id is searchable though not a column (a 32-character column would not fit).
    search_fields = ("actor_username", "request_id", "client_ip")
    search_help_text = (
        "Exact username, request id or client IP (sealed ones are found by their blind index; "
        "an erased subject's events are no longer found by name)."
    )
    list_select_related = ("seal",)
    show_full_result_count = False
    paginator = ChainHeadPaginator
    list_per_page = 50
    ordering = ("-id",)
    fieldsets = (
        (
            "Event",
            {
                "fields": (
                    "id",
                    "occurred",
                    "action",
                    "actor_shown",
                    "actor_id",
                    "object_type",
                    "object_id",
                    "personal_state",
                )
            },
        ),
        (
            "Request",
            {
                "fields": (
                    "method",
                    "path",
                    "status_code",
                    "latency_ms",
                    "ip_shown",
                    "request_id",
                )
            },
        ),
        ("Details", {"fields": ("details_json",)}),
        ("Hash chain", {"fields": ("chain_seq", "chain_hash", "chain_prev_hash", "verified")}),
    )

    occurred = utc_column("occurred_at", "time")

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet,
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
    ) -> Paginator:
        paginator = super().get_paginator(
            request, queryset, per_page, orphans, allow_empty_first_page
        )
        filters = {key for key in request.GET if key not in ("p", "o")}
        if filters == {"sealed"} and request.GET["sealed"] == "yes":
            # Exactly the sealed events: the chain head's seq, not a join over the table.
            head = chain.chain_head()
            paginator.known_count = head.last_seq if head else 0
        return paginator

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        # Django's own search is case-insensitive (UPPER(col) = UPPER(term)), which no index
        # serves: at a million events that was half a second per page. Every match is exact
        # ("=alice" is taken as "alice"); sealed actors and addresses (hash version 2) are
        # found through their blind indexes, version 1 events through the plain columns.
        term = search_term.strip().removeprefix("=").strip()
        if not term:
            return queryset, False
        match = personal.actor_match(term) | Q(request_id=term)
        try:
            ipaddress.ip_address(term)
            match |= personal.ip_match(term)
        except ValueError:
            pass
        return queryset.filter(match), False

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return RevealingChangeList

    @admin.display(description="actor")
    def actor(self, event: AuditEvent) -> str:
        name = _revealed(event).actor_username
        return truncated(name, 16) if name else "-"

    @admin.display(description="action", ordering="action")
    def action_name(self, event: AuditEvent) -> str:
        return truncated(event.action, 26)

    @admin.display(description="path", ordering="path")
    def short_path(self, event: AuditEvent) -> str:
        return truncated(event.path, 24)

    @admin.display(description="status", ordering="status_code")
    def status(self, event: AuditEvent) -> str:
        if event.status_code is None:
            return "-"
        return label(str(event.status_code), _STATUS_VARIANTS.get(event.status_code // 100, ""))

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, event: AuditEvent) -> str:
        if event.latency_ms is None:
            return "-"
        # Whole milliseconds: the decimals the column stores are noise at a glance.
        return f"{event.latency_ms:.0f} ms" if event.latency_ms >= 1 else "<1 ms"

    @admin.display(description="client IP")
    def ip(self, event: AuditEvent) -> str:
        address = _revealed(event).client_ip
        return truncated(address, 15) if address else "-"

    @admin.display(description="actor")
    def actor_shown(self, event: AuditEvent) -> str:
        return _revealed(event).actor_username or "-"

    @admin.display(description="client IP")
    def ip_shown(self, event: AuditEvent) -> str:
        return _revealed(event).client_ip or "-"

    @admin.display(description="personal data")
    def personal_state(self, event: AuditEvent) -> str:
        shown = _revealed(event)
        if shown.problem:
            return label(f"UNREADABLE ({shown.problem}): altered, or its key is missing", "danger")
        if shown.erased:
            return label("erased: the data subject's key was destroyed", "warning")
        if event.personal:
            return label("sealed under the data subject's key (hash version 2)", "success")
        return "not sealed (plain columns)"

    @admin.display(description="seq")
    def seal_seq(self, event: AuditEvent) -> str:
        seq = event.seq
        if seq is None:
            return label("waiting")
        return label(str(seq), "success")

    @admin.display(description="seq")
    def chain_seq(self, event: AuditEvent) -> str:
        seq = event.seq
        if seq is None:
            return "-"
        return format_html('<span class="bridge-hash" data-field="seq">{}</span>', seq)

    @admin.display(description="hash")
    def chain_hash(self, event: AuditEvent) -> str:
        return format_html(
            '<code class="bridge-hash" data-field="hash">{}</code>', event.hash or "-"
        )

    @admin.display(description="previous hash")
    def chain_prev_hash(self, event: AuditEvent) -> str:
        return format_html(
            '<code class="bridge-hash" data-field="prev_hash">{}</code>', event.prev_hash or "-"
        )

    @admin.display(description="verified")
    def verified(self, event: AuditEvent) -> str:
        text, variant = chain_standing(event)
        return format_html('<span data-field="verified">{}</span>', label(text, variant))

    @admin.display(description="details")
    def details_json(self, event: AuditEvent) -> str:
        return pretty_json(_revealed(event).details)


@admin.register(AuditVerification)
class AuditVerificationAdmin(JobAdminMixin, ReadOnlyAdmin):
    list_display = (
        "id",
        "created",
        "outcome",
        "progress_bar",
        "source_and_actor",
        "checked",
        "unsealed",
        "short_reason",
    )
    list_filter = ("status",)
    change_list_template = "admin/compliance/auditverification/change_list.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "outcome",
                    "progress_bar",
                    "progress_message",
                    "source",
                    "actor_username",
                    "checked",
                    "unsealed",
                    "first_broken_id",
                    "reason",
                    "cancel_requested",
                )
            },
        ),
        ("Times", {"fields": ("created", "started", "finished", "heartbeat", "duration")}),
        ("Parameters and result", {"fields": ("params_json", "result_json", "task_id")}),
    )

    @admin.display(description="outcome", ordering="status")
    def outcome(self, run: AuditVerification) -> str:
        if run.ok is None:
            return self.status_label(run)
        if run.ok:
            return label("intact", "success")
        where = f" at #{run.first_broken_id}" if run.first_broken_id else ""
        return label(f"BROKEN{where}", "danger")

    @display(description="source", header=True)
    def source_and_actor(self, run: AuditVerification) -> tuple[str, str]:
        source = dict(VerificationSource.choices).get(run.source, run.source or "-")
        return source, f"by {run.actor_username or 'the system'}"

    @admin.display(description="reason")
    def short_reason(self, run: AuditVerification) -> str:
        return truncated(run.reason, 32)

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        # While a run is going, the page reloads itself (a <meta> refresh: no script) so its
        # progress bar moves without anyone pressing F5.
        running = AuditVerification.objects.filter(
            status__in=(JobStatus.PENDING, JobStatus.RUNNING)
        ).exists()
        context = {
            "verification_running": running,
            "can_verify": request.user.has_perm("compliance.verify_chain"),
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def get_urls(self) -> list:
        verify = self.admin_site.admin_view(require_POST(self.verify_view))
        return [
            path("verify/", verify, name="compliance_auditverification_verify"),
            *super().get_urls(),
        ]

    def verify_view(self, request: HttpRequest) -> HttpResponseRedirect:
        if not request.user.has_perm("compliance.verify_chain"):
            raise PermissionDenied
        job = verification.start_verification(
            context=AuditContext.from_request(request), source=VerificationSource.ADMIN
        )
        self.message_user(request, f"Verification {job.pk} started; its progress shows below.")
        return HttpResponseRedirect(reverse("admin:compliance_auditverification_changelist"))


_CHECKPOINT_VARIANTS = {
    CheckpointStatus.PUBLISHED: "success",
    CheckpointStatus.PENDING: "warning",
    CheckpointStatus.REFUSED: "danger",
}


@admin.register(AuditCheckpoint)
class AuditCheckpointAdmin(ReadOnlyAdmin):
    """Bridge's copies of the signed checkpoints and whether every sink holds them."""

    list_display = ("number", "seq", "created", "state", "key_id", "sinks", "attempts", "error")
    list_filter = ("status", "key_id")
    search_fields = ("=number", "=seq", "signature")
    fieldsets = (
        (None, {"fields": ("number", "seq", "hash", "created", "state", "key_id")}),
        ("Sinks", {"fields": ("sinks", "attempts", "last_error", "published")}),
        ("As signed", {"fields": ("signature", "record_json")}),
    )
    created = utc_column("created_at", "created")
    published = utc_column("published_at", "published")

    @admin.display(description="status", ordering="status")
    def state(self, checkpoint: AuditCheckpoint) -> str:
        return label(
            checkpoint.get_status_display(), _CHECKPOINT_VARIANTS.get(checkpoint.status, "")
        )

    @admin.display(description="written to")
    def sinks(self, checkpoint: AuditCheckpoint) -> str:
        return ", ".join(checkpoint.sinks_written) or "-"

    @admin.display(description="error")
    def error(self, checkpoint: AuditCheckpoint) -> str:
        return truncated(checkpoint.last_error, 40)

    @admin.display(description="record")
    def record_json(self, checkpoint: AuditCheckpoint) -> str:
        return pretty_json(checkpoint.record)


# The compliance officer's pages (DSRs, consent, SOX, retention, reports, violations).
from compliance import admin_gdpr  # noqa: E402, F401
