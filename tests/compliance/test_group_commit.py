from __future__ import annotations

import threading

import pytest
from django.db import connection

from compliance import audit
from compliance.models import AuditEvent
from compliance.personal import revealed
from compliance.writer import AuditWriteError, AuditWriter


def _row(n: int) -> tuple:
    return audit.event_values(action="api.request", path=f"/api/x/{n}", status_code=200)


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_each_return_only_after_their_row_is_committed():
    # given
    writer = AuditWriter()
    seen: list[bool] = []

    def write(n: int) -> None:
        writer.write(_row(n))
        # the row is visible from this thread's own connection the moment write returns
        seen.append(AuditEvent.objects.filter(path=f"/api/x/{n}").exists())
        connection.close()

    # when
    threads = [threading.Thread(target=write, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # then
    assert seen == [True] * 40
    assert AuditEvent.objects.filter(path__startswith="/api/x/").count() == 40


@pytest.mark.django_db(transaction=True)
def test_a_failed_commit_is_reported_to_the_waiting_request_and_the_writer_recovers():
    writer = AuditWriter()
    with pytest.raises(AuditWriteError):
        writer.write(_row(1)[:-1])  # a row missing its last column
    assert not AuditEvent.objects.filter(path="/api/x/1").exists()
    writer.write(_row(2))
    assert AuditEvent.objects.filter(path="/api/x/2").exists()


@pytest.mark.django_db
def test_requests_are_recorded_without_the_writer_too(settings, compliance_officer):
    from tests.conftest import client_for

    settings.AUDIT_GROUP_COMMIT = False
    client = client_for(compliance_officer)
    assert client.get("/api/compliance/audit/events").status_code == 200
    event = AuditEvent.objects.get(action="api.request", path="/api/compliance/audit/events")
    assert (revealed(event).actor_username, event.status_code) == ("carla", 200)


@pytest.mark.django_db(transaction=True)
def test_a_waiter_that_gave_up_is_never_made_leader(monkeypatch):
    # given a leader whose commit takes longer than the waiters are willing to wait
    import compliance.writer as writer_module

    monkeypatch.setattr(writer_module, "_WAIT_SECONDS", 0.2)
    release = threading.Event()
    real_insert = writer_module.insert_event_rows

    def slow_insert(rows):
        release.wait(5)
        real_insert(rows)

    monkeypatch.setattr(writer_module, "insert_event_rows", slow_insert)
    writer = AuditWriter()
    errors: list[Exception] = []

    def write(n: int) -> None:
        try:
            writer.write(_row(n))
        except AuditWriteError as exc:
            errors.append(exc)
        finally:
            connection.close()

    leader = threading.Thread(target=write, args=(0,))
    leader.start()
    threading.Event().wait(0.05)
    waiter = threading.Thread(target=write, args=(1,))
    waiter.start()
    waiter.join()  # gives up after 0.2 s
    release.set()
    leader.join()
    # when a later request arrives, it must still be served
    monkeypatch.setattr(writer_module, "insert_event_rows", real_insert)
    writer.write(_row(2))
    # then
    assert len(errors) == 1
    assert AuditEvent.objects.filter(path__in=["/api/x/0", "/api/x/2"]).count() == 2
    assert not AuditEvent.objects.filter(path="/api/x/1").exists()
