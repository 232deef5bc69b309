"""Kill tests against real servers: a Redis and an HTTP server the test starts are killed; the
monitor finds them down with their breaker open within 10 s, and they are up again with the
breaker closed within 30 s of the failure, healed by their allow-listed restart command (or
restarted by the test, where no strategy is configured), with no operator action.

The monitor is driven as beat drives it (`run_due_checks` in a loop); Celery is eager, so the
heal job runs in the monitor's thread once the transition to down commits.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from recovery.choices import HealOutcome, HealthStatus
from tests.conftest import need
from tests.recovery import kill_drill

pytestmark = [
    pytest.mark.services,
    pytest.mark.servers,
    pytest.mark.django_db(transaction=True),
]

DETECT_WITHIN = 10.0
RECOVER_WITHIN = 30.0


@pytest.fixture(autouse=True)
def _drill_settings(settings) -> None:
    settings.ENABLE_SELF_HEALING = True
    settings.HEALTH_FAILURES_TO_DOWN = 2
    settings.HEALTH_PASSES_TO_UP = 2
    settings.RECOVERY_RESTART_COMMANDS = {}


@pytest.fixture
def redis_target(tmp_path: Path) -> Iterator[kill_drill.RedisTarget]:
    need(shutil.which("redis-server") is not None, "needs redis-server on the PATH")
    target = kill_drill.RedisTarget(tmp_path)
    target.start()
    yield target
    target.kill()


@pytest.fixture
def http_target(tmp_path: Path) -> Iterator[kill_drill.HttpTarget]:
    target = kill_drill.HttpTarget(tmp_path)
    target.start()
    yield target
    target.kill()


def _report(capsys, label: str, result: kill_drill.DrillResult) -> None:
    with capsys.disabled():
        print(
            f"\nkill test {label}: down after {result.detected_s:.2f} s "
            f"(breaker {result.breaker_at_detection}), up with the breaker closed after "
            f"{result.recovered_s:.2f} s (transition to up at {result.up_transition_s:.2f} s)"
        )


def _assert_recovered(result: kill_drill.DrillResult) -> None:
    assert result.detected_s is not None, result.transitions
    assert result.detected_s <= DETECT_WITHIN
    assert result.breaker_at_detection == "open"
    assert result.recovered_s is not None, result.transitions
    assert result.recovered_s <= RECOVER_WITHIN
    assert [to for _, to, _ in result.transitions][:2] == [HealthStatus.DOWN, HealthStatus.UP]


@pytest.mark.parametrize("target_kind", ["redis", "http"])
def test_a_killed_server_is_found_down_and_healed_by_its_restart_command(
    target_kind, request, capsys
):
    # given a server the test started, monitored with the restart command as its heal
    target = request.getfixturevalue(f"{target_kind}_target")
    service = kill_drill.register(target, heal=True)
    kill_drill.warm_up(service)

    # when it is killed, and nobody but the monitor acts
    result = kill_drill.run(target, service)

    # then it was down with its breaker open within 10 s, and healed within 30 s
    _report(capsys, f"{target_kind}, healed", result)
    _assert_recovered(result)
    # and the heal history says what happened
    [heal] = result.heals
    assert heal.trigger == "down" and heal.outcome == HealOutcome.HEALED
    assert [(s["strategy"], s["action"], s["ok"]) for s in heal.steps] == [
        ("restart_command", "run", True),
        ("restart_command", "check", True),
    ]
    assert heal.job.status == "succeeded"
    assert result.transitions[0][2].startswith("2 failed check(s) in a row")


@pytest.mark.parametrize("target_kind", ["redis", "http"])
def test_a_killed_server_restarted_by_hand_is_found_up_with_its_breaker_closed(
    target_kind, request, capsys
):
    # given a server with no heal strategy
    target = request.getfixturevalue(f"{target_kind}_target")
    service = kill_drill.register(target, heal=False)
    kill_drill.warm_up(service)

    # when it is killed, and restarted a second after the monitor saw it down
    result = kill_drill.run(target, service, restart_by_hand_after=1.0)

    # then the monitor alone brings its status and breaker back
    _report(capsys, f"{target_kind}, restarted by the test", result)
    _assert_recovered(result)
    assert result.heals == []
