"""Operations: the listener survives being killed, metrics are served."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import pytest

import processgpt_sync as ps
from tests.conftest import wait_for


def test_a_killed_listener_reconnects_and_pickup_stays_fast(storage, db, caplog):
    caplog.set_level(logging.INFO)
    started = {}

    def handle(todo):
        started[todo.input] = time.monotonic()
        return {"ok": True}

    with ps.start(handle, agent_orch="ops", storage=storage, poll_interval=30) as server:
        wait_for(lambda: server.stats()["listening"])
        killed = db.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%%'").fetchone()["n"]
        assert killed == 1
        wait_for(lambda: server.stats()["listener_reconnects"] == 1, timeout=5)
        enqueued = time.monotonic()
        storage.enqueue("ops", "after the kill")
        wait_for(lambda: "after the kill" in started, timeout=5)
        latency = started["after the kill"] - enqueued
    assert latency < 1.0, "picked up by NOTIFY, not by the 30 s fallback poll"
    assert "listener connection lost" in caplog.text and "listener connected" in caplog.text


def test_metrics_endpoint_is_scraped(storage):
    """Each server's endpoint serves its own figures with the process's: two servers in one
    process (a Django command run twice, tests) each get theirs, and the process-wide
    registry is left alone. Before, the second one failed on a duplicated time series."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY

    from processgpt_sync.metrics import serve_metrics

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    storage.enqueue("metrics", "x")
    collectors_before = set(REGISTRY._collector_to_names)
    servers = [ps.start(lambda todo: {"ok": 1}, agent_orch=name, storage=storage)
               for name in ("metrics", "other")]
    endpoints = []
    try:
        endpoints = [serve_metrics(server, port, addr="127.0.0.1")
                     for server, port in zip(servers, ports, strict=True)]
        wait_for(lambda: servers[0].stats()["completed"] == 1)
        first, second = (urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=5).read().decode() for port in ports)
    finally:
        for endpoint in endpoints:
            endpoint.shutdown()
            endpoint.server_close()
        for server in servers:
            server.stop()
    assert set(REGISTRY._collector_to_names) == collectors_before
    assert 'processgpt_sync_completed_total{agent_orch="metrics"} 1.0' in first
    assert 'processgpt_sync_run_seconds_count{agent_orch="metrics"} 1.0' in first
    assert "processgpt_sync_pickup_seconds_p95" in first
    assert "processgpt_sync_listener_reconnects_total" in first
    assert "process_cpu_seconds_total" in first, "with the process's own figures"
    assert 'agent_orch="other"' not in first
    assert 'processgpt_sync_completed_total{agent_orch="other"} 0.0' in second


def test_behind_a_transaction_pooler_the_server_polls_without_prepared_statements(
        database_url, db, caplog):
    from processgpt_sync.storage import open_storage

    settings = ps.Settings(agent_orch="pooled", database_url=database_url,
                           transaction_pooler=True, poll_interval=0.5)
    storage = open_storage(settings)
    assert storage.prepare is False
    storage.enqueue("pooled", "x")
    with caplog.at_level(logging.WARNING):
        server = ps.Server(lambda todo: {"ok": 1}, settings, storage=storage).start()
        try:
            wait_for(lambda: server.stats()["completed"] == 1)
            assert not server.stats()["listening"]
            with storage._pool.connection() as conn:
                assert conn.prepare_threshold is None, "no server-side prepared statements"
        finally:
            server.stop()
            storage.close()
    assert "transaction pooler" in caplog.text


def test_an_agent_orch_no_todo_uses_is_pointed_out_at_start(storage, caplog):
    storage.enqueue("real-agent", "x")
    with caplog.at_level(logging.WARNING):
        ps.start(lambda todo: {}, agent_orch="real-agnet", storage=storage).stop()
    assert "no todo has agent_orch='real-agnet' yet" in caplog.text


def test_a_dead_server_thread_stops_serving_with_an_error_not_a_clean_exit(database_url, db):
    from processgpt_sync.storage.postgres import PostgresStorage

    class HeartbeatBug(PostgresStorage):
        def heartbeat(self, *args, **kwargs):
            raise KeyError("a bug in the heartbeat")

    storage = HeartbeatBug(database_url)
    todo = storage.enqueue("ops", "long")

    def handle(todo):
        todo.cancel_event.wait(30)
        return {"cancelled": todo.cancelled}

    settings = ps.Settings(agent_orch="ops", lease_seconds=2, grace_seconds=0.2)
    server = ps.Server(handle, settings, storage=storage)
    try:
        with pytest.raises(ps.ServerFailed, match="heartbeat thread died"):
            server.run_forever()
    finally:
        storage.close()
    row = db.execute("SELECT draft_status FROM todolist WHERE id = %s", (todo,)).fetchone()
    assert row["draft_status"] is None, "the running todo was given back"
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0




def test_listener_probes_between_channel_checks_cost_the_database_no_transaction(
        database_url, pg_url):
    """An idle server probes its LISTEN connection every few seconds. Only the channel check
    (the first probe, then every CHANNEL_CHECK_EVERY-th) is a statement, a transaction; the
    probes between are answered without one, and still tell a live link from a dead one."""
    import psycopg

    from processgpt_sync.storage.postgres import CHANNEL_CHECK_EVERY, PostgresListener
    from processgpt_sync.watch import CHANNELS

    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]

    def transactions() -> int:
        """Every transaction of the test database so far (a backend publishes its counts
        reliably when it exits, so this is read once the listener's backend is gone)."""
        with psycopg.connect(pg_url, autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                          "datname = %s", (dbname,)).fetchone()[0] == 0)
            return int(conn.execute("SELECT xact_commit + xact_rollback FROM "
                                    "pg_stat_database WHERE datname = %s",
                                    (dbname,)).fetchone()[0])

    def cost_of(probes: int) -> int:
        before = transactions()
        listener = PostgresListener(database_url, CHANNELS)
        listener.connect()
        try:
            assert all(listener.probe() for _ in range(probes))
        finally:
            listener.close()
        return transactions() - before

    assert cost_of(CHANNEL_CHECK_EVERY) == cost_of(1)
