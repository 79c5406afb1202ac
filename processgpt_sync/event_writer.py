"""The event writer: one flusher thread writes the events of all running todos in batches.

Events are written many per SQL call, in the order each todo emitted them. A todo's last
events are taken out by the recorder and travel with its final write, so the result always
lands after them and ``crew_completed`` last. Events whose todo row another transaction holds
are set aside and sent again a little later; the other todos' events go on being written.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import StorageUnavailable
from .events import EVENT_TYPES
from .retrying import (
    HELD_ROW_WARN_AFTER,
    STATEMENT_TIMEOUT,
    TIMEOUTS_ALONE_MAX,
    UNANSWERED_ALONE_MAX,
    backoff,
)
from .storage.base import Storage

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (todo id, fencing token): one claim of a todo

HELD_RETRY_FIRST = 0.02  # seconds before events of a held todo row are sent again
HELD_RETRY_MAX = 1.0
ALONE_RETRY_MAX = 30.0  # seconds at most before an event that timed out alone is sent again
MAX_BUFFERED_EVENTS = 100_000  # unwritten events held in memory: through a long outage, the
# executors still running go on emitting; past this, their new events are dropped (and said so)
# rather than grow the process until the host kills it with every todo it runs


@dataclass
class Held:
    """A claim whose todo row another transaction held when its events were sent, or whose
    first unwritten event ran past the statement timeout alone."""

    since: float
    tries: int = 0
    logged: bool = False
    retry_at: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)  # set aside until retry_at
    alone: int = 0  # timeouts of its first event written alone: then sent alone, in a batch
    # of its own, so that its timeouts hold up no other todo's events
    timeouts: int = 0  # of those, the ones after which other events were written: it is heavy
    unanswered: int = 0  # as ``timeouts``, for read timeouts taken for statement timeouts
    timed_out_at: float | None = None


def event_key(event: Mapping[str, Any]) -> Key:
    return (event["todo_id"], event["token"])


class EventBuffer:
    """Collects events of running todos and writes them, in order, from one flusher thread.

    Queues are kept per claim (todo id and token), not per todo: a todo claimed again while an
    earlier run of it still runs here has two queues, and neither run takes the other's events.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        flush_interval: float,
        batch_size: int,
        on_written: Callable[[int], None] = lambda n: None,
        event_types: frozenset[str] = EVENT_TYPES,
        on_crash: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        """:param event_types: the event types the database accepts; events are checked against
            them when made.
        :param on_crash: called if the flusher thread dies anyway (it survives any single
            bad event), so the server can stop visibly instead of silently writing nothing."""
        self.event_types = event_types
        self._storage = storage
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._on_written = on_written
        self._on_crash = on_crash
        self._cond = threading.Condition()
        self._pending: dict[Key, list[dict[str, Any]]] = {}
        self._inflight: set[Key] = set()
        self._held: dict[Key, Held] = {}  # rows held by another transaction at the last write
        self._count = 0  # queued, not yet handed to the flusher
        self._set_aside = 0  # of held claims, waiting for their retry_at
        self._writing = 0  # handed to the flusher, write in progress
        self._oldest = 0.0
        self._written_at = 0.0  # when a write of events last went through (flusher thread)
        self._batch_began = 0.0  # when the flusher began writing its current batch
        self._batch_len = 0  # and how many events it holds
        self._closed = False
        self._dropped = 0  # events dropped since the buffer was last well under its bound
        self._idle = False  # the flusher waits with no deadline: the next event must wake it
        self._thread = threading.Thread(
            target=self._run, name="processgpt-sync-events", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        """Events accepted but not yet written, including those being written now."""
        with self._cond:
            return self._count + self._set_aside + self._writing

    def add(self, event: dict[str, Any]) -> None:
        """Queue one event for its todo; it is written within the flush interval. With
        ``MAX_BUFFERED_EVENTS`` unwritten already (a long outage), it is dropped instead, as a
        warning says at the first and every 10,000th drop."""
        with self._cond:
            pending = self._count + self._set_aside + self._writing
            full = pending >= MAX_BUFFERED_EVENTS
            if full:
                self._dropped += 1
            elif pending < 0.9 * MAX_BUFFERED_EVENTS:  # said anew only once well below it
                self._dropped = 0
            dropped = self._dropped if full else 0
            if not full:
                if self._count == 0:
                    self._oldest = time.monotonic()
                self._pending.setdefault(event_key(event), []).append(event)
                self._count += 1
                if self._idle or self._count >= self._batch_size:
                    self._idle = False
                    self._cond.notify_all()
        if dropped % 10_000 == 1:
            logger.warning("%d events wait to be written (is the database unreachable?): new "
                           "events of running todos are dropped, %d so far", MAX_BUFFERED_EVENTS,
                           dropped, extra={"action": "emit", "todo_id": event.get("todo_id")})

    def take(self, todo_id: str, token: str, *, ids: bool = False) -> list[dict[str, Any]]:
        """Remove and return the unwritten events of one claim of a todo, after any write of
        them in flight. ``ids``: give each an id, for a write that is retried without being
        idempotent itself (a draft, a question), so a retry after a lost answer skips them."""
        key = (todo_id, token)
        with self._cond:
            while key in self._inflight:
                self._cond.wait()
            held = self._held.pop(key, None)
            events = self._pending.pop(key, [])
            self._count -= len(events)
            if held is not None and held.events:
                self._set_aside -= len(held.events)
                events = held.events + events
        if ids:
            for event in events:
                event.setdefault("id", str(uuid.uuid4()))
        return events

    def give_back(self, todo_id: str, token: str, events: list[dict[str, Any]]) -> None:
        """Put events taken by ``take`` back in front of their queue (a write failed)."""
        if not events:
            return
        key = (todo_id, token)
        with self._cond:
            queue = self._pending.pop(key, [])
            self._pending = {key: events + queue, **self._pending}
            self._count += len(events)
            self._oldest = 0.0  # due now, as they were: an idle flusher is woken for them
            self._idle = False
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted event is written; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._oldest = 0.0  # due now
            self._cond.notify_all()
            while self._count or self._set_aside or self._inflight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 0.5)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the flusher thread; ``timeout`` bounds both together."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():  # a write stuck on a dead connection is left behind
            self._thread.join(5 if deadline is None else max(0.1, deadline - time.monotonic()))
        return done

    def _next_batch(self) -> list[dict[str, Any]] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                retry_in = self._bring_back_held()
                due = self._oldest + self._flush_interval - time.monotonic()
                ready = bool(self._count) and (due <= 0 or self._count >= self._batch_size)
                if ready and (batch := self._take_batch()):
                    break
                # A deadline of its own only for events not yet due. Otherwise (none pending,
                # or only newer events of set-aside claims) the next event wakes it, or a
                # set-aside claim's turn.
                wait = due if self._count and not ready else None
                self._idle = wait is None
                if retry_in is not None:
                    wait = retry_in if wait is None else min(wait, retry_in)
                self._cond.wait(wait)
                self._idle = False
            self._writing = len(batch)
            self._oldest = time.monotonic()
        # Ids make a retried write idempotent (the database skips ids it already has). Events
        # that travel with a todo's final write need none: that write is fenced and atomic
        # (a retry finds it already applied and writes nothing).
        for event in batch:
            if "id" not in event:
                event["id"] = str(uuid.uuid4())
        return batch

    def _run(self) -> None:
        try:
            self._flush_forever()
        except BaseException as exc:
            logger.critical("the event writer thread died; no more events can be written",
                            exc_info=exc, extra={"action": "write_events"})
            if self._on_crash is not None:
                self._on_crash("event writer", exc)

    def _flush_forever(self) -> None:
        attempt = 0
        while (batch := self._next_batch()) is not None:
            pause = 0.0
            try:
                self._batch_began, self._batch_len = time.monotonic(), len(batch)
                self._write(batch)
                attempt = 0
            except StorageUnavailable as exc:
                attempt += 1
                again = exc.remaining if isinstance(exc, PartlyWritten) else batch
                with self._cond:
                    closed = self._closed
                if closed:  # stop() gave up waiting on this write and closed the storage
                    logger.warning(
                        "%d events not written: the server stopped while writing them failed "
                        "(%s)", len(again), exc, extra={"action": "write_events"},
                    )
                    return
                if again:  # (else what failed was set aside, and said so)
                    logger.warning(
                        "writing %d events failed, will retry: %s", len(again), exc,
                        extra={"action": "write_events"},
                    )
                self._requeue(again)
                pause = backoff(attempt, after=exc) if again else 0.0  # (set aside: on its own)
            except Exception:  # a bug, not a bad event (those are refused one by one)
                logger.exception("writing a batch of %d events failed unexpectedly; it is not "
                                 "retried", len(batch), extra={"action": "write_events"})
            finally:
                with self._cond:
                    self._inflight.difference_update(event_key(e) for e in batch)
                    self._writing = 0
                    self._cond.notify_all()
            if pause:  # the events are queued again: a take() meanwhile has them at once
                with self._cond:  # close() ends the wait
                    self._cond.wait_for(lambda: self._closed, pause)

    def _take_batch(self) -> list[dict[str, Any]]:
        """Up to a batch of pending events, whole claims at a time (lock held)."""
        batch: list[dict[str, Any]] = []
        for key in list(self._pending):
            held = self._held.get(key)
            if key in self._inflight or (held is not None and held.events):
                continue  # a set-aside claim's events go before its newer ones
            if held is not None and held.alone:  # its first event timed out alone: alone
                if batch:
                    continue
                queue = self._pending[key]
                batch.append(queue.pop(0))
                if not queue:
                    del self._pending[key]
                self._inflight.add(key)
                self._count -= 1
                break
            events = self._pending.pop(key)
            self._inflight.add(key)
            batch.extend(events)
            self._count -= len(events)
            if len(batch) >= self._batch_size:
                break
        return batch

    def _bring_back_held(self) -> float | None:
        """Put set-aside events whose time has come back in front of their queues, due now
        (lock held); return the seconds until the next set-aside ones are due, if any."""
        now = time.monotonic()
        wait: float | None = None
        for key, held in self._held.items():
            if not held.events:
                continue
            if held.retry_at > now:
                wait = held.retry_at - now if wait is None else min(wait, held.retry_at - now)
                continue
            queue = self._pending.pop(key, [])
            self._pending = {key: held.events + queue, **self._pending}
            self._count += len(held.events)
            self._set_aside -= len(held.events)
            held.events = []
            self._oldest = 0.0
        return wait

    def _set_held_aside(self, events: list[dict[str, Any]]) -> None:
        """Events whose todo row another transaction held: set aside, each claim's to be sent
        again after a back-off (20 ms doubling to 1 s), or with its todo's outcome; a row held
        for long is logged once."""
        now = time.monotonic()
        by_claim: dict[Key, list[dict[str, Any]]] = {}
        for event in events:
            by_claim.setdefault(event_key(event), []).append(event)
        with self._cond:
            for key, claim_events in by_claim.items():
                held = self._held.setdefault(key, Held(since=now))
                if not held.tries:  # (a Held made for a timeout alone: held from now)
                    held.since = now
                held.tries += 1
                held.retry_at = now + min(HELD_RETRY_MAX,
                                          HELD_RETRY_FIRST * 2.0 ** min(held.tries - 1, 16))
                held.events = claim_events
                self._set_aside += len(claim_events)
                if not held.logged and now - held.since >= HELD_ROW_WARN_AFTER:
                    held.logged = True
                    logger.warning("the row of todo %s has been held by another transaction "
                                   "for %.0fs; its events wait for it", key[0], now - held.since,
                                   extra={"action": "write_events", "todo_id": key[0]})

    def _timed_out_alone(self, event: dict[str, Any], exc: StorageUnavailable) -> None:
        """An event written alone ran past the statement timeout: its claim's events wait, set
        aside, and it is sent again alone (back-off from 1 s doubling to 30 s) while the other
        todos' are written. A timeout after which other events were written before the next
        counts: the event is heavy (a site's slow trigger on ``events``, a huge payload), and
        at ``TIMEOUTS_ALONE_MAX`` it is dropped with a warning, its todo's later events
        following. With no other event written (a lock on the table, a database slow for every
        write) none counts, and it waits as in an outage. A read timeout taken for a statement
        timeout (``unanswered``) counts apart, against ``UNANSWERED_ALONE_MAX``."""
        todo_id = event["todo_id"]
        extra = {"action": "write_events", "todo_id": todo_id}
        now = time.monotonic()
        with self._cond:
            held = self._held.setdefault(event_key(event), Held(since=now))
            if held.timed_out_at is not None and self._written_at > held.timed_out_at:
                if exc.unanswered:
                    held.unanswered += 1
                else:
                    held.timeouts += 1
            held.timed_out_at = now
            if held.timeouts >= TIMEOUTS_ALONE_MAX or held.unanswered >= UNANSWERED_ALONE_MAX:
                del self._held[event_key(event)]  # its claim's next event counts anew
                why = (f"ran past the statement timeout {held.timeouts} times"
                       if held.timeouts >= TIMEOUTS_ALONE_MAX else
                       f"got no answer within the read timeout {held.unanswered} times")
                logger.warning("event %s of todo %s %s alone while other events were written; "
                               "not written (%s)", event.get("event_type"), todo_id, why, exc,
                               extra=extra)
                return
            held.alone += 1
            held.retry_at = now + min(ALONE_RETRY_MAX, 2.0 ** min(held.alone - 1, 16))
            held.events = [event]
            self._set_aside += 1
            first = held.alone == 1
        if first:
            logger.warning("writing event %s of todo %s ran past the statement timeout alone (%s); "
                           "that todo's events wait, the others' are written",
                           event.get("event_type"), todo_id, exc, extra=extra)

    def _hold_behind(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Of the second half of a batch, set aside the events of the todo whose earlier ones
        the first half had to set aside (its row is held): after them, not written before
        them. The others are returned, to be written now."""
        with self._cond:
            rest = []
            for event in events:
                held = self._held.get(event_key(event))
                if held is not None and held.events:
                    held.events.append(event)
                    self._set_aside += 1
                else:
                    rest.append(event)
            return rest

    def _requeue(self, batch: list[dict[str, Any]]) -> None:
        """Put events that could not be written back in front, due at the next try (they
        were due already: a flush interval more is not theirs to wait)."""
        by_claim: dict[Key, list[dict[str, Any]]] = {}
        for event in batch:
            by_claim.setdefault(event_key(event), []).append(event)
        with self._cond:
            for key, events in by_claim.items():
                queue = self._pending.pop(key, [])
                self._pending = {key: events + queue, **self._pending}
            self._count += len(batch)
            self._writing = 0
            self._oldest = 0.0

    def _write(self, batch: list[dict[str, Any]]) -> None:
        try:
            rejected = self._storage.record_events(batch)
        except StorageUnavailable as exc:
            if exc.code == STATEMENT_TIMEOUT and len(batch) == 1:
                self._timed_out_alone(batch[0], exc)
                if self._batch_len > 1 and self._written_at < self._batch_began:  # nothing
                    # of this batch went through: the rest waits as in an outage, not each
                    # claim's timeout in turn (an event sent again alone is a batch of one)
                    raise PartlyWritten(str(exc), [], code=exc.code) from exc
                return
            halves = _halves(batch) if exc.code == STATEMENT_TIMEOUT else None
            if halves is None:
                raise
            # Ended at the statement timeout (slow site triggers, heavy events): the same
            # batch would be again. Halves go in order; if a later part cannot be written,
            # only what is not written yet goes back to be sent again.
            logger.warning("writing %d events ran past the statement timeout; writing them in "
                           "halves", len(batch), extra={"action": "write_events"})
            first, second = halves
            try:
                self._write(first)  # a plain outage here: nothing of the batch was written
            except PartlyWritten as part:
                raise PartlyWritten(str(part), part.remaining + second, code=part.code) from part
            rest = self._hold_behind(second)
            try:
                if rest:
                    self._write(rest)
            except PartlyWritten:
                raise
            except StorageUnavailable as later:
                raise PartlyWritten(str(later), rest, code=later.code) from later
            return
        except Exception as exc:  # StorageError, or an event the driver cannot encode
            # One malformed event must not lose the others: write them one at a time.
            logger.warning(
                "event batch refused (%s); writing its %d events one by one", exc, len(batch),
                extra={"action": "write_events"},
            )
            rejected = write_one_by_one(self._storage, batch, self._timed_out_alone)
        waiting = [batch[int(r["index"])] for r in rejected
                   if r.get("reason") in ("timed_out", "behind", "later")]
        if waiting:  # the one that timed out was set aside (or given up): its todo's follow it
            self._requeue(self._hold_behind(
                [batch[int(r["index"])] for r in rejected if r.get("reason") == "behind"])
                + [batch[int(r["index"])] for r in rejected if r.get("reason") == "later"])
            rejected = [r for r in rejected
                        if r.get("reason") not in ("timed_out", "behind", "later")]
        held = [batch[int(r["index"])] for r in rejected if r.get("reason") == "busy"]
        if held:
            rejected = [r for r in rejected if r.get("reason") != "busy"]
            self._set_held_aside(held)
        if self._held:  # claims written now are no longer held
            with self._cond:
                for key in ({event_key(e) for e in batch}
                            - {event_key(e) for e in [*held, *waiting]}):
                    self._held.pop(key, None)
        log_rejected(batch, rejected)
        written = len(batch) - len(rejected) - len(held) - len(waiting)
        if written:
            self._written_at = time.monotonic()
        self._on_written(written)


class PartlyWritten(StorageUnavailable):
    """A batch written in halves failed after its first half was written (or set aside):
    only ``remaining`` is to be sent again."""

    def __init__(self, message: str, remaining: list[dict[str, Any]], *,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.remaining = remaining


def write_one_by_one(storage: Storage, batch: list[dict[str, Any]],
                     timed_out: Callable[[dict[str, Any], StorageUnavailable], None] | None = None
                     ) -> list[Mapping[str, Any]]:
    """Write ``batch`` an event at a time, after the database refused it whole (a site's
    trigger, an event the driver cannot encode): one bad event must not lose the others. The
    refused, as {index, reason}; 'busy' ones (their todo's row held) and the later events of
    their todo are to be sent again. One that runs past the statement timeout goes to
    ``timed_out`` (reason 'timed_out'), and its todo's later events wait behind it ('behind');
    if none was written before it (the database may be slow for every write), the rest go back
    to be sent again ('later') rather than each wait out the timeout in turn. Without
    ``timed_out`` it raises, as an outage does: what was written is not written twice (events
    carry their ids)."""
    rejected: list[Mapping[str, Any]] = []
    busy: set[Key] = set()  # a claim's later events wait with its first held one
    behind: set[Key] = set()  # or behind its first that timed out
    written = stopped = False
    for index, event in enumerate(batch):
        if event_key(event) in busy:
            rejected.append({"index": index, "reason": "busy"})
            continue
        if event_key(event) in behind:
            rejected.append({"index": index, "reason": "behind"})
            continue
        if stopped:
            rejected.append({"index": index, "reason": "later"})
            continue
        try:
            answers = storage.record_events([event])
        except StorageUnavailable as exc:
            if timed_out is None or exc.code != STATEMENT_TIMEOUT:
                raise
            timed_out(event, exc)  # else the same batch is refused, and times out, for ever
            behind.add(event_key(event))
            rejected.append({"index": index, "reason": "timed_out"})
            stopped = not written
            continue
        except Exception as single:
            answers = [{"index": 0, "reason": str(single)}]
        written = written or not answers
        for answer in answers:
            rejected.append({**answer, "index": index})
            if answer.get("reason") == "busy":
                busy.add(event_key(event))
    return rejected


def _halves(batch: list[dict[str, Any]]
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """``batch`` in two, about half each, in order: on a boundary between claims where it has
    several, so that a claim's events go together; else the one claim's in two (None for a
    single event)."""
    sizes = Counter(event_key(e) for e in batch)  # in the order of the claims' first events
    if len(sizes) < 2:
        half = len(batch) // 2
        return (batch[:half], batch[half:]) if half else None
    firsts: set[Key] = set()
    count = 0
    for key in list(sizes)[:-1]:
        firsts.add(key)
        count += sizes[key]
        if count >= len(batch) // 2:
            break
    return ([e for e in batch if event_key(e) in firsts],
            [e for e in batch if event_key(e) not in firsts])


def log_rejected(batch: list[dict[str, Any]], rejected: list[Mapping[str, Any]]) -> None:
    """Log each event the database refused, naming its todo, type and reason."""
    for item in rejected:
        event = batch[int(item["index"])]
        logger.warning(
            "event %s of todo %s not written: %s", event.get("event_type"), event.get("todo_id"),
            item.get("reason"),
            extra={"action": "write_events", "todo_id": event.get("todo_id")},
        )
