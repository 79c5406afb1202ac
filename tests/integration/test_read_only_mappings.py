"""todo.row and todo.extras are read-only mappings; returned or sent in an event they are stored
as the JSON objects they hold."""

from __future__ import annotations

from types import MappingProxyType

import processgpt_sync as ps
from processgpt_sync.payload import check_json
from tests.conftest import wait_for


def test_check_json_turns_read_only_mappings_into_plain_dicts():
    value = {"row": MappingProxyType({"id": "1", "nested": MappingProxyType({"a": [1]})})}
    assert check_json(value, what="result") == {"row": {"id": "1", "nested": {"a": [1]}}}
    assert type(check_json(value, what="result")["row"]) is dict


def test_returning_todo_row_and_sending_todo_extras_complete_the_todo(storage, db):
    storage.enqueue("mapping", "x")
    storage.enqueue("mapping", "y")

    def handle(todo):
        todo.events.progress(todo.extras)
        todo.events.result({"extras": todo.extras}, final=False)
        return todo.row if todo.input == "x" else {"extras": todo.extras}

    with ps.start(handle, agent_orch="mapping", storage=storage) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 2)
    rows = db.execute("SELECT id::text, query, draft_status::text, output, log FROM todolist "
                      "ORDER BY query").fetchall()
    assert [r["draft_status"] for r in rows] == ["COMPLETED", "COMPLETED"], rows
    assert rows[0]["output"]["id"] == rows[0]["id"] and rows[0]["output"]["query"] == "x"
    assert rows[1]["output"]["extras"]["resume"]["kind"] == "fresh"
    working = db.execute("SELECT data FROM events WHERE event_type = 'task_working'").fetchall()
    assert len(working) == 2 and all("resume" in w["data"] for w in working)
