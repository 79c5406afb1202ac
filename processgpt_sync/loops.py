"""One event loop per worker thread, kept for the thread's life (anyio blocking portals).

An executor that blocks inside ``async def`` (CrewAI ``kickoff()``) then stalls only its own
thread. Trade-off: asyncio objects kept across todos are bound to the loop that made them.

Cancelling never waits for that loop: a blocked loop must not block the heartbeat, the listener
or ``stop()``. The cancel is handed to the loop with ``call_soon_threadsafe`` and runs there
once the loop is free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from anyio import CancelScope
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .blocking import explain
from .errors import InfrastructureError

T = TypeVar("T")
logger = logging.getLogger(__name__)


class LoopTask(Generic[T]):
    """One coroutine on a worker thread's loop, cancellable from any thread without waiting."""

    def __init__(self, portal: BlockingPortal, fn: Callable[..., Awaitable[T]],
                 *args: Any) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scope: CancelScope | None = None
        self._cancelled = False
        self._hooks: set[asyncio.Task[None]] = set()
        self._future: concurrent.futures.Future[T] = portal.start_task_soon(
            self._guarded, fn, args)

    async def _guarded(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        with CancelScope() as scope:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._scope = scope
                if self._cancelled:  # cancelled before the loop took the task
                    scope.cancel()
            return await fn(*args)
        raise concurrent.futures.CancelledError("cancelled by the server")

    def result(self) -> T:
        """Wait for the coroutine's outcome (on the calling worker thread); see
        ``blocking.explain`` for one failure."""
        try:
            return self._future.result()
        except RuntimeError as exc:
            explained = explain(exc)
            if explained is exc:
                raise
            raise explained from exc

    def cancel(self, before: Callable[[], Any] | None = None) -> None:
        """Cancel the coroutine, first awaiting ``before()`` (a cancel hook) on its loop;
        return at once whatever that loop is doing."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            loop = self._loop
        if loop is None:
            return  # _guarded cancels it as it starts
        try:
            loop.call_soon_threadsafe(self._start_cancel, before)
        except RuntimeError:
            pass  # the loop is closed: the coroutine has ended

    def _start_cancel(self, before: Callable[[], Any] | None) -> None:
        """On the loop."""
        if before is None:
            self._cancel_scope()
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
            logger.exception("the executor's cancel hook failed", extra={"action": "cancel"})
        finally:
            self._cancel_scope()

    def _cancel_scope(self) -> None:
        if self._scope is not None:
            self._scope.cancel()


class ThreadLoops:
    """Hands each calling thread its own portal; ``close()`` stops them all."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[AbstractContextManager[BlockingPortal]] = []

    def portal(self) -> BlockingPortal:
        """The calling thread's portal, started on first use."""
        portal: BlockingPortal | None = getattr(self._local, "portal", None)
        if portal is None:
            manager = start_blocking_portal(backend="asyncio", name="processgpt-sync-loop")
            try:
                portal = manager.__enter__()
            except (OSError, RuntimeError) as exc:  # EMFILE for the loop's self-pipe, no thread
                raise InfrastructureError(
                    f"cannot create an event loop for this worker thread: {exc}") from exc
            self._local.portal = portal
            with self._lock:
                self._open.append(manager)
        return portal

    def start(self, fn: Callable[..., Awaitable[T]], *args: Any) -> LoopTask[T]:
        """Run ``fn(*args)`` on the calling thread's loop."""
        return LoopTask(self.portal(), fn, *args)

    def close(self) -> None:
        with self._lock:
            managers, self._open = self._open, []
        for manager in managers:
            manager.__exit__(None, None, None)
