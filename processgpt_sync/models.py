"""The data an executor sees: a claimed todo as a read-only view, and why it runs."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import Events

JSONDict = dict[str, Any]
NO_DEFAULT: Any = object()  # ask_human(default=...) not given
RESUME_KINDS = ("fresh", "reclaim", "human_answer", "revision")


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One todo as the claim function returned it: the row, its fencing token and context."""

    todo_id: str
    token: str
    row: Mapping[str, Any]
    extras: Mapping[str, Any]

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> Claim:
        row = item["row"]
        extras = dict(item.get("extras") or {})
        if isinstance(extras.get("resume"), Mapping):
            extras["resume"] = upstream_resume(extras["resume"], row)
        return cls(
            todo_id=str(row["id"]),
            token=str(item["token"]),
            row=MappingProxyType(dict(row)),
            extras=MappingProxyType(extras),
        )


def upstream_resume(resume: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """``resume`` plus the keys process-gpt-agent-sdk 0.11 executors read from
    ``extras["resume"]``: ``key`` (the todo id, a stable key for checkpoints and sessions) and
    ``answer_raw`` (the person's last input as text, JSON for structured answers; "" on a fresh
    run or a reclaim)."""
    answer_raw = ""
    if resume.get("kind") in ("human_answer", "revision"):
        feedback = row.get("feedback")
        last = feedback[-1] if isinstance(feedback, list) and feedback else None
        content = last.get("content") if isinstance(last, Mapping) else last
        if isinstance(content, str):
            answer_raw = content
        elif content is not None:
            answer_raw = json.dumps(content, ensure_ascii=False)
    return {**resume, "key": str(row.get("id") or ""), "answer_raw": answer_raw}


@dataclass(frozen=True, kw_only=True)
class Resume:
    """Why this run happens: ``fresh``, ``reclaim``, ``human_answer`` or ``revision``."""

    kind: str = "fresh"
    attempt: int = 1
    answer: Any = None
    job_id: str | None = None
    """The answered question's job_id (``human_answer``)."""
    key: str = ""
    """The todo id: what the original SDK's executors use as their resume key."""
    answer_raw: str = ""
    """The person's last input as text (the original SDK's name), "" when there is none."""

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> Resume:
        value = value or {}
        kind = value.get("kind") if value.get("kind") in RESUME_KINDS else "fresh"
        attempt = int(value.get("attempt") or 1)
        return cls(kind=str(kind), attempt=attempt, answer=value.get("answer"),
                   job_id=value.get("job_id"), key=str(value.get("key") or ""),
                   answer_raw=str(value.get("answer_raw") or ""))


@dataclass(frozen=True)
class AwaitingHuman:
    """An executor's outcome when it stopped to ask a person: the todo waits for the answer."""

    question: Any = None


@dataclass(frozen=True, kw_only=True)
class Todo:
    """A claimed ProcessGPT work item, read-only, as handed to an executor."""

    id: str
    input: str
    agent_mode: str | None
    agent_orch: str | None
    tenant_id: str | None
    proc_inst_id: str | None
    activity_name: str | None
    row: Mapping[str, Any]
    extras: Mapping[str, Any]
    resume: Resume
    events: Events = field(repr=False, compare=False)
    cancel_event: threading.Event = field(repr=False, compare=False)
    asker: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_claim(cls, claim: Claim, events: Events, cancel_event: threading.Event,
                   asker: Callable[..., Any] | None = None) -> Todo:
        row = claim.row
        return cls(
            id=claim.todo_id,
            input=_text(row.get("query")) or _text(row.get("description")),
            agent_mode=row.get("agent_mode"),
            agent_orch=row.get("agent_orch"),
            tenant_id=row.get("tenant_id"),
            proc_inst_id=row.get("root_proc_inst_id") or row.get("proc_inst_id"),
            activity_name=row.get("activity_name"),
            row=claim.row,
            extras=claim.extras,
            resume=Resume.from_json(claim.extras.get("resume")),
            events=events,
            cancel_event=cancel_event,
            asker=asker,
        )

    @property
    def cancelled(self) -> bool:
        """True once the todo was cancelled (UI cancel, lost lease, timeout or shutdown)."""
        return self.cancel_event.is_set()

    def ask_human(self, question: str, *, options: list[Any] | None = None, kind: str = "text",
                  timeout: float = 300.0, default: Any = NO_DEFAULT) -> Any:
        """Ask a person and block until the answer arrives; return the answer.

        Writes a ``human_asked`` event (and a notification for the todo's human users); the
        ProcessGPT UI answers with a ``human_response`` event. The same question asked again in
        this todo returns the earlier answer.

        :param kind: ``text``, ``select`` (needs ``options``) or ``confirm``.
        :param default: returned on timeout instead of raising.
        :raises HumanTimeout: no answer within ``timeout`` seconds and no ``default``.
        """
        if self.asker is None:
            from .errors import ProcessGPTSyncError

            raise ProcessGPTSyncError("this todo is not running in a server; it cannot ask")
        return self.asker(question, options=options, kind=kind, timeout=timeout,
                          default=default)

    def suspend_for_human(self, question: str, *, options: list[Any] | None = None,
                          kind: str = "text") -> Any:
        """Ask a person and free the worker: the todo waits in the database (HUMAN_ASKED) and
        runs again from the start, with ``resume.kind == "human_answer"`` and
        ``resume.answer``, once answered; this call does not return then.

        On that later run the same question (same text, options and kind) is not asked
        again: this call returns its answer, as ``ask_human`` does, so code that suspends
        reads naturally top to bottom.
        """
        if self.asker is None:
            from .errors import ProcessGPTSyncError

            raise ProcessGPTSyncError("this todo is not running in a server; it cannot ask")
        return self.asker(question, options=options, kind=kind, suspend=True)

    @property
    def agents(self) -> list[Any]:
        """Agent users named in ``todolist.user_id``, from the todo's own tenant."""
        return list(self.extras.get("agents") or [])

    @property
    def users(self) -> list[Any]:
        """Human users named in ``todolist.user_id`` (id, username, email)."""
        return list(self.extras.get("users") or [])

    @property
    def notify_emails(self) -> list[str]:
        return list(self.extras.get("notify_emails") or [])

    @property
    def summarized_feedback(self) -> str:
        """What the reviewer asked to change: the latest feedback's text, or the summary made
        by the ``summarize_feedback`` option; empty on a first run."""
        return str(self.extras.get("summarized_feedback") or "")

    @property
    def form_id(self) -> str | None:
        return self.extras.get("form_id")

    @property
    def form_fields(self) -> Any:
        return self.extras.get("form_fields")

    @property
    def form_html(self) -> str | None:
        return self.extras.get("form_html")

    @property
    def tenant_mcp(self) -> Any:
        return self.extras.get("tenant_mcp")


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""
