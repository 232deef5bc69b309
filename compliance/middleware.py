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
from rest_framework.exceptions import APIException

from compliance import sox
from compliance.audit import AuditContext, current_request, event_values, record_event
from compliance.choices import AuditAction
from compliance.writer import writer
from security.authentication import VersionedJWTAuthentication

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BODY_LIMIT = 64 * 1024
_WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_ADMIN_PREFIX = "/admin/"
_FORM_VALUE_LIMIT = 1000


def _request_details(request: HttpRequest, body: bytes | None, form: bool = False) -> dict:
    details: dict = {}
    query = request.META.get("QUERY_STRING", "")
    if query:
        details["query"] = dict(parse_qsl(query, keep_blank_values=True))
    if body:
        try:
            details["body"] = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            details["body_bytes"] = len(body)
    if form:
        # An admin form or action: which action, on which rows, with which values (secrets
        # are redacted by key when the event is built; csrfmiddlewaretoken is one of them).
        # Values are capped: a pasted certificate or long description is not the point here.
        form = {
            key: [value[:_FORM_VALUE_LIMIT] for value in values]
            for key, values in list(request.POST.lists())[:100]
        }
        details["form"] = {
            key: values if len(values) > 1 or key == "_selected_action" else values[0]
            for key, values in form.items()
        }
    agent = request.META.get("HTTP_USER_AGENT")
    if agent:
        details["user_agent"] = agent[:200]
    return details


def _actor(request: HttpRequest) -> object:
    """The user as DRF authenticated it; for an /api/ path no DRF view served (a 404), the
    bearer token is checked here, so a JWT user still appears by name and not as anonymous."""
    user = getattr(request, "user", None)
    if getattr(user, "is_authenticated", False) or "HTTP_AUTHORIZATION" not in request.META:
        return user
    try:
        found = VersionedJWTAuthentication().authenticate(request)
    except APIException:
        return user  # an invalid or revoked token: the request is anonymous, as DRF said
    return found[0] if found else user


class AuditMiddleware:
    """Assigns a request id and appends one event per API call (`api.request`) and per admin
    console form or action sent (`admin.request`).

    The event is inserted after the view returns, in autocommit, so it is on disk before the
    response is sent. If that insert fails the client gets a 503 rather than an unrecorded
    success: an audit trail that silently drops calls is worse than an outage.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        supplied = request.META.get("HTTP_X_REQUEST_ID", "")
        request.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        api = request.path.startswith("/api/")
        # Every admin POST, not only those Django logs as a LogEntry: bulk deletes (one bulk
        # insert of LogEntry rows, no signal) and actions such as disabling a beat task log
        # nothing of their own.
        admin = request.method == "POST" and request.path.startswith(_ADMIN_PREFIX)
        audited = settings.ENABLE_AUDIT_LOGGING and (api or admin)
        body = None
        if audited and api and request.method in _WRITE_METHODS:
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
            # SOX change trails: the request's actor, id and X-Change-Reason go into the
            # database session before its first write (the user is known only once DRF has
            # authenticated, inside the view) and are cleared when it ends (compliance/sox.py).
            with sox.request_context(request):
                response = self.get_response(request)
        finally:
            current_request.reset(token)
        if audited:
            latency_ms = (time.perf_counter() - started) * 1000
            try:
                fields = dict(
                    action=AuditAction.API_REQUEST if api else AuditAction.ADMIN_REQUEST,
                    context=AuditContext.from_request(
                        request, user=_actor(request) if api else None
                    ),
                    method=request.method or "",
                    path=request.path,
                    status_code=response.status_code,
                    latency_ms=latency_ms,
                    details=_request_details(request, body, form=admin),
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
                        "code": "audit_unavailable",
                        "request_id": request.request_id,
                    },
                    status=503,
                )
        response["X-Request-ID"] = request.request_id
        return response
