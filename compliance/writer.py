"""Group commit for request events: one INSERT and one commit for every request waiting.

Each API request must have its event on disk before its response leaves. Committing one
INSERT per request pays a round trip and a WAL flush each time. Here the first request to
arrive becomes the leader and commits, in one statement, its own row and every row that
queued up while the previous commit was in flight; the others wait for it. Leadership then
passes to the oldest waiting request, if any. An idle server or a single-threaded worker
(gunicorn's sync class) always leads at once, so it writes inline with no hand-off; under
concurrent requests the batches grow by themselves.

Only autocommit request events go through here. Events a service records inside its own
transaction stay in that transaction (`record_event`), so they commit or roll back with it.
"""

from __future__ import annotations

import logging
import threading

from compliance.audit import insert_event_rows

log = logging.getLogger(__name__)

_WAIT_SECONDS = 30.0


class AuditWriteError(RuntimeError):
    """The event could not be made durable; the caller must not report success."""


class _Pending:
    __slots__ = ("committed", "error", "promoted", "row", "wake")

    def __init__(self, row: tuple) -> None:
        self.row = row
        self.wake = threading.Event()
        self.committed = False
        self.promoted = False
        self.error: BaseException | None = None


class AuditWriter:
    """Leader-based group commit among the threads of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._leading = False

    def write(self, row: tuple) -> None:
        """Return once `row` is committed; raise AuditWriteError if it could not be."""
        me = _Pending(row)
        with self._lock:
            self._queue.append(me)
            lead = not self._leading
            self._leading = True
        while not lead:
            if not me.wake.wait(_WAIT_SECONDS):
                with self._lock:
                    if me in self._queue and not me.promoted:
                        # Leave no dead waiter behind to be promoted later: nobody would lead.
                        self._queue.remove(me)
                        raise AuditWriteError("the audit writer did not commit in time")
                continue
            if me.committed:
                break
            me.wake.clear()
            lead = me.promoted
        if lead:
            self._lead()
        if me.error is not None:
            raise AuditWriteError(str(me.error)) from me.error

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            insert_event_rows([pending.row for pending in batch])
        except BaseException as exc:
            log.exception("audit writer failed to commit %s event(s)", len(batch))
            for pending in batch:
                pending.error = exc
        finally:
            # Whatever happened, wake this batch and pass leadership on: a waiter left
            # unwoken, or _leading left set with nobody leading, would stall the process.
            for pending in batch:
                pending.committed = True
                pending.wake.set()
            with self._lock:
                if self._queue:
                    # Hand over to the oldest waiter rather than serving everyone from this
                    # thread: this request's response is ready and should not wait for later ones.
                    successor = self._queue[0]
                    successor.promoted = True
                    successor.wake.set()
                else:
                    self._leading = False


writer = AuditWriter()
