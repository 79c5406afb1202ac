"""Executors: what users pass to ``serve()``, adapted to one blocking ``run(todo)`` call.

Accepted, detected in this order:
- an a2a-sdk ``AgentExecutor`` (async ``execute(context, event_queue)``), run by ``a2a.py``;
- an object with a blocking ``execute(todo, events)`` and optionally ``cancel(todo)``;
- a plain function ``fn(todo)``; an ``async def fn(todo)`` runs on the worker thread's own
  event loop.
The return value, when not None, is the todo's final result.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .errors import ConfigurationError
from .hooks import HookThreads
from .loops import Done, Finished, Loops, LoopTask, make_loops, result_of
from .todo import Todo

logger = logging.getLogger(__name__)


class Adapter(Protocol):
    """The one shape the server runs: blocking ``run`` on a worker thread, ``cancel`` from any;
    where ``defers``, also ``start``, which returns at once and calls ``done`` at the end."""

    def run(self, todo: Todo) -> Any: ...

    @property
    def defers(self) -> bool:
        """``start`` works: the todo need not hold a worker thread while its executor runs."""

    def start(self, todo: Todo, done: Done) -> None: ...

    def cancel(self, todo: Todo) -> None: ...

    def close(self) -> None: ...

    uses_loops: bool
    """True when todos run on asyncio loops (their fds and threads count in the budget)."""


def _blocking_start(adapter: Any, todo: Todo, done: Done) -> None:
    raise TypeError(f"{type(adapter).__name__} runs only on a worker thread (run)")


def _ended(future: Finished[Any]) -> tuple[Any, BaseException | None]:
    """A finished coroutine's value, or what it raised."""
    try:
        return result_of(future), None
    except BaseException as exc:  # as run() would have raised it on the worker thread
        return None, exc


class FunctionAdapter:
    """``fn(todo) -> result``."""

    def __init__(self, fn: Callable[[Todo], Any]) -> None:
        self._fn = fn

    def run(self, todo: Todo) -> Any:
        return _plain_result(self._fn(todo), self._fn)

    def cancel(self, todo: Todo) -> None:
        """Blocking functions stop cooperatively: they check ``todo.cancelled``."""

    def close(self) -> None:
        pass

    uses_loops = False
    defers = False
    start = _blocking_start


class BlockingObjectAdapter:
    """``obj.execute(todo, events) -> result`` and optional ``obj.cancel(todo)``."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._hooks = HookThreads()

    def run(self, todo: Todo) -> Any:
        return _plain_result(self._obj.execute(todo, todo.events), self._obj.execute)

    def cancel(self, todo: Todo) -> None:
        """Call ``obj.cancel(todo)`` on a hook thread (``hooks.HookThreads``): the caller
        (heartbeat, listener, stop) must not wait on executor code that may block, and a
        thousand todos cancelled together must not take a thousand threads."""
        cancel = getattr(self._obj, "cancel", None)
        if not callable(cancel):
            return
        hook = functools.partial(contextvars.copy_context().run,  # the caller's context
                                 _call_hook, cancel, todo)
        try:
            self._hooks.run(todo.id, hook)
        except RuntimeError as exc:  # "can't start new thread": the host's limit, not the hook's
            logger.warning("cannot start a thread for the cancel hook of todo %s (%s): the "
                           "host is out of threads; the executor sees todo.cancelled only",
                           todo.id, exc, extra={"action": "cancel", "todo_id": todo.id})

    def close(self) -> None:
        pass

    uses_loops = False
    defers = False
    start = _blocking_start


def _plain_result(result: Any, fn: Any) -> Any:
    """A blocking executor's result; a coroutine or generator is refused by name (a sync
    wrapper around async or generator code, which start cannot see), instead of failing
    later as a value that cannot be stored."""
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        result.close()  # never run: no "was never awaited" warning on top of this error
    elif not (inspect.isawaitable(result) or inspect.isasyncgen(result)):
        return result
    name = getattr(fn, "__qualname__", None) or repr(fn)
    raise TypeError(
        f"{name} returned a {type(result).__name__} instead of a result: an executor that "
        "awaits must be declared async def (on Python 3.12+, inspect.markcoroutinefunction "
        "marks a sync wrapper), and one that yields must return its result and send progress with "
        "todo.events")


def _call_hook(cancel: Callable[[Todo], Any], todo: Todo) -> None:
    try:
        cancel(todo)
    except BaseException:  # SystemExit (a tool's argparse), CancelledError: it failed too
        logger.exception("the executor's cancel hook failed for todo %s", todo.id,
                         extra={"action": "cancel", "todo_id": todo.id})


class AsyncFunctionAdapter:
    """``async def fn(todo)``: on the worker thread's own loop, or the shared one."""

    uses_loops = True

    def __init__(self, fn: Callable[[Todo], Any], loops: Loops) -> None:
        self._fn = fn
        self._loops = loops
        # Keyed by the Todo object: the same todo id may run twice here (a revision mid-run).
        self._tasks: dict[int, LoopTask[Any]] = {}
        self._lock = threading.Lock()

    @property
    def defers(self) -> bool:
        return self._loops.defers

    def run(self, todo: Todo) -> Any:
        task = self._begin(todo)
        try:
            return task.result()
        finally:
            self._end(todo)

    def start(self, todo: Todo, done: Done) -> None:
        task = self._begin(todo)

        def ended(future: Finished[Any]) -> None:
            self._end(todo)
            done(*_ended(future))

        try:
            task.then(ended)
        except BaseException:
            self._end(todo)
            raise

    def _begin(self, todo: Todo) -> LoopTask[Any]:
        task = self._loops.start(todo.id, self._fn, todo)
        with self._lock:
            self._tasks[id(todo)] = task
        if todo.cancelled:  # cancelled before it was registered here
            task.cancel()
        return task

    def _end(self, todo: Todo) -> None:
        with self._lock:
            self._tasks.pop(id(todo), None)

    def cancel(self, todo: Todo) -> None:
        """Returns at once, even while the function blocks its loop."""
        with self._lock:
            task = self._tasks.get(id(todo))
        if task is not None:
            task.cancel()

    def close(self) -> None:
        self._loops.close()


def check_thread_safety(obj: Any, workers: int) -> None:
    """Refuse ``workers > 1`` for an executor that declares ``thread_safe = False``."""
    if workers > 1 and getattr(obj, "thread_safe", True) is False:
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        raise ConfigurationError(
            f"{name} declares thread_safe = False, so it cannot run on {workers} worker "
            f"threads: use workers=1 and scale with processes (--processes {workers} "
            "--workers 1)"
        )


def _a2a_base() -> type | None:
    """a2a-sdk's AgentExecutor class, without importing a2a when nobody did."""
    module = sys.modules.get("a2a.server.agent_execution")
    return getattr(module, "AgentExecutor", None)


def is_a2a_executor(obj: Any) -> bool:
    """True for an a2a-sdk AgentExecutor, without importing a2a when nobody did."""
    base = _a2a_base()
    return base is not None and isinstance(obj, base)


A2A_SUPPORTED = "a2a-sdk >=0.3,<2"


def check_a2a_version(version: str) -> None:
    """Refuse a2a-sdk lines whose events and context the bridge does not read (0.2.x: other
    message shapes; 2.x: not released when this was written)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (0, 3) <= (int(match[1]), int(match[2])) < (2, 0):
        return
    raise ConfigurationError(
        f"a2a-sdk {version} is installed; AgentExecutors run on {A2A_SUPPORTED} (0.3 and 1.x): "
        "from a checkout of processgpt-sync, pip install '.[a2a]' (or '.[a2a-v03]' for "
        "executors written for a2a-sdk 0.3). Executors written for a2a-sdk 0.2 / "
        "process-gpt-agent-sdk 0.2 use another contract and must be ported: see docs/porting.md"
    )


def adapt(obj: Any, loop: str = "thread") -> Adapter:
    """Wrap any accepted executor in an Adapter; raise ConfigurationError for anything else.

    :param loop: where async executors run: "thread" (a loop per worker thread) or "shared".
    """
    if inspect.isclass(obj) and (_is_a2a_class(obj) or _needs_an_instance(obj)):
        raise ConfigurationError(
            f"{obj.__qualname__} is a class: pass an instance, e.g. serve({obj.__qualname__}()), "
            "so that its execute runs on it")
    if is_a2a_executor(obj):
        from importlib.metadata import version

        from .a2a import A2AAdapter

        check_a2a_version(version("a2a-sdk"))

        return A2AAdapter(obj, make_loops(loop))
    execute = getattr(obj, "execute", None)
    if execute is not None and callable(execute):
        if inspect.iscoroutinefunction(execute):
            raise ConfigurationError(
                f"{type(obj).__name__}.execute is async but the object is not an a2a-sdk "
                "AgentExecutor; subclass a2a.server.agent_execution.AgentExecutor, or make "
                "execute(todo, events) a plain def"
            )
        _check_call(execute, 2, f"{type(obj).__name__}.execute", "execute(todo, events)")
        _check_not_generator(execute, f"{type(obj).__name__}.execute")
        _check_cancel_hook(obj)
        return BlockingObjectAdapter(obj)
    if callable(obj):
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        _check_call(obj, 1, getattr(obj, "__qualname__", repr(obj)), "fn(todo)")
        inner = obj  # what a partial wraps: inspect does not look into an object's __call__
        while isinstance(inner, functools.partial):
            inner = inner.func
        called = getattr(inner, "__call__", None)  # noqa: B004
        for fn in (obj, inner, called):
            _check_not_generator(fn, name)
        if any(inspect.iscoroutinefunction(fn) for fn in (obj, inner, called)):
            return AsyncFunctionAdapter(obj, make_loops(loop))
        return FunctionAdapter(obj)
    raise ConfigurationError(
        f"{obj!r} is not an executor: pass a function fn(todo), an object with "
        "execute(todo, events), or an a2a-sdk AgentExecutor"
    )


def _check_cancel_hook(obj: Any) -> None:
    """A blocking executor's ``cancel(todo)`` runs on a thread of its own: one declared async
    would never run (its coroutine dropped), one that takes other arguments would fail on
    every cancel. Both are refused now."""
    cancel = getattr(obj, "cancel", None)
    if cancel is None or not callable(cancel):
        return
    name = f"{type(obj).__name__}.cancel"
    if inspect.iscoroutinefunction(cancel):
        raise ConfigurationError(
            f"{name} is async, but a blocking executor's cancel(todo) is called on a thread, "
            "not awaited: make it a plain def (or make the executor an a2a-sdk AgentExecutor, "
            "whose cancel(context, event_queue) is awaited)")
    _check_call(cancel, 1, name, "cancel(todo)")


def _is_a2a_class(cls: type) -> bool:
    base = _a2a_base()
    return base is not None and issubclass(cls, base)


def _needs_an_instance(cls: type) -> bool:
    """A class whose ``execute`` is an instance method (a static or class method
    ``execute(todo, events)`` runs on the class itself)."""
    return inspect.isfunction(inspect.getattr_static(cls, "execute", None))


def _check_not_generator(fn: Any, name: str) -> None:
    """A generator function returns before its body runs: every todo would fail on it."""
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"{name} is a generator function (it yields): an executor returns its result; "
            "send intermediate output with todo.events.progress(...) or "
            "todo.events.result(draft, final=False)")


def _check_call(fn: Any, arguments: int, name: str, expected: str) -> None:
    """Fail at start, not on every todo, when ``fn`` cannot take the arguments it will get."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return
    try:
        signature.bind(*range(arguments))
    except TypeError as exc:
        raise ConfigurationError(
            f"{name}{signature} cannot be called as {expected}: {exc}; an executor is a "
            "function fn(todo), an object with execute(todo, events), or an a2a-sdk "
            "AgentExecutor"
        ) from None
