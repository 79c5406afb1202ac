"""Cancel hooks of blocking executors: off the caller's thread, a few at a time, none stuck
behind another.

The caller (heartbeat, listener, stop) must never wait on executor code, and a thousand todos
cancelled together must not take a thousand threads. So hooks run on at most ``HOOK_THREADS``
threads, made while hooks wait and ended when none does. A hook that blocks (a remote "cancel"
call to a service that is down) must not hold up the others, whose executors may wait for
theirs: one still running after ``HOOK_STUCK_AFTER`` seconds is named in a warning and no longer
counts, so the next waiting hook gets a thread of its own.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

HOOK_THREADS = 8  # hooks running at once, stuck ones aside
HOOK_STUCK_AFTER = 5.0  # seconds a hook may run before it stops counting against the bound


class HookThreads:
    """Runs hooks, in the order given, on threads made as they are needed."""

    def __init__(self, name: str = "processgpt-sync-cancel-hook") -> None:
        self._name = name
        self._limit = HOOK_THREADS
        self._stuck_after = HOOK_STUCK_AFTER
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._running: dict[int, tuple[float, str]] = {}  # thread → (its hook began, todo id)
        self._said_stuck: set[int] = set()  # threads whose current hook was named stuck
        self._threads = 0  # alive: running a hook, or about to take one
        self._timer: threading.Timer | None = None  # set while hooks wait behind fresh ones
        self._said_refused = False  # the host's refusal of a hook thread was said

    @property
    def threads(self) -> int:
        return self._threads

    def run(self, todo_id: str, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on a hook thread, after those given earlier (what it raises is
        logged).

        :raises RuntimeError: no thread could be made and none is there to run it later.
        """
        with self._lock:
            self._waiting.append((todo_id, hook))
            self._make_room(last=True)

    def _make_room(self, *, last: bool = False) -> None:
        """Start threads for waiting hooks while fewer than the bound run unstuck; with the lock
        held. ``last``: the newest waiting hook is dropped (and the error raised) if no thread
        could be made and none is alive to take it later."""
        now = time.monotonic()
        fresh = 0
        for ident, (began, todo_id) in self._running.items():
            if now - began < self._stuck_after:
                fresh += 1
            elif ident not in self._said_stuck:
                self._said_stuck.add(ident)
                logger.warning("the cancel hook of todo %s has run for %.0f s: the next waiting "
                               "hooks no longer wait for it", todo_id, now - began,
                               extra={"action": "cancel", "todo_id": todo_id})
        starting = self._threads - len(self._running)
        while len(self._waiting) > starting and fresh + starting < self._limit:
            thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # "can't start new thread": the host's limit
                if last and self._threads == 0:
                    self._waiting.pop()
                    raise
                if not self._said_refused:
                    self._said_refused = True
                    logger.warning("the host made no thread for a waiting cancel hook (%s): %d "
                                   "hooks wait for the %d hook threads alive", exc,
                                   len(self._waiting), self._threads,
                                   extra={"action": "cancel"})
                break  # a thread alive takes the waiting hooks in turn
            self._said_refused = False
            self._threads += 1
            starting += 1
        self._recheck_later(now)

    def _recheck_later(self, now: float) -> None:
        """With hooks waiting beyond the threads about to take them: look again when the
        first running hook would stop counting (a hook that ends takes the next itself)."""
        starting = self._threads - len(self._running)
        unstuck = [began for began, _ in self._running.values()
                   if now - began < self._stuck_after]
        if len(self._waiting) <= starting or self._timer is not None or not unstuck:
            return
        soonest = min(unstuck) + self._stuck_after
        timer = threading.Timer(max(0.0, soonest - now) + 0.01, self._recheck)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread for it: a hook ending takes the next instead
            return
        self._timer = timer

    def _recheck(self) -> None:
        with self._lock:
            self._timer = None
            self._make_room()

    def _serve(self) -> None:
        me = threading.get_ident()
        while True:
            with self._lock:
                self._running.pop(me, None)
                self._said_stuck.discard(me)
                now = time.monotonic()
                if not self._waiting or self._over_the_bound(now):
                    self._threads -= 1
                    self._recheck_later(now)
                    return
                todo_id, hook = self._waiting.popleft()
                self._running[me] = (now, todo_id)
                self._recheck_later(now)  # hooks given while this thread was starting
            try:
                hook()
            except BaseException:  # SystemExit, CancelledError: this thread goes on serving
                logger.exception("the cancel hook of todo %s raised", todo_id,
                                 extra={"action": "cancel", "todo_id": todo_id})

    def _over_the_bound(self, now: float) -> bool:
        """Whether the bound is full without this thread, whose hook has just returned: a
        hook that was stuck and ends must not add a thread to those made meanwhile."""
        fresh = sum(now - began < self._stuck_after for began, _ in self._running.values())
        others_starting = self._threads - len(self._running) - 1
        return fresh + others_starting >= self._limit
