"""Prometheus metrics and a liveness endpoint for a running server (extra ``prometheus``; CLI
``--metrics-port``).

A custom collector reads ``Server.stats()`` at scrape time, so the hot path pays nothing.
``/healthz`` answers 200 while the server serves and the database answered within a lease,
503 otherwise, for container liveness probes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigurationError
from .server import Server

logger = logging.getLogger(__name__)

COUNTERS = {
    "claimed": "Todos claimed",
    "completed": "Todos completed with a result",
    "failed": "Todos that ended FAILED",
    "asked": "Todos suspended to wait for a person",
    "cancelled": "Todos cancelled by the UI while running",
    "lost": "Todos lost to another worker, or deleted, while running here (writes refused)",
    "released": "Todos given back unfinished: at shutdown, or when this host could not run them",
    "events_written": "Events written",
    "listener_reconnects": "Reconnections of the LISTEN connection",
    "held_back": "Times a claim left a todo for later: its process instance was held, or put in "
                 "the trash while the claim waited for it, or a heartbeat held its lease",
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
        age = GaugeMetricFamily("processgpt_sync_db_ok_seconds_ago",
                                "Seconds since the database last answered",
                                labels=["agent_orch"])
        age.add_metric(labels, -1.0 if stats["db_ok_seconds_ago"] is None
                       else stats["db_ok_seconds_ago"])
        yield age


def serve_metrics(server: Server, port: int, addr: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Register the server's collector and serve /metrics and /healthz on ``addr:port``
    (background thread); ``shutdown()`` the returned HTTP server to stop it.

    ``addr`` defaults to every interface, so a Prometheus in another container can scrape it;
    pass ``127.0.0.1`` to keep it on this host. The address is logged.
    """
    try:
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            GCCollector,
            PlatformCollector,
            ProcessCollector,
            generate_latest,
        )
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install prometheus-client (or install "
            "processgpt-sync with its extra from a checkout: pip install '.[prometheus]')"
        ) from None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/healthz":
                ok, detail = server.healthy()
                stats = server.stats()
                body = json.dumps({"healthy": ok, "detail": detail,
                                   "db_ok_seconds_ago": stats["db_ok_seconds_ago"],
                                   "running": stats["running"],
                                   "listening": stats["listening"]}).encode()
                self._answer(200 if ok else 503, "application/json", body)
            elif path in ("/metrics", "/"):
                self._answer(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._answer(404, "text/plain", b"not found: try /metrics or /healthz\n")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged."""

    try:
        httpd = ThreadingHTTPServer((addr, port), Handler)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc} (choose another "
            "--metrics-port)"
        ) from None
    httpd.daemon_threads = True
    # This server's own registry, not the process-wide one: a second server in the process
    # (a Django command run twice, tests) serves its own figures, and a stopped one's leave
    # with its endpoint.
    registry = CollectorRegistry()
    for standard in (ProcessCollector, PlatformCollector, GCCollector):
        standard(registry=registry)
    registry.register(ServerCollector(server))
    threading.Thread(target=httpd.serve_forever, name="processgpt-sync-metrics",
                     daemon=True).start()
    logger.info("Prometheus metrics on http://%s:%d/metrics (liveness: /healthz)%s", addr,
                httpd.server_address[1],
                " (every interface)" if addr in ("0.0.0.0", "::", "") else "",
                extra={"agent_orch": server.settings.agent_orch, "action": "metrics"})
    return httpd

