"""Prometheus metrics for a running server (extra ``prometheus``; CLI ``--metrics-port``).

A custom collector reads ``Server.stats()`` at scrape time, so the hot path pays nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .server import Server

COUNTERS = {
    "claimed": "Todos claimed",
    "completed": "Todos completed with a result",
    "failed": "Todos that ended FAILED",
    "asked": "Todos suspended to wait for a person",
    "cancelled": "Todos cancelled by the UI while running",
    "lost": "Leases lost to another worker (writes refused)",
    "released": "Unfinished todos given back at shutdown",
    "events_written": "Events written",
    "listener_reconnects": "Reconnections of the LISTEN connection",
}


class ServerCollector:
    """Exposes one server's counters and latencies, labelled by agent_orch."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        stats = self._server.stats()
        labels = [self._server.settings.agent_orch]
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"processgpt_sync_{name}", help_text,
                                         labels=["agent_orch"])
            family.add_metric(labels, stats[name])
            yield family
        running = GaugeMetricFamily("processgpt_sync_running", "Todos running now",
                                    labels=["agent_orch"])
        running.add_metric(labels, stats["running"])
        yield running
        run = SummaryMetricFamily("processgpt_sync_run_seconds",
                                  "Executor run time of finished todos (recent)",
                                  labels=["agent_orch"])
        run.add_metric(labels, count_value=stats["run_seconds_count"],
                       sum_value=stats["run_seconds_sum"])
        yield run
        for quantile in ("p50", "p95"):
            value = stats[f"pickup_seconds_{quantile}"]
            gauge = GaugeMetricFamily(f"processgpt_sync_pickup_seconds_{quantile}",
                                      f"Enqueue to executor start, {quantile} (recent)",
                                      labels=["agent_orch"])
            gauge.add_metric(labels, 0.0 if value is None else value)
            yield gauge


def serve_metrics(server: Server, port: int, addr: str = "0.0.0.0") -> None:
    """Register the server's collector and serve /metrics on ``addr:port`` (background thread).

    ``addr`` defaults to every interface, so a Prometheus in another container can scrape it;
    pass ``127.0.0.1`` to keep it on this host. The address is logged.
    """
    try:
        from prometheus_client import REGISTRY, start_http_server
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install prometheus-client (or install "
            "processgpt-sync with its extra from a checkout: pip install '.[prometheus]')"
        ) from None
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc} (choose another "
            "--metrics-port)"
        ) from None
    REGISTRY.register(ServerCollector(server))
    logger.info("Prometheus metrics on http://%s:%d/metrics%s", addr, port,
                " (every interface)" if addr in ("0.0.0.0", "::", "") else "",
                extra={"agent_orch": server.settings.agent_orch, "action": "metrics"})
