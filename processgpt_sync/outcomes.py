"""Group commit of todo outcomes.

Worker threads hand their final write (result, failure or question, with the todo's last
events) to one writer thread. The writer records everything that is pending in one SQL call —
one transaction, one fsync — so throughput is not bounded by one commit per todo. Nothing is
fire-and-forget: each outcome carries what to do once it is stored (or refused by fencing, or
could not be stored), run on the writer's thread after its commit; ``write`` waits for that.
Outages are retried with back-off. An outcome that cannot be written now for its own sake —
its todo row held by another transaction, or too heavy to write within the statement timeout —
waits and is tried again a little later, while the others are written (a batch that times out
is written in halves first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ServerFailed, StorageError, StorageUnavailable
from .models import Claim
from .retrying import (
    HELD_ROW_WARN_AFTER,
    STATEMENT_TIMEOUT,
    TIMEOUTS_ALONE_MAX,
    UNANSWERED_ALONE_MAX,
    backoff,
)
from .storage.base import Storage, WriteOutcome

logger = logging.getLogger(__name__)

BATCH_SIZE = 200  # outcomes per SQL call
WAIT_RETRY_FIRST = 0.02  # seconds before an outcome that had to wait is tried again
WAIT_RETRY_MAX = 1.0
TIMEOUTS_BEFORE_OUTAGE = 3  # writes timing out in a row: the database is slow, not one write


Stored = Callable[[WriteOutcome | None, BaseException | None], None]
"""Called once an outcome's write ended: what the database said, or why it could not be
stored (``StorageUnavailable`` only once the server exits now)."""


@dataclass
class Outcome:
    """One todo's final write."""

    claim: Claim
    kind: str  # completed | failed | asked
    result: Any = None
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    told: bool = False  # its ``then`` ran (or runs now): never twice
    waits_for: str = ""  # why it could not be written yet: what the log says after a while
    waiting_since: float | None = None
    wait_tries: int = 0
    wait_logged: bool = False
    timeouts: int = 0  # times it ran past the statement timeout alone: it is then sent alone
    unanswered: int = 0  # times it got no answer within the read timeout alone (Supabase)
    timed_out_at: float | None = None  # when it last did (time.monotonic())

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
        self._pending: list[tuple[Outcome, Stored]] = []
        self._writing: list[tuple[Outcome, Stored]] = []
        self._held: list[tuple[float, Outcome, Stored]] = []  # (when to try again, ...)
        self._alone: list[tuple[Outcome, Stored]] = []  # due, each written in a call of its own
        self._timeouts_in_row = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="processgpt-sync-outcomes",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, outcome: Outcome, then: Stored) -> None:
        """Store ``outcome`` with the next batch; ``then`` runs on the writer's thread once it
        is stored or could not be (it may submit again, it must not wait for the writer)."""
        with self._cond:
            closed = self._closed
            if not closed:
                self._pending.append((outcome, then))
                self._cond.notify()
        if closed:  # a straggler after stop(): write it on the caller's thread
            self._write_straggler((outcome, then))

    def write(self, outcome: Outcome) -> WriteOutcome:
        """Store ``outcome`` (blocking); raise the storage error if it cannot be stored."""
        ended = threading.Event()
        answer: list[Any] = [None, None]

        def stored(result: WriteOutcome | None, failure: BaseException | None) -> None:
            answer[:] = [result, failure]
            ended.set()

        self.submit(outcome, stored)
        ended.wait()
        if answer[1] is not None:
            raise answer[1]
        assert answer[0] is not None
        result: WriteOutcome = answer[0]
        return result

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
                held = [(outcome, then) for _, outcome, then in self._held]
                stranded = self._writing + self._alone + self._pending + held
                self._pending, self._alone, self._held = [], [], []
            # Report first: what the stranded outcomes' handlers write now is written on this
            # thread, and retries through an outage until the stopping server aborts them.
            if self._on_crash is not None:
                self._on_crash("outcome writer", exc)
            self._fail_all(stranded, ServerFailed(f"the outcome writer thread died ({exc!r})"))

    def _write_forever(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._take_due_held()
                    if self._pending or self._alone or (self._closed and not self._held):
                        break
                    if self._held and self._abort.is_set():
                        self._fail_held()
                        continue
                    wake = min(due for due, _, _ in self._held) if self._held else None
                    self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))
                if self._alone:  # too heavy to share a statement with others
                    batch = [self._alone.pop(0)]
                elif self._pending:
                    batch = self._pending[:BATCH_SIZE]
                    self._pending = self._pending[BATCH_SIZE:]
                else:
                    return
                self._writing = batch
            held = self._write_batch(batch)
            with self._cond:
                self._writing = []
                for outcome, then in held:
                    self._held.append((self._next_try(outcome), outcome, then))
            del batch, held  # their todos (outputs too) are freed now, not when the next arrive

    def _take_due_held(self) -> None:
        """Move the held outcomes whose time has come back to the pending ones (lock held)."""
        now = time.monotonic()
        due = [(outcome, then) for when, outcome, then in self._held if when <= now]
        if due:
            self._held = [entry for entry in self._held if entry[0] > now]
            for entry in due:
                # one that timed out alone is tried alone again, counted against it or not
                (self._alone if entry[0].timed_out_at is not None else self._pending).append(entry)

    def _fail_held(self) -> None:
        """The server exits now: the held outcomes are not stored (their leases lapse)."""
        held, self._held = self._held, []
        self._cond.release()
        try:
            for _, outcome, then in held:
                self._fail_all([(outcome, then)], _not_written(outcome))
        finally:
            self._cond.acquire()

    @staticmethod
    def _next_try(outcome: Outcome) -> float:
        """When to try again an outcome that had to wait; logged once when that lasts (the
        other todos' outcomes are written meanwhile)."""
        now = time.monotonic()
        if outcome.waiting_since is None:
            outcome.waiting_since = now
        outcome.wait_tries += 1
        if not outcome.wait_logged and now - outcome.waiting_since >= HELD_ROW_WARN_AFTER:
            outcome.wait_logged = True
            todo_id = outcome.claim.todo_id
            logger.warning("the outcome of todo %s has waited %.0fs to be written: %s",
                           todo_id, now - outcome.waiting_since, outcome.waits_for,
                           extra={"action": "finish", "todo_id": todo_id})
        delay: float = WAIT_RETRY_FIRST * 2.0 ** min(outcome.wait_tries - 1, 16)
        return now + min(WAIT_RETRY_MAX, delay)

    def _write_straggler(self, entry: tuple[Outcome, Stored]) -> None:
        """Write one outcome after stop() on the caller's thread, waiting as needed."""
        while self._write_batch([entry]):
            if self._abort.is_set():
                self._fail_all([entry], _not_written(entry[0]))
                return
            time.sleep(max(0.0, self._next_try(entry[0]) - time.monotonic()))

    def _write_batch(self, batch: list[tuple[Outcome, Stored]], *,
                     half: bool = False) -> list[tuple[Outcome, Stored]]:
        """Write ``batch`` and tell each outcome what became of it, except those that must
        wait (their row held, or too heavy for the statement timeout): returned, to be tried
        again. ``half``: one half of a batch that ran past the statement timeout."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                stored = self._storage.finish([outcome.item() for outcome, _ in batch])
                self._timeouts_in_row = 0
                break
            except StorageUnavailable as exc:
                attempt += 1
                if self._abort.is_set():
                    self._fail_all(batch, exc)
                    return []
                if exc.code == STATEMENT_TIMEOUT:
                    self._timeouts_in_row += 1
                    # this write is heavy: others went through before it, or while it ran
                    if (self._timeouts_in_row <= TIMEOUTS_BEFORE_OUTAGE
                            or self._storage.last_success > started):
                        return self._timed_out(batch, exc, started)
                    if half:  # its other halves are tried first: they may not be as heavy
                        return self._wait_after_halving(batch, exc, started)
                    # every write of late timed out: the database is slow, retried as an outage
                logger.warning("writing %d todo outcomes failed (attempt %d), retrying: %s",
                               len(batch), attempt, exc, extra={"action": "finish"})
                self._abort.wait(backoff(attempt, after=exc))  # an abort ends the wait
            except Exception as exc:  # refused, or an outcome the driver cannot encode
                if len(batch) > 1:
                    # Isolate the item the database refused: write them one by one.
                    logger.warning("a batch of %d todo outcomes was refused (%s); writing them "
                                   "one by one", len(batch), exc, extra={"action": "finish"})
                    return [held for item in batch for held in self._write_batch([item])]
                todo_id = batch[0][0].claim.todo_id
                logger.error("writing the outcome of todo %s failed: %s", todo_id, exc,
                             extra={"action": "finish", "todo_id": todo_id})
                self._fail_all(batch, exc)
                return []
        held = []
        for (outcome, then), result in zip(batch, stored, strict=True):
            if result.reason == "busy":
                outcome.waits_for = "another transaction holds its todo row"
                held.append((outcome, then))
            else:
                _tell(outcome, then, result, None)
        return held

    def _timed_out(self, batch: list[tuple[Outcome, Stored]], exc: StorageUnavailable,
                   started: float) -> list[tuple[Outcome, Stored]]:
        """The database ended the write at its statement timeout while others went through:
        the same batch would time out again. Write it in halves; one outcome alone waits and
        is tried again later, alone, so it does not hold up the others; timing out alone
        ``TIMEOUTS_ALONE_MAX`` times (or given no answer ``UNANSWERED_ALONE_MAX`` times), it
        is refused (the recorder then stores the result without its events, or the
        failure)."""
        if len(batch) > 1:
            logger.warning("writing %d todo outcomes ran past the statement timeout; writing "
                           "them in halves", len(batch), extra={"action": "finish"})
            middle = len(batch) // 2
            return (self._write_batch(batch[:middle], half=True)
                    + self._write_batch(batch[middle:], half=True))
        outcome, then = batch[0]
        todo_id = outcome.claim.todo_id
        self._count_timeout(outcome, exc, started)
        if outcome.timeouts >= TIMEOUTS_ALONE_MAX or outcome.unanswered >= UNANSWERED_ALONE_MAX:
            why = (f"ran past the statement timeout {outcome.timeouts} times"
                   if outcome.timeouts >= TIMEOUTS_ALONE_MAX else
                   f"got no answer within the read timeout {outcome.unanswered} times")
            logger.error("the outcome of todo %s %s alone while the database answered other "
                         "calls; giving it up", todo_id, why,
                         extra={"action": "finish", "todo_id": todo_id})
            _tell(outcome, then, None, StorageError(
                f"writing it {why} while the database answered other calls ({exc})",
                code=STATEMENT_TIMEOUT))
            return []
        outcome.waits_for = f"writing it ran past the statement timeout ({exc})"
        logger.warning("writing the outcome of todo %s ran past the statement timeout; trying "
                       "it again alone, after the others", todo_id,
                       extra={"action": "finish", "todo_id": todo_id})
        return list(batch)

    def _count_timeout(self, outcome: Outcome, exc: StorageUnavailable, started: float) -> None:
        """Count a timeout of ``outcome`` written alone against it only if the database
        answered another call since its last one (or, the first time, while this write ran):
        then it is heavy. Otherwise the database may be slow for every call, and an outcome
        given up for that would cost a result the executor made (stored without its events,
        or recorded failed); it is retried instead, as in an outage. A read timeout taken for
        a statement timeout (``unanswered``) counts apart, against a higher bound."""
        since = started if outcome.timed_out_at is None else outcome.timed_out_at
        outcome.timed_out_at = time.monotonic()
        if self._storage.last_success > since:
            if exc.unanswered:
                outcome.unanswered += 1
            else:
                outcome.timeouts += 1

    def _wait_after_halving(self, batch: list[tuple[Outcome, Stored]], exc: StorageUnavailable,
                            started: float) -> list[tuple[Outcome, Stored]]:
        """A half that timed out where the halving already counted as many timeouts in a row
        as an outage takes: it waits (returned), rather than hold every later write up while
        it is retried in place, as one heavy outcome in the first half would for ever. One
        outcome alone has timed out alone: counted (when the database answered others), so
        it is given up in time if it is heavy; through a real outage, the next write on its
        own is retried in place."""
        if len(batch) == 1:
            self._count_timeout(batch[0][0], exc, started)
        for outcome, _ in batch:
            outcome.waits_for = f"writing it ran past the statement timeout ({exc})"
        logger.warning("writing %d todo outcomes ran past the statement timeout again; they "
                       "wait, and the rest of the batch is written first", len(batch),
                       extra={"action": "finish"})
        return list(batch)

    @staticmethod
    def _fail_all(batch: list[tuple[Outcome, Stored]], exc: BaseException) -> None:
        for outcome, then in batch:
            _tell(outcome, then, None, exc)


def _not_written(outcome: Outcome) -> StorageUnavailable:
    return StorageUnavailable(f"not written before the server stopped: {outcome.waits_for}")


def _tell(outcome: Outcome, then: Stored, result: WriteOutcome | None,
          failure: BaseException | None) -> None:
    """Run one outcome's ``then``; one that raises must not keep the others' from running."""
    if outcome.told:
        return
    outcome.told = True
    try:
        then(result, failure)
    except Exception:
        logger.exception("handling the stored outcome of todo %s failed", outcome.claim.todo_id,
                         extra={"action": "finish", "todo_id": outcome.claim.todo_id})
