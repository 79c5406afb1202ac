"""The servers page's charts: finished todos per time bucket, and sampled pickup latency.

Plain numbers for the template, which draws them as inline SVG (no chart library).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from ..stats import parse_timestamp

CHART_MINUTES = 10
CHART_BUCKET = 10  # seconds per bar


def parse_time(value: Any) -> datetime:
    """A timestamp as PostgreSQL's JSON writes it."""
    return parse_timestamp(str(value))


def throughput_chart(activity: Mapping[str, Any]) -> dict[str, Any]:
    """Bars of finished todos per bucket over the last minutes (empty buckets included)."""
    now = parse_time(activity["now"])
    size = int(activity["bucket_seconds"])
    count = CHART_MINUTES * 60 // size
    first = datetime.fromtimestamp((now.timestamp() // size - count + 1) * size, now.tzinfo)
    by_start = {parse_time(b["start"]).timestamp(): b for b in activity["buckets"]}
    bars = []
    for i in range(count):
        bucket = by_start.get((first + timedelta(seconds=i * size)).timestamp(), {})
        bars.append({"completed": int(bucket.get("completed", 0)),
                     "failed": int(bucket.get("failed", 0))})
    peak = max([b["completed"] + b["failed"] for b in bars] + [1])
    total = sum(b["completed"] for b in bars)
    return {"bars": bars, "peak": peak, "per_second": total / (CHART_MINUTES * 60),
            "total": total, "failed": sum(b["failed"] for b in bars), "bucket": size}


def turnaround_chart(activity: Mapping[str, Any]) -> dict[str, Any]:
    """Points of the mean time from enqueue (start_date) to outcome, in ms, per bucket: the
    latency the todos themselves record, for databases without the server registry."""
    now = parse_time(activity["now"])
    points = [{"age": (now - parse_time(b["start"])).total_seconds(),
               "ms": 1000 * float(b["turnaround_seconds"])}
              for b in activity["buckets"] if b.get("turnaround_seconds") is not None]
    peak = max([p["ms"] for p in points] + [1.0])
    return {"points": points, "peak": peak, "window": CHART_MINUTES * 60,
            "last": points[-1]["ms"] if points else None}


def pickup_chart(samples: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """Points of the live servers' pickup latency p50 (ms) over the last minutes."""
    window = CHART_MINUTES * 60
    points = [{"age": (now - s["time"]).total_seconds(), "ms": 1000 * s["pickup_p50"]}
              for s in samples if s["pickup_p50"] is not None]
    points = [p for p in points if p["age"] <= window]
    peak = max([p["ms"] for p in points] + [1.0])
    return {"points": points, "peak": peak, "window": window,
            "last": points[-1]["ms"] if points else None}
