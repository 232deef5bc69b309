from django import forms
from django_filters import rest_framework as filters

from compliance.models import AuditEvent


class AuditEventFilterForm(forms.Form):
    def clean(self) -> dict:
        data = super().clean()
        start, end = data.get("from"), data.get("to")
        if start and end and start > end:
            self.add_error("to", "Must not be earlier than 'from'.")
        return data


class AuditEventFilter(filters.FilterSet):
    """The audit event list's filters; each one is served by an index."""

    actor = filters.CharFilter(
        field_name="actor_username", max_length=150, help_text="Exact username of the actor."
    )
    action = filters.CharFilter(max_length=64, help_text="Exact action, e.g. api.request.")
    to = filters.IsoDateTimeFilter(
        field_name="occurred_at", lookup_expr="lt", help_text="ISO 8601 time; events before it."
    )

    class Meta:
        model = AuditEvent
        fields: list[str] = []
        form = AuditEventFilterForm

    @property
    def is_filtering(self) -> bool:
        """Whether any filter was given (the unfiltered total is counted from the chain head)."""
        return any(self.data.get(name) not in (None, "") for name in self.filters)


# `from` is a Python keyword, so it cannot be written as a class attribute.
AuditEventFilter.base_filters["from"] = filters.IsoDateTimeFilter(
    field_name="occurred_at", lookup_expr="gte", help_text="ISO 8601 time; events at or after it."
)
