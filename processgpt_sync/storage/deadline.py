"""Client-side deadlines for database statements.

A connection whose peer vanished without closing it (a NAT or load balancer dropped its state, a
failover) can leave a read waiting for ever: TCP keepalives do not fire while a request is
outstanding, and ``tcp_user_timeout`` does not fire when something on the path still
acknowledges the bytes. One watchdog thread shuts down the socket of any statement that
outlives its deadline, so the blocked read fails at once and the connection is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _Watch:
    deadline: float
    fd: int
    what: str
    owner: object
    socket_id: tuple[int, int] | None  # the socket ``fd`` named when the watch began
    fired: bool = False


class DeadlineExceeded(Exception):
    """A statement got no answer within its deadline; its connection was shut down."""


class Deadlines:
    """Bounds statements in flight on any number of connections, from one daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watched: dict[int, _Watch] = {}
        self._next_key = 0
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the watchdog next looks (inf: no deadline)

    @contextmanager
    def watch(self, fd: int, seconds: float, what: str,
              owner: object = None) -> Iterator[_Watch]:
        """Shut down socket ``fd`` if the block has not finished within ``seconds``.

        :raises DeadlineExceeded: the deadline fired and the block then raised.
        """
        entry = _Watch(time.monotonic() + seconds, fd, what, owner, _socket_id(fd))
        with self._cond:
            key = self._next_key
            self._next_key += 1
            self._watched[key] = entry
            if self._thread is None or not self._thread.is_alive():
                self._start_watchdog(what)
            elif entry.deadline < self._wake_at:
                self._cond.notify()
        try:
            yield entry
        except Exception as exc:
            if entry.fired:
                raise DeadlineExceeded(
                    f"no answer from the database within {seconds:g}s ({what}); the connection "
                    "was dropped (a dead network path?)") from exc
            raise
        finally:  # whatever ends the block: a stale entry would later shut down another fd
            with self._cond:
                self._watched.pop(key, None)

    def _start_watchdog(self, what: str) -> None:
        """Start the watchdog thread (the caller holds the condition). A host out of threads
        must not fail the statement too: it runs unwatched until a later one starts it."""
        thread = threading.Thread(target=self._run, daemon=True, name="processgpt-sync-deadlines")
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread"
            logger.warning("cannot start the statement deadline watchdog (%s): %s runs without "
                           "a client-side deadline", exc, what, extra={"action": "deadline"})
            return
        self._thread = thread

    def expire(self, owner: object) -> int:
        """End every statement of ``owner`` in flight now (its network path went silent);
        return how many."""
        with self._cond:
            now = time.monotonic()
            entries = [e for e in self._watched.values() if e.owner is owner and not e.fired]
            for entry in entries:
                entry.deadline = now
            self._cond.notify()
        return len(entries)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for entry in self._watched.values():
                    if not entry.fired and entry.deadline <= now:
                        entry.fired = True
                        if _socket_id(entry.fd) == entry.socket_id:
                            _shut_down(entry.fd, entry.what)
                        # else the connection closed its socket inside the block (the
                        # server hung up) and the number may name another one's already
                pending = [e.deadline for e in self._watched.values() if not e.fired]
                self._wake_at = min(pending) if pending else float("inf")
                self._cond.wait(max(0.05, self._wake_at - now) if pending else None)


def _socket_id(fd: int) -> tuple[int, int] | None:
    """What ``fd`` refers to (device, inode: a socket's is its own), None once closed."""
    try:
        stat = os.fstat(fd)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _shut_down(fd: int, what: str) -> None:
    """Make every blocked read and write on ``fd`` fail now (the fd stays its owner's)."""
    logger.warning("no answer from the database for %s: dropping the connection", what,
                   extra={"action": "deadline"})
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return  # already closed by its owner
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:  # not connected any more: the read has failed already
        logger.debug("shutting down the socket of %s: %s", what, exc)
    finally:
        sock.detach()  # the connection object owns the fd and closes it


DEADLINES = Deadlines()
"""The process-wide watchdog."""
