"""SIGINT/SIGTERM handling for ``serve()``: first signal stops gracefully, second exits now."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from . import embedded

logger = logging.getLogger(__name__)

EXIT_NOW_SIGNAL: int | None = None
"""A signal that always exits at once; a supervised server process sets it (SIGUSR1), and then
a second SIGTERM is the same stop: systemd's default stop sends SIGTERM to every process of the
unit while the supervisor forwards its own, so a child gets two for one stop. A signal of its
own, not SIGINT: Python runs pending handlers lowest number first, so a SIGINT sent after a
SIGTERM could be taken first, as the graceful stop, and the SIGTERM then ignored."""


@contextmanager
def on_stop(requested: threading.Event, log: logging.Logger = logger,
            extra: dict[str, Any] | None = None) -> Iterator[None]:
    """Set ``requested`` on the first signal; on the second, exit the process at once
    (leases expire and other workers reclaim the todos).

    Handlers can only be installed on the main thread; elsewhere this warns and installs
    none, and the caller has to stop the server itself. The previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("not on the main thread: no signal handlers installed; call stop() to end",
                    extra=extra)
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if requested.is_set() and signum == signal.SIGTERM and EXIT_NOW_SIGNAL is not None:
            log.info("SIGTERM again: already stopping gracefully", extra=extra)
            return
        if requested.is_set() or signum == EXIT_NOW_SIGNAL:
            log.critical("second signal: exiting now", extra=extra)
            embedded.release()  # os._exit skips the exit hooks that stop the embedded server
            os._exit(1)
        log.info("signal %s: stopping gracefully (again to exit now)",
                 signal.Signals(signum).name, extra=extra)
        requested.set()

    previous: dict[int, Callable[..., Any] | int | None] = {}
    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]  # SIGHUP: the terminal closed
    if EXIT_NOW_SIGNAL is not None:
        handled.append(signal.Signals(EXIT_NOW_SIGNAL))
    for sig in handled:
        previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
