"""Every API refusal names its reason in a machine-readable `code` beside the `detail` text."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        # Django's own guard (DATA_UPLOAD_MAX_MEMORY_SIZE), which DRF would let through as 500.
        return Response(
            {"detail": "The request body is too large.", "code": "body_too_large"}, status=413
        )
    response = drf_exception_handler(exc, context)
    if response is None or not isinstance(response.data, dict):
        return response
    detail = response.data.get("detail")
    # DRF keeps the code on the ErrorDetail string (not_authenticated, permission_denied,
    # throttled, ...); field errors are keyed by the field already.
    code = getattr(detail, "code", None)
    if code and "code" not in response.data:
        response.data["code"] = code
    return response
