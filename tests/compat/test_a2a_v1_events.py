"""a2a-sdk 1.x events are read field by field; what the bridge makes of them must equal what
``MessageToDict`` of the whole event gives, for every event shape and part kind."""

from __future__ import annotations

from typing import Any

import pytest

a2a_types = pytest.importorskip("a2a.types")
if not hasattr(a2a_types.TaskState, "TASK_STATE_WORKING"):
    pytest.skip("protobuf events are a2a-sdk 1.x", allow_module_level=True)

from a2a.types import (  # noqa: E402
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from google.protobuf.json_format import MessageToDict  # noqa: E402
from google.protobuf.struct_pb2 import Struct, Value  # noqa: E402

from processgpt_sync import a2a  # noqa: E402

NESTED = {"n": 1, "x": 1.5, "list": [1, "a", None, True], "inner": {"deep": [{"k": 2}]},
          "empty": {}, "flag": False}


def struct(data: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(data)
    return out


def data_part(data: Any) -> Part:
    value = Value()
    value.struct_value.update(data) if isinstance(data, dict) else value.list_value.extend(data)
    return Part(data=value)


def message(*parts: Part) -> Message:
    return Message(role=Role.ROLE_AGENT, message_id="m", parts=list(parts))


EVENTS = [
    TaskStatusUpdateEvent(task_id="t", context_id="c", status=TaskStatus(
        state=TaskState.TASK_STATE_WORKING, message=message(Part(text='{"step": 1}'))),
        metadata=struct(NESTED)),
    TaskStatusUpdateEvent(task_id="t", context_id="c", status=TaskStatus(
        state=TaskState.TASK_STATE_INPUT_REQUIRED,
        message=message(Part(text="which one?"), data_part({"choices": [1, 2]})))),
    TaskStatusUpdateEvent(task_id="t", context_id="c", status=TaskStatus(
        state=TaskState.TASK_STATE_COMPLETED)),
    TaskStatusUpdateEvent(task_id="t", context_id="c", status=TaskStatus()),
    TaskStatusUpdateEvent(task_id="t", context_id="c"),
    TaskArtifactUpdateEvent(task_id="t", context_id="c", last_chunk=True, artifact=Artifact(
        artifact_id="a", parts=[Part(text=""), data_part(NESTED), data_part([1, "x"]),
                                Part(url="https://example.invalid/f")])),
    TaskArtifactUpdateEvent(task_id="t", context_id="c", append=True, artifact=Artifact(
        artifact_id="a", parts=[Part(text="chunk")])),
    TaskArtifactUpdateEvent(task_id="t", context_id="c"),
    message(Part(text="hello"), data_part({"a": 1})),
    Task(id="t", context_id="c", status=TaskStatus(state=TaskState.TASK_STATE_FAILED,
                                                   message=message(Part(text="boom"))),
         metadata=struct({"why": "tool"})),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_read_field_by_field_equals_message_to_dict(event, monkeypatch):
    fast = a2a.normalize(event)
    monkeypatch.setattr(a2a, "_proto_fields", lambda e, kind: MessageToDict(
        e, preserving_proto_field_name=True))
    assert fast == a2a.normalize(event)
