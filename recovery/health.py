"""Liveness and readiness probes for load balancers and orchestrators (no authentication)."""

from __future__ import annotations

import os
import uuid

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection


def _reason(exc: Exception, url: str = "", placeholder: str = "") -> str:
    """The exception's type and first line. Client exception texts can embed the connection
    URL, which may carry a password: it is replaced by `placeholder`."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    if url:
        text = text.replace(url, placeholder)
    return f"{type(exc).__name__}: {text}"


def check_database() -> str | None:
    """None when the database answers, else a short reason (no connection string in it)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return _reason(exc)
    return None


def check_broker(timeout: float = 1.0) -> str | None:
    """None when the Celery broker accepts a connection, else a short reason."""
    try:
        with Connection(
            settings.CELERY_BROKER_URL,
            transport_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS,
            connect_timeout=timeout,
        ) as broker:
            broker.ensure_connection(max_retries=1, timeout=timeout)
        folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_in")
        if folder and not os.access(folder, os.W_OK):
            return f"queue folder {folder} is not writable"
    except Exception as exc:
        return _reason(exc, settings.CELERY_BROKER_URL, "<broker>")
    return None


def check_cache() -> str | None:
    """None when the shared cache (Redis with REDIS_URL) stores and returns a value."""
    key, token = "bridge:ready", uuid.uuid4().hex
    try:
        cache.set(key, token, timeout=10)
        if cache.get(key) != token:
            return "the cache did not return what was stored"
    except Exception as exc:
        return _reason(exc, settings.REDIS_URL or "", "<redis>")
    return None


@never_cache
@require_GET
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    checks = {"database": check_database(), "broker": check_broker(), "cache": check_cache()}
    failing = {name: reason for name, reason in checks.items() if reason}
    body = {
        "status": "unavailable" if failing else "ok",
        "checks": {name: reason or "ok" for name, reason in checks.items()},
    }
    if failing:
        body["failing"] = sorted(failing)
    return JsonResponse(body, status=503 if failing else 200)
