"""Group commit of todo outcomes.

Worker threads hand their final write (result, failure or question, with the todo's last
events) to one writer thread and block until it is stored. The writer records everything that
is pending in one SQL call — one transaction, one fsync — so throughput is not bounded by one
commit per todo. Nothing is fire-and-forget: a worker returns only once its outcome is stored
(or refused by fencing), and outages are retried with back-off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ServerFailed, StorageUnavailable
from .models import Claim
from .retrying import backoff
from .storage.base import Storage, WriteOutcome

logger = logging.getLogger(__name__)

BATCH_SIZE = 200  # outcomes per SQL call


@dataclass
class Outcome:
    """One todo's final write, and, once stored, what the database said."""

    claim: Claim
    kind: str  # completed | failed | asked
    result: Any = None
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stored: WriteOutcome | None = None
    failure: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def item(self) -> dict[str, Any]:
        return {
            "todo_id": self.claim.todo_id,
            "token": self.claim.token,
            "outcome": self.kind,
            "result": self.result,
            "error": self.error,
            "events": self.events,
        }


class OutcomeWriter:
    """Writes the outcomes of all workers, as many per call as are waiting."""

    def __init__(self, storage: Storage, *, abort: threading.Event,
                 on_crash: Callable[[str, BaseException], None] | None = None) -> None:
        """:param on_crash: called if the writer thread dies anyway (it survives any single
            bad outcome), so the server stops visibly instead of leaving workers waiting."""
        self._storage = storage
        self._abort = abort
        self._on_crash = on_crash
        self._cond = threading.Condition()
        self._pending: list[Outcome] = []
        self._writing: list[Outcome] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="processgpt-sync-outcomes",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def write(self, outcome: Outcome) -> WriteOutcome:
        """Store ``outcome`` (blocking); raise the storage error if it cannot be stored."""
        with self._cond:
            closed = self._closed
            if not closed:
                self._pending.append(outcome)
                self._cond.notify()
        if closed:  # a straggler after stop(): write it on the caller's thread
            self._write_batch([outcome])
        outcome.done.wait()
        if outcome.failure is not None:
            raise outcome.failure
        assert outcome.stored is not None
        return outcome.stored

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop the writer thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._write_forever()
        except BaseException as exc:
            logger.critical("the outcome writer thread died", exc_info=exc,
                            extra={"action": "finish"})
            with self._cond:
                self._closed = True  # later outcomes are written on their workers' threads
                stranded, self._pending = self._writing + self._pending, []
            self._fail_all(stranded, ServerFailed(f"the outcome writer thread died ({exc!r})"))
            if self._on_crash is not None:
                self._on_crash("outcome writer", exc)

    def _write_forever(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[:BATCH_SIZE], self._pending[BATCH_SIZE:]
                self._writing = batch
            self._write_batch(batch)
            with self._cond:
                self._writing = []

    def _write_batch(self, batch: list[Outcome]) -> None:
        attempt = 0
        while True:
            try:
                stored = self._storage.finish([o.item() for o in batch])
                break
            except StorageUnavailable as exc:
                attempt += 1
                if self._abort.is_set():
                    self._fail_all(batch, exc)
                    return
                logger.warning("writing %d todo outcomes failed (attempt %d), retrying: %s",
                               len(batch), attempt, exc, extra={"action": "finish"})
                time.sleep(backoff(attempt))
            except Exception as exc:  # refused, or an outcome the driver cannot encode
                if len(batch) > 1:
                    # Isolate the item the database refused: write them one by one.
                    logger.warning("a batch of %d todo outcomes was refused (%s); writing them "
                                   "one by one", len(batch), exc, extra={"action": "finish"})
                    for outcome in batch:
                        self._write_batch([outcome])
                    return
                logger.error("writing the outcome of todo %s failed: %s",
                             batch[0].claim.todo_id, exc,
                             extra={"action": "finish", "todo_id": batch[0].claim.todo_id})
                self._fail_all(batch, exc)
                return
        for outcome, result in zip(batch, stored, strict=True):
            outcome.stored = result
            outcome.done.set()

    @staticmethod
    def _fail_all(batch: list[Outcome], exc: BaseException) -> None:
        for outcome in batch:
            if not outcome.done.is_set():
                outcome.failure = exc
                outcome.done.set()
