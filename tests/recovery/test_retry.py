"""The retry executor: jitter bounds, one deadline, Retry-After, the retry budget against a storm,
the breaker, statistics per service and window, and the two API endpoints."""

from __future__ import annotations

import json
import os
import random
import uuid
from datetime import timedelta

import pytest

from compliance.choices import AuditAction
from compliance.models import AuditEvent
from recovery import breaker, retry
from recovery.models import RetryStat
from tests.conftest import client_for, need

REDIS_URL = os.environ.get("REDIS_URL", "")


@pytest.fixture(params=["database", "redis"])
def backend(request, settings):
    if request.param == "redis":
        need(bool(REDIS_URL), "needs Redis (set REDIS_URL)")
        settings.REDIS_URL = REDIS_URL
    else:
        settings.REDIS_URL = ""
    breaker._clear_registry()
    yield request.param
    breaker._clear_registry()


@pytest.fixture
def service() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


class Flaky:
    """Fails `failures` times with `error`, then returns "ok"."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.left, self.calls = failures, 0
        self.error = error or ConnectionError("refused")

    def __call__(self) -> str:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.error
        return "ok"


class Sleeps(list):
    """An injected sleep that records instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _policy(**overrides) -> retry.RetryPolicy:
    values = {
        "max_retries": 5,
        "base_delay": 0.1,
        "cap": 1.0,
        "deadline": 100.0,
        "use_breaker": False,
        "use_budget": False,
    }
    return retry.RetryPolicy(**(values | overrides))


def test_the_default_policy_comes_from_the_settings(settings):
    settings.MAX_RETRIES, settings.BASE_RETRY_DELAY = 5, 1000
    policy = retry.default_policy(jitter="decorrelated")
    assert (policy.max_retries, policy.base_delay, policy.jitter) == (5, 1.0, "decorrelated")
    assert policy.cap == settings.RETRY_MAX_DELAY / 1000
    with pytest.raises(ValueError):
        retry.default_policy(jitter="none")


@pytest.mark.django_db
def test_full_jitter_delays_stay_within_zero_and_the_exponential_cap():
    rng = random.Random(7)
    for _ in range(200):
        timeline, sleeps = [], Sleeps()
        with pytest.raises(retry.RetryExhausted):
            retry.call(
                Flaky(99),
                service="jitter-full",
                policy=_policy(max_retries=8),
                on_attempt=timeline.append,
                sleep=sleeps,
                rand=rng.random,
            )
        assert len(sleeps) == 8
        for n, (attempt, delay) in enumerate(zip(timeline, sleeps, strict=False)):
            bound = min(1.0, 0.1 * 2**n)
            assert attempt.cap == pytest.approx(bound)
            assert 0 <= delay <= bound
            assert attempt.delay == delay
    # the extremes of rand reach the extremes of the range
    assert retry.full_jitter(3, 0.1, 1.0, lambda: 0.0) == (0.0, 0.8)
    assert retry.full_jitter(10, 0.1, 1.0, lambda: 0.999999)[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.django_db
def test_decorrelated_jitter_delays_stay_within_base_and_three_times_the_previous():
    rng = random.Random(11)
    for _ in range(200):
        sleeps = Sleeps()
        with pytest.raises(retry.RetryExhausted):
            retry.call(
                Flaky(99),
                service="jitter-decorrelated",
                policy=_policy(max_retries=8, jitter="decorrelated"),
                sleep=sleeps,
                rand=rng.random,
            )
        previous = 0.1
        for delay in sleeps:
            assert 0.1 <= delay <= min(1.0, 3 * previous) + 1e-12
            previous = delay


@pytest.mark.django_db
def test_the_deadline_is_never_passed_and_ends_the_call():
    rng = random.Random(3)
    for _ in range(100):
        sleeps = Sleeps()
        with pytest.raises(retry.RetryExhausted) as stopped:
            retry.call(
                Flaky(99),
                service="deadline",
                policy=_policy(max_retries=50, base_delay=0.5, cap=5.0, deadline=3.0),
                sleep=sleeps,
                rand=rng.random,
            )
        assert sum(sleeps) <= 3.0
        assert len(sleeps) < 50
        last = stopped.value.attempts[-1]
        assert last.delay is None
        assert "deadline" in str(stopped.value) or len(sleeps) == 50
        assert isinstance(stopped.value.last_error, ConnectionError)


@pytest.mark.django_db
def test_retry_after_sets_the_delay_and_is_still_bounded_by_the_deadline():
    sleeps = Sleeps()
    fn = Flaky(1, retry.RetryAfter(2.5))
    assert retry.call(fn, service="ra", policy=_policy(), sleep=sleeps) == "ok"
    assert sleeps == [2.5]
    # a Retry-After past the deadline is not waited for
    sleeps = Sleeps()
    with pytest.raises(retry.RetryExhausted) as stopped:
        retry.call(
            Flaky(1, retry.RetryAfter(30)), service="ra", policy=_policy(deadline=10), sleep=sleeps
        )
    assert sleeps == []
    assert isinstance(stopped.value.last_error, retry.RetryAfter)


@pytest.mark.django_db
def test_errors_outside_retry_on_are_raised_at_once():
    fn = Flaky(3, ValueError("bad input"))
    with pytest.raises(ValueError):
        retry.call(fn, service="x", policy=_policy(retry_on=(ConnectionError,)), sleep=Sleeps())
    assert fn.calls == 1


@pytest.mark.django_db(transaction=True)
def test_the_budget_stops_a_retry_storm(backend, service, settings):
    settings.RETRY_BUDGET_RATIO = 0.1
    settings.RETRY_BUDGET_MIN = 3
    settings.RETRY_BUDGET_WINDOW = timedelta(minutes=1)
    outcomes = {"exhausted": 0, "budget": 0}
    # given 60 calls to a dead service, each allowed 3 retries (180 retries unchecked)
    for _ in range(60):
        try:
            retry.call(
                Flaky(99),
                service=service,
                policy=_policy(max_retries=3, use_budget=True),
                sleep=Sleeps(),
            )
        except retry.BudgetExhausted:
            outcomes["budget"] += 1
        except retry.RetryExhausted:
            outcomes["exhausted"] += 1
    # then retries stay within ratio x calls + minimum
    [stats] = retry.stats(service=service)
    assert stats["calls"] == 60
    assert stats["retries"] <= 0.1 * 60 + 3
    assert stats["retries"] >= 3
    assert stats["attempts"] == 60 + stats["retries"]
    assert stats["rejected_budget"] == outcomes["budget"] >= 50


@pytest.mark.django_db(transaction=True)
def test_an_open_breaker_is_not_retried_and_is_counted(backend, service):
    breaker.trip(service, reason="down")
    fn = Flaky(0)
    with pytest.raises(breaker.BreakerOpen):
        retry.call(fn, service=service, policy=_policy(use_breaker=True), sleep=Sleeps())
    assert fn.calls == 0
    [stats] = retry.stats(service=service)
    assert (stats["calls"], stats["rejected_breaker"], stats["attempts"]) == (1, 1, 0)


@pytest.mark.django_db(transaction=True)
def test_statistics_count_each_outcome_per_service(backend, service, settings):
    # Statistics, not the breaker: 5 failures in 7 attempts would open it whenever a sync of
    # the shared view lands in between (timing: a loaded machine), refusing the last attempt.
    settings.BREAKER_MIN_CALLS = 100
    sleeps = Sleeps()
    policy = _policy(max_retries=2, use_breaker=True, use_budget=True)
    retry.call(Flaky(0), service=service, policy=policy, sleep=sleeps)
    retry.call(Flaky(2), service=service, policy=policy, sleep=sleeps)
    with pytest.raises(retry.RetryExhausted):
        retry.call(Flaky(5), service=service, policy=policy, sleep=sleeps)
    [stats] = retry.stats(service=service)
    assert stats["calls"] == 3
    assert stats["attempts"] == 1 + 3 + 3
    assert stats["retries"] == 4
    assert stats["succeeded_first"] == 1
    assert stats["succeeded_after_retry"] == 1
    assert stats["exhausted"] == 1
    assert stats["delay_ms_total"] == pytest.approx(sum(sleeps) * 1000, abs=0.01)
    assert stats["delay_ms_max"] == pytest.approx(max(sleeps) * 1000, abs=0.01)
    assert RetryStat.objects.filter(service=service).count() >= 1
    assert retry.reset_stats() >= 1
    assert retry.stats(service=service) == []


# --- The API ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_retry_stats_answers_totals_per_service_and_the_window(operator, settings):
    settings.REDIS_URL = ""
    retry.call(Flaky(1), service="api-a", policy=_policy(), sleep=Sleeps())
    api = client_for(operator)
    response = api.get("/api/recovery/retry-stats", {"window": "24h"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["window"], body["window_seconds"]) == ("24h", 86400)
    [row] = [s for s in body["services"] if s["service"] == "api-a"]
    assert (row["calls"], row["retries"], row["succeeded_after_retry"]) == (1, 1, 1)
    only = api.get("/api/recovery/retry-stats", {"service": "nothing"}).json()
    assert only["services"] == []


@pytest.mark.django_db
def test_retry_stats_refuses_a_bad_window_naming_the_field(operator, outsider):
    api = client_for(operator)
    for window in ("soon", "0s", "90d", ""):
        response = api.get("/api/recovery/retry-stats", {"window": window})
        assert response.status_code == 400
        assert "window" in json.dumps(response.json())
    assert api.get("/api/recovery/retry-stats", {"service": ""}).status_code == 400
    assert client_for(outsider).get("/api/recovery/retry-stats").status_code == 403


@pytest.mark.django_db
def test_test_retry_shows_the_timeline_of_a_real_run_and_is_audited(operator, settings):
    settings.REDIS_URL = ""
    api = client_for(operator)
    response = api.post(
        "/api/recovery/test-retry",
        {"failures": 2, "max_retries": 3, "base_delay_ms": 10, "max_delay_ms": 50},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["outcome"] == "succeeded"
    attempts = body["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["error"] is None for a in attempts] == [False, False, True]
    assert attempts[0]["cap_ms"] == 10 and attempts[1]["cap_ms"] == 20
    for a in attempts[:2]:
        assert 0 <= a["delay_ms"] <= a["cap_ms"]
    assert body["elapsed_ms"] >= sum(a["delay_ms"] for a in attempts[:2])
    assert AuditEvent.objects.filter(action=AuditAction.RETRY_TESTED).count() == 1
    # more failures than retries: exhausted, with every attempt shown
    body = api.post(
        "/api/recovery/test-retry",
        {"failures": 5, "max_retries": 1, "base_delay_ms": 1},
        format="json",
    ).json()
    assert body["outcome"] == "exhausted"
    assert len(body["attempts"]) == 2


@pytest.mark.django_db
def test_test_retry_bounds_its_inputs_and_needs_the_check_permission(
    operator, security_officer, anon_api
):
    api = client_for(operator)
    for bad, field in (
        ({}, "failures"),
        ({"failures": 11}, "failures"),
        ({"failures": "2"}, "failures"),
        ({"failures": 1, "max_retries": 11}, "max_retries"),
        ({"failures": 1, "deadline_ms": 60000}, "deadline_ms"),
        ({"failures": 1, "jitter": "none"}, "jitter"),
        ({"failures": 1, "service": "no-such-service"}, "service"),
    ):
        response = api.post("/api/recovery/test-retry", bad, format="json")
        assert response.status_code == 400, bad
        assert field in json.dumps(response.json()), bad
    body = {"failures": 0}
    assert (
        client_for(security_officer)
        .post("/api/recovery/test-retry", body, format="json")
        .status_code
        == 403
    )
    assert anon_api.post("/api/recovery/test-retry", body, format="json").status_code == 401
