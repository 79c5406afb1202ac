"""The console over HTTP on the embedded database: pages, live streams, actions and its guard."""

from __future__ import annotations

import html
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from psycopg.conninfo import make_conninfo

import processgpt_sync as ps
from processgpt_sync.console import ConsoleConfig, ConsoleServer
from processgpt_sync.console.app import answer_from_form
from processgpt_sync.console.security import CSRF_COOKIE
from processgpt_sync.console.streams import FIRST_EVENT, cursor
from processgpt_sync.errors import ConfigurationError
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import open_backend, wait_for

XSS = "<script>alert(1)</script>"
TOKEN = "a-long-enough-console-token"


@pytest.fixture
def console(storage) -> Iterator[ConsoleServer]:
    with ConsoleServer(storage, ConsoleConfig(port=0)) as server:
        yield server


def client_of(server: ConsoleServer, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10, **kwargs)


@pytest.fixture
def client(console) -> Iterator[httpx.Client]:
    with client_of(console) as http:
        yield http


def csrf_of(client: httpx.Client) -> str:
    name = f"{CSRF_COOKIE}_{client.base_url.port}"
    if name not in client.cookies:
        client.get("/todos")
    return client.cookies[name]


def post(client: httpx.Client, url: str, **fields: str) -> httpx.Response:
    return client.post(url, data={"csrf_token": csrf_of(client), **fields})


def read_stream(client: httpx.Client, url: str, until, timeout: float = 15.0) -> str:
    """Read a Server-Sent Events stream until ``until(text so far)`` holds; return the text."""
    seen = ""
    deadline = time.monotonic() + timeout
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            seen += line + "\n"
            if until(seen):
                return seen
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"stream {url} never showed what was expected; got:\n{seen[-2000:]}")


def state_of(db, todo_id):
    return db.execute("SELECT status::text, draft_status::text, feedback FROM todolist "
                      "WHERE id = %s", (todo_id,)).fetchone()


def test_the_console_leaves_logging_to_the_application(console, client, caplog):
    """uvicorn's records (an error in a page, its start) go through the application's logging,
    in the CLI's format and level; before, uvicorn configured a handler of its own, which
    wrote them as plain text past a JSON log and ignored --log-level."""
    assert client.get("/todos").status_code == 200
    web_server = logging.getLogger("uvicorn")
    assert (web_server.handlers, web_server.propagate) == ([], True)
    with caplog.at_level(logging.ERROR):
        logging.getLogger("uvicorn.error").error("an error in a page")
    assert "an error in a page" in caplog.text


def test_todo_list_filters_by_agent_orch_tenant_and_state(storage, client, db):
    a1 = storage.enqueue("agent-a", "first for a", tenant_id="t1")
    a2 = storage.enqueue("agent-a", "second for a", tenant_id="t2")
    b1 = storage.enqueue("agent-b", "only for b", tenant_id="t1")
    storage.call("cancel", {"p_todo_id": a2})

    page = client.get("/todos").text
    assert all(todo_id[:8] in page for todo_id in (a1, a2, b1))
    only_a = client.get("/todos", params={"agent_orch": "agent-a"}).text
    assert a1[:8] in only_a and a2[:8] in only_a and b1[:8] not in only_a
    only_t1 = client.get("/todos", params={"tenant": "t1"}).text
    assert a1[:8] in only_t1 and b1[:8] in only_t1 and a2[:8] not in only_t1
    cancelled = client.get("/todos", params={"state": "CANCELLED"}).text
    assert a2[:8] in cancelled and a1[:8] not in cancelled and b1[:8] not in cancelled
    queued = client.get("/todos", params={"agent_orch": "agent-a", "state": "QUEUED"},
                        headers={"HX-Request": "true"}).text
    assert "<html" not in queued, "htmx gets the rows fragment only"
    assert a1[:8] in queued and a2[:8] not in queued
    # a filter no todo matches yet stays selected, so the next change of another keeps it
    none_yet = client.get("/todos", params={"agent_orch": "agent-new"}).text
    assert '<option value="agent-new" selected>agent-new</option>' in none_yet
    assert not any(todo_id[:8] in none_yet for todo_id in (a1, a2, b1))


def test_a_list_read_gives_the_newest_page_the_counts_it_filters_and_every_filter_value(
        storage, db):
    """What the list shows, read once: the newest todos matching the filters, the counts per
    state under the agent_orch and tenant filters (not the state filter: they are its tabs),
    and every agent_orch and tenant in the table to filter by."""
    made = [storage.enqueue(orch, f"{orch} {tenant} {n}", tenant_id=tenant)
            for orch, tenant, n in [("agent-a", "t1", 0), ("agent-a", "t2", 1),
                                    ("agent-a", "t1", 2), ("agent-b", "t3", 3)]]
    storage.call("cancel", {"p_todo_id": made[1]})

    def read(orch=None, tenant=None, state=None, limit=100):
        return db.execute("SELECT processgpt_sync_console_todos_v1(%s, %s, %s, %s) AS r",
                          (orch, tenant, state, limit)).fetchone()["r"]

    everything = read()
    assert [t["id"] for t in everything["todos"]] == [str(i) for i in reversed(made)]
    assert everything["counts"] == {"QUEUED": 3, "CANCELLED": 1}
    assert everything["agent_orchs"] == ["agent-a", "agent-b"]
    assert everything["tenants"] == ["t1", "t2", "t3"]
    newest_a = read("agent-a", limit=2)
    assert [t["id"] for t in newest_a["todos"]] == [str(made[2]), str(made[1])]
    assert newest_a["counts"] == {"QUEUED": 2, "CANCELLED": 1}
    assert newest_a["agent_orchs"] == ["agent-a", "agent-b"], "the filters do not hide values"
    (row,) = read("agent-a", "t2")["todos"]
    assert (row["state"], row["input"], row["tenant_id"]) == ("CANCELLED", "agent-a t2 1", "t2")
    assert read("agent-a", "t1")["counts"] == {"QUEUED": 2}
    queued_a = read("agent-a", state="QUEUED")
    assert [t["id"] for t in queued_a["todos"]] == [str(made[2]), str(made[0])]
    assert queued_a["counts"] == {"QUEUED": 2, "CANCELLED": 1}
    assert read("nobody") | {"agent_orchs": [], "tenants": []} == {
        "todos": [], "counts": {}, "agent_orchs": [], "tenants": []}


def test_todo_page_shows_input_result_log_and_events_with_agent_text_escaped(storage, client):
    def handle(todo):
        todo.events.progress(XSS)
        todo.events.emit("task_working", {"message": XSS, "html": "<img src=x onerror=alert(2)>"})
        return {"answer": XSS}

    todo_id = storage.enqueue("console", f"input {XSS}")
    with ps.start(handle, agent_orch="console", storage=storage):
        wait_for(lambda: client.get(f"/todos/{todo_id}").text.count("COMPLETED") > 0)
    page = client.get(f"/todos/{todo_id}")
    assert page.status_code == 200
    text = page.text
    assert "<script>alert(1)" not in text and "<img src=x" not in text
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # input, 2 events, result
    assert "&lt;img src=x onerror=alert(2)&gt;" in text
    assert "crew_completed" in text and "task_working" in text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get(f"/todos/{uuid.uuid4()}").status_code == 404
    assert client.get("/todos/not-a-uuid").status_code == 404


def test_values_nested_deeper_than_python_reads_are_said_to_be_so_not_a_server_error(
        storage, client, db, deep_json_text):
    """jsonb holds thousands of levels: the page, its stream and the list still show the rest."""
    deep = deep_json_text
    todo_id = storage.enqueue("console", "a deep one")
    db.execute("UPDATE todolist SET output = %s::jsonb WHERE id = %s", (deep, todo_id))
    db.execute("INSERT INTO events (id, job_id, todo_id, event_type, data) VALUES "
               "(gen_random_uuid(), 'deep', %s, 'task_working', %s::jsonb), "
               "(gen_random_uuid(), 'deep', %s, 'task_working', '{\"n\": \"shallow\"}')",
               (todo_id, deep, todo_id))
    page = client.get(f"/todos/{todo_id}")
    assert page.status_code == 200
    assert page.text.count("nested too deeply to show") == 2  # the result and the event
    assert "shallow" in page.text and "a deep one" in page.text
    read_stream(client, f"/todos/{todo_id}/stream",
                until=lambda text: "shallow" in text and "nested too deeply to show" in text)
    assert client.get("/todos").status_code == 200
    asking = storage.enqueue("console", "a deep question")  # another writer's question
    db.execute("UPDATE todolist SET draft_status = 'HUMAN_ASKED' WHERE id = %s", (asking,))
    db.execute("INSERT INTO events (id, job_id, todo_id, event_type, data) VALUES "
               "(gen_random_uuid(), 'deep-q', %s, 'human_asked', "
               "jsonb_build_object('question', %s::jsonb, 'type', %s::jsonb))",
               (asking, deep, deep))
    for path in ("/questions", f"/todos/{asking}"):
        page = client.get(path)
        assert page.status_code == 200 and "deep-q" in page.text
        assert "nested too deeply to show" in page.text  # the question (and the event)


def test_event_stream_shows_new_events_and_the_final_state_as_they_happen(storage, client, db):
    gate = threading.Event()

    def handle(todo):
        todo.events.progress("first step")
        gate.wait(10)
        todo.events.progress(f"second step {XSS}")
        return {"done": True}

    todo_id = storage.enqueue("console", "stream me")
    with ps.start(handle, agent_orch="console", storage=storage):
        wait_for(lambda: db.execute("SELECT 1 FROM events WHERE todo_id = %s",
                                    (todo_id,)).fetchone())
        opened = []

        def release_once_open(text: str) -> bool:
            if "first step" in text and not opened:
                opened.append(True)
                gate.set()
            return "COMPLETED" in text and "second step" in text

        seen = read_stream(client, f"/todos/{todo_id}/stream", release_once_open)
    assert "event: events" in seen and "event: state" in seen
    assert "second step &lt;script&gt;alert(1)&lt;/script&gt;" in seen
    assert XSS not in seen


def test_a_burst_of_events_larger_than_a_page_reaches_an_open_page_whole(console, client, db,
                                                                         storage):
    """A live page reads events a page at a time; a burst of 1,200 written in one statement
    (one timestamp for all) is shown whole, each event once, and later events still follow."""
    todo_id = storage.enqueue("console", "a chatty agent")
    insert = ("INSERT INTO events (id, job_id, todo_id, event_type, data) SELECT "
              "gen_random_uuid(), 'burst', %s, 'task_working', jsonb_build_object('n', g) "
              "FROM generate_series(1, %s) g")

    def shown(text: str) -> list[str]:
        return re.findall(r'<tr id="ev-([0-9a-f-]+)"', text)

    def burst_then_one(text: str) -> bool:
        if "event: state" in text and not written:  # the stream is open
            written.append(1200)
            db.execute(insert, (todo_id, 1200))
        if len(shown(text)) == 1200 and len(written) == 1:
            written.append(1)
            db.execute(insert, (todo_id, 1))
        return len(shown(text)) >= 1201

    written: list[int] = []
    assert wait_for(lambda: console.app.state.console.feed.listening)
    ids = shown(read_stream(client, f"/todos/{todo_id}/stream", burst_then_one, timeout=60))
    assert len(ids) == len(set(ids)) == 1201
    stored = db.execute("SELECT id FROM events WHERE todo_id = %s", (todo_id,)).fetchall()
    assert set(ids) == {row["id"] for row in stored}
    # a page opened now shows the newest 500; its stream sends what comes next, never the
    # older ones of the burst (they would land below the newest)
    page = client.get(f"/todos/{todo_id}").text
    on_page = shown(page)
    url = html.unescape(re.search(r'data-stream="([^"]+)"', page).group(1))
    assert len(on_page) == 500 and "after=" in url
    url = re.sub(r"&(state|questions)=[^&]*", "", url)  # as a reconnect: panels sent first

    def one_more(text: str) -> bool:
        if "event: state" in text and len(written) == 2:
            written.append(1)
            db.execute(insert, (todo_id, 1))
        return bool(shown(text))

    later = shown(read_stream(client, url, one_more))
    newest = db.execute("SELECT id FROM events WHERE todo_id = %s ORDER BY timestamp DESC "
                        "LIMIT 1", (todo_id,)).fetchone()["id"]
    assert later == [newest]


def test_list_stream_shows_a_new_todo(storage, client):
    seen_first = threading.Event()
    added: list[str] = []

    def enqueue_later():
        seen_first.wait(10)
        added.append(storage.enqueue("console", "arrives later"))

    thread = threading.Thread(target=enqueue_later)
    thread.start()

    def until(text: str) -> bool:
        if "event: rows" in text:
            seen_first.set()
        return bool(added) and added[0][:8] in text

    read_stream(client, "/todos/stream?agent_orch=console", until)
    thread.join()


def test_answering_a_select_question_writes_what_the_ui_writes_and_the_executor_continues(
        storage, client, db):
    def handle(todo):
        style = todo.ask_human("Which way?", options=["fast", "careful"], kind="select")
        return {"style": style}

    todo_id = storage.enqueue("console", "ask me")
    with ps.start(handle, agent_orch="console", storage=storage):
        page = wait_for(lambda: next((t for t in [client.get(f"/todos/{todo_id}").text]
                                      if "Which way?" in t), None))
        assert '<select name="choice"' in page and "careful" in page
        job_id = db.execute("SELECT job_id FROM events WHERE event_type = 'human_asked'"
                            ).fetchone()["job_id"]
        assert job_id in client.get("/questions").text
        answered = post(client, f"/questions/{job_id}/answer", choice="1")
        assert answered.status_code == 303
        assert answered.headers["location"] == f"/todos/{todo_id}"
        wait_for(lambda: state_of(db, todo_id)["draft_status"] == "COMPLETED")
    response = db.execute("SELECT job_id, todo_id, data, status::text FROM events "
                          "WHERE event_type = 'human_response'").fetchone()
    assert response["job_id"] == job_id and response["todo_id"] == todo_id
    assert response["data"]["answer"] == "careful" and response["status"] == "APPROVED"
    output = db.execute("SELECT output FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    assert output["output"] == {"style": "careful"}
    again = post(client, f"/questions/{job_id}/answer", choice="0")
    assert again.status_code == 409, "an answered question is closed"


def answer_action(page: str) -> str:
    """The URL the page's (only) answer form posts to."""
    (action,) = re.findall(r'action="([^"]*/answer[^"]*)"', page)
    return html.unescape(action)


def test_questions_whose_job_ids_no_path_keeps_or_whose_options_are_odd_are_answered(
        storage, client, db):
    """Job ids are any text (a2a and upstream agents write their own): "/" and ".." in one
    still reach its question. A select question whose options another writer gave as a
    number is answered as text, not a page that fails for every question."""
    from processgpt_sync.human import question_data

    for name in ("slash", "dots", "odd"):
        storage.enqueue("console", name)
    claims = storage.claim(agent_orch="console", consumer="w", limit=3, lease_seconds=60,
                           max_claims=3)
    asked = {"task/1": "slash?", "..": "dots?", "odd-options": "odd?"}
    for claim, (job_id, text) in zip(claims, asked.items(), strict=True):
        data = question_data(text, None, "text")
        if job_id == "odd-options":
            data = {**data, "type": "select", "options": 5}
        storage.ask(claim, job_id, data)
        storage.finish([{"todo_id": claim.todo_id, "token": claim.token, "outcome": "asked"}])
    assert client.get("/questions").status_code == 200
    for claim in claims:
        answered = post(client, answer_action(client.get(f"/todos/{claim.todo_id}").text),
                        answer="go on")
        assert answered.status_code == 303, answered.text
        assert state_of(db, claim.todo_id)["draft_status"] == "FB_REQUESTED"


def suspended_on_one_job_id(storage):
    """Two todos suspended on questions under the same job id (executors reuse job ids)."""
    from processgpt_sync.human import question_data

    for name in ("a", "b"):
        storage.enqueue("console", name)
    claims = storage.claim(agent_orch="console", consumer="w", limit=2, lease_seconds=60,
                           max_claims=3)
    for c in claims:
        storage.ask(c, "job-shared", question_data(f"Approve {c.todo_id}?", None, "text"))
        storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    return list(claims)


def test_a_job_id_two_todos_share_is_answered_on_the_todo_whose_form_was_used(
        storage, client, db):
    """Executors reuse job ids across todos: each todo's form answers its own question."""
    claims = suspended_on_one_job_id(storage)
    first, second = (c.todo_id for c in claims)
    action = answer_action(client.get(f"/todos/{second}").text)
    assert action == f"/questions/answer?job=job-shared&todo={second}"
    answered = post(client, action, answer="for b")
    assert answered.headers["location"] == f"/todos/{second}"
    assert state_of(db, second)["draft_status"] == "FB_REQUESTED"
    assert state_of(db, first)["draft_status"] == "HUMAN_ASKED"


def test_answer_form_gives_each_kind_its_value():
    select = {"question": "?", "type": "select", "options": [1, {"k": "v"}]}
    assert answer_from_form(select, {"choice": "1"}) == ({"k": "v"}, None)
    assert answer_from_form(select, {"choice": "2"})[1] == "choose one of the options"
    assert answer_from_form(select, {"choice": "²"})[1] == "choose one of the options"
    confirm = {"question": "?", "type": "confirm"}
    assert answer_from_form(confirm, {"answer": "yes"}) == (True, None)
    assert answer_from_form(confirm, {"answer": "no"}) == (False, None)
    assert answer_from_form(confirm, {"answer": "maybe"})[1] == "answer yes or no"
    assert answer_from_form({"question": "?", "type": "text"}, {"answer": "ok"}) == ("ok", None)
    assert answer_from_form({"question": "?"}, {"answer": "  "})[1] == "the answer is empty"
    for odd in (5, True, "ab", {"a": 1}):  # another writer's options: answered as text
        assert answer_from_form({"question": "?", "type": "select", "options": odd},
                                {"answer": "as text"}) == ("as text", None)
    for early in ("0001-01-01", "1969-12-31", "", "not a time"):  # read from the first event
        assert cursor(early) == FIRST_EVENT, early
    assert cursor("2026-05-01T10:00:02") == cursor("2026-05-01T10:00:02+00:00")  # no zone: UTC


def test_cancel_stops_the_running_executor_as_a_ui_cancel_does(storage, client, db):
    stopped = threading.Event()

    def handle(todo):
        todo.events.progress("working")
        while not todo.cancelled:
            time.sleep(0.02)
        stopped.set()
        return None

    todo_id = storage.enqueue("console", "cancel me")
    with ps.start(handle, agent_orch="console", storage=storage):
        wait_for(lambda: state_of(db, todo_id)["draft_status"] == "STARTED")
        response = post(client, f"/todos/{todo_id}/cancel")
        assert response.status_code == 303
        assert stopped.wait(10), "the executor saw the cancel"
    row = state_of(db, todo_id)
    assert (row["status"], row["draft_status"]) == ("CANCELLED", "CANCELLED")
    refused = post(client, f"/todos/{todo_id}/cancel")
    assert refused.status_code == 409 and "already CANCELLED" in refused.text


def test_cancel_is_only_offered_and_allowed_for_an_agents_work_in_progress(storage, client, db):
    """A person's task, or a step its process already took or has not reached (with no
    draft_status, or only the UI's revision request waiting for the step), is left to the
    process: no Cancel button, a 409 with the reason, the row unchanged."""
    todo_id = storage.enqueue("console", "a person's task")
    for status in ("DONE", "SUBMITTED", "TODO", "PENDING"):
        db.execute("UPDATE todolist SET status = %s WHERE id = %s", (status, todo_id))
        assert "Cancel todo" not in client.get(f"/todos/{todo_id}").text
        refused = post(client, f"/todos/{todo_id}/cancel")
        assert refused.status_code == 409, status
        assert f"can be cancelled here (this todo is {status})" in refused.text
        counts = client.get("/todos").text.split('<table class="todos">')[0]
        assert f'state-{status.lower()}">{status}</span> 1' in counts, "counted in the list"
        row = state_of(db, todo_id)
        assert (row["status"], row["draft_status"]) == (status, None)
    for status in ("SUBMITTED", "TODO", "PENDING"):  # the UI's feedback on it: still the
        db.execute("UPDATE todolist SET status = %s, draft_status = 'FB_REQUESTED' "  # process's
                   "WHERE id = %s", (status, todo_id))
        page = client.get(f"/todos/{todo_id}").text
        assert "Cancel todo" not in page and "WAITING_FOR_STEP" in page
        assert "runs once its process puts the step in progress" in page
        refused = post(client, f"/todos/{todo_id}/cancel")
        assert refused.status_code == 409, status
        assert "can be cancelled here (this todo is WAITING_FOR_STEP)" in refused.text
        row = state_of(db, todo_id)
        assert (row["status"], row["draft_status"]) == (status, "FB_REQUESTED")
        waiting = client.get("/todos", params={"state": "WAITING_FOR_STEP"}).text
        ready = client.get("/todos", params={"state": "FB_REQUESTED"}).text
        assert todo_id[:8] in waiting and todo_id[:8] not in ready, "told apart in the list"
    db.execute("UPDATE todolist SET status = 'IN_PROGRESS', draft_status = NULL WHERE id = %s",
               (todo_id,))
    (c,) = storage.claim(agent_orch="console", consumer="w", limit=1, lease_seconds=60,
                         max_claims=3)
    for status in ("TODO", "PENDING"):  # its run, of a step the process took out of progress
        db.execute("UPDATE todolist SET status = %s WHERE id = %s", (status, todo_id))
        assert "Cancel todo" not in client.get(f"/todos/{todo_id}").text
        refused = post(client, f"/todos/{todo_id}/cancel")
        assert refused.status_code == 409 and "(this todo is STARTED)" in refused.text, status
        assert state_of(db, todo_id)["status"] == status
    storage.release([c])
    db.execute("UPDATE todolist SET draft_status = NULL WHERE id = %s", (todo_id,))
    db.execute("UPDATE todolist SET status = 'IN_PROGRESS', agent_mode = NULL WHERE id = %s",
               (todo_id,))  # a person's task in progress
    db.execute("UPDATE todolist SET agent_mode = 'COMPLETE', draft = '{\"text\": \"d\"}' "
               "WHERE id = %s", (todo_id,))  # an agent's step whose draft is written: no claim
    for _ in range(2):
        page = client.get(f"/todos/{todo_id}").text
        assert "Cancel todo" not in page and 'class="state state-in_progress"' in page
        refused = post(client, f"/todos/{todo_id}/cancel")
        assert refused.status_code == 409 and "(this todo is IN_PROGRESS)" in refused.text
        assert todo_id[:8] not in client.get("/todos", params={"state": "QUEUED"}).text
        assert todo_id[:8] in client.get("/todos", params={"state": "IN_PROGRESS"}).text
        db.execute("UPDATE todolist SET agent_mode = NULL, draft = NULL WHERE id = %s",
                   (todo_id,))
    db.execute("UPDATE todolist SET agent_mode = 'COMPLETE' WHERE id = %s", (todo_id,))
    assert "Cancel todo" in client.get(f"/todos/{todo_id}").text  # queued: the agent's
    assert todo_id[:8] in client.get("/todos", params={"state": "QUEUED"}).text


class ConsoleDatabaseTrouble(PostgresStorage):
    """The todo list cannot be read (an outage); a cancel is refused by the database."""

    def call(self, query, params):
        if query == "console_todos":
            raise ps.StorageUnavailable("database unreachable (console_todos): no route")
        if query == "cancel":
            raise ps.StorageError("the todo is locked by a migration", code="P0001")
        return super().call(query, params)


def test_database_errors_under_pages_and_actions_are_said_with_their_status(database_url):
    """An outage is a 503 page saying to try again; a refusal a 409 with its reason; never a
    bare 500."""
    storage = ConsoleDatabaseTrouble(database_url)
    todo_id = storage.enqueue("console", "x")
    try:
        with ConsoleServer(storage, ConsoleConfig(port=0)) as server, client_of(server) as http:
            page = http.get("/todos")
            assert page.status_code == 503
            assert "the database did not answer; try again in a moment" in page.text
            refused = post(http, f"/todos/{todo_id}/cancel")
            assert refused.status_code == 409
            assert "the todo is locked by a migration" in refused.text
    finally:
        storage.close()


def test_enqueue_inserts_a_claimable_todo(client, db):
    response = post(client, "/todos", agent_orch="console", input="from the console",
                    mode="DRAFT", tenant="t9")
    assert response.status_code == 303
    todo_id = response.headers["location"].rsplit("/", 1)[1]
    row = db.execute("SELECT agent_orch, query, agent_mode::text, tenant_id, status::text, "
                     "draft_status FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    assert row == {"agent_orch": "console", "query": "from the console", "agent_mode": "DRAFT",
                   "tenant_id": "t9", "status": "IN_PROGRESS", "draft_status": None}
    bad = post(client, "/todos", agent_orch="console", input="x", mode="FAST")
    assert bad.status_code == 400
    assert db.execute("SELECT count(*) AS n FROM todolist").fetchone()["n"] == 1


def test_revision_request_appends_feedback_and_the_todo_runs_again(storage, client, db):
    runs = []

    def handle(todo):
        runs.append(todo.resume.kind)
        return {"run": len(runs)}

    todo_id = storage.enqueue("console", "revise me")
    with ps.start(handle, agent_orch="console", storage=storage):
        wait_for(lambda: state_of(db, todo_id)["draft_status"] == "COMPLETED")
        for blank in ("  ", "\n", "\t\r\n", "\u00a0", "\u3000"):  # what `required` lets by
            empty = post(client, f"/todos/{todo_id}/revision", feedback=blank)
            assert empty.status_code == 409 and "feedback is empty" in empty.text, repr(blank)
        response = post(client, f"/todos/{todo_id}/revision", feedback=f"shorter {XSS}")
        assert response.status_code == 303
        wait_for(lambda: len(runs) == 2 and state_of(db, todo_id)["draft_status"] == "COMPLETED")
    assert runs == ["fresh", "revision"]
    assert state_of(db, todo_id)["status"] == "SUBMITTED", "taken back, then submitted again"
    feedback = state_of(db, todo_id)["feedback"]
    assert len(feedback) == 1
    item = feedback[0]
    assert item["kind"] == "revision" and item["content"] == f"shorter {XSS}"
    assert set(item) == {"time", "content", "user_id", "kind"}
    assert "&lt;script&gt;" in client.get(f"/todos/{todo_id}").text


def test_revision_is_refused_once_a_platform_worker_takes_the_submitted_result(storage, client,
                                                                                db):
    """A COMPLETE-mode result is submitted (status SUBMITTED); the platform's polling service
    then holds the row (its consumer) while it completes the step. Before that a revision
    takes the result back (status IN_PROGRESS, above); after, it would race the process."""
    todo_id = storage.enqueue("console", "submitted")
    (c,) = storage.claim(agent_orch="console", consumer="w", limit=1, lease_seconds=60,
                         max_claims=3)
    storage.save_result(c, {"ok": 1})
    db.execute("UPDATE todolist SET consumer = 'polling-pod-1' WHERE id = %s", (todo_id,))
    response = post(client, f"/todos/{todo_id}/revision", feedback="again")
    assert response.status_code == 409 and "polling-pod-1" in response.text
    row = state_of(db, todo_id)
    assert (row["status"], row["draft_status"], row["feedback"]) == ("SUBMITTED", "COMPLETED",
                                                                     None)


def test_a_revision_of_a_step_its_process_has_not_reached_says_it_waits(storage, client, db):
    """The process looped back: a finished todo's step is TODO again. The revision is kept
    (as the UI's own) and shown WAITING_FOR_STEP, not FB_REQUESTED as if a server would pick
    it up; it runs once the step is IN_PROGRESS."""
    todo_id = storage.enqueue("console", "looped back", agent_mode="DRAFT")
    (c,) = storage.claim(agent_orch="console", consumer="w", limit=1, lease_seconds=60,
                         max_claims=3)
    storage.save_result(c, {"ok": 1})
    db.execute("UPDATE todolist SET status = 'TODO' WHERE id = %s", (todo_id,))
    assert storage.call("request_revision", {"p_todo_id": todo_id, "p_feedback": "again",
                                             "p_user_id": None}) == {
        "applied": True, "reason": "ok", "state": "WAITING_FOR_STEP"}
    db.execute("UPDATE todolist SET draft_status = 'COMPLETED' WHERE id = %s", (todo_id,))
    assert post(client, f"/todos/{todo_id}/revision", feedback="again").status_code == 303
    page = client.get(f"/todos/{todo_id}").text
    assert "WAITING_FOR_STEP" in page and "runs once its process puts the step" in page
    assert storage.claim(agent_orch="console", consumer="w", limit=1, lease_seconds=60,
                         max_claims=3) == []
    db.execute("UPDATE todolist SET status = 'IN_PROGRESS' WHERE id = %s", (todo_id,))
    assert "FB_REQUESTED" in client.get(f"/todos/{todo_id}").text
    (again,) = storage.claim(agent_orch="console", consumer="w", limit=1, lease_seconds=60,
                             max_claims=3)
    assert again.extras["resume"]["kind"] == "revision"


def test_revision_is_refused_while_the_todo_waits(storage, client, db):
    todo_id = storage.enqueue("console", "not yet run")
    response = post(client, f"/todos/{todo_id}/revision", feedback="again")
    assert response.status_code == 409 and "QUEUED" in response.text
    assert state_of(db, todo_id)["draft_status"] is None


def test_posts_without_the_csrf_token_or_from_another_site_are_refused(storage, client, db):
    todo_id = storage.enqueue("console", "keep me")
    token = csrf_of(client)
    assert client.post(f"/todos/{todo_id}/cancel").status_code == 403
    assert client.post(f"/todos/{todo_id}/cancel",
                       data={"csrf_token": "x" * 43}).status_code == 403
    assert client.post(f"/todos/{todo_id}/cancel",
                       data={"csrf_token": "é" * 43}).status_code == 403
    assert client.post(f"/todos/{todo_id}/cancel", data={"csrf_token": token},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post(f"/todos/{todo_id}/cancel", data={"csrf_token": token},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    with client_of_same(client) as stranger:  # a token from another browser's cookie
        assert stranger.post(f"/todos/{todo_id}/cancel",
                             data={"csrf_token": token}).status_code == 403
    assert state_of(db, todo_id)["draft_status"] is None
    origin = str(client.base_url).rstrip("/")
    ok = client.post(f"/todos/{todo_id}/cancel", data={"csrf_token": token},
                     headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 303
    assert state_of(db, todo_id)["draft_status"] == "CANCELLED"


def client_of_same(client: httpx.Client) -> httpx.Client:
    return httpx.Client(base_url=client.base_url, timeout=10)


def test_back_and_forward_restoring_a_page_get_the_whole_page_not_the_fragment(client):
    """htmx asks for the rows when a filter changes, but for the whole page when Back or
    Forward restores one it did not keep: a fragment would replace the page's body."""
    swap = client.get("/todos", headers={"HX-Request": "true"})
    assert "<nav" not in swap.text and 'id="rows"' not in swap.text
    for url in ("/todos", "/servers"):
        restored = client.get(url, headers={"HX-Request": "true",
                                            "HX-History-Restore-Request": "true"})
        assert restored.status_code == 200 and "<nav" in restored.text, url


def test_htmx_posts_get_a_redirect_header(storage, client):
    todo_id = storage.enqueue("console", "htmx")
    response = client.post(f"/todos/{todo_id}/cancel", data={"csrf_token": csrf_of(client)},
                           headers={"HX-Request": "true"})
    assert response.status_code == 204 and response.headers["hx-redirect"] == f"/todos/{todo_id}"


def test_read_only_console_hides_and_refuses_every_action(storage, db):
    def handle(todo):
        return {"style": todo.ask_human("Pick", options=["a", "b"], kind="select")}

    todo_id = storage.enqueue("console", "look only")
    with ConsoleServer(storage, ConsoleConfig(port=0, read_only=True)) as server, \
            client_of(server) as client, ps.start(handle, agent_orch="console", storage=storage):
        wait_for(lambda: state_of(db, todo_id)["draft_status"] == "HUMAN_ASKED")
        job_id = db.execute("SELECT job_id FROM events WHERE event_type = 'human_asked'"
                            ).fetchone()["job_id"]
        for url in ("/todos", f"/todos/{todo_id}", "/questions"):
            page = client.get(url).text
            assert "<form method=\"post\"" not in page and "read-only" in page
        assert "Pick" in client.get(f"/todos/{todo_id}").text
        token = csrf_of(client)
        for url, fields in ((f"/todos/{todo_id}/cancel", {}),
                            (f"/todos/{todo_id}/revision", {"feedback": "x"}),
                            ("/todos", {"agent_orch": "console", "input": "x"}),
                            (f"/questions/{job_id}/answer", {"choice": "0"})):
            assert client.post(url, data={"csrf_token": token, **fields}).status_code == 403
        assert state_of(db, todo_id)["draft_status"] == "HUMAN_ASKED"
        assert db.execute("SELECT count(*) AS n FROM todolist").fetchone()["n"] == 1
        storage.respond(job_id, "a")  # let the executor finish before the server stops
        # its open pages are polled: it writes no watch row for notifications
        read_stream(client, f"/todos/{todo_id}/stream", lambda text: "COMPLETED" in text)
        assert not server.app.state.console.feed.listening
        assert db.execute("SELECT count(*) AS n FROM processgpt_sync_console_watch"
                          ).fetchone()["n"] == 0


class WatchOutage(PostgresStorage):
    """The first renewals of the console's watch meet an outage (not a refusal)."""

    outages = 2

    def call(self, query, params):
        if query == "console_watch" and self.outages:
            self.outages -= 1
            raise ps.StorageUnavailable("database unreachable (console_watch): no route")
        return super().call(query, params)


def test_an_outage_while_a_console_renews_its_watch_is_waited_out_not_taken_for_a_refusal(
        database_url, db, caplog):
    store = WatchOutage(database_url)
    try:
        with ConsoleServer(store, ConsoleConfig(port=0)) as server:
            feed = server.app.state.console.feed
            wait_for(lambda: db.execute("SELECT count(*) AS n FROM "
                                        "processgpt_sync_console_watch").fetchone()["n"] == 1,
                     timeout=15)
            assert feed.listening and store.outages == 0  # notified again, not polled
    finally:
        store.close()
    assert caplog.text.count("no route") == 2 and "refused this console's watch" not in caplog.text


@pytest.mark.parametrize("reader", ["a role that may only read", "a read-only database"])
def test_a_console_the_database_refuses_a_watch_polls_its_pages_instead(storage, db, caplog,
                                                                        database_url, reader):
    """A role that may only read, or a replica, cannot keep notifications on: the console says
    so once and reads its open pages again every second, rather than reconnecting for ever."""
    console_storage = storage
    if reader == "a role that may only read":
        db.execute("""CREATE FUNCTION refuse_watch() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN RAISE EXCEPTION 'permission denied for processgpt_sync_console_watch'
                            USING ERRCODE = '42501'; END $$""")
        db.execute("CREATE TRIGGER refuse_watch BEFORE INSERT OR UPDATE ON "
                   "processgpt_sync_console_watch FOR EACH ROW EXECUTE FUNCTION refuse_watch()")
    else:
        console_storage = PostgresStorage(
            make_conninfo(database_url, options="-c default_transaction_read_only=on"))
    gate = threading.Event()

    def handle(todo):
        gate.wait(10)
        todo.events.progress("after the gate")
        return {"ok": True}

    todo_id = storage.enqueue("console", "watched by a reader")
    with ConsoleServer(console_storage, ConsoleConfig(port=0)) as server, \
            client_of(server) as client, ps.start(handle, agent_orch="console", storage=storage):
        feed = server.app.state.console.feed
        wait_for(lambda: "refused this console's watch" in caplog.text)
        assert not feed.listening

        def until(text: str) -> bool:
            gate.set()
            return "after the gate" in text and "COMPLETED" in text

        read_stream(client, f"/todos/{todo_id}/stream", until)
    if console_storage is not storage:
        console_storage.close()
    assert caplog.text.count("refused this console's watch") == 1
    assert "could not end its watch" not in caplog.text


def test_access_token_is_checked_on_every_request(storage):
    with ConsoleServer(storage, ConsoleConfig(port=0, token=TOKEN)) as server:
        assert server.url.endswith(f"/?token={TOKEN}")
        with client_of(server) as anonymous:
            for url in ("/todos", "/todos/stream", "/static/htmx.min.js", "/servers",
                        "/questions"):
                assert anonymous.get(url).status_code == 401, url
            assert anonymous.get("/todos", params={"token": "wrong" * 5}).status_code == 401
            # any characters are simply not the token (compare_digest refuses non-ASCII text)
            assert anonymous.get("/todos", params={"token": "é" * 20}).status_code == 401
            assert anonymous.get("/todos", headers={
                "Authorization": "Bearer é".encode()}).status_code == 401
            assert anonymous.post("/todos", data={"agent_orch": "x"}).status_code == 401
        with client_of(server) as browser:
            first = browser.get("/todos", params={"token": TOKEN, "state": "QUEUED"})
            assert first.status_code == 303 and first.headers["location"] == "/todos?state=QUEUED"
            assert "HttpOnly" in first.headers["set-cookie"]
            assert browser.get("/todos?state=QUEUED").status_code == 200
            assert browser.get("/static/htmx.min.js").status_code == 200
        with client_of(server, headers={"Authorization": f"Bearer {TOKEN}"}) as script:
            assert script.get("/todos").status_code == 200


def test_another_apps_cookies_on_the_same_host_hide_none_of_the_consoles(storage, db):
    """A browser sends a host's cookies to every port of it: another app's JSON or non-ASCII
    cookie, sent first, must not hide the console's sign-in or CSRF cookie (Python's
    http.cookies stops reading at such a value)."""
    others = 'prefs={"theme":"dark"}; name=Zoë'
    with ConsoleServer(storage, ConsoleConfig(port=0, token=TOKEN)) as server, \
            client_of(server) as browser:
        assert browser.get("/todos", params={"token": TOKEN}).status_code == 303
        port = browser.base_url.port
        sign_in = browser.cookies[f"processgpt_console_token_{port}"]
        browser.get("/todos")
        csrf = browser.cookies[f"{CSRF_COOKIE}_{port}"]
        own = f"processgpt_console_token_{port}={sign_in}; {CSRF_COOKIE}_{port}={csrf}"
        browser.cookies.clear()
        headers = {"Cookie": f"{others}; {own}".encode()}  # as browsers send it: UTF-8
        assert browser.get("/todos", headers=headers).status_code == 200
        enqueued = browser.post("/todos", headers=headers, data={
            "csrf_token": csrf, "agent_orch": "console", "input": "from a busy host"})
        assert enqueued.status_code == 303, enqueued.text
    assert db.execute("SELECT count(*) AS n FROM todolist WHERE query = 'from a busy host'"
                      ).fetchone()["n"] == 1


def test_a_form_naming_a_job_id_two_todos_share_but_not_the_todo_is_refused(
        storage, client, db):
    """An older page's form, or a script, answers a job id two todos share without naming the
    todo: refused, rather than the oldest of the two answered."""
    claims = suspended_on_one_job_id(storage)
    refused = post(client, "/questions/job-shared/answer", answer="for whom?")
    assert refused.status_code == 409
    assert "question job-shared is open in 2 todos" in refused.text
    assert {state_of(db, c.todo_id)["draft_status"] for c in claims} == {"HUMAN_ASKED"}


def test_consoles_on_two_ports_of_one_host_keep_their_own_sign_in(storage):
    """A browser keeps one cookie jar per host, whatever the port."""
    other = TOKEN + "-other"
    with ConsoleServer(storage, ConsoleConfig(port=0, token=TOKEN)) as first, \
            ConsoleServer(storage, ConsoleConfig(port=0, token=other)) as second, \
            client_of(first) as to_first, client_of(second) as to_second:
        assert to_first.get("/todos", params={"token": TOKEN}).status_code == 303
        assert to_second.get("/todos", params={"token": other}).status_code == 303
        jar = httpx.Cookies(to_first.cookies)  # as the browser's one jar for 127.0.0.1
        jar.update(to_second.cookies)
        to_first.cookies, to_second.cookies = jar, jar
        assert to_first.get("/todos").status_code == 200
        assert to_second.get("/todos").status_code == 200
        assert post(to_first, "/todos", agent_orch="two-ports", input="x").status_code == 303


def test_a_non_loopback_host_needs_a_token():
    with pytest.raises(ConfigurationError, match="without an access token"):
        ConsoleConfig(host="0.0.0.0")
    with pytest.raises(ConfigurationError, match="at least 16"):
        ConsoleConfig(host="0.0.0.0", token="short")
    assert ConsoleConfig(host="0.0.0.0", token=TOKEN).token == TOKEN
    assert ConsoleConfig(host="::1").token is None
    with pytest.raises(ConfigurationError, match="letters, digits"):
        ConsoleConfig(host="0.0.0.0", token="a token; with spaces")


def test_a_base64_token_works_from_the_printed_url(storage):
    """``openssl rand -base64`` makes tokens with + / =: the printed URL carries them
    encoded, so opening it signs in (a raw + would arrive as a space)."""
    token = "Ab+cd/efGHijkLMNop0123=="
    with ConsoleServer(storage, ConsoleConfig(port=0, token=token)) as server:
        with httpx.Client(timeout=10, follow_redirects=True) as browser:
            page = browser.get(server.url)
            assert page.status_code == 200 and page.url.path == "/todos"


def test_console_command_refuses_a_non_loopback_host_without_token(capsys):
    from processgpt_sync import cli

    assert cli.main(["console", "--host", "0.0.0.0", "--database-url", "postgresql:///x"]) == 2
    assert "without an access token" in capsys.readouterr().err


@pytest.mark.slow
def test_console_command_serves_until_sigterm(database_url, storage):
    todo_id = storage.enqueue("cli-console", "from the command line")
    proc = subprocess.Popen(
        [sys.executable, "-m", "processgpt_sync", "console", "--port", "0", "--read-only",
         "--agent-orch", "cli-console", "--database-url", database_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PROCESSGPT_CONSOLE_TOKEN": TOKEN})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        # a token from the environment is not printed into the service's log
        assert "read-only" in line and TOKEN not in line, line
        url = line.rsplit(" ", 1)[1].strip()
        with httpx.Client(timeout=10, follow_redirects=True,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as browser:
            assert httpx.get(url, timeout=10).status_code == 401
            page = browser.get(url)
            assert page.status_code == 200 and todo_id[:8] in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_foreign_host_header_is_refused_without_a_token(client):
    assert client.get("/todos", headers={"Host": "evil.example:8710"}).status_code == 403
    assert client.get("/todos", headers={"Host": "localhost:8710"}).status_code == 200
    # any loopback address the console may bind to without a token is accepted
    for host in ("127.0.0.2:8710", "[::1]:8710", "127.0.0.1"):
        assert client.get("/todos", headers={"Host": host}).status_code == 200, host
    assert client.get("/todos", headers={"Host": "127.0.0.1.evil.example"}).status_code == 403


def test_the_console_on_a_busy_or_impossible_address_is_a_clear_error(storage):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for host, bad_port, why in (("127.0.0.1", port, "in use"),
                                    ("127.0.0.1", 70000, "port must be 0-65535"),
                                    ("no-such-host.invalid", 0, "")):
            with pytest.raises(ConfigurationError,
                               match=f"cannot serve the console on {host}:{bad_port}: .*{why}"):
                ConsoleServer(storage, ConsoleConfig(host=host, port=bad_port, token=TOKEN))


def test_servers_page_charts_finished_todos(storage, client):
    def handle(todo):
        if "fail" in todo.input:
            raise RuntimeError("no")
        return {"ok": True}

    for text in ("one", "two", "fail"):
        storage.enqueue("console", text)
    with ps.start(handle, agent_orch="console", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 3)
    page = client.get("/servers").text  # the server left the registry as it stopped
    assert "No server has reported yet" in page
    assert "2 completed, 1 failed" in page
    assert page.count('class="ok"') >= 1 and page.count('class="bad"') == 1
    assert "Enqueue to outcome, mean per 10 s: " in page and "<polyline" in page
    fragment = client.get("/servers", headers={"HX-Request": "true"}).text
    assert "<html" not in fragment and "2 completed" in fragment


def test_servers_page_lists_live_servers_with_counters_and_pickup_latency(storage, client):
    storage.enqueue("console", "picked up")
    with ps.start(lambda todo: {"ok": True}, agent_orch="console", storage=storage,
                  lease_seconds=2) as server:
        wait_for(lambda: server.stats()["completed"] == 1)
        row = wait_for(lambda: next((s for s in storage.servers("console")
                                     if s["completed"] == 1), None))
        page = client.get("/servers").text
    assert row["stats"]["pickup_seconds_p50"] is not None
    assert server.settings.consumer in page and ">yes<" in page
    assert "Pickup latency p50 of the live servers: " in page and " ms now" in page
    assert "claimed=1" in page


def test_idle_console_holds_one_listen_connection(storage, console, db):
    def listeners():
        return db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = "
                          "current_database() AND query LIKE 'LISTEN%%'").fetchone()["n"]

    feed = console.app.state.console.feed
    # LISTEN shows in pg_stat_activity as the feed sets `listening`: wait for both
    assert wait_for(lambda: feed.listening and listeners() == 1)
    time.sleep(0.3)  # and no second connection follows
    assert feed.listening and listeners() == 1


def test_stopping_the_console_ends_open_streams_cleanly(storage):
    todo_id = storage.enqueue("console", "watched while stopping")
    server = ConsoleServer(storage, ConsoleConfig(port=0)).start()
    opened, outcome = threading.Event(), []

    def watch():
        try:
            with client_of(server) as client, \
                    client.stream("GET", f"/todos/{todo_id}/stream") as response:
                for line in response.iter_lines():
                    if line.startswith("event: state"):
                        opened.set()
            outcome.append("ended")
        except httpx.HTTPError as exc:  # cut off instead of finished
            outcome.append(repr(exc))

    reader = threading.Thread(target=watch)
    reader.start()
    assert opened.wait(10)
    server.stop()
    reader.join(30)
    assert outcome == ["ended"]


def test_demo_serves_the_console_and_prints_its_url(database_url):
    from processgpt_sync import demo

    out = io.StringIO()
    assert demo.run(database_url=database_url, todos=2, workers=2, console_port=0, out=out) == 0
    assert "console: http://127.0.0.1:" in out.getvalue()


@pytest.fixture
def supabase_storage(database_url):
    yield from open_backend("supabase", database_url)


def test_supabase_console_polls_and_never_sends_the_key(supabase_storage):
    from tests.postgrest_gateway import SERVICE_KEY

    gate = threading.Event()

    def handle(todo):
        todo.events.progress("before")
        gate.wait(10)
        todo.events.progress("after the gate")
        return {"ok": True}

    def until(text: str) -> bool:
        gate.set()
        return "after the gate" in text and "COMPLETED" in text

    store = supabase_storage
    todo_id = store.enqueue("console", "via supabase")
    with ConsoleServer(store, ConsoleConfig(port=0)) as server, client_of(server) as client, \
            ps.start(handle, agent_orch="console", storage=store):
        assert server.app.state.console.feed.listening is False
        wait_for(lambda: "before" in client.get(f"/todos/{todo_id}").text)
        seen = read_stream(client, f"/todos/{todo_id}/stream", until)
        bodies = [seen] + [client.get(url).text for url in
                           ("/todos", f"/todos/{todo_id}", "/questions", "/servers",
                            "/static/console.js")]
    assert all(SERVICE_KEY not in body for body in bodies)


def changes(listener, wait: float = 0.3) -> list[str]:
    return [note.payload for note in listener.notifies(timeout=wait)]


def test_the_database_notifies_changes_only_while_a_console_watches(storage, database_url):
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN processgpt_sync_event")
        storage.enqueue("feed", "nobody watches")
        assert changes(listener) == [], "no console: claims and finishes send no NOTIFY"
        storage.call("console_watch", {"p_console": "c1", "p_seconds": 60})
        watched = storage.enqueue("feed", "a console watches")
        assert watched in changes(listener)
        assert storage.call("console_unwatch", {"p_console": "c1"}) is True
        storage.enqueue("feed", "the console closed")
        assert changes(listener) == []
        storage.call("console_watch", {"p_console": "dead", "p_seconds": 0})
        time.sleep(0.01)
        storage.enqueue("feed", "the console died")
        assert changes(listener) == [], "a console that stopped renewing its watch expires"


def test_an_open_console_watches_and_stops_watching_when_closed(storage, db):
    def watching() -> int:
        return db.execute("SELECT count(*) AS n FROM processgpt_sync_console_watch "
                          "WHERE expires_at > now()").fetchone()["n"]

    with ConsoleServer(storage, ConsoleConfig(port=0)):
        wait_for(lambda: watching() == 1)
    assert watching() == 0


def reads_through_a_slow_path(database_url, pg_url, page: str, counts, churn) -> int:
    """The reads one stream of ``page`` makes in 4 s, through a network path to the database
    that delays each trip 0.1 s, while ``churn()`` changes what it shows every 50 ms; a read
    is a stream line ``counts(line)`` holds for."""
    from tests.faultproxy import FaultProxy

    proxy = FaultProxy(FaultProxy.socket_of(pg_url))
    slow = PostgresStorage(proxy.url_for(database_url))
    stop = threading.Event()

    def busy():
        while not stop.wait(0.05):
            churn()

    thread = threading.Thread(target=busy)
    reads = 0
    try:
        with ConsoleServer(slow, ConsoleConfig(port=0)) as server, client_of(server) as http:
            http.get(page)
            proxy.delay = 0.1  # each read: two trips through the path, 0.2 s at least
            thread.start()
            with http.stream("GET", f"{page}/stream") as response:
                began = time.monotonic()
                for line in response.iter_lines():
                    reads += counts(line)
                    if time.monotonic() - began > 4.0:
                        break
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        slow.close()
        proxy.close()
    return reads


def test_an_open_todo_page_waits_longer_between_reads_that_cost_the_database_more(
        storage, database_url, pg_url):
    """A todo page reads the todo again on each batch of its events. A read that takes long
    (a large draft; here a slow network path to the database) makes the next wait four times
    as long, so an open page costs a busy database a bounded share."""
    todo_id = storage.enqueue("console", "chatty")
    (claim,) = storage.claim(agent_orch="console", consumer="w", limit=1, lease_seconds=60,
                             max_claims=3)
    sent = [0]

    def chatter():  # a running todo: a batch of events every 50 ms
        sent[0] += 1
        storage.record_events([{"todo_id": todo_id, "token": claim.token,
                                "event_type": "task_working", "data": {"n": sent[0]}}])

    reads = reads_through_a_slow_path(database_url, pg_url, f"/todos/{todo_id}",
                                      lambda line: line.startswith("event: events"), chatter)
    # unpaced, a read every 0.2 s or so: about twenty in 4 s; paced, one every second
    assert 2 <= reads <= 6, reads


def test_an_open_list_waits_longer_between_reads_that_cost_the_database_more(
        storage, database_url, pg_url):
    """The list page reads again on changes. A read that takes long (the counts scan a
    todolist of millions of rows; here a slow network path to the database) makes the next
    wait ten times as long, so an open console costs a busy database a bounded share."""
    reads = reads_through_a_slow_path(  # a busy server: todos change all the time
        database_url, pg_url, "/todos",
        lambda line: line.startswith(("event: rows", ": unchanged")),
        lambda: storage.enqueue("console", "churn"))
    # unpaced, a read every 0.25 s + 0.2 s: about nine in 4 s; paced, one every 2 s
    assert 2 <= reads <= 3, reads
