"""Network faults for real: the database reached through a fault-injecting TCP proxy.

Half-open connections, a partition, a dead LISTEN connection, stop() during an outage, a
stalled server seen by health/status, and a process that runs out of file descriptors.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import processgpt_sync as ps
from processgpt_sync import cli, watch
from processgpt_sync.server import STOP_MARGIN, STOP_TAIL
from processgpt_sync.storage import postgres
from processgpt_sync.storage.postgres import (
    DEADLINE_MARGIN,
    UNLIMITED_DEADLINE,
    PostgresStorage,
    link_conninfo,
)
from tests.conftest import as_nobody_with_threads, wait_for
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
STATEMENT_TIMEOUT = 1.0  # short bounds keep the tests short: a dead link shows in ~4 s


@pytest.fixture
def proxy(pg_url: str) -> Iterator[FaultProxy]:
    fault = FaultProxy(FaultProxy.socket_of(pg_url))
    yield fault
    fault.close()


def proxied_storage(kind: str, proxy: FaultProxy, database_url: str) -> Any:
    """A storage of ``kind`` whose every connection goes through ``proxy``."""
    if kind == "postgres":
        return PostgresStorage(proxy.url_for(database_url), max_connections=12,
                               statement_timeout=STATEMENT_TIMEOUT)
    from processgpt_sync.storage.supabase import SupabaseStorage
    from tests.postgrest_gateway import SERVICE_KEY, Gateway

    gateway = Gateway(database_url)
    # Keep-alive, as PostgREST behind Kong: connections outlive requests and can go half-open.
    gateway.server.RequestHandlerClass.protocol_version = "HTTP/1.1"
    http = FaultProxy(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
    store = SupabaseStorage(f"http://127.0.0.1:{http.port}", SERVICE_KEY,
                            timeout=STATEMENT_TIMEOUT)
    store.gateway, store.http_proxy = gateway, http
    return store


def close_storage(store: Any) -> None:
    store.close()
    if hasattr(store, "gateway"):
        store.http_proxy.close()
        store.gateway.close()


def fault_target(store: Any, proxy: FaultProxy) -> FaultProxy:
    """The proxy between ``store`` and the database: HTTP for Supabase, else PostgreSQL."""
    return store.http_proxy if hasattr(store, "http_proxy") else proxy


def enqueue(db: psycopg.Connection[Any], n: int, agent: str = "faults") -> list[str]:
    rows = db.execute("SELECT processgpt_sync_enqueue_v1(%s, 'q' || g)::text AS id "
                      "FROM generate_series(1, %s) g", (agent, n)).fetchall()
    return [row["id"] for row in rows]


def completed(db: psycopg.Connection[Any]) -> int:
    return int(db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = "
                          "'COMPLETED'").fetchone()["n"])


def assert_exactly_once(db: psycopg.Connection[Any], n: int) -> None:
    """Every todo completed, one result and one set of events each: nothing lost or doubled."""
    assert completed(db) == n
    per_todo = db.execute("SELECT todo_id, count(*) FILTER (WHERE event_type = 'crew_completed') "
                          "AS done, count(*) FILTER (WHERE event_type = 'task_working') AS work "
                          "FROM events GROUP BY todo_id").fetchall()
    assert len(per_todo) == n
    assert {(row["done"], row["work"]) for row in per_todo} == {(1, 2)}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "processgpt_sync", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def two_steps(todo: ps.Todo) -> dict[str, Any]:
    todo.events.progress({"step": 1})
    time.sleep(0.05)
    todo.events.progress({"step": 2})
    return {"ok": todo.input}


def test_connections_get_keepalives_and_bounds_unless_the_url_sets_them(database_url,
                                                                         monkeypatch):
    linked = psycopg.conninfo.conninfo_to_dict(link_conninfo(database_url, tcp_timeout=12))
    assert (linked["keepalives"], linked["keepalives_idle"], linked["keepalives_count"],
            linked["tcp_user_timeout"]) == ("1", "6", "3", "12000")
    explicit = psycopg.conninfo.make_conninfo(database_url, keepalives_idle=60,
                                              tcp_user_timeout=0)
    mine = psycopg.conninfo.conninfo_to_dict(link_conninfo(explicit))
    assert (mine["keepalives_idle"], mine["tcp_user_timeout"]) == ("60", "0"), "the URL wins"

    storage = PostgresStorage(database_url, statement_timeout=2.5)
    try:
        with storage._pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "2500ms"
            used = {o.keyword.decode(): o.val for o in conn.pgconn.info}
            assert (used["keepalives"], used["tcp_user_timeout"]) == (b"1", b"10000")
    finally:
        storage.close()
    own = psycopg.conninfo.make_conninfo(database_url, options="-c statement_timeout=7s")
    storage = PostgresStorage(own, statement_timeout=2.5)
    try:
        with storage._pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "7s"
        # the client waits as long as the server lets a statement run, not the default
        assert storage.deadline == 7 + DEADLINE_MARGIN
    finally:
        storage.close()
    for options, deadline in (("-c statement_timeout=90000", 90 + DEADLINE_MARGIN),
                              ("-c statement_timeout=2min", 120 + DEADLINE_MARGIN),
                              ("-c statement_timeout=0", UNLIMITED_DEADLINE)):
        storage = PostgresStorage(psycopg.conninfo.make_conninfo(database_url, options=options))
        assert storage.deadline == deadline, options
        storage.close()
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=50s")  # libpq: the URL's win
    storage = PostgresStorage(own)
    assert storage.deadline == 7 + DEADLINE_MARGIN
    storage.close()


def test_a_pooled_connection_whose_deadline_fired_is_closed_not_handed_out_again(
        database_url):
    """The deadline shut a pooled connection's socket down just as its statement ended (it
    answered at the deadline, or had its error buffered): it is closed, and the pool hands the
    next call a working one. Before, it went back to the pool, and the next statement on it
    failed with the server gone, as did the final writes of a stop."""
    import select

    from processgpt_sync.storage.postgres import _watched

    storage = PostgresStorage(database_url, max_connections=1)
    try:
        with storage._pool.connection() as conn:
            with _watched(conn, 0.05, "a statement answered at its deadline", storage):
                # the deadline fires (the socket, shut down, reads its end); no statement
                # notices it
                wait_for(lambda: select.select([conn.fileno()], [], [], 0)[0], timeout=10)
            assert conn.closed
        assert storage.call("schema", {})  # on a new connection
    finally:
        storage.close()


def test_a_deadline_leaves_a_socket_that_took_a_closed_ones_number_alone():
    """A connection closed its socket inside the watched block (the server hung up) and a new
    socket took the same number before the deadline fired: the watchdog leaves it alone.
    Before, it shut down whatever socket had that number by then (another connection, an
    executor's HTTP client)."""
    import socket

    from processgpt_sync.storage.deadline import DEADLINES

    first, peer = socket.socketpair()
    number = first.fileno()
    with DEADLINES.watch(number, 0.2, "a connection that hung up"):
        first.close()
        peer.close()
        second, other = socket.socketpair()
        try:
            if number not in (second.fileno(), other.fileno()):
                pytest.skip("the closed socket's number was not reused")
            time.sleep(0.5)  # past the deadline
            mine = second if second.fileno() == number else other
            theirs = other if mine is second else second
            mine.sendall(b"x")  # shut down, this would raise
            assert theirs.recv(1) == b"x"
        finally:
            second.close()
            other.close()


def test_the_cli_opens_the_database_with_the_servers_pooler_and_timeout_settings(
        database_url, monkeypatch):
    """``status``, ``health`` and the other commands read the pooler and timeout settings as
    ``serve`` does: no prepared statements or session settings behind a transaction pooler,
    and the statement timeout the servers run with."""
    import argparse

    from processgpt_sync.cli.backend import connect_storage
    from processgpt_sync.settings import environment_connection_options

    monkeypatch.setenv("PROCESSGPT_STATEMENT_TIMEOUT", "30")
    monkeypatch.setenv("PROCESSGPT_TCP_TIMEOUT", "4")
    monkeypatch.setenv("PROCESSGPT_TRANSACTION_POOLER", "1")
    url = database_url
    storage = connect_storage(argparse.Namespace(database_url=url))
    try:
        assert storage.prepare is False
        with storage._pool.connection() as conn:
            assert conn.prepare_threshold is None
            # behind a pooler no session setting is made: the server's own default stands
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
            used = {o.keyword.decode(): o.val for o in conn.pgconn.info}
            assert used["tcp_user_timeout"] == b"4000"
    finally:
        storage.close()
    pooled = "postgresql://u@db.example.supabase.com:6543/postgres"
    assert environment_connection_options({}, pooled)["prepare"] is False  # as serve reads the port
    monkeypatch.delenv("PROCESSGPT_TRANSACTION_POOLER", raising=False)
    storage = connect_storage(argparse.Namespace(database_url=database_url))
    try:
        with storage._pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"
    finally:
        storage.close()


@pytest.mark.parametrize("kind", ["postgres", "supabase"])
def test_half_open_connections_are_dropped_and_every_todo_completes_once(
        kind, proxy, database_url, db, caplog):
    caplog.set_level(logging.WARNING)
    store = proxied_storage(kind, proxy, database_url)
    enqueue(db, 20)
    try:
        server = ps.start(two_steps, agent_orch="faults", storage=store, workers=4,
                          lease_seconds=30, poll_interval=0.5)
        try:
            wait_for(lambda: completed(db) >= 5, timeout=20)
            assert fault_target(store, proxy).stall() > 0, "connections were open"
            enqueue(db, 20)
            wait_for(lambda: completed(db) == 40, timeout=60)
        finally:
            server.stop(timeout=5)
    finally:
        close_storage(store)
    assert_exactly_once(db, 40)
    assert "no answer from the database" in caplog.text or "timed out" in caplog.text.lower()


@pytest.mark.slow
def test_a_30_second_partition_mid_run_resumes_after_the_heal(proxy, database_url, db, caplog):
    caplog.set_level(logging.WARNING)
    store = proxied_storage("postgres", proxy, database_url)
    enqueue(db, 30)
    try:
        server = ps.start(two_steps, agent_orch="faults", storage=store, workers=4,
                          lease_seconds=60, poll_interval=0.5)
        try:
            wait_for(lambda: completed(db) >= 5, timeout=20)
            proxy.partition()
            enqueue(db, 30)
            time.sleep(30)
            during = completed(db)
            proxy.heal()
            wait_for(lambda: completed(db) == 60, timeout=60)
            assert server.stats()["db_ok_seconds_ago"] < 5
        finally:
            server.stop(timeout=5)
    finally:
        close_storage(store)
    assert during < 60, "nothing could be recorded during the partition"
    assert_exactly_once(db, 60)


@pytest.mark.slow
def test_a_database_down_four_reconnect_windows_is_used_again_once_back_with_nothing_lost(
        proxy, database_url, db, caplog, monkeypatch):
    """The pool doubles its wait between reconnection attempts; over a long outage that wait
    grew past the outage itself (the first todo 17.6 s after the database was back, in the
    bench's `db_down_resume_s`). Its series of attempts now gives up after RECONNECT_WINDOW
    (10 s; 4 s here, the outage scaled with it), and the next call starts another from 1 s:
    during an outage of four windows it starts again, and once the database is back every
    todo is done exactly once."""
    from processgpt_sync.storage import postgres

    monkeypatch.setattr(postgres, "RECONNECT_WINDOW", 4.0)
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    store = proxied_storage("postgres", proxy, database_url)
    enqueue(db, 5)
    try:
        server = ps.start(two_steps, agent_orch="faults", storage=store, workers=4,
                          lease_seconds=60)
        try:
            wait_for(lambda: completed(db) == 5, timeout=20)
            proxy.refuse()  # down: new connections refused, open ones reset
            proxy.reset()
            enqueue(db, 5)
            time.sleep(4 * postgres.RECONNECT_WINDOW)
            proxy.heal()
            wait_for(lambda: completed(db) == 10, timeout=60)
        finally:
            server.stop(timeout=5)
    finally:
        close_storage(store)
    given_up = [r for r in caplog.records if r.name == "psycopg.pool"
                and "reconnection attempt" in r.getMessage() and "failed after" in r.getMessage()]
    assert len(given_up) >= 2, "each series of attempts ends after its window, so a new one begins"
    assert_exactly_once(db, 10)


def test_timeouts_are_enforced_for_every_todo_while_the_database_is_away(proxy, database_url, db):
    """The heartbeat times todos out; recording one timeout must not hold it (the write waits
    for the database) while the other todos' deadlines pass. Its own calls are bounded by
    their deadline."""
    store = proxied_storage("postgres", proxy, database_url)
    enqueue(db, 2)
    started: dict[str, float] = {}
    told: dict[str, float] = {}

    def waits_for_its_timeout(todo: ps.Todo) -> dict[str, Any]:
        started[todo.input] = time.monotonic()
        todo.cancel_event.wait(30)
        told[todo.input] = time.monotonic()
        return {}

    try:
        server = ps.start(waits_for_its_timeout, agent_orch="faults", storage=store,
                          workers=2, timeout=1.0, lease_seconds=60, poll_interval=0.5)
        try:
            wait_for(lambda: len(started) == 2)
            proxy.partition()
            wait_for(lambda: len(told) == 2, timeout=8)
            proxy.heal()
            wait_for(lambda: db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status "
                                        "= 'FAILED'").fetchone()["n"] == 2, timeout=30)
        finally:
            proxy.heal()
            server.stop(timeout=5)
    finally:
        close_storage(store)
    # each within its timeout plus one heartbeat call the partition holds to its deadline
    bound = 1.0 + STATEMENT_TIMEOUT + DEADLINE_MARGIN + 1.0
    assert all(told[name] - started[name] < bound for name in told), (started, told)
    logs = [row["log"] for row in db.execute("SELECT log FROM todolist")]
    assert logs == ["timed out after 1 s"] * 2


def test_a_stop_while_start_waits_on_the_database_stops_what_start_then_makes(
        proxy, database_url):
    """Jupyter: stop() from another cell while start() still waits on a slow database. It
    returns once start() has finished, with nothing of the server left running."""
    existing = set(threading.enumerate())
    proxy.latency(0.3)  # each round trip: start() needs a few
    store = proxied_storage("postgres", proxy, database_url)
    server = ps.Server(two_steps, ps.Settings(agent_orch="faults"), storage=store)
    try:
        starter = threading.Thread(target=server.start)
        starter.start()
        time.sleep(0.2)
        server.stop(timeout=1)
        starter.join(30)
        assert not starter.is_alive() and server.join(0)

        def left_running() -> list[str]:  # the server's threads, not the given storage's pool
            return [t.name for t in set(threading.enumerate()) - existing
                    if t.name.startswith("processgpt-sync")
                    and not t.name.startswith(("processgpt-sync-worker-",
                                               "processgpt-sync-scheduler",
                                               "processgpt-sync-deadlines"))]

        wait_for(lambda: not left_running(), timeout=10)
    except AssertionError:
        raise AssertionError(f"left running: {left_running()}") from None
    finally:
        proxy.heal()
        close_storage(store)


def test_a_dead_listen_connection_is_detected_and_reconnected(proxy, database_url, db, caplog,
                                                              monkeypatch):
    from processgpt_sync import watch

    monkeypatch.setattr(watch, "LISTEN_PROBE_INTERVAL", 1.0)
    caplog.set_level(logging.INFO)
    store = proxied_storage("postgres", proxy, database_url)
    started: dict[str, float] = {}

    def handle(todo: ps.Todo) -> dict[str, Any]:
        started[todo.input] = time.monotonic()
        return {"ok": True}

    try:
        with ps.start(handle, agent_orch="faults", storage=store, poll_interval=60) as server:
            wait_for(lambda: server.stats()["listening"])
            proxy.stall()  # the LISTEN connection (and the pool's) are now half-open
            wait_for(lambda: server.stats()["listener_reconnects"] == 1, timeout=20)
            enqueue(db, 1)
            wait_for(lambda: "q1" in started, timeout=10)
    finally:
        close_storage(store)
    assert "listener connection lost" in caplog.text
    assert "no answer from the database for the listener probe" in caplog.text



def test_a_link_dying_while_a_server_waits_on_a_held_process_instance_loses_nothing(
        proxy, upstream_database_url, monkeypatch):
    """The BPM engine holds a process instance, so the server asks again every few seconds
    for its todo; meanwhile every connection goes half-open. The server finds new ones, keeps
    asking on its schedule, claims a todo of another instance enqueued meanwhile, and runs the
    held instance's todo once the row is free: each todo once."""
    monkeypatch.setattr(watch, "LISTEN_PROBE_INTERVAL", 1.0)
    runs: list[str] = []

    def handle(todo: ps.Todo) -> dict[str, Any]:
        runs.append(todo.input)
        return {"ok": True}

    with psycopg.connect(upstream_database_url, autocommit=True,
                         row_factory=dict_row) as db, \
            psycopg.connect(upstream_database_url) as holder:
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('busy'), ('free')")

        def enqueue_for(instance: str) -> None:
            db.execute("SELECT processgpt_sync_enqueue_v1('faults', %s, 'COMPLETE', NULL, "
                       "'step', %s)", (instance, instance))

        def done() -> int:
            return int(db.execute("SELECT count(*) AS n FROM todolist "
                                  "WHERE draft_status = 'COMPLETED'").fetchone()["n"])

        holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'busy' FOR UPDATE")
        store = proxied_storage("postgres", proxy, upstream_database_url)
        try:
            with ps.start(handle, agent_orch="faults", storage=store, workers=2,
                          lease_seconds=30) as server:
                wait_for(lambda: server.stats()["listening"])
                enqueue_for("busy")
                wait_for(lambda: server.stats()["held_back"] >= 1)
                assert proxy.stall() > 0, "connections were open"
                wait_for(lambda: server.stats()["listener_reconnects"] >= 1, timeout=20)
                enqueue_for("free")
                wait_for(lambda: done() == 1, timeout=20)
                asked = server.stats()["held_back"]
                wait_for(lambda: server.stats()["held_back"] >= asked + 2, timeout=10)
                holder.commit()
                wait_for(lambda: done() == 2, timeout=20)
        finally:
            close_storage(store)
    assert sorted(runs) == ["busy", "free"]


def test_giving_todos_back_to_a_database_refusing_connections_backs_off_between_tries(
        proxy, database_url, db, caplog, monkeypatch):
    """At stop the database refuses every connection, so each try to give the unfinished
    todos back fails at once: the tries are spaced by a back-off over the stop's bound, not
    repeated as fast as they fail, and what could not be given back is reported."""
    monkeypatch.setattr("processgpt_sync.server.STOP_MARGIN", 3.0)
    store = proxied_storage("supabase", proxy, database_url)  # a refused request fails at once
    ids = enqueue(db, 2)
    started, release = threading.Semaphore(0), threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        started.release()
        release.wait(30)
        return {"ok": True}

    try:
        server = ps.start(handle, agent_orch="faults", storage=store, workers=2)
        for _ in ids:
            assert started.acquire(timeout=20)
        fault_target(store, proxy).refuse()
        fault_target(store, proxy).reset()
        server.stop(timeout=0.2)
    finally:
        release.set()
        fault_target(store, proxy).heal()
        close_storage(store)
    tries = caplog.text.count("giving todos back failed (attempt")
    assert 1 <= tries <= 10, tries
    assert "could not give back todos" in caplog.text

@pytest.mark.parametrize("kind", ["postgres", "supabase"])
def test_stop_is_bounded_while_the_database_is_partitioned(kind, proxy, database_url, db, caplog):
    caplog.set_level(logging.INFO)
    store = proxied_storage(kind, proxy, database_url)
    ids = enqueue(db, 3)
    cut, release = threading.Event(), threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        todo.events.progress({"step": 1})
        cut.wait(30)
        todo.events.progress({"step": "during the partition"})
        release.wait(30)
        todo.events.progress({"step": 2})
        return {"ok": True}

    before = set(threading.enumerate())
    try:
        server = ps.start(handle, agent_orch="faults", storage=store, workers=4, lease_seconds=30)
        writers = [t for t in threading.enumerate()
                   if t.name == "processgpt-sync-events" and t not in before]
        wait_for(lambda: db.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 3,
                 timeout=20)
        fault_target(store, proxy).partition()
        cut.set()
        began = time.monotonic()
        server.stop(timeout=1)
        took = time.monotonic() - began
        release.set()
        cut.set()
        fault_target(store, proxy).heal()
        stuck = wait_for(lambda: not [t for t in threading.enumerate()
                                      if t.name.startswith("processgpt-sync_") and t.is_alive()],
                         timeout=2 * (STATEMENT_TIMEOUT + DEADLINE_MARGIN) + 12)
        # the event writer stop() gave up on ends once its write does: before the storage
        # closes under it, so its last word is logged within this test
        for writer in writers:
            writer.join(STATEMENT_TIMEOUT + DEADLINE_MARGIN + 12)
    finally:
        close_storage(store)
    assert took <= 1 + STOP_MARGIN + 4 * STOP_TAIL + 1, f"stop() took {took:.1f}s"
    assert stuck, "no worker thread outlives the server (the process can exit)"
    assert "could not give back todos" in caplog.text
    assert "events could not be written in time" in caplog.text, "unwritten events are reported"
    assert all(todo_id in caplog.text for todo_id in ids), "the log names each todo left behind"


def test_health_and_status_show_a_server_cut_off_from_the_database_as_dead(
        proxy, database_url, db, caplog):
    caplog.set_level(logging.ERROR)
    store = proxied_storage("postgres", proxy, database_url)
    consumer = f"stalled-{os.getpid()}"
    try:
        server = ps.start(two_steps, agent_orch="faults", storage=store, lease_seconds=2,
                          consumer=consumer)
        try:
            wait_for(lambda: db.execute("SELECT count(*) AS n FROM processgpt_sync_server")
                     .fetchone()["n"] == 1)
            assert run_cli("health", "--database-url", database_url, "--consumer",
                           consumer).returncode == 0
            assert server.healthy() and server.healthy().ok  # true as a whole, as its ok
            proxy.partition()
            wait_for(lambda: run_cli("health", "--database-url", database_url, "--consumer",
                                     consumer).returncode == cli.HEALTH_SERVER, timeout=20)
            assert run_cli("health", "--database-url", database_url, "--agent-orch",
                           "faults").returncode == cli.HEALTH_SERVER
            status = run_cli("status", "--database-url", database_url).stdout
            wait_for(lambda: not server.healthy(), timeout=15)  # false once cut off
            ok, reason = server.healthy()
            assert not ok and "no answer from the database" in reason
            wait_for(lambda: "the database has not answered for" in caplog.text, timeout=10)
            assert server.stats()["db_ok_seconds_ago"] > 2
        finally:
            proxy.heal()
            server.stop(timeout=2)
    finally:
        close_storage(store)
    assert consumer in status and "DEAD" in status
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_server").fetchone()["n"] == 0, (
        "a clean stop removes the registry row")


def test_healthz_answers_from_the_last_database_round_trip(proxy, database_url):
    pytest.importorskip("prometheus_client")
    from processgpt_sync.metrics import serve_metrics

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = proxied_storage("postgres", proxy, database_url)
    server = ps.start(two_steps, agent_orch="faults", storage=store, lease_seconds=2)
    httpd = serve_metrics(server, port, addr="127.0.0.1")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        assert json.loads(urllib.request.urlopen(url, timeout=5).read())["healthy"] is True
        proxy.partition()

        def unhealthy() -> bool:
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code == 503
            return False

        wait_for(unhealthy, timeout=20, interval=0.5)
    finally:
        proxy.heal()
        httpd.shutdown()
        httpd.server_close()
        server.stop(timeout=2)
        close_storage(store)


EMFILE_SCRIPT = r"""
import json, logging, os, resource, sys, time
import psycopg
import processgpt_sync as ps

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
url = sys.argv[1]

async def handle(todo):
    todo.events.progress({"step": 1})
    todo.events.progress({"step": 2})
    return {"ok": todo.input}

db = psycopg.connect(url, autocommit=True)
server = ps.start(handle, agent_orch="fds", database_url=url, workers=8, poll_interval=0.5)
time.sleep(0.5)
hog = []
try:
    while True:
        hog.append(open(os.devnull))
except OSError:
    pass
hog.pop().close()  # one spare fd: the enqueue's NOTIFY reaches the server, loops cannot start
db.execute("SELECT processgpt_sync_enqueue_v1('fds', 'q' || g) FROM generate_series(1, 20) g")
deadline = time.monotonic() + 30
while server.stats()["released"] < 3 and time.monotonic() < deadline:
    time.sleep(0.1)
given_back = server.stats()["released"]
for f in hog:
    f.close()
deadline = time.monotonic() + 60
while server.stats()["completed"] < 20 and time.monotonic() < deadline:
    time.sleep(0.1)
stats = server.stats()
alive = server.failure is None
server.stop(timeout=5)
print(json.dumps({"given_back": given_back, "completed": stats["completed"],
                  "failed": stats["failed"], "alive": alive}))
"""


@pytest.mark.slow
def test_running_out_of_file_descriptors_gives_todos_back_and_they_run_later(
        database_url, db, tmp_path):
    proc = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT, database_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["given_back"] >= 3, proc.stderr[-3000:]
    assert (result["completed"], result["failed"], result["alive"]) == (20, 0, True)
    assert "ulimit -n" in proc.stderr and "not recorded as failed" in proc.stderr
    assert db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = 'FAILED'")\
        .fetchone()["n"] == 0
    assert_exactly_once(db, 20)


def test_a_call_on_a_closed_storage_is_not_taken_for_a_dead_connection(database_url, caplog):
    """stop() may leave a bounded call behind that runs after the pool closed: it fails as an
    outage, and nothing claims a connection died or tries to replace the pool's connections."""
    store = PostgresStorage(database_url, max_connections=2)
    store.close()
    with caplog.at_level(logging.INFO, logger="processgpt_sync"):
        with pytest.raises(ps.StorageUnavailable, match="closed"):
            store.call("status", {"p_agent_orch": None})
    assert "connection died" not in caplog.text



def test_an_executor_refused_a_thread_of_its_own_is_the_hosts_fault(storage, db, caplog):
    """An executor whose own thread pool cannot start a thread (the host's thread limit, as
    CPython reports it) gets its todo given back, not recorded FAILED; it runs again."""
    calls: list[str] = []

    def handle(todo: ps.Todo) -> dict[str, Any]:
        calls.append(todo.id)
        if len(calls) == 1:
            try:
                raise RuntimeError("can't start new thread")
            except RuntimeError as exc:  # as a client library wraps it
                raise ConnectionError("the request could not be sent") from exc
        return {"ok": True}

    todo_id = storage.enqueue("no-thread", "x")
    with ps.start(handle, agent_orch="no-thread", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
        assert server.stats()["failed"] == 0
    assert calls == [todo_id, todo_id]
    assert "the host refused a new thread" in caplog.text
    assert db.execute("SELECT draft_status::text AS s FROM todolist").fetchone()["s"] == (
        "COMPLETED")


def test_a_give_back_that_fails_leaves_the_todo_to_its_lease_not_failed(
        storage, db, monkeypatch):
    """The host broke a todo's run (no file descriptor) and giving it back fails too: the todo
    is not recorded FAILED, as neither failure is its executor's; its lease runs out and it
    runs again."""
    import errno

    from processgpt_sync.recorder import Recorder

    calls: list[str] = []
    release = Recorder.release

    def release_once_broken(self: Recorder, run: Any) -> None:
        if len(calls) == 1:
            raise TypeError("the give-back broke")
        release(self, run)

    monkeypatch.setattr(Recorder, "release", release_once_broken)

    def handle(todo: ps.Todo) -> dict[str, Any]:
        calls.append(todo.id)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return {"ok": True}

    storage.enqueue("give-back", "x")
    with ps.start(handle, agent_orch="give-back", storage=storage, lease_seconds=2) as server:
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
        assert server.stats()["failed"] == 0
    assert len(calls) == 2
    assert db.execute("SELECT draft_status::text AS s FROM todolist").fetchone()["s"] == (
        "COMPLETED")

THREADS_SCRIPT = r"""
import json, logging, sys, threading, time
import psycopg
import processgpt_sync as ps

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
url = sys.argv[1]
release = threading.Event()

def handle(todo):
    release.wait(30)
    return {"ok": todo.input}

server = ps.start(handle, agent_orch="threads", database_url=url, workers=8, poll_interval=0.5)
time.sleep(0.5)
fillers = []
try:
    while True:  # take every thread RLIMIT_NPROC still allows
        ends = threading.Event()
        filler = threading.Thread(target=ends.wait, daemon=True)
        filler.start()
        fillers.append((filler, ends))
except RuntimeError:
    pass
for filler, ends in fillers[:3]:  # and give back only three of them
    ends.set()
    filler.join()
with psycopg.connect(url, autocommit=True) as db:
    db.execute("SELECT processgpt_sync_enqueue_v1('threads', 'q' || g) "
               "FROM generate_series(1, 8) g")
    deadline = time.monotonic() + 30
    while server.stats()["released"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    running_at_most = server.stats()["running"]
    given_back = server.stats()["released"]
    for filler, ends in fillers[3:]:
        ends.set()
        filler.join()
    release.set()
    deadline = time.monotonic() + 60
    while server.stats()["completed"] < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = server.stats()
    alive = server.failure is None
    server.stop(timeout=5)
    failed = db.execute("SELECT count(*) FROM todolist WHERE draft_status = 'FAILED'").fetchone()[0]
print(json.dumps({"filled": len(fillers), "given_back": given_back, "ran_at_once": running_at_most,
                  "completed": stats["completed"],
                  "failed": stats["failed"], "failed_rows": failed, "alive": alive}))
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="lowers RLIMIT_NPROC for another user: needs root")
def test_a_host_out_of_threads_gives_todos_back_and_runs_them_later(database_url, db, proxy):
    """Thread limits (ulimit -u, a container's pids limit) refuse a worker thread: the todos
    it was for go back to the queue, nothing is recorded as failed, and they run once threads
    are free again."""
    # the unix socket's directory is the test user's: the other user connects through TCP
    url = proxy.url_for(database_url)
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, url], cwd="/",
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=as_nobody_with_threads(200),
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["filled"] > 0 and result["given_back"] >= 1, proc.stderr[-3000:]
    assert result["ran_at_once"] == 3, "one todo per thread left free"
    assert "cannot start todos" in proc.stderr and "giving" in proc.stderr
    assert (result["completed"], result["failed"], result["failed_rows"], result["alive"]) \
        == (8, 0, 0, True), proc.stderr[-3000:]
    assert completed(db) == 8


def test_a_failover_to_a_read_only_server_is_an_outage_not_the_executors_failure(
        database_url, db, storage, caplog):
    """A failover: the server ends every connection (57P01) and new ones land on a read-only
    server (25006) for a while. The executor's draft and result are kept and written once the
    database takes writes again, on fresh connections; nothing is recorded FAILED."""
    from psycopg import sql

    todo_id = storage.enqueue("failover", "x")
    go = threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        go.wait(20)
        todo.events.result({"partial": True}, final=False)
        return {"ok": True}

    name = sql.Identifier(db.execute("SELECT current_database() AS d").fetchone()["d"])
    end_others = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    server = ps.start(handle, agent_orch="failover", storage=storage)
    try:
        wait_for(lambda: server.stats()["running"] == 1, timeout=20)
        db.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                   .format(name))
        db.execute(end_others)
        go.set()
        wait_for(lambda: "the database is read-only" in caplog.text, timeout=20)
        assert server.stats()["failed"] == 0
        db.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only")
                   .format(name))
        wait_for(lambda: server.stats()["completed"] == 1, timeout=30)
    finally:
        db.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name))
        server.stop()
    row = db.execute("SELECT draft_status::text AS s, output, log FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert (row["s"], row["output"], row["log"]) == ("COMPLETED", {"ok": True}, None)


def succeeds_within(store: PostgresStorage, seconds: float) -> float | None:
    """Seconds until a call of ``store`` succeeds (calling every 0.2 s), or None."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        try:
            store.event_types()
            return time.monotonic() - began
        except ps.StorageUnavailable:
            time.sleep(0.2)
    return None


def test_a_link_silent_while_a_pool_connection_is_set_up_costs_no_worker(
        proxy: FaultProxy, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link goes silent right after the handshake, before the session settings are
    answered (a paused server behind a proxy that still acknowledges), three times: each of
    psycopg_pool's three workers would wait there for ever and the pool never open another
    connection. Watched (the probe deadline, shortened here), each gives up and retries."""
    monkeypatch.setattr(postgres, "PROBE_DEADLINE", 1.0)
    store = PostgresStorage(proxy.url_for(database_url), max_connections=4,
                            statement_timeout=1.0)
    try:
        store.event_types()
        configure, stalled, counting = store._pool._configure, [], threading.Lock()

        def stalls_first(conn: psycopg.Connection[Any]) -> None:
            with counting:  # the pool's workers set connections up at the same time
                if len(stalled) < 3:
                    stalled.append(proxy.stall())
            configure(conn)

        store._pool._configure = stalls_first
        deadline = time.monotonic() + 60
        while len(stalled) < 3 and time.monotonic() < deadline:
            store._pool.drain()  # idle connections are replaced: new ones are set up
            try:
                store.event_types()
            except ps.StorageUnavailable:
                pass
        assert len(stalled) == 3, stalled
        store._pool.drain()  # every connection from now on needs a worker that is free
        assert succeeds_within(store, 30) is not None
    finally:
        proxy.heal()
        store.close()


def test_sessions_the_server_ended_for_idleness_are_dropped_together(
        database_url: str) -> None:
    """idle_session_timeout (57P05) ends every idle session: one failed call drops the
    pool's idle connections, as for a server shutdown, instead of each failing a call."""
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute(f'ALTER DATABASE "{db.info.dbname}" SET idle_session_timeout = 1000')
    store = PostgresStorage(database_url, max_connections=4)
    try:
        with ThreadPoolExecutor(4) as pool:  # four connections in the pool
            list(pool.map(lambda _: store.event_types() and time.sleep(0.3), range(8)))
        time.sleep(2.5)  # the server ends every idle session
        failures = 0
        for _ in range(6):
            try:
                store.event_types()
            except ps.StorageUnavailable:
                failures += 1
        assert failures <= 1, f"{failures} calls failed on sessions already ended"
    finally:
        store.close()


def test_a_listener_that_stopped_listening_claims_what_it_missed_once_listening_again(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its connection stops listening (a pooler switching backends): the probe notices and
    reconnects, and the server then claims at once instead of waiting out the idle poll
    (15 s), for a todo announced while it did not listen."""
    monkeypatch.setattr(watch, "LISTEN_PROBE_INTERVAL", 1.0)
    monkeypatch.setattr(postgres, "CHANNEL_CHECK_EVERY", 1)
    started: dict[str, float] = {}
    store = PostgresStorage(database_url)
    try:
        with psycopg.connect(database_url, autocommit=True) as db, ps.start(
                lambda todo: started.setdefault(todo.input, time.monotonic()) and {"ok": 1},
                agent_orch="relisten", storage=store) as server:
            wait_for(lambda: server.stats()["listening"])
            time.sleep(1.5)  # idle: the claimer waits for a NOTIFY or the idle poll
            assert server._parts is not None and server._parts.listener is not None
            server._parts.listener._conn.execute("UNLISTEN *")  # type: ignore[attr-defined]
            sent = time.monotonic()
            db.execute("SELECT processgpt_sync_enqueue_v1('relisten', 'missed')")
            wait_for(lambda: "missed" in started, timeout=20)
            assert started["missed"] - sent < 5, started["missed"] - sent
            assert server.stats()["listener_reconnects"] >= 1
    finally:
        store.close()


@pytest.mark.parametrize("write", ["draft", "question"])
def test_a_write_the_executor_waits_on_through_a_partition_does_not_count_against_its_timeout(
        proxy, database_url, db, write):
    """The timeout is the executor's: a draft it writes, or the question it asks a person,
    while the database is away is retried until the link heals, and that wait is the
    database's time. The todo completes (a question with its default, after a short wait for
    the answer that does count) instead of timing out during the partition."""
    store = proxied_storage("postgres", proxy, database_url)
    [todo_id] = enqueue(db, 1)
    started, go = threading.Event(), threading.Event()

    def writes_then_returns(todo: ps.Todo) -> dict[str, Any]:
        started.set()
        go.wait(10)
        if write == "draft":
            todo.events.result({"draft": 1}, final=False)
            return {"done": True}
        return {"answer": todo.ask_human("Which one?", timeout=0.2, default="none")}

    try:
        server = ps.start(writes_then_returns, agent_orch="faults", storage=store, workers=1,
                          timeout=1.0, lease_seconds=60, poll_interval=0.5)
        try:
            assert started.wait(10)
            proxy.partition()
            go.set()
            # past the bound within which a todo times out while the database is away (see
            # test_timeouts_are_enforced_for_every_todo_while_the_database_is_away)
            time.sleep(1.0 + STATEMENT_TIMEOUT + DEADLINE_MARGIN + 2.0)
            proxy.heal()
            wait_for(lambda: completed(db) == 1, timeout=30)
        finally:
            proxy.heal()
            server.stop(timeout=5)
    finally:
        close_storage(store)
    row = db.execute("SELECT output, log FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    assert row["output"] == ({"done": True} if write == "draft" else {"answer": "none"})
    assert "timed out" not in (row["log"] or "")


def test_a_stop_ends_a_draft_waiting_out_a_partition_and_the_executor_goes_on(
        proxy, database_url, db, caplog):
    """A draft retried through a partition stops waiting once the todo ends (here the stop
    cancels it): the draft is dropped with a line saying why, and the executor's call returns
    instead of raising the database's error into it when the server gives up."""
    caplog.set_level(logging.INFO, logger="processgpt_sync")
    store = proxied_storage("postgres", proxy, database_url)
    [todo_id] = enqueue(db, 1)
    started, go = threading.Event(), threading.Event()
    seen: list[Any] = []

    def drafts(todo: ps.Todo) -> dict[str, Any]:
        started.set()
        go.wait(10)
        try:
            todo.events.result({"draft": 1}, final=False)
            seen.append("returned")
        except Exception as exc:
            seen.append(exc)
        return {"done": True}

    try:
        server = ps.start(drafts, agent_orch="faults", storage=store, workers=1,
                          lease_seconds=60, poll_interval=0.5)
        try:
            assert started.wait(10)
            proxy.partition()
            go.set()
            wait_for(lambda: f"save_draft for todo {todo_id} failed" in caplog.text, timeout=10)
        finally:
            server.stop(timeout=0.5)
            wait_for(lambda: seen, timeout=10)  # once the write under way gives up
            proxy.heal()
    finally:
        close_storage(store)
    assert seen == ["returned"]
    assert f"draft of todo {todo_id} not written: the todo ended (shutdown)" in caplog.text
