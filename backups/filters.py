"""django-filter filtersets of the backups area, used by the API."""

from django_filters import rest_framework as filters

from backups.choices import BackupKind, BackupStatus, RestoreKind, RestoreStatus
from backups.models import Backup, RestoreJob
from compliance.filters import UTCDateTimeFilter
from recovery.filters import StrictBooleanFilter


class BackupFilter(filters.FilterSet):
    kind = filters.ChoiceFilter(choices=BackupKind.choices)
    status = filters.ChoiceFilter(choices=BackupStatus.choices)
    rule_321_ok = StrictBooleanFilter(help_text="true: backups that meet the 3-2-1 rule.")
    created_after = UTCDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UTCDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Backup
        fields = ["kind", "status", "rule_321_ok", "created_after", "created_before"]


class RestoreJobFilter(filters.FilterSet):
    kind = filters.ChoiceFilter(choices=RestoreKind.choices)
    status = filters.ChoiceFilter(choices=RestoreStatus.choices)

    class Meta:
        model = RestoreJob
        fields = ["kind", "status"]
