"""Asking a person from blocking code: wait, time out, suspend and resume, reuse answers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest

import processgpt_sync as ps
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import open_backend, wait_for


@pytest.fixture(params=["postgres", "supabase"])
def storage(request, database_url):
    yield from open_backend(request.param, database_url)


def question_of(db, todo_id=None):
    """The open question's job_id, as the UI sees it."""
    sql = "SELECT job_id, data, status::text FROM events WHERE event_type = 'human_asked'"
    params: tuple = ()
    if todo_id:
        sql += " AND todo_id = %s"
        params = (todo_id,)
    row = db.execute(sql + " ORDER BY timestamp DESC LIMIT 1", params).fetchone()
    return row


def draft_status(db, todo_id):
    return db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                      (todo_id,)).fetchone()["s"]


def answer_as_the_ui(db, job_id, answer):
    db.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
               "(%s, %s, 'human_response', jsonb_build_object('answer', %s::jsonb), 'APPROVED')",
               (str(uuid.uuid4()), job_id, json.dumps(answer)))


def human_todo(storage, db, text="q"):
    human = str(uuid.uuid4())
    db.execute("INSERT INTO tenants (id) VALUES ('t1') ON CONFLICT DO NOTHING")
    db.execute("INSERT INTO users (id, tenant_id, username, email, is_agent) "
               "VALUES (%s, 't1', 'ann', 'ann@example.com', false)", (human,))
    return storage.enqueue("hitl", text, tenant_id="t1", user_id=human), human


def test_answer_arrives_and_the_executor_continues_with_it(storage, db):
    todo_id, human = human_todo(storage, db)
    seen_waiting, seen_running = [], []

    def handle(todo):
        todo.events.progress("before asking")
        choice = todo.ask_human("Which way?", options=["fast", "careful"], kind="select")
        seen_running.append(draft_status(db, todo.id))  # row 5: asking -> running
        return {"choice": choice}

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        question = wait_for(lambda: question_of(db))
        seen_waiting.append(db.execute("SELECT draft_status::text AS s FROM todolist"
                                       ).fetchone()["s"])
        time.sleep(0.1)
        answered_at = time.monotonic()
        answer_as_the_ui(db, question["job_id"], "careful")
        wait_for(lambda: server.stats()["completed"] == 1)
        latency = time.monotonic() - answered_at
    row = db.execute("SELECT output, draft_status::text FROM todolist").fetchone()
    assert row == {"output": {"choice": "careful"}, "draft_status": "COMPLETED"}
    assert seen_waiting == ["HUMAN_ASKED"] and seen_running == ["STARTED"]
    assert question["job_id"].startswith("human_asked_") and question["status"] == "ASKED"
    data = question["data"]
    assert (data["question"], data["type"], data["options"]) == (
        "Which way?", "select", ["fast", "careful"])
    written = [(r["event_type"], r["tenant_id"]) for r in db.execute(
        "SELECT event_type::text, tenant_id FROM events ORDER BY timestamp")]
    # Every event the library writes carries the todo's tenant (the UI's answer has none here).
    assert written == [("task_working", "t1"), ("human_asked", "t1"), ("human_response", None),
                       ("crew_completed", "t1")]
    # The question's notification (on a platform database, after the work-item notification
    # its own trigger writes when the todo is enqueued IN_PROGRESS).
    note = db.execute("SELECT user_id, url, description FROM notifications "
                      "ORDER BY time_stamp DESC LIMIT 1").fetchone()
    assert note == {"user_id": human, "url": f"/todolist/{todo_id}", "description": "Which way?"}
    assert latency < (1.0 if storage.backend == "postgres" else 2.5)


def test_events_sent_with_a_question_the_database_refused_are_written_later(storage, db):
    """The question's write fails (here a site rule refuses it): the progress events taken to
    go with it are not lost; they are written with the todo's outcome."""
    db.execute("""
        CREATE FUNCTION refuse_questions() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'questions are refused by a site rule'; END $$;
        CREATE TRIGGER refuse_questions BEFORE INSERT ON events FOR EACH ROW
        WHEN (NEW.event_type = 'human_asked') EXECUTE FUNCTION refuse_questions();
    """)
    storage.enqueue("hitl", "q")
    refusals = []

    def handle(todo):
        todo.events.progress("before asking")
        try:
            todo.ask_human("Proceed?", kind="confirm")
        except ps.StorageError as exc:
            refusals.append(str(exc))
        return {"asked": False}

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] == 1)
    assert len(refusals) == 1 and "site rule" in refusals[0]
    written = [(r["event_type"], r["data"]) for r in db.execute(
        "SELECT event_type::text, data FROM events ORDER BY timestamp")]
    assert written == [("task_working", {"message": "before asking"}), ("crew_completed", {})]


def test_timeout_raises_or_returns_the_default(storage, db):
    storage.enqueue("hitl", "raise")
    storage.enqueue("hitl", "default")

    after_timeout = {}

    def handle(todo):
        try:
            if todo.input == "default":
                return {"got": todo.ask_human("Proceed?", kind="confirm", timeout=0.3,
                                              default="no answer")}
            return {"got": todo.ask_human("Proceed?", kind="confirm", timeout=0.3)}
        finally:  # row 6: asking -> running, whichever way the wait ended
            after_timeout[todo.input] = draft_status(db, todo.id)

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 2)
    assert after_timeout == {"raise": "STARTED", "default": "STARTED"}
    rows = {r["query"]: r for r in db.execute(
        "SELECT query, output, draft_status::text, log FROM todolist")}
    assert rows["default"]["output"] == {"got": "no answer"}
    assert rows["raise"]["draft_status"] == "FAILED"
    assert rows["raise"]["log"] == "HumanTimeout: no answer within 0.3 s to: Proceed?"


class AnsweredAsTimeRunsOut(PostgresStorage):
    """The person's answer lands just after the last check found none, before the todo
    resumes for its timeout: written here, as the UI would, right before resuming."""

    answer_with: Any = None

    def resume_asking(self, claim):
        self.answer_with()
        return super().resume_asking(claim)


def test_an_answer_that_lands_as_the_wait_times_out_is_the_answer(database_url, db):
    storage = AnsweredAsTimeRunsOut(database_url)
    storage.answer_with = lambda: answer_as_the_ui(db, question_of(db)["job_id"], "careful")
    todo_id = storage.enqueue("hitl", "x")

    def handle(todo):
        return {"way": todo.ask_human("Which way?", options=["fast", "careful"], kind="select",
                                      timeout=0.3, default="no answer")}

    try:
        with ps.start(handle, agent_orch="hitl", storage=storage) as server:
            wait_for(lambda: server.stats()["completed"] == 1)
    finally:
        storage.close()
    row = db.execute("SELECT output FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    assert row["output"] == {"way": "careful"}


def test_two_tool_calls_waiting_on_the_same_question_are_both_woken_by_its_answer(
        database_url, db, monkeypatch):
    """Two tool calls of one todo ask the same question at once, on threads of their own:
    the second waits on the open one, and the answer's NOTIFY wakes both (before, the second
    took the first's place, which then waited for its next poll)."""
    monkeypatch.setattr("processgpt_sync.human.POLL_MAX", 30.0)  # only a wake-up ends a wait
    storage = PostgresStorage(database_url)
    storage.enqueue("hitl", "x")
    got: list[object] = []
    asking = threading.Barrier(2)

    def handle(todo):
        def tool() -> None:
            asking.wait(5)
            got.append(todo.ask_human("Which way?", options=["fast", "careful"],
                                      kind="select", timeout=60))

        calls = [threading.Thread(target=tool) for _ in range(2)]
        for call in calls:
            call.start()
        for call in calls:
            call.join(20)
        return {"ways": got}

    try:
        with ps.start(handle, agent_orch="hitl", storage=storage) as server:
            wait_for(lambda: question_of(db))
            time.sleep(0.3)  # the second call finds the open question and waits on it
            answer_as_the_ui(db, question_of(db)["job_id"], "careful")
            wait_for(lambda: server.stats()["completed"] == 1, timeout=5)
    finally:
        storage.close()
    assert got == ["careful", "careful"]
    assert db.execute("SELECT count(*) AS n FROM events WHERE event_type = 'human_asked'"
                      ).fetchone()["n"] == 1


def test_suspend_survives_a_restart_and_resumes_with_the_answer(storage, db):
    todo_id = storage.enqueue("hitl", "needs approval")
    runs = []
    upstream = []  # extras["resume"] as executors ported from process-gpt-agent-sdk 0.11 read it

    def handle(todo):
        runs.append((todo.resume.kind, todo.resume.answer))
        upstream.append({k: todo.extras["resume"][k] for k in ("key", "answer_raw")})
        if todo.resume.kind != "human_answer":
            todo.suspend_for_human("Approve the purchase?", kind="confirm")
        return {"approved": todo.resume.answer}

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["asked"] == 1)
    row = db.execute("SELECT draft_status::text, consumer FROM todolist").fetchone()
    assert row == {"draft_status": "HUMAN_ASKED", "consumer": None}
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0
    question = question_of(db, todo_id)
    answer_as_the_ui(db, question["job_id"], "yes")  # while no server runs
    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] == 1)
    assert runs == [("fresh", None), ("human_answer", "yes")]
    assert upstream == [{"key": todo_id, "answer_raw": ""}, {"key": todo_id, "answer_raw": "yes"}]
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {"approved": "yes"}


def answer_by_button(db, job_id, button):
    """The rows the UI's Confirm and Cancel buttons write: the typed text (none here) or a
    default answer, and the status."""
    answer, status = {"confirm": ("confirmed", "APPROVED"), "cancel": ("rejected", "REJECTED")}[
        button]
    db.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
               "(%s, %s, 'human_response', jsonb_build_object('answer', %s::text), %s)",
               (str(uuid.uuid4()), job_id, answer, status))


@pytest.mark.parametrize("button", ["confirm", "cancel"])
def test_a_confirm_question_declined_in_the_ui_answers_false(storage, db, button):
    """The UI's Cancel answers a confirm question with the text "rejected" (true as text) and
    status REJECTED: the executor gets False, waiting or suspended; Confirm gets True."""
    blocking, suspended = storage.enqueue("hitl", "wait"), storage.enqueue("hitl", "suspend")

    def handle(todo):
        if todo.input == "wait":
            return {"approved": todo.ask_human("Budget approved?", kind="confirm")}
        return {"approved": todo.suspend_for_human("Approve anyway?", kind="confirm")}

    with ps.start(handle, agent_orch="hitl", storage=storage, workers=2) as server:
        for todo_id in (blocking, suspended):
            answer_by_button(db, wait_for(lambda t=todo_id: question_of(db, t))["job_id"],
                             button)
        wait_for(lambda: server.stats()["completed"] == 2)
    outputs = [db.execute("SELECT output FROM todolist WHERE id = %s", (t,)).fetchone()["output"]
               for t in (blocking, suspended)]
    assert outputs == [{"approved": button == "confirm"}] * 2


def test_answering_false_declines_as_the_uis_cancel_does(storage, db):
    todo_id = storage.enqueue("hitl", "q")

    def handle(todo):
        return {"approved": todo.suspend_for_human("Approve?", kind="confirm")}

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["asked"] == 1)
        storage.respond(question_of(db, todo_id)["job_id"], False)
        wait_for(lambda: server.stats()["completed"] == 1)
    assert db.execute("SELECT status::text FROM events WHERE event_type = 'human_response'"
                      ).fetchone()["status"] == "REJECTED"
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {"approved": False}


def test_two_todos_waiting_at_once_get_their_own_answers(storage, db):
    first = storage.enqueue("hitl", "one")
    second = storage.enqueue("hitl", "two")

    def handle(todo):
        return {"answer": todo.ask_human(f"Name for {todo.input}?")}

    with ps.start(handle, agent_orch="hitl", storage=storage, workers=2) as server:
        q1 = wait_for(lambda: question_of(db, first))
        q2 = wait_for(lambda: question_of(db, second))
        answer_as_the_ui(db, q2["job_id"], "answer two")
        answer_as_the_ui(db, q1["job_id"], "answer one")
        wait_for(lambda: server.stats()["completed"] == 2)
    outputs = {r["query"]: r["output"] for r in db.execute("SELECT query, output FROM todolist")}
    assert outputs == {"one": {"answer": "answer one"}, "two": {"answer": "answer two"}}


def test_a_tool_without_the_todo_asks_through_contextvars_and_repeats_reuse_answers(
        storage, db):
    def crewai_tool(query):  # sees no todo object, like a CrewAI tool on the worker thread
        return ps.ask_human(f"Confirm {query}?", kind="confirm")

    def handle(todo):
        first = crewai_tool("the order")
        again = crewai_tool("the order")  # agents re-ask: the earlier answer comes back
        return {"first": first, "again": again}

    storage.enqueue("hitl", "x")
    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        question = wait_for(lambda: question_of(db))
        answer_as_the_ui(db, question["job_id"], True)
        wait_for(lambda: server.stats()["completed"] == 1)
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {
        "first": True, "again": True}
    assert db.execute("SELECT count(*) AS n FROM events WHERE event_type = 'human_asked'"
                      ).fetchone()["n"] == 1


def test_ask_human_outside_a_todo_is_a_clear_error():
    with pytest.raises(ps.ProcessGPTSyncError, match="outside a running todo"):
        ps.ask_human("anyone?")


def test_bad_questions_fail_at_the_call_site(storage, db):
    asked = {"no options": {}, "a number": {"options": 5}, "a text": {"options": "ab"}}
    for name in asked:
        storage.enqueue("hitl", name)

    def handle(todo):
        todo.ask_human("Pick one", kind="select", **asked[todo.input])

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["failed"] == 3)
    logs = {r["query"]: r["log"] for r in db.execute("SELECT query, log FROM todolist")}
    assert logs == {"no options": "ValueError: kind='select' needs options",
                    "a number": "ValueError: options must be a list, not int 5",
                    "a text": "ValueError: options must be a list, not str 'ab'"}


def test_a_cancel_while_waiting_stops_the_wait(storage, db):
    todo_id = storage.enqueue("hitl", "x")
    ended = threading.Event()

    def handle(todo):
        try:
            todo.ask_human("Still there?")
        finally:
            ended.set()

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: question_of(db))
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        assert ended.wait(5)
        wait_for(lambda: server.stats()["cancelled"] == 1)
    assert db.execute("SELECT draft_status::text AS s FROM todolist").fetchone()["s"] == (
        "CANCELLED")


def test_a_row_deleted_while_its_todo_waits_for_an_answer_stops_the_wait_saying_so(
        storage, db, caplog):
    """The todo's row is deleted (with its tenant, say) while its executor waits for an
    answer: the look for the answer finds it gone, the wait ends, and the todo counts as lost
    with the log saying its row was deleted, not that another worker took it."""
    todo_id = storage.enqueue("hitl", "x")
    raised: list[BaseException] = []

    def handle(todo):
        try:
            todo.ask_human("Still there?")
        except ps.ProcessGPTSyncError as exc:
            raised.append(exc)
            raise

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: question_of(db))
        db.execute("DELETE FROM todolist WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["lost"] == 1, timeout=10)
        stats = server.stats()
    assert (stats["failed"], stats["cancelled"]) == (0, 0) and len(raised) == 1
    assert f"todo {todo_id}: its row was deleted" in caplog.text
    assert "lease lost to another worker" not in caplog.text


def test_only_the_question_a_todo_waits_on_is_open_and_answerable(storage, db):
    """A blocking question that timed out, then another asked: answering the first would
    resume nothing (only the latest question is taken), so it is neither listed nor accepted
    while the todo waits on the other; once the todo waits on none, an answer is kept (as
    for a cancelled todo's question: the same question asked again takes it)."""
    from processgpt_sync.human import question_data

    todo_id = storage.enqueue("hitl", "x")
    (claim,) = storage.claim(agent_orch="hitl", consumer="w", limit=1, lease_seconds=60,
                             max_claims=3)
    storage.ask(claim, "job-first", question_data("first?", None, "text"))
    storage.resume_asking(claim)  # its wait timed out; the todo ran on
    storage.ask(claim, "job-second", question_data("second?", None, "text"))
    storage.finish([{"todo_id": claim.todo_id, "token": claim.token, "outcome": "asked"}])
    assert [q["job_id"] for q in storage.open_questions("hitl")] == ["job-second"]
    with pytest.raises(ps.StorageError, match=r"question job-first is no longer awaited: todo "
                       r".* waits on question job-second"):
        storage.respond("job-first", "late")
    assert storage.respond("job-second", "now") == todo_id
    assert draft_status(db, todo_id) == "FB_REQUESTED"
    assert storage.open_questions("hitl") == []
    assert storage.respond("job-first", "late") == todo_id


class AnswerChecksFail(PostgresStorage):
    """Every check for an answer meets an outage while ``failing`` is set (a failover, or the
    todo's row held by the engine past the statement timeout); the rest of the database
    answers, so the UI's cancel and the heartbeat still reach the server."""

    failing = threading.Event()
    checks = 0

    def answer(self, claim, job_id):
        if self.failing.is_set():
            self.checks += 1
            raise ps.StorageUnavailable("the answer check met an outage")
        return super().answer(claim, job_id)


@pytest.fixture
def failing_answers(database_url, monkeypatch):
    monkeypatch.setattr("processgpt_sync.human.backoff", lambda attempt, after=None: 0.02)
    store = AnswerChecksFail(database_url, max_connections=12)
    store.failing = threading.Event()
    yield store
    store.close()


def test_a_cancel_while_an_answer_check_meets_an_outage_is_a_cancel_not_a_host_failure(
        failing_answers, db, caplog):
    """The UI cancels while the wait for an answer retries through an outage: the todo is
    CANCELLED, as the UI said; before, the outage reached the executor and the todo was
    taken for broken by the host (given back, claiming paused)."""
    storage = failing_answers
    todo_id = storage.enqueue("hitl", "x")
    raised: list[BaseException] = []

    def handle(todo):
        try:
            todo.ask_human("Still there?")
        except BaseException as exc:
            raised.append(exc)
            raise

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: question_of(db))
        storage.failing.set()
        wait_for(lambda: storage.checks >= 2)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["cancelled"] == 1)
        assert server.stats()["released"] == 0
    assert len(raised) == 1 and not isinstance(raised[0], ps.StorageUnavailable)
    assert "(cancelled) while answer waited for the database" in str(raised[0])
    assert "could not run here" not in caplog.text
    assert draft_status(db, todo_id) == "CANCELLED"


def test_an_outage_longer_than_a_few_tries_does_not_end_the_wait_for_an_answer(
        failing_answers, db):
    """A failover outlasts the few tries other calls get: the wait for the person goes on
    (its own timeout still applies) and takes the answer once the database is back."""
    from processgpt_sync.human import CALL_TRIES

    storage = failing_answers
    storage.enqueue("hitl", "x")
    got: list[object] = []

    def handle(todo):
        got.append(todo.ask_human("Which way?", options=["fast", "careful"], kind="select",
                                  timeout=60))
        return {"way": got[-1]}

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: question_of(db))
        storage.failing.set()
        wait_for(lambda: storage.checks >= 3 * CALL_TRIES)
        answer_as_the_ui(db, question_of(db)["job_id"], "careful")
        storage.failing.clear()
        wait_for(lambda: server.stats()["completed"] == 1)
    assert got == ["careful"]
    assert server.stats()["released"] == 0


@pytest.mark.parametrize(("timeout", "error", "said"), [
    (None, TypeError, "must be a number of seconds (math.inf for no limit), not NoneType"),
    (float("nan"), ValueError, "must be more than 0 seconds, not nan"),
    (-1, ValueError, "must be more than 0 seconds, not -1"),
])
def test_a_timeout_no_wait_could_honour_fails_before_the_question_is_written(
        storage, db, timeout, error, said):
    todo_id = storage.enqueue("hitl", "x")

    def handle(todo):
        todo.ask_human("Still there?", timeout=timeout)

    with ps.start(handle, agent_orch="hitl", storage=storage) as server:
        wait_for(lambda: server.stats()["failed"] == 1)
    assert question_of(db, todo_id) is None, "no question left open"
    log = db.execute("SELECT log FROM todolist WHERE id = %s", (todo_id,)).fetchone()["log"]
    assert log == f"{error.__name__}: ask_human timeout {said}"
