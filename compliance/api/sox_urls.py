"""SOX routes: change trails (compliance/sox.py) and second approvals (compliance/approvals.py)."""

from django.urls import URLPattern, path

from compliance.api import sox_views

urlpatterns: list[URLPattern] = [
    path(
        "sox/changes",
        sox_views.SoxChangeViewSet.as_view({"get": "list"}),
        name="sox-change-list",
    ),
    path(
        "sox/changes/<int:pk>",
        sox_views.SoxChangeViewSet.as_view({"get": "retrieve"}),
        name="sox-change-detail",
    ),
    path("approvals", sox_views.ApprovalViewSet.as_view({"get": "list"}), name="approval-list"),
    path(
        "approvals/<uuid:pk>",
        sox_views.ApprovalViewSet.as_view({"get": "retrieve"}),
        name="approval-detail",
    ),
    path(
        "approvals/<uuid:pk>/approve",
        sox_views.ApprovalViewSet.as_view({"post": "approve"}),
        name="approval-approve",
    ),
    path(
        "approvals/<uuid:pk>/reject",
        sox_views.ApprovalViewSet.as_view({"post": "reject"}),
        name="approval-reject",
    ),
    path(
        "approvals/<uuid:pk>/cancel",
        sox_views.ApprovalViewSet.as_view({"post": "cancel"}),
        name="approval-cancel",
    ),
]
