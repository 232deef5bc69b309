"""SOX routes: change trails (compliance/sox.py) and second approvals (compliance/approvals.py)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
