"""One todo's run on a worker thread: call the executor, then have its outcome recorded.

Also the ways a run ends early: a cancel (UI, lost lease, shutdown), a timeout, or the host
failing under it. This module runs user code (the executor and its cancel hook) and never
talks to the database itself: writes go through the ``Recorder``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from .budget import TIMED_OUT_THREADS
from .errors import PayloadError, StorageError
from .executor import Adapter
from .feedback import with_summary
from .human import HumanDesk, SuspendForHuman
from .inflight import InFlight
from .infra import infrastructure_problem, inner_errors, is_group
from .loops import ON_BEGIN, ON_END, ON_RETURN
from .payload import error_text
from .pool import WorkerPool
from .recorder import Recorder
from .runs import CURRENT_RUN, UNSET, TodoRun
from .settings import Settings
from .stats import ServerStats
from .todo import Todo

EXIT_ALLOWANCE = 30.0  # seconds an ``around_todo`` exit may take once the executor returned
CANCEL_OVERDUE = 30.0  # seconds an executor told to stop may go on before a warning names it


class TodoWorker:
    """Runs the todos of one server, one per call of :meth:`run`, on the pool's threads."""

    def __init__(
        self, adapter: Adapter, settings: Settings, *, inflight: InFlight, recorder: Recorder,
        desk: HumanDesk, stats: ServerStats,
        around_todo: Callable[[], AbstractContextManager[Any]],
        log: logging.Logger, extra: dict[str, Any],
        submit: Callable[..., Any] | None = None,
    ) -> None:
        """:param submit: a thread pool's ``submit``: given (and the adapter ``defers``), an
            async todo holds no thread while it awaits; its outcome is recorded there."""
        self._adapter = adapter
        self._defers = adapter.defers  # async todos on the shared loop
        self._settings = settings
        self._inflight = inflight
        self._recorder = recorder
        self._desk = desk
        self._stats = stats
        self._around_todo = around_todo
        self._log = log
        self._extra = extra
        self._submit = submit if adapter.defers else None
        # timed-out todos are recorded on a few threads, made when first needed: a thousand
        # todos timing out together wait their turn rather than take a thousand threads
        self._timed_out = WorkerPool(TIMED_OUT_THREADS, "processgpt-sync-timed-out",
                                     wait_when_refused=True)

    def run(self, run: TodoRun) -> None:
        """Run the executor on this thread and record what came of it; a deferred todo (an
        async executor on the shared loop) gives the thread back while it awaits, and is
        recorded by ``_ended`` on a pool thread once its coroutine ends."""
        # a todo on the shared loop has its clock start as the loop begins its coroutine
        if not run.begin(clock=not self._defers):  # timed out or given back meanwhile
            self._inflight.forget(run)
            return
        self._stats.executing(1)
        if run.claim.unreadable is not None:  # the row's data, not the executor, is at fault
            self._log.error("todo %s cannot run: %s", run.todo_id, run.claim.unreadable,
                            extra=self._todo_extra(run, "execute"))
            self._ended(run, UNSET, PayloadError(run.claim.unreadable))
            return
        if run.todo.resume.kind == "fresh":
            self._stats.pickup(run.claim.row.get("start_date"))
        context = CURRENT_RUN.set(run)
        try:
            if self._submit is not None and not run.cancel_event.is_set():
                value, error = self._start(run)
                if error is None:
                    return
            else:
                value, error = self._execute(run)
        finally:
            CURRENT_RUN.reset(context)
        self._ended(run, value, error)
        del value, error  # a failure's traceback holds this frame: no cycle through it

    def _execute(self, run: TodoRun) -> tuple[Any, BaseException | None]:
        try:
            if run.cancel_event.is_set():  # cancelled while it waited for a thread
                return UNSET, None
            around = self._around_todo()
            around.__enter__()
        except BaseException as exc:
            return UNSET, exc
        returned = ON_RETURN.set(functools.partial(self._returned, run))
        try:
            run.todo = self._summarized(run)
            run.context = contextvars.copy_context()
            if self._defers:
                with self._clock_on_the_loop(run, self._returned):
                    value, error = self._adapter.run(run.todo), None
            else:
                value, error = self._adapter.run(run.todo), None
        except BaseException as exc:  # SystemExit from argparse in a tool is this todo's failure
            value, error = UNSET, exc
        finally:
            ON_RETURN.reset(returned)
            run.context = None  # it holds this run: no cycle through it once the run ends
        self._returned(run)
        try:  # told of the todo's error, as a with-statement would tell it
            around.__exit__(type(error) if error else None, error,
                            error.__traceback__ if error else None)
        except BaseException as exc:
            if exc is not error:  # the todo has ended: a failure after it is not its outcome
                self._log.error("leaving the context around todo %s failed (%s); the todo's "
                                "outcome stands", run.todo_id, exc, exc_info=exc,
                                extra=self._todo_extra(run, "execute"))
        try:
            return value, error
        finally:  # the error's traceback holds this frame: no cycle through its locals
            del value, error

    @staticmethod
    def _returned(run: TodoRun) -> None:
        """The executor has ended in time: what follows (ending the tasks it left running,
        leaving the context around it) is not its timeout, though one that hangs still ends,
        later; nor is a stop's grace ending meanwhile its shutdown."""
        with run.lock:
            if run.deadline is not None and not run.closed and not run.leaving:
                run.deadline = max(run.deadline, time.monotonic() + EXIT_ALLOWANCE)
            run.leaving = True

    @contextmanager
    def _clock_on_the_loop(self, run: TodoRun,
                           ended: Callable[[TodoRun], None]) -> Iterator[None]:
        """On the shared loop, the todo's clock runs while its coroutine does: started as
        the loop begins it, and ``ended`` as it ends (the loop's copy of this context calls
        both), not while it waits for the loop another todo blocks."""
        began = ON_BEGIN.set(run.start_clock)
        end = ON_END.set(functools.partial(ended, run))
        try:
            yield
        finally:
            ON_END.reset(end)
            ON_BEGIN.reset(began)

    def _summarized(self, run: TodoRun) -> Todo:
        """The todo with its revision feedback summarised (``summarize_feedback``). Where the
        loop starts the clock (an async todo on the shared loop), it starts here first: the
        summariser, a model call on this thread, is bounded by the todo's timeout as on a
        worker thread; the executor then gets its own ``timeout`` from the loop's start."""
        if self._defers and self._settings.summarize_feedback is not None:
            run.start_clock()
        return with_summary(run.todo, self._settings.summarize_feedback)

    @staticmethod
    def _stop_clock(run: TodoRun) -> None:
        """The deferred executor has ended: no timeout applies from now on."""
        with run.lock:
            run.deadline = None

    def _start(self, run: TodoRun) -> tuple[Any, BaseException | None]:
        """Start a deferred todo; what it raised if it could not start."""
        try:
            run.todo = self._summarized(run)
            with self._clock_on_the_loop(run, self._stop_clock):
                self._adapter.start(run.todo, functools.partial(
                    self._deferred_end, run, contextvars.copy_context()))
        except BaseException as exc:
            return UNSET, exc
        return UNSET, None

    def _deferred_end(self, run: TodoRun, context: contextvars.Context, value: Any,
                      error: BaseException | None) -> None:
        """On the loop's thread: the executor has ended (no timeout applies from now on, and
        stop() waits for its outcome); record it on a pool thread, never on the loop."""
        assert self._submit is not None
        self._stop_clock(run)
        self._inflight.executor_returned(run)
        try:
            self._submit(context.run, self._ended, run, value, error)
            return
        except RuntimeError:  # the pool is shut down (the server stops) or has no thread
            pass
        try:
            threading.Thread(target=context.run, args=(self._ended, run, value, error),
                             daemon=True, name="processgpt-sync-late-outcome").start()
        except RuntimeError as exc:
            self._log.error("cannot record the outcome of todo %s (%s): no thread for it; its "
                            "lease expires and it runs again", run.todo_id,
                            infrastructure_problem(exc) or exc,
                            extra=self._todo_extra(run, "finish"))
            if run.end_once():
                self._stats.executing(-1)
                self._inflight.forget(run)

    def _ended(self, run: TodoRun, value: Any, error: BaseException | None) -> None:
        """The executor ended: record what came of it and free the slot (once, whichever
        path gets here first)."""
        if not run.end_once():
            return
        try:
            suspend = _suspension(error)
            if suspend is not None:  # also from inside a task group
                value, error = self._recorder.suspend(run, suspend.question), None
        finally:
            self._stats.executing(-1)
            self._inflight.executor_returned(run)
        problem = infrastructure_problem(error)
        recorded = functools.partial(self._inflight.forget, run)
        try:
            if problem is not None and error is not None and is_group(error):
                self._log.warning("todo %s raised an exception group holding a host failure; "
                                  "it is given back; the group held: %s", run.todo_id,
                                  error_text(error), exc_info=error,
                                  extra=self._todo_extra(run, "execute"))
            # a cancel, a lost lease, a stop: what ended the run decides its outcome, even if
            # the host failed it after (a write the executor waited on met an outage)
            ended_by = run.cancel_reason not in (None, "timeout")
            if problem is not None and not ended_by:
                if self._give_back_broken(run, problem) or run.cancel_reason != "timeout":
                    recorded()  # else the timeout's failure, being written, lets the run go
            else:
                if problem is None:
                    self._inflight.host_recovered()
                # Returns once the outcome is handed to the writer: this thread is free for
                # the next todo while it is written; the run is forgotten once it is.
                self._recorder.finish(run, value, error, then=recorded)
        except Exception as exc:
            self._log.exception("recording the outcome of todo %s failed", run.todo_id,
                                extra=self._todo_extra(run, "finish"))
            if problem is None:
                self._record_failure_instead(run, exc, recorded)
            else:  # it was being given back for the host's failure: not the executor's either
                recorded()
        except BaseException:
            recorded()
            raise

    def _record_failure_instead(self, run: TodoRun, exc: Exception,
                                recorded: Callable[[], None]) -> None:
        """Recording what the executor returned raised: record the todo failed with why, so
        that it ends now rather than run again once its lease runs out (no automatic retry).
        A database or host error is not the executor's: that todo is left to its lease."""
        if isinstance(exc, StorageError) or infrastructure_problem(exc) is not None:
            recorded()
            return
        try:
            self._recorder.fail_then(
                run, f"its outcome could not be recorded: {type(exc).__name__}", recorded)
        except Exception:
            self._log.exception("recording todo %s failed did not work either; its lease "
                                "expires and it runs again", run.todo_id,
                                extra=self._todo_extra(run, "finish"))
            recorded()

    def cancel(self, run: TodoRun, reason: str) -> None:
        """End ``run`` early (``cancelled`` by the UI, ``lost`` lease, its row ``deleted``,
        ``shutdown``)."""
        with run.lock:
            if run.cancel_event.is_set() or run.closed:
                return
            run.cancel_reason = reason
            run.cancelled_at = time.monotonic()
            run.cancel_event.set()
        self._stop_executor(run, reason)

    def cancel_overdue(self, run: TodoRun) -> None:
        """``run`` was told to stop ``CANCEL_OVERDUE`` seconds ago and its executor goes on
        (it ignores ``todo.cancelled``, or catches the cancellation): say so once, naming the
        todo, whose worker slot stays taken until it returns, and cancel it once more (a
        coroutine that caught one cancellation may end on the next)."""
        with run.lock:
            if run.cancel_overdue or run.closed:
                return
            run.cancel_overdue = True
        self._log.warning("todo %s: its executor has not ended %.0f s after it was told to stop "
                          "(%s): it ignores todo.cancelled, or catches the cancellation; its "
                          "worker slot stays taken until it returns", run.todo_id,
                          CANCEL_OVERDUE, run.cancel_reason, extra=self._todo_extra(run, "cancel"))
        if self._adapter.uses_loops:  # its coroutine, without the cancel hook, which ran once
            try:
                self._adapter.cancel(run.todo)
            except Exception:
                self._log.exception("cancelling todo %s again failed", run.todo_id,
                                    extra=self._todo_extra(run, "cancel"))

    def time_out(self, run: TodoRun) -> None:
        """``run`` passed its deadline: record it failed now, whatever the executor does."""
        timeout = self._settings.timeout
        with run.lock:  # the outcome is the timeout's, whatever the executor returns now
            if run.closed or run.deadline is None:  # decided, or its executor has ended
                return
            if run.writing_for_executor or time.monotonic() <= run.deadline:
                return  # waiting on the database, not on the executor, or given more time
            run.closed = True
            run.cancel_reason = "timeout"
            run.cancel_event.set()
            leaving = run.leaving  # read before the cancel below lets the executor return
        self._stop_executor(run, "timeout")
        why = (f"its executor returned, but what follows it (ending the tasks it left running, "
               f"leaving the context around it) did not end within {EXIT_ALLOWANCE:g} s"
               if leaving else f"timed out after {timeout:g} s")
        self._log.warning("todo %s: %s", run.todo_id, why, extra=self._todo_extra(run, "timeout"))
        freed = functools.partial(self._inflight.timed_out, run)

        def record() -> None:
            try:  # handed to the outcome writer once the todo's events are taken
                self._recorder.fail_then(run, why, freed)
            except BaseException:  # as on the normal path: its slot is freed all the same
                self._log.exception("recording the timeout of todo %s failed", run.todo_id,
                                    extra=self._todo_extra(run, "timeout"))
                freed()

        # Not on the heartbeat's thread, which called this: taking the todo's events waits
        # for a write of them on its way, and meanwhile the other todos' leases and deadlines
        # must go on being kept, however slow the database.
        try:
            self._timed_out.submit(record)
        except RuntimeError:  # the pool has no thread at all, or stopped: recorded here
            record()

    def close(self) -> None:
        """The server stops: the timed-out todos already handed over are still recorded."""
        self._timed_out.retire()

    def _stop_executor(self, run: TodoRun, reason: str) -> None:
        """Tell the executor (its cancel hook, a question it waits on) that the todo ended."""
        self._log.info("cancelling todo %s (%s)", run.todo_id, reason,
                       extra=self._todo_extra(run, "cancel"))
        self._desk.wake(run.todo_id)
        try:
            context = run.context
            if context is None:  # its executor is not running on a worker thread
                self._adapter.cancel(run.todo)
            else:  # as part of its todo, as the executor runs: current_run() is it
                context.copy().run(self._adapter.cancel, run.todo)
        except Exception:
            self._log.exception("the executor's cancel hook failed for todo %s", run.todo_id,
                                extra=self._todo_extra(run, "cancel"))

    def _give_back_broken(self, run: TodoRun, problem: str) -> bool:
        """The host, not the executor, broke this run: give the todo back to run again; False
        if its outcome was decided already (timed out, given back by the stop)."""
        if not run.close():
            return False
        self._log.error("todo %s could not run here: %s; giving it back to run again (not "
                        "recorded as failed)", run.todo_id, problem,
                        extra=self._todo_extra(run, "release"))
        self._recorder.discard_events(run)
        self._inflight.pause_claiming()
        if self._recorder.release(run):
            self._stats.count("released")
        return True

    def _todo_extra(self, run: TodoRun, action: str) -> dict[str, Any]:
        return {**self._extra, "action": action, "todo_id": run.todo_id}


def _suspension(error: BaseException | None) -> SuspendForHuman | None:
    """The suspend ``error`` amounts to: a SuspendForHuman, alone or in an exception group
    whose other members are only the cancellations it caused; None when anything else failed
    with it (that failure is the outcome)."""
    if error is None:
        return None
    inner = inner_errors(error)
    suspend = next((e for e in inner if isinstance(e, SuspendForHuman)), None)
    if suspend is None or not all(isinstance(e, (SuspendForHuman, asyncio.CancelledError))
                                  for e in inner):
        return None
    return suspend
