"""Stopping a server within a bound, whatever the network does: let running todos finish for
the grace period, give the rest back, leave the server registry.

Every database call here has a deadline: a call stuck on a dead link is left behind on a daemon
thread, and what could not be done is logged (those todos return when their leases expire).
With no thread to be had (the host's thread limit), a call runs on the stopping thread, bounded
only by the connection's own timeouts, so stop() may then take longer than its bound.
This module never runs user code; cancel hooks run through the worker's ``cancel``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import StorageError, StorageUnavailable
from .event_writer import EventBuffer
from .inflight import InFlight
from .models import Claim
from .retrying import backoff, held_back_wait
from .runs import TodoRun
from .settings import Settings
from .stats import ServerStats
from .storage import Storage

HELD_RESERVE = 5.0  # seconds of the stop's time kept for the steps after the give-back (the
# outcomes on their way, the events, the registry) while todos wait for a held process instance
LEAVING_WAIT = 5.0  # seconds past the grace a stop waits for contexts around returned executors

logger = logging.getLogger(__name__)


def bounded(fn: Callable[[], Any], timeout: float, what: str) -> tuple[bool, Any]:
    """Run ``fn`` on a daemon thread for at most ``timeout`` seconds: (finished, its result or
    the exception it raised). A call stuck on a dead network path is left behind. With no
    thread to run it on (the host's thread limit), it runs here, bounded only by its own
    timeouts (the connection's TCP and statement timeouts). A call left behind that fails
    later is logged, as nobody else reads its error."""
    box: list[Any] = []
    left_behind = threading.Event()

    def run() -> None:
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)
            if left_behind.is_set():  # an outage (the pool the stop then closed) was said
                # already, as what could not be done; anything else is news
                level = logging.DEBUG if isinstance(exc, StorageUnavailable) else logging.WARNING
                logger.log(level, "stopping: %s, left behind unanswered, failed later: %s",
                           what, exc, extra={"action": "stop_server"})

    thread = threading.Thread(target=run, daemon=True, name=f"processgpt-sync-{what}")
    try:
        thread.start()
    except RuntimeError:  # "can't start new thread"
        run()
        return True, box[0]
    thread.join(max(0.0, timeout))
    if not box:
        left_behind.set()  # (an error that came meanwhile is returned below, maybe logged too)
    return (True, box[0]) if box else (False, None)


class Shutdown:
    """The steps of ``Server.stop()`` that talk to the database, each bounded by ``left()``."""

    def __init__(self, storage: Storage, settings: Settings, *, stats: ServerStats,
                 log: logging.Logger, extra: dict[str, Any], instance: str | None = None) -> None:
        """:param instance: this run of the server: deregistering removes only its row."""
        self._storage = storage
        self._instance = instance
        self._settings = settings
        self._stats = stats
        self._log = log
        self._extra = {**extra, "action": "stop_server"}

    def drain(self, inflight: InFlight, buffer: EventBuffer, cancel: Callable[[TodoRun, str], None],
              grace: float, left: Callable[[], float]) -> None:
        """Wait ``grace`` seconds for running todos; cancel the rest and give them back, then
        wait for the outcomes already being written. The give-back comes first: an outcome
        waiting for a row another transaction holds must not take the time it needs."""
        giving_back = []
        still_open = inflight.wait_empty(grace)
        # Executors that returned, the contexts around them still being left: their results
        # are on their way, and given back they would be dropped and the todos run again. A
        # while more for them (a context that hangs is given back after it).
        leaving = [run for run in still_open if run.leaving]
        if leaving:
            hanging = inflight.wait_left(leaving, min(LEAVING_WAIT, left() / 2))
            still_open = [run for run in still_open if run not in leaving or run in hanging]
        for run in still_open:
            cancel(run, "shutdown")
            # Not a run whose executor returned meanwhile and whose outcome went to the
            # writer first: given back, its result would be refused and the todo run again.
            if run.close() or run.cancel_reason == "shutdown":
                giving_back.append(run)
        if giving_back:
            buffer.flush(timeout=left() / 2)  # leave time to give the todos back
            self._release([r.claim for r in giving_back], left)
        writing = inflight.wait_written(giving_back, left())
        if writing:
            self._log.error("stopping: the outcomes of todos %s could not be stored in time; "
                            "their leases expire in %ds and another worker runs them again",
                            ", ".join(writing), self._settings.lease_seconds, extra=self._extra)

    def _release(self, claims: list[Claim], left: Callable[[], float]) -> None:
        """Give the claims back; those whose process instance another transaction holds are
        asked for again (0.5 s, 1 s, then every 2 s) while more than ``HELD_RESERVE`` of the
        stop's time is left for the steps after this one."""
        attempt = 0
        held = 0  # give-backs in a row that left todos for a held process instance
        reserve = 0.0  # once a todo waited for a held instance: the time kept for later steps

        def budget() -> float:
            return left() - reserve

        while budget() > 0:
            done, released = bounded(partial(self._storage.release, claims), budget(), "release")
            if done and isinstance(released, int):
                attempt = 0
                self._stats.count("released", released)
                if released:
                    self._log.info("gave back %d unfinished todos", released,
                                   extra={**self._extra, "action": "release"})
                # a Storage of its own may answer a plain count
                waiting = set(getattr(released, "held_back", ()))
                if not waiting:
                    return
                claims = [c for c in claims if c.todo_id in waiting]
                if not reserve:
                    self._log.info("todos %s wait to be given back: another transaction holds "
                                   "their process instance", ", ".join(sorted(waiting)),
                                   extra={**self._extra, "action": "release"})
                held += 1
                reserve = HELD_RESERVE
                time.sleep(max(0.0, min(budget(), held_back_wait(held))))
                continue
            attempt += 1
            held = 0
            self._log.warning("giving todos back failed (attempt %d): %s", attempt,
                              released if done else "no answer",
                              extra={**self._extra, "action": "release"})
            time.sleep(max(0.0, min(budget(), backoff(attempt, base=0.5, cap=2.0))))
        ids = ", ".join(c.todo_id for c in claims)
        if held:
            self._log.warning("todos %s were not written back in time: another transaction "
                              "holds their process instance; they are marked given back, and a "
                              "server claims them once it is free", ids,
                              extra={**self._extra, "action": "release"})
            return
        self._log.error("could not give back todos %s (the database is unreachable); their "
                        "leases expire in %ds and another worker reclaims them", ids,
                        self._settings.lease_seconds, extra={**self._extra, "action": "release"})

    def give_back_now(self, claims: list[Claim]) -> None:
        """Claims that arrived as stop() began, or never reached a thread: release them at
        once (one try; their leases expire otherwise)."""
        if not claims:
            return
        try:
            released = self._storage.release(claims)
        except StorageError as exc:
            self._log.warning("could not give back %d todos claimed but not started here (%s); "
                              "their leases expire", len(claims), exc,
                              extra={**self._extra, "action": "release"})
            return
        self._stats.count("released", released)
        if held_back := getattr(released, "held_back", ()):
            self._log.warning("todos %s claimed but not started here are marked given back: "
                              "another transaction holds their process instance, and a server "
                              "claims them once it is free", ", ".join(held_back),
                              extra={**self._extra, "action": "release"})

    def deregister(self, timeout: float, unanswered: list[str]) -> None:
        """Leave the server registry (``status`` no longer lists this server), giving back the
        claims of the ``unanswered`` claim calls (no heartbeat may come to name them now)."""
        consumer = self._settings.consumer
        done, result = bounded(
            lambda: self._storage.server_stopped(consumer, self._instance, unanswered),
            timeout, "deregister")
        if not done or isinstance(result, BaseException):
            left = (f"; what the claim calls {', '.join(unanswered)} (no answer came) claimed "
                    "runs again once its leases run out" if unanswered else "")
            self._log.warning("could not remove this server from the registry (%s); it shows "
                              "as dead once its heartbeat is stale%s",
                              result if done else "no answer", left, extra=self._extra)
