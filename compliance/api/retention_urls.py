"""Retention routes: legal holds, retention runs and audit purges (compliance/retention.py)."""

from django.urls import URLPattern, path

from compliance.api.retention_views import LegalHoldViewSet, RetentionViewSet

urlpatterns: list[URLPattern] = [
    path(
        "retention/legal-holds",
        LegalHoldViewSet.as_view({"get": "list", "post": "create"}),
        name="retention-legal-hold-list",
    ),
    path(
        "retention/legal-holds/<int:pk>",
        LegalHoldViewSet.as_view({"get": "retrieve"}),
        name="retention-legal-hold-detail",
    ),
    path(
        "retention/legal-holds/<int:pk>/release",
        LegalHoldViewSet.as_view({"post": "release"}),
        name="retention-legal-hold-release",
    ),
    path("retention/plan", RetentionViewSet.as_view({"get": "plan"}), name="retention-plan"),
    path("retention/run", RetentionViewSet.as_view({"post": "run"}), name="retention-run"),
    path(
        "retention/purges", RetentionViewSet.as_view({"get": "purges"}), name="retention-purge-list"
    ),
]
