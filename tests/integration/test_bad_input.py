"""Bad rows and bad executor output end in a recorded state with a clear message."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import processgpt_sync as ps
from tests.conftest import open_backend, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_garbage_rows_and_payloads_each_end_with_a_clear_state(storage, db):
    db.execute("""INSERT INTO todolist (id, agent_orch, status, agent_mode, query, description,
                  feedback, user_id, tool, start_date) VALUES
        (gen_random_uuid(), 'bad', 'IN_PROGRESS', 'COMPLETE', NULL, NULL, '"not a list"', 'x,,y',
         'formHandler:', now()),
        (gen_random_uuid(), 'bad', 'IN_PROGRESS', 'COMPLETE', 'big', NULL, NULL, NULL, NULL,
         now() + interval '1s'),
        (gen_random_uuid(), 'bad', 'IN_PROGRESS', 'COMPLETE', 'surrogate', NULL, NULL, NULL, NULL,
         now() + interval '2s'),
        (gen_random_uuid(), 'bad', 'IN_PROGRESS', NULL, 'no mode: not ours to claim', NULL, NULL,
         NULL, NULL, now() + interval '3s')""")

    def handle(todo):
        if todo.input == "big":
            return {"blob": "x" * 10_000_000}
        if todo.input == "surrogate":
            return {"text": "bytes \udcff lost"}
        return {"input": todo.input, "resume": todo.resume.kind, "agents": todo.agents}

    with ps.start(handle, agent_orch="bad", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 3)
    rows = {r["query"]: r for r in db.execute(
        "SELECT query, draft_status::text, log, output->>'input' AS input, "
        "length(output->>'blob') AS blob, output->>'resume' AS resume FROM todolist")}
    empty = rows[None]
    # garbage feedback is ignored rather than fatal
    assert (empty["draft_status"], empty["input"], empty["resume"]) == ("COMPLETED", "", "fresh")
    assert (rows["big"]["draft_status"], rows["big"]["blob"]) == ("COMPLETED", 10_000_000)
    assert rows["surrogate"]["draft_status"] == "FAILED"
    assert "not valid UTF-8" in rows["surrogate"]["log"]
    assert rows["no mode: not ours to claim"]["draft_status"] is None



class UnreadableError(Exception):
    """A client library's error whose message reads a response body it never got."""

    def __str__(self) -> str:
        raise KeyError("error")


def test_an_error_whose_message_raises_fails_the_todo_once(storage, db, monkeypatch):
    """The todo is recorded FAILED at once, not left to its lease and run again; and if
    recording the outcome itself raises, the todo is still recorded FAILED with why."""
    calls: list[str] = []

    def handle(todo):
        calls.append(todo.input)
        raise UnreadableError

    storage.enqueue("unreadable", "broken message")
    with ps.start(handle, agent_orch="unreadable", storage=storage, lease_seconds=2) as server:
        wait_for(lambda: server.stats()["failed"] == 1)
    row = db.execute("SELECT draft_status::text, log FROM todolist").fetchone()
    assert row["draft_status"] == "FAILED"
    assert "UnreadableError: (its message could not be read: KeyError)" in row["log"]

    def broken_finish(*args, **kwargs):
        raise TypeError("a result the recorder cannot handle")

    monkeypatch.setattr("processgpt_sync.recorder.Recorder.finish", broken_finish)
    todo_id = storage.enqueue("unreadable", "recording fails")
    with ps.start(lambda todo: calls.append(todo.input) or {"ok": True},
                  agent_orch="unreadable", storage=storage, lease_seconds=2) as server:
        wait_for(lambda: server.stats()["failed"] == 1)
        time.sleep(2.5)  # past a lease: the todo is not run again
    row = db.execute("SELECT draft_status::text, log FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert row["draft_status"] == "FAILED"
    assert "its outcome could not be recorded: TypeError" in row["log"]
    assert calls == ["broken message", "recording fails"]

class Unprintable:
    def __str__(self) -> str:
        raise KeyError("repr")


def test_a_runtime_error_whose_message_raises_in_the_chain_fails_the_todo(storage, db):
    """Telling a host failure (a RuntimeError saying no thread could start) from the
    executor's reads each RuntimeError's message: one whose message raises, even only as the
    context of the error raised, is the executor's failure, recorded at once; the todo is not
    left running with its lease renewed and its worker slot taken."""
    def handle(todo):
        unprintable = RuntimeError(Unprintable())
        if todo.input == "cause":
            raise ValueError("while handling it") from unprintable
        try:
            raise unprintable
        except RuntimeError:
            raise ValueError("while handling it")  # noqa: B904 (its context, as code has it)

    for query in ("context", "cause"):
        storage.enqueue("unprintable", query)
    with ps.start(handle, agent_orch="unprintable", storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["failed"] == 2)
        running = server.stats()["running"]
    logs = [r["log"] for r in db.execute("SELECT log FROM todolist")]
    assert logs == ["ValueError: while handling it"] * 2
    assert running == 0


def test_a_draft_whose_events_a_site_trigger_refuses_is_written_alone_and_the_todo_goes_on(
        storage, db, caplog, monkeypatch):
    """A site's trigger refuses one of the events a draft takes along: the draft is written
    alone, the event is dropped with a warning, and the executor goes on to its result. Before,
    the refusal came out of ``events.result`` into the executor, and the todo was recorded
    FAILED as if its own code had failed."""
    refuse_events_marked_so(db)
    # the events wait for the draft, not written before it by the flusher
    monkeypatch.setattr("processgpt_sync.server.EVENT_FLUSH_INTERVAL", 5.0)

    def handle(todo):
        todo.events.emit("task_working", {"refuse": "yes"})
        todo.events.emit("task_working", {"step": 1})
        todo.events.result({"draft": 1}, final=False)
        time.sleep(0.5)  # goes on working; its events are written meanwhile
        return {"done": True}

    todo_id = storage.enqueue("drafts", "q")
    with ps.start(handle, agent_orch="drafts", storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
    row = db.execute("SELECT draft_status::text AS s, log FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert row["s"] == "COMPLETED", row["log"]
    steps = [r["data"] for r in db.execute(
        "SELECT data FROM events WHERE todo_id = %s AND event_type = 'task_working'",
        (todo_id,))]
    assert steps == [{"step": 1}]
    assert "refused with 2 events (site check); writing it alone" in caplog.text


def refuse_events_marked_so(db):
    """A site's trigger on ``events`` that refuses a row whose data says ``refuse``."""
    db.execute("""
        CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.data->>'refuse' = 'yes' THEN RAISE EXCEPTION 'site check'; END IF;
        RETURN NEW; END $$;
        CREATE TRIGGER refuse_event BEFORE INSERT ON events
            FOR EACH ROW EXECUTE FUNCTION refuse_event();""")


@pytest.mark.parametrize("asking", ["suspend_for_human", "ask_human"])
def test_a_question_whose_events_a_site_trigger_refuses_is_asked_alone(
        asking, storage, db, caplog, monkeypatch):
    """A site's trigger refuses one of the events a question takes along: the question is
    written alone and asked, the refused event dropped with a warning. Before, the refusal came
    out of ``ask_human`` into the executor, and the todo was recorded FAILED as if its own code
    had failed."""
    refuse_events_marked_so(db)
    # the events wait for the question, not written before it by the flusher
    monkeypatch.setattr("processgpt_sync.server.EVENT_FLUSH_INTERVAL", 5.0)

    def handle(todo):
        todo.events.emit("task_working", {"refuse": "yes"})
        todo.events.emit("task_working", {"step": 1})
        if asking == "ask_human":
            return {"answer": todo.ask_human("Ship it?", kind="confirm", timeout=0.5,
                                             default="no answer")}
        todo.suspend_for_human("Ship it?", kind="confirm")
        return {"answered": True}

    todo_id = storage.enqueue("asks", "q")
    with ps.start(handle, agent_orch="asks", storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"]
                 + server.stats()["asked"] == 1)
    row = db.execute("SELECT draft_status::text AS s, output, log FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    if asking == "ask_human":
        assert (row["s"], row["output"]) == ("COMPLETED", {"answer": "no answer"}), row["log"]
    else:
        assert row["s"] == "HUMAN_ASKED", row["log"]
    written = [(r["event_type"], r["data"]) for r in db.execute(
        "SELECT event_type::text, data FROM events WHERE todo_id = %s "
        "AND event_type IN ('task_working', 'human_asked') ORDER BY timestamp", (todo_id,))]
    assert [(kind, data.get("question", data)) for kind, data in written] == [
        ("task_working", {"step": 1}), ("human_asked", "Ship it?")]
    assert "question of todo" in caplog.text and "site check" in caplog.text


def test_an_executor_that_swallows_cancellation_cannot_write_after_a_ui_cancel(storage, db):
    todo_id = storage.enqueue("stubborn", "x")
    entered, carry_on = threading.Event(), threading.Event()

    def handle(todo):
        entered.set()
        carry_on.wait(10)  # ignores todo.cancelled
        todo.events.progress("still going")
        return {"late": True}

    with ps.start(handle, agent_orch="stubborn", storage=storage) as server:
        assert entered.wait(10)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["running"] == 1 and db.execute(
            "SELECT draft_status::text AS s FROM todolist").fetchone()["s"] == "CANCELLED")
        carry_on.set()
        wait_for(lambda: server.stats()["cancelled"] == 1)
    row = db.execute("SELECT draft_status::text, output FROM todolist").fetchone()
    assert row == {"draft_status": "CANCELLED", "output": None}
    assert db.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 0


def test_several_processes_start_the_embedded_server_at_once(tmp_path):
    directory = tmp_path / "shared-pgdata"
    code = ("import sys, psycopg; from processgpt_sync import embedded; "
            "url = embedded.start(sys.argv[1]); "
            "n = psycopg.connect(url).execute(\"SELECT count(*) FROM pg_proc WHERE proname = "
            "'processgpt_sync_claim_v1'\").fetchone()[0]; print(url, n)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    try:
        assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
        lines = {out.strip() for out, _ in results}
        assert len(lines) == 1, "one shared server, its schema installed once"
        assert lines.pop().endswith(" 1")
    finally:
        subprocess.run([sys.executable, "-c", "import sys; from processgpt_sync import "
                        "embedded; embedded.stop(sys.argv[1])", str(directory)],
                       cwd=ROOT, timeout=60, check=False)


@pytest.fixture(params=["postgres", "supabase"])
def any_storage(request, database_url):
    yield from open_backend(request.param, database_url)


def test_a_row_nested_deeper_than_python_reads_fails_its_todo_alone(any_storage, db, caplog,
                                                                   deep_json_text):
    """One such todo fails with the column named; those claimed with it run, and the server
    goes on serving."""
    ids = [any_storage.enqueue("deep", text) for text in ("first", "deep", "third")]
    db.execute("UPDATE todolist SET feedback = %s::jsonb WHERE id = %s", (deep_json_text, ids[1]))

    with ps.start(lambda todo: {"echo": todo.input}, agent_orch="deep", storage=any_storage,
                  workers=4) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 3)
        later = any_storage.enqueue("deep", "later")
        wait_for(lambda: server.stats()["completed"] == 3)
    rows = {r["id"]: r for r in db.execute(
        "SELECT id::text, draft_status::text AS state, log, output->>'echo' AS echo, "
        "jsonb_typeof(feedback) AS feedback FROM todolist")}
    assert [rows[str(i)]["echo"] for i in (ids[0], ids[2], later)] == ["first", "third", "later"]
    deep = rows[str(ids[1])]
    assert deep["state"] == "FAILED" and deep["echo"] is None
    assert "todolist.feedback is nested deeper than" in deep["log"]
    assert deep["feedback"] == "array"  # left as it was
    assert "cannot run: todolist.feedback" in caplog.text
    assert "executor failed" not in caplog.text  # none ran
