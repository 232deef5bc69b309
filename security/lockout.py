"""One lockout response for the API login and the admin login (axes' AXES_LOCKOUT_CALLABLE)."""

from __future__ import annotations

from axes.helpers import get_cool_off
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def retry_after_seconds(request: HttpRequest | None = None) -> int:
    # Every refused attempt restarts axes' cool-off (AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT),
    # so the full cool-off is exactly how long this client must wait from now.
    cool_off = get_cool_off(request)
    return max(1, int(cool_off.total_seconds())) if cool_off else 3600


def lockout_response(
    request: HttpRequest,
    original_response: HttpResponse | None = None,
    credentials: dict | None = None,
) -> HttpResponse:
    retry_after = retry_after_seconds(request)
    if request.path.startswith("/api/"):
        response: HttpResponse = JsonResponse(
            {
                "detail": "Too many failed login attempts; locked for this address.",
                "code": "locked_out",
                "retry_after": retry_after,
            },
            status=429,
        )
    else:
        response = render(
            request, "security/lockout.html", {"retry_after": retry_after}, status=429
        )
    response["Retry-After"] = str(retry_after)
    return response
