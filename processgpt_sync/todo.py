"""The todo as an executor sees it: a read-only view of its claim, its event sink, its cancel
flag and the way to ask a person.

It holds no database handle: questions go through the ``asker`` the server gives it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ProcessGPTSyncError
from .events import Events
from .models import NO_DEFAULT, Claim, Resume


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
            raise ProcessGPTSyncError("this todo is not running in a server; it cannot ask")
        return self.asker(question, options=options, kind=kind, suspend=True)

    @property
    def agents(self) -> list[Any]:
        """Agent users named in ``todolist.user_id``, from the todo's own tenant: each agent's
        whole ``users`` row (its persona, tools, model) but a push token."""
        return list(self.extras.get("agents") or [])

    @property
    def users(self) -> list[Any]:
        """Human users named in ``todolist.user_id``: id, tenant_id, username, email, role and
        profile only (never the platform's device tokens, admin flags or activity times)."""
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
