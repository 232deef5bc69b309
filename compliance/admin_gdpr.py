"""The compliance officer's console (issue 11): the data-subject request queue, consent
history per subject, privacy notices, SOX change trails, second approvals, legal holds, audit
purges, reports with their downloads, and violations.

Every change goes through the area's service (compliance/dsr.py, consent.py, approvals.py,
retention.py, reports/), exactly as the API does, so the console and the API can never
disagree and every step is audited once. The services are imported inside the functions that
call them: this module is imported with the admin, before any of them may be loaded.
Append-only records (consent events, SOX changes, purges) are read-only here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, date, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Case, IntegerField, Model, Q, QuerySet, Value, When
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString, mark_safe
from unfold.decorators import display
from unfold.widgets import (
    UnfoldAdminCheckboxSelectMultipleWidget,
    UnfoldAdminSingleDateWidget,
    UnfoldAdminTextareaWidget,
    UnfoldAdminTextInputWidget,
)

from backups.sizes import size_text
from bridge.admin import (
    ReadOnlyAdmin,
    job_progress,
    label,
    pretty_json,
    truncated,
    utc_column,
    utc_text,
)
from bridge.choices import JobStatus
from compliance.audit import AuditContext
from compliance.choices import (
    OPEN_DSR_STATUSES,
    ApprovalStatus,
    ConsentMethod,
    DsrStatus,
    ReportFormat,
    ReportStatus,
    RetentionCategory,
    SoxOperation,
    ViolationSeverity,
    ViolationStatus,
)
from compliance.models import (
    ApprovalRequest,
    AuditPurge,
    ComplianceReport,
    ComplianceViolation,
    ConsentEvent,
    DataSubjectRequest,
    LegalHold,
    PrivacyNotice,
    SoxChange,
)


def refusals(*service_errors: type[Exception]) -> tuple[type[Exception], ...]:
    """What a service raises to refuse a request (a wrong state, the requester approving their
    own request, a hold over nothing): its own error class, and Django's; their messages are
    written for the person acting."""
    return (ValidationError, PermissionDenied, ValueError, *service_errors)


def _context(request: HttpRequest) -> AuditContext:
    return AuditContext.from_request(request, user=request.user)


def _refusal_text(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(error.messages)
    return str(error) or type(error).__name__


def _changelist(model: type[Model]) -> str:
    return reverse(f"admin:compliance_{model._meta.model_name}_changelist")


def _change(obj: Model) -> str:
    return reverse(f"admin:compliance_{obj._meta.model_name}_change", args=[obj.pk])


def _adopt(target: Model, source: Model) -> None:
    """Make the admin's unsaved form instance the row a service created, so the admin's
    bookkeeping after save_model (the log entry, the redirect) names the real row."""
    for field in source._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))
    target._state.adding = False
    target._state.db = source._state.db


def today_utc() -> date:
    return timezone.now().astimezone(UTC).date()


def _ask(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet,
    *,
    action: str,
    title: str,
    intro: str,
    form: forms.Form,
    submit: str,
    danger: bool = False,
    suggestions: Iterable[str] = (),
    suggestions_id: str = "",
) -> TemplateResponse:
    """The page between picking an action and carrying it out: what it applies to and the
    input it needs (compliance/admin/ask.html posts the same action back, confirmed)."""
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "intro": intro,
        "form": form,
        "submit": submit,
        "danger": danger,
        "queryset": queryset,
        "action": action,
        "action_checkbox_name": ACTION_CHECKBOX_NAME,
        "opts": model_admin.model._meta,
        "back_url": _changelist(model_admin.model),
        "suggestions": list(suggestions),
        "suggestions_id": suggestions_id,
    }
    return TemplateResponse(request, "compliance/admin/ask.html", context)


def _bound(request: HttpRequest, form_class: type[forms.Form]) -> forms.Form:
    """The action's form, bound once the ask page was sent back (confirm=yes)."""
    if request.POST.get("confirm") == "yes":
        return form_class(request.POST)
    return form_class()


def _text_field(label_text: str, *, max_length: int, rows: int = 3, **kwargs: Any) -> Any:
    return forms.CharField(
        label=label_text,
        max_length=max_length,
        widget=UnfoldAdminTextareaWidget(attrs={"rows": rows}),
        **kwargs,
    )


def _table(rows: list[tuple[Any, ...]], headers: Iterable[str]) -> SafeString:
    head = format_html_join("", "<th>{}</th>", ((name,) for name in headers))
    body = format_html_join(
        "",
        "<tr>{}</tr>",
        ((format_html_join("", "<td>{}</td>", ((cell,) for cell in row)),) for row in rows),
    )
    return format_html(
        '<table class="bridge-table"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
        head,
        body,
    )


def _short(text: str, limit: int) -> str:
    """Plain text cut to `limit` characters (for unfold's two-line cells, which escape)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


class PageAdmin(ReadOnlyAdmin):
    """These pages: read-only (changes go through the services), with their stylesheet."""

    class Media:
        css = {"all": ("compliance/console.css",)}


class ServiceAddMixin:
    """An add form whose row a service creates, so a creation in the console is checked and
    audited exactly as one over the API; the page after it is read-only like the rest.

    The admin class names `add_fieldsets`, `add_permission`, the form fields to put back when
    the service refuses (`prefill`), and implements `create_through_service(request, data)`
    returning the created row, `created_message(obj)`, and `service_errors()` when the service
    refuses with a class of its own.
    """

    add_fieldsets: tuple = ()
    add_permission = ""
    prefill: tuple[str, ...] = ()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(self.add_permission)

    def service_errors(self) -> tuple[type[Exception], ...]:
        """The service's own refusal class(es), besides ValueError and Django's."""
        return ()

    def get_fieldsets(self, request: HttpRequest, obj: Model | None = None) -> Any:
        if obj is None:
            return self.add_fieldsets
        return super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list:
        return [] if obj is None else super().get_readonly_fields(request, obj)

    def get_form(
        self, request: HttpRequest, obj: Model | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm]:
        if obj is not None:
            kwargs["form"] = forms.ModelForm  # the detail page shows values, never a form
        return super().get_form(request, obj, change=change, **kwargs)

    def save_model(self, request: HttpRequest, obj: Any, form: forms.Form, change: bool) -> None:
        if change:
            return
        try:
            created = self.create_through_service(request, form.cleaned_data)
        except refusals(*self.service_errors()) as refused:
            obj._refused = _refusal_text(refused)
            obj._prefill = {
                name: form.cleaned_data[name]
                for name in self.prefill
                if isinstance(form.cleaned_data.get(name), str)
            }
            return
        _adopt(obj, created)

    def save_related(
        self, request: HttpRequest, form: forms.Form, formsets: Any, change: bool
    ) -> None:
        if not getattr(form.instance, "_refused", None):
            super().save_related(request, form, formsets, change)

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if getattr(obj, "_refused", None):
            return None
        return super().log_addition(request, obj, message)

    def response_add(
        self, request: HttpRequest, obj: Any, post_url_continue: str | None = None
    ) -> HttpResponse:
        refused = getattr(obj, "_refused", None)
        if refused:
            # Back to the form with what was typed (Django's add view takes initial values
            # from the query string), and the service's reason on top.
            self.message_user(request, f"Not saved: {refused}", messages.ERROR)
            url = reverse(f"admin:compliance_{self.model._meta.model_name}_add")
            return HttpResponseRedirect(f"{url}?{urlencode(obj._prefill)}")
        self.message_user(request, self.created_message(obj), messages.SUCCESS)
        return HttpResponseRedirect(_change(obj))


# --- Data subject requests --------------------------------------------------------------------

# The queue's colours: overdue red, due within DSR_REMINDER_DAYS amber, otherwise green; a
# request that is answered (completed or rejected) is grey.
URGENCY_VARIANTS = {"overdue": "danger", "due_soon": "warning", "on_track": "success", "closed": ""}
_SHORT_STATUS = {
    DsrStatus.RECEIVED: "received",
    DsrStatus.VERIFYING: "verifying id",
    DsrStatus.IN_PROGRESS: "in progress",
    DsrStatus.EXTENDED: "extended",
    DsrStatus.COMPLETED: "completed",
    DsrStatus.REJECTED: "rejected",
}
_STATUS_VARIANTS = {
    DsrStatus.RECEIVED: "info",
    DsrStatus.VERIFYING: "info",
    DsrStatus.IN_PROGRESS: "info",
    DsrStatus.EXTENDED: "warning",
    DsrStatus.COMPLETED: "success",
    DsrStatus.REJECTED: "",
}
# How identity is usually checked; the officer may write any other method.
VERIFICATION_METHODS = (
    "Signed in to their own account",
    "Confirmed from the email address on file",
    "Identity document checked",
    "Known contact details matched",
)


def effective_due(request: DataSubjectRequest) -> date:
    """The due date as it stands: while identity is being verified the clock is paused, and
    dsr.verify_request adds the whole days it stood still, so they are not counted against it."""
    if request.status == DsrStatus.VERIFYING and request.paused_at is not None:
        from compliance.dsr import paused_whole_days

        return request.due_date + timedelta(days=paused_whole_days(request.paused_at))
    return request.due_date


def dsr_urgency(request: DataSubjectRequest, today: date | None = None) -> str:
    """`closed`, `overdue`, `due_soon` (within DSR_REMINDER_DAYS) or `on_track`."""
    if request.status not in OPEN_DSR_STATUSES:
        return "closed"
    today = today or today_utc()
    left = (effective_due(request) - today).days
    if left < 0:
        return "overdue"
    if left <= settings.DSR_REMINDER_DAYS:
        return "due_soon"
    return "on_track"


def days_left_text(request: DataSubjectRequest, today: date | None = None) -> str:
    if request.status not in OPEN_DSR_STATUSES:
        return "answered"
    today = today or today_utc()
    left = (effective_due(request) - today).days
    if left < 0:
        return f"{-left} d overdue"
    if left == 0:
        return "due today"
    return f"{left} d left"


class DueFilter(admin.SimpleListFilter):
    """Open requests by how close their deadline is, or the answered ones."""

    title = "due"
    parameter_name = "due"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [
            ("overdue", "Overdue"),
            ("soon", f"Due within {settings.DSR_REMINDER_DAYS} days"),
            ("later", "Due later"),
            ("closed", "Answered (completed or rejected)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "closed":
            return queryset.exclude(status__in=OPEN_DSR_STATUSES)
        wanted = {"overdue": "overdue", "soon": "due_soon", "later": "on_track"}.get(value or "")
        if wanted is None:
            return queryset
        today = today_utc()
        soon = today + timedelta(days=settings.DSR_REMINDER_DAYS)
        by_date = {
            "overdue": Q(due_date__lt=today),
            "due_soon": Q(due_date__gte=today, due_date__lte=soon),
            "on_track": Q(due_date__gt=soon),
        }[wanted]
        running = Q(status__in=OPEN_DSR_STATUSES) & ~Q(status=DsrStatus.VERIFYING)
        # A paused request's deadline moves every day (effective_due): judged row by row, as
        # its colour is (few requests wait for proof of identity at any time).
        paused = [
            item.pk
            for item in queryset.filter(status=DsrStatus.VERIFYING).only(
                "pk", "status", "due_date", "paused_at"
            )
            if dsr_urgency(item, today) == wanted
        ]
        return queryset.filter((running & by_date) | Q(pk__in=paused))


class DsrAddForm(forms.ModelForm):
    """A request as received (by mail, phone, a form): created through dsr.create_request."""

    class Meta:
        model = DataSubjectRequest
        fields = ("subject_id", "type", "received_at", "details")
        widgets = {"details": UnfoldAdminTextareaWidget(attrs={"rows": 4})}
        help_texts = {
            "subject_id": "A Bridge user's subject id is their username; otherwise a customer "
            "id or email address, exactly as the data is keyed.",
            "received_at": "When the request reached us (UTC); empty: now. The deadline is one "
            "calendar month after it.",
            "details": 'JSON: for a rectification the corrections, e.g. {"corrections": '
            '{"email": "new@example.org"}}; anything else the request said.',
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["received_at"].required = False
        self.fields["details"].required = False

    def clean_subject_id(self) -> str:
        # The service's own rule (shared with consent), so the form says what the API says.
        from compliance.dsr import DsrRefused, check_subject_id

        try:
            return check_subject_id(self.cleaned_data["subject_id"].strip())
        except DsrRefused as refused:
            raise ValidationError(str(refused)) from None

    def clean_details(self) -> dict:
        details = self.cleaned_data.get("details") or {}
        if not isinstance(details, dict):
            raise ValidationError('Details are a JSON object, e.g. {"channel": "letter"}.')
        return details


class VerifyForm(forms.Form):
    method = forms.CharField(
        label="How was the subject's identity verified?",
        max_length=200,
        widget=UnfoldAdminTextInputWidget(attrs={"list": "verification-methods"}),
        help_text="Recorded with the request and in the audit trail; the work starts as a job.",
    )


class HoldForIdentityForm(forms.Form):
    reason = _text_field(
        "What proof is the subject asked for?",
        max_length=2000,
        help_text="Art. 12(6): only where there are reasonable doubts about who is asking.",
    )


class ExtendForm(forms.Form):
    reason = _text_field(
        "Why does the request need more time?",
        max_length=2000,
        help_text="Art. 12(3): up to two more months, once, and the subject is told why within "
        "the first month.",
    )


class RejectForm(forms.Form):
    reason = _text_field(
        "Why is the request rejected?",
        max_length=2000,
        help_text="Art. 12(5): manifestly unfounded or excessive, or the identity could not be "
        "verified. The subject is told the reason.",
    )


@admin.register(DataSubjectRequest)
class DataSubjectRequestAdmin(ServiceAddMixin, PageAdmin):
    """The DSR queue: open requests first, the nearest deadline on top, coloured by urgency."""

    # The subject opens the request (no id column: the queue must fit a 1366 px screen).
    list_display = (
        "subject",
        "type_name",
        "status_label",
        "received",
        "due",
        "days_left",
        "progress_bar",
    )
    list_filter = ("status", "type", DueFilter)
    list_select_related = ("job",)
    search_fields = ("subject_id",)
    search_help_text = "Exact subject id (a username, customer id or email address)."
    list_per_page = 50
    actions = [
        "ask_for_identity",
        "verify_identity",
        "extend_deadline",
        "reject_requests",
        "retry_work",
    ]
    form = DsrAddForm
    add_fieldsets = ((None, {"fields": ("subject_id", "type", "received_at", "details")}),)
    add_permission = "compliance.add_datasubjectrequest"
    prefill = ("subject_id", "type")
    fieldsets = (
        (
            "Request",
            {
                "fields": (
                    "id",
                    "subject_links",
                    "type_full",
                    "status_label",
                    "deadline",
                    "received",
                    "created_by",
                    "details_json",
                )
            },
        ),
        (
            "Identity",
            {"fields": ("verified", "verified_by", "verification_method", "paused", "paused_days")},
        ),
        ("Extension", {"fields": ("extended", "extension_months", "extension_reason")}),
        (
            "Outcome",
            {
                "fields": (
                    "progress_bar",
                    "job_link",
                    "completed",
                    "rejected_reason",
                    "export",
                    "result_json",
                )
            },
        ),
        ("History", {"fields": ("history_table",)}),
    )

    received = utc_column("received_at", "received")
    verified = utc_column("verified_at", "verified")
    paused = utc_column("paused_at", "paused since")
    extended = utc_column("extended_at", "extended")
    completed = utc_column("completed_at", "completed")

    # --- The detail page's buttons --------------------------------------------------------

    change_form_before_template = "compliance/admin/dsr_actions.html"

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> HttpResponse:
        item = self.get_object(request, object_id)
        context = {
            "dsr_actions": self.next_steps(request, item),
            "dsr_actions_url": _changelist(DataSubjectRequest),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, context)

    def next_steps(
        self, request: HttpRequest, item: DataSubjectRequest | None
    ) -> list[tuple[str, str, bool]]:
        """The actions that make sense for the request's status: (action, button, danger)."""
        if item is None or not self.has_process_permission(request):
            return []
        failed = item.job is not None and item.job.status == JobStatus.FAILED
        steps = {
            DsrStatus.RECEIVED: [
                ("ask_for_identity", "Ask for proof of identity…", False),
                ("verify_identity", "Verify identity…", False),
            ],
            DsrStatus.VERIFYING: [("verify_identity", "Verify identity…", False)],
            DsrStatus.IN_PROGRESS: []
            if item.extension_months
            else [("extend_deadline", "Extend the deadline…", False)],
        }.get(item.status, [])
        if failed and item.status in (DsrStatus.IN_PROGRESS, DsrStatus.EXTENDED):
            steps.append(("retry_work", "Retry the work", False))
        if item.status in OPEN_DSR_STATUSES:
            steps.append(("reject_requests", "Reject…", True))
        return steps

    # --- The queue ------------------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[DataSubjectRequest]:
        # Answered requests sink below every open one; among the open, the nearest deadline
        # comes first (the order the deadlines must be met in).
        rank = Case(
            When(status__in=OPEN_DSR_STATUSES, then=Value(0)),
            default=Value(1),
            output_field=IntegerField(),
        )
        queryset = self.model._default_manager.get_queryset().annotate(queue_rank=rank)
        return queryset.order_by(*self.get_ordering(request))

    def get_ordering(self, request: HttpRequest) -> list[str]:
        return ["queue_rank", "due_date", "received_at"]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        # Exact and case-sensitive, on the indexed column: subject ids are identifiers, and
        # one subject's requests must never turn up in a search for another's.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(subject_id=term), False

    @admin.display(description="subject", ordering="subject_id")
    def subject(self, dsr: DataSubjectRequest) -> str:
        return truncated(dsr.subject_id, 24)

    @admin.display(description="type", ordering="type")
    def type_name(self, dsr: DataSubjectRequest) -> str:
        return dsr.type

    @admin.display(description="type")
    def type_full(self, dsr: DataSubjectRequest) -> str:
        return dsr.get_type_display()

    @admin.display(description="status", ordering="status")
    def status_label(self, dsr: DataSubjectRequest) -> SafeString:
        return format_html(
            '<span title="{}">{}</span>',
            dsr.get_status_display(),
            label(_SHORT_STATUS.get(dsr.status, dsr.status), _STATUS_VARIANTS.get(dsr.status, "")),
        )

    @admin.display(description="due", ordering="due_date")
    def due(self, dsr: DataSubjectRequest) -> SafeString:
        urgency = dsr_urgency(dsr)
        return format_html(
            '<span class="bridge-dsr-due" data-urgency="{}">{}</span>',
            urgency,
            label(dsr.due_date.isoformat(), URGENCY_VARIANTS[urgency]),
        )

    @admin.display(description="days left", ordering="due_date")
    def days_left(self, dsr: DataSubjectRequest) -> SafeString:
        text = days_left_text(dsr)
        if dsr.status == DsrStatus.VERIFYING:
            text += " (paused)"
        return format_html('<span class="bridge-nowrap">{}</span>', text)

    @admin.display(description="progress")
    def progress_bar(self, dsr: DataSubjectRequest) -> str:
        return job_progress(dsr.job)

    # --- The detail page ------------------------------------------------------------------

    @admin.display(description="subject")
    def subject_links(self, dsr: DataSubjectRequest) -> SafeString:
        consent = f"{_changelist(ConsentEvent)}?{urlencode({'subject_id': dsr.subject_id})}"
        others = f"{_changelist(DataSubjectRequest)}?{urlencode({'q': dsr.subject_id})}"
        return format_html(
            '<span class="bridge-hash">{}</span> · <a href="{}">consent history</a> · '
            '<a href="{}">all requests of this subject</a>',
            dsr.subject_id,
            consent,
            others,
        )

    @admin.display(description="due date")
    def deadline(self, dsr: DataSubjectRequest) -> SafeString:
        urgency = dsr_urgency(dsr)
        return format_html(
            '<span data-urgency="{}">{} {}</span>',
            urgency,
            label(dsr.due_date.isoformat(), URGENCY_VARIANTS[urgency]),
            days_left_text(dsr),
        )

    @admin.display(description="job")
    def job_link(self, dsr: DataSubjectRequest) -> str:
        if dsr.job_id is None:
            return "-"
        url = reverse("admin:bridge_job_change", args=[dsr.job_id])
        return format_html('<a href="{}">job {}</a>', url, dsr.job_id)

    @admin.display(description="details")
    def details_json(self, dsr: DataSubjectRequest) -> SafeString:
        return pretty_json(dsr.details)

    @admin.display(description="result")
    def result_json(self, dsr: DataSubjectRequest) -> SafeString:
        return pretty_json(dsr.result)

    @admin.display(description="export")
    def export(self, dsr: DataSubjectRequest) -> SafeString | str:
        from compliance.dsr import export_available, export_expires_at

        if not dsr.export_path:
            return "-"
        if not export_available(dsr):
            return format_html(
                "{} (SHA-256 <code>{}</code>)", label("expired or removed"), dsr.export_sha256
            )
        url = reverse("admin:compliance_datasubjectrequest_export", args=[dsr.pk])
        return format_html(
            '<a href="{}" id="dsr-export">Download the export</a> ({}, SHA-256 '
            '<code class="bridge-hash">{}</code>; kept until {})',
            url,
            size_text(dsr.export_size),
            dsr.export_sha256,
            utc_text(export_expires_at(dsr)),
        )

    @admin.display(description="history")
    def history_table(self, dsr: DataSubjectRequest) -> SafeString | str:
        return history_table(dsr.history)

    # --- Adding: through dsr.create_request ---------------------------------------------

    def service_errors(self) -> tuple[type[Exception], ...]:
        from compliance.dsr import DsrRefused

        return (DsrRefused,)

    def create_through_service(self, request: HttpRequest, data: dict) -> DataSubjectRequest:
        from compliance import dsr

        return dsr.create_request(
            subject_id=data["subject_id"],
            type=data["type"],
            details=data.get("details") or {},
            context=_context(request),
            received_at=data.get("received_at"),
        )

    def created_message(self, obj: DataSubjectRequest) -> str:
        return (
            f"{obj.get_type_display()} request {str(obj.pk)[:8]} of {obj.subject_id} received; "
            f"due {obj.due_date.isoformat()}."
        )

    # --- Actions: compliance.dsr ------------------------------------------------------------

    def has_process_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("compliance.process_datasubjectrequest")

    @admin.action(description="Verify identity and start the work…", permissions=["process"])
    def verify_identity(
        self, request: HttpRequest, queryset: QuerySet[DataSubjectRequest]
    ) -> HttpResponse | None:
        form = _bound(request, VerifyForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="verify_identity",
                title="Record the identity check",
                intro="The clock restarts and the request's work starts as a background job.",
                form=form,
                submit="Verified: start the work",
                suggestions=VERIFICATION_METHODS,
                suggestions_id="verification-methods",
            )
        from compliance import dsr

        for item in queryset:
            try:
                job = dsr.verify_request(
                    request=item, method=form.cleaned_data["method"], context=_context(request)
                )
            except refusals(dsr.DsrRefused) as refused:
                self._refused(request, item, refused)
            else:
                self.message_user(
                    request,
                    f"{item}: identity verified, the work runs as job {job.pk}.",
                    messages.SUCCESS,
                )
        return None

    @admin.action(description="Extend the deadline (once, with a reason)…", permissions=["process"])
    def extend_deadline(
        self, request: HttpRequest, queryset: QuerySet[DataSubjectRequest]
    ) -> HttpResponse | None:
        form = _bound(request, ExtendForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="extend_deadline",
                title="Extend the deadline",
                intro="Moves the due date by up to two months; a request is extended once.",
                form=form,
                submit="Extend",
            )
        from compliance import dsr

        for item in queryset:
            try:
                extended = dsr.extend_request(
                    request=item, reason=form.cleaned_data["reason"], context=_context(request)
                )
            except refusals(dsr.DsrRefused) as refused:
                self._refused(request, item, refused)
            else:
                due = getattr(extended, "due_date", None) or item.due_date
                self.message_user(
                    request, f"{item}: extended, now due {due.isoformat()}.", messages.SUCCESS
                )
        return None

    @admin.action(description="Reject (with a reason)…", permissions=["process"])
    def reject_requests(
        self, request: HttpRequest, queryset: QuerySet[DataSubjectRequest]
    ) -> HttpResponse | None:
        form = _bound(request, RejectForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="reject_requests",
                title="Reject the request",
                intro="The request ends; the reason is recorded and told to the subject.",
                form=form,
                submit="Reject",
                danger=True,
            )
        from compliance import dsr

        for item in queryset:
            try:
                dsr.reject_request(
                    request=item, reason=form.cleaned_data["reason"], context=_context(request)
                )
            except refusals(dsr.DsrRefused) as refused:
                self._refused(request, item, refused)
            else:
                self.message_user(request, f"{item}: rejected.", messages.SUCCESS)
        return None

    @admin.action(
        description="Wait for proof of identity (pauses the clock)…", permissions=["process"]
    )
    def ask_for_identity(
        self, request: HttpRequest, queryset: QuerySet[DataSubjectRequest]
    ) -> HttpResponse | None:
        form = _bound(request, HoldForIdentityForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="ask_for_identity",
                title="Ask the subject to prove their identity",
                intro="The deadline stops running until the identity is verified; the days it "
                "stood still are added to the due date then.",
                form=form,
                submit="Pause and wait",
            )
        from compliance import dsr

        for item in queryset:
            try:
                dsr.hold_for_verification(
                    request=item, reason=form.cleaned_data["reason"], context=_context(request)
                )
            except refusals(dsr.DsrRefused) as refused:
                self._refused(request, item, refused)
            else:
                self.message_user(
                    request, f"{item}: waiting for proof of identity.", messages.SUCCESS
                )
        return None

    @admin.action(description="Retry the work after its job failed", permissions=["process"])
    def retry_work(self, request: HttpRequest, queryset: QuerySet[DataSubjectRequest]) -> None:
        from compliance import dsr

        for item in queryset:
            try:
                job = dsr.retry_request(request=item, context=_context(request))
            except refusals(dsr.DsrRefused) as refused:
                self._refused(request, item, refused)
            else:
                self.message_user(request, f"{item}: started again (job {job.pk}).")

    def _refused(self, request: HttpRequest, item: Model, refused: Exception) -> None:
        self.message_user(request, f"{item}: {_refusal_text(refused)}", messages.ERROR)

    # --- The export's download ------------------------------------------------------------

    def get_urls(self) -> list:
        download = self.admin_site.admin_view(self.export_view)
        return [
            path("<uuid:pk>/export/", download, name="compliance_datasubjectrequest_export"),
            *super().get_urls(),
        ]

    def export_view(self, request: HttpRequest, pk: str) -> HttpResponse:
        """The access/portability ZIP, to those who may see the request (as over the API);
        dsr.export_file audits the download."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        from compliance import dsr

        item = DataSubjectRequest.objects.filter(pk=pk).first()
        if item is None:
            raise Http404("No such request.")
        try:
            handle = dsr.export_file(request=item, context=_context(request))
        except refusals(dsr.DsrRefused) as refused:
            self.message_user(request, _refusal_text(refused), messages.ERROR)
            return HttpResponseRedirect(_change(item))
        return FileResponse(
            handle,
            as_attachment=True,
            filename=f"dsr-{item.pk}.zip",
            content_type="application/zip",
        )


def history_table(entries: Any) -> SafeString | str:
    """A request's history as a table (one row per step, one column per key, time first), with
    the raw JSON folded under it."""
    if not entries:
        return "-"
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        return pretty_json(entries)
    first = ("at", "time", "occurred_at", "status", "event", "step", "actor", "by")
    keys = [key for key in first if any(key in entry for entry in entries)]
    for entry in entries:
        keys += [key for key in entry if key not in keys]
    rows = [tuple(_cell(entry.get(key)) for key in keys) for entry in entries]
    return format_html(
        '<div class="bridge-history">{}<details><summary>JSON</summary>{}</details></div>',
        _table(rows, keys),
        pretty_json(entries),
    )


# --- Consent ------------------------------------------------------------------------------------


class PurposeFilter(admin.SimpleListFilter):
    # The configured purposes: Django's default would SELECT DISTINCT over every event.
    title = "purpose"
    parameter_name = "purpose"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [(purpose, purpose) for purpose in settings.GDPR_CONSENT_PURPOSES]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(purpose=self.value()) if self.value() else queryset


@admin.register(ConsentEvent)
class ConsentEventAdmin(PageAdmin):
    """Every grant and withdrawal (append-only). Filtered to one subject (`?subject_id=`, or
    an exact search), the page opens with where each purpose stands now."""

    list_display = (
        "id",
        "occurred",
        "subject",
        "purpose",
        "decision",
        "notice_version",
        "method",
        "channel_short",
    )
    list_filter = (PurposeFilter, "granted", "method")
    search_fields = ("subject_id",)
    search_help_text = "Exact subject id: shows the subject's consent now, and its history."
    list_per_page = 50
    list_before_template = "compliance/admin/consent_state.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "subject",
                    "purpose",
                    "decision",
                    "occurred",
                    "method",
                    "channel",
                    "notice_version",
                    "notice_sha256",
                )
            },
        ),
        ("Origin", {"fields": ("client_ip", "actor_id", "request_id")}),
    )

    occurred = utc_column("occurred_at", "time")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(subject_id=term), False

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        subject = (request.GET.get("subject_id") or request.GET.get("q") or "").strip()
        context = dict(extra_context or {})
        if subject:
            context["consent_subject"] = subject
            context["consent_rows"] = consent_rows(subject)
        return super().changelist_view(request, context)

    @admin.display(description="subject", ordering="subject_id")
    def subject(self, event: ConsentEvent) -> SafeString:
        url = f"{_changelist(ConsentEvent)}?{urlencode({'subject_id': event.subject_id})}"
        return format_html(
            '<a href="{}" title="this subject\'s consent">{}</a>',
            url,
            truncated(event.subject_id, 24),
        )

    @admin.display(description="consent", ordering="granted")
    def decision(self, event: ConsentEvent) -> SafeString:
        return label("granted", "success") if event.granted else label("withdrawn", "danger")

    @admin.display(description="channel", ordering="channel")
    def channel_short(self, event: ConsentEvent) -> str:
        return truncated(event.channel, 16)


def consent_rows(subject_id: str) -> list[dict[str, Any]]:
    """Each purpose with its state now, from consent.consent_state (the service's projection
    of the events: every configured purpose, and any other the subject has events for)."""
    from compliance import consent

    methods = dict(ConsentMethod.choices)
    rows = []
    for purpose, now in consent.consent_state(subject_id)["purposes"].items():
        if now.get("since") is None:
            # Never asked: not granted, and nothing to prove either way.
            text, variant, key = "no record", "", "none"
        elif now.get("granted"):
            text, variant, key = "granted", "success", "granted"
        else:
            text, variant, key = "withdrawn", "danger", "withdrawn"
        rows.append(
            {
                "purpose": purpose,
                "state": key,
                "label": label(text, variant),
                "since": utc_text(now["since"]) if now.get("since") else "-",
                "notice_version": now.get("notice_version") or "-",
                "method": methods.get(now.get("method"), now.get("method") or "-"),
            }
        )
    return rows


class NoticeForm(forms.ModelForm):
    class Meta:
        model = PrivacyNotice
        fields = ("version", "text")
        widgets = {"text": UnfoldAdminTextareaWidget(attrs={"rows": 12})}
        help_texts = {
            "version": "As the consent forms name it, e.g. 2026-01. Published once, never changed.",
            "text": "The notice exactly as shown to data subjects: its SHA-256 is recorded with "
            "each consent given against it.",
        }

    def clean_version(self) -> str:
        # The service's rule, checked here so a refusal keeps the text typed in the form.
        from compliance.consent import NOTICE_VERSION_PATTERN

        version = self.cleaned_data["version"].strip()
        if not re.fullmatch(NOTICE_VERSION_PATTERN, version):
            raise ValidationError(
                "1-40 letters, digits, '.', '_' or '-', starting with a letter or digit."
            )
        return version


@admin.register(PrivacyNotice)
class PrivacyNoticeAdmin(ServiceAddMixin, PageAdmin):
    """Privacy notice versions: published once (consent.publish_notice), then read-only."""

    list_display = ("version", "published", "digest", "preview")
    search_fields = ("=version",)
    form = NoticeForm
    add_fieldsets = ((None, {"fields": ("version", "text")}),)
    add_permission = "compliance.add_privacynotice"
    prefill = ("version",)
    fieldsets = ((None, {"fields": ("version", "published", "sha256", "text_block")}),)

    published = utc_column("published_at", "published")

    @admin.display(description="SHA-256")
    def digest(self, notice: PrivacyNotice) -> str:
        return truncated(notice.sha256, 16)

    @admin.display(description="text")
    def preview(self, notice: PrivacyNotice) -> str:
        return truncated(" ".join(notice.text.split()), 48)

    @admin.display(description="text")
    def text_block(self, notice: PrivacyNotice) -> SafeString:
        return format_html('<pre class="bridge-json">{}</pre>', notice.text)

    def create_through_service(self, request: HttpRequest, data: dict) -> PrivacyNotice:
        from compliance import consent

        return consent.publish_notice(
            version=data["version"], text=data["text"], context=_context(request)
        )

    def created_message(self, obj: PrivacyNotice) -> str:
        return f"Notice {obj.version} published (SHA-256 {obj.sha256[:16]}…)."


# --- SOX change trails -------------------------------------------------------------------------

_OPERATION_VARIANTS = {
    SoxOperation.INSERT: "success",
    SoxOperation.UPDATE: "info",
    SoxOperation.DELETE: "danger",
}


def _audited_tables() -> list[tuple[str, str]]:
    """The tables SOX_AUDITED_MODELS names (model label -> table), for the list's filter."""
    from django.apps import apps

    tables = []
    for entry in settings.SOX_AUDITED_MODELS:
        app_label, _, name = entry.partition(".")
        try:
            model = apps.get_model(app_label, name)
        except LookupError:
            continue
        tables.append((model._meta.db_table, entry))
    return tables


class TableFilter(admin.SimpleListFilter):
    title = "table"
    parameter_name = "table"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return _audited_tables()

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(table_name=self.value()) if self.value() else queryset


def _is_secret(column: str) -> bool:
    # The capture's own rule (compliance/sox.py): these columns are stored as a marker saying
    # only whether they changed. Masked here too, so a row written any other way never shows one.
    return column.lower() in {name.strip().lower() for name in settings.SOX_SECRET_COLUMNS}


def _masked(row: dict | None) -> dict | None:
    if not isinstance(row, dict):
        return row
    return {
        column: "•••" if _is_secret(column) and not _is_marker(value) else value
        for column, value in row.items()
    }


def _is_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("<secret: ")


@admin.register(SoxChange)
class SoxChangeAdmin(PageAdmin):
    """Before/after of every row change in a SOX-audited table, captured by triggers."""

    list_display = (
        "occurred",
        "table_and_row",
        "operation_label",
        "fields_changed",
        "actor_and_reason",
    )
    list_display_links = ("occurred",)
    list_filter = (TableFilter, "operation")
    search_fields = ("actor_username", "object_pk", "request_id")
    search_help_text = "Exact actor username, object key or request id."
    list_per_page = 50
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "occurred",
                    "table_name",
                    "model",
                    "object_pk",
                    "operation_label",
                    "actor_username",
                    "actor_id",
                    "request_id",
                    "transaction_id",
                    "reason",
                )
            },
        ),
        ("Change", {"fields": ("diff",)}),
        ("As captured", {"fields": ("before_json", "after_json")}),
    )

    occurred = utc_column("occurred_at", "time")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q(actor_username=term) | Q(object_pk=term) | Q(request_id=term)
        return queryset.filter(match), False

    @display(description="table", ordering="table_name", header=True)
    def table_and_row(self, change: SoxChange) -> tuple[str, str]:
        return _short(change.model or change.table_name, 30), f"row {_short(change.object_pk, 24)}"

    @admin.display(description="operation", ordering="operation")
    def operation_label(self, change: SoxChange) -> SafeString:
        return label(change.get_operation_display(), _OPERATION_VARIANTS.get(change.operation, ""))

    @admin.display(description="changed")
    def fields_changed(self, change: SoxChange) -> str:
        return truncated(", ".join(change.changed_fields or []), 28)

    @display(description="by", ordering="actor_username", header=True)
    def actor_and_reason(self, change: SoxChange) -> tuple[str, str]:
        # "-": changed outside any request or command that names its actor (a migration).
        return _short(change.actor_username or "-", 24), _short(change.reason or "-", 32)

    @admin.display(description="before → after")
    def diff(self, change: SoxChange) -> SafeString | str:
        return sox_diff(change)

    @admin.display(description="before")
    def before_json(self, change: SoxChange) -> SafeString:
        return pretty_json(_masked(change.before))

    @admin.display(description="after")
    def after_json(self, change: SoxChange) -> SafeString:
        return pretty_json(_masked(change.after))


_CHANGED_ROW = mark_safe(' class="bridge-changed" data-changed="yes"')


def sox_diff(change: SoxChange) -> SafeString | str:
    """Every column before and after, the changed ones marked; a secret column shows only
    whether it changed."""
    before, after = change.before or {}, change.after or {}
    columns = list(before) + [column for column in after if column not in before]
    if not columns:
        return "-"
    masked_before, masked_after = _masked(before), _masked(after)
    changed = set(change.changed_fields or [])
    if not changed and change.operation == SoxOperation.UPDATE:
        changed = {column for column in columns if before.get(column) != after.get(column)}
    rows = []
    for column in columns:
        old = _cell(masked_before.get(column)) if before else "-"
        new = _cell(masked_after.get(column)) if after else "-"
        flag = column in changed
        rows.append(
            (
                column,
                _CHANGED_ROW if flag else "",
                column,
                old,
                new,
                label("changed", "warning") if flag else "",
            )
        )
    body = format_html_join(
        "", '<tr data-column="{}"{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>', rows
    )
    return format_html(
        '<table class="bridge-table bridge-diff"><thead><tr><th>column</th><th>before</th>'
        "<th>after</th><th></th></tr></thead><tbody>{}</tbody></table>",
        body,
    )


# --- Second approvals (segregation of duties) ------------------------------------------------

_APPROVAL_VARIANTS = {
    ApprovalStatus.PENDING: "warning",
    ApprovalStatus.APPROVED: "success",
    ApprovalStatus.REJECTED: "danger",
    ApprovalStatus.EXPIRED: "",
    ApprovalStatus.CANCELLED: "",
    ApprovalStatus.FAILED: "danger",
}
_APPROVAL_SHORT = {
    ApprovalStatus.PENDING: "pending",
    ApprovalStatus.APPROVED: "approved",
    ApprovalStatus.REJECTED: "rejected",
    ApprovalStatus.EXPIRED: "expired",
    ApprovalStatus.CANCELLED: "cancelled",
    ApprovalStatus.FAILED: "failed",
}


class ApproveForm(forms.Form):
    note = _text_field(
        "Note (optional)",
        max_length=2000,
        required=False,
        help_text="Approving carries the action out at once, as the requester asked it.",
    )


class DenyForm(forms.Form):
    note = _text_field("Why is it refused?", max_length=2000)


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(PageAdmin):
    """Actions waiting for a second authorised person; approving carries them out."""

    list_display = (
        "short_id",
        "action_and_requester",
        "status_label",
        "requested",
        "expires",
        "decider",
        "decided",
    )
    list_filter = ("status", "action")
    search_fields = ("requested_by_username", "decided_by_username")
    search_help_text = "Exact username of the requester or the approver."
    actions = ["approve_requests", "reject_requests", "cancel_requests"]
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "action_name",
                    "status_label",
                    "reason",
                    "requested_by_username",
                    "requested",
                    "expires",
                )
            },
        ),
        ("Decision", {"fields": ("decided_by_username", "decided", "decision_note")}),
        ("Parameters and result", {"fields": ("params_json", "result_json")}),
    )

    requested = utc_column("requested_at", "requested")
    expires = utc_column("expires_at", "expires")
    decided = utc_column("decided_at", "decided")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q(requested_by_username=term) | Q(decided_by_username=term)
        return queryset.filter(match), False

    @admin.display(description="id", ordering="id")
    def short_id(self, approval: ApprovalRequest) -> str:
        return str(approval.pk)[:8]

    @display(description="action", ordering="action", header=True)
    def action_and_requester(self, approval: ApprovalRequest) -> tuple[str, str]:
        return approval.get_action_display(), f"by {approval.requested_by_username or '-'}"

    @admin.display(description="action", ordering="action")
    def action_name(self, approval: ApprovalRequest) -> str:
        return approval.get_action_display()

    @admin.display(description="status", ordering="status")
    def status_label(self, approval: ApprovalRequest) -> SafeString:
        status = approval.status
        if status == ApprovalStatus.PENDING and approval.expires_at <= timezone.now():
            return format_html(
                '<span title="past its expiry: it can no longer be approved">{}</span>',
                label("expired", ""),
            )
        return format_html(
            '<span title="{}">{}</span>',
            approval.get_status_display(),
            label(_APPROVAL_SHORT.get(status, status), _APPROVAL_VARIANTS.get(status, "")),
        )

    @admin.display(description="decided by", ordering="decided_by_username")
    def decider(self, approval: ApprovalRequest) -> str:
        return truncated(approval.decided_by_username, 20) if approval.decided_by_username else "-"

    @admin.display(description="parameters")
    def params_json(self, approval: ApprovalRequest) -> SafeString:
        return pretty_json(approval.params)

    @admin.display(description="result")
    def result_json(self, approval: ApprovalRequest) -> SafeString:
        return pretty_json(approval.result)

    def has_decide_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("compliance.decide_approvalrequest")

    @admin.action(description="Approve (and carry out)…", permissions=["decide"])
    def approve_requests(
        self, request: HttpRequest, queryset: QuerySet[ApprovalRequest]
    ) -> HttpResponse | None:
        form = _bound(request, ApproveForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="approve_requests",
                title="Approve as the second person",
                intro="You cannot approve a request you made yourself.",
                form=form,
                submit="Approve",
                danger=True,
            )
        from compliance import approvals

        for item in queryset:
            try:
                approvals.approve(
                    approval=item,
                    user=request.user,
                    context=_context(request),
                    note=form.cleaned_data["note"],
                )
            except refusals(approvals.ApprovalError) as refused:
                self.message_user(request, f"{item}: {_refusal_text(refused)}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"{item.get_action_display()}: approved and carried out.",
                    messages.SUCCESS,
                )
        return None

    @admin.action(description="Reject…", permissions=["decide"])
    def reject_requests(
        self, request: HttpRequest, queryset: QuerySet[ApprovalRequest]
    ) -> HttpResponse | None:
        form = _bound(request, DenyForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="reject_requests",
                title="Reject the request",
                intro="The action is not carried out; the requester sees your note.",
                form=form,
                submit="Reject",
            )
        from compliance import approvals

        for item in queryset:
            try:
                approvals.reject(
                    approval=item,
                    user=request.user,
                    context=_context(request),
                    reason=form.cleaned_data["note"],
                )
            except refusals(approvals.ApprovalError) as refused:
                self.message_user(request, f"{item}: {_refusal_text(refused)}", messages.ERROR)
            else:
                self.message_user(
                    request, f"{item.get_action_display()}: rejected.", messages.SUCCESS
                )
        return None

    @admin.action(description="Withdraw my own request", permissions=["view"])
    def cancel_requests(self, request: HttpRequest, queryset: QuerySet[ApprovalRequest]) -> None:
        from compliance import approvals

        for item in queryset:
            try:
                approvals.cancel(approval=item, user=request.user, context=_context(request))
            except refusals(approvals.ApprovalError) as refused:
                self.message_user(request, f"{item}: {_refusal_text(refused)}", messages.ERROR)
            else:
                self.message_user(request, f"{item.get_action_display()}: withdrawn.")


# --- Legal holds and audit purges --------------------------------------------------------------


class HoldForm(forms.ModelForm):
    categories = forms.MultipleChoiceField(
        choices=RetentionCategory.choices,
        widget=UnfoldAdminCheckboxSelectMultipleWidget,
        help_text="Nothing in these categories is purged while the hold is active.",
    )

    class Meta:
        model = LegalHold
        fields = ("name", "reason", "categories", "subject_id", "covers_from", "covers_to")
        widgets = {"reason": UnfoldAdminTextareaWidget(attrs={"rows": 3})}
        help_texts = {
            "subject_id": "Only this data subject's records; empty: everyone's.",
            "covers_from": "Only records from this time on (UTC); empty: from the beginning.",
            "covers_to": "Only records up to this time (UTC); empty: up to now and on.",
        }

    def clean(self) -> dict:
        data = super().clean()
        start, end = data.get("covers_from"), data.get("covers_to")
        if start and end and end < start:
            raise ValidationError("The hold's end is before its start.")
        return data


class HoldStateFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("active", "Active"), ("released", "Released")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("active", "released"):
            return queryset.filter(released_at__isnull=self.value() == "active")
        return queryset


class ConfirmForm(forms.Form):
    """Nothing to ask: the page only confirms (bound and valid once sent back)."""


@admin.register(LegalHold)
class LegalHoldAdmin(ServiceAddMixin, PageAdmin):
    """Holds that stop retention from purging; placed and released through retention.py."""

    list_display = (
        "name_short",
        "state",
        "category_list",
        "subject",
        "period",
        "created",
        "released",
    )
    list_filter = (HoldStateFilter,)
    search_fields = ("name", "=subject_id")
    actions = ["release_holds"]
    form = HoldForm
    add_permission = "compliance.add_legalhold"
    prefill = ("name", "reason", "subject_id")
    add_fieldsets = (
        (
            None,
            {
                "fields": (
                    "name",
                    "reason",
                    "categories",
                    "subject_id",
                    "covers_from",
                    "covers_to",
                )
            },
        ),
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "name",
                    "state",
                    "reason",
                    "category_list",
                    "subject_id",
                    "period",
                    "created_by",
                    "created",
                    "released_by",
                    "released",
                )
            },
        ),
    )

    created = utc_column("created_at", "placed")
    released = utc_column("released_at", "released")

    def has_release_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("compliance.release_legalhold")

    @admin.display(description="name", ordering="name")
    def name_short(self, hold: LegalHold) -> str:
        return truncated(hold.name, 32)

    @admin.display(description="status", ordering="released_at")
    def state(self, hold: LegalHold) -> SafeString:
        return label("active", "warning") if hold.active else label("released", "")

    @admin.display(description="categories")
    def category_list(self, hold: LegalHold) -> str:
        names = dict(RetentionCategory.choices)
        return ", ".join(names.get(category, category) for category in hold.categories or [])

    @admin.display(description="subject", ordering="subject_id")
    def subject(self, hold: LegalHold) -> str:
        return truncated(hold.subject_id, 20) if hold.subject_id else "everyone"

    @admin.display(description="covers")
    def period(self, hold: LegalHold) -> str:
        if hold.covers_from is None and hold.covers_to is None:
            return "all time"
        start = hold.covers_from.date().isoformat() if hold.covers_from else "…"
        end = hold.covers_to.date().isoformat() if hold.covers_to else "…"
        return f"{start} to {end}"

    def service_errors(self) -> tuple[type[Exception], ...]:
        from compliance.retention import RetentionError

        return (RetentionError,)

    def create_through_service(self, request: HttpRequest, data: dict) -> LegalHold:
        from compliance import retention

        return retention.place_hold(
            name=data["name"],
            reason=data["reason"],
            categories=list(data["categories"]),
            subject_id=data.get("subject_id") or "",
            covers_from=data.get("covers_from"),
            covers_to=data.get("covers_to"),
            context=_context(request),
            user=request.user,
        )

    def created_message(self, obj: LegalHold) -> str:
        return f"Legal hold “{obj.name}” placed."

    @admin.action(description="Release the selected holds…", permissions=["release"])
    def release_holds(
        self, request: HttpRequest, queryset: QuerySet[LegalHold]
    ) -> HttpResponse | None:
        form = _bound(request, ConfirmForm)
        if not (form.is_bound and form.is_valid()):
            return _ask(
                self,
                request,
                queryset,
                action="release_holds",
                title="Release the legal hold",
                intro="Retention may purge what the hold kept, from its next run on.",
                form=form,
                submit="Release",
                danger=True,
            )
        from compliance import retention

        for hold in queryset:
            try:
                retention.release_hold(hold=hold, context=_context(request), user=request.user)
            except refusals(retention.RetentionError) as refused:
                self.message_user(request, f"{hold}: {_refusal_text(refused)}", messages.ERROR)
            else:
                self.message_user(request, f"Legal hold “{hold}” released.", messages.SUCCESS)
        return None


@admin.register(AuditPurge)
class AuditPurgeAdmin(PageAdmin):
    """Ranges of sealed audit events removed by retention, each cut at a signed checkpoint."""

    list_display = ("seqs", "events", "checkpoint", "newest", "purged", "job_link")
    list_per_page = 50
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "first_seq",
                    "last_seq",
                    "events",
                    "checkpoint",
                    "anchor_hash",
                    "newest",
                    "purged",
                    "job_link",
                )
            },
        ),
    )

    purged = utc_column("purged_at", "purged")
    newest = utc_column("newest_purged_at", "newest event purged")

    @admin.display(description="seq", ordering="last_seq")
    def seqs(self, purge: AuditPurge) -> str:
        return f"{purge.first_seq}..{purge.last_seq}"

    @admin.display(description="cut at checkpoint", ordering="checkpoint_number")
    def checkpoint(self, purge: AuditPurge) -> SafeString:
        url = (
            f"{reverse('admin:compliance_auditcheckpoint_changelist')}?"
            f"{urlencode({'q': purge.checkpoint_number})}"
        )
        return format_html('<a href="{}">#{}</a>', url, purge.checkpoint_number)

    @admin.display(description="job")
    def job_link(self, purge: AuditPurge) -> str:
        if purge.job_id is None:
            return "-"
        url = reverse("admin:bridge_job_change", args=[purge.job_id])
        return format_html('<a href="{}">{}</a>', url, purge.job_id)


# --- Reports -------------------------------------------------------------------------------------

_REPORT_VARIANTS = {
    ReportStatus.PENDING: "",
    ReportStatus.RUNNING: "info",
    ReportStatus.SUCCEEDED: "success",
    ReportStatus.FAILED: "danger",
}


class ReportForm(forms.ModelForm):
    """A report to generate: type, format and the days it covers (both included)."""

    date_from = forms.DateField(label="from", widget=UnfoldAdminSingleDateWidget)
    date_to = forms.DateField(
        label="to", widget=UnfoldAdminSingleDateWidget, help_text="Included: the whole day."
    )

    class Meta:
        model = ComplianceReport
        fields = ("type", "format", "filters")
        widgets = {"filters": UnfoldAdminTextareaWidget(attrs={"rows": 3})}
        help_texts = {
            "filters": 'Optional JSON, as the API takes it, e.g. {"actor": "carla"} for an '
            "audit trail; an unknown filter is refused, never ignored.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["filters"].required = False

    def clean(self) -> dict:
        # The service's checks, so a refusal is shown on the form with what was typed.
        from compliance.reports import ReportRefused
        from compliance.reports.services import clean_filters

        data = super().clean()
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and end < start:
            raise ValidationError("“to” is before “from”.")
        if data.get("type"):
            try:
                data["filters"] = clean_filters(data["type"], data.get("filters") or {})
            except ReportRefused as refused:
                self.add_error("filters", str(refused))
        return data


@admin.register(ComplianceReport)
class ComplianceReportAdmin(ServiceAddMixin, PageAdmin):
    """Generated reports with their manifest, signature and downloads."""

    list_display = (
        "short_id",
        "type_name",
        "format",
        "status_label",
        "row_count",
        "file_size",
        "created",
        "download",
    )
    list_filter = ("type", "format", "status")
    list_select_related = ("job",)
    date_hierarchy = "created_at"
    form = ReportForm
    add_fieldsets = ((None, {"fields": ("type", "format", "date_from", "date_to", "filters")}),)
    add_permission = "compliance.generate_report"
    prefill = ("type", "format")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "type_name",
                    "format",
                    "status_label",
                    "progress_bar",
                    "covers",
                    "filters_json",
                    "created_by",
                    "created",
                    "finished",
                    "error",
                )
            },
        ),
        ("File", {"fields": ("download", "row_count", "file_size", "sha256")}),
        ("Signature", {"fields": ("key_id", "checkpoint_number", "signature_block")}),
        ("Manifest", {"fields": ("manifest_json",)}),
    )

    created = utc_column("created_at", "created")
    finished = utc_column("finished_at", "finished")

    @admin.display(description="report", ordering="id")
    def short_id(self, report: ComplianceReport) -> str:
        return str(report.pk)[:8]

    @admin.display(description="type", ordering="type")
    def type_name(self, report: ComplianceReport) -> str:
        return report.get_type_display()

    @admin.display(description="status", ordering="status")
    def status_label(self, report: ComplianceReport) -> SafeString:
        return label(report.get_status_display(), _REPORT_VARIANTS.get(report.status, ""))

    @admin.display(description="progress")
    def progress_bar(self, report: ComplianceReport) -> str:
        return job_progress(report.job)

    @admin.display(description="rows", ordering="rows")
    def row_count(self, report: ComplianceReport) -> SafeString | str:
        if report.rows is None:
            return "-"
        if report.truncated:
            return format_html(
                '{} <span title="capped at REPORT_MAX_ROWS: the report says so">{}</span>',
                report.rows,
                label("capped", "warning"),
            )
        return str(report.rows)

    @admin.display(description="size", ordering="size")
    def file_size(self, report: ComplianceReport) -> str:
        if report.size is None:
            return "-"
        return format_html('<span class="bridge-nowrap">{}</span>', size_text(report.size))

    @admin.display(description="covers")
    def covers(self, report: ComplianceReport) -> str:
        return f"{utc_text(report.period_from)} to {utc_text(report.period_to)} (exclusive)"

    @admin.display(description="download")
    def download(self, report: ComplianceReport) -> SafeString | str:
        if report.status != ReportStatus.SUCCEEDED:
            return "-"
        links = [
            (
                reverse("admin:compliance_compliancereport_download", args=[report.pk, part]),
                text,
            )
            for part, text in (
                ("file", report.format.upper()),
                ("manifest", "manifest"),
                ("signature", ".sig"),
            )
        ]
        return format_html(
            '<span class="bridge-nowrap">{}</span>',
            format_html_join(" · ", '<a href="{}" class="bridge-download">{}</a>', links),
        )

    @admin.display(description="filters")
    def filters_json(self, report: ComplianceReport) -> SafeString:
        return pretty_json(report.filters)

    @admin.display(description="manifest")
    def manifest_json(self, report: ComplianceReport) -> SafeString:
        return pretty_json(report.manifest)

    @admin.display(description="signature (Ed25519, detached)")
    def signature_block(self, report: ComplianceReport) -> SafeString | str:
        if not report.signature:
            return "-"
        return format_html('<code class="bridge-hash">{}</code>', report.signature)

    # --- Generating: through reports.start_report -----------------------------------------

    def service_errors(self) -> tuple[type[Exception], ...]:
        from compliance.reports import ReportRefused

        return (ReportRefused,)

    def create_through_service(self, request: HttpRequest, data: dict) -> ComplianceReport:
        from compliance import reports

        return reports.start_report(
            type=data["type"],
            format=data["format"],
            date_from=data["date_from"],
            date_to=data["date_to"],
            filters=data.get("filters") or {},
            context=_context(request),
        )

    def created_message(self, obj: ComplianceReport) -> str:
        return (
            f"{obj.get_type_display()} report {str(obj.pk)[:8]} started; it can be downloaded "
            "once its status says succeeded."
        )

    # --- Downloads ------------------------------------------------------------------------

    def get_urls(self) -> list:
        return [
            path(
                "<uuid:pk>/download/<str:part>/",
                self.admin_site.admin_view(self.download_view),
                name="compliance_compliancereport_download",
            ),
            *super().get_urls(),
        ]

    def download_view(self, request: HttpRequest, pk: str, part: str) -> HttpResponse:
        """The report file (its download audited by the reports service, as over the API),
        its manifest or its detached signature: what `manage.py verify_report` checks."""
        from compliance import reports
        from compliance.reports.verify import companion_paths

        if not self.has_view_permission(request):
            raise PermissionDenied
        report = ComplianceReport.objects.filter(pk=pk).first()
        if report is None or report.status != ReportStatus.SUCCEEDED or part not in _PARTS:
            raise Http404("No such report file.")
        # Always the path the service derives from the id, never one read from the row.
        report_file = reports.report_path(report)
        manifest, signature = companion_paths(report_file)
        chosen = {"file": report_file, "manifest": manifest, "signature": signature}[part]
        try:
            handle = chosen.open("rb")
        except FileNotFoundError:
            raise Http404("The report's files are gone (retention removes them).") from None
        if part == "file":
            try:
                reports.record_download(report=report, context=_context(request))
            except BaseException:
                handle.close()
                raise
        return FileResponse(
            handle, as_attachment=True, filename=chosen.name, content_type=_PARTS[part](report)
        )


_REPORT_TYPES = {
    ReportFormat.CSV: "text/csv; charset=utf-8",
    ReportFormat.JSON: "application/json",
    ReportFormat.PDF: "application/pdf",
}
_PARTS = {
    "file": lambda report: _REPORT_TYPES.get(report.format, "application/octet-stream"),
    "manifest": lambda report: "application/json",
    "signature": lambda report: "application/json",
}


# --- Violations ----------------------------------------------------------------------------------

SEVERITY_VARIANTS = {ViolationSeverity.CRITICAL: "danger", ViolationSeverity.WARNING: "warning"}


@admin.register(ComplianceViolation)
class ComplianceViolationAdmin(PageAdmin):
    """Findings of the monitoring rules: open while the condition holds, resolved after."""

    list_display = (
        "finding",
        "severity_label",
        "status_label",
        "opened",
        "last_seen",
        "resolved",
    )
    list_filter = ("status", "severity", "rule")
    search_fields = ("=key",)
    search_help_text = "Exact key (a request id, username, backup id…)."
    list_per_page = 50
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "rule_name",
                    "key",
                    "severity_label",
                    "status_label",
                    "summary",
                    "opened",
                    "last_seen",
                    "resolved",
                )
            },
        ),
        ("Alert", {"fields": ("alerted", "alert_error")}),
        ("Details", {"fields": ("details_json",)}),
    )

    opened = utc_column("opened_at", "opened")
    last_seen = utc_column("last_seen_at", "last seen")
    resolved = utc_column("resolved_at", "resolved")
    alerted = utc_column("alerted_at", "alerted")

    def get_ordering(self, request: HttpRequest) -> list[str]:
        # Open ones first (status "open" sorts before "resolved"), newest on top.
        return ["status", "-opened_at"]

    @display(description="violation", ordering="rule", header=True)
    def finding(self, violation: ComplianceViolation) -> tuple[str, str]:
        return violation.get_rule_display(), _short(violation.summary, 60)

    @admin.display(description="rule", ordering="rule")
    def rule_name(self, violation: ComplianceViolation) -> str:
        return violation.get_rule_display()

    @admin.display(description="severity", ordering="severity")
    def severity_label(self, violation: ComplianceViolation) -> SafeString:
        variant = SEVERITY_VARIANTS.get(violation.severity, "")
        if violation.status == ViolationStatus.RESOLVED:
            variant = ""  # a resolved finding no longer calls for attention
        return format_html(
            '<span data-severity="{}">{}</span>',
            violation.severity,
            label(violation.get_severity_display(), variant),
        )

    @admin.display(description="status", ordering="status")
    def status_label(self, violation: ComplianceViolation) -> SafeString:
        if violation.status == ViolationStatus.OPEN:
            return label("open", SEVERITY_VARIANTS.get(violation.severity, "warning"))
        return label("resolved", "success")

    @admin.display(description="details")
    def details_json(self, violation: ComplianceViolation) -> SafeString:
        return pretty_json(violation.details)
