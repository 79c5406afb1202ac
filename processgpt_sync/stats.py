"""Counters and timings of one server: what ``Server.stats()`` and the metrics endpoint show.

Kept apart from the server so the hot path only bumps numbers under one small lock; the
percentiles are computed when someone asks.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

COUNTERS = (
    "claimed", "completed", "failed", "asked", "cancelled", "lost", "released",
    "events_written", "listener_reconnects", "held_back",
)
SAMPLES_KEPT = 2_048  # recent run times and pickup latencies the percentiles are taken over


class ServerStats:
    """Thread-safe counters, recent run times and pickup latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._run_times: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self._pickups: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self._executing = 0  # threads inside an executor call, including abandoned ones
        self._claimed_by_tenant: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def claimed_for(self, tenant_id: str | None) -> None:
        """Count one claim of ``tenant_id``'s todo (fair claims and limits work per tenant)."""
        with self._lock:
            key = tenant_id or ""
            self._claimed_by_tenant[key] = self._claimed_by_tenant.get(key, 0) + 1

    def tenants(self, running: dict[str | None, int]) -> dict[str, dict[str, int]]:
        """Claimed and running counts per tenant, given the running todos by tenant."""
        with self._lock:
            out = {t: {"claimed": n, "running": 0} for t, n in self._claimed_by_tenant.items()}
        for tenant_id, count in running.items():
            out.setdefault(tenant_id or "", {"claimed": 0, "running": 0})["running"] += count
        return out

    def executing(self, n: int) -> None:
        """Add ``n`` (1 on entering an executor call, -1 on leaving it)."""
        with self._lock:
            self._executing += n

    def run_time(self, seconds: float) -> None:
        with self._lock:
            self._run_times.append(seconds)

    def pickup(self, start_date: Any) -> None:
        """Record seconds from a todo's ``start_date`` (when it became due) until now."""
        if not isinstance(start_date, str):
            return
        try:
            moment = parse_timestamp(start_date)
        except ValueError:
            return
        if moment.tzinfo is None:  # ProcessGPT's `timestamp without time zone`: written in UTC
            moment = moment.replace(tzinfo=timezone.utc)
        due = moment.timestamp()
        with self._lock:
            self._pickups.append(max(0.0, time.time() - due))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            times = list(self._run_times)
            pickups = list(self._pickups)
            executing = self._executing
        # sorted once each, outside the lock: a dashboard polling a server with thousands of
        # todos in flight takes the interpreter from them only briefly
        times.sort()
        pickups.sort()
        return {
            **counts,
            "run_seconds_mean": statistics.fmean(times) if times else None,
            "run_seconds_p95": _nearest_rank(times, 0.95),
            "run_seconds_sum": sum(times),
            "run_seconds_count": len(times),
            "pickup_seconds_p50": _nearest_rank(pickups, 0.5),
            "pickup_seconds_p95": _nearest_rank(pickups, 0.95),
            "executor_threads": executing,
        }


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank; None when there are no values."""
    return _nearest_rank(sorted(values), q)


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_FRACTION = re.compile(r"\.(\d+)")


def parse_timestamp(text: str) -> datetime:
    """A timestamp as PostgreSQL writes it in JSON (``2026-12-08T01:02:03.12345+00:00``).
    PostgreSQL drops the trailing zeros of the fraction of a second, which Python 3.10's
    ``fromisoformat`` refuses unless it has 3 or 6 digits: it is padded (or cut) to 6."""
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text.strip(), count=1)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
