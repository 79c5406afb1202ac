"""One event loop per worker thread, kept for the thread's life (anyio blocking portals).

An executor that blocks inside ``async def`` (CrewAI ``kickoff()``) then stalls only its own
thread. Trade-off: asyncio objects kept across todos are bound to the loop that made them.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")
POLL = 0.1  # seconds: how often a waiting worker thread checks its future


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
            portal = manager.__enter__()
            self._local.portal = portal
            with self._lock:
                self._open.append(manager)
        return portal

    @staticmethod
    def result(future: Future[T]) -> T:
        """Wait for a portal task's outcome."""
        return future.result()

    def close(self) -> None:
        with self._lock:
            managers, self._open = self._open, []
        for manager in managers:
            manager.__exit__(None, None, None)
