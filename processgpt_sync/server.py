"""The threaded server: claim todos, run each on a worker thread, stop within a bound.

Read it top-down: :meth:`Server.start` assembles the parts and starts the threads,
:meth:`Server.stop` is the shutdown. The work loop is ``claimer.Claimer.run``, one todo's run
``worker.TodoWorker.run``, the bounded shutdown steps ``shutdown.Shutdown``. Threads of one
server:

- claimer (``claimer``): claims up to the number of free slots in one call, woken by NOTIFY
  or a slow poll;
- worker pool (``pool.WorkerPool``): one todo per thread, from executor call to handing its
  outcome to the outcome writer;
- heartbeat and listener (``watch``): leases, timeouts, the registry; NOTIFY wake-ups and UI
  cancels;
- event writer (``event_writer``) and outcome writer (``outcomes``): batched writes.

The state they share is ``inflight.InFlight``; this module holds no todo state of its own.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

from . import budget, exit_stop, gc_tuning
from .claimer import Claimer
from .errors import SchemaMissing, ServerFailed, StorageError
from .event_writer import EventBuffer
from .events import EVENT_TYPES
from .executor import Adapter, adapt, check_thread_safety
from .gc_tuning import GcThreshold
from .human import HumanDesk
from .inflight import InFlight
from .outcomes import OutcomeWriter
from .pool import WorkerPool
from .recorder import Recorder
from .runs import TodoRun
from .settings import EVENT_BATCH_SIZE, EVENT_FLUSH_INTERVAL, Settings
from .shutdown import Shutdown, bounded
from .signals import on_stop
from .stats import ServerStats
from .storage import Storage, open_storage
from .storage.base import INSTALL_HINT, Listener
from .version import __version__
from .watch import CHANNELS, Watchers
from .worker import TodoWorker

logger = logging.getLogger(__name__)

STOP_MARGIN = 10.0  # seconds stop() may take beyond the grace period, whatever the network does
WAKE_WAIT = 0.3  # seconds stop() waits for its wake-up of the listener to be sent
STOP_TAIL = 0.5  # seconds each last step of stop() (deregistering, closing) gets at least
REGISTRY_STATS = ("claimed", "failed", "released", "lost", "events_pending", "listening",
                  "listener_reconnects", "pickup_seconds_p50", "pickup_seconds_p95")


@dataclass(frozen=True)
class _Parts:
    """What a started server runs with (made by ``start``, once the database answered)."""

    storage: Storage
    buffer: EventBuffer
    outcomes: OutcomeWriter
    desk: HumanDesk
    recorder: Recorder
    worker: TodoWorker
    pool: WorkerPool
    shutdown: Shutdown
    claimer: Claimer
    listener: Listener | None = None


class Health(NamedTuple):
    """What :meth:`Server.healthy` answers: ``ok, reason = server.healthy()`` unpacks it, and
    ``if not server.healthy():`` tests ``ok`` (a plain pair would always be true)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class Server:
    """A running processgpt-sync server; see :func:`processgpt_sync.start` and
    :func:`processgpt_sync.serve`."""

    def __init__(
        self,
        executor: Any,
        settings: Settings,
        *,
        storage: Storage | None = None,
        around_todo: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        """:param around_todo: a context manager entered around each todo on its worker
        thread (Django closes stale connections with it)."""
        self.settings = settings
        check_thread_safety(executor, settings.workers)
        self._thread_safe = getattr(executor, "thread_safe", True) is not False
        self._adapter: Adapter = adapt(executor, settings.loop)
        self._around_todo = around_todo or nullcontext
        # Async todos on the shared loop need no thread while they await; a context manager
        # around each todo needs the todo on one thread from start to end.
        self._deferred = self._adapter.defers and around_todo is None
        self._gc = GcThreshold(gc_tuning.wanted(settings.workers, settings.gc_threshold))
        self._storage = storage
        self._owns_storage = storage is None
        self._log = logger.getChild(settings.agent_orch)
        self._extra = {"agent_orch": settings.agent_orch}
        self._inflight = InFlight(
            settings.workers, budget.spare_threads(settings.workers, self._thread_safe),
            fleet_limits=(settings.max_running is not None
                          or settings.max_running_per_tenant is not None))
        self._stats = ServerStats()
        self._instance = uuid.uuid4().hex  # this run, on its leases and its registry row
        self._context = contextvars.copy_context()
        self._parts: _Parts | None = None
        self._state_lock = threading.Lock()
        self._started = False
        self._start_done = threading.Event()  # start() returned or raised (or never ran)
        self._start_done.set()
        self._stopping = threading.Event()  # stop() began: claim nothing more
        self._stopped = threading.Event()
        self._threads_stop = threading.Event()  # heartbeat and listener end
        self._abort = threading.Event()  # writes stop retrying
        self._threads: list[threading.Thread] = []
        self.failure: ServerFailed | None = None  # set when a server thread died

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Server:
        """Connect, check the schema, start the threads; return at once. If it raises before
        anything runs (the database unreachable, the schema missing) it may be called again;
        if it raises later, what it started is stopped. A stopped server cannot start again.
        """
        with self._state_lock:
            if self._stopping.is_set():
                raise RuntimeError("this server was stopped and cannot start again: make a new "
                                   "one (processgpt_sync.start(...) or Server(...).start())")
            if self._started:
                return self
            self._started = True
            self._start_done.clear()
        try:
            self._start()
        except BaseException:
            with self._state_lock:
                assembled = self._parts is not None
                if not assembled and not self._stopping.is_set():
                    self._started = False  # nothing runs: start() may be called again
            self._start_done.set()
            if assembled:
                self.stop(timeout=0)  # the writer threads, the pool, the connections
            raise
        self._start_done.set()
        return self

    def _start(self) -> None:
        needs = budget.plan(self.settings.workers, self.settings.loop, self._adapter.uses_loops,
                            connections=self.settings.workers + 4, deferred=self._deferred)
        budget.ensure(needs, self._log, self._extra)
        if self._storage is None:
            self._storage = open_storage(self.settings)
        try:
            parts = self._assemble(self._storage, self._check_database(self._storage))
        except BaseException:
            self._close_storage()
            if self._owns_storage:
                self._storage = None  # a second start() opens a new one
            raise
        with self._state_lock:
            self._parts = parts
        listener = self._listener(parts.storage)
        with self._state_lock:
            self._parts = parts = dataclasses.replace(parts, listener=listener)
        watchers = Watchers(parts.storage, self.settings, inflight=self._inflight,
                            worker=parts.worker, desk=parts.desk, stats=self._stats,
                            registry=self._registry_row, stop=self._threads_stop,
                            log=self._log, extra=self._extra, fail=self._fail)
        self._gc.hold(self._log, self._extra)  # before the first todo runs
        try:
            if listener is not None:
                self._spawn("listener", lambda: watchers.listen(listener))
            self._spawn("heartbeat", watchers.heartbeat)
            self._spawn("claimer", parts.claimer.run)
        except BaseException:  # no server to stop: give the threshold back now
            self._gc.release()
            raise
        exit_stop.track(self)  # a script that ends without stop() still stops gracefully
        self._log.info(
            "serving agent_orch=%s with %d workers on %s (consumer %s)",
            self.settings.agent_orch, self.settings.workers, parts.storage.backend,
            self.settings.consumer, extra={**self._extra, "action": "start_server"},
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running todos finish for ``timeout`` seconds (default
        ``grace_seconds``), write every accepted event, give unfinished todos back, return.

        Returns within the grace period plus ``STOP_MARGIN`` (and a few ``STOP_TAIL``) even
        when the database is unreachable (not when the host has no thread left to bound a
        step with: see ``shutdown``); what could not be written or given back is logged, and
        those todos return to the queue when their leases expire."""
        with self._state_lock:
            first = not self._stopping.is_set()
            self._stopping.set()
        # stop() while start() runs (another thread): what start() makes is stopped here
        self._start_done.wait()
        with self._state_lock:
            parts = self._parts  # None: start() did not get past its checks
        if parts is None:
            self._stopped.set()
            return
        if not first:
            self._stopped.wait()
            return
        grace = self.settings.grace_seconds if timeout is None else timeout
        begun = time.monotonic()
        end = begun + grace + STOP_MARGIN

        def left(floor: float = 0.0) -> float:
            return max(floor, end - time.monotonic())

        self._log.info("stopping: waiting up to %gs for %d running todos", grace,
                       len(self._inflight.runs()), extra={**self._extra, "action": "stop_server"})
        self._inflight.wake.set()
        if not parts.claimer.waiting_for_work:  # after a wait for work, no claim follows
            # the claim under way is waited for while the grace runs, not into the time the
            # give-back needs: once that wait runs out, the stop names the call as it leaves
            self._join("claimer", min(left(), grace + STOP_MARGIN / 2))
        try:  # the grace counts from here: what the claimer's join took is not given again
            grace_left = max(0.0, begun + grace - time.monotonic())
            parts.shutdown.drain(self._inflight, parts.buffer, parts.worker.cancel, grace_left,
                                 left)
        finally:
            try:
                self._close_down(parts, left)
            finally:  # whatever failed above: no retry outlives it, stop() and join() return
                self._abort.set()
                self._gc.release()
                self._stopped.set()
                exit_stop.untrack(self)
            self._log.info("stopped in %.1fs", time.monotonic() - begun,
                           extra={**self._extra, "action": "stopped"})

    def _close_down(self, parts: _Parts, left: Callable[..., float]) -> None:
        """stop() after the drain: end the server's threads, write what is left, leave the
        registry and close the pool, each step bounded by ``left()``."""
        self._threads_stop.set()
        if parts.listener is not None and self._inflight.listening:
            # else its wait for a notification ends within 1 s; on a dead network path
            # the wake is left behind (it ends within 2 s) rather than take the time of
            # the steps below
            bounded(parts.listener.wake, min(WAKE_WAIT, left()), "wake-listener")
        for name in ("heartbeat", "listener"):
            self._join(name, left())
        if not parts.buffer.close(timeout=left()):
            self._log.error("stopping: %d events could not be written in time (the database "
                            "is unreachable); they are lost", parts.buffer.pending,
                            extra={**self._extra, "action": "stop_server"})
        parts.outcomes.close(timeout=left(STOP_TAIL))
        # From here on nothing retries: a write still waiting fails instead of retrying
        # for ever against the closed pool, so no thread outlives the server.
        self._abort.set()
        parts.shutdown.deregister(left(STOP_TAIL), self._inflight.claims_left_unanswered(
            2.0 * self.settings.lease_seconds))
        dropped = parts.pool.shutdown()
        parts.worker.close()
        if dropped:  # todos not started were given back by the drain: these are outcomes
            self._log.warning("stopping: %d outcomes still waiting for a worker thread were "
                              "not recorded; those todos run again when their leases expire",
                              dropped, extra={**self._extra, "action": "stop_server"})
        self._close_adapter(left(STOP_TAIL))
        self._close_storage(left(STOP_TAIL))

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped; False if ``timeout`` ran out first."""
        return self._stopped.wait(timeout)

    def run_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (handlers only on the main thread), then stop gracefully.

        First signal: graceful stop. Second signal: exit at once; leases expire and other
        workers reclaim the todos.

        :raises ServerFailed: a server thread died, so serving stopped on its own; a
            supervisor should see a failure, not a clean exit.
        """
        requested = threading.Event()
        with on_stop(requested, self._log, self._extra):
            try:
                self.start()
                while not (requested.wait(0.5) or self._stopping.is_set() or self.failure):
                    pass
            except KeyboardInterrupt:
                self._log.info("interrupted: stopping gracefully", extra=self._extra)
            finally:
                self.stop()
        if self.failure is not None:
            raise self.failure

    def stats(self) -> dict[str, Any]:
        """Counters since start: claimed, running, completed, failed, events written, run times,
        and ``db_ok_seconds_ago``: seconds since the database last answered (None: never)."""
        tenants = self._inflight.tenants()
        last = self._storage.last_success if self._storage is not None else 0.0
        return {
            **self._stats.snapshot(),
            "running": sum(tenants.values()),
            "tenants": self._stats.tenants(tenants),
            "events_pending": self._parts.buffer.pending if self._parts else 0,
            "listening": self._inflight.listening,
            "db_ok_seconds_ago": round(time.monotonic() - last, 3) if last else None,
        }

    def healthy(self) -> Health:
        """Whether this server serves: running, and the database answered within a lease."""
        if self.failure is not None:
            return Health(False, str(self.failure))
        if self._stopping.is_set() or not self._started:
            return Health(False, "not serving (stopped or not started)")
        age = self.stats()["db_ok_seconds_ago"]
        if age is None or age > self.settings.lease_seconds:
            return Health(False, f"no answer from the database for {age}s (lease "
                                 f"{self.settings.lease_seconds}s)")
        return Health(True, f"serving; the database answered {age}s ago")

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- assembly --------------------------------------------------------------------------

    def _check_database(self, storage: Storage) -> frozenset[str]:
        """Check the schema; warn when no todo has this agent_orch; return the event types.
        A database without every event type this library writes is refused now: otherwise a
        progress event or an a2a status would fail its todo mid-run."""
        storage.check_schema()
        for warning in storage.schema_warnings():
            self._log.warning("%s", warning, extra={**self._extra, "action": "start_server"})
        event_types = storage.event_types()
        missing = EVENT_TYPES - event_types
        if missing:
            raise SchemaMissing(
                f"events.event_type lacks {', '.join(sorted(missing))}, which this library "
                f"writes (databases installed from older ProcessGPT files have fewer event "
                f"types): {INSTALL_HINT}, which adds them")
        if not storage.status(self.settings.agent_orch):
            self._log.warning(
                "no todo has agent_orch=%r yet: check it matches todolist.agent_orch of the "
                "work this server should do", self.settings.agent_orch,
                extra={**self._extra, "action": "start_server"})
        return event_types

    def _assemble(self, storage: Storage, event_types: frozenset[str]) -> _Parts:
        """Make and start the writers, the question desk, the recorder and the worker."""
        with ExitStack() as undo:  # a part that fails stops the writers started
            parts = self._make_parts(storage, event_types, undo)
            undo.pop_all()
        return parts

    def _make_parts(self, storage: Storage, event_types: frozenset[str],
                    undo: ExitStack) -> _Parts:
        stats, log, extra = self._stats, self._log, self._extra
        buffer = EventBuffer(storage, flush_interval=EVENT_FLUSH_INTERVAL,
                             batch_size=EVENT_BATCH_SIZE,
                             on_written=lambda n: stats.count("events_written", n),
                             event_types=event_types, on_crash=self._thread_died)
        buffer.start()
        undo.callback(buffer.close, timeout=0)
        outcomes = OutcomeWriter(storage, abort=self._abort, on_crash=self._thread_died)
        outcomes.start()
        undo.callback(outcomes.close, timeout=0)
        # A todo that timed out keeps its thread until its executor returns: a few spare
        # threads, made only when needed, serve on (the claimer counts the rest as busy).
        pool = WorkerPool(budget.pool_threads(self.settings.workers, self._deferred,
                                              self._thread_safe),
                          name="processgpt-sync")
        recorder = Recorder(storage, outcomes, buffer, log=log, extra=extra, count=stats.count,
                            on_run_time=stats.run_time, abort=self._abort,
                            stopping=self._stopping,
                            defer=pool.submit if self._adapter.defers else None)

        def cancel(run: TodoRun, reason: str) -> None:  # the desk is made before the worker
            worker.cancel(run, reason)

        desk = HumanDesk(storage, buffer, lambda: self._inflight.listening, cancel)
        worker = TodoWorker(self._adapter, self.settings, inflight=self._inflight,
                            recorder=recorder, desk=desk, stats=stats,
                            around_todo=self._around_todo, log=log, extra=extra,
                            submit=pool.submit if self._deferred else None)
        shutdown = Shutdown(storage, self.settings, stats=stats, log=log, extra=extra,
                            instance=self._instance)
        claimer = Claimer(storage, self.settings, inflight=self._inflight, buffer=buffer,
                          recorder=recorder, desk=desk, worker=worker, pool=pool,
                          shutdown=shutdown, stats=stats, stopping=self._stopping,
                          context=self._context, log=log, extra=extra,
                          instance=self._instance, refused=self._fail)
        return _Parts(storage, buffer, outcomes, desk, recorder, worker, pool, shutdown, claimer)

    def _listener(self, storage: Storage) -> Listener | None:
        """The LISTEN connection, connected; None where only polling works."""
        settings = self.settings
        if not settings.listen:
            return None
        if settings.behind_transaction_pooler:
            self._log.warning("the database URL goes through a transaction pooler: LISTEN does "
                              "not work there, polling every %gs instead (use a session "
                              "connection, e.g. Supabase port 5432, for instant wake-ups)",
                              settings.poll_interval, extra=self._extra)
            return None
        listener = storage.listener(CHANNELS)
        if listener is None:
            return None
        try:
            listener.connect()
            self._inflight.listening = True
        except StorageError as exc:
            self._log.warning("LISTEN unavailable, polling instead: %s", exc, extra=self._extra)
        return listener

    def _registry_row(self, interval: float) -> dict[str, Any]:
        """This server as the heartbeat writes it into the server registry, with the claim
        calls that got no answer lately (the heartbeat gives their todos back; a call the
        network delivers late is named until its lease would have run out twice)."""
        stats = self.stats()
        unanswered = self._inflight.unanswered_claims(2.0 * self.settings.lease_seconds)
        return {
            **({"unanswered": unanswered} if unanswered else {}),
            "agent_orch": self.settings.agent_orch, "host": socket.gethostname(),
            "pid": os.getpid(), "instance": self._instance, "version": __version__,
            "heartbeat_seconds": interval,
            "running": stats["running"], "completed": stats["completed"],
            "stats": {key: stats[key] for key in REGISTRY_STATS},
        }

    # -- threads -------------------------------------------------------------------------------

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:
                self._log.exception("the %s thread died; stopping the server", name,
                                    extra={**self._extra, "action": name})
                self._thread_died(name, exc)

        thread = threading.Thread(target=guarded, name=f"processgpt-sync-{name}", daemon=True)
        thread.start()  # the host may refuse it: then it is not one the stop waits for
        self._threads.append(thread)

    def _thread_died(self, name: str, exc: BaseException) -> None:
        """A server thread died: stop serving, and say so (``serve()`` raises ServerFailed)."""
        self._fail(f"the {name} thread died ({exc!r}); the server stopped, its todos were "
                   "given back or expire")

    def _fail(self, reason: str) -> None:
        """Stop serving for ``reason``: unhealthy from now on, and ``serve()`` raises
        ServerFailed with it."""
        self.failure = ServerFailed(reason)
        try:
            threading.Thread(target=self.stop, daemon=True).start()
        except RuntimeError as exc:  # no thread: run_forever() stops it; a handle's owner must
            self._log.error("cannot start a thread to stop the failed server (%s); stop() it",
                            exc, extra={**self._extra, "action": "stop_server"})

    def _join(self, name: str, timeout: float) -> None:
        for thread in self._threads:
            current = thread is threading.current_thread()
            if thread.name == f"processgpt-sync-{name}" and not current:
                thread.join(timeout=timeout)
                if thread.is_alive():
                    self._log.warning("stopping: the %s thread is still waiting on the "
                                      "database; leaving it behind", name,
                                      extra={**self._extra, "action": "stop_server"})

    def _close_adapter(self, timeout: float = 5.0) -> None:
        done, result = bounded(self._adapter.close, timeout, "close executor")
        if not done:
            self._log.warning("an async executor is still blocking its event loop after stop",
                              extra=self._extra)
        elif isinstance(result, Exception):
            self._log.error("closing the executor's event loops failed: %s", result,
                            exc_info=result, extra={**self._extra, "action": "stop_server"})

    def _close_storage(self, timeout: float = 5.0) -> None:
        if self._owns_storage and self._storage is not None:
            done, result = bounded(self._storage.close, timeout, "close storage")
            if not done:
                self._log.warning("closing the database connections did not finish in %gs",
                                  timeout, extra=self._extra)
            elif isinstance(result, Exception):
                self._log.error("closing the database connections failed: %s", result,
                                exc_info=result, extra={**self._extra, "action": "stop_server"})
