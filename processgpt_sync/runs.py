"""What the server tracks for one claimed todo while it runs, and the current-todo context.

Plain state under the run's own lock: no database, no user code, no knowledge of the server.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ProcessGPTSyncError
from .events import EventQueue, Events
from .models import Claim
from .todo import Todo

UNSET: Any = object()
logger = logging.getLogger(__name__)

CURRENT_RUN: contextvars.ContextVar[TodoRun | None] = contextvars.ContextVar(
    "processgpt_sync_current_run", default=None
)


class TodoRun:
    """One claimed todo: its view, its sink, its cancel flag and whether it reached its end.

    The todo's events and its ``ask`` reach back to the run through a weak reference: no
    reference cycle, so a finished todo's objects are freed as soon as the server lets go of
    them, not by the garbage collector (they were about 30 objects of cyclic garbage per
    todo; without them a busy server spends a fifth less CPU per todo). A todo kept by user
    code after its run was freed counts as ended.
    """

    def __init__(
        self, claim: Claim, buffer: EventQueue, *, timeout: float | None, intermediate: Any,
        asker: Callable[..., Any] | None = None,
    ) -> None:
        self.claim = claim
        self.lock = threading.Lock()
        self.closed = False
        """Set once the todo's outcome is decided here; nothing more is written for it."""
        self.cancel_event = threading.Event()
        self.cancel_reason: str | None = None
        self.cancelled_at: float | None = None  # when it was told to stop (time.monotonic())
        self.cancel_overdue = False  # said so: its executor went on long after that
        self.final_result: Any = UNSET
        self.pending_draft: Any = UNSET  # the latest draft a pool thread is to write
        self.draft_scheduled = False
        self.timeout = timeout
        self.started = time.monotonic()
        self.began = False  # its executor has started (a coroutine queued for a loop: not yet)
        self.deadline: float | None = None
        """Set when the executor starts: a todo waiting for a worker thread, or for the
        shared loop (which another todo may block), cannot time out."""
        self.slot_released = False
        self.executor_returned = False  # its thread is free again
        self.leaving = False  # its executor returned; the context around it is being left
        self.context: contextvars.Context | None = None
        """The executor's context as it started (this run as the current one, what
        ``around_todo`` set), while it runs: its cancel hook runs in a copy."""
        self.writing_for_executor = 0  # writes the executor waits on (see clock_stopped)
        self._writing_since = 0.0
        self._ended = False
        me = weakref.ref(self)
        self.events = Events(
            claim.todo_id,
            claim.token,
            buffer,
            is_open=functools.partial(_is_open, me),
            on_result=functools.partial(_on_result, me, claim.todo_id, intermediate),
        )
        ask = None if asker is None else functools.partial(_ask, me, claim.todo_id, asker)
        self.todo = Todo.from_claim(claim, self.events, self.cancel_event, ask)

    @property
    def todo_id(self) -> str:
        return self.claim.todo_id

    @property
    def key(self) -> tuple[str, str]:
        """This claim of the todo: the same server may claim a todo again while it still runs
        (a revision asked mid-run), so runs are told apart by their fencing token."""
        return (self.claim.todo_id, self.claim.token)

    def begin(self, *, clock: bool = True) -> bool:
        """The executor is about to start on a worker thread: start its clock (``clock``;
        else ``start_clock`` does, once a coroutine queued for the shared loop runs). False
        when the todo's outcome was already decided (timed out or given back while it
        waited)."""
        with self.lock:
            if self.closed:
                return False
        if clock:
            self.start_clock()
        return True

    def start_clock(self) -> None:
        """The executor starts now: its run time, and its timeout, count from here."""
        with self.lock:
            if self.closed:
                return
            self.began = True
            self.started = time.monotonic()
            if self.timeout is not None:
                self.deadline = self.started + self.timeout

    @contextlib.contextmanager
    def clock_stopped(self) -> Iterator[None]:
        """The executor waits on a write of ours (a draft, retried through any outage): that
        time is the database's, so the todo's timeout does not count it (the heartbeat leaves
        a run in such a write alone; its deadline moves on by the time the write took)."""
        with self.lock:
            self.writing_for_executor += 1
            if self.writing_for_executor == 1:
                self._writing_since = time.monotonic()
        try:
            yield
        finally:
            with self.lock:
                self.writing_for_executor -= 1
                if not self.writing_for_executor and self.deadline is not None and (
                        not self.leaving):  # once it returned, its allowance is set anew
                    self.deadline += time.monotonic() - self._writing_since

    def is_open(self) -> bool:
        return not self.closed and not self.cancel_event.is_set()

    def end_once(self) -> bool:
        """The run's end is handled here: True the first time only."""
        with self.lock:
            first, self._ended = not self._ended, True
            return first

    def close(self) -> bool:
        """Mark the outcome as decided; False if someone else already did."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            return True

    def _on_result(self, data: Any, final: bool, intermediate: Any) -> None:
        if final:
            self.final_result = data
        else:
            intermediate(self, data)


def _is_open(run: weakref.ref[TodoRun]) -> bool:
    alive = run()
    return alive is not None and alive.is_open()


def _on_result(run: weakref.ref[TodoRun], todo_id: str, intermediate: Any, data: Any,
               final: bool) -> None:
    alive = run()
    if alive is None or alive.closed:  # its outcome is decided: nothing reads a result now
        logger.warning("a result of todo %s dropped: the todo is no longer running here",
                       todo_id, extra={"action": "result", "todo_id": todo_id})
        return
    alive._on_result(data, final, intermediate)


def _ask(run: weakref.ref[TodoRun], todo_id: str, asker: Callable[..., Any], *args: Any,
         **kwargs: Any) -> Any:
    alive = run()
    if alive is None:
        raise ProcessGPTSyncError(f"todo {todo_id} is no longer running here (it ended)")
    return asker(alive, *args, **kwargs)


def current_run() -> TodoRun | None:
    """The todo running on this thread (for code that does not see the todo object)."""
    return CURRENT_RUN.get()
