"""Status, metrics, self-test and violations (compliance/monitoring.py)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
