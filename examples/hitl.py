"""Asking a person from blocking code.

    python examples/hitl.py
    processgpt-sync enqueue --agent-orch hitl-demo --input "order 12 laptops"
    processgpt-sync asked                       # the open question and its job_id
    processgpt-sync respond JOB_ID '"careful"'  # answer as the ProcessGPT UI would

`ask_human` blocks this worker thread until the answer arrives (the lease stays alive);
`suspend_for_human` frees the worker and the todo runs again from the start once someone
replies — hours later or after a restart. On that run every question already answered returns
its answer at once, so the code reads top to bottom.
"""

from __future__ import annotations

import logging

from processgpt_sync import Todo, ask_human, serve


def check_budget(item: str) -> bool:
    """A tool deep inside agent code: it asks without seeing the todo (found via contextvars)."""
    return bool(ask_human(f"Is there budget for {item}?", kind="confirm", timeout=600))


def handle(todo: Todo) -> dict[str, object]:
    style = todo.ask_human("How should I process this?", kind="select",
                           options=["fast", "careful"], timeout=600, default="careful")
    todo.events.progress({"style": style})
    approved = check_budget(todo.input) or todo.suspend_for_human(
        f"No budget for {todo.input!r}: approve anyway?", kind="confirm")  # frees the worker
    return {"request": todo.input, "style": style, "approved": bool(approved)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # other libraries: warnings only
    logging.getLogger("processgpt_sync").setLevel(logging.INFO)  # the server's own lines
    serve(handle, agent_orch="hitl-demo", workers=4)
