from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse


class BridgeAdminSite(admin.AdminSite):
    """The operator console: Django's admin with a dashboard as its index page."""

    site_header = "Bridge console"
    site_title = "Bridge"
    index_title = "Dashboard"

    def index(self, request: HttpRequest, extra_context: dict | None = None) -> TemplateResponse:
        from bridge.dashboard import build_dashboard

        context = {"dashboard": build_dashboard()}
        context.update(extra_context or {})
        return super().index(request, context)
