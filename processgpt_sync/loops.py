"""Where async executors run: a loop per worker thread (default) or one shared loop.

``thread`` mode: each worker thread owns an asyncio loop, created once for the thread's life,
and runs the todo's coroutine on it itself (``run_until_complete``): no extra thread, and 2 fds
per loop (its self-pipe; the loop polls with ``poll()``, which needs no fd of its own, where
epoll would take a third; one todo's few sockets do not need epoll). An executor that blocks
inside ``async def`` (CrewAI ``kickoff()``) stalls only its own todo. Trade-off: asyncio objects
kept across todos are bound to the loop that made them, and tasks a todo leaves behind are
cancelled when it ends.

``shared`` mode: one loop thread for all async todos of a server, so async clients kept across
todos (httpx.AsyncClient, asyncpg pools) work; a blocking executor stalls every todo, and a
watchdog logs which todo blocked the loop and for how long. A todo on the shared loop holds no
worker thread while it awaits (``LoopTask.then``): thousands of them need a few threads, for
the steps before and after.

In both modes asyncio's default executor (``asyncio.to_thread``, ``run_in_executor(None, ...)``,
the DNS lookups of httpx and anyio) is one pool for all of a server's loops, its threads made
as calls need them and shared: a loop of its own would keep up to ``min(32, cpus + 4)`` threads
for the loop's life, per worker.

Cancelling never waits for a loop: a blocked loop must not block the heartbeat, the listener
or ``stop()``. The cancel is handed over with ``call_soon_threadsafe`` and runs on the loop
once it is free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.thread
import contextlib
import contextvars
import functools
import inspect
import logging
import selectors
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from .blocking import explain
from .errors import InfrastructureError

T = TypeVar("T")
Done = Callable[[Any, "BaseException | None"], None]
"""Called once a todo's coroutine, started without waiting, ended: its value or its error."""
logger = logging.getLogger(__name__)

LOOP_MODES = ("thread", "shared")
LOOP_FDS = 3  # the most one loop holds: epoll (where poll() is missing) and a self-pipe pair
LAG_WARNING = 0.5  # seconds the shared loop may be blocked before the watchdog names the todo
LAG_PROBE = 0.1  # seconds between watchdog probes
LEFTOVER_WAIT = 1.0  # seconds tasks a todo left behind get to end once cancelled
TO_THREAD_MAX = 1024  # threads of the loops' shared default executor, made only as calls need

LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("processgpt_sync_loop_label",
                                                                  default=None)
ON_BEGIN: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "processgpt_sync_on_begin", default=None)
"""Called on the loop as a coroutine started with ``then`` begins to run: a todo queued for a
loop another todo blocks has not started yet (its clock starts then)."""
ON_END: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "processgpt_sync_on_end", default=None)
"""Called on the loop as that coroutine ends, within its own last step: its clock stops
there, not once the loop gets round to its outcome, which another todo blocking the loop
may hold up past its timeout."""
ON_RETURN: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "processgpt_sync_on_return", default=None)
"""Called on a worker thread once its todo's coroutine has ended, before the tasks it left
running are ended (which may take a while): that time is not the executor's."""


class ExecutorExit(Exception):
    """An async executor raised SystemExit or KeyboardInterrupt (a tool calling ``sys.exit``
    or argparse): its todo fails; the loop it ran on serves on."""


class LoopTask(Generic[T]):
    """One coroutine on a loop, cancellable from any thread without waiting."""

    def __init__(self, runner: Callable[[LoopTask[T]], T],
                 fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                 submit: Callable[[LoopTask[T], Callable[[Finished[T]], None]], None] | None = None
                 ) -> None:
        """:param submit: schedules the coroutine on a loop of its own thread and returns
            at once (the shared loop); without it only ``result()`` runs it."""
        self._runner = runner
        self._submit = submit
        self._fn = fn
        self._args = args
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._context: contextvars.Context | None = None  # the task's: its todo's label, run
        self._cancelled = False
        self._hooks: set[asyncio.Task[None]] = set()

    async def guarded(self) -> T:
        """The coroutine as the loop runs it: it ends with ``concurrent.futures.CancelledError``
        when the server cancelled it."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            self._context = contextvars.copy_context()
            cancelled = self._cancelled  # cancelled before the loop took the task
        if cancelled:
            raise concurrent.futures.CancelledError("cancelled by the server")
        begin = ON_BEGIN.get()
        if begin is not None:
            begin()
        try:
            return await self._fn(*self._args)
        except asyncio.CancelledError:
            if self._cancelled:
                raise concurrent.futures.CancelledError("cancelled by the server") from None
            raise
        except (SystemExit, KeyboardInterrupt) as exc:  # asyncio would re-raise these out of
            # the loop, ending it under every other todo: this todo's failure, as on a thread
            raise ExecutorExit(f"the executor raised {exc!r}") from exc
        finally:
            end = ON_END.get()
            if end is not None:
                end()

    def result(self) -> T:
        """Run or wait for the coroutine's outcome on the calling worker thread; see
        ``blocking.explain`` for one failure."""
        return _explained(self._runner, self)

    def then(self, callback: Callable[[Finished[T]], None]) -> None:
        """Start the coroutine without waiting for it; ``callback(finished)`` runs on the
        loop's thread once it ended (only where a loop runs on a thread of its own:
        ``defers``); it reads the outcome with ``result_of``."""
        if self._submit is None:
            raise RuntimeError("this loop runs coroutines only on the calling thread")
        self._submit(self, callback)

    @property
    def defers(self) -> bool:
        """``then`` works: the coroutine need not hold the calling thread."""
        return self._submit is not None

    def cancel(self, before: Callable[[], Any] | None = None) -> None:
        """Cancel the coroutine, first awaiting ``before()`` (a cancel hook) on its loop;
        return at once whatever that loop is doing. Called again, it cancels the coroutine
        once more, without the hook (one that caught the first cancellation)."""
        with self._lock:
            if self._cancelled:
                before = None
            self._cancelled = True
            loop, context = self._loop, self._context
        if loop is None:
            return  # guarded() cancels it as it starts
        try:  # the hook runs as part of its todo: the watchdog names it, current_run() is it
            loop.call_soon_threadsafe(self._start_cancel, before, context=context)
        except RuntimeError:
            pass  # the loop is closed: the coroutine has ended

    def _start_cancel(self, before: Callable[[], Any] | None) -> None:
        """On the loop."""
        if self._task is None or self._task.done():
            return  # ended meanwhile; the loop may already run another todo
        if before is None:
            self._task.cancel()
            return
        task = asyncio.ensure_future(self._hook_then_cancel(before))
        self._hooks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._hooks.discard)

    async def _hook_then_cancel(self, before: Callable[[], Any]) -> None:
        try:
            value = before()
            if inspect.isawaitable(value):
                await value
        except Exception:
            logger.exception("the cancel hook of todo %s failed", LABEL.get(),
                             extra={"action": "cancel", "todo_id": LABEL.get()})
        finally:
            if self._task is not None:
                self._task.cancel()


class Finished(Generic[T]):
    """How a coroutine started with ``LoopTask.then`` ended: its value or its error (lighter
    than a ``concurrent.futures.Future``, which holds a lock and a condition: nobody waits)."""

    __slots__ = ("_error", "_value")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        if task.cancelled():
            self._error = concurrent.futures.CancelledError("cancelled")
        elif (error := task.exception()) is not None:
            self._error = error
        else:
            self._value = task.result()

    @classmethod
    def cancelled(cls, why: str) -> Finished[Any]:
        """A coroutine the loop closed under: before it started, or while it ignored its
        cancellation."""
        finished: Finished[Any] = cls.__new__(cls)
        finished._value, finished._error = None, concurrent.futures.CancelledError(why)
        return finished

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _deliver(callback: Callable[[Finished[T]], None], task: asyncio.Task[T]) -> None:
    callback(Finished(task))


class _Once(Generic[T]):
    """A coroutine's callback, called once: by its task's end, or by the loop's close if the
    task has not ended by then."""

    def __init__(self, callback: Callable[[Finished[T]], None], context: contextvars.Context,
                 unheard: set[_Once[Any]], lock: threading.Lock) -> None:
        self._callback = callback
        self._context = context
        self._unheard = unheard
        self._lock = lock
        with lock:
            unheard.add(self)

    def __call__(self, finished: Finished[T]) -> None:
        with self._lock:
            if self not in self._unheard:
                return
            self._unheard.discard(self)
        self._context.run(self._callback, finished)


def result_of(finished: Finished[T]) -> T:
    """The outcome of a coroutine started with ``LoopTask.then``, failures explained as
    ``LoopTask.result`` explains them (``blocking.explain``)."""
    return _explained(finished.result)


def _explained(call: Callable[..., T], *args: Any) -> T:
    try:
        return call(*args)
    except RuntimeError as exc:
        explained = explain(exc)
        if explained is exc:
            raise
        raise explained from exc


class Loops(Protocol):
    """What the async adapters use: start a coroutine for a todo, close at stop."""

    defers: bool
    """Coroutines run on a loop thread of their own: a todo need not hold its worker thread."""

    def start(self, label: str, fn: Callable[..., Awaitable[T]], *args: Any) -> LoopTask[T]: ...

    def close(self) -> None: ...


class ToThreadPool(concurrent.futures.ThreadPoolExecutor):
    """The default executor of every loop of one ``Loops``. ``loop.close()`` shuts its loop's
    default executor down: this one is shut down only by ``close()``, with the last loop."""

    def __init__(self) -> None:
        super().__init__(max_workers=TO_THREAD_MAX, thread_name_prefix="processgpt-sync-to-thread")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shared by other loops: left running (see ``close``)."""

    def close(self) -> None:
        super().shutdown(wait=False)
        # concurrent.futures joins its threads at interpreter exit: a call that never returns
        # (a to_thread of a todo that timed out) would hold the process for ever, where the
        # worker threads, daemons, do not
        for thread in list(self._threads):
            concurrent.futures.thread._threads_queues.pop(thread, None)  # type: ignore[attr-defined]


def make_loops(mode: str) -> Loops:
    """The loops of ``mode`` ("thread" or "shared")."""
    return SharedLoop() if mode == "shared" else ThreadLoops()


class ThreadLoops:
    """Each calling thread runs coroutines on its own loop, made on first use."""

    defers = False

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._running: set[asyncio.AbstractEventLoop] = set()  # a todo's on it, or about to be
        self._closed = False
        self._to_thread = ToThreadPool()

    def start(self, label: str, fn: Callable[..., Awaitable[T]], *args: Any) -> LoopTask[T]:
        """``fn(*args)``, run on the calling thread's loop by ``result()``."""
        LABEL.set(label)  # in the worker's context, which the loop task copies
        return LoopTask(self._run, fn, args)

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The calling thread's loop, marked running (under the lock): ``close`` leaves it
        to the todo about to run on it."""
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = new_thread_loop()
            loop.set_default_executor(self._to_thread)
            tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
            loop.set_task_factory(_tracking_factory(tasks))
            self._local.loop = loop
            self._local.tasks = tasks
            self._loops.append(loop)
        self._running.add(loop)
        return loop

    def _run(self, task: LoopTask[T]) -> T:
        with self._lock:
            loop = self._loop()
        try:
            return loop.run_until_complete(task.guarded())
        finally:
            returned = ON_RETURN.get()
            if returned is not None:
                returned()
            ignored = self._end_leftovers(loop, self._local.tasks)
            with self._lock:
                self._running.discard(loop)
                if ignored and not loop.is_closed():  # retired, or they slow every next todo
                    self._local.loop = None
                    with contextlib.suppress(ValueError):
                        self._loops.remove(loop)
                    loop.close()
                if self._closed and not loop.is_closed():
                    loop.close()

    @staticmethod
    def _end_leftovers(loop: asyncio.AbstractEventLoop,
                       tasks: weakref.WeakSet[asyncio.Task[Any]]) -> bool:
        """Cancel tasks the todo left running (as ``asyncio.run`` does): between todos the
        loop does not run, so they would only resume inside another todo. (The loop's own
        task set: ``asyncio.all_tasks`` walks every loop's tasks, quadratic at 1,000 workers.)
        Whether some ignore cancellation: their loop is then retired, as they would be
        waited for and resume at the end of every later todo of the thread."""
        leftovers = [t for t in tasks if not t.done()]
        if not leftovers:
            return False
        for leftover in leftovers:
            leftover.cancel()
        waiting = loop.create_task(asyncio.wait(leftovers, timeout=LEFTOVER_WAIT))
        while True:
            try:
                _, pending = loop.run_until_complete(waiting)
                break
            except (SystemExit, KeyboardInterrupt) as exc:  # from one as it is cancelled (a
                # tool's cleanup), out of the loop: not the todo's outcome, which stands
                logger.error("a task an async executor left running failed as it was ended "
                             "(%r); the todo's outcome stands", exc, exc_info=exc,
                             extra={"action": "execute"})
        for ended in leftovers:  # each failure said once, here
            failure = ended.exception() if ended.done() and not ended.cancelled() else None
            if failure is not None and not isinstance(failure, SystemExit | KeyboardInterrupt):
                logger.warning("a task an async executor left running failed as it was ended "
                               "(%r)", failure, exc_info=failure, extra={"action": "execute"})
        if pending:
            logger.warning("%d tasks left behind by the async executor of todo %s ignore "
                           "cancellation; its thread's event loop is closed with them and a "
                           "new one made", len(pending), LABEL.get(),
                           extra={"action": "execute"})
        return bool(pending)

    def close(self) -> None:
        """Close every loop now idle; a loop still running closes when its todo ends."""
        with self._lock:
            self._closed = True
            loops, self._loops = self._loops, []
            for loop in loops:
                if loop not in self._running and not loop.is_closed():
                    loop.close()
            pool, self._to_thread = self._to_thread, ToThreadPool()  # threads only once used
        pool.close()


def _tracking_factory(tasks: weakref.WeakSet[asyncio.Task[Any]]) -> Any:
    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task[Any]:
        task = _task(loop, coro, options)
        tasks.add(task)
        return task

    return factory


def _task(loop: asyncio.AbstractEventLoop, coro: Any,
          options: dict[str, Any]) -> asyncio.Task[Any]:
    """A task as ``loop.create_task`` makes it: ``context`` (3.11+), and ``name`` and
    ``eager_start`` which Python 3.13.3+ hands the task factory too."""
    if options.get("context") is None:
        options.pop("context", None)
    return asyncio.Task(coro, loop=loop, **options)


def new_thread_loop() -> asyncio.AbstractEventLoop:
    """A loop for one worker thread: ``poll()`` where the OS has it (one fd fewer than epoll)."""
    try:
        if hasattr(selectors, "PollSelector"):
            return asyncio.SelectorEventLoop(selectors.PollSelector())
        return asyncio.new_event_loop()
    except OSError as exc:  # EMFILE for the loop's self-pipe: the host's fault, not the todo's
        raise InfrastructureError(
            f"cannot create an event loop for this worker thread: {exc}") from exc


def thread_loop_fds() -> int:
    """Open files one worker thread's loop holds."""
    return LOOP_FDS - 1 if hasattr(selectors, "PollSelector") else LOOP_FDS


class SharedLoop:
    """One loop thread for all async todos of a server, with a loop-lag watchdog."""

    defers = True

    def __init__(self, lag_warning: float = LAG_WARNING) -> None:
        self._lag_warning = lag_warning
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._to_thread = ToThreadPool()
        self._stop = threading.Event()
        self._labels: weakref.WeakKeyDictionary[asyncio.Task[Any], str] = (
            weakref.WeakKeyDictionary())
        self._queued: list[tuple[LoopTask[Any], Callable[[Finished[Any]], None],
                                 contextvars.Context]] = []
        self._wake_sent = False  # a call of _begin_queued is on its way to the loop
        self._closing = False  # close() began: nothing more is queued or started
        self._unheard: set[_Once[Any]] = set()  # callbacks of started tasks not yet called

    def start(self, label: str, fn: Callable[..., Awaitable[T]], *args: Any) -> LoopTask[T]:
        """``fn(*args)`` on the shared loop; ``result()`` waits for it."""
        LABEL.set(label)  # in the worker's context, which the loop task copies

        def run(task: LoopTask[T]) -> T:
            outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

            def deliver(finished: Finished[T]) -> None:
                try:
                    outcome.set_result(finished.result())
                except BaseException as exc:  # handed to the waiting thread
                    outcome.set_exception(exc)

            self._submit(task, deliver)
            return outcome.result()

        return LoopTask(run, fn, args, submit=self._submit)

    def _submit(self, task: LoopTask[T], callback: Callable[[Finished[T]], None]) -> None:
        """Queue ``task`` for the loop; ``callback`` gets its outcome there. Tasks queued
        while the loop has not yet taken the last ones share one wake-up of the loop."""
        loop = self._ensure_started()
        item = (task, callback, contextvars.copy_context())  # the worker's: CURRENT_RUN
        with self._lock:
            if self._closing:
                raise InfrastructureError("the shared event loop is closed: the server stopped")
            self._queued.append(item)
            wake = not self._wake_sent
            self._wake_sent = True
        if not wake:
            return
        try:
            loop.call_soon_threadsafe(self._begin_queued)
        except RuntimeError as exc:  # the loop closed meanwhile: this task will not start
            with self._lock:
                self._wake_sent = False
                if item not in self._queued:
                    return  # close() took it: its callback has its outcome
                self._queued.remove(item)
            raise InfrastructureError(f"the shared event loop is closed: {exc}") from exc

    def _begin_queued(self) -> None:
        """On the loop: start every queued task (once close() began, it ends them)."""
        with self._lock:
            self._wake_sent = False
            if self._closing:
                return
            queued, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        for task, callback, context in queued:
            once = _Once(callback, context, self._unheard, self._lock)
            created = context.run(loop.create_task, task.guarded())
            created.add_done_callback(functools.partial(_deliver, once))

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closing:
                raise InfrastructureError("the shared event loop is closed: the server stopped")
            if self._loop is None:
                self._loop = self._start_loop()
            return self._loop

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        """A new loop on its thread, with its watchdog. The host's refusal (no fd, no thread)
        is an InfrastructureError, so the todo is given back rather than failed, and leaves
        nothing behind to try again with."""
        try:
            loop = asyncio.new_event_loop()
        except OSError as exc:
            raise InfrastructureError(f"cannot create the shared event loop: {exc}") from exc
        loop.set_task_factory(self._labelled_task)
        loop.set_default_executor(self._to_thread)
        thread = threading.Thread(target=self._serve, args=(loop,), daemon=True,
                                  name="processgpt-sync-shared-loop")
        watchdog = threading.Thread(target=self._watch, args=(loop,), daemon=True,
                                    name="processgpt-sync-loop-watchdog")
        try:
            thread.start()
            watchdog.start()
        except RuntimeError as exc:  # "can't start new thread"
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
            loop.close()
            raise InfrastructureError(
                f"cannot start the shared event loop's threads: {exc}") from exc
        self._thread, self._watchdog = thread, watchdog
        return loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        """Run the loop until ``close()`` stops it. A task of an executor's own (a tool in a
        task group) that raises SystemExit or KeyboardInterrupt ends that task, and asyncio
        lets the exception out of the loop: the loop runs on, and the todo awaiting that
        task meets it and fails (as one raised in the executor's own task does)."""
        while True:
            try:
                loop.run_forever()
                return
            except (SystemExit, KeyboardInterrupt) as exc:
                logger.warning("a task on the shared event loop raised %r; the loop serves on, "
                               "the todo awaiting that task fails", exc,
                               extra={"action": "execute"})

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Probe the loop; when a probe waits longer than ``lag_warning``, name the todo whose
        task holds the loop, and say for how long once it lets go."""
        while not self._stop.wait(LAG_PROBE):
            answered = threading.Event()
            sent = time.monotonic()
            try:
                loop.call_soon_threadsafe(answered.set)
            except RuntimeError:
                return  # closed
            if answered.wait(self._lag_warning):
                continue
            holder = self._holder(loop)
            logger.warning("todo %s is blocking the shared event loop (%.1fs so far); every "
                           "async todo of this server waits", holder, time.monotonic() - sent,
                           extra={"action": "loop_lag", "todo_id": holder})
            while not answered.wait(1.0) and not self._stop.is_set():
                pass
            if not answered.is_set():  # the server stops: close() says what it leaves behind
                return
            logger.warning("todo %s blocked the shared event loop for %.1fs", holder,
                           time.monotonic() - sent,
                           extra={"action": "loop_lag", "todo_id": holder})

    def _labelled_task(self, loop: asyncio.AbstractEventLoop, coro: Any,
                       **options: Any) -> asyncio.Task[Any]:
        """Every task on the shared loop, tagged with the todo whose context created it."""
        task = _task(loop, coro, options)
        context: contextvars.Context | None = options.get("context")
        label = (context.get(LABEL) if context is not None else None) or LABEL.get()
        if label is not None:
            self._labels[task] = label
        return task

    def _holder(self, loop: asyncio.AbstractEventLoop) -> str:
        task = asyncio.current_task(loop)
        if task is None:
            return "(none: a callback, not a todo)"
        return self._labels.get(task, "(unknown)")

    def close(self) -> None:
        """Cancel the tasks still on the loop (todos were given back by then), then stop it.
        Every task's callback is told how it ended: one queued that had not started, or one
        that did not end when cancelled, as cancelled."""
        self._stop.set()
        with self._lock:
            self._closing = True
            loop, thread = self._loop, self._thread
        try:
            self._close(loop, thread)
        finally:
            with self._lock:
                queued, self._queued = self._queued, []
                unheard = list(self._unheard)
            for _task, callback, context in queued:
                context.run(callback, Finished.cancelled(
                    "the server stopped before the shared event loop started it"))
            for once in unheard:  # tasks that did not end when cancelled: their callers
                # stop waiting (one that ends later, on a loop left running, is not heard)
                once(Finished.cancelled("the server stopped; the coroutine did not end when "
                                        "cancelled"))

    def _close(self, loop: asyncio.AbstractEventLoop | None,
               thread: threading.Thread | None) -> None:
        if loop is None or thread is None:
            return
        try:
            ended = asyncio.run_coroutine_threadsafe(_end_tasks(), loop)
        except RuntimeError:
            return
        try:
            ended.result(timeout=LEFTOVER_WAIT + 1.0)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            logger.warning("the shared event loop did not end its tasks in time",
                           extra={"action": "stop_server"})
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LEFTOVER_WAIT + 1.0)
        if thread.is_alive():  # an executor blocks the loop: it is left behind, still open
            logger.warning("the shared event loop is still blocked by an executor; leaving it",
                           extra={"action": "stop_server"})
            return
        loop.close()
        self._to_thread.close()


async def _end_tasks() -> None:
    """On the shared loop: cancel every other task and give them a moment to end."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    if others:
        _done, pending = await asyncio.wait(others, timeout=LEFTOVER_WAIT)
        if pending:
            logger.warning("%d tasks on the shared event loop did not end when cancelled; "
                           "they are left as the loop closes", len(pending),
                           extra={"action": "stop_server"})
        for task in pending:  # said once here, not by asyncio again for each, at exit
            task._log_destroy_pending = False  # type: ignore[attr-defined]
    await asyncio.get_running_loop().shutdown_asyncgens()
