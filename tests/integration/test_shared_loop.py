"""Async todos on the shared loop hold no worker thread while they await: a few pool threads
start them and record their outcomes. Every way such a todo ends is still recorded: result,
error, UI cancel, timeout, a2a artifact."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

import processgpt_sync as ps
from processgpt_sync import budget
from processgpt_sync.claimer import CLAIM_BATCH
from tests.conftest import wait_for

TODOS = 300


def row(db, todo_id: str) -> Any:
    return db.execute("SELECT draft_status::text AS state, output, log FROM todolist "
                      "WHERE id = %s", (todo_id,)).fetchone()


def test_hundreds_of_awaiting_todos_hold_a_few_threads(storage, db):
    inside = [0]
    peak_threads = [0]
    release = threading.Event()

    async def wait_for_release(todo: ps.Todo) -> dict[str, Any]:
        inside[0] += 1  # only the shared loop's thread runs this
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {"n": todo.input}

    db.execute("SELECT processgpt_sync_enqueue_v1('a', 'q' || g) FROM generate_series(1, %s) g",
               (TODOS,))
    limits: list[int] = []
    claim = storage.claim

    def claim_recorded(**kwargs: Any) -> Any:
        limits.append(kwargs["limit"])
        return claim(**kwargs)

    storage.claim = claim_recorded  # the real claim, its limits noted
    before = threading.active_count()
    server = ps.start(wait_for_release, agent_orch="a", storage=storage, workers=TODOS,
                      loop="shared")
    try:
        wait_for(lambda: inside[0] == TODOS, timeout=30)
        peak_threads[0] = threading.active_count()
        release.set()
        wait_for(lambda: server.stats()["completed"] == TODOS, timeout=30)
    finally:
        release.set()
        server.stop(timeout=5)
    started = peak_threads[0] - before
    assert started <= budget.DEFERRED_THREADS + budget.SERVER_THREADS, (
        f"{started} threads for {TODOS} awaiting todos")
    done = db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = 'COMPLETED'")
    assert done.fetchone()["n"] == TODOS
    # The first todos start without waiting for one call to claim them all.
    assert limits[0] == CLAIM_BATCH < TODOS and max(limits) <= CLAIM_BATCH


def test_a_deferred_todo_that_raises_fails_with_its_error_and_frees_its_slot(storage, db):
    async def handle(todo: ps.Todo) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        if todo.input == "bad":
            raise ValueError("no such customer")
        return {"ok": True}

    bad = storage.enqueue("a", "bad")
    good = storage.enqueue("a", "good")
    with ps.start(handle, agent_orch="a", storage=storage, workers=1, loop="shared"):
        wait_for(lambda: row(db, good)["state"] == "COMPLETED")
    assert row(db, bad)["state"] == "FAILED"
    assert "no such customer" in row(db, bad)["log"]


@pytest.mark.parametrize("loop", ["shared", "thread"])
def test_an_async_executor_raising_system_exit_fails_its_todo_and_the_loop_serves_on(
        storage, db, loop):
    """A tool calling sys.exit (argparse on bad arguments) inside an async executor: asyncio
    lets SystemExit out of the loop, which would end the shared loop under every todo."""
    async def tool() -> None:
        await asyncio.sleep(0.01)
        raise SystemExit(3)

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        if todo.input in ("exit", "interrupt"):
            raise SystemExit(2) if todo.input == "exit" else KeyboardInterrupt()
        if todo.input == "child exit":  # in a task of its own, as a task group runs tools
            await asyncio.gather(asyncio.create_task(tool()))
        return {"ok": True}

    gone = [storage.enqueue("a", name) for name in ("exit", "interrupt", "child exit")]
    with ps.start(handle, agent_orch="a", storage=storage, workers=1, loop=loop) as server:
        wait_for(lambda: server.stats()["failed"] == 3)
        after = storage.enqueue("a", "after")
        wait_for(lambda: row(db, after)["state"] == "COMPLETED")
    logs = [row(db, todo_id)["log"] for todo_id in gone]
    assert ["SystemExit(2)" in logs[0], "KeyboardInterrupt()" in logs[1],
            "SystemExit" in logs[2]] == [True, True, True], logs


def test_a_deferred_todo_cancelled_in_the_ui_ends_cancelled(storage, db):
    started, ended = threading.Event(), threading.Event()

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()
        return {"ok": True}

    todo_id = storage.enqueue("a", "long")
    server = ps.start(handle, agent_orch="a", storage=storage, workers=1, loop="shared")
    try:
        assert started.wait(10)
        db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
        assert ended.wait(10), "the coroutine was cancelled"
        wait_for(lambda: server.stats()["running"] == 0)
        after = storage.enqueue("a", "next")  # the slot is free again
        wait_for(lambda: started.is_set() and row(db, after)["state"] == "STARTED")
    finally:
        server.stop(timeout=2)
    assert row(db, todo_id)["state"] == "CANCELLED"


def test_an_a2a_cancel_hook_runs_as_part_of_its_todo(storage, db):
    """The UI's cancel reaches the executor's ``cancel`` from the heartbeat or the listener
    thread; on the shared loop the hook still runs in its todo's context, so the loop-lag
    watchdog can name the todo if the hook blocks, and ``current_run()`` is that todo."""
    from a2a.server.agent_execution import AgentExecutor

    from processgpt_sync.runs import current_run

    started = threading.Event()
    hooked: list[str | None] = []

    class Hooked(AgentExecutor):  # type: ignore[misc]
        async def execute(self, context: Any, event_queue: Any) -> None:
            started.set()
            await asyncio.sleep(60)

        async def cancel(self, context: Any, event_queue: Any) -> None:
            run = current_run()
            hooked.append(None if run is None else run.todo_id)

    todo_id = storage.enqueue("a", "long")
    server = ps.start(Hooked(), agent_orch="a", storage=storage, workers=1, loop="shared")
    try:
        assert started.wait(10)
        db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: hooked, timeout=10)
    finally:
        server.stop(timeout=2)
    assert hooked == [todo_id]


def test_a_deferred_todo_past_its_timeout_fails_and_the_next_one_runs(storage, db):
    async def handle(todo: ps.Todo) -> dict[str, Any]:
        await asyncio.sleep(60 if todo.input == "slow" else 0.01)
        return {"ok": todo.input}

    slow = storage.enqueue("a", "slow")
    with ps.start(handle, agent_orch="a", storage=storage, workers=1, loop="shared",
                  timeout=0.5) as server:
        wait_for(lambda: row(db, slow)["state"] == "FAILED")
        quick = storage.enqueue("a", "quick")
        wait_for(lambda: row(db, quick)["state"] == "COMPLETED")
        wait_for(lambda: server.stats()["running"] == 0)
    assert "timed out after 0.5 s" in row(db, slow)["log"]


@pytest.mark.parametrize("around", [False, True], ids=["deferred", "around_todo"])
def test_a_todo_queued_behind_a_todo_blocking_the_shared_loop_is_not_timed_out(
        storage, db, around):
    """One todo blocks the shared loop past the timeout (a blocking call in ``async def``); a
    todo claimed meanwhile waits for the loop to take its coroutine. Its clock starts when the
    coroutine does: it runs once the loop is free and completes. Before, its clock ran from
    the claim, and it was recorded FAILED, timed out, though its executor never started; so
    it still did with a context around each todo (Django's), which keeps the todo on its
    worker thread while the loop runs it."""
    started: list[str] = []

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        started.append(todo.input)
        if todo.input == "hog":
            time.sleep(2.5)  # blocks the loop
        return {"ok": todo.input}

    hog = storage.enqueue("a", "hog")
    server = ps.Server(handle, ps.Settings(agent_orch="a", workers=2, loop="shared",
                                           timeout=1.0),
                       storage=storage, around_todo=contextlib.nullcontext if around else None)
    server.start()
    with server:
        wait_for(lambda: "hog" in started)
        queued = storage.enqueue("a", "queued")
        wait_for(lambda: row(db, queued)["state"] in ("FAILED", "COMPLETED"), timeout=15)
        wait_for(lambda: row(db, hog)["state"] in ("FAILED", "COMPLETED"), timeout=15)
    assert row(db, queued)["state"] == "COMPLETED", row(db, queued)["log"]
    assert "timed out after 1 s" in row(db, hog)["log"]


@pytest.mark.parametrize("around", [False, True], ids=["deferred", "around_todo"])
def test_a_todo_ending_as_another_blocks_the_shared_loop_keeps_its_result(storage, db, around):
    """A todo's coroutine returns in time, and in the same turn of the shared loop another
    todo's step blocks the loop past the first one's timeout: the first todo's clock stopped
    as its coroutine ended, so its result is recorded once the loop is free. Before, the
    outcome waited behind the blocking step with the clock running, and the todo was recorded
    FAILED, timed out, its result thrown away."""
    done: list[asyncio.Event] = []

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        if not done:
            done.append(asyncio.Event())
        if todo.input == "quick":
            await asyncio.sleep(0.3)
            done[0].set()  # wakes the hog's step, queued before this todo's outcome
            return {"ok": "quick"}
        await done[0].wait()
        time.sleep(2.5)  # blocks the loop
        return {"ok": "hog"}

    hog = storage.enqueue("a", "hog")
    quick = storage.enqueue("a", "quick")
    server = ps.Server(handle, ps.Settings(agent_orch="a", workers=2, loop="shared",
                                           timeout=1.5),
                       storage=storage, around_todo=contextlib.nullcontext if around else None)
    server.start()
    with server:
        wait_for(lambda: row(db, quick)["state"] in ("FAILED", "COMPLETED"), timeout=15)
        wait_for(lambda: row(db, hog)["state"] in ("FAILED", "COMPLETED"), timeout=15)
    assert row(db, quick)["state"] == "COMPLETED", row(db, quick)["log"]
    assert "timed out after 1.5 s" in row(db, hog)["log"]


@pytest.mark.parametrize("loop", ["thread", "shared"])
@pytest.mark.parametrize("swallows", ["every cancellation", "the first cancellation"])
def test_an_executor_going_on_after_the_uis_cancel_is_named_and_cancelled_once_more(
        storage, db, caplog, monkeypatch, loop, swallows):
    """An async executor catches the cancellation the UI's cancel brings and goes on: a while
    later a warning names the todo (its worker slot stays taken), and it is cancelled once
    more, which ends one that caught only the first. Before, nothing was said, and its slot
    stayed taken for good."""
    monkeypatch.setattr("processgpt_sync.watch.CANCEL_OVERDUE", 0.5)
    monkeypatch.setattr("processgpt_sync.worker.CANCEL_OVERDUE", 0.5)
    caught: list[int] = []
    let_go = threading.Event()

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        while not let_go.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                caught.append(1)
                if swallows == "the first cancellation" and len(caught) > 1:
                    raise
        return {"went": "on"}

    todo_id = storage.enqueue("a", "x")
    with ps.start(handle, agent_orch="a", storage=storage, workers=1, loop=loop) as server:
        wait_for(lambda: row(db, todo_id)["state"] == "STARTED")
        db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: f"todo {todo_id}: its executor has not ended" in caplog.text,
                 timeout=10)
        if swallows == "the first cancellation":
            wait_for(lambda: server.stats()["running"] == 0, timeout=10)
            assert server.stats()["cancelled"] == 1
        else:
            wait_for(lambda: len(caught) >= 2, timeout=10)  # the second cancellation came
            assert server.stats()["running"] == 1
        let_go.set()
        wait_for(lambda: server.stats()["running"] == 0, timeout=10)
    assert len(caught) >= 2
    assert row(db, todo_id)["output"] is None


def test_an_a2a_executor_on_the_shared_loop_records_its_artifact(storage, db):
    pytest.importorskip("a2a")
    from a2a.server.agent_execution import AgentExecutor

    from tests import a2a_events as ev

    class Echo(AgentExecutor):  # type: ignore[misc]
        async def execute(self, context: Any, event_queue: Any) -> None:
            todo_row = context.get_context_data()["row"]
            await asyncio.sleep(0.01)
            event_queue.enqueue_event(ev.artifact({"echo": context.get_user_input()},
                                                  todo_row["id"], todo_row["id"]))

        async def cancel(self, context: Any, event_queue: Any) -> None:
            pass

    ids = [storage.enqueue("a", f"t{i}") for i in range(20)]
    with ps.start(Echo(), agent_orch="a", storage=storage, workers=8, loop="shared"):
        wait_for(lambda: all(row(db, i)["state"] == "COMPLETED" for i in ids))
    assert [row(db, i)["output"] for i in ids] == [{"echo": f"t{i}"} for i in range(20)]


@pytest.mark.parametrize("around_todo", [None, contextlib.nullcontext],
                         ids=["deferred", "around-todo"])
def test_drafts_written_while_the_database_stalls_do_not_stall_the_shared_loop(
        storage, db, database_url, around_todo):
    """A draft (``events.result(final=False)``, a streamed a2a artifact's chunk) from a todo
    on the shared loop is written by a pool thread, the latest one only: here the todo's row is
    locked by another transaction, so its draft writes wait, and another todo on the same loop
    runs and completes meanwhile. The same with a context around each todo (Django's), where
    each todo holds its worker thread from start to end."""
    import psycopg

    locked, unlocked = threading.Event(), threading.Event()

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        if todo.input == "drafts":
            while not locked.is_set():
                await asyncio.sleep(0.01)
            for n in range(50):
                todo.events.result({"draft": n}, final=False)
            while not unlocked.is_set():
                await asyncio.sleep(0.01)
            return {"final": True}
        await asyncio.sleep(0.2)
        return {"quick": True}

    drafts = storage.enqueue("a", "drafts")
    server = ps.Server(handle, ps.Settings(agent_orch="a", workers=4, loop="shared"),
                       storage=storage, around_todo=around_todo)
    with server:
        wait_for(lambda: row(db, drafts)["state"] == "STARTED")
        with psycopg.connect(database_url) as holder:  # a transaction holding the todo's row
            holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (drafts,))
            locked.set()
            quick = storage.enqueue("a", "quick")
            wait_for(lambda: row(db, quick)["state"] == "COMPLETED", timeout=10)
            assert row(db, drafts)["state"] == "STARTED", "its draft is still waiting"
            holder.rollback()
        unlocked.set()
        wait_for(lambda: server.stats()["completed"] == 2)
    assert row(db, drafts)["output"] == {"final": True}


def test_a_draft_that_meets_the_todos_result_costs_no_event(database_url, db):
    """The pool thread's draft can reach the database after the todo's result (here each
    draft's write waits 0.3 s, as on a slow link): the events written before it are not lost,
    and the result stands."""
    import time

    from processgpt_sync.storage.postgres import PostgresStorage

    class SlowDrafts(PostgresStorage):
        def save_result(self, claim, result, *, final=True, events=()):
            if not final:
                time.sleep(0.3)
            return super().save_result(claim, result, final=final, events=events)

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        todo.events.progress({"step": "before the draft"})
        todo.events.result({"partial": 1}, final=False)
        return {"final": True}

    storage = SlowDrafts(database_url, max_connections=6)
    try:
        todo_id = storage.enqueue("a", "q")
        with ps.start(handle, agent_orch="a", storage=storage, workers=2,
                      loop="shared") as server:
            wait_for(lambda: server.stats()["completed"] == 1)
            time.sleep(0.5)  # the late draft has met the result
    finally:
        storage.close()
    assert row(db, todo_id)["output"] == {"final": True}
    assert [(e["event_type"], e["data"]) for e in db.execute(
        "SELECT event_type::text, data FROM events ORDER BY timestamp")] == [
        ("task_working", {"step": "before the draft"}), ("crew_completed", {})]
