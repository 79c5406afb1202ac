"""CrewAI 1.x crews served unchanged: events through the bridge, feedback, ask_human, cancel."""

from __future__ import annotations

import pytest

pytest.importorskip("crewai")
pytest.importorskip("a2a")

from tests.compat import crew_agents as agents
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

EXECUTORS = {"function": agents.crew_function, "a2a_kickoff_async": agents.CrewActionExecutor(),
             "a2a_to_thread": agents.ThreadKickoffExecutor()}


def crew_events(db):
    return [e for e in events(db) if e[3] == "action"]


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_crew_with_a_tool_writes_task_and_tool_events_then_its_result(storage, db, style):
    enqueue(storage, "crew", "lookup the quarterly report")
    assert serve(storage, EXECUTORS[style], "crew")["completed"] == 1
    result = row(db)
    output = result["output"] if style == "function" else result["output"]["freeform"]
    assert output == {"topic": "lookup the quarterly report", "feedback": "none",
                      "observation": "found tone"}
    bridged = crew_events(db)
    kinds = sorted(e[0] for e in bridged)
    assert kinds == ["task_completed", "task_started", "tool_usage_finished",
                     "tool_usage_started"]
    assert len({e[2] for e in bridged}) == 1, "task and tool events share the CrewAI task id"
    started = next(e for e in bridged if e[0] == "task_started")[1]
    assert (started["role"], started["goal"]) == ("report writer", "write the report")
    tool = next(e for e in bridged if e[0] == "tool_usage_finished")[1]
    # the tool's output under `info`, which the ProcessGPT UI shows for a finished tool
    assert (tool["tool_name"], tool["query"], tool["info"]) == ("lookup", "tone", "found tone")
    assert types(db)[-1] == "crew_completed"


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_revision_gives_the_crew_the_reviewers_feedback(storage, db, style):
    enqueue_revision(db, "crew")
    assert serve(storage, EXECUTORS[style], "crew")["completed"] == 1
    output = row(db)["output"]
    output = output if style == "function" else output["freeform"]
    assert output["feedback"] == FEEDBACK


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_crew_tool_asks_a_human_and_uses_the_answer(storage, db, style):
    enqueue(storage, "crew", "ask about the report")
    assert serve_answering(storage, db, EXECUTORS[style], "crew", "formal")["completed"] == 1
    output = row(db)["output"]
    output = output if style == "function" else output["freeform"]
    assert output["observation"] == "formal"
    asked = [e for e in events(db) if e[0] == "human_asked"]
    assert len(asked) == 1 and asked[0][1]["question"] == "Which tone?"


@pytest.mark.parametrize("style", list(EXECUTORS))
def test_a_ui_cancel_stops_the_crew_and_nothing_more_is_written(storage, db, style):
    agents.STARTED.clear()
    stats = cancel_once_running(storage, db, EXECUTORS[style], "crew", agents.STARTED)
    assert stats["cancelled"] == 1 and stats["completed"] == 0
    result = row(db)
    assert result["draft_status"] == "CANCELLED" and result["output"] is None
    assert "crew_completed" not in types(db)


def test_legacy_kickoff_inside_async_execute_fails_with_the_fix(storage, db):
    enqueue(storage, "crew", "the report")
    assert serve(storage, agents.LegacyKickoffExecutor(), "crew")["failed"] == 1
    log = row(db)["log"]
    assert log.startswith("BlockingCallInAsync: blocking code called inside async def refused")
    assert "Agent execution was invoked synchronously from within a running event loop" in log
    assert "kickoff_async" in log and "anyio.to_thread.run_sync(crew.kickoff)" in log


def test_each_crew_of_a_todo_labels_its_events_with_its_own_crew_type(storage, db):
    """The platform runs planning, report and slide crews within one todo, each labelled."""
    from processgpt_sync.contrib.crewai import crew_label

    def two_crews(todo):
        for label in ("report", "slide"):
            with crew_label(label):
                agents.build_crew(todo.input, "", "lookup").kickoff()
        return {"done": True}

    enqueue(storage, "crew", "lookup the quarterly report")
    assert serve(storage, two_crews, "crew")["completed"] == 1
    labels = [e[3] for e in events(db) if e[0] in ("task_started", "tool_usage_started")]
    assert labels == ["report", "report", "slide", "slide"]
