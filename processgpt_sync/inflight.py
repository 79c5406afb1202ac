"""What one server holds right now: its claimed todos, its free slots and the claimer's wake-up.

The claim loop, the worker threads, the heartbeat and the listener all read and change this
state; it lives here, behind one lock (``self.lock``), and nowhere else. It never talks to the
database and never runs user code.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from .models import Claim
from .runs import TodoRun

Key = tuple[str, str]  # TodoRun.key: one claim of a todo
LEAVING_POLL = 0.05  # seconds between looks at runs leaving the contexts around them
CLAIM_PAUSE_MAX = 5.0  # seconds: longest pause after the host failed to start todos


class InFlight:
    """The todos this server holds, and when the claimer should claim more."""

    def __init__(self, workers: int, spare_threads: int, *, fleet_limits: bool = False) -> None:
        """:param spare_threads: threads beyond ``workers`` for timed-out executors that have
            not returned yet; once they are used up, each such executor takes a slot.
        :param fleet_limits: the claim counts running todos in the database (``max_running``):
            each written outcome may let the next claim through, so it wakes the claimer."""
        self.lock = threading.Condition()
        self.wake = threading.Event()
        """Set when the claimer should claim now (new work, a free slot, stop)."""
        self.maybe_more = True
        """The last claim filled every slot, or a NOTIFY came: work may be waiting."""
        self.listening = False
        """NOTIFY arrives (the listener is connected); else the claimer polls."""
        self._unanswered: dict[str, float] = {}  # claim call id -> when it failed
        self._claim_under_way: str | None = None
        self.claim_unanswered = False
        """A claim call failed without an answer since the last heartbeat: the database may
        hold claims of this server it does not know of; the heartbeat runs at once to give them
        back."""
        self._workers = workers
        self._spare = spare_threads
        self._fleet_limits = fleet_limits
        self._runs: dict[Key, TodoRun] = {}
        self._by_todo: dict[str, list[TodoRun]] = {}  # the same runs by todo id, oldest first
        self._busy = 0
        self._tenants: Counter[str | None] = Counter()  # running todos by tenant
        self._overdue: set[Key] = set()  # timed out, executor still on its thread
        self._infra_attempt = 0
        self._claim_pause_until = 0.0

    # -- claim calls without an answer ---------------------------------------------------------

    def claim_failed(self, call_id: str) -> None:
        """A claim call got no answer: it may still run on the database, now or later."""
        with self.lock:
            self._unanswered[call_id] = time.monotonic()
            self.claim_unanswered = True
            if self._claim_under_way == call_id:  # moved, never out of both
                self._claim_under_way = None

    def claim_begins(self, call_id: str | None) -> None:
        """The claim call ``call_id`` is under way (None: no call is). Only the claimer
        writes it, and a stop reads it once: no lock on the claim's path."""
        self._claim_under_way = call_id

    def claims_left_unanswered(self, keep_seconds: float) -> list[str]:
        """What a stop names as it leaves: the unanswered calls and the one still under way,
        whose answer will never be read (the database waits for it, then gives its todos
        back). A heartbeat must not name that one: its todos are this server's to run."""
        with self.lock:
            under_way = self._claim_under_way
            return self.unanswered_claims(keep_seconds) + ([under_way] if under_way else [])

    def unanswered_claims(self, keep_seconds: float) -> list[str]:
        """The claim calls that got no answer in the last ``keep_seconds``: the heartbeat names
        them, so their todos are given back, even those of a call the network delivers late."""
        oldest = time.monotonic() - keep_seconds
        with self.lock:
            for call_id in [c for c, at in self._unanswered.items() if at < oldest]:
                del self._unanswered[call_id]
            return list(self._unanswered)

    # -- slots ---------------------------------------------------------------------------------

    def free_slots(self) -> int:
        """Slots the claimer may fill: workers minus running todos minus timed-out executors
        that hold a thread beyond the spares; and no more than ``workers`` outcomes waiting to
        be written (a slot is free once its executor returns, while its outcome is written)."""
        with self.lock:
            short = max(0, len(self._overdue) - self._spare)
            return min(self._workers - self._busy - short,
                       2 * self._workers - len(self._runs))

    def add(self, run: TodoRun) -> list[TodoRun]:
        """Hold ``run``; return earlier runs of the same todo still here (a revision claimed
        while its first run still runs): they have lost the todo."""
        with self.lock:
            same_todo = self._by_todo.setdefault(run.todo_id, [])
            stale = list(same_todo)
            same_todo.append(run)
            self._runs[run.key] = run
            self._tenants[run.todo.tenant_id] += 1
            self._busy += 1
            return stale

    def forget(self, run: TodoRun) -> None:
        """``run`` ended here (its outcome written): free its slot and let the claimer claim
        again."""
        with self.lock:
            self._drop(run)
            self.lock.notify_all()
        if self.maybe_more or self._fleet_limits:
            self.wake.set()

    def executor_returned(self, run: TodoRun) -> None:
        """The executor of ``run`` gave its thread back (perhaps long after a timeout): its
        slot is free, so the claimer claims the next todo while this one's outcome is
        written."""
        with self.lock:
            run.executor_returned = True
            self._overdue.discard(run.key)
            if run.slot_released:
                return
            run.slot_released = True
            self._busy -= 1
        if self.maybe_more:
            self.wake.set()

    def timed_out(self, run: TodoRun) -> None:
        """Free the slot of a timed-out run now: a blocking executor may never return, and
        until it does its thread counts against the spares."""
        with self.lock:
            self._drop(run)
            if not run.executor_returned:
                self._overdue.add(run.key)
            self.lock.notify_all()
        self.wake.set()

    def forget_unstarted(self, claims: list[Claim]) -> None:
        """Claims that never reached a worker thread: close and drop their runs."""
        with self.lock:
            for claim in claims:
                run = self._runs.get((claim.todo_id, claim.token))
                if run is not None and run.claim is claim:
                    run.close()
                    self._drop(run)
            self.lock.notify_all()

    def _drop(self, run: TodoRun) -> None:
        if self._runs.get(run.key) is run:
            del self._runs[run.key]
            tenant = run.todo.tenant_id
            self._tenants[tenant] -= 1
            if not self._tenants[tenant]:
                del self._tenants[tenant]
            same_todo = self._by_todo[run.todo_id]
            same_todo.remove(run)
            if not same_todo:
                del self._by_todo[run.todo_id]
        if not run.slot_released:
            run.slot_released = True
            self._busy -= 1

    # -- reading -------------------------------------------------------------------------------

    def runs(self) -> list[TodoRun]:
        with self.lock:
            return list(self._runs.values())

    def latest(self, todo_id: str) -> TodoRun | None:
        """The latest claim of ``todo_id`` running here (earlier ones were told they lost it)."""
        with self.lock:
            runs = self._by_todo.get(todo_id)
            return runs[-1] if runs else None

    def todo_ids(self) -> list[str]:
        with self.lock:
            return sorted(self._by_todo)

    def tenants(self) -> dict[str | None, int]:
        """Running todos by tenant (kept as they come and go: stats() is asked often)."""
        with self.lock:
            return dict(self._tenants)

    # -- waking the claimer --------------------------------------------------------------------

    def work_may_wait(self) -> None:
        """A NOTIFY said new work exists (or one may have been missed): claim now."""
        self.maybe_more = True
        self.wake.set()

    def pause_claiming(self) -> None:
        """The host failed to start todos: claim again only after a pause, longer each time."""
        with self.lock:
            self._infra_attempt += 1
            pause = min(CLAIM_PAUSE_MAX, 0.25 * 2 ** min(self._infra_attempt, 5))
            self._claim_pause_until = time.monotonic() + pause

    def host_recovered(self) -> None:
        """A todo ran to its end: the next infrastructure pause starts short again."""
        self._infra_attempt = 0

    def claim_pause_left(self) -> float:
        return self._claim_pause_until - time.monotonic()

    # -- shutdown ------------------------------------------------------------------------------

    def wait_empty(self, seconds: float) -> list[TodoRun]:
        """Wait up to ``seconds`` for every run to end; return the runs still open (executor
        still running, or the context around it still being left: an ended executor's outcome
        is on its way, see ``wait_written``)."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while self._runs and (remaining := deadline - time.monotonic()) > 0:
                self.lock.wait(remaining)
            return [run for run in self._runs.values() if not _returned(run)]

    def wait_left(self, runs: list[TodoRun], seconds: float) -> list[TodoRun]:
        """Wait up to ``seconds`` for ``runs``, whose executors returned, to leave the
        contexts around them (their outcomes are then on their way); return those still in
        them."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while (leaving := [r for r in runs if not _returned(r)]) and (
                    remaining := deadline - time.monotonic()) > 0:
                self.lock.wait(min(remaining, LEAVING_POLL))
            return leaving

    def wait_written(self, except_runs: list[TodoRun], seconds: float) -> list[str]:
        """Wait up to ``seconds`` for runs writing their outcome (closed, or their executor
        ended; not in ``except_runs``) to finish; return the todo ids still writing."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while writing := [r for r in self._runs.values()
                              if _returned(r) and r not in except_runs]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [r.todo_id for r in writing]
                self.lock.wait(remaining)
            return []


def _returned(run: TodoRun) -> bool:
    """Whether ``run``'s outcome is decided or on its way: closed, or its executor returned
    and the context around it was left."""
    return run.closed or run.executor_returned
