"""Build a2a events for whichever a2a-sdk line is installed (0.3 pydantic or 1.x protobuf)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from a2a.types import TaskArtifactUpdateEvent, TaskState, TaskStatusUpdateEvent

V1 = hasattr(TaskState, "TASK_STATE_WORKING")


def state(name: str) -> Any:
    return getattr(TaskState, f"TASK_STATE_{name.upper()}") if V1 else TaskState(
        name.replace("_", "-"))


def text_message(text: str, context_id: str, task_id: str) -> Any:
    if V1:
        from a2a.helpers import new_text_message

        return new_text_message(text, context_id=context_id, task_id=task_id)
    from a2a.utils import new_agent_text_message

    return new_agent_text_message(text, context_id, task_id)


def status(name: str, payload: Any, context_id: str, task_id: str,
           metadata: dict[str, Any] | None = None, final: bool = False) -> Any:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    message = text_message(text, context_id, task_id)
    if V1:
        from a2a.types import TaskStatus
        from google.protobuf.struct_pb2 import Struct

        meta = Struct()
        meta.update(metadata or {})
        return TaskStatusUpdateEvent(task_id=task_id, context_id=context_id,
                                     status=TaskStatus(state=state(name), message=message),
                                     metadata=meta)
    return TaskStatusUpdateEvent(status={"state": state(name), "message": message}, final=final,
                                 contextId=context_id, taskId=task_id, metadata=metadata)


def artifact(payload: Any, context_id: str, task_id: str, last_chunk: bool = True) -> Any:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    if V1:
        from a2a.helpers import new_text_artifact

        art = new_text_artifact(name="result", text=text)
        return TaskArtifactUpdateEvent(task_id=task_id, context_id=context_id, artifact=art,
                                       last_chunk=last_chunk)
    from a2a.utils import new_text_artifact

    art = new_text_artifact(name="result", description="result", text=text)
    return TaskArtifactUpdateEvent(artifact=art, lastChunk=last_chunk, contextId=context_id,
                                   taskId=task_id)


def chunk(text: str, artifact_id: str, context_id: str, task_id: str, *, append: bool,
          last: bool) -> Any:
    """One chunk of a streamed text artifact: ``append`` continues the artifact's text."""
    if V1:
        from a2a.types import Artifact, Part

        return TaskArtifactUpdateEvent(
            task_id=task_id, context_id=context_id, append=append, last_chunk=last,
            artifact=Artifact(artifact_id=artifact_id, parts=[Part(text=text)]))
    from a2a.types import Artifact

    return TaskArtifactUpdateEvent(
        artifact=Artifact(artifactId=artifact_id, parts=[text_part(text)]), append=append,
        lastChunk=last, contextId=context_id, taskId=task_id)


def text_part(text: str) -> Any:
    from a2a.types import Part

    if V1:
        return Part(text=text)
    from a2a.types import TextPart

    return Part(root=TextPart(text=text))


def data_part(data: dict[str, Any]) -> Any:
    from a2a.types import Part

    if V1:
        from google.protobuf import json_format, struct_pb2

        return Part(data=json_format.ParseDict(data, struct_pb2.Value()))
    from a2a.types import DataPart

    return Part(root=DataPart(data=data))


def file_part(raw: bytes, name: str, media_type: str) -> Any:
    from a2a.types import Part

    if V1:
        return Part(raw=raw, filename=name, media_type=media_type)
    import base64

    from a2a.types import FilePart, FileWithBytes

    return Part(root=FilePart(file=FileWithBytes(
        bytes=base64.b64encode(raw).decode(), name=name, mime_type=media_type)))


def file_message(raw: bytes, name: str, media_type: str, context_id: str,
                 task_id: str) -> Any:
    """An agent message carrying one file and no text."""
    from a2a.types import Message, Role

    part = file_part(raw, name, media_type)
    if V1:
        return Message(role=Role.ROLE_AGENT, parts=[part], message_id=new_id(),
                       context_id=context_id, task_id=task_id)
    return Message(role=Role.agent, parts=[part], messageId=new_id(), contextId=context_id,
                   taskId=task_id)


def task(name: str, payload: Any, context_id: str, task_id: str) -> Any:
    """A whole Task in state ``name`` with one text artifact holding ``payload``."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    from a2a.types import Artifact, Task, TaskStatus

    if V1:
        return Task(id=task_id, context_id=context_id, status=TaskStatus(state=state(name)),
                    artifacts=[Artifact(artifact_id="result", parts=[text_part(text)])])
    return Task(id=task_id, contextId=context_id, status=TaskStatus(state=state(name)),
                artifacts=[Artifact(artifactId="result", parts=[text_part(text)])])


def task_answered_in_history(name: str, question: str, answer: str, context_id: str,
                             task_id: str) -> Any:
    """A whole Task in state ``name`` with no artifact: the question and the agent's
    ``answer`` are its history, as agents that reply by messages keep it."""
    from a2a.types import Message, Role, Task, TaskStatus

    if V1:
        history = [Message(role=role, parts=[text_part(text)], message_id=new_id(),
                           context_id=context_id, task_id=task_id)
                   for role, text in ((Role.ROLE_USER, question), (Role.ROLE_AGENT, answer))]
        return Task(id=task_id, context_id=context_id, status=TaskStatus(state=state(name)),
                    history=history)
    history = [Message(role=role, parts=[text_part(text)], messageId=new_id(),
                       contextId=context_id, taskId=task_id)
               for role, text in ((Role.user, question), (Role.agent, answer))]
    return Task(id=task_id, contextId=context_id, status=TaskStatus(state=state(name)),
                history=history)


def new_id() -> str:
    return str(uuid.uuid4())
