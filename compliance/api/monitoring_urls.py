"""Status, metrics, self-test and violations (compliance/monitoring.py)."""

from django.urls import URLPattern, path

from compliance.api import monitoring_views as views

urlpatterns: list[URLPattern] = [
    path("status", views.MonitoringViewSet.as_view({"get": "overview"}), name="compliance-status"),
    path("metrics", views.MonitoringViewSet.as_view({"get": "metrics"}), name="compliance-metrics"),
    path("test", views.MonitoringViewSet.as_view({"post": "self_test"}), name="compliance-test"),
    path(
        "violations",
        views.ViolationViewSet.as_view({"get": "list"}),
        name="compliance-violation-list",
    ),
    path(
        "violations/<int:pk>",
        views.ViolationViewSet.as_view({"get": "retrieve"}),
        name="compliance-violation-detail",
    ),
]
