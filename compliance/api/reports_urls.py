"""Report routes: /api/compliance/reports/* (compliance/api/report_views.py)."""

from django.urls import URLPattern, path

from compliance.api.report_views import ComplianceReportViewSet as Reports

urlpatterns: list[URLPattern] = [
    path(
        "reports/generate",
        Reports.as_view({"post": "generate"}),
        name="compliance-report-generate",
    ),
    path("reports/list", Reports.as_view({"get": "list"}), name="compliance-report-list"),
    path(
        "reports/<uuid:id>", Reports.as_view({"get": "retrieve"}), name="compliance-report-detail"
    ),
    path(
        "reports/<uuid:id>/download",
        Reports.as_view({"get": "download"}),
        name="compliance-report-download",
    ),
    path(
        "reports/<uuid:id>/manifest",
        Reports.as_view({"get": "manifest"}),
        name="compliance-report-manifest",
    ),
    path(
        "reports/<uuid:id>/signature",
        Reports.as_view({"get": "signature"}),
        name="compliance-report-signature",
    ),
]
