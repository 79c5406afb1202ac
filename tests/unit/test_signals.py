"""Signal handlers: installed on the main thread only, restored afterwards."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
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


def test_a_supervised_process_exits_now_on_the_supervisors_second_signal_whatever_the_order():
    """systemd's SIGTERM and the supervisor's exit-now signal can both be pending when the
    process next runs Python code, which handles them lowest number first: the exit-now
    signal must exit whichever is taken first (SIGINT, taken before the SIGTERM, was the
    graceful stop, and the SIGTERM after it was ignored as a repeat)."""
    script = textwrap.dedent("""
        import logging, os, signal, sys, threading, time
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from processgpt_sync import signals
        from processgpt_sync.supervisor import EXIT_NOW
        signals.EXIT_NOW_SIGNAL = EXIT_NOW
        both = {signal.SIGTERM, EXIT_NOW}
        with signals.on_stop(threading.Event()):
            signal.pthread_sigmask(signal.SIG_BLOCK, both)
            os.kill(os.getpid(), signal.SIGTERM)  # systemd's, to every process of the unit
            os.kill(os.getpid(), EXIT_NOW)  # the supervisor's second signal
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
            time.sleep(10)
        print("not stopped")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "exiting now" in done.stdout and "not stopped" not in done.stdout
