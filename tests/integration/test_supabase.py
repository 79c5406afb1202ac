"""Supabase specifics through supabase-py and the PostgREST-protocol gateway."""

from __future__ import annotations

import logging
import time

import pytest

import processgpt_sync as ps
from processgpt_sync.storage.supabase import SupabaseStorage
from tests.conftest import open_backend, wait_for
from tests.postgrest_gateway import SERVICE_KEY, Gateway


@pytest.fixture
def supabase(database_url):
    yield from open_backend("supabase", database_url)


def test_missing_schema_names_the_functions_and_the_fix(empty_database_url):
    gateway = Gateway(empty_database_url)
    try:
        store = SupabaseStorage(gateway.url, SERVICE_KEY)
        with pytest.raises(ps.SchemaMissing, match=r"processgpt_sync_claim_v2.*SQL editor"):
            store.check_schema()
        with pytest.raises(ps.SchemaMissing, match="not found by Supabase"):
            store.enqueue("a", "x")
    finally:
        gateway.close()


def test_the_anon_key_is_refused_with_advice_and_never_logged(database_url, caplog):
    gateway = Gateway(database_url)
    anon = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.YW5vbi1zaWduYXR1cmU"
    caplog.set_level(logging.DEBUG)
    try:
        store = SupabaseStorage(gateway.url, anon)
        with pytest.raises(ps.StorageError, match="service-role key"):
            store.enqueue("a", "x")
        assert anon not in repr(store)
        settings = ps.Settings(agent_orch="a", supabase_url=gateway.url, supabase_key=anon)
        assert anon not in repr(settings)
    finally:
        gateway.close()
    assert anon not in caplog.text


def test_an_outage_is_retried_and_nothing_is_lost(supabase, db, caplog):
    gateway = supabase.gateway
    caplog.set_level(logging.WARNING)

    def handle(todo):
        todo.events.progress("working")
        return {"ok": todo.input}

    server = ps.start(handle, agent_orch="a", storage=supabase, workers=4,
                      poll_interval=0.5)
    gateway.down = True  # the database goes away after start: the serve loop must not die
    try:
        wait_for(lambda: "claim failed" in caplog.text, timeout=10)
        with db.cursor() as cur:  # work arrives while the API is down
            ids = [str(cur.execute("SELECT processgpt_sync_enqueue_v1('a', %s)", (f"q{i}",)
                                   ).fetchone()["processgpt_sync_enqueue_v1"]) for i in range(10)]
        gateway.down = False
        wait_for(lambda: server.stats()["completed"] == 10, timeout=30)
    finally:
        server.stop(timeout=5)
    assert "Supabase unavailable" in caplog.text
    done = db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = 'COMPLETED'"
                      ).fetchone()["n"]
    assert done == len(ids)
    assert db.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 20


def test_polling_backs_off_when_idle(supabase):
    gateway = supabase.gateway
    server = ps.start(lambda todo: {"ok": 1}, agent_orch="a", storage=supabase,
                      poll_interval=1.0)
    try:
        # start-up makes 3 calls (schema, status, event types), the first heartbeat one (the
        # server registry); then the first polls
        wait_for(lambda: gateway.requests > 5, timeout=5)
        before = gateway.requests
        import time

        time.sleep(2.0)
        idle_calls = gateway.requests - before
        todo = supabase.enqueue("a", "x")
        wait_for(lambda: server.stats()["completed"] == 1, timeout=5)
    finally:
        server.stop()
    assert idle_calls <= 4, f"{idle_calls} calls in 2 s idle: not backing off"
    assert todo


def test_claiming_pauses_while_unwritten_events_exceed_the_bound(supabase, db, monkeypatch):
    import threading

    import processgpt_sync.claimer as claimer_module

    monkeypatch.setattr(claimer_module, "MAX_PENDING_EVENTS", 15)
    gateway = supabase.gateway
    hold = threading.Event()
    chatty = supabase.enqueue("a", "chatty")

    def handle(todo):
        if todo.input == "chatty":
            for n in range(20):
                todo.events.progress({"n": n})
            hold.wait(30)
        return {"ok": todo.input}

    gateway.failing.add("processgpt_sync_record_events_v1")  # events cannot be written
    server = ps.start(handle, agent_orch="a", storage=supabase, workers=4, poll_interval=0.3)
    try:
        wait_for(lambda: server.stats()["events_pending"] == 20)
        later = [supabase.enqueue("a", f"later {i}") for i in range(2)]
        time.sleep(1.5)
        waiting = db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status IS NULL"
                             ).fetchone()["n"]
        assert waiting == 2, "free workers, but no claims while 20 > 15 events are unwritten"
        gateway.failing.clear()  # the outage ends: events are written, claiming resumes
        wait_for(lambda: server.stats()["completed"] == 2, timeout=30)
        hold.set()
        wait_for(lambda: server.stats()["completed"] == 3, timeout=10)
    finally:
        hold.set()
        server.stop(timeout=5)
    written = db.execute("SELECT count(*) AS n FROM events WHERE todo_id = %s AND "
                         "event_type = 'task_working'", (chatty,)).fetchone()["n"]
    assert written == 20 and len(later) == 2
