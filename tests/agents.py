"""Executors the subprocess tests serve (importable as tests.agents:NAME)."""

from __future__ import annotations

import os
import time

from processgpt_sync import Todo


def patient(todo: Todo) -> dict[str, object]:
    """First run: a long job (the test kills or pauses the process); a reclaim: done at once."""
    todo.events.progress({"pid": os.getpid(), "resume": todo.resume.kind})
    if todo.resume.kind == "fresh":
        time.sleep(float(todo.input))
    return {"pid": os.getpid(), "resume": todo.resume.kind, "attempt": todo.resume.attempt}


def quick(todo: Todo) -> dict[str, object]:
    """One event per execution, so the test can count executions."""
    todo.events.progress({"pid": os.getpid()})
    time.sleep(0.002)
    return {"pid": os.getpid()}


def steady(todo: Todo) -> dict[str, object]:
    """As ``quick``, but 20 ms long: 1,000 of them keep a dozen workers busy for seconds."""
    todo.events.progress({"pid": os.getpid()})
    time.sleep(0.02)
    return {"pid": os.getpid()}


class ProcessWide:
    """Keeps process-wide state that concurrent todos would corrupt (like a global tool
    loader shut down at the end of each todo), so it declares itself not thread-safe."""

    thread_safe = False
    busy = False

    def execute(self, todo: Todo, events: object) -> dict[str, object]:
        if ProcessWide.busy:
            raise RuntimeError("two todos at once in one process")
        ProcessWide.busy = True
        try:
            time.sleep(0.05)
            return {"pid": os.getpid()}
        finally:
            ProcessWide.busy = False
