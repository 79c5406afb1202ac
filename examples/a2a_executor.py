"""The original SDK's executor, served unchanged (a2a-sdk 0.3: `pip install ".[a2a-v03]"`).

`event_queue.enqueue_event(...)` without await, `get_context_data()["row"]`, JSON text in
messages and a final artifact with lastChunk=True — exactly as the 0.3.13 README wrote them.
An executor written for a2a-sdk 1.x (protobuf types, awaited calls, TaskUpdater) is served the
same way when 1.x is installed; this file itself needs 0.3 (its `a2a.utils` imports fail on 1.x).

    python examples/a2a_executor.py
    processgpt-sync enqueue --agent-orch my-agent --input "hello"
"""

from __future__ import annotations

import asyncio
import json
import logging

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.types import TaskArtifactUpdateEvent, TaskState, TaskStatusUpdateEvent
from a2a.utils import new_agent_text_message, new_text_artifact

from processgpt_sync import serve


class MyExecutor(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        row = context.get_context_data()["row"]
        context_id = row.get("root_proc_inst_id") or row.get("proc_inst_id") or row["id"]
        task_id = row["id"]
        job_id = f"job-{task_id}"
        user_input = context.get_user_input()

        event_queue.enqueue_event(TaskStatusUpdateEvent(
            status={"state": TaskState.working,
                    "message": new_agent_text_message("started", context_id, task_id)},
            final=False, contextId=context_id, taskId=task_id,
            metadata={"crew_type": "action", "event_type": "task_started", "job_id": job_id}))

        await asyncio.sleep(0.1)  # the real work
        result = {"input": user_input, "output": user_input.upper()}

        event_queue.enqueue_event(TaskStatusUpdateEvent(
            status={"state": TaskState.working,
                    "message": new_agent_text_message("finished", context_id, task_id)},
            final=False, contextId=context_id, taskId=task_id,
            metadata={"crew_type": "action", "event_type": "task_completed", "job_id": job_id}))
        event_queue.enqueue_event(TaskArtifactUpdateEvent(
            artifact=new_text_artifact(name="result", description="result",
                                       text=json.dumps(result, ensure_ascii=False)),
            lastChunk=True, contextId=context_id, taskId=task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # other libraries: warnings only
    logging.getLogger("processgpt_sync").setLevel(logging.INFO)  # the server's own lines
    serve(MyExecutor(), agent_orch="my-agent", workers=4)
