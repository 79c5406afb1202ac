"""a2a-sdk AgentExecutors served unchanged (run under a2a-sdk 0.3.x and 1.x by CI)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("a2a")

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater

import processgpt_sync as ps
from tests import a2a_events as ev
from tests.conftest import wait_for


def ids(context: RequestContext) -> tuple[str, str]:
    row = context.get_context_data()["row"]
    return row.get("root_proc_inst_id") or row.get("proc_inst_id") or row["id"], row["id"]


class SeedStyle(AgentExecutor):
    """The original SDK's README executor: events enqueued WITHOUT await."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        job_id = f"job-{task_id}"
        event_queue.enqueue_event(ev.status("working", "작업 시작", context_id, task_id, {
            "crew_type": "action", "event_type": "task_started", "job_id": job_id}))
        await asyncio.sleep(0.01)
        event_queue.enqueue_event(ev.status("working", "작업 완료", context_id, task_id, {
            "crew_type": "action", "event_type": "task_completed", "job_id": job_id}))
        event_queue.enqueue_event(ev.artifact(
            {"status": "완료", "input": context.get_user_input()}, context_id, task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Awaiting(AgentExecutor):
    """Newer style: awaits enqueue_event; also create_task and gather."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        await event_queue.enqueue_event(ev.status("submitted", {"n": 1}, context_id, task_id,
                                                  {"n": 3}))
        await asyncio.gather(event_queue.enqueue_event(
            ev.status("working", {"n": 2}, context_id, task_id, {"event_type": "notice"})))
        await asyncio.create_task(event_queue.enqueue_event(
            ev.artifact({"answer": 42}, context_id, task_id)))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Updater(AgentExecutor):
    """a2a's own TaskUpdater: working status, a data artifact, complete()."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        updater = TaskUpdater(event_queue, task_id, context_id)
        await updater.update_status(ev.state("working"),
                                    message=ev.text_message("thinking", context_id, task_id),
                                    metadata={"crew_type": "report", "n": 3})
        await updater.add_artifact([ev.text_part(json.dumps({"b": 2}))], name="out")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Raising(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        event_queue.enqueue_event(ev.status("working", "before", context_id, task_id))
        raise RuntimeError("boom")

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class NotAnEvent(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        event_queue.enqueue_event({"type": "event"})

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Blocking(AgentExecutor):
    """Blocks inside async def, as CrewAI's kickoff() does."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        began = time.monotonic()
        time.sleep(0.8)
        self.spans.append((began, time.monotonic()))
        event_queue.enqueue_event(ev.artifact({"slept": True}, context_id, task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Asking(AgentExecutor):
    """Asks a human (input_required) and returns without a final result."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        question = {"question": "which way?", "options": ["fast", "careful"]}
        event_queue.enqueue_event(ev.status("input_required", question, context_id, task_id,
                                            {"job_id": "job-q", "crew_type": "analysis"},
                                            final=True))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Cancellable(AgentExecutor):
    def __init__(self):
        self.entered = threading.Event()
        self.cancel_called = threading.Event()
        self.saw_cancellation = threading.Event()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.saw_cancellation.set()
            raise

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancel_called.set()


class Replying(AgentExecutor):
    """a2a's three ways to end without an artifact: a Message as the whole answer (its
    "immediate response"), complete(message=...), and reject(message=...)."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        how = context.get_user_input()
        if how == "message":
            await event_queue.enqueue_event(
                ev.text_message(json.dumps({"answer": 7}), context_id, task_id))
            return
        updater = TaskUpdater(event_queue, task_id, context_id)
        reply = ev.text_message(f"{how}: not for me" if how == "reject" else "3 files renamed",
                                context_id, task_id)
        await (updater.reject(message=reply) if how == "reject"
               else updater.complete(message=reply))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Streaming(AgentExecutor):
    """An artifact streamed in chunks (append=True), as an LLM's tokens arrive."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        pieces = (["Hel", "lo ", "world"] if context.get_user_input() == "text"
                  else ['{"a":', ' 1, "b"', ': [2]}'])
        for n, piece in enumerate(pieces):
            await event_queue.enqueue_event(ev.chunk(piece, "answer", context_id, task_id,
                                                     append=n > 0, last=n == len(pieces) - 1))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Edges(AgentExecutor):
    """Shapes a2a executors end in, one per input: a question naming its own event_type, a
    question then a completed reply, a stream closed by an empty chunk, a self-cancel."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        how = context.get_user_input()
        updater = TaskUpdater(event_queue, task_id, context_id)
        if how == "named-question":
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "which?"}, context_id, task_id,
                {"event_type": "task_started", "job_id": "job-named"}))
        elif how == "ask-then-reply":
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "which tone?"}, context_id, task_id))
            await updater.complete(message=ev.text_message(json.dumps({"tone": "formal"}),
                                                           context_id, task_id))
        elif how == "empty-close":
            for n, piece in enumerate(["The ", "answer"]):
                await event_queue.enqueue_event(ev.chunk(piece, "a", context_id, task_id,
                                                         append=n > 0, last=False))
            await updater.add_artifact([], artifact_id="a", append=True, last_chunk=True)
            await updater.complete()
        elif how == "file-only":
            await updater.add_artifact([ev.file_part(b"%PDF", "r.pdf", "application/pdf")],
                                       last_chunk=True)
            await updater.complete()
        elif how == "task-snapshot":
            await event_queue.enqueue_event(ev.task("completed", {"answer": 42}, context_id,
                                                    task_id))
        elif how == "task-twice":  # the ended task enqueued again, as some executors do
            for _ in range(2):
                await event_queue.enqueue_event(ev.task("completed", {"answer": 43}, context_id,
                                                        task_id))
        elif how == "ask-then-snapshot":  # the waiting task enqueued after its question
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "which tone?"}, context_id, task_id))
            await event_queue.enqueue_event(ev.task("input_required", "the draft", context_id,
                                                    task_id))
        elif how == "completed-twice":  # its final status sent twice, past TaskUpdater
            await updater.add_artifact([ev.text_part("done")], artifact_id="r", last_chunk=True)
            for _ in range(2):
                await event_queue.enqueue_event(ev.status("completed", "", context_id,
                                                          task_id))
        elif how == "history-answer":
            await event_queue.enqueue_event(ev.task_answered_in_history(
                "completed", "what is six times seven?", "Forty-two.", context_id, task_id))
        elif how == "self-cancel":
            await updater.cancel(message=ev.text_message("the user asked to stop", context_id,
                                                         task_id))
        elif how == "interleaved":  # notes streamed between the answer's chunks
            for text, artifact_id, append, last in (('{"a": ', "answer", False, False),
                                                    ("some notes", "notes", False, False),
                                                    ("1}", "answer", True, True)):
                await event_queue.enqueue_event(ev.chunk(text, artifact_id, context_id,
                                                         task_id, append=append, last=last))
            await updater.complete()
        elif how == "data-stream":  # data chunks closed by an empty one, as for text
            await updater.add_artifact([ev.data_part({"rows": 1})], artifact_id="d",
                                       last_chunk=False)
            await updater.add_artifact([ev.data_part({"rows": 2})], artifact_id="d",
                                       append=True, last_chunk=False)
            await updater.add_artifact([], artifact_id="d", append=True, last_chunk=True)
            await updater.complete()
        elif how == "ask-then-complete-empty":  # nothing to answer with, and no one to ask
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "which tone?"}, context_id, task_id))
            await updater.complete()
        elif how == "file-reply":
            await updater.complete(message=ev.file_message(
                b"%PDF", "report.pdf", "application/pdf", context_id, task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class Parts(AgentExecutor):
    """Results of several parts, numbers in data, and what comes after the task's end."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        how = context.get_user_input()
        updater = TaskUpdater(event_queue, task_id, context_id)
        if how == "text-and-data":
            await updater.add_artifact([ev.text_part("part one"), ev.data_part({"x": 1})],
                                       last_chunk=True)
        elif how == "data-and-caption":
            await updater.add_artifact([ev.data_part({"d": 1}), ev.text_part("caption")],
                                       last_chunk=True)
        elif how == "two-texts":
            await updater.add_artifact([ev.text_part("Paragraph one."),
                                        ev.text_part("Paragraph two.")], last_chunk=True)
        elif how == "integers":
            await updater.add_artifact([ev.data_part({"ids": [1, 2], "rows": 2,
                                                      "share": 0.5})], last_chunk=True)
        elif how == "failed-after-complete":  # a raw status after the end
            await updater.add_artifact([ev.text_part("done")], last_chunk=True)
            await updater.complete()
            await event_queue.enqueue_event(ev.status("failed", "oops", context_id, task_id))
            return
        elif how == "pinger-left-behind":  # its finally enqueues while it is cancelled
            async def ping() -> None:
                try:
                    while True:
                        await asyncio.sleep(0.05)
                finally:
                    await event_queue.enqueue_event(ev.status(
                        "working", "progress reporter stopped", context_id, task_id))

            asyncio.get_running_loop().create_task(ping())
            await asyncio.sleep(0.01)
            await updater.add_artifact([ev.text_part("the report")], last_chunk=True)
            return  # the final artifact is the result; the task stays not ended
        elif how == "failed-silently":
            await updater.failed()
            return
        elif how == "multi-part-stream":  # a chunk of two texts, then one continuing the last
            await updater.add_artifact([ev.text_part("a"), ev.text_part("b")],
                                       artifact_id="m", last_chunk=False)
            await updater.add_artifact([ev.text_part("c")], artifact_id="m", append=True,
                                       last_chunk=True)
        elif how == "data-then-text-stream":  # the data of the first chunk stays
            await updater.add_artifact([ev.data_part({"k": 1})], artifact_id="m",
                                       last_chunk=False)
            await updater.add_artifact([ev.text_part("c")], artifact_id="m", append=True,
                                       last_chunk=True)
        elif how == "report-then-ask":  # the report to approve, then the question
            await updater.add_artifact([ev.text_part("the report")], last_chunk=True)
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "Approve the report?"}, context_id, task_id))
            return
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class AsksAfterARefusedEvent(AgentExecutor):
    """A report to approve, a progress event a site's trigger refuses, then a question (itself
    refused for ``question-refused``)."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        context_id, task_id = ids(context)
        refused_question = context.get_user_input() == "question-refused"
        await TaskUpdater(event_queue, task_id, context_id).add_artifact(
            [ev.text_part("the report")], last_chunk=True)
        await event_queue.enqueue_event(ev.status(
            "working", {"refuse me": True}, context_id, task_id))
        question = {"question": "which tone?", **({"refuse me": True} if refused_question
                                                  else {})}
        await event_queue.enqueue_event(ev.status("input_required", question, context_id,
                                                  task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass

def run(storage, executor, n=1, *, workers=2, inputs=None, loop="thread", tenant_id=None):
    todo_ids = [storage.enqueue("a2a", (inputs or ["hello"])[i % len(inputs or ["hello"])],
                                proc_inst_id=None, tenant_id=tenant_id) for i in range(n)]
    with ps.start(executor, agent_orch="a2a", storage=storage, workers=workers,
                  loop=loop) as server:
        wait_for(lambda: sum(server.stats()[k] for k in ("completed", "failed", "asked")) == n)
    return todo_ids


def events(db):
    return [(e["event_type"], e["data"], e["job_id"], e["crew_type"]) for e in db.execute(
        "SELECT event_type::text, data, job_id, crew_type FROM events ORDER BY timestamp")]


def todo(db):
    return db.execute("SELECT *, id::text AS id FROM todolist").fetchone()


def test_seed_executor_that_does_not_await_runs_unchanged(storage, db):
    (todo_id,) = run(storage, SeedStyle())
    assert events(db) == [
        ("task_started", "작업 시작", f"job-{todo_id}", "action"),
        ("task_completed", "작업 완료", f"job-{todo_id}", "action"),
        ("crew_completed", {}, "CREW_FINISHED", "crew"),
    ]
    row = todo(db)
    assert row["output"] == {"status": "완료", "input": "hello"}
    assert (row["draft_status"], row["status"]) == ("COMPLETED", "SUBMITTED")


def test_awaiting_executor_with_gather_and_create_task(storage, db):
    (todo_id,) = run(storage, Awaiting())
    assert events(db) == [
        ("task_started", {"n": 1}, todo_id, None),
        ("task_working", {"n": 2}, todo_id, None),  # unknown 'notice' mapped from the state
        ("crew_completed", {}, "CREW_FINISHED", "crew"),
    ]
    assert todo(db)["output"] == {"answer": 42}


def test_task_updater_executor(storage, db):
    run(storage, Updater())
    kinds = [e[0] for e in events(db)]
    assert kinds == ["task_working", "task_completed", "crew_completed"]
    assert events(db)[0][1:] == ("thinking", todo(db)["id"], "report")
    assert todo(db)["output"] == {"b": 2}, "the completed task's artifact is the result"


def test_raising_executor_fails_and_keeps_the_event_before(storage, db):
    run(storage, Raising())
    row = todo(db)
    assert row["draft_status"] == "FAILED" and row["log"] == "RuntimeError: boom"
    assert [e[0] for e in events(db)] == ["task_working", "error"]


def test_a_reply_without_an_artifact_is_the_result_and_a_rejection_fails(storage, db):
    run(storage, Replying(), 3, inputs=["message", "complete", "reject"])
    rows = {r["query"]: r for r in db.execute(
        "SELECT query, draft_status::text, output, log FROM todolist")}
    assert (rows["message"]["draft_status"], rows["message"]["output"]) == (
        "COMPLETED", {"answer": 7})
    assert (rows["complete"]["draft_status"], rows["complete"]["output"]) == (
        "COMPLETED", "3 files renamed")
    assert rows["reject"]["draft_status"] == "FAILED"
    assert rows["reject"]["log"] == ("RuntimeError: executor reported rejection of the task: "
                                     "reject: not for me")


def test_a_streamed_artifact_is_the_whole_of_its_chunks(storage, db):
    run(storage, Streaming(), 2, inputs=["text", "json"])
    outputs = {r["query"]: r["output"] for r in db.execute("SELECT query, output FROM todolist")}
    assert outputs == {"text": "Hello world", "json": {"a": 1, "b": [2]}}


def test_a_non_a2a_object_raises_type_error_at_the_call_site(storage, db):
    run(storage, NotAnEvent())
    assert todo(db)["log"] == "TypeError: not an A2A event: dict"


def test_blocking_executors_run_in_parallel_on_their_own_loops(storage, db):
    executor = Blocking()
    run(storage, executor, n=2, workers=2)
    (a_began, a_ended), (b_began, b_ended) = executor.spans
    assert max(a_began, b_began) < min(a_ended, b_ended), "the two sleeps did not overlap"
    assert db.execute("SELECT count(*) AS n FROM todolist WHERE output = '{\"slept\": true}'"
                      ).fetchone()["n"] == 2


def test_input_required_without_result_suspends_for_a_human(storage, db):
    run(storage, Asking())
    row = todo(db)
    assert (row["draft_status"], row["consumer"], row["output"]) == ("HUMAN_ASKED", None, None)
    assert events(db) == [("human_asked", {"question": "which way?",
                                           "options": ["fast", "careful"]}, "job-q", "analysis")]
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


@contextmanager
def cancelled_in_the_ui(storage, db, executor, *, execute_cancelled_within):
    """Run one todo of ``executor``, cancel it as the UI does once execute runs; the hook is
    called, execute is cancelled within the time given, and the todo ends CANCELLED."""
    todo_id = storage.enqueue("a2a", "x")
    with ps.start(executor, agent_orch="a2a", storage=storage, workers=1) as server:
        assert executor.entered.wait(10)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        assert executor.cancel_called.wait(2)
        assert executor.saw_cancellation.wait(execute_cancelled_within)
        wait_for(lambda: server.stats()["cancelled"] == 1)
        yield
    assert todo(db)["draft_status"] == "CANCELLED"


def test_ui_cancel_awaits_executor_cancel_then_cancels_execute(storage, db):
    with cancelled_in_the_ui(storage, db, Cancellable(), execute_cancelled_within=2):
        pass


class StubbornCancel(Cancellable):
    """A cancel hook that swallows its own cancellation for a while (catches CancelledError
    around a sleep): the hook's time limit must still cancel execute."""

    hook_ended = threading.Event()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancel_called.set()
        for _ in range(10):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                continue
        self.hook_ended.set()


def test_a_cancel_hook_that_ignores_its_time_limit_does_not_keep_execute_running(
        storage, db, monkeypatch):
    monkeypatch.setattr("processgpt_sync.a2a.CANCEL_HOOK_TIMEOUT", 0.3)
    executor = StubbornCancel()
    # the hook runs for at least 1 s: execute is cancelled at its 0.3 s limit, not after it
    with cancelled_in_the_ui(storage, db, executor, execute_cancelled_within=0.9):
        assert executor.hook_ended.wait(3)  # left to end on its own, before the loop closes


class FailingCancel(Cancellable):
    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancel_called.set()
        raise RuntimeError("the hook broke")


@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_a_cancel_hook_that_fails_is_logged_naming_its_todo(storage, db, caplog, loop):
    """A failing cancel hook does not keep execute from being cancelled, and its log names
    the todo, in either loop mode."""
    executor = FailingCancel()
    todo_id = storage.enqueue("a2a", "x")
    with ps.start(executor, agent_orch="a2a", storage=storage, workers=1, loop=loop) as server:
        assert executor.entered.wait(10)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        assert executor.saw_cancellation.wait(2)
        wait_for(lambda: server.stats()["cancelled"] == 1)
    (record,) = [r for r in caplog.records if "cancel hook of todo" in r.getMessage()]
    assert (record.getMessage(), record.todo_id) == (
        f"the cancel hook of todo {todo_id} failed", todo_id)


class StubbornCancelThatFails(StubbornCancel):
    """Outlives its time limit, then fails."""

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await super().cancel(context, event_queue)
        raise RuntimeError("the hook broke late")


def test_a_cancel_hook_failing_after_its_time_limit_is_logged(storage, db, monkeypatch, caplog):
    """What a hook raises after its time limit ran out reaches nobody else: it is logged,
    naming the todo."""
    monkeypatch.setattr("processgpt_sync.a2a.CANCEL_HOOK_TIMEOUT", 0.3)
    executor = StubbornCancelThatFails()
    with cancelled_in_the_ui(storage, db, executor, execute_cancelled_within=0.9):
        assert executor.hook_ended.wait(3)
        wait_for(lambda: "the hook broke late" in caplog.text, timeout=5)
    (record,) = [r for r in caplog.records if "failed after its 0.3s" in r.getMessage()]
    assert record.todo_id == todo(db)["id"]


def test_context_offers_row_extras_and_user_input(storage, db):
    seen = {}

    class Inspect(AgentExecutor):
        async def execute(self, context, event_queue):
            data = context.get_context_data()
            seen.update(input=context.get_user_input(), task_id=context.task_id,
                        context_id=context.context_id, resume=data["extras"]["resume"]["kind"],
                        id_type=type(data["row"]["id"]).__name__,
                        call_context=type(context.call_context).__name__,
                        tenant=getattr(context, "tenant", None))  # a2a-sdk 1.x has it
            context_id, task_id = ids(context)
            await event_queue.enqueue_event(ev.artifact("plain text", context_id, task_id))

        async def cancel(self, context, event_queue):
            pass

    db.execute("INSERT INTO tenants (id) VALUES ('acme') ON CONFLICT DO NOTHING")  # platform FK
    (todo_id,) = run(storage, Inspect(), inputs=["  what to do  "], tenant_id="acme")
    assert seen == {"input": "what to do", "task_id": todo_id, "context_id": todo_id,
                    "resume": "fresh", "id_type": "str", "call_context": "ServerCallContext",
                    "tenant": "acme" if ev.V1 else None}
    assert todo(db)["output"] == "plain text"


class ResumesFromItsContext(AgentExecutor):
    """Reads its rerun as process-gpt-agent-sdk 0.11's executors do: the task from
    get_user_input() on every run, the person's answer from context.resume."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, str, int]] = []

    async def execute(self, context, event_queue):
        context_id, task_id = ids(context)
        resume = context.resume
        self.runs.append((resume.kind, context.task_state, resume.key, resume.attempt))
        if resume.kind != "human_answer":
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "Which tone?"}, context_id, task_id, final=True))
            return
        await event_queue.enqueue_event(ev.artifact(
            f"{context.get_user_input()}, in a {resume.answer_raw} tone", context_id, task_id))

    async def cancel(self, context, event_queue):
        pass


def test_a_rerun_after_an_answer_offers_the_resume_where_upstream_executors_read_it(
        storage, db):
    executor = ResumesFromItsContext()
    todo_id = storage.enqueue("a2a", "write the note", proc_inst_id=None)
    with ps.start(executor, agent_orch="a2a", storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["asked"] == 1)
        (question,) = storage.open_questions("a2a")
        storage.respond(question["job_id"], "friendly")
        wait_for(lambda: server.stats()["completed"] == 1)
    assert todo(db)["output"] == "write the note, in a friendly tone"
    assert executor.runs == [("fresh", "STARTED", todo_id, 1),
                             ("human_answer", "STARTED", todo_id, 1)]


class TakesFollowUps(AgentExecutor):
    """Written for a plain a2a server: a request with no task asks which tone; a follow-up
    message continues the task that waits for it."""

    async def execute(self, context, event_queue):
        context_id, task_id = ids(context)
        task = context.current_task
        if task is None:
            await event_queue.enqueue_event(ev.status(
                "input_required", {"question": "Which tone?"}, context_id, task_id, final=True))
            return
        assert task.status.state == ev.state("input_required") and task.id == task_id
        if ev.V1:
            from a2a.helpers import get_message_text
        else:
            from a2a.utils import get_message_text
        original = get_message_text(task.history[0])
        await event_queue.enqueue_event(ev.artifact(
            f"{original}, in a {context.get_user_input()} tone", context_id, task_id))

    async def cancel(self, context, event_queue):
        pass


def test_answers_reach_an_executor_written_for_plain_a2a_as_follow_up_messages(storage, db):
    from processgpt_sync.a2a import answers_as_follow_ups

    with pytest.raises(TypeError, match="takes an a2a AgentExecutor"):
        answers_as_follow_ups(lambda todo: None)
    todo_id = storage.enqueue("a2a", "write the note", proc_inst_id=None)
    with ps.start(answers_as_follow_ups(TakesFollowUps()), agent_orch="a2a",
                  storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["asked"] == 1)
        (question,) = storage.open_questions("a2a")
        storage.respond(question["job_id"], "friendly")
        wait_for(lambda: server.stats()["completed"] == 1)
    row = todo(db)
    assert (row["id"], row["output"]) == (todo_id, "write the note, in a friendly tone")


def test_a_follow_up_run_that_died_is_reclaimed_as_the_same_follow_up(storage, db):
    """The answer is not asked for again: the reclaimed run continues from it."""
    from processgpt_sync.a2a import answers_as_follow_ups

    storage.enqueue("a2a", "write the note", proc_inst_id=None)
    with ps.start(answers_as_follow_ups(TakesFollowUps()), agent_orch="a2a",
                  storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["asked"] == 1)
    (question,) = storage.open_questions("a2a")
    storage.respond(question["job_id"], "friendly")
    (died,) = storage.claim(agent_orch="a2a", consumer="a-server-that-died", limit=1,
                            lease_seconds=60, max_claims=5)
    assert died.extras["resume"]["kind"] == "human_answer"
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    with ps.start(answers_as_follow_ups(TakesFollowUps()), agent_orch="a2a",
                  storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["asked"] == 1)
    assert todo(db)["output"] == "write the note, in a friendly tone"
    assert storage.open_questions("a2a") == []


def test_the_testing_kit_answers_a_plain_a2a_executors_question_as_a_follow_up(
        processgpt_run):
    from processgpt_sync.a2a import answers_as_follow_ups

    record = processgpt_run(answers_as_follow_ups(TakesFollowUps()), "write the note",
                            answers=["friendly"])
    assert record.completed and record.result == "write the note, in a friendly tone"
    assert [run.kind for run in record.runs] == ["fresh", "human_answer"]
    assert [(q.text, q.answer) for q in record.questions] == [("Which tone?", "friendly")]


def test_the_a2a_example_runs_on_a2a_sdk_0_3(storage, db):
    if ev.V1:
        pytest.skip("examples/a2a_executor.py is written for a2a-sdk 0.3, as the original SDK")
    from processgpt_sync.demo import load_example

    (_todo_id,) = run(storage, load_example("a2a_executor").MyExecutor(), inputs=["hi"])
    assert todo(db)["output"] == {"input": "hi", "output": "HI"}
    assert [e[0] for e in events(db)] == ["task_started", "task_completed", "crew_completed"]


def test_how_an_a2a_executor_ends_decides_the_todos_state(storage, db):
    """input_required is a question whatever event_type it names (as the original SDK has it);
    a reply after a question completes the todo (it no longer waits); an empty closing chunk
    keeps the streamed text; a self-reported cancel is said so, not a missing result; a
    file-only artifact is its files, not an empty object; a completed Task carries its
    artifacts, and one with none its agent's last message, and its end is written once
    however often it is enqueued; chunks of two artifacts streamed in turn each continue
    their own; a reply of a file alone is the result; a data stream closed by an empty
    chunk is its last data; a task completed after a question, with nothing to answer, fails
    for want of a result instead of waiting for an answer; a question, or an end, sent
    again (as a status, or in a Task) is written once."""
    run(storage, Edges(), 14, inputs=["named-question", "ask-then-reply", "empty-close",
                                      "self-cancel", "file-only", "task-snapshot",
                                      "interleaved", "file-reply", "data-stream",
                                      "ask-then-complete-empty", "history-answer",
                                      "task-twice", "ask-then-snapshot", "completed-twice"])
    rows = {r["query"]: r for r in db.execute(
        "SELECT query, draft_status::text, output, log FROM todolist")}

    def written_for(query):
        return [r["event_type"] for r in db.execute(
            "SELECT e.event_type::text FROM events e JOIN todolist t ON t.id::text = e.todo_id "
            "WHERE t.query = %s ORDER BY e.timestamp", (query,))]

    assert rows["named-question"]["draft_status"] == "HUMAN_ASKED"
    assert db.execute("SELECT event_type::text FROM events WHERE job_id = 'job-named'"
                      ).fetchone()["event_type"] == "human_asked"
    assert (rows["ask-then-reply"]["draft_status"], rows["ask-then-reply"]["output"]) == (
        "COMPLETED", {"tone": "formal"})
    assert (rows["empty-close"]["draft_status"], rows["empty-close"]["output"]) == (
        "COMPLETED", "The answer")
    assert rows["file-only"]["output"] == {"files": [
        {"name": "r.pdf", "media_type": "application/pdf", "bytes": "JVBERg=="}]}
    assert (rows["task-snapshot"]["draft_status"], rows["task-snapshot"]["output"]) == (
        "COMPLETED", {"answer": 42})
    assert (rows["task-twice"]["output"], written_for("task-twice")) == (
        {"answer": 43}, ["task_completed", "crew_completed"])
    assert (rows["ask-then-snapshot"]["draft_status"],
            written_for("ask-then-snapshot").count("human_asked")) == ("HUMAN_ASKED", 1)
    assert (rows["completed-twice"]["output"], written_for("completed-twice")) == (
        "done", ["task_completed", "crew_completed"])
    assert (rows["history-answer"]["draft_status"], rows["history-answer"]["output"]) == (
        "COMPLETED", "Forty-two.")
    assert (rows["interleaved"]["draft_status"], rows["interleaved"]["output"]) == (
        "COMPLETED", {"a": 1})
    assert (rows["file-reply"]["draft_status"], rows["file-reply"]["output"]) == (
        "COMPLETED", {"files": [{"name": "report.pdf", "media_type": "application/pdf",
                                 "bytes": "JVBERg=="}]})
    assert (rows["data-stream"]["draft_status"], rows["data-stream"]["output"]) == (
        "COMPLETED", {"rows": 2})
    assert rows["ask-then-complete-empty"]["draft_status"] == "FAILED"
    assert "without a result" in rows["ask-then-complete-empty"]["log"]
    assert rows["self-cancel"]["draft_status"] == "FAILED"
    assert rows["self-cancel"]["log"] == ("RuntimeError: executor reported cancellation of the "
                                          "task: the user asked to stop")



def test_a_question_kept_from_refused_events_still_suspends_and_a_refused_one_fails(
        storage, db, monkeypatch):
    """The question of an a2a executor ending on input_required travels with the suspend: when
    the database refuses another of its events, the todo still waits with its question; when
    it refuses the question itself, the todo is FAILED with why rather than waiting for an
    answer to a question nobody can see."""
    from tests.integration.test_outcome_writes import REFUSING_TRIGGERS

    db.execute(REFUSING_TRIGGERS)
    monkeypatch.setattr("processgpt_sync.server.EVENT_FLUSH_INTERVAL", 60.0)
    run(storage, AsksAfterARefusedEvent(), 2, inputs=["event-refused", "question-refused"])
    rows = {r["query"]: r for r in db.execute(
        "SELECT query, id::text, draft_status::text, consumer, draft, log FROM todolist")}
    kept = rows["event-refused"]
    assert (kept["draft_status"], kept["consumer"]) == ("HUMAN_ASKED", None)
    assert kept["draft"] == "the report", "the report to approve stays with its question"
    assert [e["data"] for e in db.execute(
        "SELECT data FROM events WHERE todo_id = %s AND event_type = 'human_asked'",
        (kept["id"],))] == [{"question": "which tone?"}]
    lost = rows["question-refused"]
    assert lost["draft_status"] == "FAILED"
    assert "its suspend with its question could not be stored" in lost["log"]


@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_nothing_of_a_result_is_dropped_and_the_tasks_end_stands(storage, db, caplog, loop):
    """An artifact of several parts keeps them all (texts joined as a2a's get_message_text
    joins them), streamed in chunks too; a last chunk made before a question is the suspended
    todo's draft; a DataPart's integers stay integers on a2a-sdk 1.x (protobuf doubles); a
    status after the task's end, or from a task the executor left running, is dropped with a
    warning instead of turning a completed todo FAILED; a failure without a message says so."""
    inputs = ["text-and-data", "data-and-caption", "two-texts", "integers",
              "failed-after-complete", "pinger-left-behind", "failed-silently",
              "multi-part-stream", "data-then-text-stream", "report-then-ask"]
    run(storage, Parts(), len(inputs), inputs=inputs, loop=loop)
    rows = {r["query"]: r for r in db.execute(
        "SELECT query, draft_status::text, output, output::text AS text, draft, log "
        "FROM todolist")}
    assert rows["multi-part-stream"]["output"] == "a\nbc"
    assert rows["data-then-text-stream"]["output"] == {"text": "c", "data": {"k": 1}}
    asked = rows["report-then-ask"]  # the person sees what they are asked to approve
    assert (asked["draft_status"], asked["draft"]) == ("HUMAN_ASKED", "the report")
    assert rows["text-and-data"]["output"] == {"text": "part one", "data": {"x": 1}}
    assert rows["data-and-caption"]["output"] == {"text": "caption", "data": {"d": 1}}
    assert rows["two-texts"]["output"] == "Paragraph one.\nParagraph two."
    assert rows["integers"]["text"] == '{"ids": [1, 2], "rows": 2, "share": 0.5}'
    after = rows["failed-after-complete"]
    assert (after["draft_status"], after["output"]) == ("COMPLETED", "done"), after["log"]
    assert "a2a status 'failed' after the task ended 'completed'" in caplog.text
    pinger = rows["pinger-left-behind"]
    assert (pinger["draft_status"], pinger["output"]) == ("COMPLETED", "the report"), (
        pinger["log"])
    assert "progress reporter stopped" not in json.dumps(events(db), ensure_ascii=False)
    silent = rows["failed-silently"]
    assert silent["draft_status"] == "FAILED"
    assert silent["log"] == "RuntimeError: executor reported failure, with no message"


def test_a_todo_without_input_still_gives_a_message_a2a_can_make_a_task_of(storage, db):
    """The canonical ``context.current_task or new_task(context.message)``: a2a refuses a
    message whose text part is empty, so an empty input is a data part naming the todo, and
    get_user_input() still answers ""."""
    if ev.V1:
        from a2a.helpers import new_task_from_user_message as new_task
    else:
        from a2a.utils import new_task
    seen = []

    class Canonical(AgentExecutor):
        async def execute(self, context, event_queue):
            task = context.current_task or new_task(context.message)
            seen.append(context.get_user_input())
            updater = TaskUpdater(event_queue, task.id, task.context_id)
            await updater.add_artifact([ev.text_part(f"got {context.get_user_input()!r}")],
                                       last_chunk=True)
            await updater.complete()

        async def cancel(self, context, event_queue):
            pass

    run(storage, Canonical(), 2, inputs=["", "something"])
    assert sorted(seen) == ["", "something"]
    assert sorted(r["output"] for r in db.execute("SELECT output FROM todolist")) == [
        "got ''", "got 'something'"]
