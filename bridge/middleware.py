"""Errors under /api/ are JSON in every mode: DEBUG's HTML error page is for browsers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse

log = logging.getLogger("django.request")


class ApiErrorMiddleware:
    """Turns an exception escaping an /api/ view into a JSON 500 naming the request id.

    Without it, DEBUG mode answers an API client with an HTML traceback (settings and all);
    with DEBUG off Django would call handler500, which answers JSON too, so both modes agree.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith("/api/"):
            return None
        log.error(
            "Internal Server Error: %s",
            request.path,
            exc_info=(type(exception), exception, exception.__traceback__),
            extra={"status_code": 500, "request": request},
        )
        return server_error_json(request)


def server_error_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "detail": "Internal server error.",
            "code": "server_error",
            "request_id": getattr(request, "request_id", ""),
        },
        status=500,
    )
