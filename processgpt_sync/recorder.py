"""Turn a finished executor call into its recorded outcome.

Result, failure, question or cancel: each is written once, through the group-commit writer,
after the todo's remaining events; nothing is written for a todo that is no longer ours.
It never runs user code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import (
    NoResultError,
    PayloadError,
    ProcessGPTSyncError,
    ServerFailed,
    StorageError,
    StorageUnavailable,
)
from .event_writer import EventBuffer, log_rejected
from .infra import infrastructure_problem
from .models import AwaitingHuman
from .outcomes import Outcome, OutcomeWriter, Stored
from .payload import error_text, snapshot_json, unwrap_text
from .retrying import (
    HELD_ROW_WARN_AFTER,
    STATEMENT_TIMEOUT,
    TIMEOUTS_ALONE_MAX,
    UNANSWERED_ALONE_MAX,
    backoff,
    held_back_wait,
)
from .runs import UNSET, TodoRun
from .storage.base import Storage, WriteOutcome

T = TypeVar("T")
NO_RESULT = (
    "executor returned without a result: return a value, or call events.result(data) "
    "before returning"
)


class Recorder:
    """Records the outcomes of one server's todos."""

    def __init__(
        self,
        storage: Storage,
        outcomes: OutcomeWriter,
        buffer: EventBuffer,
        *,
        log: logging.Logger,
        extra: dict[str, Any],
        count: Callable[..., None],
        on_run_time: Callable[[float], None],
        abort: threading.Event,
        stopping: threading.Event | None = None,
        defer: Callable[..., None] | None = None,
    ) -> None:
        """:param stopping: set when the server's stop begins: a give-back waiting for a held
        process instance stops asking, so the stop's time goes to the outcomes on their way.
        :param defer: runs a call on a pool thread (``WorkerPool.submit``); given when
        async todos share one event loop, whose drafts are then written off that loop."""
        self._defer = defer
        self._storage = storage
        self._outcomes = outcomes
        self._buffer = buffer
        self._log = log
        self._extra = extra
        self._count = count
        self._on_run_time = on_run_time
        self._abort = abort
        self._stopping = stopping or abort

    def _todo_extra(self, run: TodoRun, action: str) -> dict[str, Any]:
        return {**self._extra, "action": action, "todo_id": run.todo_id}

    def finish(self, run: TodoRun, value: Any, error: BaseException | None,
               then: Callable[[], None]) -> None:
        """Record what the executor's return ``value`` or ``error`` amounts to, unless the
        todo's outcome was already decided (timeout, shutdown) or it is no longer ours.
        Returns once the write is handed to the outcome writer; ``then()`` runs once it is
        recorded (on the writer's thread), or could not be; for a run the timeout closed,
        never (the timeout's own write lets it go). If this raises, it has not run."""
        if not run.close():
            self._raised_after_the_end(run, error)
            if run.cancel_reason != "timeout":
                then()  # given back as the server stops: the stop writes that
            # else the timeout's failure, being written, lets the run go once it is: until
            # then the run stays in flight (its lease renewed, the stop waiting for it)
            return
        reason = run.cancel_reason
        if reason in ("cancelled", "lost", "deleted", "shutdown"):
            self._raised_after_the_end(run, error)
        if reason == "cancelled":
            self.discard_events(run)
            self.release(run)
            self._count("cancelled")
            self._log.info("todo %s cancelled in the database (the UI, a person's submit, "
                           "its process deleted for good)", run.todo_id,
                           extra=self._todo_extra(run, "cancelled"))
            then()
            return
        if reason in ("lost", "deleted"):
            self.discard_events(run)
            self._count("lost")
            self._log.warning("todo %s: %s; its writes are dropped", run.todo_id,
                              "its row was deleted (as with its tenant)" if reason == "deleted"
                              else "lease lost to another worker",
                              extra=self._todo_extra(run, "lost"))
            then()
            return
        if reason == "shutdown":
            then()  # stop() gives it back
            return
        if error is not None:
            if run.claim.unreadable is None:  # else no executor ran: the worker said why
                self._log.warning("executor failed on todo %s: %s", run.todo_id,
                                  error_text(error), exc_info=error,
                                  extra=self._todo_extra(run, "execute"))
            self.fail_then(run, error_text(error), then)
            return
        if isinstance(value, AwaitingHuman):
            self._record_asked(run, then, draft=self._asked_draft(run, value.draft))
            return
        result = run.final_result if value is None or value is UNSET else value
        if isinstance(result, str):
            result = unwrap_text(result)
        try:
            if result is UNSET or result is None:
                raise NoResultError(NO_RESULT)
            result = snapshot_json(result, what="result")
        except (NoResultError, PayloadError) as exc:
            self.fail_then(run, str(exc), then)
            return
        self._record_result(run, result, then)

    def _raised_after_the_end(self, run: TodoRun, error: BaseException | None) -> None:
        """What the executor raised once its todo's outcome was decided (a cancel, a lost
        lease, a stop, its timeout) is not its outcome, but said: a bug as it unwinds, or why
        it hung. Its cancellation itself is not."""
        if error is None or isinstance(error, (asyncio.CancelledError,
                                               concurrent.futures.CancelledError)):
            return
        if isinstance(error, ProcessGPTSyncError):  # ours, raised into it to end a wait
            self._log.debug("todo %s had ended (%s) when its executor raised: %s",
                            run.todo_id, run.cancel_reason, error_text(error),
                            extra=self._todo_extra(run, "execute"))
            return
        self._log.info("todo %s had ended (%s) when its executor raised: %s", run.todo_id,
                       run.cancel_reason, error_text(error), exc_info=error,
                       extra=self._todo_extra(run, "execute"))

    @staticmethod
    def suspend(run: TodoRun, question: dict[str, Any]) -> Any:
        """``todo.suspend_for_human``: the question is written already; the outcome releases
        the lease and the todo waits in the database (HUMAN_ASKED)."""
        return AwaitingHuman(question=question)

    def _record_result(self, run: TodoRun, result: Any, then: Callable[[], None], *,
                       events: list[dict[str, Any]] | None = None,
                       held_back: list[dict[str, Any]] | None = None) -> None:
        """Store the result with the todo's events; refused, the result alone (an event the
        database cannot take must not cost the result); refused again, the failure, with the
        events if the database takes them then."""
        events = self._take_events(run) if events is None else events

        def refused(problem: Any) -> None:  # record why, not nothing
            if events:
                self._log.error("events of todo %s could not be stored (%s); storing its "
                                "result without them", run.todo_id, problem,
                                extra=self._todo_extra(run, "save_result"))
                self._record_result(run, result, then, events=[], held_back=events)
                return
            self._log.error("result of todo %s could not be stored: %s", run.todo_id,
                            problem, extra=self._todo_extra(run, "save_result"))
            self.fail_then(run, f"result could not be stored: {problem}", then,
                           events=held_back or [])

        self._outcomes.submit(Outcome(run.claim, "completed", result=result, events=events),
                              self._after_write(run, events, "completed", then, refused))

    def _asked_draft(self, run: TodoRun, draft: Any) -> Any:
        """The draft that goes with a suspend, as JSON; one that cannot be stored is left out
        (said in the log): the question still waits for its answer."""
        if draft is None:
            return None
        try:
            return snapshot_json(unwrap_text(draft) if isinstance(draft, str) else draft,
                                 what="draft")
        except Exception as exc:  # PayloadError, or anything else turning it into JSON
            self._log.warning("draft of todo %s not stored with its question: %s",
                              run.todo_id, exc, extra=self._todo_extra(run, "asked"))
            return None

    def _record_asked(self, run: TodoRun, then: Callable[[], None], *,
                      events: list[dict[str, Any]] | None = None, draft: Any = None) -> None:
        """Store the suspend with the todo's events; refused, with its question alone (an
        a2a executor's ``input_required`` travels with the suspend; ``suspend_for_human``
        wrote its own already), so that the todo waits for its answer, not for its lease;
        the question itself (or a suspend with nothing to leave out) refused, the todo is
        recorded FAILED with why: nobody could answer a question nobody sees, and a todo
        left to its lease would run and be refused again."""
        events = self._take_events(run) if events is None else events

        def refused(problem: Any) -> None:
            questions = [e for e in events if e.get("event_type") == "human_asked"]
            if len(questions) == len(events) and draft is not None:  # the draft may be why
                self._log.error("the suspend of todo %s could not be stored with its draft "
                                "(%s); suspending it without", run.todo_id, problem,
                                extra=self._todo_extra(run, "asked"))
                self._record_asked(run, then, events=events)
                return
            if len(questions) == len(events):
                with_question = " with its question" if questions else ""
                self._log.error("the suspend of todo %s%s could not be stored (%s); recording "
                                "it failed", run.todo_id, with_question, problem,
                                extra=self._todo_extra(run, "asked"))
                self.fail_then(run, f"its suspend{with_question} could not be stored: "
                               f"{problem}", then, events=[])
                return
            self._log.error("events of todo %s could not be stored (%s); suspending it %s",
                            run.todo_id, problem,
                            "with its question alone" if questions else "without them",
                            extra=self._todo_extra(run, "asked"))
            self._record_asked(run, then, events=questions, draft=draft)

        self._outcomes.submit(Outcome(run.claim, "asked", result=draft, events=events),
                              self._after_write(run, events, "asked", then, refused))

    def fail_then(self, run: TodoRun, message: str, then: Callable[[], None], *,
                  events: list[dict[str, Any]] | None = None) -> None:
        """Record ``run`` failed with ``message`` and its events; if the events are refused,
        the failure without them. ``then()`` runs once that is recorded, or could not be."""
        events = self._take_events(run) if events is None else events

        def without_events(outcome: WriteOutcome | None, failure: BaseException | None) -> None:
            try:
                self._written(run, outcome, failure, [], "failed")
            finally:
                then()

        def refused(problem: Any) -> None:
            self._log.error("events of todo %s could not be stored (%s); recording the "
                            "failure without them", run.todo_id, problem,
                            extra=self._todo_extra(run, "fail"))
            self._outcomes.submit(Outcome(run.claim, "failed", error=message), without_events)

        self._outcomes.submit(
            Outcome(run.claim, "failed", error=message, events=events),
            self._after_write(run, events, "failed", then, refused if events else None))

    def _after_write(self, run: TodoRun, events: list[dict[str, Any]], kind: str,
                     then: Callable[[], None],
                     refused: Callable[[Any], None] | None) -> Stored:
        """What runs once an outcome's write ended: count and log it; or, when the database
        refused it (and ``refused`` is given), ``refused(problem)``, which writes something
        else and runs ``then()`` itself once that ends. Otherwise ``then()`` runs here, even
        if a step before it raised."""

        def stored(outcome: WriteOutcome | None, failure: BaseException | None) -> None:
            handed_on = False
            try:
                problem = self._refusal(outcome, failure)
                if refused is None or problem is None:
                    self._written(run, outcome, failure, events, kind)
                    return
                refused(problem)
                handed_on = True
            finally:
                if not handed_on:
                    then()

        return stored

    @staticmethod
    def _refusal(outcome: WriteOutcome | None, failure: BaseException | None) -> Any:
        """Why the database refused a write (an error, not an outage), or None. Not the
        server's own failure (its writer died) nor the host's (no file descriptor, no
        thread): those refused nothing, so nothing is stored without its events or recorded
        FAILED for them; the todo's lease expires and it runs again."""
        if failure is not None and not isinstance(failure, StorageUnavailable | ServerFailed) \
                and infrastructure_problem(failure) is None:
            return failure
        if outcome is not None and outcome.reason == "error":
            return outcome.error
        return None

    def _written(self, run: TodoRun, outcome: WriteOutcome | None,
                 failure: BaseException | None, events: list[dict[str, Any]],
                 counter: str) -> None:
        """Count and log a stored outcome; log one that could not be stored (an outage while
        the server exits now, or a refusal left after the fallbacks above)."""
        if outcome is None:
            self._log.error("the %s outcome of todo %s could not be recorded: %s", counter,
                            run.todo_id, failure, extra=self._todo_extra(run, counter))
            return
        log_rejected(events, outcome.rejected)
        if outcome.applied:
            self._count(counter)
            self._count("events_written", len(events) - len(outcome.rejected))
            seconds = time.monotonic() - run.started
            self._on_run_time(seconds)
            if self._log.isEnabledFor(logging.INFO):
                self._log.info("todo %s %s in %.2fs", run.todo_id, counter, seconds,
                               extra=self._todo_extra(run, counter))
        elif outcome.reason == "cancelled":  # the write met the UI's cancel: the todo ended so
            self._count("cancelled")
            self._log.info("todo %s cancelled by the UI before its outcome was written; %s "
                           "not stored", run.todo_id, counter,
                           extra=self._todo_extra(run, "cancelled"))
        else:
            self._count("lost")
            why = "its row was deleted" if outcome.reason == "missing" else outcome.reason
            self._log.warning("todo %s: %s write refused (%s); its %d unwritten events were "
                              "dropped", run.todo_id, counter, why, len(events),
                              extra=self._todo_extra(run, counter))

    def save_intermediate(self, run: TodoRun, data: Any) -> None:
        """events.result(data, final=False): written now, after the todo's earlier events. On
        the shared event loop (which serves every async todo) a pool thread writes it instead,
        and only the latest of a todo's drafts still waiting (a streamed artifact sends one
        per chunk): a slow or unreachable database never stalls the loop. Those drafts go
        alone; the todo's events go with its next write as ever."""
        if self._defer is not None and _on_event_loop():
            self._save_later(run, data)
            return
        self._save_draft(run, data)

    def _save_later(self, run: TodoRun, data: Any) -> None:
        with run.lock:
            run.pending_draft = data
            if run.draft_scheduled:
                return
            run.draft_scheduled = True
        assert self._defer is not None
        try:
            self._defer(self._write_pending_drafts, run)
        except RuntimeError as exc:  # the pool is shut down, or no thread: the next one may
            with run.lock:
                run.draft_scheduled = False
            self._draft_not_written(run, exc)

    def _write_pending_drafts(self, run: TodoRun) -> None:
        while True:
            with run.lock:
                data, run.pending_draft = run.pending_draft, UNSET
                if data is UNSET:
                    run.draft_scheduled = False
                    return
            try:
                self._save_draft(run, data, deferred=True)
            except StorageUnavailable as exc:  # superseded by the next draft or the result
                self._draft_not_written(run, exc)
            except Exception:
                self._log.exception("writing a draft of todo %s failed", run.todo_id,
                                    extra=self._todo_extra(run, "save_draft"))

    def _save_draft(self, run: TodoRun, data: Any, *, deferred: bool = False) -> None:
        """Write one draft. Inline, with the todo's waiting events and retried through
        outages, as the executor's own call. Deferred, alone and tried once: it may meet the
        todo's outcome, which must not be refused its events, and a pool thread must not sit
        out an outage for a value the next draft or the result replaces."""
        if not run.is_open():
            return
        if deferred:
            outcome = self._storage.save_result(run.claim, data, final=False, events=[])
            if not outcome.applied and run.is_open():
                self._log.warning("draft of todo %s refused (%s)", run.todo_id,
                                  outcome.reason, extra=self._todo_extra(run, "save_draft"))
            return
        events: list[dict[str, Any]] = []
        try:
            with run.clock_stopped():  # taking the events waits for a write of them under way
                events = self._buffer.take(run.todo_id, run.claim.token, ids=True)
                outcome = self.retry(
                    lambda: self._storage.save_result(run.claim, data, final=False,
                                                      events=events),
                    run, "save_draft", for_executor=True,
                )
        except StorageUnavailable as exc:  # its events go out with the todo's next write
            self._buffer.give_back(run.todo_id, run.claim.token, events)
            if not run.is_open():  # nothing the executor does now is recorded
                self._log.info("draft of todo %s not written: the todo ended (%s) while the "
                               "database was unavailable", run.todo_id, run.cancel_reason,
                               extra=self._todo_extra(run, "save_draft"))
                return
            if self._abort.is_set():
                raise
            self._log.warning("draft of todo %s dropped: writing it ran past the statement "
                              "timeout %d times, or got no answer %d times (%s); the next "
                              "draft or its result will be written", run.todo_id,
                              TIMEOUTS_ALONE_MAX, UNANSWERED_ALONE_MAX, exc,
                              extra=self._todo_extra(run, "save_draft"))
            return
        except StorageError as exc:  # refused, not an outage: nothing the executor did wrong
            self._buffer.give_back(run.todo_id, run.claim.token, events)
            self._log.warning("draft of todo %s refused with %d events (%s); writing it alone, "
                              "they follow on their own", run.todo_id, len(events), exc,
                              extra=self._todo_extra(run, "save_draft"))
            try:
                with run.clock_stopped():  # the database's time, not the executor's
                    self._save_draft(run, data, deferred=True)
            except StorageError as again:
                self._draft_not_written(run, again)
            return
        except BaseException:  # not written: the events go out with the todo's next write
            self._buffer.give_back(run.todo_id, run.claim.token, events)
            raise
        log_rejected(events, outcome.rejected)
        if not outcome.applied:
            self._log.warning("draft of todo %s refused (%s)", run.todo_id, outcome.reason,
                              extra=self._todo_extra(run, "save_draft"))

    def _draft_not_written(self, run: TodoRun, why: BaseException) -> None:
        self._log.warning("draft of todo %s not written (%s); the next draft or its result "
                          "will be", run.todo_id, why, extra=self._todo_extra(run, "save_draft"))

    def _take_events(self, run: TodoRun) -> list[dict[str, Any]]:
        return self._buffer.take(run.todo_id, run.claim.token)

    def release(self, run: TodoRun) -> bool:
        """Give the todo back to the queue, retrying through outages, and again (0.5 s, 1 s,
        then every 2 s) while another transaction holds its process instance, until the server
        stops. Returns whether it was written back (else its lease is only marked given back,
        see ``processgpt_sync_give_back_held_v1``)."""
        held = 0
        warned = False
        began = time.monotonic()
        while True:
            released = self.retry(lambda: self._storage.release([run.claim]), run, "release")
            if not getattr(released, "held_back", ()):  # a Storage of its own: a count
                return True
            held += 1
            extra = self._todo_extra(run, "release")
            waited = time.monotonic() - began
            if held == 1 or (not warned and waited >= HELD_ROW_WARN_AFTER):
                warned = waited >= HELD_ROW_WARN_AFTER
                log = self._log.warning if warned else self._log.info
                log("todo %s waits to be given back: another transaction holds its process "
                    "instance (%.0fs so far)", run.todo_id, waited, extra=extra)
            if self._stopping.wait(held_back_wait(held)):
                self._log.warning("todo %s was not written back before the server stopped: "
                                  "another transaction holds its process instance; it is marked "
                                  "given back, and a server claims it once the instance is free",
                                  run.todo_id, extra=extra)
                return False

    def discard_events(self, run: TodoRun) -> None:
        """Drop the todo's unwritten events (it is no longer ours to write for), saying so."""
        dropped = self._take_events(run)
        if dropped:
            self._log.info("dropped %d unwritten events of todo %s", len(dropped), run.todo_id,
                           extra=self._todo_extra(run, "discard_events"))

    def retry(self, write: Callable[[], T], run: TodoRun, action: str, *,
              for_executor: bool = False) -> T:
        """Retry a write through database outages (capped back-off with jitter) until it is
        done; give up only when the server is told to exit now. A write the executor waits on
        (``for_executor``) also gives up once the todo ends (cancelled, timed out, lost, shut
        down) and when it ran past the statement timeout ``TIMEOUTS_ALONE_MAX`` times in a row
        (the same write would again), or got no answer within the read timeout
        ``UNANSWERED_ALONE_MAX`` times in a row: it raises the last StorageUnavailable."""
        attempt = timeouts = unanswered = 0
        while True:
            try:
                return write()
            except StorageUnavailable as exc:
                attempt += 1
                if self._abort.is_set():
                    raise
                if for_executor:
                    # each kind of timeout counted in a row; an outage says nothing of weight
                    heavy = exc.code == STATEMENT_TIMEOUT
                    unanswered = unanswered + 1 if heavy and exc.unanswered else 0
                    timeouts = timeouts + 1 if heavy and not exc.unanswered else 0
                    if (not run.is_open() or timeouts >= TIMEOUTS_ALONE_MAX
                            or unanswered >= UNANSWERED_ALONE_MAX):
                        raise
                self._log.warning("%s for todo %s failed (attempt %d), retrying: %s", action,
                                  run.todo_id, attempt, exc, extra=self._todo_extra(run, action))
                # a give-back's wait ends on an abort; the executor's write and wait on its end
                ended = (run.cancel_event if for_executor else self._abort).wait(
                    backoff(attempt, after=exc))
                if for_executor and (ended or not run.is_open()):
                    raise


def _on_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop (it serves other tasks too)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
