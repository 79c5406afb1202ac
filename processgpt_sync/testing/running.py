"""Send one todo through a real server and record what happened.

:func:`run_todo` enqueues the todo, starts a real :class:`~processgpt_sync.Server` on the
database with one worker, answers questions as the ProcessGPT UI would, cancels when asked to,
and returns a :class:`TodoRecord` once the todo has settled. It waits on the server's own
database calls (each one wakes the runner, which then reads the todo), never on sleeps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..errors import ConfigurationError, ProcessGPTSyncError
from ..models import Resume
from ..server import Server
from ..settings import Settings
from ..storage.base import claims_from_answer
from ..storage.postgres import PostgresStorage
from .databases import fresh_database

AGENT_ORCH = "processgpt-sync-test"
FINAL = ("COMPLETED", "FAILED", "CANCELLED")
NO_ANSWER: Any = object()
"""The answer that leaves a question unanswered on purpose, in a list, a mapping or from a
function: a suspended todo then ends the run waiting, and a blocking ``ask_human`` waits out
its own ``timeout`` (its default or ``HumanTimeout``); make that timeout shorter than the
run's."""

Answers = Sequence[Any] | Mapping[str, Any] | Callable[["Question"], Any] | None
EventPredicate = Callable[[list["Event"]], bool]


@dataclass(frozen=True)
class Event:
    """One row of ``events`` written for the todo."""

    type: str
    data: Any
    job_id: str | None
    crew_type: str | None
    status: str | None


@dataclass(frozen=True)
class Question:
    """A ``human_asked`` event and its answer, if one was given."""

    job_id: str
    data: Any
    answer: Any = None
    answered: bool = False

    @property
    def text(self) -> str:
        """The question's text: ``data.question`` (or ``data.text``), else the data itself."""
        if isinstance(self.data, Mapping):
            return str(self.data.get("question") or self.data.get("text") or self.data)
        return str(self.data)


@dataclass(frozen=True)
class TodoRecord:
    """What happened to one todo, read from the database after the server stopped."""

    todo_id: str
    status: str | None
    """``todolist.status`` (SUBMITTED after a COMPLETE-mode result)."""
    draft_status: str | None
    """``todolist.draft_status``: COMPLETED, FAILED, CANCELLED, or HUMAN_ASKED when the todo
    waits for an answer nobody gave."""
    result: Any
    """``todolist.output`` in COMPLETE mode, ``todolist.draft`` in DRAFT mode."""
    log: str | None
    """``todolist.log``: the error message of a FAILED todo."""
    events: list[Event]
    """The todo's events in the order they were written."""
    questions: list[Question]
    """Every question asked, in order, with the answer given."""
    runs: list[Resume]
    """One entry per executor run: why it ran (``fresh``, ``human_answer``, ...)."""
    logs: list[str] = field(default_factory=list)
    """The server's log lines (``LEVEL message``) while the todo ran, INFO and above."""
    row: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The final ``todolist`` row."""

    @property
    def event_types(self) -> list[str]:
        return [event.type for event in self.events]

    @property
    def completed(self) -> bool:
        return self.draft_status == "COMPLETED"

    @property
    def failed(self) -> bool:
        return self.draft_status == "FAILED"

    @property
    def cancelled(self) -> bool:
        return self.draft_status == "CANCELLED"

    @property
    def waiting(self) -> bool:
        """The todo is suspended on a question that was not answered."""
        return self.draft_status == "HUMAN_ASKED"


class RunTimedOut(AssertionError):
    """The todo did not settle within the runner's ``timeout``."""


class UnansweredQuestion(AssertionError):
    """The executor blocked on ``ask_human`` and no scripted answer matched the question."""


class _ObservedStorage(PostgresStorage):
    """The real PostgreSQL backend; every call the server makes wakes the runner."""

    def __init__(self, conninfo: str,
                 on_call: Callable[[str, Mapping[str, Any], Any], None]) -> None:
        super().__init__(conninfo, max_connections=6)
        self._on_call = on_call

    def call(self, query: str, params: Mapping[str, Any]) -> Any:
        result = None
        try:
            result = super().call(query, params)
            return result
        finally:
            self._on_call(query, params, result)


class _LogLines(logging.Handler):
    """The library's log lines while one todo runs, without those about other todos (the
    executor of an earlier run that timed out may still be going)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.todo_id: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        about = getattr(record, "todo_id", None)
        if about is None or self.todo_id is None or str(about) == self.todo_id:
            self.lines.append(f"{record.levelname} {record.getMessage()}")


@contextmanager
def _capture_logs(todo_id: str) -> Iterator[list[str]]:
    library = logging.getLogger("processgpt_sync")
    handler = _LogLines()
    handler.todo_id = todo_id
    level = library.level
    if library.getEffectiveLevel() > logging.INFO:
        library.setLevel(logging.INFO)
    library.addHandler(handler)
    try:
        yield handler.lines
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


_MISSING: Any = object()  # no answer scripted for a question (NO_ANSWER: left open on purpose)


def _answer_function(answers: Answers) -> Callable[[Question], Any]:
    """The script as a function of the question: the answer, NO_ANSWER where the script leaves
    the question open on purpose, or _MISSING where it has nothing for it."""
    if answers is None:
        return lambda question: _MISSING
    if callable(answers):
        return answers
    if isinstance(answers, Mapping):
        return lambda question: answers.get(question.text, _MISSING)
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise ConfigurationError(
            f"run_todo answers must be a list (answers in the order asked), a mapping from "
            f"question text or a function of the Question, not {type(answers).__name__} "
            f"{answers!r}: for one answer pass answers=[{answers!r}]")
    queue = list(answers)
    return lambda question: queue.pop(0) if queue else _MISSING


class _Run:
    """The state of one :func:`run_todo` call."""

    def __init__(self, database_url: str, todo_id: str | None = None) -> None:
        self.database_url = database_url
        self.todo_id = todo_id
        self._cond = threading.Condition()
        self._calls = 0
        self.runs: list[Resume] = []
        self.awaited: set[str] = set()
        """job_ids of questions the executor blocks on (the server polls for their answer)."""
        self.storage = _ObservedStorage(database_url, self._on_call)

    def _on_call(self, query: str, params: Mapping[str, Any], result: Any) -> None:
        with self._cond:
            if query == "answer" and str(params.get("p_todo_id")) == self.todo_id:
                self.awaited.add(str(params.get("p_job_id")))
            if query == "claim":
                for claim in claims_from_answer(result):
                    if claim.todo_id == self.todo_id:  # as the executor sees it
                        self.runs.append(Resume.from_json(claim.extras.get("resume")))
            self._calls += 1
            self._cond.notify_all()

    def calls(self) -> int:
        with self._cond:
            return self._calls

    def is_awaited(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self.awaited

    def wait_for_call(self, seen: int, deadline: float) -> None:
        """Block until the server makes a call after the ``seen``-th one, or the deadline."""
        with self._cond:
            self._cond.wait_for(lambda: self._calls > seen, deadline - time.monotonic())


def _read(conn: psycopg.Connection[dict[str, Any]], todo_id: str) -> tuple[
        dict[str, Any], list[Event], bool]:
    row = conn.execute("SELECT * FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    if row is None:
        raise ProcessGPTSyncError(f"todo {todo_id} was deleted while it ran")
    leased = conn.execute("SELECT 1 FROM processgpt_sync_lease WHERE todo_id = %s",
                          (todo_id,)).fetchone() is not None
    events = [Event(r["event_type"], r["data"], r["job_id"], r["crew_type"], r["status"])
              for r in conn.execute(
                  'SELECT event_type::text, data, job_id, crew_type, status::text FROM events '
                  'WHERE todo_id = %s ORDER BY "timestamp", id', (todo_id,))]
    return {k: _plain(v) for k, v in row.items()}, events, leased


def _plain(value: Any) -> Any:
    """Enum and uuid columns as text, so the record compares with plain strings."""
    if value is None or isinstance(value, (str, int, float, bool, dict, list)):
        return value
    return str(value)


def _questions(events: list[Event]) -> list[Question]:
    answers = {e.job_id: e.data for e in events if e.type == "human_response"}
    questions = []
    for event in events:
        if event.type == "human_asked" and event.job_id is not None:
            answered = event.job_id in answers
            answer = answers.get(event.job_id)
            if isinstance(answer, Mapping) and "answer" in answer:
                answer = answer["answer"]
            questions.append(Question(event.job_id, event.data, answer, answered))
    return questions


def run_todo(
    executor: Any,
    input: str = "",
    *,
    database_url: str | None = None,
    answers: Answers = None,
    cancel_after: int | None = None,
    cancel_when: EventPredicate | None = None,
    agent_orch: str = AGENT_ORCH,
    agent_mode: str = "COMPLETE",
    tenant_id: str | None = None,
    user_id: str | None = None,
    activity_name: str | None = None,
    proc_inst_id: str | None = None,
    timeout: float = 30.0,
    **settings: Any,
) -> TodoRecord:
    """Enqueue one todo, serve it with ``executor`` on a real server, return what happened.

    :param database_url: a database with the schema; by default a fresh one on this process's
        shared embedded server (see :func:`fresh_database`), dropped afterwards.
    :param answers: answers to ``ask_human``, ``suspend_for_human`` and a2a
        ``input_required``, given as the UI does: a list (in the order asked), a mapping from
        question text, or a function of the :class:`Question` (:data:`NO_ANSWER` in any of them
        leaves one open). A suspended todo left without an answer ends the run waiting.
    :param cancel_after: cancel as the UI does once this many events were written.
    :param cancel_when: cancel as the UI does once this predicate on the events holds.
    :param timeout: seconds the todo may take to settle before :class:`RunTimedOut`.
    :param settings: other :class:`~processgpt_sync.Settings` fields (``timeout`` is the
        runner's own; pass the per-todo limit as ``todo_timeout``).
    :raises UnansweredQuestion: the executor blocked on a question nobody answers.
    :raises RunTimedOut: the todo did not settle in time.
    """
    if database_url is None:
        with fresh_database() as url:
            return run_todo(executor, input, database_url=url, answers=answers,
                            cancel_after=cancel_after, cancel_when=cancel_when,
                            agent_orch=agent_orch, agent_mode=agent_mode, tenant_id=tenant_id,
                            user_id=user_id, activity_name=activity_name,
                            proc_inst_id=proc_inst_id, timeout=timeout, **settings)
    _check_run_limits(cancel_after=cancel_after, timeout=timeout)
    if "todo_timeout" in settings:
        settings["timeout"] = settings.pop("todo_timeout")
    answer_for = _answer_function(answers)
    should_cancel = cancel_when
    if cancel_after is not None:
        def should_cancel(events: list[Event]) -> bool:
            return len(events) >= cancel_after or bool(cancel_when and cancel_when(events))

    config = _settings(agent_orch=agent_orch, database_url=database_url, **settings)
    run = _Run(database_url)
    try:
        # Built before the todo is written: an executor the server refuses leaves no todo
        # behind for the next run on this database.
        server = Server(executor, config, storage=run.storage)
        run.todo_id = run.storage.enqueue(
            agent_orch, input, agent_mode=agent_mode, tenant_id=tenant_id, user_id=user_id,
            activity_name=activity_name, proc_inst_id=proc_inst_id)
        with _capture_logs(run.todo_id) as logs, psycopg.connect(
                database_url, autocommit=True, row_factory=dict_row) as conn:
            try:
                server.start()
                _drive(run, conn, answer_for, should_cancel, timeout, server)
            except BaseException:
                server.stop(timeout=0)
                # Given back by the stop: cancelled as the UI would, so a later run on this
                # database does not take it up with another executor.
                _cancel(conn, run.todo_id, status=True)
                raise
            server.stop()
            if server.failure is not None:  # a thread of the library died: not a pass
                raise server.failure
            row, events, _ = _read(conn, run.todo_id)
        return TodoRecord(
            todo_id=run.todo_id, status=row["status"], draft_status=row["draft_status"],
            result=row["draft"] if row.get("agent_mode") == "DRAFT" else row["output"],
            log=row.get("log"), events=events, questions=_questions(events),
            runs=list(run.runs), logs=list(logs), row=row,
        )
    finally:
        run.storage.close()


def _settings(**fields: Any) -> Settings:
    """The server's settings, checked before anything is written: a misspelt name is a clear
    error naming the valid ones."""
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigurationError(
            f"run_todo got unknown settings {', '.join(unknown)}: besides its own parameters it "
            f"takes Settings fields ({', '.join(sorted(names))}); the per-todo time limit is "
            "todo_timeout")
    try:
        return Settings(**{"workers": 1, **fields})
    except ConfigurationError as error:
        if "timeout" in fields and str(error).startswith("timeout "):
            raise ConfigurationError(f"run_todo todo_timeout{str(error)[len('timeout'):]} "
                                     "(the per-todo limit the server enforces)") from None
        raise


def _check_run_limits(*, cancel_after: Any, timeout: Any) -> None:
    """The runner's own numbers, checked before anything is written."""
    if cancel_after is not None and (isinstance(cancel_after, bool)
                                     or not isinstance(cancel_after, int) or cancel_after < 0):
        raise ConfigurationError(
            f"run_todo cancel_after must be a whole number of events (0 or more), not "
            f"{cancel_after!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < math.inf):
        raise ConfigurationError(
            f"run_todo timeout must be a positive number of seconds the run may take, not "
            f"{timeout!r}; the per-todo limit the server enforces is todo_timeout")


def _cancel(conn: psycopg.Connection[dict[str, Any]], todo_id: str, *,
            status: bool = False) -> None:
    """Cancel as the UI does, unless the todo has already ended: a result or failure that
    came in first stays what the record reports. ``status``: also set ``status`` CANCELLED,
    as for a run given up, so no later run on the database claims it."""
    columns = "status = 'CANCELLED', draft_status = 'CANCELLED'" if status else \
        "draft_status = 'CANCELLED'"
    conn.execute(f"UPDATE todolist SET {columns} WHERE id = %s AND (draft_status IS NULL "
                 "OR draft_status::text <> ALL(%s))", (todo_id, list(FINAL)))


def _drive(run: _Run, conn: psycopg.Connection[dict[str, Any]],
           answer_for: Callable[[Question], Any], should_cancel: EventPredicate | None,
           timeout: float, server: Server) -> None:
    """Act as the UI until the todo settles: answer questions, cancel, or stop waiting.
    NO_ANSWER for a blocking question is meant (the executor's own timeout decides); a list
    run out or a question a mapping lacks is a missing answer. A server that failed (one of
    its threads died) raises its ServerFailed at once."""
    assert run.todo_id is not None
    deadline = time.monotonic() + timeout
    cancelled = False
    given: set[str] = set()
    while True:
        if server.failure is not None:
            raise server.failure
        seen = run.calls()
        row, events, leased = _read(conn, run.todo_id)
        state = row["draft_status"]
        if state in FINAL and not leased:
            return
        if should_cancel is not None and not cancelled and should_cancel(events):
            _cancel(conn, run.todo_id)
            cancelled = True
            continue
        if state == "HUMAN_ASKED":
            open_ = [q for q in _questions(events) if not q.answered and q.job_id not in given]
            # Answer once the todo is suspended (lease released) or the executor blocks on the
            # question; a suspension being written holds the lease until it commits.
            if open_ and (not leased or run.is_awaited(open_[-1].job_id)):
                question = open_[-1]
                answer = answer_for(question)
                if answer is NO_ANSWER or answer is _MISSING:
                    if not leased:
                        return  # suspended: the todo waits in the database
                    if answer is NO_ANSWER:  # left open on purpose: ask_human's timeout decides
                        given.add(question.job_id)
                        continue
                    raise UnansweredQuestion(
                        f"the executor asked {question.text!r} and no answer was scripted: "
                        "pass answers=[...], answers={question: answer} or a function")
                given.add(question.job_id)
                run.storage.respond(question.job_id, answer, todo_id=run.todo_id)
                continue
        if time.monotonic() >= deadline:
            raise RunTimedOut(
                f"todo {run.todo_id} did not settle within {timeout:g} s: draft_status "
                f"{state}, events so far {[e.type for e in events]}")
        run.wait_for_call(seen, deadline)
