"""The figures ``Server.stats()`` reports: nearest-rank quantiles over the recent samples."""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta, timezone

from processgpt_sync.stats import SAMPLES_KEPT, ServerStats, percentile


def test_quantiles_are_taken_by_nearest_rank_over_samples_in_any_order() -> None:
    stats = ServerStats()
    values = [float(v) for v in range(1, 101)]
    random.Random(7).shuffle(values)
    for value in values:
        stats.run_time(value)
    snapshot = stats.snapshot()
    assert snapshot["run_seconds_p95"] == 96.0
    assert snapshot["run_seconds_count"] == 100
    assert snapshot["run_seconds_sum"] == 5050.0
    assert snapshot["run_seconds_mean"] == 50.5
    assert percentile(values, 0.5) == 51.0
    assert values[0] != 1.0  # the caller's list is left as it was


def test_no_samples_give_none_and_only_the_recent_ones_are_kept() -> None:
    stats = ServerStats()
    snapshot = stats.snapshot()
    assert snapshot["run_seconds_p95"] is None
    assert snapshot["pickup_seconds_p50"] is None
    assert percentile([], 0.5) is None
    for value in range(SAMPLES_KEPT + 10):
        stats.run_time(float(value))
    snapshot = stats.snapshot()
    assert snapshot["run_seconds_count"] == SAMPLES_KEPT
    assert snapshot["run_seconds_p95"] == 10.0 + int(0.95 * SAMPLES_KEPT)


class StrictAsPython310(datetime):
    """``fromisoformat`` as Python 3.10 has it: a fraction of a second of 3 or 6 digits only."""

    @classmethod
    def fromisoformat(cls, text: str) -> datetime:  # type: ignore[override]
        fraction = re.search(r"\.(\d+)", text)
        if fraction is not None and len(fraction.group(1)) not in (3, 6):
            raise ValueError(f"Invalid isoformat string: {text!r}")
        return datetime.fromisoformat(text)


def test_timestamps_postgresql_writes_with_a_short_fraction_are_read(monkeypatch) -> None:
    """PostgreSQL's JSON drops a fraction's trailing zeros (``03.12345``): read on Python
    3.10 too (emulated here), where the console's pages and streams failed on one timestamp in
    ten and the pickup figures of a Supabase server dropped as many."""
    from processgpt_sync import stats
    from processgpt_sync.console import charts

    monkeypatch.setattr(stats, "datetime", StrictAsPython310)
    utc = timezone.utc
    assert stats.parse_timestamp("2026-12-08T01:02:03.12345+00:00") == datetime(
        2026, 12, 8, 1, 2, 3, 123450, tzinfo=utc)
    assert stats.parse_timestamp("2026-12-08T01:02:03.1Z") == datetime(
        2026, 12, 8, 1, 2, 3, 100000, tzinfo=utc)
    assert stats.parse_timestamp("2026-12-08T01:02:03+09:00").utcoffset() == timedelta(hours=9)
    assert charts.parse_time("2026-12-08T01:02:03.5+00:00").microsecond == 500000
    server = ServerStats()
    due = datetime.now(utc) - timedelta(seconds=2)
    server.pickup(due.strftime("%Y-%m-%dT%H:%M:%S") + ".12345+00:00")
    assert server.snapshot()["pickup_seconds_p50"] is not None
