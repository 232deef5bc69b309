"""django-filter filtersets of the recovery area, used by the API."""

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django_filters import rest_framework as filters

from recovery.choices import HealthStatus, ServiceKind
from recovery.models import Service
from recovery.monitor import effective_status_q


class StrictBooleanField(forms.Field):
    """`true` or `false` only: Django's NullBooleanField reads anything else as "no filter",
    so `?critical=2` would be answered as if it were valid."""

    def to_python(self, value: Any) -> bool | None:
        if value in (None, ""):
            return None
        if value == "true":
            return True
        if value == "false":
            return False
        raise ValidationError("Enter true or false.", code="invalid")


class StrictBooleanFilter(filters.BooleanFilter):
    field_class = StrictBooleanField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # django-filter's BooleanWidget turns an unknown value into None before any field
        # sees it; the raw text goes to StrictBooleanField instead.
        kwargs["widget"] = forms.TextInput
        super().__init__(*args, **kwargs)


class ServiceFilter(filters.FilterSet):
    # By the status readers see (maintenance by hand, unknown when stale), not the raw column:
    # a list filtered on `up` must not show a service nobody has checked for an hour.
    status = filters.ChoiceFilter(
        choices=HealthStatus.choices, method="filter_status", help_text="Health as shown."
    )
    kind = filters.ChoiceFilter(choices=ServiceKind.choices)
    critical = StrictBooleanFilter()
    builtin = StrictBooleanFilter()

    class Meta:
        model = Service
        fields = ["status", "kind", "critical", "builtin"]

    def filter_status(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(effective_status_q(value))
