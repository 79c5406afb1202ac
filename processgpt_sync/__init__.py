"""processgpt-sync: serve ProcessGPT work items from ordinary, blocking Python code.

A server claims the todos of one ``agent_orch`` from PostgreSQL (embedded, plain or Supabase),
runs an executor on each in a thread pool, and writes its events and result back.
"""

from __future__ import annotations

from . import embedded
from .errors import (
    ConfigurationError,
    ExecutorError,
    ExecutorTimeout,
    NoResultError,
    PayloadError,
    ProcessGPTSyncError,
    SchemaMissing,
    StorageError,
    StorageUnavailable,
)
from .events import Events
from .models import Resume, Todo
from .server import Server, serve, start
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "Events",
    "ExecutorError",
    "ExecutorTimeout",
    "NoResultError",
    "PayloadError",
    "ProcessGPTSyncError",
    "Resume",
    "SchemaMissing",
    "Server",
    "Settings",
    "StorageError",
    "StorageUnavailable",
    "Todo",
    "__version__",
    "embedded",
    "serve",
    "start",
]
