import re
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_ipv46_address
from django.db.models import QuerySet
from django_filters import rest_framework as filters
from django_filters.fields import IsoDateTimeField

from compliance import personal
from compliance.choices import CheckpointStatus
from compliance.models import AuditCheckpoint, AuditEvent

# RFC 3339, as the schema's `format: date-time` says: a date, a time and an offset. Django alone
# would also take a bare date or a time without offset (read in the server's zone), which is
# ambiguous in an audit query and invalid for the schema.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


class UTCDateTimeField(IsoDateTimeField):
    """An RFC 3339 time, converted to UTC.

    Converting matters beyond tidiness: PostgreSQL takes offsets up to 15:59 only, and a valid
    RFC 3339 offset such as -16:59 passed through would fail the query (a 500).
    """

    default_error_messages = {
        "invalid": "Enter an RFC 3339 time with its offset, e.g. 2026-01-31T12:00:00Z.",
    }

    def to_python(self, value: Any) -> datetime | None:
        if value in self.empty_values:
            return None
        if not isinstance(value, str) or not _RFC3339.fullmatch(value):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        try:
            return datetime.fromisoformat(value.upper()).astimezone(UTC)
        except (ValueError, OverflowError):
            # A 61st second, or a moment that falls outside years 1-9999 once in UTC.
            raise ValidationError(self.error_messages["invalid"], code="invalid") from None


class UTCDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UTCDateTimeField


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
        method="filter_actor",
        max_length=150,
        help_text=(
            "Exact username of the actor (found through the blind index where the event's "
            "personal data is sealed; an erased subject's events are no longer found)."
        ),
    )
    ip = filters.CharFilter(
        method="filter_ip",
        max_length=45,
        validators=[validate_ipv46_address],
        help_text="Exact client IP address (through the blind index where it is sealed).",
    )
    action = filters.CharFilter(max_length=64, help_text="Exact action, e.g. api.request.")
    to = UTCDateTimeFilter(
        field_name="occurred_at", lookup_expr="lt", help_text="ISO 8601 time; events before it."
    )

    class Meta:
        model = AuditEvent
        fields: list[str] = []
        form = AuditEventFilterForm

    def filter_actor(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(personal.actor_match(value))

    def filter_ip(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(personal.ip_match(value))

    @property
    def is_filtering(self) -> bool:
        """Whether any filter was given (the unfiltered total is counted from the chain head)."""
        return any(self.data.get(name) not in (None, "") for name in self.filters)


# `from` is a Python keyword, so it cannot be written as a class attribute.
AuditEventFilter.base_filters["from"] = UTCDateTimeFilter(
    field_name="occurred_at", lookup_expr="gte", help_text="ISO 8601 time; events at or after it."
)


class CheckpointFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=CheckpointStatus.choices)
    key_id = filters.CharFilter()

    class Meta:
        model = AuditCheckpoint
        fields = ["status", "key_id"]
