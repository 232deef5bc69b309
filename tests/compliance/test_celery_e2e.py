"""The sealing task, end to end: published to the real broker, run by a real Celery worker."""

from __future__ import annotations

import time

from compliance import audit, verification
from compliance.models import AuditEvent
from compliance.tasks import seal_audit_chain_task

SEAL_TIMEOUT = 60
EVENTS = 5


def _wait_until_sealed(deadline: float) -> int:
    pending = AuditEvent.objects.filter(seal__isnull=True).count()
    while pending and time.monotonic() < deadline:
        time.sleep(0.25)
        pending = AuditEvent.objects.filter(seal__isnull=True).count()
    return pending


def test_a_real_worker_seals_committed_events_into_a_chain_that_verifies(worker_queue, tmp_path):
    # given committed, unsealed events
    for n in range(EVENTS):
        audit.record_event(action=f"custom.e2e{n}", details={"n": n})
    assert AuditEvent.objects.filter(seal__isnull=True).count() == EVENTS

    # when the sealing task goes through the broker to the worker
    result = seal_audit_chain_task.apply_async(queue=worker_queue)
    pending = _wait_until_sealed(time.monotonic() + SEAL_TIMEOUT)

    # then
    log = (tmp_path / "worker.log").read_text()
    assert pending == 0, f"worker did not seal within {SEAL_TIMEOUT}s; its log:\n{log}"
    assert type(result).__name__ == "AsyncResult"
    chain = verification.check_chain()
    assert chain.ok, chain.reason
    assert (chain.checked, chain.unsealed) == (EVENTS, 0)
    assert AuditEvent.objects.count() == EVENTS
    seqs = list(AuditEvent.objects.order_by("id").values_list("seal__seq", flat=True))
    assert seqs == list(range(1, EVENTS + 1))


def test_a_real_worker_runs_a_verification_job_to_its_result(worker_queue, tmp_path):
    from bridge.choices import JobStatus
    from bridge.models import Job
    from compliance import chain
    from compliance.tasks import verify_audit_chain_task

    # given a sealed chain and a pending verification job
    for n in range(EVENTS):
        audit.record_event(action=f"custom.job{n}")
    chain.seal_all_pending()
    job = verification.start_verification(
        context=audit.AuditContext.system(), source="api", enqueue=False
    )
    # when its task goes through the broker to the worker
    verify_audit_chain_task.apply_async(args=[job.pk], queue=worker_queue)
    deadline = time.monotonic() + SEAL_TIMEOUT
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_final:
            break
        time.sleep(0.25)
    # then the job row says what the worker found
    log = (tmp_path / "worker.log").read_text()
    assert job.status == JobStatus.SUCCEEDED, f"job {job.status}: {job.error}; worker log:\n{log}"
    assert job.result["ok"] is True
    assert job.result["checked"] == EVENTS
    # the worker signed a checkpoint first (with the key file this process trusts) and held
    # the chain to it
    assert job.result["checkpoints"] == 1
    assert (job.progress_done, job.progress_total) == (EVENTS, EVENTS)
    assert job.started_at is not None and job.finished_at >= job.started_at
    assert Job.objects.filter(kind=job.kind).count() == 1


def test_a_real_worker_signs_a_checkpoint_into_the_sink_this_process_verifies(
    worker_queue, tmp_path, checkpoint_dir
):
    import json

    from compliance import chain
    from compliance.models import AuditCheckpoint
    from compliance.tasks import checkpoint_audit_chain_task

    # given a sealed chain
    for n in range(EVENTS):
        audit.record_event(action=f"custom.cp{n}")
    chain.seal_all_pending()
    # when the checkpoint task goes through the broker to the worker
    checkpoint_audit_chain_task.apply_async(queue=worker_queue)
    deadline = time.monotonic() + SEAL_TIMEOUT
    while (
        time.monotonic() < deadline
        and not AuditCheckpoint.objects.filter(status="published").exists()
    ):
        time.sleep(0.25)
    # then the worker wrote it to the directory sink, signed, and it anchors this chain
    log = (tmp_path / "worker.log").read_text()
    made = AuditCheckpoint.objects.filter(status="published").first()
    assert made is not None, f"no checkpoint within {SEAL_TIMEOUT}s; worker log:\n{log}"
    (line,) = [json.loads(text) for f in checkpoint_dir.glob("*.jsonl") for text in f.open()]
    assert (line["number"], line["seq"], line["signature"]) == (1, EVENTS, made.signature)
    result = verification.check_chain()
    assert (result.ok, result.checkpoints) == (True, 1), result.reason
