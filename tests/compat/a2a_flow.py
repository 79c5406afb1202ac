"""The scenarios every a2a executor of the compat suite goes through, whatever its a2a line."""

from __future__ import annotations

import threading

import psycopg
from psycopg.rows import dict_row

import processgpt_sync as ps
from tests.compat.harness import (
    FEEDBACK,
    answer_questions,
    cancel_once_running,
    enqueue,
    enqueue_revision,
    events,
    row,
    serve,
    types,
)
from tests.conftest import wait_for


def check_events_and_result(storage, db, executor):
    enqueue(storage, "a2a-compat", "the quarterly report")
    assert serve(storage, executor, "a2a-compat")["completed"] == 1
    assert row(db)["output"] == {"freeform": {"report": "THE QUARTERLY REPORT",
                                              "feedback": ""}}
    assert [(e[0], e[3]) for e in events(db)] == [
        ("task_started", "action"), ("task_completed", "action"), ("crew_completed", "crew")]
    started, completed = events(db)[:2]
    assert started[2] == completed[2], "start and completion share their job_id"


def check_revision(storage, db, executor):
    enqueue_revision(db, "a2a-compat")
    assert serve(storage, executor, "a2a-compat")["completed"] == 1
    assert row(db)["output"]["freeform"]["feedback"] == FEEDBACK


def check_question_and_answer(storage, db, executor):
    """input_required suspends the todo (HUMAN_ASKED); the UI's answer runs it again."""
    enqueue(storage, "a2a-compat", "ask about the report")
    stop = threading.Event()
    conn = psycopg.connect(db.info.dsn, autocommit=True, row_factory=dict_row)
    answering = answer_questions(conn, "formal", stop)
    try:
        with ps.start(executor, agent_orch="a2a-compat", storage=storage, workers=1) as server:
            wait_for(lambda: server.stats()["completed"] == 1, timeout=30)
            assert server.stats()["asked"] == 1
    finally:
        stop.set()
        answering.join()
        conn.close()
    assert row(db)["output"] == {"freeform": {"tone": "formal"}}
    asked = [e for e in events(db) if e[0] == "human_asked"]
    assert len(asked) == 1 and asked[0][1] == {"question": "Which tone?", "type": "text"}


def check_cancel(storage, db, executor, started: threading.Event):
    stats = cancel_once_running(storage, db, executor, "a2a-compat", started)
    assert stats["cancelled"] == 1 and stats["completed"] == 0
    assert row(db)["draft_status"] == "CANCELLED" and row(db)["output"] is None
    assert "crew_completed" not in types(db)
    assert executor.cancel_called.is_set() and executor.saw_cancellation.is_set()


class A2AScenarios:
    """The scenarios as tests: a test module subclasses this (as ``Test...``) with its a2a
    line's executor class, whose instances set ``started`` once ``execute`` runs."""

    executor_class: type

    def test_events_and_result(self, storage, db):
        check_events_and_result(storage, db, self.executor_class())

    def test_revision_feedback(self, storage, db):
        check_revision(storage, db, self.executor_class())

    def test_question_suspends_and_the_answer_resumes(self, storage, db):
        check_question_and_answer(storage, db, self.executor_class())

    def test_ui_cancel(self, storage, db):
        executor = self.executor_class()
        check_cancel(storage, db, executor, executor.started)
