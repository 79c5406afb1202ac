"""CrewAI 1.x events → the running todo's ProcessGPT events, through the server's fenced path.

One call, once per process, before crews run::

    from processgpt_sync.contrib.crewai import install
    install()                      # crew_type="action" by default, as the platform's crews use

From then on every crew that runs inside a todo (kickoff or kickoff_async, on the worker thread
or in an a2a executor) writes what the ProcessGPT UI shows for crews:

==========================================  =====================  ==========================
CrewAI event                                ``events.event_type``  ``data``
==========================================  =====================  ==========================
TaskStartedEvent                            task_started           role, goal, name,
                                                                   agent_profile
TaskCompletedEvent                          task_completed         result (JSON text parsed)
TaskFailedEvent                             error                  error, message
ToolUsageStartedEvent                       tool_usage_started     tool_name, query, args
ToolUsageFinishedEvent / ToolUsageError     tool_usage_finished    tool_name, query, info (the
                                                                   output), or error and
                                                                   message
AgentExecutionStarted/Completed/Error       task_working           role, status (crew_type
                                                                   ``agent``)
CrewKickoffStarted/Completed/Failed         task_working           crew_name, status
                                                                   (crew_type ``crew``)
==========================================  =====================  ==========================

A todo that runs several crews (the platform's planning, report and slide crews) labels each
one's events with its own ``crew_type``::

    with crew_label("report"):
        report_crew.kickoff()

Task and tool events share ``job_id`` = the CrewAI task id, so the UI pairs start and finish;
``crew_completed`` stays the server's own, written once after the result. Events go through
``todo.events`` (batched, ordered per todo, refused once the todo lost its lease or was
cancelled); no Supabase client of the crew's own. Crews running outside a todo are ignored.

CrewAI (1.5 and later) calls listeners on its own thread pool with the emitting code's
contextvars, which is how the running todo is found (``processgpt_sync.runs.current_run``);
earlier 1.x releases do not carry them, so nothing is recorded there (``install()`` warns). It
runs the handlers of one event concurrently with the next event's, so two events emitted
within microseconds of each other may be recorded in swapped order. ``crew.kickoff()`` waits
for the handlers of the events emitted before its result (CrewAI 1.10 and later); an event
CrewAI emits after that (its own kickoff-completed event) may reach the todo after the result
was written, and is then refused with a warning like any late write.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..payload import unwrap_text
from ..runs import current_run

logger = logging.getLogger(__name__)

DEFAULT_PROFILE = "/images/chat-icon.png"  # the UI's default agent picture
_lock = threading.Lock()
_listener: Any = None
_said_outside = False  # an event with no todo in its context was logged once
CONTEXT_SINCE = (1, 5)  # the first CrewAI release whose event handlers see the emitter's context
_label: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "processgpt_sync_crew_label", default=None)


def install(*, crew_type: str = "action") -> Any:
    """Register the listener on CrewAI's event bus (once per process; later calls return the
    same listener). ``crew_type`` labels task and tool events (the platform uses action,
    result, report, slide...) unless ``crew_label`` says otherwise around a crew."""
    global _listener
    with _lock:
        if _listener is None:
            _warn_if_context_is_lost()
            _listener = _listener_class()(crew_type)
        elif crew_type != _listener.crew_type:
            logger.warning("CrewAI events are already labelled crew_type=%r by an earlier "
                           "install(); %r is ignored: label one crew's events with "
                           "`with crew_label(%r): ...`", _listener.crew_type, crew_type,
                           crew_type, extra={"action": "crewai_install"})
        return _listener


def _warn_if_context_is_lost() -> None:
    """CrewAI before 1.5 calls event handlers without the emitting code's contextvars: the
    todo a crew runs in cannot be found, so its events would be dropped without a word."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("crewai")
    except PackageNotFoundError:
        return
    numbers = tuple(int(part) for part in installed.split(".")[:2] if part.isdigit())
    if len(numbers) == 2 and numbers < CONTEXT_SINCE:
        logger.warning("crewai %s calls event listeners without the crew's context, so no "
                       "todo can be found for them and no crew events are recorded; "
                       "upgrade to crewai>=1.5", installed,
                       extra={"action": "crewai_install"})


@contextmanager
def crew_label(crew_type: str) -> Iterator[None]:
    """Label the events of the crews run inside with ``crew_type`` instead of install()'s.
    CrewAI calls listeners with the emitting code's contextvars, so this holds for
    ``kickoff()``, ``kickoff_async()`` and crews run through ``anyio.to_thread`` or
    ``asyncio.to_thread`` (which carry them), not on a bare ``threading.Thread``."""
    token = _label.set(crew_type)
    try:
        yield
    finally:
        _label.reset(token)


def translate(event: Any, crew_type: str) -> tuple[str, Any, str | None, str] | None:
    """``(event_type, data, job_id, crew_type)`` for a CrewAI event, or None to skip it."""
    kind = type(event).__name__
    task_job = _text(getattr(event, "task_id", None)) or _task_id(getattr(event, "task", None))
    if kind == "TaskStartedEvent":
        agent = getattr(getattr(event, "task", None), "agent", None)
        role = getattr(agent, "role", None) or getattr(event, "agent_role", None)
        return "task_started", {
            "role": role,
            "goal": getattr(agent, "goal", None),
            "name": getattr(agent, "name", None) or role,
            "agent_profile": getattr(agent, "profile", None) or DEFAULT_PROFILE,
        }, task_job, crew_type
    if kind == "TaskCompletedEvent":
        output = getattr(event, "output", None)
        raw = getattr(output, "raw", output)
        return "task_completed", {"result": _parsed(raw)}, task_job, crew_type
    if kind == "TaskFailedEvent":
        error = _text(getattr(event, "error", None))
        return "error", {"error": error, "message": error}, task_job, crew_type
    if kind.startswith("ToolUsage"):
        args = getattr(event, "tool_args", None)
        parsed = _parsed(args) if isinstance(args, str) else args
        data: dict[str, Any] = {
            "tool_name": getattr(event, "tool_name", None),
            "query": parsed.get("query") if isinstance(parsed, dict) else None,
            "args": parsed,
        }
        if kind == "ToolUsageStartedEvent":
            return "tool_usage_started", data, task_job, crew_type
        if kind == "ToolUsageFinishedEvent":
            # `info`: the field the ProcessGPT UI shows under a finished tool
            data["info"] = _parsed(getattr(event, "output", None))
        else:
            data["error"] = data["message"] = _text(getattr(event, "error", None))
        return "tool_usage_finished", data, task_job, crew_type
    if kind.startswith("AgentExecution"):
        status = {"AgentExecutionStartedEvent": "started",
                  "AgentExecutionCompletedEvent": "completed"}.get(kind, "failed")
        role = getattr(getattr(event, "agent", None), "role", None) or getattr(
            event, "agent_role", None)
        return "task_working", {"role": role, "status": status}, task_job, "agent"
    if kind.startswith("CrewKickoff"):
        status = {"CrewKickoffStartedEvent": "started",
                  "CrewKickoffCompletedEvent": "completed"}.get(kind, "failed")
        data = {"crew_name": getattr(event, "crew_name", None), "status": status}
        if status == "failed":
            data["error"] = _text(getattr(event, "error", None))
        return "task_working", data, None, "crew"
    return None


def record(event: Any, crew_type: str) -> None:
    """Write one CrewAI event into the todo running in this context, if any."""
    global _said_outside
    run = current_run()
    if run is None:
        if not _said_outside:  # once: crews may run outside todos on purpose
            _said_outside = True
            logger.warning("a CrewAI %s arrived outside any todo and was not recorded (said "
                           "once): a crew run outside a todo is ignored; inside one, start it "
                           "where contextvars carry over (kickoff, kickoff_async, "
                           "asyncio.to_thread), not on a bare thread or run_in_executor",
                           type(event).__name__, extra={"action": "crewai_event"})
        return
    translated = translate(event, crew_type)
    if translated is None:
        return
    event_type, data, job_id, kind = translated
    try:
        run.todo.events.emit(event_type, _json_safe(data), job_id=job_id, crew_type=kind)
    except Exception:
        logger.exception("could not record CrewAI %s for todo %s", type(event).__name__,
                         run.todo_id, extra={"action": "crewai_event", "todo_id": run.todo_id})


def _listener_class() -> type:
    from crewai import events as crewai_events
    from crewai.events import BaseEventListener

    names = ("TaskStartedEvent", "TaskCompletedEvent", "TaskFailedEvent",
             "ToolUsageStartedEvent", "ToolUsageFinishedEvent", "ToolUsageErrorEvent",
             "AgentExecutionStartedEvent", "AgentExecutionCompletedEvent",
             "AgentExecutionErrorEvent", "CrewKickoffStartedEvent", "CrewKickoffCompletedEvent",
             "CrewKickoffFailedEvent")

    class ProcessGPTEventListener(BaseEventListener):  # type: ignore[misc]
        """Routes crew, agent, task and tool events into the running todo's events."""

        def __init__(self, crew_type: str) -> None:
            self.crew_type = crew_type
            super().__init__()

        def setup_listeners(self, crewai_event_bus: Any) -> None:
            for name in names:
                crewai_event_bus.on(getattr(crewai_events, name))(self._on_event)

        def _on_event(self, source: Any, event: Any) -> None:
            record(event, _label.get() or self.crew_type)

    return ProcessGPTEventListener


def _task_id(task: Any) -> str | None:
    return _text(getattr(task, "id", None))


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _parsed(value: Any) -> Any:
    """JSON text becomes its value (as the original SDK stored it); other text stays text."""
    return unwrap_text(value) if isinstance(value, str) else value


def _json_safe(data: Any) -> Any:
    return json.loads(json.dumps(data, ensure_ascii=False, default=str))
