"""GDPR routes: data-subject requests (compliance/dsr.py) and consent (compliance/consent.py)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
