"""The recovery area's rows: monitored services, their health history, circuit breakers,
retry statistics, heal operations and alerts. Shared state lives here (or in Redis), never in
a process's memory: many gunicorn and Celery processes on many hosts act as one."""

from __future__ import annotations

from django.db import models

from recovery.choices import (
    AlertChannel,
    BreakerStatus,
    HealOutcome,
    HealStrategy,
    HealthStatus,
    ServiceKind,
)


class Service(models.Model):
    """Something the stack depends on, probed every `check_interval` seconds."""

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=ServiceKind.choices)
    # host:port or a URL, without credentials (those are in `credential`).
    target = models.CharField(max_length=500)
    credential = models.ForeignKey(
        "security.StoredSecret",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The password or token the probe uses, encrypted at rest.",
    )
    check_interval = models.PositiveIntegerField(default=5, help_text="Seconds between checks.")
    timeout_ms = models.PositiveIntegerField(default=5000, help_text="Hard timeout of a probe.")
    critical = models.BooleanField(default=True)
    depends_on = models.ManyToManyField(
        "self", symmetrical=False, blank=True, related_name="dependents"
    )
    # HealStrategy values, in order of escalation; empty: no self-healing.
    heal_strategies = models.JSONField(default=list, blank=True)
    # A key of RECOVERY_RESTART_COMMANDS (the allow-list in settings), never a command line.
    restart_command = models.CharField(max_length=64, blank=True)
    standby_target = models.CharField(max_length=500, blank=True)
    expect_status = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="HTTP: the status a healthy answer has (default 2xx)."
    )
    expect_body = models.CharField(
        max_length=200, blank=True, help_text="HTTP: text a healthy answer's body contains."
    )
    enabled = models.BooleanField(default=True)
    maintenance = models.BooleanField(default=False)
    builtin = models.BooleanField(default=False, help_text="Registered by Bridge itself.")

    # The latest state, written by the monitor (recovery/monitor.py).
    status = models.CharField(
        max_length=16, choices=HealthStatus.choices, default=HealthStatus.UNKNOWN, db_index=True
    )
    status_reason = models.CharField(max_length=500, blank=True)
    status_since = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    consecutive_successes = models.PositiveIntegerField(default=0)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_latency_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [
            ("check_service", "Can check a service now"),
            ("heal_service", "Can heal a service and reset its breaker"),
            ("reset_recovery", "Can clear breakers, statistics and stuck heals"),
        ]

    def __str__(self) -> str:
        return self.name


class HealthCheck(models.Model):
    """One probe's result: the history behind sparklines and flapping decisions."""

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="checks")
    checked_at = models.DateTimeField(db_index=True)
    ok = models.BooleanField()
    latency_ms = models.FloatField(null=True, blank=True)
    detail = models.CharField(max_length=500, blank=True)
    forced = models.BooleanField(default=False, help_text="Asked for by hand (API, console).")

    class Meta:
        ordering = ["-checked_at"]
        indexes = [models.Index(fields=["service", "-checked_at"])]

    def __str__(self) -> str:
        return f"{self.service_id} {'ok' if self.ok else 'failed'} at {self.checked_at}"


class HealthTransition(models.Model):
    """A change of a service's status, with its reason; alerts go out on these only."""

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="transitions")
    at = models.DateTimeField(db_index=True)
    from_status = models.CharField(max_length=16, choices=HealthStatus.choices)
    to_status = models.CharField(max_length=16, choices=HealthStatus.choices)
    reason = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.service_id}: {self.from_status} -> {self.to_status}"


class BreakerState(models.Model):
    """A circuit breaker's state where every process sees it (the authority for manual states;
    with Redis the hot path reads Redis and this row mirrors it for the console)."""

    name = models.CharField(max_length=100, unique=True)
    state = models.CharField(
        max_length=16, choices=BreakerStatus.choices, default=BreakerStatus.CLOSED
    )
    opened_at = models.DateTimeField(null=True, blank=True)
    open_until = models.DateTimeField(null=True, blank=True)
    trips = models.PositiveIntegerField(default=0, help_text="Consecutive trips (open time grows).")
    last_reason = models.CharField(max_length=300, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name}: {self.state}"


class BreakerCall(models.Model):
    """The sliding window of a breaker's calls, where there is no Redis."""

    name = models.CharField(max_length=100)
    at = models.FloatField()  # epoch seconds
    ok = models.BooleanField()
    slow = models.BooleanField(default=False)
    # Outcomes are published in batches (recovery/breaker.py): one row stands for `count` calls.
    count = models.PositiveIntegerField(default=1)

    class Meta:
        indexes = [models.Index(fields=["name", "at"])]

    def __str__(self) -> str:
        return f"{self.name} {'ok' if self.ok else 'failed'}"


class RetryStat(models.Model):
    """Retry figures per service and minute, added to with F() updates from every process."""

    service = models.CharField(max_length=100)
    minute = models.DateTimeField()
    calls = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    retries = models.PositiveIntegerField(default=0)
    succeeded_first = models.PositiveIntegerField(default=0)
    succeeded_after_retry = models.PositiveIntegerField(default=0)
    exhausted = models.PositiveIntegerField(default=0)
    rejected_budget = models.PositiveIntegerField(default=0)
    rejected_breaker = models.PositiveIntegerField(default=0)
    delay_ms_total = models.FloatField(default=0.0)
    delay_ms_max = models.FloatField(default=0.0)

    class Meta:
        ordering = ["-minute", "service"]
        constraints = [
            models.UniqueConstraint(fields=["service", "minute"], name="retry_stat_minute")
        ]

    def __str__(self) -> str:
        return f"{self.service} {self.minute}"


class HealOperation(models.Model):
    """One self-healing run (automatic or by hand): a job row, its steps and outcome."""

    job = models.OneToOneField(
        "bridge.Job", on_delete=models.CASCADE, related_name="heal", null=True, blank=True
    )
    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="heals")
    trigger = models.CharField(max_length=32)  # "down", "breaker_open", "manual"
    strategy = models.CharField(max_length=32, choices=HealStrategy.choices, blank=True)
    dry_run = models.BooleanField(default=False)
    outcome = models.CharField(
        max_length=16, choices=HealOutcome.choices, default=HealOutcome.PENDING, db_index=True
    )
    steps = models.JSONField(default=list, blank=True)  # [{strategy, action, ok, detail, at}]
    started_at = models.DateTimeField(db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    actor_username = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"heal {self.service_id} ({self.outcome})"


class Alert(models.Model):
    """A notice sent on a change (a transition, healing giving up) and how its delivery went."""

    service = models.ForeignKey(
        Service, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts"
    )
    created_at = models.DateTimeField(db_index=True)
    channel = models.CharField(max_length=16, choices=AlertChannel.choices)
    subject = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    delivered = models.BooleanField(default=False)
    delivery_result = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.subject
