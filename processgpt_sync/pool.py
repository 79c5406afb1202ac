"""The worker threads: one queue of calls, threads started as the work needs them, up to a bound.

Each todo is one call handed to an idle thread (or a new one, up to ``max_threads``). A
``ThreadPoolExecutor`` built a ``Future`` with its own lock and condition for every call, which
nobody here reads, and swallowed what a call raised; this pool hands over the call alone and
logs what escapes it. Threads are daemons: a server that was not stopped is stopped at
interpreter exit by the server itself, not by joining its threads.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_Call = tuple[Callable[..., object], tuple[Any, ...]]


class WorkerPool:
    """Runs calls on up to ``max_threads`` threads, in the order they were submitted."""

    def __init__(self, max_threads: int, name: str, *, wait_when_refused: bool = False) -> None:
        """``wait_when_refused``: a call that needs a new thread the system refuses waits for
        one of the pool's busy threads instead of raising, for calls that must run rather than
        be given back (it still raises when the pool has no thread at all)."""
        if max_threads < 1:
            raise ValueError(f"a worker pool needs at least one thread, not {max_threads}")
        self._max = max_threads
        self._name = name
        self._wait_when_refused = wait_when_refused
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # started and not yet told to end
        self._idle = 0  # waiting for a call and not yet promised one
        self._backlog = 0  # calls queued with every thread busy: the next free ones take them
        self._closed = False
        self._retiring = False  # closed, the queued calls still to run

    @property
    def threads(self) -> int:
        """Threads started and not yet told to end (they stay until :meth:`shutdown`)."""
        return self._threads

    @property
    def idle(self) -> int:
        """Threads waiting for a call that no queued call is promised to."""
        return self._idle

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a pool thread.

        :raises RuntimeError: the pool is shut down, or a thread was needed and the system
            refused one (and the pool waits for none, or has none); the call was not queued then.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            if self._idle:
                self._idle -= 1
            elif self._threads < self._max:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}_{self._threads}")
                try:
                    thread.start()
                    self._threads += 1
                except RuntimeError:  # the system made no thread
                    if (not (self._wait_when_refused and self._threads)
                            or sys.is_finalizing()):  # daemon threads end with the interpreter
                        raise  # nothing queued
                    self._backlog += 1  # a busy thread takes it when its call returns
            else:
                self._backlog += 1
            self._queue.put((fn, args))

    def shutdown(self) -> int:
        """Take no more calls, drop the queued ones, and let every thread end once its current
        call returns (without waiting for them); how many queued calls were dropped."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            dropped = 0
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                dropped += item is not None
            for _ in range(self._threads):
                self._queue.put(None)
            self._threads = self._idle = self._backlog = 0
        return dropped

    def retire(self) -> None:
        """Take no more calls; the threads run the calls already queued, then end."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._retiring = True
            for _ in range(self._threads):
                self._queue.put(None)
            self._threads = self._idle = self._backlog = 0

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # a call's own error handling failed: say so, keep serving
                logger.exception("a call on a worker thread raised")
            del item, fn, args  # drop the todo's references while this thread waits
            with self._lock:
                if self._retiring:
                    continue
                if self._closed:
                    return
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1
