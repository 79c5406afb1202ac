"""Asking a person from blocking code: write the question, wait for the answer, resume.

``todo.ask_human(...)`` blocks the worker thread (the lease stays alive) until the ProcessGPT UI
writes a ``human_response`` event with the question's job_id; a NOTIFY wakes the waiter at once
(polling with back-off where there is no LISTEN). ``todo.suspend_for_human(...)`` frees the
worker instead: the todo waits in the database and runs again with ``resume.kind ==
"human_answer"`` once answered, even after a restart.

This module talks to the database for questions and answers; it never runs user code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from .errors import HumanTimeout, ProcessGPTSyncError, StorageError, StorageUnavailable
from .event_writer import EventBuffer, log_rejected, write_one_by_one
from .models import NO_DEFAULT
from .payload import check_json
from .retrying import backoff
from .runs import TodoRun
from .storage.base import Storage, WriteOutcome

logger = logging.getLogger(__name__)

ANSWER_CHANNEL = "processgpt_sync_answer"
KINDS = ("text", "select", "confirm")
__all__ = ["NO_DEFAULT", "HumanDesk", "SuspendForHuman", "answer_value", "question_data"]
POLL_MAX = 1.0  # seconds between answer checks when no NOTIFY arrives
CALL_TRIES = 8  # tries of a call the executor waits on before the outage reaches it


class SuspendForHuman(BaseException):
    """Raised by ``todo.suspend_for_human`` once the question is written: the todo waits in the
    database for its answer.

    A BaseException so an executor's ``except Exception`` does not swallow it.
    """

    def __init__(self, question: Mapping[str, Any], job_id: str) -> None:
        super().__init__(question.get("question"))
        self.question = dict(question)
        self.job_id = job_id


def question_data(question: str, options: list[Any] | None, kind: str) -> dict[str, Any]:
    """The ``human_asked`` event data, shaped as the ProcessGPT UI reads it."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question must be a non-empty string")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if options is not None and (isinstance(options, (str, bytes, Mapping))
                                or not isinstance(options, Sequence)):
        raise ValueError(f"options must be a list, not {type(options).__name__} {options!r}")
    options = None if options is None else list(options)
    if kind == "select" and not options:
        raise ValueError("kind='select' needs options")
    signature = hashlib.sha256(
        json.dumps([question, options, kind], sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()[:32]
    data = {"role": "agent", "question": question, "text": question, "type": kind,
            "options": options, "signature": signature}
    return check_json(data, what="question")  # type: ignore[no-any-return]


def answer_value(data: Any, status: str | None = None, kind: str = "text") -> Any:
    """The answer itself from a ``human_response`` event's data (``data.answer`` by contract).

    A confirm question's answer is whether the person confirmed: the UI's Cancel writes status
    REJECTED with the text ``"rejected"`` (or what they typed), which as text would read true.
    """
    answer = data["answer"] if isinstance(data, Mapping) and "answer" in data else data
    if kind != "confirm":
        return answer
    if status == "REJECTED":
        return False
    return answer if isinstance(answer, bool) else True


class HumanDesk:
    """Questions in flight for one server, and the waiters the listener wakes."""

    def __init__(self, storage: Storage, buffer: EventBuffer,
                 is_listening: Callable[[], bool],
                 cancel: Callable[[TodoRun, str], None]) -> None:
        self._storage = storage
        self._cancel = cancel
        self._buffer = buffer
        self._is_listening = is_listening
        self._lock = threading.Lock()
        # job id → (todo id, event) of each thread waiting on it: two tool calls of one todo
        # may wait on the same open question at once
        self._waiters: dict[str, list[tuple[str, threading.Event]]] = {}

    def notify(self, job_id: str) -> None:
        """An answer for ``job_id`` was written (NOTIFY)."""
        with self._lock:
            waiting = list(self._waiters.get(job_id, ()))
        for _, event in waiting:
            event.set()

    def wake(self, todo_id: str) -> None:
        """The todo was cancelled: wake its waiters so they see it."""
        with self._lock:
            events = [event for waiting in self._waiters.values()
                      for owner, event in waiting if owner == todo_id]
        for event in events:
            event.set()

    def ask(self, run: TodoRun, question: str, *, options: list[Any] | None, kind: str,
            timeout: float = 300.0, default: Any = NO_DEFAULT, suspend: bool = False) -> Any:
        """Write the question (after the todo's pending events) and return its answer: the
        earlier one when this todo asked the same question before, else the one that arrives
        (blocking), else raise SuspendForHuman (``suspend``: the worker is freed)."""
        data = question_data(question, options, kind)
        check_timeout(timeout)
        if not run.is_open():  # cancelled, timed out, lost, stopping: nothing more is written
            why = run.cancel_reason or "its outcome is decided"
            raise ProcessGPTSyncError(f"todo {run.todo_id} is no longer running here ({why}): "
                                      "its question is not asked")
        new_job_id = f"human_asked_{uuid.uuid4()}"
        asked = self._ask(run, new_job_id, data)
        if not asked.applied:
            self._refused(run, asked.reason)
        if asked.reason == "answered_before":
            return answer_value(asked.answer, asked.answer_status, kind)
        job_id = asked.job_id or new_job_id  # 'asked_before': wait for the open one
        if suspend:
            raise SuspendForHuman(data, job_id)
        waiter = threading.Event()
        mine = (run.todo_id, waiter)
        with self._lock:
            self._waiters.setdefault(job_id, []).append(mine)
        try:
            return self._wait(run, job_id, waiter, question, kind, timeout, default)
        finally:
            with self._lock:
                waiting = self._waiters[job_id]
                waiting.remove(mine)
                if not waiting:
                    del self._waiters[job_id]

    def _ask(self, run: TodoRun, job_id: str, data: dict[str, Any]) -> WriteOutcome:
        """Write the question after the todo's pending events. Refused with them (a site's
        trigger on ``events``), they are written one at a time, the refused one dropped with
        a warning, and then the question: an event the database will not take is not the
        executor's failure, nor does it cost the other events."""
        with run.clock_stopped():  # waiting for a write of them under way: the database's
            events = self._buffer.take(run.todo_id, run.claim.token, ids=True)
        try:
            if not run.is_open():  # it ended meanwhile (its timeout, a cancel)
                raise ProcessGPTSyncError(f"todo {run.todo_id} is no longer running here "
                                          f"({run.cancel_reason}): its question is not asked")
            asked = self._ask_with(run, job_id, data, events)
            if not isinstance(asked, StorageError):
                return asked
            logger.warning("question of todo %s refused with %d events (%s); writing them one "
                           "by one, then the question", run.todo_id, len(events), asked,
                           extra={"action": "ask", "todo_id": run.todo_id})
            rejected = self._call(run, "write_events",
                                  lambda: write_one_by_one(self._storage, events))
        except BaseException:  # not written: the events go out with the todo's next write
            self._buffer.give_back(run.todo_id, run.claim.token, events)
            raise
        log_rejected(events, [r for r in rejected if r.get("reason") != "busy"])
        # those of a row held a moment ago go with the question, which waits for the row
        held = [events[int(r["index"])] for r in rejected if r.get("reason") == "busy"]
        try:
            asked = self._ask_with(run, job_id, data, held)
        except BaseException:
            self._buffer.give_back(run.todo_id, run.claim.token, held)
            raise
        if isinstance(asked, StorageError):  # refused with them: they follow on their own
            self._buffer.give_back(run.todo_id, run.claim.token, held)
            asked = self._ask_with(run, job_id, data, [])
        assert not isinstance(asked, StorageError)  # with no events, a refusal raises
        return asked

    def _ask_with(self, run: TodoRun, job_id: str, data: dict[str, Any],
                  events: list[dict[str, Any]]) -> WriteOutcome | StorageError:
        """The question written with ``events``; or why the database refused it with them
        (with none, that raises)."""
        try:
            asked: WriteOutcome = self._call(run, "ask", lambda: self._storage.ask(
                run.claim, job_id, data, events=events))
        except StorageError as exc:
            if not events or isinstance(exc, StorageUnavailable):
                raise
            return exc
        log_rejected(events, asked.rejected)
        return asked

    def _wait(self, run: TodoRun, job_id: str, waiter: threading.Event, question: str,
              kind: str, timeout: float, default: Any) -> Any:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if run.cancel_event.is_set():
                raise ProcessGPTSyncError(f"todo {run.todo_id} was cancelled while waiting for "
                                          "an answer")
            # through an outage the check is tried until the person's time is up, not given up
            # after a few tries: a database failover must not end every question waiting
            got = self._call(run, "answer", lambda: self._storage.answer(run.claim, job_id),
                             until=deadline)
            if not got.applied:
                self._refused(run, got.reason)
            if got.reason == "answered":
                return answer_value(got.answer, got.answer_status, kind)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._call(run, "resume_asking",
                           lambda: self._storage.resume_asking(run.claim))
                # an answer that came between the last check and the todo's resuming is the
                # person's answer all the same: one more check, now that no new one is awaited
                got = self._call(run, "answer", lambda: self._storage.answer(run.claim, job_id))
                if not got.applied:
                    self._refused(run, got.reason)
                if got.reason == "answered":
                    return answer_value(got.answer, got.answer_status, kind)
                if default is not NO_DEFAULT:
                    return default
                raise HumanTimeout(f"no answer within {timeout:g} s to: {question}")
            pause = POLL_MAX if self._is_listening() else delay
            waiter.wait(min(remaining, pause))
            waiter.clear()
            delay = min(delay * 2, POLL_MAX)

    def _refused(self, run: TodoRun, reason: str) -> NoReturn:
        """The database says this worker no longer runs the todo: tell the server, stop."""
        self._cancel(run, {"cancelled": "cancelled", "missing": "deleted"}.get(reason, "lost"))
        raise ProcessGPTSyncError(f"todo {run.todo_id} is no longer running here ({reason})")

    @staticmethod
    def _call(run: TodoRun, action: str, request: Callable[[], Any], *,
              until: float | None = None) -> Any:
        """``request()``, retried through a short outage, or until ``until`` (monotonic): then
        StorageUnavailable reaches the executor, and the todo is given back unless the
        executor handles it. A todo that ends meanwhile (cancelled, lost, stopping) raises
        ProcessGPTSyncError, not the outage: what ended it decides its outcome. Its time is
        the database's: the todo's timeout does not count it (the wait for the answer does)."""
        attempt = 0
        with run.clock_stopped():
            while True:
                try:
                    return request()
                except StorageUnavailable as exc:
                    attempt += 1
                    if attempt >= CALL_TRIES and (until is None or time.monotonic() >= until):
                        raise
                    logger.warning("%s for todo %s failed (attempt %d), retrying: %s", action,
                                   run.todo_id, attempt, exc,
                                   extra={"action": action, "todo_id": run.todo_id})
                    if run.cancel_event.wait(backoff(attempt, after=exc)):
                        raise ProcessGPTSyncError(
                            f"todo {run.todo_id} ended ({run.cancel_reason}) while {action} "
                            f"waited for the database ({exc})") from exc


def check_timeout(timeout: Any) -> None:
    """Refuse a timeout no wait could honour, before the question is written: the executor's
    mistake, said as such, rather than a question left open and a todo failed later."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"ask_human timeout must be a number of seconds (math.inf for no "
                        f"limit), not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"ask_human timeout must be more than 0 seconds, not {timeout!r}")
