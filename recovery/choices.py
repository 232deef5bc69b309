"""Statuses and kinds of the recovery area."""

from django.db import models

# The job kind of a heal operation (recovery/healing.py).
HEAL_JOB_KIND = "recovery.heal"


class ServiceKind(models.TextChoices):
    POSTGRES = "postgres", "PostgreSQL"
    REDIS = "redis", "Redis"
    RABBITMQ = "rabbitmq", "RabbitMQ (AMQP)"
    CELERY = "celery", "Celery workers"
    HTTP = "http", "HTTP"
    TCP = "tcp", "TCP"


class HealthStatus(models.TextChoices):
    UP = "up", "Up"
    DEGRADED = "degraded", "Degraded"
    DOWN = "down", "Down"
    UNKNOWN = "unknown", "Unknown (no fresh result)"
    MAINTENANCE = "maintenance", "Maintenance"


class BreakerStatus(models.TextChoices):
    CLOSED = "closed", "Closed"
    OPEN = "open", "Open"
    HALF_OPEN = "half_open", "Half-open (trial calls)"
    FORCED_OPEN = "forced_open", "Forced open (by hand)"
    DISABLED = "disabled", "Disabled (always passes)"


class HealStrategy(models.TextChoices):
    """In order of escalation."""

    RECONNECT = "reconnect", "Reconnect / reset the connection pool"
    POOL_RESTART = "pool_restart", "Celery pool restart"
    WORKER_SHUTDOWN = "worker_shutdown", "Shut one Celery worker down (its supervisor restarts it)"
    RESTART_COMMAND = "restart_command", "Run the service's allow-listed restart command"
    SWITCH_STANDBY = "switch_standby", "Switch to the configured standby"


class HealOutcome(models.TextChoices):
    PENDING = "pending", "Pending"
    HEALED = "healed", "Healed"
    NOT_HEALED = "not_healed", "Not healed (gave up)"
    SKIPPED = "skipped", "Skipped (guardrail)"
    DRY_RUN = "dry_run", "Dry run"


class AlertChannel(models.TextChoices):
    MAIL = "mail", "Mail"
    WEBHOOK = "webhook", "Webhook"
