"""The server's watchers: the heartbeat (leases, registry, per-todo timeouts) and the listener
(NOTIFY: new work, UI cancels, answers).

Each runs on its own thread. They read the server's state through ``InFlight`` and end runs
through the ``TodoWorker``; they talk to the database, never run user code themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import StorageError
from .human import ANSWER_CHANNEL, HumanDesk
from .inflight import InFlight
from .retrying import backoff
from .settings import Settings
from .stats import ServerStats
from .storage import Storage
from .storage.base import Listener
from .worker import TodoWorker

TODO_CHANNEL = "processgpt_sync_todo"
CANCEL_CHANNEL = "processgpt_sync_cancel"
CHANNELS = (TODO_CHANNEL, CANCEL_CHANNEL, ANSWER_CHANNEL)
WATCHDOG_TICK = 0.2  # seconds between timeout checks
LISTEN_WAIT = 1.0  # seconds one LISTEN wait may block before checking for stop
LISTEN_PROBE_INTERVAL = 8.0  # seconds between checks that the listener still listens (each
# bounded by the storage's probe deadline, 5 s: a dead LISTEN connection is found within 13 s)
POLLING_HEARTBEAT = 2.0  # seconds between heartbeats when UI cancels cannot arrive by NOTIFY


class Watchers:
    """Runs the heartbeat and listener loops for one server until ``stop`` is set."""

    def __init__(self, storage: Storage, settings: Settings, *, inflight: InFlight,
                 worker: TodoWorker, desk: HumanDesk, stats: ServerStats,
                 registry: Callable[[float], dict[str, Any]], stop: threading.Event,
                 log: logging.Logger, extra: dict[str, Any]) -> None:
        """:param registry: this server's registry row, given the heartbeat interval."""
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
        interval = idle_interval = self.settings.lease_seconds / 4
        if not self._inflight.listening:
            # No NOTIFY for UI cancels: the heartbeat reports them sooner.
            interval = min(interval, POLLING_HEARTBEAT)
        next_renewal = time.monotonic()
        next_alarm = 0.0
        while not self._stop.wait(WATCHDOG_TICK):
            now = time.monotonic()
            runs = self._inflight.runs()
            for run in runs:
                if run.deadline is not None and now > run.deadline and not run.closed:
                    self._worker.time_out(run)
            if now < next_renewal:
                continue
            live = [r for r in runs if not r.closed and r.cancel_reason != "lost"]
            try:
                with self._inflight.claim_gate:
                    report = storage.heartbeat(self.settings.consumer, [r.claim for r in live],
                                               self.settings.lease_seconds,
                                               self._registry(idle_interval))
            except StorageError as exc:
                self._log.warning("heartbeat failed, retrying: %s", exc,
                                  extra={**self._extra, "action": "heartbeat"})
                next_renewal = time.monotonic() + min(interval, 1.0)
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
            # Idle, only the registry row needs refreshing: no faster than leases need.
            next_renewal = now + (interval if live else idle_interval)
            if report.orphans:
                self._log.warning("gave back %d todos claimed for this server whose claim "
                                  "answer was lost (a dead connection): %s", len(report.orphans),
                                  ", ".join(sorted(report.orphans)),
                                  extra={**self._extra, "action": "heartbeat"})
            for run in live:
                if run.todo_id in report.cancelled:
                    self._worker.cancel(run, "cancelled")
                elif run.todo_id in report.lost and not run.closed:
                    self._worker.cancel(run, "lost")

    def listen(self, listener: Listener) -> None:
        """Wake the claimer on new work, cancel on UI cancels, wake question waiters."""
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
                        listener.close()
                notes = listener.wait(LISTEN_WAIT)
            except StorageError as exc:
                attempt += 1
                self._inflight.listening = False
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
        listener.close()
