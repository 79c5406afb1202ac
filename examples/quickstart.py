"""The smallest ProcessGPT agent: a plain function, served from a plain script.

    python examples/quickstart.py          # embedded database, or DATABASE_URL / SUPABASE_*
    processgpt-sync enqueue --agent-orch quickstart --input "hello"
"""

from __future__ import annotations

import logging

from processgpt_sync import Todo, serve


def handle(todo: Todo) -> dict[str, object]:
    """Return value = the todo's result (todolist.output in COMPLETE mode, draft in DRAFT)."""
    todo.events.progress(f"working on {todo.input!r}")
    return {"answer": todo.input.upper(), "words": len(todo.input.split())}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # other libraries: warnings only
    logging.getLogger("processgpt_sync").setLevel(logging.INFO)  # the server's own lines
    serve(handle, agent_orch="quickstart", workers=4)
