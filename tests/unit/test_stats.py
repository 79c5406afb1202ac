"""The figures ``Server.stats()`` reports: nearest-rank quantiles over the recent samples."""

from __future__ import annotations

import random

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
