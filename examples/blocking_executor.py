"""An executor object with a blocking ``execute(todo, events)`` and a ``cancel(todo)`` hook.

This is the shape for CrewAI / LangChain code: ``execute`` may block for minutes (crew.kickoff(),
chain.invoke()); it reports progress through ``events`` and checks ``todo.cancelled`` between
steps. The demo (`processgpt-sync demo`) serves todos with it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from processgpt_sync import Events, Todo, serve

logger = logging.getLogger(__name__)


class WordCountExecutor:
    """Counts words in the todo's input, pretending each step takes a little while."""

    def __init__(self, step_seconds: float = 0.1) -> None:
        self.step_seconds = step_seconds

    def execute(self, todo: Todo, events: Events) -> dict[str, Any]:
        job_id = f"job-{todo.id}"
        events.started({"message": f"counting words of {todo.input!r}"},
                       job_id=job_id, crew_type="action")
        events.tool_started("word_counter", {"input": todo.input}, job_id=job_id)
        if todo.cancel_event.wait(self.step_seconds):  # a step; ends early on a UI cancel
            return {"cancelled": True}
        counts = Counter(word.strip(".,!?").lower() for word in todo.input.split())
        events.tool_finished("word_counter", {"distinct": len(counts)}, job_id=job_id)
        events.progress({"message": "writing the summary"}, job_id=job_id)
        if todo.cancel_event.wait(self.step_seconds):
            return {"cancelled": True}
        events.completed({"message": "done"}, job_id=job_id, crew_type="action")
        return {"words": sum(counts.values()), "most_common": counts.most_common(3)}

    def cancel(self, todo: Todo) -> None:
        """Called from another thread on a UI cancel; ``todo.cancelled`` is already True."""
        logger.info("todo %s cancelled", todo.id)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # other libraries: warnings only
    logging.getLogger("processgpt_sync").setLevel(logging.INFO)  # the server's own lines
    serve(WordCountExecutor(step_seconds=1.0), agent_orch="word-count", workers=4)
