"""The open files and threads a server needs, checked before it starts.

At a thousand workers every fd counts: an asyncio loop holds 3, a database connection 1, a
running todo's own connection (to its model, a tool) 1, and the default soft ``RLIMIT_NOFILE``
of many systems is 1,024. Running out mid-flight fails todos with
EMFILE; refusing at start, with the numbers and the fix, loses nothing. When the soft limit is
too low but the hard limit allows, the soft limit is raised (as most servers do) and logged.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from .errors import ConfigurationError
from .hooks import HOOK_THREADS
from .loops import LOOP_FDS, thread_loop_fds

SERVER_THREADS = 10  # claimer, heartbeat, listener, event and outcome writers, the pool's 4,
#                      the shared loop and its watchdog
EXTRA_CONNECTIONS = 2  # the LISTEN connection and the start-up check's own
HEADROOM_FDS = 64  # logs, the metrics port, imported libraries
EXECUTOR_FDS = 1  # per worker: the socket a running todo's model or tool call holds
MAX_SPARE_THREADS = 4
TIMED_OUT_THREADS = 4  # threads recording timed-out todos: each waits for its todo's events
DEFERRED_THREADS = 64  # pool threads for todos on the shared loop: they hold one only to start
#                        and to record their outcome, not while they await


def spare_threads(workers: int, thread_safe: bool = True) -> int:
    """Threads beyond ``workers`` in the pool: a todo that timed out keeps its thread until its
    executor returns, and the next todo takes a spare one. Bounded, made only when needed.
    None for an executor that declares ``thread_safe = False``: the next todo waits for the
    one still running, as ``workers`` promises it."""
    return min(workers, MAX_SPARE_THREADS) if thread_safe else 0


def pool_threads(workers: int, deferred: bool, thread_safe: bool = True) -> int:
    """Threads of the worker pool: one per worker plus the spares; when todos are deferred
    (async on the shared loop), a few for their start and their outcome."""
    # (deferred todos' executors run on the loop, not on these threads: no limit applies)
    threads = workers + spare_threads(workers, thread_safe or deferred)
    return min(threads, DEFERRED_THREADS) if deferred else threads


@dataclass(frozen=True)
class Budget:
    """What one server needs at most."""

    workers: int
    loop: str
    loops: int
    loop_fds: int
    connections: int
    fds: int
    threads: int

    def describe(self) -> str:
        return (f"{self.workers} workers need up to {self.fds} open files ({self.connections} "
                f"database connections, {self.loops} event loops x {self.loop_fds}, one socket "
                f"per running todo, the files open now, {HEADROOM_FDS} spare) and "
                f"{self.threads} threads")


def plan(workers: int, loop: str, uses_loops: bool, connections: int,
         deferred: bool = False) -> Budget:
    """The budget of a server with ``workers`` and pool size ``connections``."""
    # cancel hooks stuck on a dead service are not counted: each is named in a warning
    threads = (threading.active_count() + pool_threads(workers, deferred) + SERVER_THREADS
               + TIMED_OUT_THREADS + HOOK_THREADS)
    if not uses_loops:
        loops = 0
    elif loop == "shared":
        loops = 1
    else:
        loops = workers + spare_threads(workers)
    connections += EXTRA_CONNECTIONS
    loop_fds = LOOP_FDS if loop == "shared" else thread_loop_fds()
    fds = open_fds() + connections + loops * loop_fds + workers * EXECUTOR_FDS + HEADROOM_FDS
    return Budget(workers=workers, loop=loop, loops=loops, loop_fds=loop_fds,
                  connections=connections, fds=fds, threads=threads)


def open_fds() -> int:
    """Files open in this process now (0 where /proc is absent)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def ensure(budget: Budget, log: logging.Logger, extra: dict[str, str]) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` when ``budget`` needs it; refuse what cannot fit.

    :raises ConfigurationError: the hard limit is below what the workers need.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    unlimited = resource.RLIM_INFINITY
    _ensure_threads(budget, log, extra)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == unlimited or budget.fds <= soft:
        return
    if hard != unlimited and budget.fds > hard:
        fits = max(0, workers_within(hard, budget))
        raise ConfigurationError(
            f"{budget.describe()}, but the open-file limit is {hard} (hard RLIMIT_NOFILE): "
            f"raise it (ulimit -Hn {budget.fds}, or LimitNOFILE= in a systemd unit), or use at "
            f"most {fits} workers" + (", or --loop shared" if budget.loops > 1 else ""))
    target = hard if hard != unlimited else max(budget.fds, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # above the kernel's nr_open: ask for what is needed
        target = budget.fds
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    log.info("raised the open-file limit (soft RLIMIT_NOFILE) from %d to %d: %s", soft, target,
             budget.describe(), extra={**extra, "action": "start_server"})


def _ensure_threads(budget: Budget, log: logging.Logger, extra: dict[str, str]) -> None:
    """Raise the soft ``RLIMIT_NPROC`` toward the hard one when the threads need it; refuse
    what the hard one cannot fit. The kernel does not apply it to root. It counts every
    process and thread of the user, so this only catches a limit too low for this server."""
    import resource

    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == unlimited or budget.threads <= soft:
        return
    if hard != unlimited and budget.threads > hard:
        if os.getuid() == 0:  # not applied to the host's root
            return
        raise ConfigurationError(
            f"{budget.describe()}, but RLIMIT_NPROC allows {hard} threads: raise it "
            f"(ulimit -u, LimitNPROC= in systemd) or use fewer workers")
    resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))
    log.info("raised the thread limit (soft RLIMIT_NPROC) from %d to %s: %s", soft,
             "unlimited" if hard == unlimited else hard, budget.describe(),
             extra={**extra, "action": "start_server"})


def workers_within(limit: int, budget: Budget) -> int:
    """About how many workers fit in ``limit`` open files with the same loop mode."""
    per_worker = 1 + EXECUTOR_FDS + (budget.loop_fds if budget.loops > 1 else 0)
    fixed = budget.fds - budget.workers * per_worker
    return (limit - fixed) // per_worker
