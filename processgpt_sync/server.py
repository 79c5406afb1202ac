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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any

from .errors import ConfigurationError, ServerFailed, StorageError, StorageUnavailable
from .events import EventBuffer, backoff
from .executor import Adapter, adapt, check_thread_safety
from .feedback import with_summary
from .human import HumanDesk, SuspendForHuman
from .models import Claim
from .outcomes import OutcomeWriter
from .recorder import Recorder
from .runs import CURRENT_RUN, UNSET, TodoRun
from .settings import EVENT_BATCH_SIZE, EVENT_FLUSH_INTERVAL, MAX_PENDING_EVENTS, Settings
from .signals import on_stop
from .stats import ServerStats
from .storage import Storage, open_storage
from .watch import CHANNELS, Watched, Watchers

logger = logging.getLogger(__name__)

MIN_POLL = 0.05  # seconds: first back-off step of a polling-only backend


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
        self._adapter: Adapter = adapt(executor)
        self._storage = storage
        self._owns_storage = storage is None
        self._log = logger.getChild(settings.agent_orch)
        self._extra = {"agent_orch": settings.agent_orch}
        self._cond = threading.Condition()
        self._runs: dict[tuple[str, str], TodoRun] = {}  # by claim: TodoRun.key
        self._busy = 0
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

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Server:
        """Connect, check the schema, start the threads; return at once."""
        with self._state_lock:
            if self._started:
                return self
            self._started = True
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
        # Twice the slots: a todo that timed out keeps its thread until its executor returns.
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.workers * 2, thread_name_prefix="processgpt-sync"
        )
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
        ``grace_seconds``), write every accepted event, give unfinished todos back, return."""
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
        self._log.info("stopping: waiting up to %gs for %d running todos", grace, len(self._runs),
                       extra={**self._extra, "action": "stop_server"})
        self._wake.set()
        self._join("claimer")
        try:
            self._drain(grace)
        finally:
            self._threads_stop.set()
            for name in ("heartbeat", "listener"):
                self._join(name)
            assert self._buffer is not None and self._pool is not None
            self._buffer.close(timeout=max(grace, 5.0))
            assert self._outcomes is not None
            self._outcomes.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._close_adapter()
            self._close_storage()
            self._stopped.set()
            self._log.info("stopped", extra={**self._extra, "action": "stopped"})

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
        """Counters since start: claimed, running, completed, failed, events written, run times."""
        with self._cond:
            tenants = [run.todo.tenant_id for run in self._runs.values()]
        return {
            **self._stats.snapshot(),
            "running": len(tenants),
            "tenants": self._stats.tenants(tenants),
            "events_pending": self._buffer.pending if self._buffer else 0,
            "listening": self._listening,
        }

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
            free = self.settings.workers - self._busy
            if free <= 0 or self._buffer.pending > MAX_PENDING_EVENTS:
                self._wake.wait(self.settings.poll_interval)
                self._wake.clear()
                continue
            self._wake.clear()
            try:
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
            except StorageError as exc:
                attempt += 1
                self._log.warning("claim failed (attempt %d), retrying: %s", attempt, exc,
                                  extra={**self._extra, "action": "claim"})
                self._stopping.wait(backoff(attempt, base=0.25))
                continue
            if attempt:
                self._log.info("database reachable again", extra={**self._extra, "action": "claim"})
                attempt = 0
            self._maybe_more = len(claims) == free or self._wake.is_set()
            for claim in claims:
                self._submit(claim)
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
        try:
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
                self._cond.notify_all()
            self._wake.set()

    # -- shutdown ------------------------------------------------------------------------------

    def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        with self._cond:
            while self._runs and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            leftovers = [run for run in self._runs.values() if not run.closed]
        for run in leftovers:
            self._cancel(run, "shutdown")
            run.close()
        with self._cond:  # runs already writing their outcome: let them finish
            writing_deadline = time.monotonic() + 10.0
            while any(r.closed and r not in leftovers for r in self._runs.values()):
                remaining = writing_deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        if not leftovers:
            return
        assert self._buffer is not None
        self._buffer.flush(timeout=10.0)
        storage = self._storage_()
        for attempt in range(1, 6):
            try:
                released = storage.release([r.claim for r in leftovers])
            except StorageUnavailable as exc:
                self._log.warning("giving todos back failed (attempt %d): %s", attempt, exc,
                                  extra={**self._extra, "action": "release"})
                time.sleep(backoff(attempt, base=0.5, cap=2.0))
                continue
            self._stats.count("released", released)
            self._log.info("gave back %d unfinished todos", released,
                           extra={**self._extra, "action": "release"})
            return
        self._log.error("could not give back %d todos; their leases expire in %ds and another "
                        "worker reclaims them", len(leftovers), self.settings.lease_seconds,
                        extra={**self._extra, "action": "release"})

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

    def _join(self, name: str) -> None:
        for thread in self._threads:
            current = thread is threading.current_thread()
            if thread.name == f"processgpt-sync-{name}" and not current:
                thread.join(timeout=10)

    def _close_adapter(self) -> None:
        closer = threading.Thread(target=self._adapter.close, daemon=True)
        closer.start()
        closer.join(timeout=5)
        if closer.is_alive():
            self._log.warning("an async executor is still blocking its event loop after stop",
                              extra=self._extra)

    def _close_storage(self) -> None:
        if self._owns_storage and self._storage is not None:
            self._storage.close()


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
