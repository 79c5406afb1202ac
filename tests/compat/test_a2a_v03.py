"""An executor written for a2a-sdk 0.3 as process-gpt-agent-sdk users wrote it: a2a.utils
helpers, TaskState.working, un-awaited enqueue_event, input-required to ask a person."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

a2a_types = pytest.importorskip("a2a.types")
if hasattr(a2a_types.TaskState, "TASK_STATE_WORKING"):
    pytest.skip("this executor is written for a2a-sdk 0.3", allow_module_level=True)

from a2a.server.agent_execution import AgentExecutor, RequestContext  # noqa: E402
from a2a.server.events import EventQueue  # noqa: E402
from a2a.types import (  # noqa: E402
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils import new_agent_text_message, new_text_artifact  # noqa: E402

from tests.compat import a2a_flow  # noqa: E402


class ReportExecutor(AgentExecutor):
    def __init__(self):
        self.started = threading.Event()
        self.cancel_called = threading.Event()
        self.saw_cancellation = threading.Event()

    def status(self, context, state, payload, metadata, final=False):
        message = new_agent_text_message(json.dumps(payload), context.context_id,
                                         context.task_id)
        return TaskStatusUpdateEvent(status=TaskStatus(state=state, message=message),
                                     final=final, contextId=context.context_id,
                                     taskId=context.task_id, metadata=metadata)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        extras = context.get_context_data()["extras"]
        text = context.get_user_input()
        job = {"crew_type": "action", "job_id": f"job-{context.task_id}"}
        if text.startswith("ask"):
            if extras["resume"]["kind"] != "human_answer":
                event_queue.enqueue_event(self.status(
                    context, TaskState.input_required, {"question": "Which tone?", "type": "text"},
                    {**job, "event_type": "human_asked", "job_id": "ask-tone"}, final=True))
                return
            result = {"tone": extras["resume"]["answer"]}
        elif text.startswith("wait"):
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.saw_cancellation.set()
                raise
        else:
            event_queue.enqueue_event(self.status(context, TaskState.working, {"step": "write"},
                                                  {**job, "event_type": "task_started"}))
            result = {"report": text.upper(), "feedback": extras["summarized_feedback"]}
            event_queue.enqueue_event(self.status(context, TaskState.working, result,
                                                  {**job, "event_type": "task_completed"}))
        artifact = new_text_artifact(name="result", text=json.dumps({extras["form_id"]: result}))
        event_queue.enqueue_event(TaskArtifactUpdateEvent(
            artifact=artifact, lastChunk=True, contextId=context.context_id,
            taskId=context.task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancel_called.set()


class TestReportExecutor(a2a_flow.A2AScenarios):
    executor_class = ReportExecutor
