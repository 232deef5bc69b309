"""Records every request under /api/ in the audit trail, durable before the response leaves."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qsl

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from compliance.choices import AuditAction
from compliance.services import current_request, event_values, record_event
from compliance.writer import writer

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BODY_LIMIT = 64 * 1024
_WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _request_details(request: HttpRequest, body: bytes | None) -> dict:
    details: dict = {}
    query = request.META.get("QUERY_STRING", "")
    if query:
        details["query"] = dict(parse_qsl(query, keep_blank_values=True))
    if body:
        try:
            details["body"] = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            details["body_bytes"] = len(body)
    agent = request.META.get("HTTP_USER_AGENT")
    if agent:
        details["user_agent"] = agent[:200]
    return details


class AuditMiddleware:
    """Assigns a request id and appends one `api.request` event per API call.

    The event is inserted after the view returns, in autocommit, so it is on disk before the
    response is sent. If that insert fails the client gets a 503 rather than an unrecorded
    success: an audit trail that silently drops calls is worse than an outage.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        supplied = request.META.get("HTTP_X_REQUEST_ID", "")
        request.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        audited = settings.ENABLE_AUDIT_LOGGING and request.path.startswith("/api/")
        body = None
        if audited and request.method in _WRITE_METHODS:
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if 0 < length <= _BODY_LIMIT and "json" in request.META.get("CONTENT_TYPE", ""):
                # Read (and cache) the body before DRF consumes the stream.
                body = request.body
        started = time.perf_counter()
        token = current_request.set(request)
        try:
            response = self.get_response(request)
        finally:
            current_request.reset(token)
        if audited:
            latency_ms = (time.perf_counter() - started) * 1000
            try:
                fields = dict(
                    action=AuditAction.API_REQUEST,
                    actor=getattr(request, "user", None),
                    request=request,
                    method=request.method or "",
                    path=request.path,
                    status_code=response.status_code,
                    latency_ms=latency_ms,
                    details=_request_details(request, body),
                )
                if settings.AUDIT_GROUP_COMMIT:
                    writer.write(event_values(**fields))
                else:
                    record_event(**fields)
            except Exception:
                log.exception(
                    "audit event for request %s could not be recorded", request.request_id
                )
                response = JsonResponse(
                    {
                        "detail": "The audit trail is unavailable; the request was not recorded.",
                        "request_id": request.request_id,
                    },
                    status=503,
                )
        response["X-Request-ID"] = request.request_id
        return response
