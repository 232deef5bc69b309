"""The catalogue of monitored services: the rules a service must follow wherever it is
written (the API's serializer and the console's form both call `validate_service`), and the
services that add, change and remove one, each in one transaction with one audit event."""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction
from recovery import monitor, probes
from recovery.choices import HealStrategy, HealthStatus, ServiceKind
from recovery.models import HealthCheck, Service

# The fields an operator may change on a built-in service (the rest follow the settings).
BUILTIN_EDITABLE = {
    "check_interval",
    "timeout_ms",
    "critical",
    "heal_strategies",
    "restart_command",
    "standby_target",
    "enabled",
    "maintenance",
    "depends_on",
}
# Query parameters that carry a secret: such a URL belongs in `credential`, not in `target`.
SECRET_PARAMETERS = re.compile(
    r"^(pass(word|wd)?|pwd|token|access_token|api_?key|apikey|secret|auth|key|sig|signature)$",
    re.I,
)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_QUEUE = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")
AUDITED_FIELDS = (
    "kind",
    "target",
    "check_interval",
    "timeout_ms",
    "critical",
    "heal_strategies",
    "restart_command",
    "standby_target",
    "expect_status",
    "expect_body",
    "enabled",
    "maintenance",
)


class ServiceError(Exception):
    """A refusal with a stable code (the API answers 409 with it)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _credential_error() -> ValidationError:
    return ValidationError(
        "Credentials do not belong in the target: store the password or token as a stored "
        "secret and name it in `credential`.",
        code="credential",
    )


def validate_target(kind: str, target: str) -> None:
    """Raise ValidationError (code `credential` for an embedded secret) unless `target` has
    the form `kind` needs: host:port (optionally /name) or, for http, an http(s) URL; for
    celery, comma-separated queue names."""
    if not target:
        raise ValidationError("A target is required.", code="required")
    if kind == ServiceKind.HTTP:
        try:
            parts = urlsplit(target)
            port = parts.port
        except ValueError as exc:
            raise ValidationError(f"Not a valid URL: {exc}.", code="invalid") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError("Expected an http:// or https:// URL.", code="invalid")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise _credential_error()
        if any(SECRET_PARAMETERS.match(name) for name, _ in parse_qsl(parts.query, True)):
            raise _credential_error()
        if any(ch.isspace() for ch in target) or not target.isascii():
            raise ValidationError("A URL has no spaces or non-ASCII characters.", code="invalid")
        if port == 0:
            raise ValidationError("The port must be between 1 and 65535.", code="invalid")
        return
    if kind == ServiceKind.CELERY:
        queues = [name.strip() for name in target.split(",")]
        if not all(_QUEUE.match(name) for name in queues):
            raise ValidationError(
                "Expected queue names separated by commas (letters, digits, _ . : @ -).",
                code="invalid",
            )
        return
    if "@" in target:
        raise _credential_error()
    try:
        address = probes.parse_address(target)
    except ValueError as exc:
        raise ValidationError(f"Expected host:port: {exc}.", code="invalid") from None
    host = address.host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValidationError("Not a valid host name or address.", code="invalid") from None
    if address.path and kind == ServiceKind.TCP:
        raise ValidationError("A TCP target is host:port only.", code="invalid")
    if address.path and kind == ServiceKind.REDIS and not address.path.isdigit():
        raise ValidationError("After host:port a Redis target takes a database number.")
    if address.path and not re.match(r"^[A-Za-z0-9_.-]{1,63}$", address.path):
        raise ValidationError("Not a valid database or virtual host name.", code="invalid")


def _reaches(start: list[Service], goal_pk: int | None) -> bool:
    """Whether `goal` is among `start` or what they depend on, transitively."""
    if goal_pk is None:
        return False
    seen: set[int] = set()
    frontier = [service.pk for service in start]
    while frontier:
        if goal_pk in frontier:
            return True
        seen.update(frontier)
        frontier = [
            pk
            for pk in Service.depends_on.through.objects.filter(
                from_service_id__in=frontier
            ).values_list("to_service_id", flat=True)
            if pk not in seen
        ]
    return False


def validate_service(values: dict[str, Any], *, instance: Service | None = None) -> dict[str, Any]:
    """Check a service's fields as written (a new one's, or the changed ones of `instance`)
    and raise ValidationError with a message per field. `depends_on` may be Services or
    names; the returned dict holds Services."""
    errors: dict[str, list[ValidationError]] = {}
    fields = ("name", "kind", "target", "heal_strategies", "restart_command", "standby_target")
    merged = {field: getattr(instance, field) for field in fields} if instance else {}
    merged.update(values)

    def refuse(field: str, message: str | ValidationError, code: str = "invalid") -> None:
        error = (
            message if isinstance(message, ValidationError) else ValidationError(message, code=code)
        )
        errors.setdefault(field, []).append(error)

    name = merged.get("name", "")
    if instance is None and str(name).startswith(monitor.BUILTIN_PREFIX):
        refuse("name", f"Names starting with {monitor.BUILTIN_PREFIX!r} are Bridge's own.")
    if instance is not None and "name" in values and values["name"] != instance.name:
        refuse("name", "A service's name cannot be changed (it names its breaker and URLs).")
    if instance is not None and instance.builtin:
        fixed = sorted(
            field
            for field in set(values) - BUILTIN_EDITABLE
            if values[field] != getattr(instance, field, None)
        )
        for field in fixed:
            refuse(field, "Follows Bridge's settings on a built-in service.", "builtin")
    kind = merged.get("kind", "")
    if kind not in ServiceKind.values:
        refuse("kind", f"One of {', '.join(ServiceKind.values)}.")
    elif "target" in values or "kind" in values:
        try:
            validate_target(kind, merged.get("target", ""))
        except ValidationError as error:
            refuse("target", error)
    standby = merged.get("standby_target", "")
    if standby and kind in ServiceKind.values and ("standby_target" in values or "kind" in values):
        try:
            validate_target(kind, standby)
        except ValidationError as error:
            refuse("standby_target", error)
    strategies = merged.get("heal_strategies") or []
    if not isinstance(strategies, list) or not all(
        isinstance(item, str) and item in HealStrategy.values for item in strategies
    ):
        refuse("heal_strategies", f"A list of {', '.join(HealStrategy.values)}.")
    elif len(set(strategies)) != len(strategies):
        refuse("heal_strategies", "Each strategy at most once.")
    else:
        if HealStrategy.RESTART_COMMAND in strategies and not merged.get("restart_command"):
            refuse("heal_strategies", "restart_command needs the service's restart_command.")
        if HealStrategy.SWITCH_STANDBY in strategies and not standby:
            refuse("heal_strategies", "switch_standby needs the service's standby_target.")
    command = merged.get("restart_command", "")
    if command and command not in (settings.RECOVERY_RESTART_COMMANDS or {}):
        allowed = ", ".join(sorted(settings.RECOVERY_RESTART_COMMANDS or {})) or "none configured"
        refuse("restart_command", f"Not in RECOVERY_RESTART_COMMANDS ({allowed}).", "not_allowed")
    cleaned = dict(values)
    if "depends_on" in values:
        dependencies = []
        missing = []
        for item in values["depends_on"] or []:
            if isinstance(item, Service):
                dependencies.append(item)
                continue
            found = Service.objects.filter(name=item).first() if isinstance(item, str) else None
            if found is None:
                missing.append(str(item))
            else:
                dependencies.append(found)
        if missing:
            refuse("depends_on", f"No service named {', '.join(missing)}.", "not_found")
        elif instance is not None and any(dep.pk == instance.pk for dep in dependencies):
            refuse("depends_on", "A service cannot depend on itself.", "cycle")
        elif instance is not None and _reaches(dependencies, instance.pk):
            refuse("depends_on", "That would make a dependency cycle.", "cycle")
        cleaned["depends_on"] = dependencies
    if errors:
        raise ValidationError(errors)
    return cleaned


def _snapshot(service: Service) -> dict[str, Any]:
    data = {field: getattr(service, field) for field in AUDITED_FIELDS}
    data["credential"] = service.credential.name if service.credential_id else None
    data["depends_on"] = sorted(service.depends_on.values_list("name", flat=True))
    return data


def maintenance_changed(service: Service, was: bool) -> None:
    """Record maintenance switched on or off as a transition (the caller's transaction)."""
    if service.maintenance and not was:
        monitor.set_status(service, HealthStatus.MAINTENANCE, "in maintenance (set by hand)")
    elif was and not service.maintenance:
        # Whatever it was before is old news: the next check decides.
        monitor.set_status(service, HealthStatus.UNKNOWN, "maintenance ended")


def create_service(*, context: AuditContext, values: dict[str, Any]) -> Service:
    """Add a monitored service (values already validated); audited."""
    values = dict(values)
    dependencies = values.pop("depends_on", [])
    with transaction.atomic():
        service = Service.objects.create(builtin=False, **values)
        if dependencies:
            service.depends_on.set(dependencies)
        if service.maintenance:
            maintenance_changed(service, False)
        record_event(
            action=AuditAction.SERVICE_CREATED,
            context=context,
            object_type="recovery.service",
            object_id=service.name,
            details=_snapshot(service),
        )
    return service


def update_service(*, context: AuditContext, service: Service, values: dict[str, Any]) -> Service:
    """Change a service (values already validated); the audit event names what changed."""
    values = dict(values)
    before = _snapshot(service)
    was_in_maintenance = service.maintenance
    with transaction.atomic():
        dependencies = values.pop("depends_on", None)
        for field, value in values.items():
            setattr(service, field, value)
        # Only the fields written: a full save would put back the status and counters as
        # they were when the request loaded the row, over what the monitor wrote since.
        service.save(update_fields=[*values, "updated_at"])
        if dependencies is not None:
            service.depends_on.set(dependencies)
        maintenance_changed(service, was_in_maintenance)
        after = _snapshot(service)
        changed = {key: after[key] for key in after if after[key] != before[key]}
        record_event(
            action=AuditAction.SERVICE_UPDATED,
            context=context,
            object_type="recovery.service",
            object_id=service.name,
            details={"changed": changed, "before": {key: before[key] for key in changed}},
        )
    return service


def delete_service(*, context: AuditContext, service: Service) -> None:
    """Remove a service and its history; Bridge's own cannot be removed (ServiceError)."""
    if service.builtin:
        raise ServiceError(
            f"{service.name} is one of Bridge's own services; disable its checks instead.",
            "builtin",
        )
    with transaction.atomic():
        details = _snapshot(service)
        name = service.name
        service.delete()
        record_event(
            action=AuditAction.SERVICE_DELETED,
            context=context,
            object_type="recovery.service",
            object_id=name,
            details=details,
        )


def check_service(*, context: AuditContext, service: Service) -> HealthCheck:
    """A check asked for by hand (API, console): the probe, then an audit event with what it
    found."""
    check = monitor.check_now(service, forced=True)
    record_event(
        action=AuditAction.SERVICE_CHECKED,
        context=context,
        object_type="recovery.service",
        object_id=service.name,
        details={
            "ok": check.ok,
            "status": service.status,
            "latency_ms": check.latency_ms,
            "detail": check.detail,
        },
    )
    return check
