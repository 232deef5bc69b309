from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from recovery import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/security/", include("security.api.urls")),
    path("api/compliance/", include("compliance.api.urls")),
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


def handler500(request: HttpRequest) -> JsonResponse:
    from django.views.defaults import server_error

    if _wants_json(request):
        request_id = getattr(request, "request_id", "")
        return JsonResponse(
            {"detail": "Internal server error.", "code": "server_error", "request_id": request_id},
            status=500,
        )
    return server_error(request)
