"""Servers still running when the interpreter exits are stopped, all at once.

Without this, a notebook kernel that shuts down or a script that ends without ``stop()`` kills
the server's daemon threads mid-todo, and the todos wait for their leases to expire. The hook
runs where ``concurrent.futures`` runs its own, just before the interpreter joins its threads,
and ahead of that one: an async executor finishing its todo can still use its loop's default
executor (``getaddrinfo``, ``to_thread``). Every server stops in a thread of its own, so exit
takes the longest grace period, not their sum, and none claims while another drains. A forked
child skips the servers it inherited: they are its parent's.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  registers its exit hook first, so it runs after ours
import logging
import os
import threading
from typing import Protocol

logger = logging.getLogger(__name__)


class Stoppable(Protocol):
    def stop(self) -> None: ...


_lock = threading.Lock()
_running: dict[Stoppable, int] = {}  # server -> the pid that started it
_hooked = False


def track(server: Stoppable) -> None:
    """``server`` has started: stop it at exit unless :func:`untrack` comes first."""
    global _hooked
    with _lock:
        _running[server] = os.getpid()
        if _hooked:
            return
        try:
            threading._register_atexit(stop_running)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError) as exc:  # another interpreter, or exiting already
            logger.debug("stopping servers at exit through atexit instead: %s", exc)
            atexit.register(stop_running)
        _hooked = True


def untrack(server: Stoppable) -> None:
    with _lock:
        _running.pop(server, None)


def stop_running() -> None:
    """Stop every server this process started and still runs, each in a thread, and wait."""
    with _lock:
        servers = [s for s, pid in _running.items() if pid == os.getpid()]
    stoppers = [threading.Thread(target=s.stop, name="processgpt-sync-exit-stop")
                for s in servers]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
