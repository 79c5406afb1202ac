"""Progress events as an executor writes them: the per-todo sink and the validation of one event.

The sink only queues; writing is the event writer's job (``event_writer.EventBuffer``), so this
module never touches the database.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .errors import PayloadError
from .payload import snapshot_json, unwrap_text

logger = logging.getLogger(__name__)

# The event types every ProcessGPT database has. A server checks events against the labels of
# its own database's event_type_enum instead (newer platforms add types, e.g. gateway_decision).
EVENT_TYPES = frozenset(
    {
        "task_started", "task_completed", "tool_usage_started", "tool_usage_finished",
        "crew_completed", "human_asked", "human_response", "human_checked", "task_working",
        "error", "waiting_for_user", "task_cancelled", "human_feedback_submitted",
    }
)
EVENT_STATUSES = frozenset({"ASKED", "APPROVED", "REJECTED"})
MAX_JOB_ID = 1000  # characters; PostgreSQL's btree takes index rows of up to about 2,700 bytes


def make_event(
    todo_id: str,
    token: str,
    event_type: str,
    data: Any = None,
    *,
    job_id: str | None = None,
    crew_type: str | None = None,
    status: str | None = None,
    types: frozenset[str] = EVENT_TYPES,
) -> dict[str, Any]:
    """Build one event row, validated here so a bad event fails at the executor's call site.

    :param types: the event types the database accepts (its event_type_enum labels).
    """
    if event_type not in types:
        raise ValueError(
            f"unknown event_type {event_type!r}: this database's event_type_enum has "
            f"{', '.join(sorted(types))}"
        )
    if status is not None and status not in EVENT_STATUSES:
        raise ValueError(f"unknown event status {status!r}; expected ASKED, APPROVED or REJECTED")
    if job_id is not None and len(job_id) > MAX_JOB_ID:
        raise ValueError(f"job_id is {len(job_id):,} characters long; at most {MAX_JOB_ID:,} "
                         "(events.job_id is indexed: a longer one cannot be stored)")
    if isinstance(data, str):
        data = unwrap_text(data)
    data = snapshot_json(data, what=f"{event_type} event data")
    if event_type == "human_asked" and not job_id:
        job_id = f"human_asked_{uuid.uuid4()}"  # an answer names its question by job_id
    return {
        "todo_id": todo_id,
        "token": token,
        "event_type": event_type,
        "data": {} if data is None else data,
        "job_id": job_id,
        "crew_type": crew_type,
        "status": status,
    }


class EventQueue(Protocol):
    """Where a todo's sink puts its events (the server's ``EventBuffer``)."""

    event_types: frozenset[str]

    def add(self, event: dict[str, Any]) -> None: ...


class Events:
    """The event sink of one running todo; its methods block only to queue, never on I/O."""

    def __init__(
        self,
        todo_id: str,
        token: str,
        buffer: EventQueue,
        *,
        is_open: Callable[[], bool],
        on_result: Callable[[Any, bool], None],
    ) -> None:
        self._todo_id = todo_id
        self._token = token
        self._buffer = buffer
        self._is_open = is_open
        self._on_result = on_result

    @property
    def types(self) -> frozenset[str]:
        """The event types this todo's database accepts."""
        return self._buffer.event_types

    def emit(
        self,
        event_type: str,
        data: Any = None,
        *,
        job_id: str | None = None,
        crew_type: str | None = None,
        status: str | None = None,
    ) -> None:
        """Record one event of an ``event_type`` the database's event_type_enum has; any other
        type raises ValueError here, naming the types the database accepts."""
        event = make_event(
            self._todo_id, self._token, event_type, data,
            job_id=job_id, crew_type=crew_type, status=status, types=self.types,
        )
        if not self._is_open():
            logger.warning(
                "event %s of todo %s dropped: the todo is no longer running here",
                event_type, self._todo_id, extra={"action": "emit", "todo_id": self._todo_id},
            )
            return
        self._buffer.add(event)

    def started(self, data: Any = None, *, job_id: str | None = None,
                crew_type: str | None = None) -> None:
        """``task_started``: a job of this todo begins (pair it with ``completed``)."""
        self.emit("task_started", data, job_id=job_id, crew_type=crew_type)

    def progress(self, data: Any = None, *, job_id: str | None = None,
                 crew_type: str | None = None) -> None:
        """``task_working``: an intermediate progress message. Plain text is stored as
        ``{"message": text}``, the field the ProcessGPT UI shows for these events."""
        self.emit("task_working", _text_under(data, "message"), job_id=job_id,
                  crew_type=crew_type)

    def tool_started(self, name: str, data: Any = None, *, job_id: str | None = None,
                     crew_type: str | None = None) -> None:
        """``tool_usage_started``: the executor begins calling tool ``name``."""
        self.emit("tool_usage_started", _tool_data(name, data), job_id=job_id, crew_type=crew_type)

    def tool_finished(self, name: str, data: Any = None, *, job_id: str | None = None,
                      crew_type: str | None = None) -> None:
        """``tool_usage_finished``: tool ``name`` returned."""
        self.emit("tool_usage_finished", _tool_data(name, data), job_id=job_id,
                  crew_type=crew_type)

    def completed(self, data: Any = None, *, job_id: str | None = None,
                  crew_type: str | None = None) -> None:
        """``task_completed``: a job of this todo ends."""
        self.emit("task_completed", data, job_id=job_id, crew_type=crew_type)

    def error(self, data: Any = None, *, job_id: str | None = None,
              crew_type: str | None = None) -> None:
        """``error``: report a problem without ending the todo (raise to fail it). Plain text
        is stored as ``{"error": text, "message": text}``, the shape of the event a failure
        writes: the ProcessGPT UI shows ``message``."""
        self.emit("error", _text_under(data, "error", "message"), job_id=job_id,
                  crew_type=crew_type)

    def result(self, data: Any, *, final: bool = True) -> None:
        """Set the todo's result: ``final`` is written when the executor returns; an
        intermediate result is written to ``draft`` now, after the events before it."""
        if isinstance(data, str):
            data = unwrap_text(data)
        self._on_result(snapshot_json(data, what="result"), final)


def _text_under(data: Any, *keys: str) -> Any:
    """Event data from an executor: JSON text as the value it holds, other text under
    ``keys`` (the fields the ProcessGPT UI shows), anything else as given."""
    if isinstance(data, str):
        data = unwrap_text(data)
        if isinstance(data, str):
            return dict.fromkeys(keys, data)
    return data


def _tool_data(name: str, data: Any) -> Any:
    if not isinstance(name, str) or not name:
        raise PayloadError("a tool event needs the tool's name")
    if data is None:
        return {"tool_name": name}
    if isinstance(data, Mapping):
        return {"tool_name": name, **data}
    return {"tool_name": name, "info": data}
