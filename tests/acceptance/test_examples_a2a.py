"""examples/a2a_executor.py and a2a input_required, tested with processgpt_sync.testing."""

from __future__ import annotations

import pytest

pytest.importorskip("a2a")

from a2a.server.agent_execution import AgentExecutor

from tests.a2a_events import V1, artifact, status


class AsksThenAnswers(AgentExecutor):
    """Ends on input_required; run again with the answer, it returns it as an artifact."""

    async def execute(self, context, event_queue):
        row = context.get_context_data()["row"]
        resume = context.get_context_data()["extras"]["resume"]
        task_id, context_id = str(row["id"]), str(row["id"])
        if resume["kind"] == "human_answer":
            event_queue.enqueue_event(artifact({"chosen": resume["answer"]}, context_id,
                                               task_id))
            return
        event_queue.enqueue_event(status("input_required", {"question": "which way?"},
                                         context_id, task_id, {"job_id": "job-q"}, final=True))

    async def cancel(self, context, event_queue):
        pass


def test_input_required_is_answered_like_the_ui(processgpt_run):
    record = processgpt_run(AsksThenAnswers(), "x", answers={"which way?": "north"})
    assert record.completed and record.result == {"chosen": "north"}
    assert [(q.job_id, q.text, q.answer) for q in record.questions] == [
        ("job-q", "which way?", "north")]
    assert [run.kind for run in record.runs] == ["fresh", "human_answer"]


def test_the_original_sdk_example_upper_cases_its_input(processgpt_run):
    if V1:
        pytest.skip("examples/a2a_executor.py is written for a2a-sdk 0.3, as the original SDK")
    from examples.a2a_executor import MyExecutor

    record = processgpt_run(MyExecutor(), "hello")
    assert record.result == {"input": "hello", "output": "HELLO"}
    assert record.event_types == ["task_started", "task_completed", "crew_completed"]
