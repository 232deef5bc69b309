"""GET /api/recovery/retry-stats, POST /api/recovery/test-retry and
POST /api/recovery/circuit-breaker/{service}/reset: the retry executor and the circuit breakers
(recovery/retry.py, recovery/breaker.py) seen and exercised by an operator."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any, ClassVar

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from bridge.api import (
    BridgeViewSet,
    ErrorSerializer,
    StrictCharField,
    StrictIntegerField,
    audit_context,
)
from bridge.env import parse_duration
from compliance.audit import record_event
from compliance.choices import AuditAction
from recovery import breaker, retry
from recovery.choices import BreakerStatus
from recovery.models import Service

# The statistics' window: from a minute (their granularity) to the retention of a month.
MIN_WINDOW = timedelta(minutes=1)
MAX_WINDOW = timedelta(days=31)
# The test run's bounds, so one request sleeps at most TEST_MAX_DEADLINE_MS in all.
TEST_MAX_FAILURES = 10
TEST_MAX_RETRIES = 10
TEST_MAX_DELAY_MS = 2000
TEST_MAX_DEADLINE_MS = 10000


# --- Retry statistics -------------------------------------------------------------------------


class RetryStatsQuerySerializer(serializers.Serializer):
    service = serializers.CharField(
        required=False, max_length=100, help_text="One service's figures only."
    )
    window = serializers.CharField(
        required=False,
        default="1h",
        help_text="How far back: 15m, 1h, 24h, 7d (from a minute to 31 days; default 1h).",
    )

    def validate_window(self, value: str) -> timedelta:
        try:
            window = parse_duration(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise serializers.ValidationError("between 1m and 31d")
        return window


class RetryStatSerializer(serializers.Serializer):
    service = serializers.CharField()
    calls = serializers.IntegerField(help_text="Calls through the executor")
    attempts = serializers.IntegerField(help_text="Attempts, first ones included")
    retries = serializers.IntegerField(help_text="Attempts after the first")
    succeeded_first = serializers.IntegerField()
    succeeded_after_retry = serializers.IntegerField()
    exhausted = serializers.IntegerField(help_text="Gave up: attempts or deadline spent")
    rejected_budget = serializers.IntegerField(help_text="Not retried: retry budget spent")
    rejected_breaker = serializers.IntegerField(help_text="Refused by an open circuit breaker")
    delay_ms_total = serializers.FloatField()
    delay_ms_avg = serializers.FloatField(help_text="Mean delay before a retry")
    delay_ms_max = serializers.FloatField()


class RetryStatsSerializer(serializers.Serializer):
    window = serializers.CharField(help_text="The window asked for, e.g. 1h")
    window_seconds = serializers.IntegerField()
    since = serializers.DateTimeField()
    services = RetryStatSerializer(many=True)


# --- Test run ---------------------------------------------------------------------------------


class TestRetryRequestSerializer(serializers.Serializer):
    failures = StrictIntegerField(
        min_value=0,
        max_value=TEST_MAX_FAILURES,
        help_text="How many times the operation fails before it succeeds.",
    )
    service = StrictCharField(
        required=False,
        max_length=64,
        help_text="Label the run with a service's name (its statistics, budget and breaker are "
        "`test-retry:<name>`, so the test never opens the real service's breaker).",
    )
    max_retries = StrictIntegerField(
        required=False, min_value=0, max_value=TEST_MAX_RETRIES, help_text="Default MAX_RETRIES"
    )
    base_delay_ms = StrictIntegerField(
        required=False, min_value=1, max_value=1000, default=100, help_text="Default 100 ms."
    )
    max_delay_ms = StrictIntegerField(
        required=False,
        min_value=1,
        max_value=TEST_MAX_DELAY_MS,
        default=1000,
        help_text="The cap of one delay (default 1000 ms).",
    )
    deadline_ms = StrictIntegerField(
        required=False,
        min_value=0,
        max_value=TEST_MAX_DEADLINE_MS,
        default=5000,
        help_text="One deadline across all attempts (default 5000 ms).",
    )
    jitter = serializers.ChoiceField(
        choices=retry.JITTERS, required=False, help_text="Default RETRY_JITTER."
    )

    def validate_service(self, value: str) -> str:
        if not Service.objects.filter(name=value).exists():
            raise serializers.ValidationError(f"no service named {value!r}")
        return value


class RetryAttemptSerializer(serializers.Serializer):
    number = serializers.IntegerField(help_text="From 1")
    error = serializers.CharField(allow_null=True, help_text="null: the attempt succeeded")
    delay_ms = serializers.FloatField(
        allow_null=True, help_text="The delay drawn before the next attempt; null: none"
    )
    cap_ms = serializers.FloatField(help_text="The bound the delay was drawn under")
    elapsed_ms = serializers.FloatField(help_text="Since the call began")


class TestRetryResultSerializer(serializers.Serializer):
    service = serializers.CharField(help_text="The name the run was counted under")
    outcome = serializers.ChoiceField(
        choices=["succeeded", "exhausted", "budget_exhausted", "breaker_open"]
    )
    error = serializers.CharField(allow_null=True)
    failures = serializers.IntegerField()
    max_retries = serializers.IntegerField()
    base_delay_ms = serializers.IntegerField()
    max_delay_ms = serializers.IntegerField()
    deadline_ms = serializers.IntegerField()
    jitter = serializers.CharField()
    elapsed_ms = serializers.FloatField()
    attempts = RetryAttemptSerializer(many=True)


class _Flaky:
    """The test operation: a real call that fails `failures` times, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.left = failures

    def __call__(self) -> str:
        if self.left > 0:
            self.left -= 1
            raise ConnectionError("simulated failure")
        return "ok"


def run_test_retry(
    *,
    failures: int,
    context: Any,
    service: str | None = None,
    max_retries: int | None = None,
    base_delay_ms: int = 100,
    max_delay_ms: int = 1000,
    deadline_ms: int = 5000,
    jitter: str | None = None,
) -> dict:
    """Run the flaky operation through the executor for real (sleeps included); audited."""
    name = f"test-retry:{service}" if service else "test-retry"
    policy = retry.default_policy(
        max_retries=settings.MAX_RETRIES if max_retries is None else max_retries,
        base_delay=base_delay_ms / 1000,
        cap=max_delay_ms / 1000,
        deadline=deadline_ms / 1000,
        **({"jitter": jitter} if jitter else {}),
    )
    timeline: list[retry.Attempt] = []
    started = time.perf_counter()
    outcome, error = "succeeded", None
    try:
        retry.call(_Flaky(failures), service=name, policy=policy, on_attempt=timeline.append)
    except retry.BudgetExhausted as exc:
        outcome, error = "budget_exhausted", str(exc)
    except retry.RetryExhausted as exc:
        outcome, error = "exhausted", str(exc)
    except breaker.BreakerOpen as exc:
        outcome, error = "breaker_open", str(exc)
    result = {
        "service": name,
        "outcome": outcome,
        "error": error,
        "failures": failures,
        "max_retries": policy.max_retries,
        "base_delay_ms": base_delay_ms,
        "max_delay_ms": max_delay_ms,
        "deadline_ms": deadline_ms,
        "jitter": policy.jitter,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
        "attempts": [
            {
                "number": a.number,
                "error": a.error,
                "delay_ms": None if a.delay is None else round(a.delay * 1000, 3),
                "cap_ms": round(a.cap * 1000, 3),
                "elapsed_ms": round(a.elapsed * 1000, 3),
            }
            for a in timeline
        ],
    }
    record_event(
        action=AuditAction.RETRY_TESTED,
        context=context,
        object_type="recovery.retry",
        object_id=name,
        details={k: v for k, v in result.items() if k != "attempts"} | {"attempts": len(timeline)},
    )
    return result


# --- Breakers ---------------------------------------------------------------------------------


class CircuitBreakerSnapshotSerializer(serializers.Serializer):
    name = serializers.CharField()
    state = serializers.ChoiceField(choices=BreakerStatus.choices)
    failure_rate = serializers.FloatField(help_text="Over BREAKER_WINDOW, 0 to 1")
    slow_rate = serializers.FloatField(help_text="Over BREAKER_WINDOW, 0 to 1")
    calls = serializers.IntegerField(help_text="Calls in the window")
    open_until = serializers.DateTimeField(allow_null=True)
    trips = serializers.IntegerField(help_text="Consecutive trips (the open time doubles)")
    last_reason = serializers.CharField(allow_blank=True)


# A service's slug, or a breaker's name (the test run's are `test-retry:<service>`).
BREAKER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"
SERVICE_PARAMETER = OpenApiParameter(
    "service",
    str,
    OpenApiParameter.PATH,
    description="The service's (or breaker's) name.",
    pattern=BREAKER_NAME,
)


class ResilienceViewSet(BridgeViewSet):
    """Retry statistics, a test run of the retry executor, and closing a breaker by hand."""

    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "retry_stats": ("recovery.view_retrystat",),
        "test_retry": ("recovery.check_service",),
        "reset_breaker": ("recovery.heal_service",),
    }

    @extend_schema(
        tags=["recovery"],
        summary="Retry figures per service over a window (attempts, successes after retry, "
        "exhausted, rejected by budget or breaker, delays)",
        parameters=[RetryStatsQuerySerializer],
        responses={200: RetryStatsSerializer},
    )
    def retry_stats(self, request: Request) -> Response:
        # A plain dict: with a QueryDict DRF reads `?service=` as absent, not as blank.
        query = RetryStatsQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        window: timedelta = query.validated_data["window"]
        since = timezone.now() - window
        services = retry.stats(service=query.validated_data.get("service"), since=since)
        return Response(
            RetryStatsSerializer(
                {
                    "window": query.initial_data.get("window", "1h"),
                    "window_seconds": int(window.total_seconds()),
                    "since": since,
                    "services": services,
                }
            ).data
        )

    @extend_schema(
        tags=["recovery"],
        summary="Run an operation that fails k times then succeeds through the retry "
        "executor; the timeline shows each attempt, its error, the delay drawn and its cap",
        request=TestRetryRequestSerializer,
        responses={200: TestRetryResultSerializer},
    )
    def test_retry(self, request: Request) -> Response:
        body = TestRetryRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = run_test_retry(context=audit_context(request), **body.validated_data)
        return Response(TestRetryResultSerializer(result).data)

    @extend_schema(
        tags=["recovery"],
        summary="Close a service's circuit breaker by hand (its window and trips cleared)",
        parameters=[SERVICE_PARAMETER],
        request=None,
        responses={200: CircuitBreakerSnapshotSerializer, 404: ErrorSerializer},
    )
    def reset_breaker(self, request: Request, service: str) -> Response:
        known = re.match(BREAKER_NAME, service) and (
            Service.objects.filter(name=service).exists() or breaker.exists(service)
        )
        if not known:
            raise NotFound(f"No service or circuit breaker named {service!r}.")
        snapshot = breaker.reset(service, context=audit_context(request))
        return Response(CircuitBreakerSnapshotSerializer(snapshot).data)
