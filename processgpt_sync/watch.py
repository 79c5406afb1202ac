"""The server's watchers: the heartbeat (leases, registry, per-todo timeouts) and the listener
(NOTIFY: new work, UI cancels, answers); and where no NOTIFY can arrive (Supabase), the
claimer's wait for work on the database.

Each runs on its own thread. They read the server's state through ``InFlight`` and end runs
through the ``TodoWorker``; they talk to the database, never run user code themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .errors import StorageError, StorageUnavailable
from .human import ANSWER_CHANNEL, HumanDesk
from .inflight import InFlight
from .retrying import backoff, denied_for_good
from .settings import Settings
from .stats import ServerStats
from .storage import Storage
from .storage.base import Listener
from .worker import CANCEL_OVERDUE, TodoWorker

TODO_CHANNEL = "processgpt_sync_todo"
CANCEL_CHANNEL = "processgpt_sync_cancel"
CHANNELS = (TODO_CHANNEL, CANCEL_CHANNEL, ANSWER_CHANNEL)
WATCHDOG_TICK = 0.2  # seconds between timeout checks
LISTEN_WAIT = 1.0  # seconds one LISTEN wait may block before checking for stop
LISTEN_PROBE_INTERVAL = 8.0  # seconds between checks that the listener still listens (each
# bounded by the storage's probe deadline, 5 s: a dead LISTEN connection is found within 13 s)
POLLING_HEARTBEAT = 2.0  # seconds between heartbeats when UI cancels cannot arrive by NOTIFY
MIN_RETRY = 0.05  # seconds: first back-off step after a wait saw work a claim did not get
CUT_SHORT = 0.5  # seconds: a wait for work that found nothing sooner did not wait at all
CUT_SHORT_PAUSE = 1.0  # seconds paused after such a wait before the next


def idle_interval(settings: Settings) -> float:
    """Seconds between registry refreshes of an idle server: the row's ``heartbeat_seconds``."""
    return settings.lease_seconds / 4


def listening_poll_interval(settings: Settings) -> float:
    """Seconds between the claims of a listening server that nothing wakes. NOTIFY announces
    new, answered and revised work; what sends none is a lease running out (looked for as
    often as the server refreshes its registry row, lease/4, so work of a server that died is
    claimed again within 1.25 leases) and, under fleet-wide limits, a slot another server
    frees (looked for every ``poll_interval``)."""
    if settings.max_running is not None or settings.max_running_per_tenant is not None:
        return settings.poll_interval
    return max(settings.poll_interval, idle_interval(settings))


@runtime_checkable
class WaitsForWork(Protocol):
    """A storage that can wait on the database until there is work (Supabase)."""

    wait_seconds: float

    def wait_for_work(self, *, agent_orch: str, consumer: str, seconds: float,
                      tenant_id: str | None = None) -> bool: ...


def work_waiter(storage: Storage, settings: Settings) -> WaitsForWork | None:
    """The storage, if an idle server should wait for work through it instead of polling
    (``listen=False`` turns instant wake-ups off here too: no connection held waiting)."""
    if settings.listen and isinstance(storage, WaitsForWork) and storage.wait_seconds > 0:
        return storage
    return None


class WorkWaiter:
    """The claimer's idle wait where no NOTIFY can wake it: long calls that wait on the database
    until a claim would find work, so an idle server makes one request per ``wait_seconds`` and
    still starts new work within about 100 ms. Each call refreshes the server's registry row, so
    an idle server needs no heartbeat."""

    def __init__(self, storage: WaitsForWork, settings: Settings, *, stop: threading.Event,
                 log: logging.Logger, extra: dict[str, Any]) -> None:
        self._storage = storage
        self.settings = settings
        self._stop = stop
        self._log = log
        self._extra = extra
        self._saw_work = False
        self._retry = MIN_RETRY
        self._failures = 0
        self.waiting = False
        """In a call: the claimer claims nothing after it once stop is set, so stop() need
        not wait for it."""

    def idle(self, claimed: bool, *, retry_in: float | None = None) -> None:
        """Return when a claim may find work, or on stop; ``claimed``: the last claim got
        todos. ``retry_in``: it left todos for a held process instance, to be claimed again
        after that many seconds (a wait for work would return at once: they wait); one wait of
        no time still refreshes the registry row, which an idle server's heartbeat does not."""
        if retry_in is not None:
            self._saw_work = False
            self._stop.wait(retry_in)
            if not self._stop.is_set():
                self._wait(0.0)
            return
        if claimed or not self._saw_work:
            self._retry = MIN_RETRY
        else:  # work seen that the claim did not get (fleet limits, another server took it)
            self._stop.wait(self._retry)
            self._retry = min(self._retry * 2, self.settings.poll_interval)
        self._saw_work = False
        seconds = min(self._storage.wait_seconds, idle_interval(self.settings))
        while not self._stop.is_set():
            began = time.monotonic()
            found = self._wait(seconds)
            if found is None:
                return
            if found:
                self._saw_work = True
                return
            took = time.monotonic() - began
            if took < CUT_SHORT:  # a role's statement_timeout of a second or less leaves the
                # database no time to wait: a pause here, not another call at once
                self._stop.wait(min(CUT_SHORT_PAUSE, seconds - took))

    def _wait(self, seconds: float) -> bool | None:
        """One wait for work: whether there is some, or None when it failed (logged, after a
        back-off) or stop() ended it."""
        self.waiting = True
        try:
            found = self._storage.wait_for_work(
                agent_orch=self.settings.agent_orch, consumer=self.settings.consumer,
                seconds=seconds, tenant_id=self.settings.tenant_id)
        except Exception as exc:
            if self._stop.is_set():  # stop() closed the storage under this call
                self._log.debug("wait for work ended by stop: %r", exc, extra=self._extra)
                return None
            if not isinstance(exc, StorageError):
                raise
            self._failures += 1
            self._log.warning("waiting for work failed (attempt %d), claiming instead: %s",
                              self._failures, exc, extra=self._extra)
            self._stop.wait(backoff(self._failures, base=0.25, cap=self.settings.poll_interval,
                                    after=exc))
            return None
        finally:
            self.waiting = False
        self._failures = 0
        return found


class Watchers:
    """Runs the heartbeat and listener loops for one server until ``stop`` is set."""

    def __init__(self, storage: Storage, settings: Settings, *, inflight: InFlight,
                 worker: TodoWorker, desk: HumanDesk, stats: ServerStats,
                 registry: Callable[[float], dict[str, Any]], stop: threading.Event,
                 log: logging.Logger, extra: dict[str, Any],
                 fail: Callable[[str], None] | None = None) -> None:
        """:param registry: this server's registry row, given the heartbeat interval.
        :param fail: called (once) with the reason when the server must stop: the database
            says a newer run took its consumer name, or it refused its key for good."""
        self._fail = fail
        self._inflight = inflight
        self._worker = worker
        self._desk = desk
        self._stats = stats
        self._registry = registry
        self._storage = storage
        self.settings = settings
        self._stop = stop
        self._log = log
        self._extra = extra

    def heartbeat(self) -> None:
        """Renew every in-flight lease and refresh the server registry row, in one call per
        interval; enforce timeouts; say loudly when the database is out of reach too long."""
        storage = self._storage
        idle = idle_interval(self.settings)
        # Where the claimer's waits for work refresh the registry row, an idle server makes no
        # heartbeat at all: after the first, and one more once its last todo finished.
        quiet_when_idle = work_waiter(storage, self.settings) is not None
        busy = True
        next_renewal = time.monotonic()
        next_alarm = 0.0
        failing = False
        failed = False  # the server was told to stop
        while not self._stop.wait(WATCHDOG_TICK):
            now = time.monotonic()
            runs = self._inflight.runs()
            interval = idle
            if not self._inflight.listening:
                # No NOTIFY for UI cancels (never, or not since the listener's connection was
                # lost): the heartbeat reports them sooner.
                interval = min(interval, POLLING_HEARTBEAT)
                if runs:
                    next_renewal = min(next_renewal, now + interval)
            for run in runs:
                if run.deadline is not None and now > run.deadline and not run.closed:
                    self._worker.time_out(run)
                elif (run.cancelled_at is not None and not run.cancel_overdue and run.began
                      and now - run.cancelled_at > CANCEL_OVERDUE and not run.closed
                      and not run.executor_returned):
                    self._worker.cancel_overdue(run)
            # A claim whose answer was lost: find its todos now, not at the next renewal.
            orphans_possible = self._inflight.claim_unanswered
            if now < next_renewal and (failing or not orphans_possible):
                continue
            # A closed run's outcome is still being written (the database may be slow, or its
            # row held): its lease is renewed until then, so no other server takes it over.
            live = [r for r in runs if r.cancel_reason not in ("lost", "deleted")]
            # a claim without an answer may still reach the database: named until it expires
            unanswered = bool(self._inflight.unanswered_claims(2.0 * self.settings.lease_seconds))
            if (quiet_when_idle and not live and not busy and not self._inflight.listening
                    and not orphans_possible and not unanswered):
                next_renewal = now + idle
                continue
            try:
                self._inflight.claim_unanswered = False
                report = storage.heartbeat(self.settings.consumer, [r.claim for r in live],
                                           self.settings.lease_seconds, self._registry(idle))
            except StorageError as exc:
                if self._stop.is_set():  # stop() ended meanwhile (its pool closed): no retry
                    self._log.debug("heartbeat cut short by the stop: %s", exc,
                                    extra={**self._extra, "action": "heartbeat"})
                    return
                denied = denied_for_good(exc, storage.last_success)
                if denied is not None and not failed:
                    failed = True
                    self._log.error(denied, extra={**self._extra, "action": "heartbeat"})
                    if self._fail is not None:
                        self._fail(denied)
                failing = True
                self._inflight.claim_unanswered |= orphans_possible
                self._log.warning("heartbeat failed, retrying: %s", exc,
                                  extra={**self._extra, "action": "heartbeat"})
                # as soon as may be, unless the service asked for a pause (a rate limit's
                # Retry-After): waited, though never past the interval the leases rely on
                asked = min(exc.retry_after or 0.0, interval) if isinstance(
                    exc, StorageUnavailable) else 0.0
                next_renewal = time.monotonic() + max(min(interval, 1.0), asked)
                silent = time.monotonic() - (storage.last_success or now)
                if silent > self.settings.lease_seconds and time.monotonic() >= next_alarm:
                    next_alarm = time.monotonic() + interval
                    self._log.error(
                        "the database has not answered for %.0fs, longer than the %ds lease: "
                        "other servers may take over this server's %d running todos, and no "
                        "new work is claimed until it answers", silent,
                        self.settings.lease_seconds, len(live),
                        extra={**self._extra, "action": "heartbeat"})
                continue
            failing = False
            if report.superseded and not failed and not self._stop.is_set():
                # (after a stop, the refusal is the stop's own mark: nothing superseded it)
                failed = True
                reason = (f"this server's heartbeats are refused: a newer server runs under the "
                          f"same consumer name {self.settings.consumer!r} (give each server a "
                          f"PROCESSGPT_CONSUMER of its own); this one stops")
                self._log.error(reason, extra={**self._extra, "action": "heartbeat"})
                if self._fail is not None:
                    self._fail(reason)
            # Idle, only the registry row needs refreshing: no faster than leases need.
            next_renewal = now + (interval if live else idle)
            busy = bool(live)
            if report.orphans:
                self._log.warning("gave back %d todos claimed for this server whose claim "
                                  "answer was lost (a dead connection): %s", len(report.orphans),
                                  ", ".join(sorted(report.orphans)),
                                  extra={**self._extra, "action": "heartbeat"})
            for run in live:
                if run.todo_id in report.cancelled:
                    self._worker.cancel(run, "cancelled")
                elif run.todo_id in report.lost and not run.closed:
                    self._worker.cancel(run, "deleted" if run.todo_id in report.deleted
                                        else "lost")

    def listen(self, listener: Listener) -> None:
        """Wake the claimer on new work, cancel on UI cancels, wake question waiters."""
        try:
            self._listen(listener)
        finally:  # a bug in handling a notification leaves no connection listening behind
            listener.close()

    def _listen(self, listener: Listener) -> None:
        attempt = 0
        next_probe = time.monotonic() + LISTEN_PROBE_INTERVAL
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_probe and self._inflight.listening:
                    next_probe = time.monotonic() + LISTEN_PROBE_INTERVAL
                    if not listener.probe():
                        self._log.warning("the listener no longer listens (a transaction "
                                          "pooler?); reconnecting, polling meanwhile",
                                          extra={**self._extra, "action": "listen"})
                        # polled meanwhile; once listening again, a claim looks for what was
                        # announced while it did not listen
                        self._inflight.listening = False
                        self._inflight.wake.set()  # the claimer polls from now on
                        self._stats.count("listener_reconnects")
                        listener.close()
                notes = listener.wait(LISTEN_WAIT)
            except StorageError as exc:
                attempt += 1
                self._inflight.listening = False
                self._inflight.wake.set()  # the claimer polls from now on
                self._log.warning("listener connection lost (attempt %d), reconnecting: %s",
                                  attempt, exc, extra={**self._extra, "action": "listen"})
                self._stop.wait(backoff(attempt, base=0.25))
                continue
            if attempt or not self._inflight.listening:
                if attempt:
                    self._stats.count("listener_reconnects")
                self._log.info("listener connected", extra={**self._extra, "action": "listen"})
                attempt = 0
                self._inflight.listening = True
                self._inflight.work_may_wait()  # notifications may have been missed meanwhile
            for channel, payload in notes:
                if channel == TODO_CHANNEL and payload == self.settings.agent_orch:
                    self._inflight.work_may_wait()
                elif channel == ANSWER_CHANNEL:
                    self._desk.notify(payload)
                elif channel == CANCEL_CHANNEL:
                    run = self._inflight.latest(payload)
                    if run is not None:
                        self._worker.cancel(run, "cancelled")
