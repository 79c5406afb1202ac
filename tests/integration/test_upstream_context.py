"""Executors written for process-gpt-agent-sdk 0.11 read the context keys it gave them."""

from __future__ import annotations

import json
import uuid

import pytest

import processgpt_sync as ps
from tests.conftest import wait_for

FEEDBACK = [{"time": "2026-01-01T00:00:00Z", "content": "too long", "user_id": "u1"},
            {"time": "2026-01-02T00:00:00Z", "content": "make it shorter, in Korean",
             "user_id": "u1"}]
UPSTREAM_KEYS = {"activity_name": str, "summarized_feedback": str, "notify_user_emails": str,
                 "form_id": str, "agents": list, "users": list, "form_fields": list,
                 "form_html": (str, type(None)), "tenant_mcp": (dict, type(None)),
                 "sources": list}


def revision(db, agent_orch="a", *, tool="formHandler:f1", feedback=FEEDBACK):
    """A todo the user sent back for rework (FB_REQUESTED with feedback), with its context."""
    agent, human = str(uuid.uuid4()), str(uuid.uuid4())
    db.execute("INSERT INTO tenants (id, mcp) VALUES ('t1', '{\"mcpServers\": {}}')")
    db.execute("""INSERT INTO users (id, tenant_id, username, email, is_agent, tool_priority)
                  VALUES (%s, 't1', 'bot', NULL, true, '["search"]'),
                         (%s, 't1', 'ann', 'ann@example.com', false, NULL)""", (agent, human))
    db.execute("""INSERT INTO form_def (id, tenant_id, fields_json, html, proc_def_id,
                  activity_id) VALUES ('f1', 't1', '[{"key": "summary"}]', '<form/>', 'p', 'a')""")
    db.execute("INSERT INTO proc_inst_source (proc_inst_id, file_name) VALUES ('p1', 'a.pdf')")
    return str(db.execute(
        """INSERT INTO todolist (id, agent_orch, query, status, agent_mode, tenant_id, user_id,
               tool, proc_inst_id, activity_name, draft_status, output, feedback, start_date)
           VALUES (gen_random_uuid(), %s, 'write the report', 'IN_PROGRESS', 'COMPLETE', 't1', %s,
               %s, 'p1', 'Write report', 'FB_REQUESTED', '{"summary": "a long text"}', %s, now())
           RETURNING id""",
        (agent_orch, f"{agent},{human}", tool, json.dumps(feedback))).fetchone()["id"])


def check_upstream_extras(extras):
    for key, kind in UPSTREAM_KEYS.items():
        assert isinstance(extras[key], kind), (key, extras[key])
    assert extras["activity_name"] == "Write report"
    assert extras["summarized_feedback"] == "make it shorter, in Korean"
    assert extras["notify_user_emails"] == "ann@example.com"
    assert extras["notify_emails"] == ["ann@example.com"], "our list form stays as an alias"
    assert extras["form_id"] == "f1" and extras["form_fields"] == [{"key": "summary"}]
    assert extras["form_html"] == "<form/>" and extras["tenant_mcp"] == {"mcpServers": {}}
    assert extras["agents"][0]["tool_priority"] == ["search"]
    assert [u["username"] for u in extras["users"]] == ["ann"]
    assert [s["file_name"] for s in extras["sources"]] == ["a.pdf"]


def serve_one(storage, executor, agent_orch="a", **options):
    with ps.start(executor, agent_orch=agent_orch, storage=storage, workers=1,
                  **options) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
        return server.stats()


def test_plain_function_reads_every_upstream_key_and_the_feedback_on_a_revision(storage, db):
    todo_id = revision(db)
    seen = {}

    def handle(todo):
        check_upstream_extras(todo.extras)
        seen.update(kind=todo.resume.kind, feedback=todo.summarized_feedback)
        return {"summary": f"short ({todo.extras['summarized_feedback']})"}

    assert serve_one(storage, handle)["completed"] == 1
    assert seen == {"kind": "revision", "feedback": "make it shorter, in Korean"}
    row = db.execute("SELECT output FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    assert row["output"] == {"summary": "short (make it shorter, in Korean)"}


def test_a_summarize_feedback_function_replaces_the_latest_feedback(storage, db):
    revision(db)
    calls = []

    def summarize(items, previous):
        calls.append((len(items), previous))
        return " / ".join(item["content"] for item in items)

    def handle(todo):
        return {"feedback": todo.extras["summarized_feedback"]}

    assert serve_one(storage, handle, summarize_feedback=summarize)["completed"] == 1
    assert calls == [(2, {"summary": "a long text"})]
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {
        "feedback": "too long / make it shorter, in Korean"}


def test_a_summarizer_returning_no_text_fails_the_todo_with_the_reason(storage, db):
    revision(db)
    assert serve_one(storage, lambda todo: {}, summarize_feedback=lambda i, p: None)["failed"] == 1
    assert db.execute("SELECT log FROM todolist").fetchone()["log"] == (
        "TypeError: summarize_feedback must return str, got NoneType")


def test_first_run_without_form_gets_the_free_form_field_and_empty_feedback(storage, db):
    storage.enqueue("a", "hello")
    seen = {}

    def handle(todo):
        seen.update({k: todo.extras[k] for k in ("form_id", "summarized_feedback",
                                                 "notify_user_emails", "activity_name")})
        seen["fields"] = [f["key"] for f in todo.extras["form_fields"]]
        return {}

    serve_one(storage, handle)
    assert seen == {"form_id": "freeform", "summarized_feedback": "", "notify_user_emails": "",
                    "activity_name": None, "fields": ["freeform"]}


def test_a2a_executor_reads_every_upstream_key_and_the_feedback_on_a_revision(storage, db):
    pytest.importorskip("a2a")
    from a2a.server.agent_execution import AgentExecutor

    from tests import a2a_events as ev

    todo_id = revision(db, "a2a")
    seen = {}

    class CrewAIActionStyle(AgentExecutor):
        """Reads its context as the platform's crewai-action executor does."""

        async def execute(self, context, event_queue):
            data = context.get_context_data()
            extras = data["extras"]
            check_upstream_extras(extras)
            check_upstream_extras(context.metadata)
            row = data["row"]
            seen.update(feedback=extras["summarized_feedback"], row_id=row["id"],
                        meta_row=context.metadata["row"]["id"])
            note = extras["summarized_feedback"]
            result = {extras["form_id"]: {"summary": "short", "note": note}}
            event_queue.enqueue_event(ev.artifact(result, context.context_id, context.task_id))

        async def cancel(self, context, event_queue):
            pass

    assert serve_one(storage, CrewAIActionStyle(), "a2a")["completed"] == 1
    assert seen == {"feedback": "make it shorter, in Korean", "row_id": todo_id,
                    "meta_row": todo_id}
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {
        "f1": {"summary": "short", "note": "make it shorter, in Korean"}}


def test_a_summarizer_of_an_async_todo_on_the_shared_loop_is_bounded_by_its_timeout(
        storage, db):
    """An async executor on the shared loop, a revision, and a summarize_feedback stuck on a
    model call: the todo's timeout bounds the summariser, as on a worker thread. Before, its
    clock started only once the loop began the coroutine: a summariser that never returned
    kept the lease renewed for ever."""
    import threading

    revision(db)
    release = threading.Event()

    def stuck(items, previous):
        release.wait(30)
        return "late"

    async def handle(todo):
        return {"feedback": todo.summarized_feedback}

    try:
        stats = serve_one(storage, handle, loop="shared", timeout=0.5,
                          summarize_feedback=stuck)
    finally:
        release.set()
    assert stats["failed"] == 1
    assert "timed out after 0.5 s" in db.execute("SELECT log FROM todolist").fetchone()["log"]
