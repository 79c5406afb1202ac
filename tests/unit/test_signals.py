"""Signal handlers: installed on the main thread only, restored afterwards."""

from __future__ import annotations

import logging
import os
import signal
import threading

from processgpt_sync.signals import on_stop


def test_the_first_sigterm_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    requested = threading.Event()
    with on_stop(requested):
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        assert requested.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_off_the_main_thread_no_handler_is_installed(caplog):
    before = signal.getsignal(signal.SIGINT)
    seen: list[object] = []

    def inside() -> None:
        with on_stop(threading.Event()):
            seen.append(signal.getsignal(signal.SIGINT))

    with caplog.at_level(logging.WARNING, logger="processgpt_sync"):
        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
    assert seen == [before]
    assert "no signal handlers installed" in caplog.text
