"""Supabase specifics through supabase-py and the PostgREST-protocol gateway."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

import processgpt_sync as ps
from processgpt_sync.storage.supabase import SupabaseStorage, _retry_after
from tests.conftest import open_backend, wait_for
from tests.postgrest_gateway import SERVICE_KEY, Gateway, RawBody

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def supabase(database_url):
    yield from open_backend("supabase", database_url)


def test_missing_schema_names_the_functions_and_the_fix(empty_database_url):
    gateway = Gateway(empty_database_url)
    try:
        store = SupabaseStorage(gateway.url, SERVICE_KEY)
        with pytest.raises(ps.SchemaMissing, match=r"processgpt_sync_claim_v4.*SQL editor"):
            store.check_schema()
        with pytest.raises(ps.SchemaMissing, match=r"not found by Supabase.*reload schema"):
            store.enqueue("a", "x")
    finally:
        gateway.close()


def test_a_table_the_schema_lacks_is_a_missing_schema_on_supabase_as_on_postgres(database_url,
                                                                                  db):
    """A function the REST API finds, which reaches a table or function that is gone (dropped,
    or re-signed before PostgREST reloads): PostgreSQL's own code comes through, and it says
    to install the schema, as the PostgreSQL backend does; not a refusal of the todo."""
    db.execute("DROP TABLE processgpt_sync_lease CASCADE")
    for backend in ("postgres", "supabase"):
        for store in open_backend(backend, database_url):
            with pytest.raises(ps.SchemaMissing, match=r"processgpt_sync_lease.*init-db"):
                store.claim(agent_orch="a", consumer="w1", limit=1, lease_seconds=30,
                            max_claims=3)


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


def test_a_key_or_url_with_the_line_break_a_secret_file_leaves_works(database_url):
    """Kubernetes and Docker secrets made from a file end in a line break, which an HTTP
    header cannot carry: httpx's error would call Supabase unreachable and print the key."""
    gateway = Gateway(database_url)
    try:
        store = SupabaseStorage(f" {gateway.url}\n", f"{SERVICE_KEY}\n")
        try:
            assert store.enqueue("a", "x")
        finally:
            store.close()
    finally:
        gateway.close()


@pytest.mark.parametrize(("url", "key", "message"), [
    ("http://127.0.0.1:99999", SERVICE_KEY, r"SUPABASE_URL is not a valid URL \(Port out of range"),
    ("https://", SERVICE_KEY, "SUPABASE_URL names no host"),
    ("https://x.supabase.co", f"{SERVICE_KEY[:20]}\n{SERVICE_KEY[20:]}", "set it to the key alone"),
    ("https://x.supabase.co", "   ", "set it to the key alone"),
], ids=["port", "no host", "break inside the key", "blank key"])
def test_a_malformed_url_or_key_is_a_configuration_error_that_never_shows_the_key(
        url, key, message):
    with pytest.raises(ps.ConfigurationError, match=message) as refused:
        SupabaseStorage(url, key)
    assert SERVICE_KEY[20:] not in str(refused.value)


def test_a_call_through_a_client_that_close_closed_is_an_outage_not_a_crash(database_url):
    """A thread that calls again after close() (a writer still retrying while the server
    stops) finds its HTTP client closed: a StorageUnavailable, which the server treats as the
    database being gone (the todo is given back, never failed), not a RuntimeError."""
    gateway = Gateway(database_url)
    store = SupabaseStorage(gateway.url, SERVICE_KEY)
    try:
        store.status()  # this thread's client is made, then closed by close()
        store.close()
        with pytest.raises(ps.StorageUnavailable, match="Supabase client closed"):
            store.status()
    finally:
        gateway.close()


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


GATEWAY_ERRORS = [
    (502, {"message": "An invalid response was received from the upstream server"}),
    (503, {"message": "name resolution failed"}),
    (504, {"message": "The upstream server is timing out"}),
    (429, {"message": "API rate limit exceeded"}),
    (429, "Too Many Requests"),  # not a JSON object: postgrest takes the status as the code
    # a 404 without PostgREST's code: a route missing while the gateway restarts or reloads
    (404, {"message": "no Route matched with those values"}),
    (404, "<html><body>Not Found</body></html>"),
]


def test_the_api_gateways_own_errors_are_an_outage_not_a_refusal(supabase, db):
    """Kong answers 502/503/504 (and a rate limit 429, or a 404 while its routes reload) with
    a JSON body that has no code: a result written through such a blip is retried and stored,
    not recorded as failed. PostgREST's own 4xx carry a code and stay refusals."""
    gateway = supabase.gateway
    gateway.gateway_answers["processgpt_sync_enqueue_v1"] = list(GATEWAY_ERRORS)
    for status, _ in GATEWAY_ERRORS:
        with pytest.raises(ps.StorageUnavailable):
            supabase.enqueue("a", f"blip {status}")
    gateway.gateway_answers["processgpt_sync_finish_v1"] = [GATEWAY_ERRORS[0],
                                                            GATEWAY_ERRORS[-2]]
    supabase.enqueue("a", "q")
    with ps.start(lambda todo: {"ok": todo.input}, agent_orch="a", storage=supabase) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
    assert gateway.gateway_answers["processgpt_sync_finish_v1"] == []  # the blip was met
    row = db.execute("SELECT draft_status::text, output FROM todolist").fetchone()
    assert row == {"draft_status": "COMPLETED", "output": {"ok": "q"}}


def test_a_url_that_redirects_is_refused_naming_the_fix(supabase):
    """SUPABASE_URL given as http:// where the project serves https:// (or with a path): the
    answer is a redirect, which the HTTP client does not follow; the error says what to set,
    not just "Moved Permanently"."""
    supabase.gateway.gateway_answers["processgpt_sync_enqueue_v1"] = [(301, RawBody(
        "<html><body>301 Moved Permanently</body></html>",
        headers=(("Location", "https://example.supabase.co/rest/v1/rpc/x"),)))]
    with pytest.raises(ps.StorageError, match=r"HTTP 301, a redirect.*https://, not http://") \
            as refused:
        supabase.enqueue("a", "q")
    assert not isinstance(refused.value, ps.StorageUnavailable)


def test_a_rest_api_without_its_jwt_secret_is_refused_naming_the_setting(supabase):
    """A self-hosted PostgREST started without its JWT secret answers every call 500 PGRST300:
    a setting of that server, so refused with what to set, not retried as an outage for
    ever."""
    no_secret = (500, {"code": "PGRST300", "message": "Server lacks JWT secret",
                       "details": None, "hint": None})
    supabase.gateway.gateway_answers["processgpt_sync_enqueue_v1"] = [no_secret]
    with pytest.raises(ps.AccessDenied, match=r"PGRST300.*without its JWT secret.*JWT_SECRET"):
        supabase.enqueue("a", "q")


def test_a_read_only_database_is_an_outage_not_a_refusal(supabase, db):
    """PostgREST answers 405 with SQLSTATE 25006 while the database is read-only (a failover,
    or Supabase's read-only mode when the disk is full): retried, the result is stored."""
    read_only = (405, {"code": "25006", "message": "cannot execute UPDATE in a read-only "
                       "transaction", "details": None, "hint": None})
    gateway = supabase.gateway
    gateway.gateway_answers["processgpt_sync_enqueue_v1"] = [read_only]
    with pytest.raises(ps.StorageUnavailable):
        supabase.enqueue("a", "refused")
    gateway.gateway_answers["processgpt_sync_finish_v1"] = [read_only, read_only]
    supabase.enqueue("a", "q")
    with ps.start(lambda todo: {"ok": todo.input}, agent_orch="a", storage=supabase) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
    assert gateway.gateway_answers["processgpt_sync_finish_v1"] == []
    row = db.execute("SELECT draft_status::text, output FROM todolist").fetchone()
    assert row == {"draft_status": "COMPLETED", "output": {"ok": "q"}}


def test_a_proxy_page_with_a_success_status_is_an_outage_not_a_crash(supabase, db, caplog):
    """A web firewall or captive proxy answers 200 with its own HTML page: not PostgREST's
    answer, so an outage (retried), never a claim or heartbeat read as garbage that stops the
    server."""
    page = RawBody("<html><body>Request blocked</body></html>")
    gateway = supabase.gateway
    gateway.gateway_answers["processgpt_sync_claim_v4"] = [(200, page)]
    gateway.gateway_answers["processgpt_sync_finish_v1"] = [(200, page)]
    supabase.enqueue("a", "q")
    with ps.start(lambda todo: {"ok": todo.input}, agent_orch="a", storage=supabase) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
        assert server.healthy()[0], server.healthy()[1]
    assert gateway.gateway_answers["processgpt_sync_claim_v4"] == []
    assert gateway.gateway_answers["processgpt_sync_finish_v1"] == []
    assert "not JSON: is a proxy in the way?" in caplog.text
    row = db.execute("SELECT draft_status::text, output FROM todolist").fetchone()
    assert row == {"draft_status": "COMPLETED", "output": {"ok": "q"}}


def test_an_empty_or_undecodable_success_body_is_an_outage_not_the_todos_failure(
        supabase, db, caplog):
    """A success status whose body PostgREST never sent: empty, not text, or not JSON though
    labelled so. postgrest-py hands the first two back as data ([] or the text) and lets the
    last escape as UnicodeDecodeError; each is an outage (retried) on the claim, the heartbeat
    and the finish, never a dead heartbeat thread or a finished todo recorded FAILED."""
    gateway = supabase.gateway
    empty, not_text = RawBody("", "text/html"), RawBody(b"\x80\x81", "application/json")
    not_json = RawBody("<html>Request blocked</html>", "application/json; charset=utf-8")
    gateway.gateway_answers["processgpt_sync_claim_v4"] = [(200, empty), (200, not_json)]
    gateway.gateway_answers["processgpt_sync_heartbeat_v1"] = [(200, empty), (200, not_text)]
    gateway.gateway_answers["processgpt_sync_finish_v1"] = [(200, empty), (200, not_text),
                                                            (200, not_json)]
    release = threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        release.wait(20)  # in flight while the heartbeat meets its two bad answers
        return {"ok": todo.input}

    supabase.enqueue("a", "q")
    with ps.start(handle, agent_orch="a", storage=supabase, lease_seconds=2) as server:
        wait_for(lambda: not gateway.gateway_answers["processgpt_sync_heartbeat_v1"],
                 timeout=20)
        release.set()
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
        assert server.healthy()[0], server.healthy()[1]
        assert server.failure is None
    assert all(not answers for answers in gateway.gateway_answers.values())
    assert "an empty body, not PostgREST's answer" in caplog.text
    assert "a body that is not JSON" in caplog.text
    assert "a body that is not text" in caplog.text
    row = db.execute("SELECT draft_status::text, output FROM todolist").fetchone()
    assert row == {"draft_status": "COMPLETED", "output": {"ok": "q"}}
    assert server.stats()["failed"] == 0


def test_a_json_string_or_an_empty_list_answer_is_data_not_an_outage(supabase):
    """The checks above look at the body only where postgrest-py's data is ambiguous: a
    function's own JSON string or empty set, or a void function's 204, is an answer."""
    assert supabase.open_questions("a") == []  # an empty JSON array, as PostgREST sends it
    assert supabase.status("a") == []
    gateway = supabase.gateway
    gateway.gateway_answers["processgpt_sync_respond_v2"] = [(200, "a-todo-id")]
    assert supabase.respond("job", {"answer": 1}) == "a-todo-id"
    # PostgREST's answer to a function returning void: 204, no body
    gateway.gateway_answers["processgpt_sync_respond_v2"] = [(204, RawBody(""))]
    assert supabase.call("respond", {"p_job_id": "job", "p_answer": 1, "p_user_id": None,
                                     "p_todo_id": None}) == []


def test_the_clients_of_threads_that_ended_are_closed_not_kept(supabase):
    """Each thread gets its own HTTP client; a web framework's pool ends idle threads and makes
    new ones, so a long-lived console would keep a client (and its sockets) per thread that
    ever called, unless a new client first closes those of threads that have ended."""
    ended = []
    for _ in range(20):
        thread = threading.Thread(target=supabase.status)
        thread.start()
        thread.join()
        ended.append(thread)
    clients = list(supabase._http.items())
    assert len(clients) <= 2, f"{len(clients)} clients kept for 20 short-lived threads"
    assert all(thread.is_alive() or thread is ended[-1] for _, thread in clients)
    supabase.status()  # this thread's client closes the last ended thread's
    assert ended[-1] not in supabase._http.values()


CLIENT_WITHOUT_DESCRIPTORS = """
import os, resource, sys
from processgpt_sync.infra import infrastructure_problem
from processgpt_sync.storage.supabase import SupabaseStorage

import supabase.lib.client_options  # what building a client imports and reads, first
from processgpt_sync.queries import queries

queries()
store = SupabaseStorage(sys.argv[1], sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    store.status()  # this thread's first call builds its client
    print("answered")
except Exception as exc:
    print(type(exc).__name__, "|", infrastructure_problem(exc))
"""


def test_no_descriptor_for_a_new_client_is_an_outage_that_names_the_limit(supabase):
    """A thread's first call builds its HTTP client, which opens the CA bundle: out of file
    descriptors (a lowered RLIMIT_NOFILE, filled, in a process of its own) that is the host's
    problem (StorageUnavailable, with the advice), not a raw OSError that would be taken for
    the caller's failure."""
    out = subprocess.run([sys.executable, "-c", CLIENT_WITHOUT_DESCRIPTORS,
                          supabase.gateway.url, SERVICE_KEY], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    kind, _, problem = out.stdout.strip().partition(" | ")
    assert kind == "StorageUnavailable", out.stdout + out.stderr
    assert "ran out of file descriptors" in problem, problem


def test_a_program_limit_is_a_refusal_on_both_backends_not_an_outage(supabase, storage, db):
    """A site's index on event data turns a large event into "index row too large" (class 54),
    which no retry changes: a flushed batch drops that event alone, and a result written with
    it is stored without the todo's events; nothing is retried for ever, on either backend."""
    db.execute("CREATE INDEX site_event_text ON events ((data ->> 'text'))")
    huge = os.urandom(6000).hex()  # incompressible: too large for that index
    for backend in (storage, supabase):
        flushed, with_result = (backend.enqueue("a", f"{kind} {backend.backend}")
                                for kind in ("flushed", "with result"))

        def handle(todo):
            todo.events.progress("fine")
            todo.events.progress({"text": huge})
            if todo.input.startswith("flushed"):
                time.sleep(0.5)  # the event writer meets it first
            return {"ok": todo.input}

        with ps.start(handle, agent_orch="a", storage=backend, workers=1) as server:
            wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 2)
        for todo_id, kept in ((flushed, [{"message": "fine"}]), (with_result, [])):
            row = db.execute("SELECT draft_status::text AS s, output FROM todolist "
                             "WHERE id = %s", (todo_id,)).fetchone()
            assert row["s"] == "COMPLETED" and row["output"]["ok"], (backend.backend, row)
            assert [r["data"] for r in db.execute(
                "SELECT data FROM events WHERE todo_id = %s AND event_type = 'task_working'",
                (str(todo_id),))] == kept, backend.backend


def test_an_indexed_job_id_too_long_to_store_is_refused_where_it_is_made(supabase):
    supabase.enqueue("a", "q")
    refusals = []

    def handle(todo):
        try:
            todo.events.emit("task_working", {}, job_id="j" * 1001)
        except ValueError as exc:
            refusals.append(str(exc))
        return {}

    with ps.start(handle, agent_orch="a", storage=supabase) as server:
        wait_for(lambda: server.stats()["completed"] == 1)
    assert refusals == ["job_id is 1,001 characters long; at most 1,000 (events.job_id is "
                        "indexed: a longer one cannot be stored)"]


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


HEARTBEAT_CALLS = ("processgpt_sync_heartbeat_v1", "processgpt_sync_renew_v1")


def calls_since(gateway, before):
    """Requests by function name since the snapshot ``before``."""
    return gateway.calls - before


def health(gateway, agent_orch):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SUPABASE_URL": gateway.url, "SUPABASE_KEY": SERVICE_KEY}
    return subprocess.run([sys.executable, "-m", "processgpt_sync", "health", "--agent-orch",
                           agent_orch], env=env, capture_output=True, text=True, timeout=60)


def test_an_idle_server_makes_no_heartbeat_calls_yet_stays_alive_in_the_registry(supabase):
    gateway = supabase.gateway
    # lease 4 s: the registry row says every 1 s, so it reads dead after 3 s without a refresh
    server = ps.start(lambda todo: {"ok": 1}, agent_orch="a", storage=supabase, lease_seconds=4,
                      consumer="idle-1")
    try:
        wait_for(lambda: supabase.servers(consumer="idle-1"))
        time.sleep(0.5)  # the first heartbeat and claim are start-up, not idle
        before = gateway.calls.copy()
        time.sleep(4.0)
        idle = calls_since(gateway, before)
        (row,) = supabase.servers(consumer="idle-1")
        probe = health(gateway, "a")
    finally:
        server.stop()
    assert not any(idle[name] for name in HEARTBEAT_CALLS), f"idle server heartbeats: {idle}"
    assert row["alive"] is True and row["seen_seconds_ago"] < 3, row
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "server idle-1" in probe.stdout


def test_a_todo_enqueued_while_idle_is_picked_up_without_polling_claims(supabase, db):
    gateway = supabase.gateway
    server = ps.start(lambda todo: {"ok": todo.input}, agent_orch="a", storage=supabase,
                      poll_interval=0.5)
    try:
        wait_for(lambda: gateway.calls["processgpt_sync_claim_v4"] >= 1)
        before = gateway.calls.copy()
        time.sleep(3.0)  # idle: six polls of 0.5 s, were the server polling with claims
        idle = calls_since(gateway, before)
        todo = supabase.enqueue("a", "hello")
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
    finally:
        server.stop()
    assert idle["processgpt_sync_claim_v4"] == 0, f"claims while idle: {idle}"
    assert gateway.calls["processgpt_sync_wait_for_work_v1"] >= 1, "it waited on the database"
    state = db.execute("SELECT draft_status, output FROM todolist WHERE id = %s",
                       (todo,)).fetchone()
    assert state["draft_status"] == "COMPLETED" and state["output"] == {"ok": "hello"}


def test_an_idle_server_whose_claim_answer_was_lost_gives_the_todo_back_at_once(supabase, db):
    gateway = supabase.gateway
    server = ps.start(lambda todo: {"ok": todo.input}, agent_orch="a", storage=supabase,
                      lease_seconds=60, consumer="lossy-1")
    try:
        wait_for(lambda: gateway.calls["processgpt_sync_wait_for_work_v1"] >= 1
                 and gateway.calls["processgpt_sync_heartbeat_v1"] >= 1)
        time.sleep(0.5)  # the start-up heartbeat is over: the server is idle and quiet
        gateway.lose_answer.add("processgpt_sync_claim_v4")
        todo = supabase.enqueue("a", "lost once")
        # Without a heartbeat right after the failed claim, the todo would wait for its 60 s
        # lease: an idle server on Supabase sends no heartbeat of its own.
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
    finally:
        server.stop()
    state = db.execute("SELECT draft_status, output FROM todolist WHERE id = %s",
                       (todo,)).fetchone()
    assert state["draft_status"] == "COMPLETED" and state["output"] == {"ok": "lost once"}
    assert not gateway.lose_answer, "the claim's answer was lost once"


def test_heartbeats_run_while_a_todo_is_in_flight_and_stop_once_idle(supabase, db):

    gateway = supabase.gateway
    release = threading.Event()

    def handle(todo):
        release.wait(30)
        return {"ok": 1}

    server = ps.start(handle, agent_orch="a", storage=supabase, lease_seconds=4,
                      consumer="busy-1")
    try:
        wait_for(lambda: supabase.servers(consumer="busy-1"))
        time.sleep(0.5)
        before = gateway.calls.copy()
        time.sleep(2.5)
        idle_before = calls_since(gateway, before)
        todo = supabase.enqueue("a", "long")
        wait_for(lambda: server.stats()["running"] == 1, timeout=20)
        before = gateway.calls.copy()
        time.sleep(5.0)  # longer than the 4 s lease: only heartbeats keep the claim
        busy = calls_since(gateway, before)
        lease = db.execute("SELECT l.expires_at > now() AS live, t.claim_count FROM "
                           "processgpt_sync_lease l JOIN todolist t ON t.id = l.todo_id "
                           "WHERE t.id = %s", (todo,)).fetchone()
        release.set()
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)

        def no_heartbeat_for_a_while() -> bool:  # the one that reports the todo done is past
            since = gateway.calls.copy()
            time.sleep(1.3)
            return not any(calls_since(gateway, since)[name] for name in HEARTBEAT_CALLS)

        wait_for(no_heartbeat_for_a_while, timeout=15)
        before = gateway.calls.copy()
        time.sleep(2.5)
        idle_after = calls_since(gateway, before)
    finally:
        release.set()
        server.stop()
    assert not any(idle_before[name] for name in HEARTBEAT_CALLS), idle_before
    assert busy["processgpt_sync_heartbeat_v1"] >= 3, busy
    assert lease["live"] is True and lease["claim_count"] == 1, "the lease was renewed"
    assert not any(idle_after[name] for name in HEARTBEAT_CALLS), idle_after


def test_work_the_fleet_limit_holds_back_is_retried_with_back_off_not_in_a_loop(supabase):

    gateway = supabase.gateway
    release = threading.Event()

    def handle(todo):
        release.wait(30)
        return {"ok": 1}

    server = ps.start(handle, agent_orch="a", storage=supabase, workers=2, max_running=1,
                      poll_interval=1.0)
    try:
        supabase.enqueue("a", "first")
        wait_for(lambda: server.stats()["running"] == 1)
        supabase.enqueue("a", "second")  # claimable, but the limit of one is reached
        time.sleep(0.5)
        before = gateway.requests
        time.sleep(3.0)
        calls = gateway.requests - before
        release.set()
        wait_for(lambda: server.stats()["completed"] == 2, timeout=20)
    finally:
        release.set()
        server.stop()
    assert calls <= 30, f"{calls} requests in 3 s while the limit held the work back"


def test_listen_off_polls_with_claims_instead_of_waiting_on_the_database(supabase):
    gateway = supabase.gateway
    server = ps.start(lambda todo: {"ok": 1}, agent_orch="a", storage=supabase, listen=False,
                      poll_interval=0.5)
    try:
        wait_for(lambda: gateway.calls["processgpt_sync_claim_v4"] >= 1)
        before = gateway.calls.copy()
        time.sleep(2.0)
        idle = calls_since(gateway, before)
    finally:
        server.stop()
    assert idle["processgpt_sync_wait_for_work_v1"] == 0 and idle["processgpt_sync_claim_v4"] >= 2


def test_a_wait_for_work_ends_inside_the_statement_timeout_of_the_role(database_url, db):
    name = db.execute("SELECT current_database() AS name").fetchone()["name"]
    db.execute(f'ALTER DATABASE "{name}" SET statement_timeout = \'2s\'')  # as Supabase's roles
    gateway = Gateway(database_url)
    store = SupabaseStorage(gateway.url, SERVICE_KEY)
    try:
        found = store.wait_for_work(agent_orch="a", consumer="c", seconds=8)
    finally:
        store.close()
        gateway.close()
    assert found is False  # neither cancelled by the 2 s timeout nor any work


def test_an_idle_server_under_a_one_second_role_timeout_does_not_wait_in_a_loop(
        database_url, db):
    """A role's statement_timeout of a second leaves the database no time to wait for work:
    each wait returns at once, and the server pauses a second itself rather than ask again
    at once, hundreds of times a second; nor does it pause for its whole idle interval (15 s),
    so new work is still picked up within seconds."""
    name = db.execute("SELECT current_database() AS name").fetchone()["name"]
    db.execute(f'ALTER DATABASE "{name}" SET statement_timeout = \'1s\'')
    gateway = Gateway(database_url)
    store = CountingWaits(gateway.url, SERVICE_KEY)
    try:
        with ps.start(lambda todo: {"ok": True}, agent_orch="idle", storage=store) as server:
            time.sleep(3.0)
            waits = store.waits
            added = time.monotonic()
            store.enqueue("idle", "x")
            wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
            took = time.monotonic() - added
    finally:
        store.close()
        gateway.close()
    assert 1 <= waits <= 5, f"{waits} waits for work in 3 s"
    assert took < 4.0, f"picked up {took:.1f}s after it was added"


class CountingWaits(SupabaseStorage):
    waits = 0

    def wait_for_work(self, **kwargs):
        self.waits += 1
        return super().wait_for_work(**kwargs)


def test_a_todo_whose_row_is_held_waits_without_holding_up_the_others_outcomes(
        supabase, database_url, db):
    """Through the REST API as directly: another transaction holds one finished todo's row;
    the other todo's events and result are written meanwhile, the held one's once it is free."""

    import psycopg

    held_id, free_id = supabase.enqueue("a", "held"), supabase.enqueue("a", "free")
    go = threading.Event()

    def handle(todo):
        go.wait(20)
        todo.events.progress({"step": 1})
        return {"ok": todo.input}

    def written(todo_id):
        row = db.execute("SELECT coalesce(t.output, t.draft) AS result, (SELECT count(*) "
                         "FROM events e WHERE e.todo_id = t.id::text AND e.event_type = "
                         "'task_working') AS steps FROM todolist t WHERE t.id = %s",
                         (todo_id,)).fetchone()
        return row["result"], row["steps"]

    server = ps.start(handle, agent_orch="a", storage=supabase, workers=2)
    try:
        wait_for(lambda: server.stats()["running"] == 2, timeout=20)
        with psycopg.connect(database_url) as blocker:
            blocker.execute("SELECT id FROM todolist WHERE id = %s FOR UPDATE", (held_id,))
            go.set()
            wait_for(lambda: written(free_id) == ({"ok": "free"}, 1), timeout=15)
            time.sleep(0.5)
            assert written(held_id) == (None, 0), "nothing of the held todo is written"
            assert server.stats()["running"] == 1
        wait_for(lambda: server.stats()["completed"] == 2, timeout=20)
    finally:
        go.set()
        server.stop()
    assert written(held_id) == ({"ok": "held"}, 1)


def test_outcomes_past_the_roles_statement_timeout_are_written_in_halves_or_refused(
        database_url, db, caplog, monkeypatch):
    """As on PostgreSQL directly: a batch the role's statement timeout ends through the REST
    API is written in halves; one that times out alone again and again is refused with the
    timeout's code, while the others are stored."""

    from processgpt_sync.outcomes import Outcome, OutcomeWriter
    from tests.integration.test_outcome_writes import SLOW_TRIGGER, heartbeats

    monkeypatch.setattr("processgpt_sync.outcomes.TIMEOUTS_ALONE_MAX", 2)
    db.execute(SLOW_TRIGGER)
    name = db.execute("SELECT current_database() AS name").fetchone()["name"]
    db.execute(f'ALTER DATABASE "{name}" SET statement_timeout = \'500ms\'')
    gateway = Gateway(database_url)
    store = SupabaseStorage(gateway.url, SERVICE_KEY)
    writer = OutcomeWriter(store, abort=threading.Event())
    told: dict = {}
    try:
        for i in range(8):
            store.enqueue("a", f"q{i}")
        claims = store.claim(agent_orch="a", consumer="c", limit=8, lease_seconds=60,
                             max_claims=3)
        heavy = claims[3].todo_id
        writer.start()
        for claim in claims:
            result = {"heavy": True} if claim.todo_id == heavy else {"ok": True}
            writer.submit(Outcome(claim, "completed", result=result),
                          lambda r, f, todo_id=claim.todo_id: told.__setitem__(todo_id, (r, f)))
        with heartbeats(store, claims):
            wait_for(lambda: len(told) == 8, timeout=40)
    finally:
        writer.close(timeout=5)
        store.close()
        gateway.close()
    assert "writing them in halves" in caplog.text
    assert all(told[c.todo_id][0].applied for c in claims if c.todo_id != heavy)
    result, failure = told[heavy]
    assert result is None and failure.code == "57014", (result, failure)
    assert db.execute("SELECT count(*) AS n FROM todolist WHERE output IS NOT NULL OR "
                      "draft IS NOT NULL").fetchone()["n"] == 7


def test_a_key_revoked_mid_run_keeps_the_todos_writes_waiting_until_it_is_accepted_again(
        supabase, db, caplog):
    """The key is refused while a todo runs (rotated, or the gateway briefly refuses it): the
    todo's events and result are not dropped as refused, nor the todo recorded FAILED; they
    wait as through an outage and are written once the key is accepted again."""
    gateway = supabase.gateway
    caplog.set_level(logging.WARNING)
    started, go = threading.Event(), threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        started.set()
        go.wait(10)
        todo.events.progress({"step": 1})
        return {"ok": todo.input}

    todo_id = supabase.enqueue("a", "q")
    server = ps.start(handle, agent_orch="a", storage=supabase, workers=1, poll_interval=0.5)
    try:
        assert started.wait(10)
        gateway.key = "a-revoked-key"
        go.set()
        wait_for(lambda: "Supabase refused" in caplog.text, timeout=10)
        time.sleep(1)  # the writes meet the refusal again and again
        state = db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                           (todo_id,)).fetchone()["s"]
        gateway.key = SERVICE_KEY
        wait_for(lambda: server.stats()["completed"] == 1, timeout=15)
        assert server.failure is None
    finally:
        gateway.key = SERVICE_KEY
        server.stop(timeout=5)
    assert state == "STARTED"
    row = db.execute("SELECT draft_status::text AS s, output FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert (row["s"], row["output"]) == ("COMPLETED", {"ok": "q"})
    events = db.execute("SELECT event_type FROM events WHERE todo_id = %s ORDER BY timestamp",
                        (todo_id,)).fetchall()
    assert [e["event_type"] for e in events] == ["task_working", "crew_completed"]
    assert "not this project's, or it was revoked" in caplog.text
    assert "dropped" not in caplog.text and "refused (" not in caplog.text


def test_a_server_whose_key_stays_refused_stops_and_says_why(supabase, monkeypatch, caplog):
    """A revoked key stays revoked: once every call has been refused for
    ``ACCESS_DENIED_STOP_AFTER`` seconds the server stops (ServerFailed naming the key), instead
    of retrying for ever; a refusal shorter than that is retried."""
    monkeypatch.setattr("processgpt_sync.retrying.ACCESS_DENIED_STOP_AFTER", 3.0)
    caplog.set_level(logging.WARNING)
    server = ps.start(lambda todo: {}, agent_orch="a", storage=supabase, workers=1,
                      poll_interval=0.5)
    try:
        supabase.gateway.key = "a-revoked-key"
        wait_for(lambda: server.failure is not None, timeout=15)
        silent = time.monotonic() - supabase.last_success  # no call answered since
        assert server.join(15), "the failed server stops"
    finally:
        supabase.gateway.key = SERVICE_KEY
        server.stop(timeout=5)
    assert silent >= 3.0
    assert isinstance(server.failure, ps.ServerFailed)
    assert "refused" in str(server.failure) and "service-role key" in str(server.failure)
    assert "so this server stops" in caplog.text


@pytest.mark.parametrize(("answer", "advice"), [
    ((401, {"code": "PGRST301", "message": "JWT expired", "details": None, "hint": None}),
     "not a valid JWT of this project, or it expired"),
    ((401, {"code": "PGRST302", "message": "Anonymous access is disabled", "details": None,
            "hint": None}), "carried no key"),
    ((401, {"message": "Invalid API key"}), "not this project's, or it was revoked"),
    ((403, "<html><body>Forbidden</body></html>"), "the API gateway forbids"),
    ((403, {"code": "42501", "message": "permission denied for table todolist", "details": None,
            "hint": None}), "the key's role may not do this"),
    ((403, {"code": "42501", "message": "new row violates row-level security policy for table "
            "todolist", "details": None, "hint": None}), "the key's role may not do this"),
], ids=["jwt-expired", "no-key", "invalid-key", "forbidden-page", "no-grant", "row-security"])
def test_each_refusal_of_the_key_or_its_role_names_what_to_do(supabase, answer, advice):
    """Every way the API refuses the key itself is AccessDenied (a write waits for it; a server
    stops after a while), with the HTTP status where the answer has no code. What the key's
    role may not do (42501: the anon key, a site's row security or trigger) refuses that call
    only, as any refusal: a plain StorageError, so a write it refuses is not retried for ever
    while the others succeed."""
    supabase.gateway.gateway_answers["processgpt_sync_enqueue_v1"] = [answer]
    with pytest.raises(ps.StorageError) as refused:
        supabase.enqueue("a", "x")
    assert advice in str(refused.value) and "(None)" not in str(refused.value)
    key_refused = answer[0] == 401 or not isinstance(answer[1], dict)
    assert isinstance(refused.value, ps.AccessDenied) is key_refused
    assert isinstance(refused.value, ps.StorageUnavailable) is key_refused
    supabase.gateway.gateway_answers["processgpt_sync_enqueue_v1"] = [
        (400, {"code": "P0001", "message": "agent_orch must not be empty", "details": None,
               "hint": None})]
    with pytest.raises(ps.StorageError) as failed:
        supabase.enqueue("a", "x")
    assert not isinstance(failed.value, ps.StorageUnavailable)


def test_a_rate_limits_retry_after_is_waited_before_the_write_is_sent_again(supabase, db):
    """A 429 saying ``Retry-After: 2``: the outcome is sent again no sooner than that, not
    within the back-off's first fraction of a second, and is stored."""
    gateway = supabase.gateway
    limited = RawBody(json.dumps({"message": "API rate limit exceeded"}), "application/json",
                      headers=(("Retry-After", "2"),))
    gateway.gateway_answers["processgpt_sync_finish_v1"] = [(429, limited)]
    todo_id = supabase.enqueue("a", "q")
    with ps.start(lambda todo: {"ok": True}, agent_orch="a", storage=supabase, workers=1):
        wait_for(lambda: db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = "
                                    "%s", (todo_id,)).fetchone()["s"] == "COMPLETED",
                 timeout=15)
    first, second = gateway.called_at["processgpt_sync_finish_v1"][:2]
    assert second - first >= 1.9, second - first


def test_retry_after_is_read_as_seconds_or_an_http_date_and_nothing_else():
    def asked(value: str) -> float | None:
        return _retry_after(httpx.Response(429, headers={"Retry-After": value}))

    assert asked("2") == 2.0 and asked("0") == 0.0 and asked("1.5") == 1.5
    ahead = asked(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert ahead is not None and 58 <= ahead <= 60
    assert asked(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0  # passed
    assert asked("soon") is None and asked("") is None
    assert _retry_after(httpx.Response(503)) is None and _retry_after(None) is None


TRANSIENT = {"40001", "40P01", "40003", "55P03", "55006", "57014", "53300"}


@pytest.mark.parametrize("code", sorted(TRANSIENT | {"40002", "55000", "54000", "F0000",
                                                     "HV000", "P0001", "22023"}))
def test_an_error_of_the_database_is_an_outage_or_a_refusal_alike_on_both_backends(
        database_url, db, code):
    """A site's trigger on `events` raises the SQLSTATE: both backends tell it the same way,
    try again later (StorageUnavailable: the write waits) or a refusal (StorageError: the
    events are dropped, a result stored without them), so that a write one backend retries is
    never dropped by the other. Before, PostgreSQL retried every error psycopg calls
    operational (a deferred constraint refused at commit, a foreign data wrapper's error)
    for ever, and Supabase refused an object in use and a statement whose end is unknown."""
    stores = {name: open_backend(name, database_url) for name in ("postgres", "supabase")}
    raised: dict[str, type] = {}
    try:
        claims = {}
        for name, backends in stores.items():
            store = next(backends)
            store.enqueue("codes", name)
            claims[name] = (store, store.claim(agent_orch="codes", consumer=name, limit=1,
                                               lease_seconds=60, max_claims=3)[0])
        db.execute(f"""
            CREATE FUNCTION site_says_no() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'the site says no' USING ERRCODE = '{code}'; END $$;
            CREATE TRIGGER site_says_no BEFORE INSERT ON events
                FOR EACH ROW EXECUTE FUNCTION site_says_no();""")
        for name, (store, claim) in claims.items():
            with pytest.raises(ps.StorageError, match="the site says no") as caught:
                store.record_events([{"todo_id": claim.todo_id, "token": claim.token,
                                      "event_type": "task_working", "data": {"step": 1},
                                      "job_id": None, "crew_type": None, "status": None}])
            raised[name] = type(caught.value)
    finally:
        for backends in stores.values():
            next(backends, None)
    expected = ps.StorageUnavailable if code in TRANSIENT else ps.StorageError
    assert raised == {"postgres": expected, "supabase": expected}


@pytest.mark.parametrize("backend", ["supabase", "postgres behind a transaction pooler"])
def test_a_fenced_write_meeting_a_held_row_fails_as_a_lock_wait_not_a_statement_timeout(
        database_url, db, backend):
    """Through the REST API (or a transaction pooler) no session setting of the library
    reaches the database: a fenced write (a draft, a question) meeting a todo row another
    transaction holds (the platform's engine) now fails within half the statement timeout as
    lock_not_available, an outage retried until the row is free. Before, it waited into the
    statement timeout, and a few of those took it for a write too heavy to store: the draft
    was dropped, or the question failed and the todo ran again from the start."""
    from processgpt_sync.storage.postgres import PostgresStorage

    name = db.execute("SELECT current_database() AS name").fetchone()["name"]
    db.execute(f'ALTER DATABASE "{name}" SET statement_timeout = \'2s\'')
    gateway = Gateway(database_url) if backend == "supabase" else None
    store: Any = (SupabaseStorage(gateway.url, SERVICE_KEY) if gateway is not None
                  else PostgresStorage(database_url, prepare=False))
    try:
        todo_id = store.enqueue("a", "q")
        (claim,) = store.claim(agent_orch="a", consumer="c", limit=1, lease_seconds=60,
                               max_claims=3)
        with psycopg.connect(database_url) as engine:
            engine.execute("SELECT id FROM todolist WHERE id = %s FOR UPDATE", (todo_id,))
            with pytest.raises(ps.StorageUnavailable) as held:
                store.save_result(claim, {"draft": 1}, final=False)
        written = store.save_result(claim, {"draft": 2}, final=False)  # the row is free
    finally:
        store.close()
        if gateway is not None:
            gateway.close()
    assert held.value.code == "55P03", held.value
    assert written.applied
    assert db.execute("SELECT draft FROM todolist WHERE id = %s", (todo_id,)
                      ).fetchone()["draft"] == {"draft": 2}


def test_a_trigger_refusing_a_write_in_words_about_a_jwt_refuses_that_write_not_the_key(
        supabase, db):
    """A site's trigger that raises "tenant missing from JWT claims" (the platform reads
    tenants from the JWT) refuses that one write, with its SQLSTATE: not taken for a refused
    key, which is retried as an outage, for ever, holding up every later outcome behind it."""
    db.execute("""
        CREATE FUNCTION refuse_without_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'tenant missing from JWT claims'; END $$;
        CREATE TRIGGER refuse_without_tenant BEFORE UPDATE OF draft ON todolist
        FOR EACH ROW WHEN (NEW.draft IS NOT NULL) EXECUTE FUNCTION refuse_without_tenant();
    """)
    supabase.enqueue("a", "q")
    (claim,) = supabase.claim(agent_orch="a", consumer="c", limit=1, lease_seconds=60,
                              max_claims=3)
    with pytest.raises(ps.StorageError) as refused:
        supabase.save_result(claim, {"draft": 1}, final=False)
    assert not isinstance(refused.value, ps.StorageUnavailable), refused.value
    assert refused.value.code == "P0001" and "JWT claims" in str(refused.value)
