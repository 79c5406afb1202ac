"""``extras["summarized_feedback"]``: the revision feedback an executor should act on.

The database gives the latest feedback item's text. A ``summarize_feedback`` function (a
``serve()``/``start()`` option) may replace it, e.g. with an LLM summary of every item, as
process-gpt-agent-sdk did; it runs on the todo's worker thread, never in the claimer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from .todo import Todo

Summarizer = Callable[[list[Any], Any], str]
"""``fn(feedback_items, previous_result) -> text``."""


def with_summary(todo: Todo, summarize: Summarizer | None) -> Todo:
    """``todo`` with ``extras["summarized_feedback"]`` made by ``summarize`` when the todo has
    feedback; ``todo`` itself otherwise.

    :raises TypeError: ``summarize`` returned something other than text.
    """
    feedback = todo.row.get("feedback")
    if summarize is None or not isinstance(feedback, list) or not feedback:
        return todo
    previous = todo.row.get("output") or todo.row.get("draft")
    text = summarize(list(feedback), previous)
    if not isinstance(text, str):
        raise TypeError(f"summarize_feedback must return str, got {type(text).__name__}")
    extras = MappingProxyType({**todo.extras, "summarized_feedback": text})
    return dataclasses.replace(todo, extras=extras)
