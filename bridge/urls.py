from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.response import Response

from bridge.middleware import server_error_json
from recovery import health


class DocsView(SpectacularSwaggerSplitView):
    """Swagger UI, an HTML page: an anonymous visitor is sent to the console login and back.
    Its start-up script comes from its own URL (?script), not inline: CSP allows 'self' only."""

    def handle_exception(self, exc: Exception) -> Response | HttpResponseBase:
        if not self.request.user.is_authenticated:
            return redirect_to_login(self.request.get_full_path(), "admin:login")
        return super().handle_exception(exc)


@csrf_exempt  # a POST to an unknown path is a 404, not the CSRF page (HTML) in its place
def api_not_found(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {"detail": "Not found.", "code": "not_found", "path": request.path}, status=404
    )


urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index"), name="home"),
    path("admin/", admin.site.urls),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", DocsView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/security/", include("security.api.urls")),
    path("api/compliance/", include("compliance.api.urls")),
    path("api/recovery/", include("recovery.api.urls")),
    path("api/backup/", include("backups.api.urls")),
    path("api/", include("bridge.api_urls")),
    # Anything else under /api/ is a JSON 404 in every mode (DEBUG's HTML page included).
    re_path(r"^api/", api_not_found),
]


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith("/api/") or request.path.startswith("/health/")


def handler404(request: HttpRequest, exception: Exception) -> JsonResponse:
    from django.views.defaults import page_not_found

    if _wants_json(request):
        return JsonResponse(
            {"detail": "Not found.", "code": "not_found", "path": request.path}, status=404
        )
    return page_not_found(request, exception)


def handler500(request: HttpRequest) -> HttpResponse:
    from django.views.defaults import server_error

    if _wants_json(request):
        return server_error_json(request)
    return server_error(request)
