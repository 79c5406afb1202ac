"""LangChain chains and LangGraph graphs served unchanged: plain functions (invoke, stream) and
a2a executors (ainvoke); events, a revision's feedback, ask_human and a UI cancel."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langgraph")
pytest.importorskip("a2a")

from tests.compat import lc_agents as agents
from tests.compat.harness import (
    FEEDBACK,
    cancel_once_running,
    enqueue,
    enqueue_revision,
    events,
    row,
    serve,
    serve_answering,
    types,
)

EXECUTORS = {"chain_invoke": agents.chain_function, "graph_stream": agents.graph_function,
             "a2a_chain_ainvoke": agents.ChainExecutor(),
             "a2a_graph_ainvoke": agents.GraphExecutor()}
ANSWER = {"chain_invoke": "a short report", "graph_stream": "a graph report",
          "a2a_chain_ainvoke": "a short report", "a2a_graph_ainvoke": "a graph report"}
EVENTS = {"chain_invoke": ["task_started", "task_completed", "crew_completed"],
          "graph_stream": ["task_working", "task_working", "crew_completed"],
          "a2a_chain_ainvoke": ["task_started", "crew_completed"],
          "a2a_graph_ainvoke": ["task_started", "crew_completed"]}


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_the_model_answer_and_events_are_recorded(storage, db, style):
    enqueue(storage, "lc", "the quarterly report")
    assert serve(storage, EXECUTORS[style], "lc")["completed"] == 1
    output = row(db)["output"]
    assert output["answer"] == ANSWER[style] and output["step"] is None
    assert "Write about the quarterly report. Reviewer feedback: none." in output["prompt"]
    assert types(db) == EVENTS[style]
    assert all(e[3] in ("react", "crew") for e in events(db))


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_revision_puts_the_reviewers_feedback_in_the_prompt(storage, db, style):
    enqueue_revision(db, "lc")
    assert serve(storage, EXECUTORS[style], "lc")["completed"] == 1
    assert f"Reviewer feedback: {FEEDBACK}." in row(db)["output"]["prompt"]


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_step_asks_a_human_and_uses_the_answer(storage, db, style):
    enqueue(storage, "lc", "ask about the report")
    assert serve_answering(storage, db, EXECUTORS[style], "lc", "formal")["completed"] == 1
    assert row(db)["output"]["step"] == "formal"
    assert [e[1]["question"] for e in events(db) if e[0] == "human_asked"] == ["Which tone?"]


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_ui_cancel_stops_it_and_nothing_more_is_written(storage, db, style):
    agents.STARTED.clear()
    stats = cancel_once_running(storage, db, EXECUTORS[style], "lc", agents.STARTED)
    assert stats["cancelled"] == 1 and stats["completed"] == 0
    result = row(db)
    assert result["draft_status"] == "CANCELLED" and result["output"] is None
    assert "crew_completed" not in types(db)
