"""The threaded server: claim todos, run executors on a thread pool, write what they produce.

Threads of one server:
- claimer: claims up to the number of free slots in one call, woken by NOTIFY or a slow poll;
- worker pool (``ThreadPoolExecutor``): one todo per thread, from executor call to final write;
- heartbeat: renews every in-flight lease in one call, enforces per-todo timeouts;
- listener: a dedicated LISTEN connection for instant wake-ups and UI cancels;
- event flusher (``EventBuffer``): batched, ordered event writes.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any

from . import budget
from .errors import ConfigurationError, ServerFailed, StorageError
from .event_writer import EventBuffer
from .executor import Adapter, adapt, check_thread_safety
from .feedback import with_summary
from .human import HumanDesk, SuspendForHuman
from .infra import infrastructure_problem
from .models import Claim
from .outcomes import OutcomeWriter
from .recorder import Recorder
from .retrying import backoff
from .runs import CURRENT_RUN, UNSET, TodoRun
from .settings import EVENT_BATCH_SIZE, EVENT_FLUSH_INTERVAL, MAX_PENDING_EVENTS, Settings
from .signals import on_stop
from .stats import ServerStats
from .storage import Storage, open_storage
from .watch import CHANNELS, Watched, Watchers

logger = logging.getLogger(__name__)

MIN_POLL = 0.05  # seconds: first back-off step of a polling-only backend
STOP_MARGIN = 10.0  # seconds stop() may take beyond the grace period, whatever the network does
STOP_TAIL = 0.5  # seconds each last step of stop() (deregistering, closing) gets at least


class Server:
    """A running processgpt-sync server; see :func:`start` and :func:`serve`."""

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
        self._around_todo = around_todo or nullcontext
        check_thread_safety(executor, settings.workers)
        self._adapter: Adapter = adapt(executor, settings.loop)
        self._storage = storage
        self._owns_storage = storage is None
        self._log = logger.getChild(settings.agent_orch)
        self._extra = {"agent_orch": settings.agent_orch}
        self._cond = threading.Condition()
        self._runs: dict[tuple[str, str], TodoRun] = {}  # by claim: TodoRun.key
        self._busy = 0
        self._overdue: set[tuple[str, str]] = set()  # timed out, executor still on its thread
        self._wake = threading.Event()
        self._maybe_more = True
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._threads_stop = threading.Event()
        self._abort = threading.Event()
        self._started = False
        self._state_lock = threading.Lock()
        self._listening = False
        self._context = contextvars.copy_context()
        self._stats = ServerStats()
        self._threads: list[threading.Thread] = []
        self.failure: ServerFailed | None = None  # set when a server thread died
        self._pool: ThreadPoolExecutor | None = None
        self._buffer: EventBuffer | None = None
        self._outcomes: OutcomeWriter | None = None
        self._desk: HumanDesk | None = None
        self._recorder: Recorder | None = None
        self._started_at = time.time()
        self._infra_attempt = 0
        self._claim_pause_until = 0.0
        self._claim_gate = threading.Lock()  # a claim call and the orphan check never overlap

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Server:
        """Connect, check the schema, start the threads; return at once."""
        with self._state_lock:
            if self._started:
                return self
            self._started = True
        needs = budget.plan(self.settings.workers, self.settings.loop, self._adapter.uses_loops,
                            connections=self.settings.workers + 4)
        budget.ensure(needs, self._log, self._extra)
        if self._storage is None:
            self._storage = open_storage(self.settings)
        storage = self._storage
        try:
            storage.check_schema()
            known = storage.status(self.settings.agent_orch)
            event_types = storage.event_types()
        except BaseException:
            self._close_storage()
            raise
        if not known:
            self._log.warning(
                "no todo has agent_orch=%r yet: check it matches todolist.agent_orch of the "
                "work this server should do", self.settings.agent_orch,
                extra={**self._extra, "action": "start_server"})
        self._buffer = EventBuffer(
            storage,
            flush_interval=EVENT_FLUSH_INTERVAL,
            batch_size=EVENT_BATCH_SIZE,
            on_written=lambda n: self._stats.count("events_written", n),
            event_types=event_types,
            on_crash=self._thread_died,
        )
        self._buffer.start()
        self._outcomes = OutcomeWriter(storage, abort=self._abort, on_crash=self._thread_died)
        self._outcomes.start()
        self._desk = HumanDesk(storage, self._buffer.take, lambda: self._listening,
                               self._cancel)
        self._recorder = Recorder(storage, self._outcomes, self._buffer, log=self._log,
                                  extra=self._extra, count=self._stats.count,
                                  on_run_time=self._stats.run_time, abort=self._abort)
        # A todo that timed out keeps its thread until its executor returns: a few spare
        # threads, made only when needed, serve on (the claimer counts the rest as busy).
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.workers + budget.spare_threads(self.settings.workers),
            thread_name_prefix="processgpt-sync")
        listener = None
        if self.settings.listen and self.settings.behind_transaction_pooler:
            self._log.warning("the database URL goes through a transaction pooler: LISTEN does "
                              "not work there, polling every %gs instead (use a session "
                              "connection, e.g. Supabase port 5432, for instant wake-ups)",
                              self.settings.poll_interval, extra=self._extra)
        elif self.settings.listen:
            listener = storage.listener(CHANNELS)
        if listener is not None:
            try:
                listener.connect()
                self._listening = True
            except StorageError as exc:
                self._log.warning("LISTEN unavailable, polling instead: %s", exc, extra=self._extra)
        watched = Watched(
            running=self._running_snapshot, running_todo=self._running_todo, cancel=self._cancel,
            time_out=self._time_out, work_may_wait=self._work_may_wait,
            answer_arrived=self._answer_arrived, count=self._stats.count,
            is_listening=lambda: self._listening, set_listening=self._set_listening,
            registry=self._registry_row, claim_gate=lambda: self._claim_gate,
        )
        watchers = Watchers(watched, storage, self.settings, stop=self._threads_stop,
                            log=self._log, extra=self._extra)
        if listener is not None:
            self._spawn("listener", lambda: watchers.listen(listener))
        self._spawn("heartbeat", watchers.heartbeat)
        self._spawn("claimer", self._claim_loop)
        self._log.info(
            "serving agent_orch=%s with %d workers on %s (consumer %s)",
            self.settings.agent_orch, self.settings.workers, storage.backend,
            self.settings.consumer, extra={**self._extra, "action": "start_server"},
        )
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running todos finish for ``timeout`` seconds (default
        ``grace_seconds``), write every accepted event, give unfinished todos back, return.

        Returns within the grace period plus ``STOP_MARGIN`` (and a few ``STOP_TAIL``) even
        when the database is unreachable; what could not be written or given back is logged,
        and those todos return to the queue when their leases expire."""
        with self._state_lock:
            first = not self._stopping.is_set()
            self._stopping.set()
            running = self._buffer is not None  # start() got past its checks
        if not running:
            self._stopped.set()
            return
        if not first:
            self._stopped.wait()
            return
        grace = self.settings.grace_seconds if timeout is None else timeout
        end = time.monotonic() + grace + STOP_MARGIN

        def left(floor: float = 0.0) -> float:
            return max(floor, end - time.monotonic())

        self._log.info("stopping: waiting up to %gs for %d running todos", grace, len(self._runs),
                       extra={**self._extra, "action": "stop_server"})
        self._wake.set()
        self._join("claimer", left())
        try:
            self._drain(grace, left)
        finally:
            self._threads_stop.set()
            for name in ("heartbeat", "listener"):
                self._join(name, left())
            assert self._buffer is not None and self._pool is not None
            assert self._outcomes is not None
            if not self._buffer.close(timeout=left()):
                self._log.error("stopping: %d events could not be written in time (the database "
                                "is unreachable); they are lost", self._buffer.pending,
                                extra={**self._extra, "action": "stop_server"})
            self._outcomes.close(timeout=left(STOP_TAIL))
            # From here on nothing retries: a write still waiting fails instead of retrying
            # for ever against the closed pool, so no thread outlives the server.
            self._abort.set()
            self._deregister(left(STOP_TAIL))
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._close_adapter(left(STOP_TAIL))
            self._close_storage(left(STOP_TAIL))
            self._stopped.set()
            self._log.info("stopped in %.1fs", time.monotonic() - (end - grace - STOP_MARGIN),
                           extra={**self._extra, "action": "stopped"})

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
                while not requested.wait(0.5) and not self._stopping.is_set():
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
        with self._cond:
            tenants = [run.todo.tenant_id for run in self._runs.values()]
        last = self._storage.last_success if self._storage is not None else 0.0
        return {
            **self._stats.snapshot(),
            "running": len(tenants),
            "tenants": self._stats.tenants(tenants),
            "events_pending": self._buffer.pending if self._buffer else 0,
            "listening": self._listening,
            "db_ok_seconds_ago": round(time.monotonic() - last, 3) if last else None,
        }

    def healthy(self) -> tuple[bool, str]:
        """Whether this server serves: running, and the database answered within a lease."""
        if self.failure is not None:
            return False, str(self.failure)
        if self._stopping.is_set() or not self._started:
            return False, "not serving (stopped or not started)"
        age = self.stats()["db_ok_seconds_ago"]
        if age is None or age > self.settings.lease_seconds:
            return False, (f"no answer from the database for {age}s (lease "
                           f"{self.settings.lease_seconds}s)")
        return True, f"serving; the database answered {age}s ago"

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- claiming ----------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        storage = self._storage
        assert storage is not None and self._buffer is not None
        attempt = 0
        idle_wait = MIN_POLL
        while not self._stopping.is_set():
            free = self.settings.workers - self._busy - self._threads_short()
            pause = self._claim_pause_until - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)
                continue
            if free <= 0 or self._buffer.pending > MAX_PENDING_EVENTS:
                self._wake.wait(self.settings.poll_interval)
                self._wake.clear()
                continue
            self._wake.clear()
            try:
                with self._claim_gate:
                    claims = self._claim_and_submit(storage, free)
            except (StorageError, OSError) as exc:
                attempt += 1
                advice = infrastructure_problem(exc) or str(exc)
                self._log.warning("claim failed (attempt %d), retrying: %s", attempt, advice,
                                  extra={**self._extra, "action": "claim"})
                self._stopping.wait(backoff(attempt, base=0.25))
                continue
            if attempt:
                self._log.info("database reachable again", extra={**self._extra, "action": "claim"})
                attempt = 0
            if claims is None:
                return
            self._maybe_more = len(claims) == free or self._wake.is_set()
            if self._maybe_more:
                idle_wait = MIN_POLL
                continue
            if self._listening:
                self._wake.wait(self.settings.poll_interval)
            else:
                if claims:
                    idle_wait = MIN_POLL
                self._wake.wait(idle_wait)
                idle_wait = min(idle_wait * 2, self.settings.poll_interval)

    def _claim_and_submit(self, storage: Storage, free: int) -> list[Claim] | None:
        """One claim call, its todos handed to workers; None when stop() began meanwhile."""
        claims = storage.claim(
            agent_orch=self.settings.agent_orch,
            consumer=self.settings.consumer,
            limit=free,
            lease_seconds=self.settings.lease_seconds,
            max_claims=self.settings.max_claims,
            tenant_id=self.settings.tenant_id,
            fair=self.settings.fair,
            max_running=self.settings.max_running,
            max_running_per_tenant=self.settings.max_running_per_tenant,
        )
        if self._stopping.is_set():  # stop() began while this claim was in flight
            self._give_back_now(claims)
            return None
        for index, claim in enumerate(claims):
            try:
                self._submit(claim)
            except (OSError, RuntimeError) as exc:  # no thread or fd for it
                self._log.error("cannot start todos (%s); giving %d back",
                                infrastructure_problem(exc) or exc, len(claims) - index,
                                extra={**self._extra, "action": "claim"})
                self._forget_unstarted(claims[index:])
                self._pause_claiming()
                break
        return claims

    def _submit(self, claim: Claim) -> None:
        assert self._buffer is not None and self._pool is not None
        assert self._desk is not None
        run = TodoRun(claim, self._buffer, timeout=self.settings.timeout,
                      intermediate=self._recorder_().save_intermediate, asker=self._desk.ask)
        with self._cond:
            # Claimed again while an earlier run of it still runs here (a revision asked
            # mid-run): that run has lost the todo.
            stale = [r for r in self._runs.values() if r.todo_id == claim.todo_id]
            self._runs[run.key] = run
            self._busy += 1
        for old in stale:
            self._cancel(old, "lost")
        self._stats.count("claimed")
        self._stats.claimed_for(run.todo.tenant_id)
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("claimed todo %s (resume %s)", claim.todo_id, run.todo.resume.kind,
                            extra=self._todo_extra(run, "claim"))
        self._pool.submit(self._context.copy().run, self._execute, run)

    # -- running one todo ----------------------------------------------------------------------

    def _execute(self, run: TodoRun) -> None:
        if not run.begin():  # timed out or given back while it waited for a thread
            self._forget(run)
            return
        token = CURRENT_RUN.set(run)
        value: Any = UNSET
        error: BaseException | None = None
        self._stats.executing(1)
        if run.todo.resume.kind == "fresh":
            self._stats.pickup(run.claim.row.get("start_date"))
        try:
            if not run.cancel_event.is_set():  # else cancelled while it waited for a thread
                with self._around_todo():
                    run.todo = with_summary(run.todo, self.settings.summarize_feedback)
                    value = self._adapter.run(run.todo)
        except SuspendForHuman as suspend:
            value = self._recorder_().suspend(run, suspend.question)
        except BaseException as exc:  # SystemExit from argparse in a tool is this todo's failure
            error = exc
        finally:
            self._stats.executing(-1)
            CURRENT_RUN.reset(token)
            with self._cond:
                run.executor_returned = True
                self._overdue.discard(run.key)
        problem = infrastructure_problem(error)
        try:
            if problem is not None:
                self._give_back_broken(run, problem)
            else:
                self._infra_attempt = 0
                self._recorder_().finish(run, value, error)
        except Exception:
            self._log.exception("recording the outcome of todo %s failed", run.todo_id,
                                extra=self._todo_extra(run, "finish"))
        finally:
            self._forget(run)

    def _forget(self, run: TodoRun) -> None:
        with self._cond:
            if self._runs.get(run.key) is run:
                del self._runs[run.key]
            self._release_slot(run)
            self._cond.notify_all()
        if self._maybe_more:
            self._wake.set()

    def _threads_short(self) -> int:
        """Slots without a thread: timed-out executors still running beyond the spares."""
        return max(0, len(self._overdue) - budget.spare_threads(self.settings.workers))

    def _release_slot(self, run: TodoRun) -> None:
        """Caller holds ``self._cond``."""
        if not run.slot_released:
            run.slot_released = True
            self._busy -= 1

    # -- cancel, timeout, heartbeat ------------------------------------------------------------

    def _cancel(self, run: TodoRun, reason: str) -> None:
        with run.lock:
            if run.cancel_event.is_set() or run.closed:
                return
            run.cancel_reason = reason
            run.cancel_event.set()
        self._stop_executor(run, reason)

    def _stop_executor(self, run: TodoRun, reason: str) -> None:
        """Tell the executor (its cancel hook, a question it waits on) that the todo ended."""
        self._log.info("cancelling todo %s (%s)", run.todo_id, reason,
                       extra=self._todo_extra(run, "cancel"))
        if self._desk is not None:
            self._desk.wake(run.todo_id)
        try:
            self._adapter.cancel(run.todo)
        except Exception:
            self._log.exception("the executor's cancel hook failed for todo %s", run.todo_id,
                                extra=self._todo_extra(run, "cancel"))

    def _time_out(self, run: TodoRun) -> None:
        timeout = self.settings.timeout
        with run.lock:  # the outcome is the timeout's, whatever the executor returns now
            if run.closed:
                return
            run.closed = True
            run.cancel_reason = "timeout"
            run.cancel_event.set()
        self._stop_executor(run, "timeout")
        self._log.warning("todo %s timed out after %gs", run.todo_id, timeout,
                          extra=self._todo_extra(run, "timeout"))
        try:
            self._recorder_().fail(run, f"timed out after {timeout:g} s")
        except Exception:  # as on the normal path: the heartbeat must go on for the others
            self._log.exception("recording the timeout of todo %s failed", run.todo_id,
                                extra=self._todo_extra(run, "timeout"))
        finally:
            with self._cond:
                # Free the slot now: a blocking executor may never return; a spare thread
                # serves on.
                if self._runs.get(run.key) is run:
                    del self._runs[run.key]
                self._release_slot(run)
                if not run.executor_returned:
                    self._overdue.add(run.key)
                self._cond.notify_all()
            self._wake.set()

    # -- shutdown ------------------------------------------------------------------------------

    def _drain(self, grace: float, left: Callable[[], float]) -> None:
        deadline = time.monotonic() + grace
        with self._cond:
            while self._runs and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            leftovers = [run for run in self._runs.values() if not run.closed]
        for run in leftovers:
            self._cancel(run, "shutdown")
            run.close()
        with self._cond:  # runs already writing their outcome: let them finish
            while any(r.closed and r not in leftovers for r in self._runs.values()):
                if left() <= 0:
                    writing = [r.todo_id for r in self._runs.values() if r not in leftovers]
                    self._log.error("stopping: the outcomes of todos %s could not be stored in "
                                    "time; their leases expire in %ds and another worker runs "
                                    "them again", ", ".join(writing),
                                    self.settings.lease_seconds,
                                    extra={**self._extra, "action": "stop_server"})
                    break
                self._cond.wait(left())
        if not leftovers:
            return
        assert self._buffer is not None
        self._buffer.flush(timeout=left() / 2)  # leave time to give the todos back
        storage = self._storage_()
        claims = [r.claim for r in leftovers]
        attempt = 0
        while left() > 0:
            attempt += 1
            done, released = _bounded(lambda: storage.release(claims), left(), "release")
            if done and isinstance(released, int):
                self._stats.count("released", released)
                self._log.info("gave back %d unfinished todos", released,
                               extra={**self._extra, "action": "release"})
                return
            self._log.warning("giving todos back failed (attempt %d): %s", attempt,
                              released if done else "no answer",
                              extra={**self._extra, "action": "release"})
            self._stopping.wait(min(left(), backoff(attempt, base=0.5, cap=2.0)))
        self._log.error("could not give back todos %s (the database is unreachable); their "
                        "leases expire in %ds and another worker reclaims them",
                        ", ".join(c.todo_id for c in claims), self.settings.lease_seconds,
                        extra={**self._extra, "action": "release"})

    def _give_back_now(self, claims: list[Claim]) -> None:
        """Claims that arrived as stop() began: release them at once (one try)."""
        if not claims:
            return
        try:
            self._storage_().release(claims)
        except StorageError as exc:
            self._log.warning("could not give back %d todos claimed as the server stopped (%s); "
                              "their leases expire", len(claims), exc,
                              extra={**self._extra, "action": "release"})

    def _forget_unstarted(self, claims: list[Claim]) -> None:
        with self._cond:
            for claim in claims:
                run = self._runs.get((claim.todo_id, claim.token))
                if run is not None and run.claim is claim:
                    run.close()
                    del self._runs[run.key]
                    self._release_slot(run)
            self._cond.notify_all()
        self._give_back_now(claims)

    def _pause_claiming(self) -> None:
        """Infrastructure trouble: wait a little (longer each time) before claiming again."""
        self._infra_attempt += 1
        pause = min(5.0, 0.25 * 2 ** min(self._infra_attempt, 5))
        self._claim_pause_until = time.monotonic() + pause

    def _give_back_broken(self, run: TodoRun, problem: str) -> None:
        """The host, not the executor, broke this run: give the todo back to run again."""
        if not run.close():
            return
        self._log.error("todo %s could not run here: %s; giving it back to run again (not "
                        "recorded as failed)", run.todo_id, problem,
                        extra=self._todo_extra(run, "release"))
        dropped = (self._buffer.take(run.todo_id, run.claim.token)
                   if self._buffer is not None else [])
        if dropped:
            self._log.info("dropped %d unwritten events of todo %s", len(dropped), run.todo_id,
                           extra=self._todo_extra(run, "discard_events"))
        self._pause_claiming()
        self._recorder_().retry(lambda: self._storage_().release([run.claim]), run, "release")
        self._stats.count("released")

    def _registry_row(self, interval: float) -> dict[str, Any]:
        """This server as the heartbeat writes it into the server registry, with every todo it
        holds (the heartbeat gives back leases of this consumer it does not know: claims whose
        answer was lost). Called under the claim gate, so no claim is in flight."""
        stats = self.stats()
        with self._cond:
            known = sorted({run.todo_id for run in self._runs.values()})
        return {
            "known": known,
            "agent_orch": self.settings.agent_orch, "host": socket.gethostname(),
            "pid": os.getpid(), "version": _version(), "heartbeat_seconds": interval,
            "running": stats["running"], "completed": stats["completed"],
            "stats": {key: stats[key] for key in ("claimed", "failed", "released", "lost",
                                                  "events_pending", "listening",
                                                  "listener_reconnects", "pickup_seconds_p50",
                                                  "pickup_seconds_p95")},
        }

    def _deregister(self, timeout: float) -> None:
        storage = self._storage_()
        done, result = _bounded(lambda: storage.server_stopped(self.settings.consumer),
                                timeout, "deregister")
        if not done or isinstance(result, BaseException):
            self._log.warning("could not remove this server from the registry (%s); it shows "
                              "as dead once its heartbeat is stale",
                              result if done else "no answer",
                              extra={**self._extra, "action": "stop_server"})

    # -- helpers -------------------------------------------------------------------------------

    def _recorder_(self) -> Recorder:
        assert self._recorder is not None
        return self._recorder

    def _storage_(self) -> Storage:
        assert self._storage is not None
        return self._storage

    def _running_snapshot(self) -> list[TodoRun]:
        with self._cond:
            return list(self._runs.values())

    def _running_todo(self, todo_id: str) -> TodoRun | None:
        """The latest claim of ``todo_id`` running here (earlier ones were told they lost it)."""
        with self._cond:
            runs = [r for r in self._runs.values() if r.todo_id == todo_id]
        return runs[-1] if runs else None

    def _work_may_wait(self) -> None:
        """A NOTIFY said new work exists (or one may have been missed): claim now."""
        self._maybe_more = True
        self._wake.set()

    def _answer_arrived(self, job_id: str) -> None:
        if self._desk is not None:
            self._desk.notify(job_id)

    def _set_listening(self, listening: bool) -> None:
        self._listening = listening

    def _todo_extra(self, run: TodoRun, action: str) -> dict[str, Any]:
        return {**self._extra, "action": action, "todo_id": run.todo_id}

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:
                self._log.exception("the %s thread died; stopping the server", name,
                                    extra={**self._extra, "action": name})
                self._thread_died(name, exc)

        thread = threading.Thread(target=guarded, name=f"processgpt-sync-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _thread_died(self, name: str, exc: BaseException) -> None:
        """A server thread died: stop serving, and say so (``serve()`` raises ServerFailed)."""
        self.failure = ServerFailed(f"the {name} thread died ({exc!r}); the server "
                                    "stopped, its todos were given back or expire")
        threading.Thread(target=self.stop, daemon=True).start()

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
        done, _ = _bounded(self._adapter.close, timeout, "close executor")
        if not done:
            self._log.warning("an async executor is still blocking its event loop after stop",
                              extra=self._extra)

    def _close_storage(self, timeout: float = 5.0) -> None:
        if self._owns_storage and self._storage is not None:
            done, _ = _bounded(self._storage.close, timeout, "close storage")
            if not done:
                self._log.warning("closing the database connections did not finish in %gs",
                                  timeout, extra=self._extra)


def _bounded(fn: Callable[[], Any], timeout: float, what: str) -> tuple[bool, Any]:
    """Run ``fn`` on a daemon thread for at most ``timeout`` seconds: (finished, its result or
    the exception it raised). A call stuck on a dead network path is left behind."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"processgpt-sync-{what}")
    thread.start()
    thread.join(max(0.0, timeout))
    return (True, box[0]) if box else (False, None)


def _version() -> str:
    from . import __version__

    return __version__


def start(
    executor: Any,
    *,
    agent_orch: str | None = None,
    workers: int | None = None,
    database_url: str | None = None,
    settings: Settings | None = None,
    storage: Storage | None = None,
    **options: Any,
) -> Server:
    """Start a server in background threads and return its handle (Jupyter, Django, tests).

    Options are :class:`Settings` fields; unset ones come from the environment.
    """
    if settings is None:
        settings = Settings.from_env(
            agent_orch=agent_orch, workers=workers, database_url=database_url, **options
        )
    return Server(executor, settings, storage=storage).start()


def serve(
    executor: Any,
    *,
    agent_orch: str | None = None,
    workers: int | None = None,
    database_url: str | None = None,
    settings: Settings | None = None,
    env_file: str | None = None,
    processes: int = 1,
    **options: Any,
) -> None:
    """Serve until SIGINT/SIGTERM, then stop gracefully and return.

    :param env_file: a ``.env`` file to load first (nothing is read unless asked).
    :param processes: run this many server processes under one supervisor (see
        :mod:`processgpt_sync.supervisor`); the executor must be picklable.
    :raises ServerFailed: a server (or, with processes, a server process) failed.
    """
    if env_file is not None:
        from dotenv import load_dotenv

        load_dotenv(env_file)
    if settings is None:
        settings = Settings.from_env(
            agent_orch=agent_orch, workers=workers, database_url=database_url, **options
        )
    if processes == 1:
        Server(executor, settings).run_forever()
        return
    from .supervisor import EXIT_CONFIG, EXIT_OK, ChildSpec, Supervisor, check_picklable

    check_thread_safety(executor, settings.workers)
    spec = ChildSpec(executor=executor, settings=settings)
    check_picklable(spec)
    code = Supervisor(spec, processes).run()
    if code == EXIT_CONFIG:
        raise ConfigurationError("a server process failed on its configuration; see its log")
    if code != EXIT_OK:
        raise ServerFailed(f"a server process failed (exit code {code}); see its log")
