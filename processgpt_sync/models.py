"""Plain data at the bottom of the package: a claim as the database returned it, why a run
happens, and what an executor returns when it waits for a person.

This module imports nothing of the package; everything else may import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

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
    unreadable: str | None = None
    """Why no executor can be given this todo (a value nested too deeply): it is failed unrun."""

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

    @classmethod
    def unrunnable(cls, item: Mapping[str, Any], part: str, key: str) -> Claim:
        """A claimed todo whose ``item[part][key]`` Python cannot handle for nesting: kept
        without that value, with why, so that it is failed rather than run."""
        row = dict(item["row"])
        if part == "row":
            row[key] = None
        where = f"todolist.{key}" if part == "row" else f"the claim's {key!r} context"
        why = (f"{where} is nested deeper than Python's JSON handling allows, so no executor "
               "can be given this todo; the value is left unchanged in the database")
        return cls(todo_id=str(row["id"]), token=str(item["token"]),
                   row=MappingProxyType(row), extras=MappingProxyType({}), unreadable=why)


class Claims(list[Claim]):
    """The todos one claim call took, and ``held_back``: how many it left for a later call
    because another transaction held their process instance, or put it in the platform's trash
    while the claim waited for it (nothing announces when it is free, or what else waits, so
    the claimer asks again soon)."""

    def __init__(self, claims: Iterable[Claim] = (), *, held_back: int = 0) -> None:
        super().__init__(claims)
        self.held_back = held_back


class Released(int):
    """How many todos a give-back made claimable again, and ``held_back``: the ids of those it
    left claimed because another transaction held their process instance (the caller asks
    again for them)."""

    held_back: tuple[str, ...]

    def __new__(cls, released: int = 0, *, held_back: Iterable[str] = ()) -> Released:
        value = super().__new__(cls, released)
        value.held_back = tuple(held_back)
        return value


def upstream_resume(resume: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """``resume`` plus the keys process-gpt-agent-sdk 0.11 executors read from
    ``extras["resume"]``: ``key`` (the todo id, a stable key for checkpoints and sessions) and
    ``answer_raw`` (the person's last input as text, JSON for structured answers; "" on a fresh
    run or a reclaim)."""
    answer_raw = ""
    if resume.get("kind") in ("human_answer", "revision"):
        answer_raw = feedback_text(last_feedback(row))
    return {**resume, "key": str(row.get("id") or ""), "answer_raw": answer_raw}


def last_feedback(row: Mapping[str, Any]) -> Any:
    """The todo's latest feedback item (an answer or a revision request), or None."""
    feedback = row.get("feedback")
    return feedback[-1] if isinstance(feedback, list) and feedback else None


def feedback_text(item: Any) -> str:
    """A feedback item's content as text: JSON for structured content, "" for none."""
    content = item.get("content") if isinstance(item, Mapping) else item
    if content is None:
        return ""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


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
    """An executor's outcome when it stopped to ask a person: the todo waits for the answer,
    with ``draft`` (when not None) stored as its draft by the same write."""

    question: Any = None
    draft: Any = None
