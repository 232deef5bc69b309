"""Retention routes: legal holds, retention runs and audit purges (compliance/retention.py)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
