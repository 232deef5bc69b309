"""Group commit for request events: one INSERT and one commit for every request waiting.

Each API request must have its event on disk before its response leaves. Committing one
INSERT per request pays a round trip and a WAL flush each time; here request threads hand
their row to one writer thread per process and wait, and the writer inserts everything that
queued up meanwhile in one statement and one commit, then releases all of them. Under load the
batches grow by themselves; an idle server still answers at once (a batch of one).

Only autocommit request events go through here. Events a service records inside its own
transaction stay in that transaction (`record_event`), so they commit or roll back with it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from django.db import connection

from compliance.services import insert_event_rows

log = logging.getLogger(__name__)

_MAX_BATCH = 500
_WAIT_SECONDS = 30.0


class AuditWriteError(RuntimeError):
    """The event could not be made durable; the caller must not report success."""


class _Pending:
    __slots__ = ("done", "error", "row")

    def __init__(self, row: tuple) -> None:
        self.row = row
        self.done = threading.Event()
        self.error: BaseException | None = None


class AuditWriter:
    """One writer thread per process, created lazily and again after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._pid: int | None = None

    def write(self, row: tuple) -> None:
        """Block until `row` is committed; raise AuditWriteError if it could not be."""
        self._ensure_thread()
        pending = _Pending(row)
        self._queue.put(pending)
        if not pending.done.wait(_WAIT_SECONDS):
            raise AuditWriteError("the audit writer did not commit in time")
        if pending.error is not None:
            raise AuditWriteError(str(pending.error)) from pending.error

    def close(self) -> None:
        """Stop the writer thread after what is queued, closing its database connection."""
        if self._pid == os.getpid():
            done = _Pending(())
            self._queue.put(done)
            done.done.wait(_WAIT_SECONDS)
            self._pid = None

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # A forked child inherits the queue object but not the thread: start afresh.
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._run, name="audit-writer", daemon=True).start()
            self._pid = os.getpid()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = [pending for pending in batch if not pending.row]
            batch = [pending for pending in batch if pending.row]
            if batch:
                self._commit(batch)
            if stop:
                connection.close()
                for pending in stop:
                    pending.done.set()
                return

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            insert_event_rows([pending.row for pending in batch])
        except BaseException as exc:
            log.exception("audit writer failed to commit %s event(s)", len(batch))
            for pending in batch:
                pending.error = exc
            # A broken connection must not poison the next batch.
            connection.close()
        finally:
            for pending in batch:
                pending.done.set()


writer = AuditWriter()
