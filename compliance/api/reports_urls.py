"""Report routes: /api/compliance/reports/* (compliance/reports/)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
