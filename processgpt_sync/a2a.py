"""Run a2a-sdk ``AgentExecutor``s (0.3 pydantic or 1.x protobuf) unchanged on worker threads.

- Each worker thread keeps its own event loop (``loops.ThreadLoops``): an executor that blocks
  inside ``async def`` stalls only its own todo; or all run on one shared loop
  (``loops.SharedLoop``).
- The event queue is a subclass of the installed ``EventQueue`` whose ``enqueue_event`` records
  the event synchronously and returns an already-finished coroutine, so both the original SDK's
  un-awaited calls and ``await queue.enqueue_event(...)`` (and ``TaskUpdater``) work.
- Events are normalised into one shape whatever the a2a-sdk line, then mapped onto the
  ProcessGPT rules: status → ``events`` row, final artifact → result, input_required → question.
"""

from __future__ import annotations

import asyncio
import base64
import collections.abc
import json
import logging
import threading
import uuid
import weakref
from collections.abc import Generator, Mapping
from functools import cache
from typing import Any

from .events import EVENT_STATUSES
from .loops import Done, Finished, Loops, LoopTask, result_of
from .models import AwaitingHuman, Resume, feedback_text, last_feedback
from .payload import unwrap_text
from .todo import Todo

logger = logging.getLogger(__name__)

STATE_EVENT_TYPES = {
    "submitted": "task_started",
    "working": "task_working",
    "input_required": "human_asked",
    "auth_required": "human_asked",
    "completed": "task_completed",
    "failed": "error",
    "canceled": "task_cancelled",
    "rejected": "error",
}
CANCEL_HOOK_TIMEOUT = 5.0  # seconds executor.cancel() may take before execute is cancelled
TERMINAL_STATES = frozenset({"completed", "canceled", "failed", "rejected"})


class DoneCoroutine(collections.abc.Coroutine[Any, Any, None]):
    """An already-finished coroutine: awaiting it, scheduling it or dropping it is harmless."""

    __slots__ = ()

    def send(self, value: Any) -> Any:
        raise StopIteration(None)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        raise typ if val is None else val

    def close(self) -> None:
        pass

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


@cache
def is_v1() -> bool:
    """True when the installed a2a-sdk is the 1.x (protobuf) line; asked once, as a protobuf
    enum's attribute lookup costs more than a todo's own bookkeeping."""
    from a2a.types import TaskState

    return hasattr(TaskState, "TASK_STATE_WORKING")


# -- normalising events ---------------------------------------------------------------------------


def normalize(event: Any) -> dict[str, Any]:
    """One shape for 0.3 and 1.x events: kind, state, texts, data, metadata, final, last_chunk.

    :raises TypeError: ``event`` is not an a2a event.
    """
    kind = {
        "TaskStatusUpdateEvent": "status",
        "TaskArtifactUpdateEvent": "artifact",
        "Task": "task",
        "Message": "message",
    }.get(type(event).__name__)
    if kind is None or not (hasattr(event, "DESCRIPTOR") or hasattr(event, "model_dump")):
        raise TypeError(f"not an A2A event: {type(event).__name__}")
    if hasattr(event, "DESCRIPTOR"):
        raw = _proto_fields(event, kind)
    else:
        raw = event.model_dump(mode="json", by_alias=False, exclude_none=True)
    status = raw.get("status") or {}
    state = _state(status.get("state"))
    if kind == "artifact":
        parts = (raw.get("artifact") or {}).get("parts") or []
    elif kind == "message":
        parts = raw.get("parts") or []
    else:
        parts = (status.get("message") or {}).get("parts") or []
    final = raw.get("final")
    replies = [m for m in raw.get("history") or [] if str(m.get("role")).lower() == "agent"]
    return {
        "kind": kind,
        "state": state,
        **_contents(parts),
        "artifacts": [{**_contents(a.get("parts") or []), "artifact_id": a.get("artifact_id")}
                      for a in raw.get("artifacts") or []],
        "metadata": _narrow(raw.get("metadata") or {}),
        "final": state in TERMINAL_STATES if final is None else bool(final),
        "last_chunk": bool(raw.get("last_chunk")),
        "append": bool(raw.get("append")),
        "artifact_id": (raw.get("artifact") or {}).get("artifact_id"),
        "history_reply": _contents(replies[-1].get("parts") or []) if replies else None,
    }


def _contents(parts: list[Any]) -> dict[str, list[Any]]:
    """The text, data and file parts of a message or artifact."""
    parts = [p for p in parts if isinstance(p, Mapping)]
    return {"texts": [p["text"] for p in parts if "text" in p],
            "data": [p["data"] for p in parts if "data" in p],
            "files": [_file(p) for p in parts if "file" in p or "raw" in p or "url" in p]}


def _file(part: Mapping[str, Any]) -> dict[str, Any]:
    """A file part (0.3: ``file`` with name, mime_type, bytes or uri; 1.x: filename,
    media_type, raw or url) as a result holds it: name, media type, URL or base64 bytes."""
    nested = part.get("file")
    file: Mapping[str, Any] = nested if isinstance(nested, Mapping) else {}
    found = {"name": file.get("name") or part.get("filename"),
             "media_type": file.get("mime_type") or part.get("media_type"),
             "url": file.get("uri") or part.get("url"),
             "bytes": file.get("bytes") or part.get("raw")}
    return {key: value for key, value in found.items() if value}


def _proto_fields(event: Any, kind: str) -> dict[str, Any]:
    """What ``normalize`` reads of a protobuf (1.x) event, in ``MessageToDict``'s shape: read
    field by field, as ``MessageToDict`` walks every field in Python (a fifth of the bridge's
    CPU at a thousand todos). Fields at their default are left out, as it leaves them out."""
    fields = event.DESCRIPTOR.fields_by_name
    raw: dict[str, Any] = {}
    if "status" in fields and event.HasField("status"):
        status = event.status
        names = status.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number
        raw["status"] = {
            "state": (None if not status.state  # unspecified: the default, left out
                      else names[status.state].name if status.state in names
                      else status.state),
            "message": ({"parts": _proto_parts(status.message.parts)}
                        if status.HasField("message") else None),
        }
    if kind == "artifact" and event.HasField("artifact"):
        raw["artifact"] = {"parts": _proto_parts(event.artifact.parts)}
        if event.artifact.artifact_id:
            raw["artifact"]["artifact_id"] = event.artifact.artifact_id
    elif kind == "task":
        raw["artifacts"] = [{"parts": _proto_parts(a.parts), "artifact_id": a.artifact_id}
                            for a in event.artifacts]
        agents = [m for m in event.history if m.role == 2]  # ROLE_AGENT
        raw["history"] = [{"role": "agent", "parts": _proto_parts(agents[-1].parts)}] if agents \
            else []
    elif kind == "message":
        raw["parts"] = _proto_parts(event.parts)
    if "metadata" in fields and event.HasField("metadata"):
        raw["metadata"] = {k: _proto_value(v) for k, v in event.metadata.fields.items()}
    for flag in ("final", "last_chunk", "append"):
        if flag in fields and getattr(event, flag):
            raw[flag] = True
    return raw


def _proto_parts(parts: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        content = part.WhichOneof("content")
        if content == "text":
            out.append({"text": part.text})
        elif content == "data":
            out.append({"data": _proto_value(part.data)})
        elif content in ("raw", "url"):  # a file, as MessageToDict gives it
            file = {"raw": base64.b64encode(part.raw).decode("ascii")} if content == "raw" \
                else {"url": part.url}
            for field in ("filename", "media_type"):
                if getattr(part, field):
                    file[field] = getattr(part, field)
            out.append(file)
        else:
            out.append({})
    return out


def _proto_value(value: Any) -> Any:
    """A ``google.protobuf.Value`` as JSON data. Its numbers are doubles: integral ones are
    given back as ints, so a DataPart's ``{"rows": 2}`` is stored as on a2a-sdk 0.3."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _proto_value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_proto_value(v) for v in value.list_value.values]
    if kind == "number_value":
        return _narrow(value.number_value)
    if kind in ("string_value", "bool_value"):
        return getattr(value, kind)
    return None


def _state(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).lower().replace("-", "_").removeprefix("task_state_")
    return "unknown" if text == "unspecified" else text


def _narrow(value: Any) -> Any:
    """Protobuf Struct numbers are doubles: give integral ones back as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: _narrow(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_narrow(v) for v in value]
    return value


def payload(event: Mapping[str, Any]) -> Any:
    """The payload of a message or artifact, nothing of it dropped: its text (several text
    parts joined by newlines, as a2a's ``get_message_text`` joins them; JSON-parsed when it is
    JSON), else its data (a list when several parts), else its files ({"files": [...]}), else
    an empty object. Parts of several kinds: {"text": ..., "data": ..., "files": [...]}."""
    texts, data, files = event["texts"], event["data"], event["files"]
    kinds: dict[str, Any] = {}
    if texts:
        kinds["text"] = unwrap_text("\n".join(texts))
    if data:
        kinds["data"] = data[0] if len(data) == 1 else data
    if files:
        kinds["files"] = files
    return next(iter(kinds.values())) if len(kinds) == 1 and not files else kinds


# -- the recorder behind the queue ----------------------------------------------------------------


class Recorder:
    """Applies the ProcessGPT event rules to one todo's normalised a2a events."""

    def __init__(self, todo: Todo) -> None:
        self.todo = todo
        self.last_state: str | None = None
        self.question: Any = None
        self.asked = False
        self.final: Any = None
        self.last_artifact: Any = None
        self.error: Any = None
        self.reply: Any = None  # an agent Message, or the message of the completed status
        self.parts: dict[Any, dict[str, list[Any]]] = {}  # each artifact's parts so far, by id
        self.artifacts: dict[Any, Any] = {}  # each artifact's payload so far, by id
        self.closed = False

    def record(self, event: Any) -> None:
        normal = normalize(event)
        if self.closed:
            logger.warning("a2a event after execute() returned for todo %s; dropped",
                           self.todo.id, extra={"action": "a2a_event", "todo_id": self.todo.id})
            return
        if normal["kind"] == "status":
            self._status(normal)
        elif normal["kind"] == "artifact":
            self._artifact(normal)
        elif normal["kind"] == "task":
            self._task(normal)
        elif normal["kind"] == "message" and (normal["texts"] or normal["data"]
                                              or normal["files"]):
            self.reply = payload(normal)  # a2a's "immediate response": the result, if no other
        else:
            logger.debug("a2a %s for todo %s not recorded", normal["kind"], self.todo.id)

    def _status(self, event: dict[str, Any]) -> None:
        state = event["state"]
        if self.last_state in TERMINAL_STATES and state:
            # a2a's TaskUpdater refuses this too: the task's end stands, written once
            if state != self.last_state:
                logger.warning("a2a status %r after the task ended %r, for todo %s; dropped",
                               state, self.last_state, self.todo.id,
                               extra={"action": "a2a_event", "todo_id": self.todo.id})
            else:
                logger.debug("a2a status %r repeated for todo %s; dropped", state,
                             self.todo.id)
            return
        metadata = event["metadata"]
        self.last_state = state or self.last_state
        event_type = metadata.get("event_type")
        if event_type not in self.todo.events.types:
            if event_type is not None:
                logger.warning("unknown event_type %r from todo %s; using the state instead",
                               event_type, self.todo.id,
                               extra={"action": "a2a_event", "todo_id": self.todo.id})
            event_type = STATE_EVENT_TYPES.get(state or "", "task_working")
        if state in ("input_required", "auth_required"):
            event_type = "human_asked"  # over any event_type it names, as the original SDK
        data = payload(event)
        if event_type == "human_asked":
            self.asked = True
            self.question = data
        if state in ("failed", "rejected", "canceled"):
            self.error = data
        elif state == "completed" and (event["texts"] or event["data"] or event["files"]):
            self.reply = data
        status = metadata.get("status")
        self.todo.events.emit(
            event_type,
            data,
            job_id=_text_or_none(metadata.get("job_id")),
            crew_type=_text_or_none(metadata.get("crew_type")),
            status=status if status in EVENT_STATUSES else None,
        )

    def _task(self, event: dict[str, Any]) -> None:
        """A whole Task enqueued (a snapshot): its artifacts (the result, when it completed;
        with none, the agent's last message in its history, as a reply), then its state once
        past working; a new task (submitted, working) records no state, nor does a task in
        the state recorded already (enqueued again, or after its status): its end, or its
        question, is written once."""
        for artifact in event["artifacts"]:
            self._artifact({**artifact, "append": False, "last_chunk": False,
                            "final": event["state"] == "completed"})
        reply = event["history_reply"]
        if (event["state"] == "completed" and not event["artifacts"] and reply
                and (reply["texts"] or reply["data"] or reply["files"])):
            self.reply = payload(reply)  # its answer as the agent's last message of its history
        if event["state"] not in (None, "submitted", "working", "unknown", self.last_state):
            self._status(event)

    def _artifact(self, event: dict[str, Any]) -> None:
        texts = event["texts"]
        artifact_id = event["artifact_id"]
        empty = not texts and not event["data"] and not event["files"]
        if event["append"] and empty and artifact_id in self.artifacts:
            data = self.artifacts[artifact_id]  # an empty closing chunk only closes it
        else:
            so_far = self.parts.get(artifact_id) if event["append"] else None
            if so_far is not None:
                # a chunk of a streamed artifact (others may be streamed between its chunks):
                # its text continues that artifact's last text, its other text parts and
                # files are added, its data (a fuller snapshot) replaces the earlier data
                joined = list(so_far["texts"])
                if joined and texts:
                    joined[-1] += texts[0]
                    texts = texts[1:]
                event = {**event, "texts": joined + list(texts),
                         "data": event["data"] or so_far["data"],
                         "files": so_far["files"] + list(event["files"])}
            self.parts[artifact_id] = {"texts": list(event["texts"]),
                                       "data": list(event["data"]),
                                       "files": list(event["files"])}
            data = self.artifacts[artifact_id] = payload(event)
        if event["last_chunk"] or event["final"]:
            self.final = data
        else:
            self.last_artifact = data
            self.todo.events.result(data, final=False)

    def outcome(self) -> Any:
        """What the finished ``execute`` amounts to: a result, a question, or a failure."""
        if self.last_state in ("failed", "rejected", "canceled"):
            word = {"failed": "failure", "rejected": "rejection of the task",
                    "canceled": "cancellation of the task"}[self.last_state]
            if self.error in (None, {}, ""):
                raise RuntimeError(f"executor reported {word}, with no message")
            why = self.error if isinstance(self.error, str) else json.dumps(
                self.error, ensure_ascii=False, default=str)
            raise RuntimeError(f"executor reported {word}: {why}")
        if self.asked and self.last_state in ("input_required", "auth_required"):
            # a last chunk made before the question (a report to approve) is what the person
            # looks at: kept as the todo's draft with the suspend
            return AwaitingHuman(question=self.question, draft=self.final)
        if self.final is not None:
            return self.final
        if self.last_state == "completed":  # its answer, even after an earlier question
            if self.last_artifact is not None:
                return self.last_artifact
            if self.reply is not None:
                return self.reply
        if self.asked and self.last_state != "completed":  # a completed task waits for nobody
            return AwaitingHuman(question=self.question)
        return self.reply


def _text_or_none(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


# -- a2a classes built on the installed line ------------------------------------------------------


@cache
def _queue_class() -> type:
    from a2a.server.events import EventQueue

    class BridgeEventQueue(EventQueue):  # type: ignore[misc]
        """Records events synchronously; awaiting the returned coroutine is optional."""

        def __init__(self, recorder: Recorder) -> None:  # no super(): no asyncio queue needed
            self._recorder = recorder

        def enqueue_event(self, event: Any) -> DoneCoroutine:
            self._recorder.record(event)
            return DoneCoroutine()

        def close(self, immediate: bool = False) -> DoneCoroutine:
            self._recorder.closed = True
            return DoneCoroutine()

        def is_closed(self) -> bool:
            return self._recorder.closed

        def task_done(self) -> None:
            pass

    return BridgeEventQueue


def _message(text: str, context_id: str, task_id: str) -> Any:
    """A user message of ``text``. An empty one is a data part naming the todo: a2a refuses
    an empty text part (``new_task(context.message)`` raises), and ``get_user_input()`` still
    answers ""."""
    message_id = str(uuid.uuid4())
    if is_v1():
        from a2a.types import Message, Part, Role
        from google.protobuf import struct_pb2

        if text:
            part = Part(text=text)
        else:
            part = Part(data=struct_pb2.Value(struct_value=struct_pb2.Struct(
                fields={"todo_id": struct_pb2.Value(string_value=task_id)})))
        return Message(role=Role.ROLE_USER, parts=[part], message_id=message_id,
                       context_id=context_id, task_id=task_id)
    from a2a.types import DataPart, Message, Part, Role, TextPart

    root = TextPart(text=text) if text else DataPart(data={"todo_id": task_id})
    return Message(role=Role.user, parts=[Part(root=root)], message_id=message_id,
                   context_id=context_id, task_id=task_id)


def _request(message: Any) -> Any:
    """``message`` as the request a served a2a call carries."""
    if is_v1():
        from a2a.types import SendMessageRequest

        return SendMessageRequest(message=message)
    from a2a.types import MessageSendParams

    return MessageSendParams(message=message)


def _waiting_task(todo: Todo, context_id: str) -> Any:
    """The todo as the task an a2a server keeps while it waits for the user's input: state
    input_required, its history the todo's input."""
    from a2a.types import Task, TaskState, TaskStatus

    asked = _message(todo.input, context_id, todo.id)
    if is_v1():
        return Task(id=todo.id, context_id=context_id, history=[asked],
                    status=TaskStatus(state=TaskState.TASK_STATE_INPUT_REQUIRED))
    return Task(id=todo.id, context_id=context_id, history=[asked],
                status=TaskStatus(state=TaskState.input_required))


@cache
def _context_class() -> type:
    from a2a.server.agent_execution import RequestContext

    class ProcessGPTRequestContext(RequestContext):  # type: ignore[misc]
        """The installed RequestContext plus the todo row and extras, as the original SDK gave."""

        def __init__(self, todo: Todo, *, follow_up: bool = False) -> None:
            """:param follow_up: a run after a person's answer is given as an a2a server
                gives a follow-up message (see ``answers_as_follow_ups``)."""
            self.todo = todo
            self.row = dict(todo.row)
            self.extras = dict(todo.extras)
            context_id = str(todo.proc_inst_id or todo.id)
            answered = follow_up and _follows_an_answer(todo)
            text = feedback_text(last_feedback(todo.row)) if answered else todo.input
            request = _request(_message(text, context_id, todo.id))
            task = _waiting_task(todo, context_id) if answered else None
            from a2a.server.context import ServerCallContext

            if is_v1():  # the todo's tenant is the request's (context.tenant)
                super().__init__(ServerCallContext(tenant=todo.tenant_id or ""),
                                 request=request, task_id=todo.id, context_id=context_id,
                                 task=task)
            else:  # a call context too, as a served request has one (its state, its user)
                super().__init__(request=request, task_id=todo.id, context_id=context_id,
                                 task=task, call_context=ServerCallContext())

        def get_context_data(self) -> dict[str, Any]:
            return {"row": self.row, "extras": self.extras}

        @property
        def resume(self) -> Resume:
            """Why this run happens (``kind``, ``attempt``, ``key``, ``answer_raw`` and the
            answer), where process-gpt-agent-sdk 0.11's executors read it."""
            return self.todo.resume

        @property
        def task_state(self) -> str:
            """The row's draft_status as the claim left it (STARTED), as process-gpt-agent-sdk
            0.11's context gives it; ``resume`` says why the todo runs."""
            return str(self.row.get("draft_status") or "")

        @property
        def metadata(self) -> dict[str, Any]:
            """The extras plus the row, as process-gpt-agent-sdk's context gave them."""
            return {**self.extras, "row": self.row}

    return ProcessGPTRequestContext


def answers_as_follow_ups(executor: Any) -> Any:
    """``executor``, for an AgentExecutor written for a plain a2a server: on the run after a
    person answers its ``input_required``, ``get_user_input()`` is the answer and
    ``current_task`` the task waiting for it (state input_required, history the todo's input),
    as an a2a server gives a follow-up message. Without it, that run gets the todo's input again
    and the answer in ``context.resume``, as process-gpt-agent-sdk's executors expect."""
    return _follow_up_class()(executor)


def _follows_an_answer(todo: Todo) -> bool:
    """The run continues from a person's answer: resumed by it, or reclaimed from a run that
    was and died (the todo's latest feedback is still that answer)."""
    if todo.resume.kind == "human_answer":
        return True
    last = last_feedback(todo.row)
    return (todo.resume.kind == "reclaim" and isinstance(last, Mapping)
            and last.get("kind") == "human_answer")


@cache
def _follow_up_class() -> type:
    from a2a.server.agent_execution import AgentExecutor

    class FollowUps(AgentExecutor):  # type: ignore[misc]
        """Passes a run after an answer to the wrapped executor as an a2a follow-up."""

        def __init__(self, executor: Any) -> None:
            if not isinstance(executor, AgentExecutor):
                raise TypeError(f"answers_as_follow_ups takes an a2a AgentExecutor, not "
                                f"{type(executor).__name__}")
            self.executor = executor
            self._lock = threading.Lock()
            # the context execute got is the one cancel gets, as on an a2a server
            self._made: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

        def _follow_up(self, context: Any) -> Any:
            todo = getattr(context, "todo", None)
            if todo is None or not _follows_an_answer(todo):
                return context
            with self._lock:
                made = self._made.get(context)
                if made is None:
                    made = self._made[context] = _context_class()(todo, follow_up=True)
            return made

        async def execute(self, context: Any, event_queue: Any) -> None:
            await self.executor.execute(self._follow_up(context), event_queue)

        async def cancel(self, context: Any, event_queue: Any) -> None:
            await self.executor.cancel(self._follow_up(context), event_queue)

    return FollowUps


class A2AAdapter:
    """Runs an async a2a ``AgentExecutor`` on the worker thread's own loop or the shared one."""

    uses_loops = True

    def __init__(self, executor: Any, loops: Loops) -> None:
        self._executor = executor
        self._loops = loops
        self._lock = threading.Lock()
        # Keyed by the Todo object: the same todo id may run twice here (a revision mid-run).
        self._running: dict[int, tuple[LoopTask[Any], Any, Any]] = {}

    @property
    def defers(self) -> bool:
        return self._loops.defers

    def run(self, todo: Todo) -> Any:
        task, recorder = self._begin(todo)
        try:
            task.result()
        finally:
            self._end(todo, recorder)
        return recorder.outcome()

    def start(self, todo: Todo, done: Done) -> None:
        task, recorder = self._begin(todo)

        def ended(future: Finished[Any]) -> None:
            self._end(todo, recorder)
            try:
                result_of(future)
                value = recorder.outcome()
            except BaseException as exc:  # as run() raises it on the worker thread
                done(None, exc)
                return
            done(value, None)

        try:
            task.then(ended)
        except BaseException:
            self._end(todo, recorder)
            raise

    def _begin(self, todo: Todo) -> tuple[LoopTask[Any], Recorder]:
        recorder = Recorder(todo)
        queue = _queue_class()(recorder)
        context = _context_class()(todo)
        execute = self._executor.execute

        async def execute_then_close(context: Any, queue: Any) -> Any:
            # the todo's events end with execute itself: a task it left running may still
            # enqueue while it is cancelled (on either loop mode), and is dropped, not recorded
            try:
                return await execute(context, queue)
            finally:
                recorder.closed = True

        task = self._loops.start(todo.id, execute_then_close, context, queue)
        with self._lock:
            self._running[id(todo)] = (task, context, queue)
        if todo.cancelled:  # cancelled before it was registered here
            self.cancel(todo)
        return task, recorder

    def _end(self, todo: Todo, recorder: Recorder) -> None:
        recorder.closed = True
        with self._lock:
            self._running.pop(id(todo), None)

    def cancel(self, todo: Todo) -> None:
        """On the executor's loop, await ``executor.cancel(context, queue)`` (at most
        ``CANCEL_HOOK_TIMEOUT``), then cancel the running execute. Returns at once: the
        caller (heartbeat, listener, stop) never waits on a loop the executor may block."""
        with self._lock:
            running = self._running.get(id(todo))
        if running is None:
            return
        task, context, queue = running

        late: list[bool] = []  # set once the hook outlived its time: what it raises then is
        # nobody's to read but the log's

        def ended(called: asyncio.Future[Any]) -> None:
            failure = None if called.cancelled() else called.exception()
            if failure is not None and late:
                logger.warning("executor.cancel() for todo %s failed after its %gs: %r",
                               todo.id, CANCEL_HOOK_TIMEOUT, failure, exc_info=failure,
                               extra={"action": "cancel", "todo_id": todo.id})

        async def hook() -> None:
            # not wait_for: it waits for the hook to end once cancelled, and a hook that
            # swallows its cancellation would keep execute from ever being cancelled
            called = asyncio.ensure_future(self._executor.cancel(context, queue))
            called.add_done_callback(ended)
            await asyncio.wait({called}, timeout=CANCEL_HOOK_TIMEOUT)
            if called.done():
                called.result()  # what it raised is logged by the caller
                return
            late.append(True)
            called.cancel()
            logger.warning("executor.cancel() did not return within %gs for todo %s",
                           CANCEL_HOOK_TIMEOUT, todo.id,
                           extra={"action": "cancel", "todo_id": todo.id})

        task.cancel(before=hook)

    def close(self) -> None:
        self._loops.close()
