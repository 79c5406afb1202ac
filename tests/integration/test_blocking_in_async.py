"""Blocking code that refuses to run inside a running event loop fails the todo with the fix."""

from __future__ import annotations

import asyncio

import pytest

import processgpt_sync as ps
from tests.conftest import wait_for

FIX = ("BlockingCallInAsync: blocking code called inside async def refused to run in the running "
       "event loop (asyncio.run() cannot be called from a running event loop); await its async "
       "form instead (CrewAI: `await crew.kickoff_async(...)`), or run it on a thread: "
       "`await anyio.to_thread.run_sync(crew.kickoff)`; a plain def executor may call it directly")


async def answer() -> dict[str, int]:
    return {"n": 1}


def legacy_sync_api() -> dict[str, int]:
    """A library's blocking entry point that starts its own event loop (as many do)."""
    coroutine = answer()
    try:
        return asyncio.run(coroutine)
    except RuntimeError:
        coroutine.close()
        raise


def serve_one(storage, executor, agent_orch="a", loop="thread"):
    todo_id = storage.enqueue(agent_orch, "x")
    with ps.start(executor, agent_orch=agent_orch, storage=storage, workers=1,
                  loop=loop) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1)
    return todo_id


@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_async_function_calling_blocking_api_fails_with_the_fix(storage, db, loop):
    async def handle(todo):
        return legacy_sync_api()

    serve_one(storage, handle, loop=loop)
    row = db.execute("SELECT draft_status::text, log FROM todolist").fetchone()
    assert row == {"draft_status": "FAILED", "log": FIX}
    errors = db.execute("SELECT data FROM events WHERE event_type = 'error'").fetchall()
    assert len(errors) == 1 and FIX.split(": ", 1)[1] in str(errors[0]["data"])


def test_the_fix_works_running_the_blocking_api_on_a_thread(storage, db):
    import anyio.to_thread

    async def handle(todo):
        return await anyio.to_thread.run_sync(legacy_sync_api)

    serve_one(storage, handle)
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {"n": 1}


@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_a2a_executor_calling_blocking_api_fails_with_the_fix(storage, db, loop):
    pytest.importorskip("a2a")
    from a2a.server.agent_execution import AgentExecutor

    class Legacy(AgentExecutor):
        async def execute(self, context, event_queue):
            legacy_sync_api()

        async def cancel(self, context, event_queue):
            pass

    serve_one(storage, Legacy(), "a2a", loop=loop)
    assert db.execute("SELECT log FROM todolist").fetchone()["log"] == FIX


@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_other_runtime_errors_keep_their_own_message(storage, db, loop):
    async def handle(todo):
        raise RuntimeError("the model is down")

    serve_one(storage, handle, loop=loop)
    assert db.execute("SELECT log FROM todolist").fetchone()["log"] == (
        "RuntimeError: the model is down")
