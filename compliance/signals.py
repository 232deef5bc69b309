"""Audit receivers for what happens outside the API: admin logins, lockouts, admin changes."""

from __future__ import annotations

from typing import Any

from axes.signals import user_locked_out
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.http import HttpRequest

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction

_ADMIN_FLAGS = {ADDITION: "add", CHANGE: "change", DELETION: "delete"}


@receiver(user_logged_in)
def login_succeeded_event(sender: Any, request: HttpRequest, user: Any, **kwargs: Any) -> None:
    # Only session logins (the admin) send this; the API login records its own event.
    record_event(
        action=AuditAction.LOGIN_SUCCEEDED,
        context=AuditContext.from_request(request, user=user),
        path=getattr(request, "path", ""),
        details={"channel": "admin"},
    )


@receiver(user_login_failed)
def login_failed_event(
    sender: Any, credentials: dict, request: HttpRequest | None = None, **kwargs: Any
) -> None:
    username = str(credentials.get("username", ""))[:150]
    record_event(
        action=AuditAction.LOGIN_FAILED,
        context=AuditContext.from_request(request).with_actor(None),
        path=getattr(request, "path", ""),
        details={
            "username": username,
            "channel": "api" if getattr(request, "path", "").startswith("/api/") else "admin",
            "locked_out": bool(getattr(request, "axes_locked_out", False)),
        },
    )


@receiver(user_locked_out)
def locked_out_event(
    sender: Any, request: HttpRequest, username: str | None, ip_address: str | None, **kwargs: Any
) -> None:
    record_event(
        action=AuditAction.LOCKED_OUT,
        context=AuditContext.from_request(request).with_actor(None),
        path=getattr(request, "path", ""),
        details={"username": (username or "")[:150]},
    )


@receiver(post_save, sender=LogEntry)
def admin_change_event(sender: Any, instance: LogEntry, created: bool, **kwargs: Any) -> None:
    if not created:
        return
    record_event(
        action=AuditAction.ADMIN_CHANGE,
        context=AuditContext.current(user=instance.user),
        object_type=instance.content_type.model_class()._meta.label_lower
        if instance.content_type and instance.content_type.model_class()
        else "",
        object_id=instance.object_id or "",
        details={
            "operation": _ADMIN_FLAGS.get(instance.action_flag, str(instance.action_flag)),
            "object": instance.object_repr[:200],
            "change_message": instance.get_change_message()[:1000],
        },
    )
