"""Serving real agent code end to end: a revision with feedback, a question, a UI cancel."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import processgpt_sync as ps
from tests.conftest import wait_for

FEEDBACK = "make it shorter"


def enqueue(storage, agent_orch: str, text: str = "the quarterly report") -> str:
    return storage.enqueue(agent_orch, text)


def enqueue_revision(db, agent_orch: str, text: str = "the quarterly report") -> str:
    """A todo the reviewer sent back (FB_REQUESTED) with FEEDBACK as its latest feedback."""
    feedback = [{"time": "2026-01-01T00:00:00Z", "content": "first remark", "user_id": "u"},
                {"time": "2026-01-02T00:00:00Z", "content": FEEDBACK, "user_id": "u"}]
    return str(db.execute(
        """INSERT INTO todolist (id, agent_orch, query, status, agent_mode, draft_status,
               output, feedback, start_date)
           VALUES (gen_random_uuid(), %s, %s, 'IN_PROGRESS', 'COMPLETE', 'FB_REQUESTED',
               '{"answer": "a long first version"}', %s, now()) RETURNING id""",
        (agent_orch, text, json.dumps(feedback))).fetchone()["id"])


def settle(server, n: int = 1, timeout: float = 60.0) -> dict[str, Any]:
    wait_for(lambda: sum(server.stats()[k] for k in ("completed", "failed", "asked",
                                                       "cancelled")) >= n, timeout=timeout)
    return server.stats()


def serve(storage, executor, agent_orch: str, *, n: int = 1, workers: int = 1,
          timeout: float = 60.0) -> dict[str, Any]:
    with ps.start(executor, agent_orch=agent_orch, storage=storage, workers=workers) as server:
        return settle(server, n, timeout)


def answer_questions(db, answer: Any, stop: threading.Event) -> threading.Thread:
    """Answer every human_asked event as the UI does (a human_response with its job_id)."""

    def run() -> None:
        answered: set[str] = set()
        while not stop.wait(0.02):
            for row in db.execute("SELECT job_id FROM events WHERE event_type = 'human_asked'"):
                if row["job_id"] not in answered:
                    answered.add(row["job_id"])
                    db.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
                               "(%s, %s, 'human_response', jsonb_build_object('answer', "
                               "%s::jsonb), 'APPROVED')",
                               (str(uuid.uuid4()), row["job_id"], json.dumps(answer)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def serve_answering(storage, db, executor, agent_orch: str, answer: Any) -> dict[str, Any]:
    stop = threading.Event()
    # The answering thread needs its own connection: the test's is used by this thread too.
    import psycopg
    from psycopg.rows import dict_row

    conn = psycopg.connect(db.info.dsn, autocommit=True, row_factory=dict_row)
    thread = answer_questions(conn, answer, stop)
    try:
        return serve(storage, executor, agent_orch)
    finally:
        stop.set()
        thread.join()
        conn.close()


def cancel_once_running(storage, db, executor, agent_orch: str, started: threading.Event,
                        text: str = "wait for the report") -> dict[str, Any]:
    """Serve one todo; once the executor signals ``started``, cancel it as the UI does."""
    todo_id = enqueue(storage, agent_orch, text)
    with ps.start(executor, agent_orch=agent_orch, storage=storage, workers=1) as server:
        assert started.wait(30), "the executor never started"
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
        return settle(server)


def row(db) -> dict[str, Any]:
    return db.execute("SELECT draft_status::text, output, log FROM todolist").fetchone()


def events(db) -> list[tuple[str, Any, str | None, str | None]]:
    return [(e["event_type"], e["data"], e["job_id"], e["crew_type"]) for e in db.execute(
        "SELECT event_type::text, data, job_id, crew_type FROM events ORDER BY timestamp")]


def types(db) -> list[str]:
    return [e[0] for e in events(db)]
