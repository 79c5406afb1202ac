"""An executor written for a2a-sdk 1.x: a2a.helpers, TASK_STATE_*, TaskUpdater, awaited
enqueue_event, input_required to ask a person."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

a2a_types = pytest.importorskip("a2a.types")
if not hasattr(a2a_types.TaskState, "TASK_STATE_WORKING"):
    pytest.skip("this executor is written for a2a-sdk 1.x", allow_module_level=True)

from a2a.helpers import new_text_artifact, new_text_message  # noqa: E402
from a2a.server.agent_execution import AgentExecutor, RequestContext  # noqa: E402
from a2a.server.events import EventQueue  # noqa: E402
from a2a.server.tasks import TaskUpdater  # noqa: E402
from a2a.types import TaskArtifactUpdateEvent, TaskState  # noqa: E402

from tests.compat import a2a_flow  # noqa: E402


class ReportExecutor(AgentExecutor):
    def __init__(self):
        self.started = threading.Event()
        self.cancel_called = threading.Event()
        self.saw_cancellation = threading.Event()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        extras = context.get_context_data()["extras"]
        text = context.get_user_input()
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        job = {"crew_type": "action", "job_id": f"job-{context.task_id}"}

        def message(payload):
            return new_text_message(json.dumps(payload), context_id=context.context_id,
                                    task_id=context.task_id)

        if text.startswith("ask"):
            if extras["resume"]["kind"] != "human_answer":
                await updater.update_status(
                    TaskState.TASK_STATE_INPUT_REQUIRED,
                    message=message({"question": "Which tone?", "type": "text"}),
                    metadata={**job, "event_type": "human_asked", "job_id": "ask-tone"})
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
            await updater.update_status(TaskState.TASK_STATE_WORKING,
                                        message=message({"step": "write"}),
                                        metadata={**job, "event_type": "task_started"})
            result = {"report": text.upper(), "feedback": extras["summarized_feedback"]}
            await updater.update_status(TaskState.TASK_STATE_WORKING, message=message(result),
                                        metadata={**job, "event_type": "task_completed"})
        artifact = new_text_artifact(name="result", text=json.dumps({extras["form_id"]: result}))
        await event_queue.enqueue_event(TaskArtifactUpdateEvent(
            artifact=artifact, last_chunk=True, context_id=context.context_id,
            task_id=context.task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancel_called.set()


class TestReportExecutor(a2a_flow.A2AScenarios):
    executor_class = ReportExecutor
