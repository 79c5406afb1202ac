"""processgpt-sync: serve ProcessGPT work items from ordinary, blocking Python code.

A server claims the todos of one ``agent_orch`` from PostgreSQL (embedded, plain or Supabase),
runs an executor on each in a thread pool, and writes its events and result back.
"""

from __future__ import annotations

from typing import Any

from . import embedded
from .errors import (
    AccessDenied,
    ConfigurationError,
    ExecutorError,
    ExecutorTimeout,
    HumanTimeout,
    NoResultError,
    PayloadError,
    ProcessGPTSyncError,
    SchemaMissing,
    ServerFailed,
    StorageError,
    StorageUnavailable,
)
from .events import Events
from .models import Resume
from .runs import current_run
from .server import Health, Server
from .serving import serve, start
from .settings import Settings
from .todo import Todo
from .version import __version__


def ask_human(question: str, **options: Any) -> Any:
    """``todo.ask_human`` for code that does not see the todo (a CrewAI or LangChain tool
    running on the worker thread); the todo is found through contextvars.

    :raises ProcessGPTSyncError: called outside a running todo.
    """
    run = current_run()
    if run is None:
        raise ProcessGPTSyncError(
            "ask_human() was called outside a running todo: call it from an executor, or from "
            "code the executor calls on its own thread"
        )
    return run.todo.ask_human(question, **options)


__all__ = [
    "AccessDenied",
    "ConfigurationError",
    "Events",
    "ExecutorError",
    "ExecutorTimeout",
    "Health",
    "HumanTimeout",
    "NoResultError",
    "PayloadError",
    "ProcessGPTSyncError",
    "Resume",
    "SchemaMissing",
    "Server",
    "ServerFailed",
    "Settings",
    "StorageError",
    "StorageUnavailable",
    "Todo",
    "__version__",
    "ask_human",
    "embedded",
    "serve",
    "start",
]
