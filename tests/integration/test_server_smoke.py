from __future__ import annotations

import processgpt_sync as ps
from tests.conftest import wait_for


def test_function_executor_completes_todos(storage, db):
    ids = [storage.enqueue("smoke", f"q{i}") for i in range(5)]

    def handle(todo):
        todo.events.progress({"step": 1})
        return {"echo": todo.input}

    with ps.start(handle, agent_orch="smoke", storage=storage, workers=2) as server:
        wait_for(lambda: server.stats()["completed"] == 5)
    rows = db.execute("select id::text, output, draft_status, status from todolist").fetchall()
    assert {r["id"] for r in rows} == set(ids)
    assert all(r["draft_status"] == "COMPLETED" and r["status"] == "SUBMITTED" for r in rows)
    assert {r["output"]["echo"] for r in rows} == {f"q{i}" for i in range(5)}
