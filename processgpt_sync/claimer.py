"""The work loop: claim as many todos as there are free slots, hand each to a worker thread,
sleep until woken (NOTIFY, a freed slot) or the poll interval; without NOTIFY on Supabase, wait
for work on the database instead (``watch.WorkWaiter``).

It talks to the database (the claim call) and never runs user code: each claimed todo goes to
the pool as ``TodoWorker.run``.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .errors import StorageError
from .event_writer import EventBuffer
from .human import HumanDesk
from .inflight import InFlight
from .infra import infrastructure_problem
from .models import Claim, Claims
from .pool import WorkerPool
from .recorder import Recorder
from .retrying import backoff, denied_for_good, held_back_wait
from .runs import TodoRun
from .settings import MAX_PENDING_EVENTS, Settings
from .shutdown import Shutdown
from .stats import ServerStats
from .storage import Storage
from .watch import WorkWaiter, listening_poll_interval, work_waiter
from .worker import TodoWorker

MIN_POLL = 0.05  # seconds: first back-off step of a polling-only backend
CLAIM_BATCH = 256  # most todos one claim call takes: the first start without waiting for all
SUPERSEDED = "PS001"  # SQLSTATE of a claim by a run a newer one under its consumer name replaced
WRONG_ISOLATION = "PS002"  # SQLSTATE of a claim in a transaction stricter than READ COMMITTED


class Claimer:
    """Claims todos for one server until ``stopping`` is set."""

    def __init__(
        self, storage: Storage, settings: Settings, *, inflight: InFlight, buffer: EventBuffer,
        recorder: Recorder, desk: HumanDesk, worker: TodoWorker, pool: WorkerPool,
        shutdown: Shutdown, stats: ServerStats, stopping: threading.Event,
        context: contextvars.Context, log: logging.Logger, extra: dict[str, Any],
        instance: str | None = None, refused: Callable[[str], None] | None = None,
    ) -> None:
        """:param instance: this run of the server, named on every claim.
        :param refused: called with the reason when the database refuses every claim of this
            run (a newer run took its consumer name, or the transactions are too strict); the
            claimer then ends."""
        self._storage = storage
        self._instance = instance
        self._refused = refused
        self._settings = settings
        self._inflight = inflight
        self._buffer = buffer
        self._recorder = recorder
        self._desk = desk
        self._worker = worker
        self._pool = pool
        self._shutdown = shutdown
        self._stats = stats
        self._stopping = stopping
        self._log = log
        self._extra = {**extra, "action": "claim"}
        self._context = context  # the server creator's: each todo runs in a copy of it
        waits = work_waiter(storage, settings)
        self._waiter = (WorkWaiter(waits, settings, stop=stopping, log=log, extra=self._extra)
                        if waits is not None else None)

    @property
    def waiting_for_work(self) -> bool:
        """In a wait for work on the database: once stopping is set nothing is claimed after
        it, so stop() need not wait for the call to end."""
        return self._waiter is not None and self._waiter.waiting

    def run(self) -> None:
        """The claim loop (the claimer thread's body)."""
        inflight = self._inflight
        attempt = 0
        idle_wait = MIN_POLL
        held = 0  # claims in a row that left todos for a held process instance
        while not self._stopping.is_set():
            free = inflight.free_slots()
            pause = inflight.claim_pause_left()
            if pause > 0:
                self._stopping.wait(pause)
                continue
            if free <= 0 or self._buffer.pending > MAX_PENDING_EVENTS:
                inflight.wake.wait(self._settings.poll_interval)
                inflight.wake.clear()
                continue
            inflight.wake.clear()
            call_id = str(uuid.uuid4())
            try:
                claims = self._claim(min(free, CLAIM_BATCH), call_id)
            except (StorageError, OSError) as exc:
                if self._stopping.is_set():  # the stop names this call as it leaves
                    self._log.debug("claim under way at the stop failed: %s", exc,
                                    extra=self._extra)
                    return
                reason = _refusal(exc) or denied_for_good(exc, self._storage.last_success)
                if reason is not None:  # no retry can succeed: stop before claiming anything
                    inflight.claim_begins(None)  # refused: it claimed nothing
                    self._log.error("%s", reason, extra=self._extra)
                    if self._refused is not None:
                        self._refused(reason)
                    return
                inflight.claim_failed(call_id)
                attempt += 1
                advice = infrastructure_problem(exc) or str(exc)
                self._log.warning("claim failed (attempt %d), retrying: %s", attempt, advice,
                                  extra=self._extra)
                self._stopping.wait(backoff(attempt, base=0.25, after=exc))
                continue
            if attempt:
                self._log.info("database reachable again", extra=self._extra)
                attempt = 0
            if claims is None:
                return
            held_back = getattr(claims, "held_back", 0)  # a Storage of its own may give a list
            if held_back:
                self._stats.count("held_back", held_back)
            inflight.maybe_more = (len(claims) == min(free, CLAIM_BATCH)
                                   or inflight.wake.is_set())
            # todos left for a held process instance: claimed again soon (nothing announces
            # the instance free), less often the longer it stays held
            held = held + 1 if held_back else 0
            retry = min(held_back_wait(held), self._settings.poll_interval) if held else None
            if inflight.maybe_more:
                idle_wait = MIN_POLL
            elif inflight.listening:
                inflight.wake.wait(retry or listening_poll_interval(self._settings))
            elif self._waiter is not None:
                self._waiter.idle(bool(claims), retry_in=retry)
            else:
                if claims:
                    idle_wait = MIN_POLL
                inflight.wake.wait(min(idle_wait, retry or idle_wait))
                idle_wait = min(idle_wait * 2, self._settings.poll_interval)

    def _claim(self, free: int, call_id: str) -> Claims | None:
        """One claim call, its todos handed to workers; None when stop() began meanwhile."""
        settings = self._settings
        self._inflight.claim_begins(call_id)  # until answered: a stop names it if it must
        claims = self._storage.claim(
            agent_orch=settings.agent_orch, consumer=settings.consumer, limit=free,
            lease_seconds=settings.lease_seconds, max_claims=settings.max_claims,
            tenant_id=settings.tenant_id, fair=settings.fair, max_running=settings.max_running,
            max_running_per_tenant=settings.max_running_per_tenant, call_id=call_id,
            instance=self._instance,
        )
        if self._stopping.is_set():  # stop() began while this claim was in flight
            self._shutdown.give_back_now(claims)  # (and the stop names the call as it leaves)
            return None
        self._inflight.claim_begins(None)
        for index, claim in enumerate(claims):
            try:
                self._submit(claim)
            except (OSError, RuntimeError) as exc:  # no thread or fd for it
                self._log.error("cannot start todos (%s); giving %d back",
                                infrastructure_problem(exc) or exc, len(claims) - index,
                                extra=self._extra)
                self._inflight.forget_unstarted(claims[index:])
                self._shutdown.give_back_now(claims[index:])
                self._inflight.pause_claiming()
                break
            except BaseException:  # a bug: the claimer dies and the server stops (logged by
                # its thread), but the todos not started go back now, not at their leases' end
                self._inflight.forget_unstarted(claims[index:])
                self._shutdown.give_back_now(claims[index:])
                raise
        return claims

    def _submit(self, claim: Claim) -> None:
        run = TodoRun(claim, self._buffer, timeout=self._settings.timeout,
                      intermediate=self._recorder.save_intermediate, asker=self._desk.ask)
        for stale in self._inflight.add(run):
            self._worker.cancel(stale, "lost")
        self._stats.count("claimed")
        self._stats.claimed_for(run.todo.tenant_id)
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("claimed todo %s (resume %s)", claim.todo_id, run.todo.resume.kind,
                            extra={**self._extra, "todo_id": claim.todo_id})
        self._pool.submit(self._context.copy().run, self._worker.run, run)


def _refusal(exc: Exception) -> str | None:
    """Why the database refuses every claim of this run, or None for a failure worth a retry."""
    if not isinstance(exc, StorageError):
        return None
    if exc.code == SUPERSEDED:
        return (f"{exc}; this server stopped (give each server a PROCESSGPT_CONSUMER of its "
                "own)")
    if exc.code == WRONG_ISOLATION:
        return f"{exc}; this server stopped before claiming anything"
    return None
