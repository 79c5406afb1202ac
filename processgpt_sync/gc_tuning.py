"""Fewer garbage collections while many todos run at once.

CPython collects its youngest objects every 700 net allocations, and every tenth of those
collections also walks the objects that survived one. Running todos keep that middle
generation large (each todo's claim, context, events and, for a2a executors, request objects
live for its whole run), and a busy server allocates fast, so it spends a large share of its
CPU walking objects that are still in use: at 1,024 a2a todos of 1 s, 0.70 ms of CPU per todo
fell to 0.53 ms with a higher first threshold (``bench/run.py --only scale``), and no-op todos
at 16 and 64 workers ran 6-12 % faster with it at 10,000 (50,000 was no better, and costs
more memory). A server of 16 workers or more raises that threshold while it runs (never lowers
it, says so in the log) and puts the previous one back when the last such server in the
process stops. ``gc_threshold`` chooses.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

AUTO_THRESHOLD = 10_000
AUTO_FROM_WORKERS = 16  # below this, a server rarely spends enough CPU of its own to matter

_lock = threading.Lock()
_holders = 0
_previous: tuple[int, ...] | None = None
_raised_to = 0


def wanted(workers: int, setting: int | None) -> int | None:
    """The first threshold a server wants: ``setting``, or automatic when None; None for
    leaving the interpreter's own (``setting`` 0, or few workers)."""
    if setting == 0:
        return None
    if setting is None:
        return AUTO_THRESHOLD if workers >= AUTO_FROM_WORKERS else None
    return setting


class GcThreshold:
    """One server's hold on the raised threshold: ``hold`` at start, ``release`` at stop."""

    def __init__(self, threshold: int | None) -> None:
        self._threshold = threshold
        self._held = False

    def hold(self, log: logging.Logger, extra: dict[str, Any]) -> None:
        """Raise the first threshold to this server's (if higher than now)."""
        global _holders, _previous, _raised_to
        if self._threshold is None or self._held:
            return
        with _lock:
            current = gc.get_threshold()
            if current[0] < self._threshold:
                if _previous is None or current[0] != _raised_to:  # not ours: put this back
                    _previous = current
                gc.set_threshold(self._threshold, *current[1:])
                _raised_to = self._threshold
                log.info("raised the garbage collector's first threshold from %d to %d while "
                         "this server runs (many todos at once keep many objects alive; "
                         "gc_threshold=0 keeps the interpreter's)", current[0], self._threshold,
                         extra=extra)
            _holders += 1
            self._held = True

    def release(self) -> None:
        """The last holder puts the previous threshold back, unless someone else changed it
        meanwhile."""
        global _holders, _previous, _raised_to
        if not self._held:
            return
        with _lock:
            self._held = False
            _holders -= 1
            if _holders == 0 and _previous is not None:
                if gc.get_threshold()[0] == _raised_to:
                    gc.set_threshold(*_previous)
                _previous, _raised_to = None, 0
