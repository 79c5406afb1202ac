"""Test executors the way they run in production, without sleeps or mocks.

- :class:`EmbeddedDatabases` / :func:`fresh_database`: throw-away databases with the schema on
  an embedded PostgreSQL, cloned from a template (130 to 180 ms each on a 2-core machine).
- :func:`run_todo`: one todo through a real server, with scripted answers to questions and a
  simulated UI cancel; returns a :class:`TodoRecord`.
- With pytest, installing the package registers the fixtures ``processgpt_databases``,
  ``processgpt_database_url`` and ``processgpt_run`` (see :mod:`processgpt_sync_pytest`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from .databases import EmbeddedDatabases, fresh_database, shared_databases
from .running import (
    NO_ANSWER,
    Event,
    Question,
    RunTimedOut,
    TodoRecord,
    UnansweredQuestion,
    run_todo,
)


@contextmanager
def runner(database_url: str | None = None) -> Iterator[Any]:
    """``run_todo`` bound to one database for the ``with`` block: ``database_url``, or a fresh
    database on the shared embedded server, dropped afterwards."""
    if database_url is not None:
        yield partial(run_todo, database_url=database_url)
        return
    with fresh_database() as url:
        yield partial(run_todo, database_url=url)


__all__ = [
    "NO_ANSWER",
    "EmbeddedDatabases",
    "Event",
    "Question",
    "RunTimedOut",
    "TodoRecord",
    "UnansweredQuestion",
    "fresh_database",
    "run_todo",
    "runner",
    "shared_databases",
]
