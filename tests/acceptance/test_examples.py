"""The examples, tested with processgpt_sync.testing as their authors would test them."""

from __future__ import annotations

from examples.blocking_executor import WordCountExecutor
from examples.hitl import handle as hitl_handle
from examples.quickstart import handle as quickstart_handle


def test_quickstart_answers_in_upper_case(processgpt_run):
    record = processgpt_run(quickstart_handle, "hello world")
    assert record.completed
    assert record.result == {"answer": "HELLO WORLD", "words": 2}
    assert record.event_types == ["task_working", "crew_completed"]


def test_word_count_reports_each_step(processgpt_run):
    record = processgpt_run(WordCountExecutor(step_seconds=0), "the cat saw the dog")
    assert record.result["words"] == 5
    assert record.result["most_common"][0] == ["the", 2]
    assert record.event_types == ["task_started", "tool_usage_started", "tool_usage_finished",
                                  "task_working", "task_completed", "crew_completed"]


def test_word_count_stops_when_the_ui_cancels(processgpt_run):
    def tool_started(events):
        return "tool_usage_started" in [event.type for event in events]

    record = processgpt_run(WordCountExecutor(step_seconds=30), "a long text",
                            cancel_when=tool_started)
    assert record.cancelled and record.result is None
    assert "task_completed" not in record.event_types


def test_hitl_with_a_budget_completes_in_one_run(processgpt_run):
    record = processgpt_run(hitl_handle, "order 12 laptops", answers=["fast", True])
    assert record.result == {"request": "order 12 laptops", "style": "fast", "approved": True}
    assert [q.text for q in record.questions] == [
        "How should I process this?", "Is there budget for order 12 laptops?"]
    assert [run.kind for run in record.runs] == ["fresh"]


def test_hitl_without_budget_waits_for_the_manager(processgpt_run):
    record = processgpt_run(hitl_handle, "order 12 laptops", answers=["careful", False])
    assert record.waiting
    assert record.questions[-1].text == "No budget for 'order 12 laptops': approve anyway?"
    assert not record.questions[-1].answered


def test_hitl_resumes_with_the_managers_approval(processgpt_run):
    record = processgpt_run(hitl_handle, "order 12 laptops", answers=["careful", False, True])
    assert record.completed
    assert record.result == {"request": "order 12 laptops", "style": "careful", "approved": True}
    assert [run.kind for run in record.runs] == ["fresh", "human_answer"]
    assert len(record.questions) == 3  # the resumed run reuses the first two answers
