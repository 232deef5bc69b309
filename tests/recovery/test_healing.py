"""Self-healing: strategies in order, guardrails, dry runs, redaction, the API."""

from __future__ import annotations

import json
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.utils import timezone

from bridge import jobs
from bridge.choices import JobStatus
from bridge.models import Job
from compliance.audit import AuditContext
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from compliance.personal import revealed
from recovery import healing
from recovery.choices import HEAL_JOB_KIND, HealOutcome, HealStrategy, HealthStatus
from recovery.models import HealOperation, RetryStat, Service

HEAL = "/api/recovery/heal/{}"
RESET = "/api/recovery/reset"


class FakeChecks:
    """Stands in for the monitor's forced check: answers from a list, remembers the calls."""

    def __init__(self, *answers: bool, then: bool = True) -> None:
        self.answers = list(answers)
        self.then = then
        self.calls = 0

    def __call__(self, service: Service) -> SimpleNamespace:
        self.calls += 1
        ok = self.answers.pop(0) if self.answers else self.then
        status = HealthStatus.UP if ok else HealthStatus.DOWN
        Service.objects.filter(pk=service.pk).update(status=status)
        return SimpleNamespace(ok=ok, detail="fake probe")


@pytest.fixture
def alerts(monkeypatch) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(
        healing, "_alert", lambda service, subject, body: sent.append((subject, body))
    )
    return sent


@pytest.fixture
def fast(monkeypatch, settings):
    monkeypatch.setattr(healing, "SETTLE_SECONDS", 0.3)
    monkeypatch.setattr(healing, "SETTLE_PAUSE", 0.01)
    settings.HEALTH_PASSES_TO_UP = 1


def make_service(name: str = "cache", **fields) -> Service:
    defaults = {
        "kind": "redis",
        "target": "127.0.0.1:6399",
        "heal_strategies": [HealStrategy.RESTART_COMMAND],
        "restart_command": "restart-cache",
        "status": HealthStatus.DOWN,
        "status_since": timezone.now() - timedelta(seconds=5),
    }
    return Service.objects.create(name=name, **{**defaults, **fields})


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run_heal(django_capture_on_commit_callbacks, start) -> HealOperation:
    with django_capture_on_commit_callbacks(execute=True):
        operation = start()
    operation.refresh_from_db()
    return operation


# --- Strategies in order -------------------------------------------------------------------


@pytest.mark.django_db
def test_a_restart_command_that_brings_the_service_back_heals_it_and_stops_escalating(
    settings, monkeypatch, fast, alerts, django_capture_on_commit_callbacks, tmp_path
):
    # given a service that reconnecting does not help, then a restart does
    marker = tmp_path / "restarted"
    settings.RECOVERY_RESTART_COMMANDS = {
        "restart-cache": python_command(f"open({str(marker)!r}, 'w').write('x')")
    }
    service = make_service(
        heal_strategies=[
            HealStrategy.RECONNECT,
            HealStrategy.RESTART_COMMAND,
            HealStrategy.SWITCH_STANDBY,
        ],
        standby_target="127.0.0.1:6400",
    )
    checks = FakeChecks(then=False)
    monkeypatch.setattr(healing, "_fresh_check", checks)

    def check_after_restart(service: Service) -> SimpleNamespace:
        checks.answers = [True] if marker.exists() else [False]
        return checks(service)

    monkeypatch.setattr(healing, "_fresh_check", check_after_restart)

    # when it goes down
    operation = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.maybe_heal(service=service, trigger="down"),
    )

    # then reconnect, its check, the restart and its check ran, and the standby was not used
    assert operation.outcome == HealOutcome.HEALED
    assert [(s["strategy"], s["action"], s["ok"]) for s in operation.steps] == [
        ("reconnect", "disconnect", True),
        ("reconnect", "check", False),
        ("restart_command", "run", True),
        ("restart_command", "check", True),
    ]
    service.refresh_from_db()
    assert service.target == "127.0.0.1:6399"
    job = Job.objects.get(pk=operation.job_id)
    assert job.status == JobStatus.SUCCEEDED and job.kind == HEAL_JOB_KIND
    assert job.progress_done == job.progress_total == 3
    actions = list(AuditEvent.objects.filter(object_id=str(operation.pk)).values_list("action"))
    assert [a for (a,) in actions].count(AuditAction.HEAL_STEP) == 2
    assert alerts == []


@pytest.mark.django_db
def test_when_every_strategy_fails_healing_gives_up_with_an_alert(
    settings, monkeypatch, fast, alerts, django_capture_on_commit_callbacks
):
    settings.RECOVERY_RESTART_COMMANDS = {"restart-cache": python_command("raise SystemExit(3)")}
    service = make_service(heal_strategies=[HealStrategy.RECONNECT, HealStrategy.RESTART_COMMAND])
    monkeypatch.setattr(healing, "_fresh_check", FakeChecks(then=False))

    operation = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.maybe_heal(service=service, trigger="down"),
    )

    assert operation.outcome == HealOutcome.NOT_HEALED
    assert operation.steps[2]["detail"].startswith("exit 3")
    assert len(alerts) == 1 and "gave up" in alerts[0][0]
    assert "reconnect, restart_command" in alerts[0][1]


@pytest.mark.django_db
def test_a_restart_command_not_in_the_allow_list_is_refused_and_nothing_runs(
    settings, monkeypatch, fast, alerts, django_capture_on_commit_callbacks
):
    settings.RECOVERY_RESTART_COMMANDS = {"other": python_command("pass")}
    service = make_service(restart_command="rm-rf")
    monkeypatch.setattr(healing, "run_command", lambda *a, **k: pytest.fail("ran a command"))
    monkeypatch.setattr(healing, "_fresh_check", FakeChecks(then=False))

    operation = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.maybe_heal(service=service, trigger="down"),
    )

    assert operation.steps[0]["action"] == "refused"
    assert "rm-rf is not in RECOVERY_RESTART_COMMANDS" in operation.steps[0]["detail"]
    assert operation.outcome == HealOutcome.NOT_HEALED


@pytest.mark.django_db
def test_a_commands_output_holding_a_password_is_redacted_on_the_step_and_in_the_trail(
    settings, monkeypatch, fast, alerts, django_capture_on_commit_callbacks
):
    settings.RECOVERY_RESTART_COMMANDS = {
        "restart-cache": python_command(
            "print('connecting to redis://admin:s3cr3t-pw@db:6379 with password=hunter22')"
        )
    }
    service = make_service()
    monkeypatch.setattr(healing, "_fresh_check", FakeChecks(True))

    operation = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.maybe_heal(service=service, trigger="down"),
    )

    detail = operation.steps[0]["detail"]
    assert "[REDACTED]" in detail and "hunter22" not in detail and "s3cr3t-pw" not in detail
    trail = " ".join(
        str(details) for details in AuditEvent.objects.values_list("details", flat=True)
    )
    assert "hunter22" not in trail and "s3cr3t-pw" not in trail


@pytest.mark.django_db
def test_a_command_that_hangs_is_killed_at_its_timeout():
    code, output = healing.run_command(
        python_command("import time; print('started', flush=True); time.sleep(30)"), timeout=0.5
    )
    assert code is None and "started" in output


@pytest.mark.django_db
def test_a_dry_run_records_what_would_run_and_runs_nothing(
    settings, monkeypatch, operator, django_capture_on_commit_callbacks, tmp_path
):
    marker = tmp_path / "ran"
    settings.RECOVERY_RESTART_COMMANDS = {
        "restart-cache": python_command(f"open({str(marker)!r}, 'w')")
    }
    service = make_service(
        heal_strategies=[HealStrategy.RESTART_COMMAND, HealStrategy.SWITCH_STANDBY],
        standby_target="10.0.0.2:6379",
    )
    monkeypatch.setattr(healing, "_fresh_check", lambda s: pytest.fail("checked"))

    operation = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.start_heal(
            service=service, context=AuditContext().with_actor(operator), dry_run=True
        ),
    )

    assert operation.outcome == HealOutcome.DRY_RUN
    assert [s["action"] for s in operation.steps] == ["would run", "would run"]
    assert "restart-cache" in operation.steps[0]["detail"]
    assert "10.0.0.2:6379" in operation.steps[1]["detail"]
    assert not marker.exists()
    service.refresh_from_db()
    assert service.target == "127.0.0.1:6399"


@pytest.mark.django_db
def test_switching_to_the_standby_swaps_targets_so_switching_again_goes_back(
    monkeypatch, fast, alerts, operator, django_capture_on_commit_callbacks
):
    service = make_service(
        heal_strategies=[HealStrategy.SWITCH_STANDBY], standby_target="10.0.0.2:6379"
    )
    monkeypatch.setattr(healing, "_fresh_check", FakeChecks(True, True))
    context = AuditContext().with_actor(operator)

    first = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.start_heal(service=service, context=context),
    )
    service.refresh_from_db()
    assert (service.target, service.standby_target) == ("10.0.0.2:6379", "127.0.0.1:6399")
    assert first.steps[0]["previous"] == "127.0.0.1:6399"
    run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.start_heal(service=service, context=context),
    )
    service.refresh_from_db()
    assert (service.target, service.standby_target) == ("127.0.0.1:6399", "10.0.0.2:6379")


@pytest.mark.django_db
def test_celery_strategies_say_why_they_cannot_act(
    monkeypatch, fast, alerts, operator, django_capture_on_commit_callbacks
):
    from bridge.celery import app

    monkeypatch.setitem(app.conf, "worker_pool_restarts", False)
    stopped: list[list[str]] = []
    monkeypatch.setattr(app.control, "ping", lambda timeout: [{"w2@h": {}}, {"w1@h": {}}])
    monkeypatch.setattr(app.control, "shutdown", lambda destination: stopped.append(destination))
    monkeypatch.setattr(healing, "_fresh_check", FakeChecks(then=False))
    service = make_service(
        "workers",
        kind="celery",
        heal_strategies=[HealStrategy.POOL_RESTART, HealStrategy.WORKER_SHUTDOWN],
    )

    operation = run_heal(
        django_capture_on_commit_callbacks,
        lambda: healing.start_heal(service=service, context=AuditContext().with_actor(operator)),
    )

    assert "worker_pool_restarts is off" in operation.steps[0]["detail"]
    assert operation.steps[2]["detail"] == "asked w1@h to stop"
    assert stopped == [["w1@h"]]  # one worker only


# --- Guardrails ----------------------------------------------------------------------------


@pytest.fixture
def not_enqueued(monkeypatch) -> None:
    """Heals stay pending (no worker runs them), so the lock is what the test sees."""
    monkeypatch.setattr(jobs, "_enqueue", lambda job, spec: None)


@pytest.mark.django_db(transaction=True)
def test_parallel_maybe_heal_from_many_threads_starts_exactly_one_job(not_enqueued):
    from django.db import connection

    service = make_service()
    barrier = threading.Barrier(8)
    results: list[object] = []

    def heal() -> None:
        try:
            barrier.wait()
            results.append(healing.maybe_heal(service=service, trigger="down"))
        finally:
            connection.close()

    threads = [threading.Thread(target=heal) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 8
    assert Job.objects.filter(kind=HEAL_JOB_KIND).count() == 1
    assert HealOperation.objects.filter(outcome=HealOutcome.PENDING).count() == 1
    assert sum(isinstance(r, HealOperation) for r in results) == 1


@pytest.mark.django_db
def test_the_attempts_cap_stops_automatic_heals_once_per_episode_and_alerts(
    settings, not_enqueued, alerts
):
    # given HEAL_MAX_ATTEMPTS heals of the service within the window, long finished
    settings.HEAL_MAX_ATTEMPTS = 2
    service = make_service()
    earlier = timezone.now() - timedelta(minutes=30)
    for _ in range(2):
        HealOperation.objects.create(
            service=service,
            trigger="down",
            outcome=HealOutcome.NOT_HEALED,
            started_at=earlier,
            finished_at=earlier,
        )

    # when the monitor asks again, twice
    with pytest.MonkeyPatch.context():
        first = healing.maybe_heal(service=service, trigger="down")
        second = healing.maybe_heal(service=service, trigger="down")

    # then one skipped row names the cap, and no job was started
    assert first.outcome == HealOutcome.SKIPPED and first.job is None
    assert first.steps[0]["guardrail"] == "attempts_cap"
    assert "HEAL_MAX_ATTEMPTS=2" in first.steps[0]["detail"]
    assert second is None
    assert not Job.objects.filter(kind=HEAL_JOB_KIND).exists()


@pytest.mark.django_db(transaction=True)
def test_giving_up_at_the_attempts_cap_sends_an_alert(settings, not_enqueued, alerts):
    settings.HEAL_MAX_ATTEMPTS = 1
    service = make_service()
    earlier = timezone.now() - timedelta(minutes=30)
    HealOperation.objects.create(
        service=service, trigger="down", outcome="not_healed", started_at=earlier
    )
    healing.maybe_heal(service=service, trigger="down")
    assert len(alerts) == 1 and "gave up" in alerts[0][0]


@pytest.mark.django_db
def test_a_new_attempt_waits_out_the_back_off_after_the_previous_one(not_enqueued):
    service = make_service()
    HealOperation.objects.create(
        service=service,
        trigger="down",
        outcome=HealOutcome.NOT_HEALED,
        started_at=timezone.now() - timedelta(seconds=3),
        finished_at=timezone.now() - timedelta(seconds=1),
    )
    skipped = healing.maybe_heal(service=service, trigger="down")
    assert skipped.steps[0]["guardrail"] == "backoff"


@pytest.mark.django_db
def test_the_global_cap_refuses_a_heal_while_enough_others_run(settings, not_enqueued, operator):
    settings.HEAL_MAX_CONCURRENT = 1
    busy = healing.maybe_heal(service=make_service("db"), trigger="down")
    assert busy.outcome == HealOutcome.PENDING
    other = make_service("cache")

    skipped = healing.maybe_heal(service=other, trigger="down")
    assert skipped.steps[0]["guardrail"] == "concurrency_cap"
    with pytest.raises(healing.HealRefused) as refused:
        healing.start_heal(service=other, context=AuditContext().with_actor(operator))
    assert refused.value.code == "concurrency_cap"


@pytest.mark.django_db
def test_nothing_happens_with_self_healing_off_or_without_strategies(settings, not_enqueued):
    settings.ENABLE_SELF_HEALING = False
    assert healing.maybe_heal(service=make_service("a"), trigger="down") is None
    settings.ENABLE_SELF_HEALING = True
    assert healing.maybe_heal(service=make_service("b", heal_strategies=[]), trigger="down") is None
    assert not HealOperation.objects.exists()


@pytest.mark.django_db
def test_a_heal_whose_job_was_reaped_no_longer_blocks_the_service(not_enqueued):
    service = make_service()
    stuck = healing.maybe_heal(service=service, trigger="down")
    Job.objects.filter(pk=stuck.job_id).update(status=JobStatus.FAILED, error="worker lost")
    HealOperation.objects.filter(pk=stuck.pk).update(started_at=timezone.now() - timedelta(hours=2))

    again = healing.maybe_heal(service=service, trigger="down")

    stuck.refresh_from_db()
    assert stuck.outcome == HealOutcome.NOT_HEALED
    assert "worker lost" in stuck.steps[-1]["detail"]
    assert again.outcome == HealOutcome.PENDING


@pytest.mark.django_db
def test_reset_stuck_closes_silent_heals_and_leaves_working_ones(not_enqueued, admin_user):
    silent = healing.maybe_heal(service=make_service("a"), trigger="down")
    working = healing.maybe_heal(service=make_service("b"), trigger="down")
    long_ago = timezone.now() - timedelta(hours=1)
    Job.objects.filter(pk=silent.job_id).update(status=JobStatus.RUNNING, heartbeat_at=long_ago)
    Job.objects.filter(pk=working.job_id).update(
        status=JobStatus.RUNNING, heartbeat_at=timezone.now()
    )

    assert healing.reset_stuck(context=AuditContext().with_actor(admin_user)) == 1

    silent.refresh_from_db()
    working.refresh_from_db()
    assert silent.outcome == HealOutcome.NOT_HEALED
    assert working.outcome == HealOutcome.PENDING


# --- API -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_post_heal_answers_202_with_the_job_and_where_to_poll_it(
    operator_api, monkeypatch, fast, alerts, django_capture_on_commit_callbacks
):
    service = make_service(heal_strategies=[HealStrategy.RECONNECT])
    monkeypatch.setattr(healing, "_fresh_check", FakeChecks(True))

    with django_capture_on_commit_callbacks(execute=True):
        response = operator_api.post(HEAL.format(service.name), {}, format="json")

    assert response.status_code == 202, response.content
    assert response["Location"].endswith(f"/api/jobs/{response.json()['id']}")
    assert response.json()["kind"] == HEAL_JOB_KIND
    operation = HealOperation.objects.get(job_id=response.json()["id"])
    assert operation.trigger == "manual" and operation.outcome == HealOutcome.HEALED
    assert operation.actor_username != ""
    polled = operator_api.get(response["Location"])
    assert polled.status_code == 200 and polled.json()["status"] == JobStatus.SUCCEEDED


@pytest.mark.django_db
def test_post_heal_with_one_strategy_and_dry_run(operator_api, not_enqueued):
    service = make_service()
    response = operator_api.post(
        HEAL.format(service.name), {"strategy": "switch_standby", "dry_run": True}, format="json"
    )
    assert response.status_code == 202
    operation = HealOperation.objects.get(job_id=response.json()["id"])
    assert (operation.strategy, operation.dry_run) == ("switch_standby", True)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"strategy": "reboot_the_datacenter"}, "strategy"),
        ({"strategy": 3}, "strategy"),
        ({"dry_run": "yes"}, "dry_run"),
        ({"dry_run": 1}, "dry_run"),
    ],
)
def test_post_heal_refuses_bad_input_naming_the_field(operator_api, not_enqueued, body, field):
    service = make_service()
    response = operator_api.post(HEAL.format(service.name), body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not HealOperation.objects.exists()


@pytest.mark.django_db
def test_post_heal_without_a_body_or_strategies_is_refused(operator_api, not_enqueued):
    service = make_service(heal_strategies=[])
    assert operator_api.post(HEAL.format(service.name)).status_code == 400
    response = operator_api.post(HEAL.format(service.name), {}, format="json")
    assert response.status_code == 400 and "strategy" in response.json()


@pytest.mark.django_db
def test_post_heal_answers_404_for_an_unknown_service_and_403_without_the_permission(
    operator_api, compliance_api, not_enqueued
):
    assert operator_api.post(HEAL.format("nope"), {}, format="json").status_code == 404
    service = make_service()
    assert compliance_api.post(HEAL.format(service.name), {}, format="json").status_code == 403
    assert not HealOperation.objects.exists()


@pytest.mark.django_db
def test_post_heal_answers_409_while_the_service_is_being_healed(operator_api, not_enqueued):
    service = make_service()
    assert operator_api.post(HEAL.format(service.name), {}, format="json").status_code == 202
    response = operator_api.post(HEAL.format(service.name), {}, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "already_healing"


@pytest.mark.django_db
def test_delete_reset_is_for_superusers_and_clears_breakers_statistics_and_stuck_heals(
    admin_api, operator_api, not_enqueued
):
    from recovery import breaker

    # given an open breaker, retry statistics and a heal whose job died
    breaker.trip("cache", reason="test")
    RetryStat.objects.create(service="cache", minute=timezone.now(), calls=3)
    stuck = healing.maybe_heal(service=make_service(), trigger="down")
    Job.objects.filter(pk=stuck.job_id).update(status=JobStatus.FAILED)

    # when an operator, then a superuser, asks for the reset
    assert operator_api.delete(RESET).status_code == 403
    assert breaker.get("cache").snapshot()["state"] == "open"
    response = admin_api.delete(RESET)

    # then everything is cleared, and the trail says who did it
    assert response.status_code == 200, response.content
    assert response.json()["breakers"] >= 1
    assert response.json()["retry_stats"] >= 1
    assert response.json()["stuck_heals"] == 1
    assert breaker.get("cache").snapshot()["state"] == "closed"
    assert not RetryStat.objects.exists()
    event = AuditEvent.objects.filter(action=AuditAction.RECOVERY_RESET).get()
    assert revealed(event).actor_username == "root"
    assert json.loads(event.details)["stuck_heals"] == 1
    # and a second reset is harmless
    assert admin_api.delete(RESET).json()["stuck_heals"] == 0


def test_heal_request_paths_are_named(tmp_path: Path) -> None:
    from django.urls import reverse

    assert reverse("recovery-heal", kwargs={"service": "db"}) == HEAL.format("db")
    assert reverse("recovery-reset") == RESET
