"""The threaded server end to end on the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import processgpt_sync as ps
from processgpt_sync import watch
from processgpt_sync.runs import current_run
from processgpt_sync.storage.postgres import PostgresListener, PostgresStorage
from tests.conftest import open_backend, wait_for


@pytest.fixture(params=["postgres", "supabase"])
def storage(request, database_url):
    """Every end-to-end test runs on both backends."""
    yield from open_backend(request.param, database_url)


def rows(db, sql="SELECT *, id::text AS id FROM todolist ORDER BY start_date"):
    return db.execute(sql).fetchall()


def events_by_todo(db):
    grouped = defaultdict(list)
    for e in db.execute("SELECT todo_id, event_type::text, data FROM events ORDER BY timestamp"):
        grouped[e["todo_id"]].append(e)
    return grouped


def serve_until(storage, executor, predicate, *, workers=4, timeout=30.0, **options):
    server = ps.start(executor, agent_orch="a", storage=storage, workers=workers, **options)
    try:
        wait_for(lambda: predicate(server), timeout=timeout)
    finally:
        server.stop(timeout=5)
    return server


def test_200_todos_on_8_workers_complete_exactly_once_with_ordered_events(storage, db):
    ids = {storage.enqueue("a", f"q{i}") for i in range(200)}
    runs = defaultdict(int)
    lock = threading.Lock()

    def handle(todo):
        with lock:
            runs[todo.id] += 1
        for step in range(3):
            todo.events.progress({"step": step})
        return {"input": todo.input}

    server = serve_until(storage, handle, lambda s: s.stats()["completed"] == 200, workers=8)
    assert set(runs) == ids and set(runs.values()) == {1}
    done = rows(db, "SELECT id::text, draft_status::text, output, query FROM todolist")
    assert all(r["draft_status"] == "COMPLETED" and r["output"] == {"input": r["query"]}
               for r in done)
    for todo_id, events in events_by_todo(db).items():
        assert [e["event_type"] for e in events] == ["task_working"] * 3 + ["crew_completed"]
        assert [e["data"].get("step") for e in events[:3]] == [0, 1, 2], todo_id
    stats = server.stats()
    assert stats["claimed"] == 200 and stats["events_written"] == 600
    assert stats["run_seconds_p95"] is not None and stats["running"] == 0


class Sample(Exception):
    pass


@pytest.mark.parametrize(("behaviour", "message"), [
    ("raise", "Sample: the executor broke"),
    ("object", "result is not JSON-serialisable: Object of type object is not JSON"),
    ("none", "executor returned without a result"),
])
def test_failing_executors_end_failed_with_the_message_and_the_server_continues(
        storage, db, behaviour, message):
    bad = storage.enqueue("a", behaviour)
    good = storage.enqueue("a", "fine")

    def handle(todo):
        todo.events.started("begin")
        if todo.input == "raise":
            raise Sample("the executor broke")
        if todo.input == "object":
            return {"value": object()}
        if todo.input == "none":
            return None
        return {"ok": True}

    serve_until(storage, handle, lambda s: s.stats()["completed"] + s.stats()["failed"] == 2)
    state = {r["id"]: r for r in rows(db)}
    assert state[good]["draft_status"] == "COMPLETED"
    assert state[bad]["draft_status"] == "FAILED"
    assert message in state[bad]["log"]
    kinds = [(e["event_type"], e["data"]) for e in events_by_todo(db)[bad]]
    log = state[bad]["log"]
    assert kinds == [("task_started", "begin"), ("error", {"error": log, "message": log})]


def test_timed_out_executor_fails_and_frees_its_slot(storage, db):
    release = threading.Event()
    slow = storage.enqueue("a", "hang")

    def handle(todo):
        if todo.input == "hang":
            release.wait(30)
            return {"late": True}
        return {"ok": True}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=1, timeout=0.5)
    try:
        wait_for(lambda: server.stats()["failed"] == 1)
        quick = storage.enqueue("a", "quick")  # served although the hung thread still runs
        wait_for(lambda: server.stats()["completed"] == 1)
    finally:
        release.set()
        server.stop(timeout=5)
    state = {r["id"]: r for r in rows(db)}
    assert state[slow]["draft_status"] == "FAILED" and "timed out after 0.5 s" in state[slow]["log"]
    assert state[slow]["output"] is None, "the late result was not written"
    assert state[quick]["draft_status"] == "COMPLETED"


def test_draft_mode_writes_draft_and_complete_mode_writes_output(storage, db):
    complete = storage.enqueue("a", "c", agent_mode="COMPLETE")
    draft = storage.enqueue("a", "d", agent_mode="DRAFT")
    serve_until(storage, lambda todo: {"mode": todo.agent_mode},
                lambda s: s.stats()["completed"] == 2)
    state = {r["id"]: r for r in rows(db)}
    assert (state[complete]["output"], state[complete]["draft"], state[complete]["status"]) == (
        {"mode": "COMPLETE"}, None, "SUBMITTED")
    assert (state[draft]["output"], state[draft]["draft"], state[draft]["status"]) == (
        None, {"mode": "DRAFT"}, "IN_PROGRESS")


class Reporter:
    """A blocking executor object that reports through events and sets the result there."""

    def __init__(self):
        self.cancelled = []

    def execute(self, todo, events):
        events.started({"m": "start"}, job_id="job-1", crew_type="action")
        events.tool_started("search", {"q": todo.input})
        events.tool_finished("search")
        events.result({"partial": True}, final=False)
        events.completed('{"m": "done"}', job_id="job-1")
        events.result({"final": True})

    def cancel(self, todo):
        self.cancelled.append(todo.id)


def test_blocking_object_events_intermediate_and_final_results(storage, db):
    todo_id = storage.enqueue("a", "x")
    serve_until(storage, Reporter(), lambda s: s.stats()["completed"] == 1)
    events = db.execute("SELECT event_type::text, data, job_id, crew_type FROM events "
                        "ORDER BY timestamp").fetchall()
    assert [(e["event_type"], e["data"], e["job_id"], e["crew_type"]) for e in events] == [
        ("task_started", {"m": "start"}, "job-1", "action"),
        ("tool_usage_started", {"tool_name": "search", "q": "x"}, todo_id, None),
        ("tool_usage_finished", {"tool_name": "search"}, todo_id, None),
        ("task_completed", {"m": "done"}, "job-1", None),
        ("crew_completed", {}, "CREW_FINISHED", "crew"),
    ]
    assert rows(db)[0]["output"] == {"final": True}


def test_stop_with_work_in_flight_writes_every_accepted_event(storage, db):
    for i in range(8):
        storage.enqueue("a", f"q{i}")
    started = threading.Semaphore(0)

    def handle(todo):
        for n in range(50):
            todo.events.progress({"n": n})
        started.release()
        time.sleep(0.3)
        return {"ok": True}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=8)
    for _ in range(8):
        assert started.acquire(timeout=10)
    server.stop(timeout=10)
    counts = db.execute("SELECT count(*) FILTER (WHERE event_type = 'task_working') AS progress, "
                        "count(*) FILTER (WHERE event_type = 'crew_completed') AS done "
                        "FROM events").fetchone()
    assert counts == {"progress": 400, "done": 8}
    assert server.stats()["events_pending"] == 0


def test_stop_wakes_the_listener_instead_of_waiting_out_its_wait(database_url, monkeypatch):
    """The listener waits for notifications in long stretches; stop() wakes it with one on a
    channel of its own, so stopping (every test that runs a server) does not wait them out."""
    monkeypatch.setattr("processgpt_sync.watch.LISTEN_WAIT", 60.0)
    server = ps.start(lambda todo: {"ok": True}, agent_orch="wake", database_url=database_url)
    wait_for(lambda: server.stats()["listening"], timeout=10)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(20)  # far less than the wait: only a wake-up ends it this soon
    assert not stopper.is_alive(), "stop() waited out the listener's wait"


def test_a_listener_thread_a_bug_kills_closes_its_connection(database_url, db, monkeypatch):
    """A bug in handling a notification kills the listener thread and stops the server: the
    LISTEN connection closes with it. Before, it stayed open (and listening) for as long as
    the process lived, one per failed server of a supervisor that starts another."""
    from processgpt_sync.human import ANSWER_CHANNEL, HumanDesk

    def broken(self, payload):
        raise ValueError("a bug in handling an answer")

    monkeypatch.setattr(HumanDesk, "notify", broken)
    server = ps.start(lambda todo: {"ok": True}, agent_orch="listener-bug",
                      database_url=database_url)
    wait_for(lambda: server.stats()["listening"], timeout=10)
    pid = server._parts.listener.backend_pid()
    assert pid is not None
    db.execute(f"NOTIFY {ANSWER_CHANNEL}, 'some-job'")
    assert server.join(20)
    assert "listener thread died" in str(server.failure)
    wait_for(lambda: db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s",
                                (pid,)).fetchone()["n"] == 0, timeout=10)


@pytest.mark.parametrize("limits, most", [({}, 1), ({"max_running": 5}, 12)])
def test_a_listening_idle_server_polls_at_lease_over_four_unless_fleet_limits_need_more(
        database_url, limits, most):
    """NOTIFY wakes a listening server for new work; it polls only for what sends none: leases
    running out, looked for every lease/4, and under fleet-wide limits slots other servers
    free, every poll_interval."""
    from processgpt_sync.storage.postgres import PostgresStorage

    class CountingStorage(PostgresStorage):
        claims = 0

        def claim(self, **kwargs):
            CountingStorage.claims += 1
            return super().claim(**kwargs)

    storage = CountingStorage(database_url)
    with ps.start(lambda todo: {"ok": True}, agent_orch="idle", storage=storage,
                  lease_seconds=12, poll_interval=0.25, **limits) as server:
        wait_for(lambda: server.stats()["listening"] and CountingStorage.claims, timeout=10)
        before = CountingStorage.claims
        time.sleep(2.5)
        polls = CountingStorage.claims - before
    storage.close()
    assert polls <= most and (limits == {} or polls >= 5), polls


def test_stop_after_the_grace_period_gives_unfinished_todos_back(storage, db):
    for i in range(3):
        storage.enqueue("a", f"q{i}")
    seen = threading.Semaphore(0)

    def handle(todo):
        todo.events.progress("working")
        seen.release()
        while not todo.cancelled:
            time.sleep(0.01)
        return {"too": "late"}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=3)
    for _ in range(3):
        assert seen.acquire(timeout=10)
    server.stop(timeout=0.2)
    state = rows(db)
    assert [r["draft_status"] for r in state] == [None] * 3, "0 rows left STARTED"
    assert all(r["output"] is None and r["consumer"] is None for r in state)
    assert server.stats()["released"] == 3
    assert db.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 3
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_a_failure_leaving_the_context_around_a_todo_does_not_change_its_outcome(
        storage, db, caplog):
    """Django closes its connections after each todo; if that raises, the todo has ended:
    its result stands and the error is logged, not recorded as the executor's failure."""
    from contextlib import contextmanager

    @contextmanager
    def closes_connections():
        yield
        raise RuntimeError("connection already closed")

    storage.enqueue("t", "q")
    server = ps.Server(lambda todo: {"ok": todo.input}, ps.Settings(agent_orch="t"),
                       storage=storage, around_todo=closes_connections)
    with server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
    assert server.stats()["completed"] == 1
    assert [(r["draft_status"], r["output"] or r["draft"]) for r in rows(db)] == [
        ("COMPLETED", {"ok": "q"})]
    assert any("leaving the context around todo" in r.getMessage()
               and "connection already closed" in r.getMessage() for r in caplog.records)



def test_a_slow_exit_from_the_context_around_a_todo_is_not_its_timeout(storage, db):
    """The executor returned within its timeout; closing its context (Django's connections)
    took longer: the result stands, as the executor's time is all a timeout limits."""
    from contextlib import contextmanager

    @contextmanager
    def slow_to_close():
        yield
        time.sleep(1.5)

    storage.enqueue("t", "q")
    server = ps.Server(lambda todo: {"ok": todo.input}, ps.Settings(agent_orch="t", timeout=1),
                       storage=storage, around_todo=slow_to_close)
    with server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
    assert [(r["draft_status"], r["output"]) for r in rows(db)] == [("COMPLETED", {"ok": "q"})]


@pytest.mark.parametrize("exit_takes", [1.0, 30.0], ids=["slow", "hanging"])
def test_a_stop_whose_grace_ends_while_the_context_is_left_keeps_the_executors_result(
        storage, db, monkeypatch, exit_takes):
    """The executor returned; the context around it was still being left when the stop's
    grace ran out. The run is not cancelled and given back at once (its result dropped, the
    todo run again): the stop waits a while more, and its outcome is written. A context that
    hangs (a connection close on a dead link) is given back after that while, as a running
    todo is, rather than the stop spending its whole time on an outcome that never comes."""
    from contextlib import contextmanager

    monkeypatch.setattr("processgpt_sync.shutdown.LEAVING_WAIT", 2.0)
    leaving, hang = threading.Event(), threading.Event()

    @contextmanager
    def slow_to_close():
        yield
        leaving.set()
        hang.wait(exit_takes)

    storage.enqueue("t", "q")
    server = ps.Server(lambda todo: {"ok": todo.input}, ps.Settings(agent_orch="t"),
                       storage=storage, around_todo=slow_to_close)
    server.start()
    try:
        assert leaving.wait(10)
        began = time.monotonic()
        server.stop(timeout=0.1)
        took = time.monotonic() - began
    finally:
        hang.set()
    expected = ([("COMPLETED", {"ok": "q"})] if exit_takes < 2.0 else [(None, None)])
    assert [(r["draft_status"], r["output"]) for r in rows(db)] == expected
    assert took < 7.0, f"the stop took {took:.1f} s"


def test_an_exit_from_the_context_around_a_todo_that_hangs_still_times_the_todo_out(
        storage, db, monkeypatch):
    """A hang while closing the context (a connection close on a dead link) is bounded: once
    the allowance after the executor's return has passed too, the todo is FAILED, not left
    running for ever."""
    from contextlib import contextmanager

    monkeypatch.setattr("processgpt_sync.worker.EXIT_ALLOWANCE", 0.5)
    hang = threading.Event()

    @contextmanager
    def hangs_on_close():
        yield
        hang.wait(20)

    storage.enqueue("t", "q")
    server = ps.Server(lambda todo: {"ok": todo.input}, ps.Settings(agent_orch="t", timeout=0.5),
                       storage=storage, around_todo=hangs_on_close)
    try:
        with server:
            wait_for(lambda: server.stats()["failed"] == 1, timeout=10)
            hang.set()
    finally:
        hang.set()
    assert [(r["draft_status"], r["log"]) for r in rows(db)] == [
        ("FAILED", "its executor returned, but what follows it (ending the tasks it left "
                   "running, leaving the context around it) did not end within 0.5 s")]

def test_a_start_that_failed_on_its_checks_can_be_called_again(empty_database_url):
    from processgpt_sync.storage.install import install_schema

    server = ps.Server(lambda todo: {"ok": todo.input},
                       ps.Settings(agent_orch="again", database_url=empty_database_url))
    with pytest.raises(ps.SchemaMissing):
        server.start()
    install_schema(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("SELECT processgpt_sync_enqueue_v1('again', 'q')")
        server.start()
        try:
            wait_for(lambda: server.stats()["completed"] == 1)
        finally:
            server.stop()
        assert conn.execute("SELECT output FROM todolist").fetchone()[0] == {"ok": "q"}


def _default_repeatable_read(db) -> None:
    """Make the test database's default stricter than READ COMMITTED, as a site may."""
    db.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = "
                       "'repeatable read'").format(sql.Identifier(
                           db.execute("SELECT current_database() AS d").fetchone()["d"])))


def test_a_database_defaulting_to_repeatable_read_still_gets_read_committed_claims(
        database_url, db):
    """Under REPEATABLE READ a claim would not see a takeover it waited for, and its locks
    would fail on rows changed since it began: the server's own connections set READ
    COMMITTED, and a claim in a stricter transaction refuses with the fix, claiming nothing."""
    _default_repeatable_read(db)
    todo = db.execute("SELECT processgpt_sync_enqueue_v1('rr', 'q')::text AS id").fetchone()["id"]
    with psycopg.connect(database_url, autocommit=True) as strict:
        with pytest.raises(psycopg.Error) as refused:
            strict.execute("SELECT processgpt_sync_claim_v3('rr', 'c1', 1)")
    assert refused.value.sqlstate == "PS002"
    assert "READ COMMITTED" in str(refused.value) and "REPEATABLE READ" in str(refused.value)
    assert "default_transaction_isolation" in (refused.value.diag.message_hint or "")
    assert db.execute("SELECT draft_status FROM todolist").fetchone()["draft_status"] is None

    with ps.start(lambda todo: {"ok": todo.input}, agent_orch="rr",
                  database_url=database_url) as server:
        wait_for(lambda: server.stats()["completed"] == 1)
    row = db.execute("SELECT output, draft_status FROM todolist WHERE id = %s",
                     (todo,)).fetchone()
    assert (row["output"], row["draft_status"]) == ({"ok": "q"}, "COMPLETED")


@pytest.mark.parametrize("where", ["pooler", "supabase"])
def test_where_the_server_cannot_set_read_committed_a_stricter_default_stops_it_before_any_claim(
        where, database_url, db):
    """Behind a transaction pooler a session setting does not last, and on Supabase each
    request is a transaction in the role's default isolation: the claim's check is what stops
    a server there, with the reason and the fix, and the todo left for others."""
    _default_repeatable_read(db)
    db.execute("SELECT processgpt_sync_enqueue_v1('rr', 'q')")
    if where == "pooler":
        server = ps.Server(lambda todo: {"ok": todo.input},
                           ps.Settings(agent_orch="rr", database_url=database_url,
                                       transaction_pooler=True))
        with pytest.raises(ps.ServerFailed, match=r"READ COMMITTED.*ALTER ROLE"):
            server.run_forever()
    else:
        for store in open_backend("supabase", database_url):
            server = ps.Server(lambda todo: {"ok": todo.input}, ps.Settings(agent_orch="rr"),
                               storage=store)
            with pytest.raises(ps.ServerFailed, match=r"READ COMMITTED.*ALTER ROLE"):
                server.run_forever()
    row = db.execute("SELECT draft_status, consumer FROM todolist").fetchone()
    assert (row["draft_status"], row["consumer"]) == (None, None)
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_a_stopped_server_refuses_to_start_again_instead_of_seeming_to_serve(storage):
    """start() after stop() used to return at once as if serving, while nothing ran."""
    server = ps.start(lambda todo: {}, agent_orch="again", storage=storage)
    server.stop()
    with pytest.raises(RuntimeError, match="stopped and cannot start again: make a new one"):
        server.start()
    never_started = ps.Server(lambda todo: {}, ps.Settings(agent_orch="again"), storage=storage)
    never_started.stop()
    with pytest.raises(RuntimeError, match="stopped and cannot start again"):
        never_started.start()


def test_ui_cancel_runs_the_cancel_hook_and_writes_nothing_more(storage, db):
    todo_id = storage.enqueue("a", "x")
    entered = threading.Event()

    class Waiter(Reporter):
        def execute(self, todo, events):
            events.progress("before")
            entered.set()
            todo.cancel_event.wait(10)
            events.progress("after cancel")
            return {"should": "not be written"}

    executor = Waiter()
    server = ps.start(executor, agent_orch="a", storage=storage, workers=1)
    try:
        assert entered.wait(10)
        wait_for(lambda: db.execute("SELECT count(*) AS n FROM events WHERE todo_id = %s",
                                    (todo_id,)).fetchone()["n"] == 1)  # "before" is written
        cancelled_at = time.monotonic()
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        limit = (1.5 if storage.backend == "postgres"  # by NOTIFY, or the next heartbeat
                 else watch.POLLING_HEARTBEAT + watch.WATCHDOG_TICK + 1.0)
        wait_for(lambda: executor.cancelled, timeout=limit)
        assert time.monotonic() - cancelled_at < limit
        wait_for(lambda: server.stats()["cancelled"] == 1)
    finally:
        server.stop(timeout=5)
    row = rows(db)[0]
    assert (row["draft_status"], row["output"], row["consumer"]) == ("CANCELLED", None, None)
    assert [e["data"] for e in events_by_todo(db)[todo_id]] == [{"message": "before"}]
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


class LosesItsListener(PostgresStorage):
    """Once ``refuse`` is set, the LISTEN connection cannot be opened again (its path is
    down): a server whose listener the database ends polls from then on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refuse = threading.Event()
        self.listeners: list[PostgresListener] = []

    def listener(self, channels):
        refuse = self.refuse

        class Listener(PostgresListener):
            def connect(self) -> None:
                if refuse.is_set():
                    raise ps.StorageUnavailable("the listener's path is down")
                super().connect()

        self.listeners.append(Listener(self._link, channels))
        return self.listeners[-1]


def test_work_added_while_the_listener_is_lost_is_claimed_at_the_polling_pace(database_url,
                                                                               db):
    """An idle listening server claims again only at its idle pace (15 s with the default
    lease), counting on NOTIFY; once its LISTEN connection is lost and cannot be opened again,
    it polls from then on, not from the end of that wait: new work waits a poll interval at
    most."""
    store = LosesItsListener(database_url)
    server = ps.start(lambda todo: {"ok": True}, agent_orch="a", storage=store,
                      poll_interval=1.0)
    try:
        wait_for(lambda: server.stats()["listening"])
        time.sleep(0.5)  # the claimer waits at its idle pace
        store.refuse.set()
        (listener,) = store.listeners
        db.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid(),))
        wait_for(lambda: not server.stats()["listening"], timeout=10)
        added = time.monotonic()
        store.enqueue("a", "while the listener is lost")
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
        took = time.monotonic() - added
    finally:
        store.refuse.clear()
        server.stop(timeout=5)
        store.close()
    assert took < 4.0, f"claimed {took:.1f}s after it was added"


def test_a_stop_whose_last_step_fails_still_counts_as_stopped(database_url, monkeypatch):
    """A step of stop() that raises is the caller's to see, but the server is stopped all the
    same: join() returns and a second stop() does not wait for ever."""
    def broken(self, timeout):
        raise RuntimeError("closing the executor failed")

    store = PostgresStorage(database_url)
    server = ps.start(lambda todo: {"ok": True}, agent_orch="a", storage=store)
    monkeypatch.setattr(ps.Server, "_close_adapter", broken)
    try:
        with pytest.raises(RuntimeError, match="closing the executor failed"):
            server.stop(timeout=1)
        assert server.join(5)
        server.stop()
    finally:
        store.close()


class LosesAClaimAnswer(PostgresStorage):
    """Once ``lose`` is set, the next claim commits and its answer is lost; heartbeats get no
    answer from then on (the link is failing), so none names that claim."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lose = threading.Event()
        self.lost = threading.Event()

    def claim(self, **kwargs):
        claims = super().claim(**kwargs)
        if self.lose.is_set() and not self.lost.is_set() and claims:
            self.lost.set()
            raise ps.StorageUnavailable("the claim's answer was lost")
        return claims

    def heartbeat(self, *args, **kwargs):
        if self.lost.is_set():
            raise ps.StorageUnavailable("no answer")
        return super().heartbeat(*args, **kwargs)


def test_a_stop_gives_back_the_todo_of_a_claim_whose_answer_it_never_got(database_url, db):
    """The server's last claim committed but its answer was lost, and no heartbeat got
    through since to name the call: stopping, the server names it as it leaves the registry,
    so the todo is claimable again at once, not after its lease, and the lost claim is not
    counted against it."""
    store = LosesAClaimAnswer(database_url)
    server = ps.start(lambda todo: {"ok": True}, agent_orch="a", storage=store)
    try:
        wait_for(lambda: server.stats()["listening"])
        store.lose.set()
        todo_id = store.enqueue("a", "claimed, never heard of")
        assert store.lost.wait(10)
        server.stop(timeout=1)
    finally:
        server.stop()
        store.close()
    row = db.execute("SELECT draft_status::text AS s, consumer, claim_count FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert (row["s"], row["consumer"], row["claim_count"]) == (None, None, 0)


class AnswersLate(PostgresStorage):
    """Once ``late`` is set, the next claim commits, then its answer waits for ``arrive`` (a
    link that stalls after the database replied)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.late = threading.Event()
        self.committed = threading.Event()
        self.arrive = threading.Event()
        self.answered = threading.Event()

    def claim(self, **kwargs):
        claims = super().claim(**kwargs)
        if self.late.is_set() and claims and not self.committed.is_set():
            self.committed.set()
            self.arrive.wait(30)
            self.answered.set()
        return claims


def test_a_stop_gives_back_the_todos_of_a_claim_still_under_way_when_it_stops_waiting(
        database_url, db, monkeypatch):
    """stop() waits for the claim under way only so long; it then names that call as it
    leaves the registry, as it names one that failed, so its todos are claimable again at
    once rather than after their leases."""
    monkeypatch.setattr("processgpt_sync.server.STOP_MARGIN", 1.0)
    store = AnswersLate(database_url)
    server = ps.start(lambda todo: {"ok": True}, agent_orch="a", storage=store)
    try:
        wait_for(lambda: server.stats()["listening"])
        store.late.set()
        todo_id = store.enqueue("a", "claimed as the server stops")
        assert store.committed.wait(10)
        server.stop(timeout=0.5)
        wait_for(lambda: db.execute(
            "SELECT draft_status IS NULL AND consumer IS NULL AND claim_count = 0 AS back "
            "FROM todolist WHERE id = %s", (todo_id,)).fetchone()["back"], timeout=5)
    finally:
        store.arrive.set()
        server.stop()
        store.answered.wait(10)  # its claimer then gives the claims back to the stopped server
        store.close()


class HeldOnTheWay(PostgresStorage):
    """Once ``hold`` is set, the next claim and the next heartbeat each wait for ``let_through``
    before they reach the database (a link that stalls requests)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.let_through = threading.Event()
        self.waiting: dict[str, threading.Event] = defaultdict(threading.Event)
        self.arrived: dict[str, threading.Event] = defaultdict(threading.Event)

    def _held(self, name, call, **kwargs):
        if self.hold.is_set() and not self.waiting[name].is_set():
            self.waiting[name].set()
            self.let_through.wait(30)
            try:
                return call(**kwargs)
            finally:
                self.arrived[name].set()
        return call(**kwargs)

    def claim(self, **kwargs):
        return self._held("claim", super().claim, **kwargs)

    def heartbeat(self, *args, **kwargs):
        return self._held("heartbeat", lambda: super(HeldOnTheWay, self).heartbeat(*args,
                                                                                   **kwargs))


def test_a_claim_and_a_heartbeat_arriving_after_the_stop_are_not_taken_for_a_name_clash(
        database_url, db, monkeypatch, caplog):
    """A claim and a heartbeat the stop stopped waiting for reach the database after it left
    the registry: the database refuses them as a stopped run's, and the server, stopped
    cleanly, neither reports a newer server under its name nor fails."""
    monkeypatch.setattr("processgpt_sync.server.STOP_MARGIN", 1.0)
    store = HeldOnTheWay(database_url)
    todo_id = store.enqueue("a", "claimed after the stop")
    store.hold.set()  # the server's first claim and first heartbeat
    server = ps.Server(lambda todo: {"ok": True},
                       ps.Settings(agent_orch="a", workers=2, lease_seconds=4), storage=store)
    server.start()
    try:
        assert store.waiting["claim"].wait(10) and store.waiting["heartbeat"].wait(10)
        caplog.clear()
        server.stop(timeout=0.5)
        store.let_through.set()
        assert store.arrived["claim"].wait(10) and store.arrived["heartbeat"].wait(10)
        time.sleep(0.5)  # what follows each refusal
    finally:
        store.let_through.set()
        server.stop()
        store.close()
    assert server.failure is None
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    row = db.execute("SELECT draft_status::text AS s, consumer FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert (row["s"], row["consumer"]) == (None, None)


@pytest.mark.parametrize(("claim_takes", "grace"), [(1.5, 2.0), (None, 1.0)],
                         ids=["slow-claim", "hanging-claim"])
def test_a_stop_waiting_for_a_claim_gives_the_running_todos_back_within_its_grace(
        database_url, db, monkeypatch, claim_takes, grace):
    """stop() first waits for the claim under way, then for the running todos: the grace
    counts from the stop, not once more after that wait, and a claim that hangs is waited for
    no longer than the grace and half the margin, so time is left to give back what still
    runs rather than leave it to its lease."""
    monkeypatch.setattr("processgpt_sync.server.STOP_MARGIN", 2.0)
    store = HeldOnTheWay(database_url)
    first = store.enqueue("a", "runs")

    def handle(todo):
        todo.cancel_event.wait(30)
        return {"too": "late"}

    server = ps.start(handle, agent_orch="a", storage=store, workers=2)
    try:
        wait_for(lambda: server.stats()["running"] == 1)
        time.sleep(0.2)
        store.hold.set()
        store.enqueue("a", "claimed as the server stops")  # its NOTIFY starts the claim
        assert store.waiting["claim"].wait(10)
        if claim_takes is not None:
            threading.Timer(claim_takes, store.let_through.set).start()
        server.stop(timeout=grace)
    finally:
        store.let_through.set()
        server.stop()
        store.arrived["claim"].wait(10)
        store.close()
    row = db.execute("SELECT draft_status::text AS s, consumer FROM todolist WHERE id = %s",
                     (first,)).fetchone()
    assert (row["s"], row["consumer"]) == (None, None), "given back, not left to its lease"
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_a_cancel_hook_runs_in_its_todos_context(database_url, db):
    """The cancel hook runs on a thread of its own, but as part of its todo: the contextvars
    ``around_todo`` set for the executor (a request id its logging reads, say) and the current
    todo (``processgpt_sync.ask_human`` finds it) are the executor's."""
    store = PostgresStorage(database_url)
    todo_id = store.enqueue("a", "x")
    seen = []

    @contextlib.contextmanager
    def with_request_id():
        token = REQUEST_ID.set("req-1")
        try:
            yield
        finally:
            REQUEST_ID.reset(token)

    class Waiter:
        def execute(self, todo, events):
            todo.cancel_event.wait(10)
            return {"ok": True}

        def cancel(self, todo):
            run = current_run()
            seen.append((REQUEST_ID.get(), run and run.todo_id))

    server = ps.Server(Waiter(), ps.Settings(agent_orch="a", workers=1), storage=store,
                       around_todo=with_request_id)
    server.start()
    try:
        wait_for(lambda: server.stats()["running"] == 1)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: seen)
    finally:
        server.stop(timeout=5)
        store.close()
    assert seen == [("req-1", todo_id)]


def test_a_ui_cancel_is_seen_soon_while_the_listener_is_lost(database_url, db):
    """The server listened when it started; its LISTEN connection is then ended by the
    database and cannot be opened again for now, so a UI cancel comes by no NOTIFY: the
    heartbeat, which renewed at its idle pace while NOTIFY worked, now renews every few seconds
    and reports the cancel soon, not at the next idle renewal (15 s with the default lease)."""
    store = LosesItsListener(database_url)
    todo_id = store.enqueue("a", "x")
    entered = threading.Event()

    def handle(todo):
        entered.set()
        todo.cancel_event.wait(30)
        return {"late": True}

    server = ps.start(handle, agent_orch="a", storage=store, workers=1)
    try:
        assert entered.wait(10)
        wait_for(lambda: server.stats()["listening"])
        threading.Event().wait(2 * watch.WATCHDOG_TICK)  # the heartbeat's idle pace is set
        store.refuse.set()
        (listener,) = store.listeners
        db.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid(),))
        wait_for(lambda: not server.stats()["listening"], timeout=10)
        cancelled_at = time.monotonic()
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        limit = watch.POLLING_HEARTBEAT + 2 * watch.WATCHDOG_TICK + 2.0
        assert wait_for(lambda: server.stats()["cancelled"] == 1, timeout=limit + 20)
        took = time.monotonic() - cancelled_at
    finally:
        store.refuse.clear()
        server.stop(timeout=5)
        store.close()
    assert took < limit, f"the cancel was seen after {took:.1f}s"


def test_a_lost_lease_cancels_the_executor_and_refuses_its_writes(storage, db):
    todo_id = storage.enqueue("a", "x")
    entered = threading.Event()

    def handle(todo):
        entered.set()
        todo.cancel_event.wait(10)
        return {"stale": True}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=1, lease_seconds=1)
    try:
        assert entered.wait(10)
        db.execute("UPDATE todolist SET claim_token = gen_random_uuid(), consumer = 'other' "
                   "WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["lost"] == 1, timeout=5)
    finally:
        server.stop(timeout=5)
    row = rows(db)[0]
    assert (row["draft_status"], row["output"], row["consumer"]) == ("STARTED", None, "other")


def test_async_function_executor_runs_on_the_worker_threads_loop(storage, db):
    storage.enqueue("a", "x")

    async def handle(todo):
        await asyncio.sleep(0.01)
        todo.events.progress("async")
        return {"loop": type(asyncio.get_running_loop()).__name__}

    serve_until(storage, handle, lambda s: s.stats()["completed"] == 1)
    assert rows(db)[0]["output"]["loop"].endswith("EventLoop")


def test_start_works_inside_a_running_event_loop(storage, db):
    storage.enqueue("a", "x")

    async def notebook_cell():
        server = ps.start(lambda todo: {"ok": 1}, agent_orch="a", storage=storage)
        ticks = 0
        while server.stats()["completed"] < 1:
            await asyncio.sleep(0.01)  # the caller's loop keeps running
            ticks += 1
            assert ticks < 1000
        server.stop()
        return ticks

    assert asyncio.run(notebook_cell()) > 0
    assert rows(db)[0]["draft_status"] == "COMPLETED"


def test_not_an_executor_is_refused_before_anything_starts(storage):
    with pytest.raises(ps.ConfigurationError, match="is not an executor"):
        ps.start(42, agent_orch="a", storage=storage)


def test_contextvars_of_the_starting_thread_reach_the_executor(storage, db):
    import contextvars

    request_id = contextvars.ContextVar("request_id", default="unset")
    request_id.set("from-caller")
    storage.enqueue("a", "x")
    serve_until(storage, lambda todo: {"ctx": request_id.get()},
                lambda s: s.stats()["completed"] == 1)
    assert rows(db)[0]["output"] == {"ctx": "from-caller"}


def test_a_failed_start_reports_its_own_error_and_stop_returns(empty_database_url):
    server = ps.Server(lambda todo: {}, ps.Settings(agent_orch="a",
                                                    database_url=empty_database_url))
    with pytest.raises(ps.SchemaMissing, match="init-db"):
        server.start()
    server.stop()
    assert server.join(timeout=1)


def test_todos_outliving_their_lease_are_not_run_twice(storage, db, database_url):
    """Heartbeats come from their own thread: a CPU-bound executor or one blocking its event
    loop keeps its lease, and a second server waiting for work never runs the todo again."""
    storage.enqueue("a", "cpu")
    storage.enqueue("a", "blocking loop")
    runs: list[str] = []

    async def handle(todo):
        runs.append(todo.input)
        if todo.input != "cpu":
            time.sleep(3.5)  # a blocking call inside async def, as CrewAI's kickoff() does
            return {"slept": 3.5}
        deadline = time.monotonic() + 3.5  # > 3 leases of 1 s, holding the GIL
        n = 0
        while time.monotonic() < deadline:
            n += sum(i * i for i in range(1_000))
        return {"n": n}

    first = ps.start(handle, agent_orch="a", storage=storage, workers=2, lease_seconds=1)
    try:
        wait_for(lambda: len(runs) == 2)
        rival = ps.start(handle, agent_orch="a", database_url=database_url, workers=2,
                         lease_seconds=1, poll_interval=0.2)
        try:
            wait_for(lambda: first.stats()["completed"] == 2, timeout=20)
        finally:
            rival.stop(timeout=5)
    finally:
        first.stop(timeout=5)
    assert sorted(runs) == ["blocking loop", "cpu"], "each todo ran once"
    assert [(r["draft_status"], r["claim_count"]) for r in rows(db)] == [("COMPLETED", 1)] * 2
    assert first.stats()["lost"] == 0


def test_a_todo_finishing_as_its_timeout_fires_gets_exactly_one_outcome(storage, db):
    """Completion and timeout race; whichever wins, the other writes nothing (no todo both
    completed and failed, no second crew_completed or error event)."""
    for n in range(20):  # sleeps spread over the window in which the timeout fires
        storage.enqueue("a", f"{0.25 + 0.025 * n:.3f}")

    def handle(todo):
        time.sleep(float(todo.input))
        return {"slept": todo.input}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=20, timeout=0.3)
    try:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 20)
        stats = server.stats()
    finally:
        server.stop(timeout=5)
    events = events_by_todo(db)
    outcomes: dict[str, int] = defaultdict(int)
    for row in rows(db):
        kinds = [e["event_type"] for e in events[row["id"]]]
        if row["draft_status"] == "COMPLETED":
            assert row["output"] == {"slept": row["description"] or row["query"]}
            assert kinds.count("crew_completed") == 1 and "error" not in kinds, kinds
        else:
            assert row["draft_status"] == "FAILED" and "timed out after 0.3 s" in row["log"]
            assert row["output"] is None and kinds.count("error") == 1, kinds
            assert "crew_completed" not in kinds, kinds
        outcomes[row["draft_status"]] += 1
    assert outcomes == {"COMPLETED": stats["completed"], "FAILED": stats["failed"]}
    assert outcomes["COMPLETED"] and outcomes["FAILED"], "both sides of the race were exercised"


def test_connections_stay_within_the_documented_budget(database_url, db):
    """At most workers + 4 pooled connections plus the LISTEN one, however busy the server."""
    for n in range(300):
        db.execute("SELECT processgpt_sync_enqueue_v1('a', %s)", (str(n),))
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not done.is_set():
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                 "current_database() AND pid <> pg_backend_pid()").fetchone()[0]
                peak = max(peak, n - 1)  # minus the test's own `db` connection
                time.sleep(0.005)

    def handle(todo):
        todo.events.progress("working")
        todo.events.result({"partial": todo.input}, final=False)  # a write from the worker
        return {"n": todo.input}

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ps.start(handle, agent_orch="a", database_url=database_url, workers=8) as server:
            wait_for(lambda: server.stats()["completed"] == 300, timeout=60)
    finally:
        done.set()
        sampler.join()
    assert 2 <= peak <= 8 + 4 + 1, f"{peak} connections"


AT_EXIT_SCRIPT = r"""
import asyncio, logging, os, sys, time
import processgpt_sync as ps

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

async def slow(todo):
    await asyncio.sleep(1.0)
    # the loop's default executor still works while the server stops at exit
    await asyncio.get_running_loop().getaddrinfo("localhost", 80)
    return {"done": todo.input}

servers = [ps.start(slow, agent_orch=name, database_url=sys.argv[1], workers=2,
                    grace_seconds=10) for name in ("a", "b")]
deadline = time.monotonic() + 20
while sum(s.stats()["running"] for s in servers) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
print("running", sum(s.stats()["running"] for s in servers), flush=True)
child = os.fork()
if child == 0:
    sys.exit(0)  # a forked child's normal exit leaves its parent's servers alone
began = time.monotonic()
os.waitpid(child, 0)
print("child", round(time.monotonic() - began, 1), flush=True)
# the script ends here without stop(): a notebook closed, a management command returned
"""


@pytest.mark.slow
def test_servers_not_stopped_are_stopped_gracefully_when_the_interpreter_exits(database_url, db):
    """The running todos finish (async ones can still resolve names through the loop's
    executor) and their outcomes are written before the process ends, instead of the process
    dying mid-run and the todos waiting for their leases to expire; both servers stop at once;
    a forked child does not stop its parent's servers."""
    todos = [str(db.execute("SELECT processgpt_sync_enqueue_v1(%s, 'q1') AS id",
                            (name,)).fetchone()["id"]) for name in ("a", "b")]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", AT_EXIT_SCRIPT, database_url], cwd=root,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "running 2", proc.stderr[-3000:]
    assert float(lines[1].split()[1]) < 5, "the child did not wait out its parent's grace period"
    assert proc.stderr.count("stopping: waiting up to 10s for 1 running todos") == 2
    rows = db.execute("SELECT draft_status::text, output FROM todolist WHERE id = ANY(%s::uuid[])",
                      (todos,)).fetchall()
    outcomes = [(r["draft_status"], r["output"]) for r in rows]
    assert outcomes == [("COMPLETED", {"done": "q1"})] * 2, proc.stderr[-3000:]


class _Messages(logging.Handler):
    """Keeps log messages as text only: a kept record would keep a failure's traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


def test_a_finished_todo_leaves_no_cyclic_garbage(storage, db):
    """A run holds no reference cycle, so a finished todo's objects are freed as the server
    lets go of them: with the collector off while 20 todos run (half of them failing), none of
    their runs or todos is found as cyclic garbage afterwards (each used to be, about 30
    objects per todo, and a failure's traceback added its own). A todo that user code keeps
    counts as ended: its events are dropped, and it cannot ask."""
    from processgpt_sync.runs import TodoRun

    for i in range(20):
        storage.enqueue("a", f"q{i}")
    kept = []

    def handle(todo):
        todo.events.progress({"step": 1})
        todo.events.result({"draft": True}, final=False)
        if not kept:
            kept.append(todo)
        if int(todo.input[1:]) % 2:
            raise ValueError("an odd one")
        return {"ok": True}

    library = logging.getLogger("processgpt_sync")
    messages = _Messages()
    library.addHandler(messages)
    library.propagate = False  # pytest's own capture keeps records, and their tracebacks
    gc.collect()
    gc.disable()
    try:
        server = ps.start(handle, agent_orch="a", storage=storage, workers=4)
        try:
            wait_for(lambda: server.stats()["completed"] == server.stats()["failed"] == 10)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            cyclic = [o for o in gc.garbage if isinstance(o, TodoRun | ps.Todo)]
            kept[0].events.progress({"late": True})
            kept[0].events.result({"late": True})
            with pytest.raises(ps.ProcessGPTSyncError, match="no longer running here"):
                kept[0].ask_human("still there?")
        finally:
            server.stop(timeout=5)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        library.propagate = True
        library.removeHandler(messages)
    assert cyclic == []
    working = db.execute("SELECT data FROM events WHERE event_type = 'task_working'").fetchall()
    assert sorted(str(row["data"]) for row in working) == [str({"step": 1})] * 20
    dropped = [m for m in messages.texts if "dropped: the todo is no longer running here" in m]
    assert len(dropped) == 2, messages.texts


@pytest.mark.parametrize("refused", ["claimer", "heartbeat", "outcomes"])
def test_a_server_thread_the_host_refuses_at_start_fails_the_start_and_leaves_nothing_running(
        storage, monkeypatch, refused):
    """The host has no thread for the claimer (or the heartbeat, or the outcome writer) as
    the server starts: start() raises the host's error and stops what it had started.
    Before, the stop tried to join the thread that never started, raised that instead, and
    left the heartbeat, the writers and the connections running; a refused outcome writer
    left the event writer running."""
    real = threading.Thread

    class Refuses(real):  # type: ignore[misc,valid-type]
        def start(self) -> None:
            if self.name == f"processgpt-sync-{refused}":
                raise RuntimeError("can't start new thread")
            super().start()

    before = set(threading.enumerate())
    monkeypatch.setattr(threading, "Thread", Refuses)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        ps.start(lambda todo: {}, agent_orch="a", storage=storage, workers=2)
    monkeypatch.undo()
    # (the statement deadline watchdog is the process's, shared by every storage)
    wait_for(lambda: not [t for t in threading.enumerate()
                          if t not in before and t.name.startswith("processgpt-sync")
                          and t.name != "processgpt-sync-deadlines" and t.is_alive()],
             timeout=10)


def test_todos_claimed_with_one_that_breaks_the_claimer_are_given_back_at_once(
        storage, db, monkeypatch):
    """A bug in handing a claimed todo to a worker (here, building its run raises) kills the
    claimer and stops the server, saying why; the other todos of that claim are given back
    then, not left leased to a stopped server until their leases run out."""
    from processgpt_sync import claimer

    real = claimer.TodoRun

    def breaks_on_the_second(claim, *args, **kwargs):
        if claim.row.get("query") == "second":
            raise ValueError("a bug in handing this todo over")
        return real(claim, *args, **kwargs)

    monkeypatch.setattr(claimer, "TodoRun", breaks_on_the_second)
    for name in ("first", "second", "third"):
        storage.enqueue("a", name)
    server = ps.start(lambda todo: {}, agent_orch="a", storage=storage, workers=4,
                      lease_seconds=300)
    try:
        assert server.join(timeout=20), "the server stops on its own"
        assert server.failure is not None and "the claimer thread died" in str(server.failure)
    finally:
        server.stop()
    leased = {r["query"] for r in db.execute(
        "SELECT t.query FROM processgpt_sync_lease l JOIN todolist t ON t.id = l.todo_id "
        "WHERE l.expires_at > now() AND NOT l.given_back")}
    assert leased <= {"first"}, f"left leased: {leased}"
