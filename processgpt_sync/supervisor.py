"""``serve --processes N``: one supervisor over N server processes on this host.

Executors with process-wide state (tool loaders, global clients, anything not thread-safe) scale
with processes instead of threads: ``--processes 8 --workers 1``. Each child is an ordinary
server with its own consumer name; the supervisor holds no todo and no lease, the database
stays the only coordinator. The supervisor:

- forwards SIGINT/SIGTERM to every child (first signal: graceful stop, as SIGTERM; second:
  exit now, as SIGUSR1, so that a SIGTERM a child gets twice for one stop, from systemd and
  from the supervisor, still stops it gracefully);
- restarts a child that died, with exponential back-off, and logs it;
- does not restart a child that failed on its configuration (exit 2): the group stops;
- exits 0 when every child stopped cleanly on request, 1 when one did not stop cleanly once
  the group was stopping (one that dies while serving is restarted), 2 on a configuration error.

Children are started with ``multiprocessing``'s spawn method (no fork of a threaded process),
so a script that calls ``serve(..., processes=N)`` needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from . import embedded, signals
from .errors import (
    AccessDenied,
    ConfigurationError,
    SchemaMissing,
    ServerFailed,
    StorageError,
    StorageUnavailable,
)
from .executor_import import load_executor
from .metrics import serve_metrics
from .server import Server
from .settings import Settings

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
BACKOFF_FIRST = 1.0  # seconds before the first restart of a child
BACKOFF_MAX = 30.0  # longest wait between restarts
STABLE_AFTER = 30.0  # a child that ran this long restarts again after BACKOFF_FIRST
PARENT_CHECK = 1.0  # seconds between a child's checks that its supervisor still lives
CHILD_STOP_MARGIN = 10.0  # seconds past grace_seconds a failing supervisor waits for a child
EXIT_NOW = signal.SIGUSR1  # the second signal, forwarded: a child exits at once


@dataclass(frozen=True)
class ChildSpec:
    """What each child serves; pickled to the children."""

    executor: Any
    """The executor object, or ``"module:attribute"`` imported in the child."""
    settings: Settings
    setup: Callable[[], None] | None = None
    """Run first in each child (the CLI configures logging with it)."""
    metrics_port: int | None = None
    """Child ``i`` serves Prometheus metrics on ``metrics_port + i`` (0: each on a free port,
    which its log line names)."""

    def child_metrics_port(self, index: int) -> int | None:
        """The metrics port of child ``index``."""
        if self.metrics_port is None:
            return None
        return self.metrics_port + index if self.metrics_port else 0
    metrics_host: str = "0.0.0.0"


def check_picklable(spec: ChildSpec) -> None:
    """Fail now, naming what cannot be sent to a child process (the executor, ``setup``, or
    which setting) and how to fix it."""
    local = "pass a module-level function (a lambda or a nested one cannot be sent)"
    parts = [("the executor", spec.executor, "pass a module-level function or class "
              "instance, or serve 'module:attribute' from the CLI"),
             ("setup", spec.setup, local),
             *((f"the setting {field.name}", getattr(spec.settings, field.name), local)
               for field in dataclasses.fields(spec.settings))]
    for what, value, fix in parts:
        try:
            pickle.dumps(value)
        except Exception as exc:
            raise ConfigurationError(f"processes > 1 needs {what} to be sent to another "
                                     f"process, and it cannot be ({exc}): {fix}") from None


class Supervisor:
    """Runs N children until a signal, restarting the ones that die."""

    def __init__(self, spec: ChildSpec, processes: int) -> None:
        if not isinstance(processes, int) or processes < 1:
            raise ConfigurationError(f"processes must be a positive integer, got {processes!r}")
        self._spec = spec
        self._count = processes
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, Any] = {}
        self._started_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self._signals = 0
        self._config_failed = False
        self._failed = False
        self._extra = {"agent_orch": spec.settings.agent_orch, "action": "supervise"}

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; return the group's exit code."""
        previous = self._install_signals()
        try:
            for index in range(self._count):
                if self._signals:  # stopped while starting: start no more
                    break
                self._start(index)
            logger.info("supervising %d server processes (%d workers each)", self._count,
                        self._spec.settings.workers, extra=self._extra)
            while self._children or (self._restart_at and not self._signals):
                self._watch()
        finally:
            if self._children:  # leaving on an error: the children must not serve on alone
                self._stop_children()
            for number, handler in previous.items():
                signal.signal(number, handler)
        if self._config_failed:
            return EXIT_CONFIG
        return EXIT_FAILED if self._failed else EXIT_OK

    def stop(self) -> None:
        """Ask every child to stop gracefully (as the first SIGTERM does)."""
        self._on_signal(signal.SIGTERM, None)

    # -- children ------------------------------------------------------------------------------

    def _start(self, index: int) -> None:
        process = self._context.Process(target=child_main,
                                        args=(self._spec, index, os.getpid()),
                                        name=f"processgpt-sync-{index}", daemon=False)
        process.start()
        self._children[index] = process
        self._started_at[index] = time.monotonic()
        logger.info("started server process %d (pid %s)", index, process.pid, extra=self._extra)
        if self._signals:  # a signal came while it started: it missed the forwarding
            self._signal_child(process, signal.SIGTERM)

    def _stop_children(self) -> None:
        """The supervisor fails: stop every child gracefully, within its grace period and a
        margin, then kill what is left."""
        logger.error("the supervisor failed; stopping its %d server processes",
                     len(self._children), extra=self._extra)
        for process in self._children.values():
            self._signal_child(process, signal.SIGTERM)
        deadline = time.monotonic() + self._spec.settings.grace_seconds + CHILD_STOP_MARGIN
        for process in self._children.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()
        self._children.clear()

    @staticmethod
    def _signal_child(process: Any, number: int) -> None:
        if process.pid is not None and process.exitcode is None:
            try:
                os.kill(process.pid, number)
            except ProcessLookupError:
                pass

    def _watch(self) -> None:
        if self._signals:  # a restart _reap scheduled as a signal came: none while stopping
            self._restart_at.clear()
        now = time.monotonic()
        due = min(self._restart_at.values(), default=now + 0.5)
        sentinels = {p.sentinel: i for i, p in self._children.items()}
        ready = multiprocessing.connection.wait(list(sentinels), timeout=max(0.0, due - now))
        for sentinel in ready:
            self._reap(sentinels[sentinel])
        now = time.monotonic()
        for index, when in list(self._restart_at.items()):
            if when > now or self._signals:
                continue
            # pop: a signal handler may have cleared the schedule since it was read
            if self._restart_at.pop(index, None) is not None:
                self._start(index)

    def _reap(self, index: int) -> None:
        process = self._children.pop(index)
        process.join()
        code = process.exitcode
        ran = time.monotonic() - self._started_at.pop(index)
        if self._signals:
            # a child told to stop before it set its handlers ends by SIGTERM: a clean stop
            if code not in (0, -signal.SIGTERM):
                self._failed = True
                logger.warning("server process %d (pid %s) exited with %s while stopping",
                               index, process.pid, code, extra=self._extra)
            return
        if code == EXIT_CONFIG:
            self._config_failed = True
            logger.error("server process %d (pid %s) failed on its configuration; stopping "
                         "the group", index, process.pid, extra=self._extra)
            self.stop()
            return
        wait = BACKOFF_FIRST if ran >= STABLE_AFTER else min(
            BACKOFF_MAX, 2 * self._backoff.get(index, BACKOFF_FIRST / 2))
        self._backoff[index] = wait
        self._restart_at[index] = time.monotonic() + wait
        logger.warning("server process %d (pid %s) died with exit code %s after %.1fs; "
                       "restarting in %gs", index, process.pid, code, ran, wait,
                       extra=self._extra)

    # -- signals -------------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: no signal handlers installed; call stop() "
                           "to end", extra=self._extra)
            return {}
        return {sig: signal.signal(sig, self._on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._restart_at.clear()
        if self._signals == 1:
            logger.info("signal %s: stopping %d server processes gracefully (again to exit "
                        "now)", signal.Signals(signum).name, len(self._children),
                        extra=self._extra)
        forwarded = signal.SIGTERM if self._signals == 1 else EXIT_NOW  # graceful, now
        for process in list(self._children.values()):
            self._signal_child(process, forwarded)


def child_main(spec: ChildSpec, index: int, supervisor: int | None = None) -> None:
    """One server process of the group: an ordinary server with its own consumer name.

    :param supervisor: the supervisor's pid (read by the parent: a child that read its own
        parent's pid after the supervisor died would get a stranger's, and serve on alone)."""
    os.setpgrp()  # a terminal's Ctrl+C reaches only the supervisor, which forwards it once
    signals.EXIT_NOW_SIGNAL = EXIT_NOW  # the supervisor's "exit now"
    # before serving and after: exit now through _exit, which lets go of the embedded server
    signal.signal(EXIT_NOW, _exit_now)
    _stop_when_orphaned(supervisor if supervisor is not None else os.getppid())
    log = logging.getLogger(f"{__name__}.child")
    try:
        if spec.setup is not None:
            spec.setup()
        executor = spec.executor
        if isinstance(executor, str):
            executor = load_executor(executor)
        # A stable name per slot: a restarted process takes over its predecessor's registry
        # row (no dead row left for health to report) and gives back its leases at once.
        settings = dataclasses.replace(spec.settings, consumer=f"{spec.settings.consumer}/{index}")
        server = Server(executor, settings)
        metrics_port = spec.child_metrics_port(index)
        if metrics_port is not None:
            serve_metrics(server, metrics_port, spec.metrics_host)
        server.run_forever()
    except (ConfigurationError, SchemaMissing) as exc:
        log.error("server process %d: %s", index, exc)
        _exit(EXIT_CONFIG)
    except StorageError as exc:
        log.error("server process %d: %s", index, exc)
        # Refused at start (a wrong key, no permission): a restart would be refused again.
        # An outage is worth one.
        unavailable = isinstance(exc, StorageUnavailable) and not isinstance(exc, AccessDenied)
        _exit(EXIT_FAILED if unavailable else EXIT_CONFIG)
    except ServerFailed as exc:
        log.error("server process %d: %s", index, exc)
        _exit(EXIT_FAILED)
    except Exception:
        log.exception("server process %d failed", index)
        _exit(EXIT_FAILED)
    # Every write is done; executors that ignore todo.cancelled must not hold the process.
    _exit(EXIT_OK)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    _exit(EXIT_FAILED)


def _exit(code: int) -> None:
    """Leave now: threads of executors that ignore ``todo.cancelled`` must not hold us."""
    embedded.release()  # os._exit skips the exit hook that stops the embedded server
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _stop_when_orphaned(parent: int) -> None:
    """A child whose supervisor died (kill -9) stops gracefully instead of serving on alone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="processgpt-sync-orphan-watch", daemon=True).start()
