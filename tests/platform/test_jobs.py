"""Background runs as rows: started, run once, reported, cancelled, reaped."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from bridge import jobs
from bridge.choices import JobStatus
from bridge.models import Job
from compliance import audit, chain
from compliance.audit import AuditContext
from compliance.choices import VERIFY_JOB_KIND
from compliance.models import AuditEvent, AuditVerification

VERIFY = "/api/compliance/audit/verify"


def _pending_verification() -> Job:
    return jobs.start_job(kind=VERIFY_JOB_KIND, context=AuditContext.system(), enqueue=False)


@pytest.mark.django_db
def test_post_verify_answers_202_with_the_job_and_a_location_to_poll(
    compliance_api, django_capture_on_commit_callbacks
):
    # given sealed events
    for n in range(3):
        audit.record_event(action=f"custom.j{n}")
    chain.seal_all_pending()
    # when a verification is asked for
    with django_capture_on_commit_callbacks(execute=True):
        response = compliance_api.post(VERIFY)
    # then the answer is the job, and polling it shows how it ended
    assert response.status_code == 202
    job = response.json()
    assert response["Location"].endswith(f"/api/jobs/{job['id']}")
    assert job["kind"] == VERIFY_JOB_KIND
    polled = compliance_api.get(response["Location"]).json()
    assert (polled["status"], polled["percent"]) == ("succeeded", 100)
    assert polled["result"]["ok"] is True
    assert polled["result"]["checked"] == AuditEvent.objects.filter(seal__isnull=False).count() >= 3
    assert polled["actor_username"] == "carla"


@pytest.mark.django_db
def test_get_verify_reads_the_latest_run_without_recomputing(verify, compliance_api):
    first = verify()
    runs = AuditVerification.objects.count()
    again = compliance_api.get(VERIFY).json()
    assert AuditVerification.objects.count() == runs
    assert again["verification_id"] == first["verification_id"]
    assert again["age_seconds"] >= 0
    assert again["status"] == "succeeded"


@pytest.mark.django_db
def test_get_verify_before_any_run_is_a_404_saying_how_to_start_one(compliance_api):
    response = compliance_api.get(VERIFY)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert "POST" in response.json()["detail"]


@pytest.mark.django_db
def test_a_job_runs_at_most_once_even_when_delivered_twice():
    job = _pending_verification()
    calls = []

    def work(job: Job, progress: jobs.Progress) -> dict:
        calls.append(job.pk)
        return {"n": 1}

    assert jobs.run_job(job.pk, work).status == JobStatus.SUCCEEDED
    assert jobs.run_job(job.pk, work) is None
    assert calls == [job.pk]


@pytest.mark.django_db
def test_a_failing_job_is_failed_with_its_error_and_audited():
    job = _pending_verification()

    def work(job: Job, progress: jobs.Progress) -> dict:
        progress.update(3, 10, "working")
        raise ValueError("disk on fire")

    finished = jobs.run_job(job.pk, work)
    assert finished.status == JobStatus.FAILED
    assert finished.error == "ValueError: disk on fire"
    assert (finished.progress_done, finished.progress_total) == (3, 10)
    event = AuditEvent.objects.get(action="job.failed")
    assert event.object_id == str(job.pk)
    assert "disk on fire" in event.details


@pytest.mark.django_db
def test_progress_is_recorded_with_a_heartbeat():
    job = _pending_verification()
    seen = []

    def work(job: Job, progress: jobs.Progress) -> dict:
        progress.update(50, 100, "half way")
        row = Job.objects.get(pk=job.pk)
        seen.append((row.progress_done, row.progress_total, row.progress_message, row.percent))
        return {}

    jobs.run_job(job.pk, work)
    assert seen == [(50, 100, "half way", 50)]
    assert Job.objects.get(pk=job.pk).heartbeat_at is not None


@pytest.mark.django_db
def test_cancelling_a_pending_job_cancels_it_at_once():
    job = _pending_verification()
    jobs.cancel_job(job=job, context=AuditContext.system())
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    # a worker that picks it up later does not run it
    assert jobs.run_job(job.pk, lambda job, progress: {}) is None
    assert AuditEvent.objects.filter(action="job.cancel_requested").count() == 1


@pytest.mark.django_db
def test_a_running_job_stops_at_its_next_progress_report_once_cancelled():
    job = _pending_verification()
    reached = []

    def work(job: Job, progress: jobs.Progress) -> dict:
        progress.update(1, 3)
        jobs.cancel_job(job=job, context=AuditContext.system())
        progress.update(3, 3)  # final: always written, and refused
        reached.append("after")
        return {}

    finished = jobs.run_job(job.pk, work)
    assert finished.status == JobStatus.CANCELLED
    assert reached == []


@pytest.mark.django_db
def test_a_finished_job_cannot_be_cancelled():
    job = _pending_verification()
    jobs.run_job(job.pk, lambda job, progress: {})
    with pytest.raises(jobs.JobError) as refused:
        jobs.cancel_job(job=job, context=AuditContext.system())
    assert refused.value.code == "job_finished"


@pytest.mark.django_db
@override_settings(JOB_HEARTBEAT_TIMEOUT=60, JOB_PENDING_TIMEOUT=600)
def test_the_reaper_fails_jobs_whose_worker_died_and_jobs_nobody_took():
    # given a job whose worker stopped beating, one nobody took, and two healthy ones
    now = timezone.now()
    dead = _pending_verification()
    Job.objects.filter(pk=dead.pk).update(
        status=JobStatus.RUNNING, started_at=now, heartbeat_at=now - timedelta(seconds=61)
    )
    alive = _pending_verification()
    Job.objects.filter(pk=alive.pk).update(status=JobStatus.RUNNING, heartbeat_at=now)
    orphan = _pending_verification()
    Job.objects.filter(pk=orphan.pk).update(created_at=now - timedelta(seconds=601))
    fresh = _pending_verification()
    # when
    assert jobs.reap_stale_jobs() == 2
    # then
    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses[dead.pk] == statuses[orphan.pk] == JobStatus.FAILED
    assert statuses[alive.pk] == JobStatus.RUNNING
    assert statuses[fresh.pk] == JobStatus.PENDING
    assert "worker lost: no heartbeat since" in Job.objects.get(pk=dead.pk).error
    assert "never started" in Job.objects.get(pk=orphan.pk).error
    assert AuditEvent.objects.filter(action="job.failed").count() == 2


@pytest.mark.django_db
def test_a_worker_whose_job_was_reaped_stops_and_cannot_revive_it():
    job = _pending_verification()

    def work(job: Job, progress: jobs.Progress) -> dict:
        Job.objects.filter(pk=job.pk).update(status=JobStatus.FAILED, error="reaped")
        progress.update(5, 5)
        return {"late": True}

    assert jobs.run_job(job.pk, work) is None
    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.error, row.result) == (JobStatus.FAILED, "reaped", {})


def _fresh_broker_pool(app) -> None:
    # Not closed: kombu keeps producer pools per broker URL process-wide, and the next test's
    # pool for the real broker must stay usable.
    app._pool = None
    app.amqp._producer_pool = None


@pytest.mark.django_db
def test_a_job_the_broker_refuses_is_failed_loudly(monkeypatch, django_capture_on_commit_callbacks):
    from bridge.celery import app

    # given a broker that is not there (a closed port), published for real
    monkeypatch.setitem(app.conf, "task_always_eager", False)
    monkeypatch.setitem(app.conf, "broker_url", "redis://127.0.0.1:1/0")
    # Celery reads the environment variable before its own setting.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setitem(app.conf, "task_publish_retry", False)
    monkeypatch.setitem(app.conf, "broker_connection_timeout", 1)
    _fresh_broker_pool(app)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            job = jobs.start_job(kind=VERIFY_JOB_KIND, context=AuditContext.system())
    finally:
        # The next test gets a pool of its own, on the broker its settings name.
        _fresh_broker_pool(app)
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("could not be queued")


@pytest.mark.django_db
def test_jobs_are_listed_only_for_users_allowed_to_see_their_kind(
    verify, compliance_api, operator_api
):
    verify()
    assert compliance_api.get("/api/jobs").json()["count"] == 1
    assert operator_api.get("/api/jobs").json()["count"] == 0
    job_id = AuditVerification.objects.get().pk
    assert operator_api.get(f"/api/jobs/{job_id}").status_code == 404
    assert operator_api.post(f"/api/jobs/{job_id}/cancel").status_code == 404


@pytest.mark.django_db
def test_cancel_over_the_api_is_202_or_409_once_finished(compliance_api):
    job = _pending_verification()
    response = compliance_api.post(f"/api/jobs/{job.pk}/cancel")
    assert (response.status_code, response.json()["status"]) == (202, "cancelled")
    again = compliance_api.post(f"/api/jobs/{job.pk}/cancel")
    assert (again.status_code, again.json()["code"]) == (409, "job_finished")


@pytest.mark.django_db
def test_the_jobs_list_filters_by_status_and_refuses_an_unknown_status(compliance_api):
    _pending_verification()
    done = _pending_verification()
    jobs.run_job(done.pk, lambda job, progress: {})
    body = compliance_api.get("/api/jobs", {"status": "succeeded"}).json()
    assert [row["id"] for row in body["results"]] == [done.pk]
    bad = compliance_api.get("/api/jobs", {"status": "exploded"})
    assert bad.status_code == 400
    assert "status" in bad.json()


@pytest.mark.django_db
def test_a_hung_broker_fails_the_job_within_seconds_instead_of_holding_the_request(
    monkeypatch, django_capture_on_commit_callbacks, hung_port
):
    import time

    from bridge.celery import app

    # given a Redis broker that accepts connections and never answers
    broker = f"redis://127.0.0.1:{hung_port}/0"
    monkeypatch.setitem(app.conf, "task_always_eager", False)
    monkeypatch.setitem(app.conf, "broker_url", broker)
    monkeypatch.setenv("CELERY_BROKER_URL", broker)
    monkeypatch.setitem(
        app.conf, "broker_transport_options", {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    )
    monkeypatch.setitem(app.conf, "broker_connection_timeout", 0.5)
    _fresh_broker_pool(app)
    started = time.monotonic()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            job = jobs.start_job(kind=VERIFY_JOB_KIND, context=AuditContext.system())
    finally:
        _fresh_broker_pool(app)
    # then the request was held seconds, not forever, and the job says why
    assert time.monotonic() - started < 10
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("could not be queued")


@pytest.mark.django_db
def test_a_secret_in_a_job_error_or_its_params_is_masked_in_the_row_the_api_and_the_log(
    compliance_api, caplog
):
    secret = "S3cret-Pw-991"
    job = jobs.start_job(
        kind=VERIFY_JOB_KIND,
        context=AuditContext.system(),
        params={"target": f"s3://backup:{secret}@bucket", "api_key": secret},
        enqueue=False,
    )

    def work(job: Job, progress: jobs.Progress) -> dict:
        raise ConnectionError(f"could not connect to postgres://bridge:{secret}@db:5432/bridge")

    jobs.run_job(job.pk, work)
    row = Job.objects.get(pk=job.pk)
    body = compliance_api.get(f"/api/jobs/{job.pk}").content.decode()
    assert row.status == JobStatus.FAILED
    assert "postgres://bridge:[REDACTED]@db:5432/bridge" in row.error
    for place in (row.error, str(row.params), body, caplog.text):
        assert secret not in place
    assert "job.failed" in AuditEvent.objects.values_list("action", flat=True)


@pytest.mark.django_db
def test_asking_for_a_verification_while_one_is_waiting_returns_that_one(compliance_api):
    first = compliance_api.post(VERIFY)  # no commit callbacks run: it stays pending
    again = compliance_api.post(VERIFY)
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["id"] == again.json()["id"]
    assert AuditVerification.objects.count() == 1


@pytest.mark.django_db
def test_the_scheduled_verification_queues_a_job_that_runs_once(
    django_capture_on_commit_callbacks,
):
    from compliance.tasks import scheduled_verification_task

    with django_capture_on_commit_callbacks(execute=True):
        scheduled_verification_task()
    run = AuditVerification.objects.get()
    assert (run.status, run.ok, run.source) == (JobStatus.SUCCEEDED, True, "schedule")
    # a redelivered message finds the job taken
    assert jobs.run_job(run.pk, lambda job, progress: {}) is None


@pytest.mark.django_db
@override_settings(JOB_HEARTBEAT_TIMEOUT=60)
def test_the_reaper_spares_a_job_whose_heartbeat_arrives_between_its_look_and_its_update():
    job = _pending_verification()
    stale = timezone.now() - timedelta(seconds=61)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, heartbeat_at=stale)
    job.refresh_from_db()
    # the worker beats after the reaper read the row
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now())
    spared = not jobs._finish(
        job,
        JobStatus.FAILED,
        error="lost",
        expected=(JobStatus.RUNNING,),
        only_if={"heartbeat_at__lt": timezone.now() - timedelta(seconds=60)},
    )
    assert spared
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING


@pytest.mark.django_db
def test_a_job_that_catches_every_exception_still_stops_when_cancelled():
    job = _pending_verification()
    done = []

    def work(job: Job, progress: jobs.Progress) -> dict:
        for item in range(3):
            try:
                if item == 1:
                    jobs.cancel_job(job=job, context=AuditContext.system())
                progress.update(item + 1, 3)
                done.append(item)
            except Exception:  # noqa: S112  (the careless job this test is about)
                continue
        return {}

    assert jobs.run_job(job.pk, work).status == JobStatus.CANCELLED
    # progress is written at most every 0.5 s (and always at the end): the cancel is seen at
    # the last item's report, which the job's own `except Exception` could not swallow
    assert done == [0, 1]
