"""Exceptions raised by processgpt_sync.

Our exception hierarchy::

    ProcessGPTSyncError
    ├── ConfigurationError
    ├── StorageError
    │   ├── StorageUnavailable
    │   │   └── AccessDenied
    │   └── SchemaMissing
    ├── PayloadError
    ├── HumanTimeout
    ├── ServerFailed
    ├── InfrastructureError
    └── ExecutorError
        ├── ExecutorTimeout
        ├── NoResultError
        └── BlockingCallInAsync

Each class's docstring is its default message.
"""

from __future__ import annotations


class ProcessGPTSyncError(Exception):
    """processgpt_sync failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class ConfigurationError(ProcessGPTSyncError):
    """The server settings are incomplete or invalid."""


class StorageError(ProcessGPTSyncError):
    """The database refused or failed a request."""

    def __init__(
        self, message: str | None = None, *, code: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


class StorageUnavailable(StorageError):
    """The database cannot be reached right now; the request may be retried."""

    retry_after: float | None = None
    """Seconds the service asked to wait before the next request (HTTP ``Retry-After``)."""

    unanswered: bool = False
    """A read timeout taken for a statement timeout (code 57014; the database answered other
    calls meanwhile): the statement may still have run, so a write is written in halves and
    given up only after more such timeouts than a refused heavy one (``UNANSWERED_ALONE_MAX``)."""


class AccessDenied(StorageUnavailable):
    """The service refuses this server's key (not the project's, revoked, expired or missing),
    whatever the call. Writes wait for it as through an outage (events up to the buffer's
    bound, ``event_writer.MAX_BUFFERED_EVENTS``), not dropped or recorded FAILED for it; a
    server refused this way at start, or for ``retrying.ACCESS_DENIED_STOP_AFTER`` seconds
    in a row, stops (a restart with the right key is the fix)."""


class SchemaMissing(StorageError):
    """The processgpt-sync schema is not installed: run `processgpt-sync init-db`."""


class PayloadError(ProcessGPTSyncError):
    """A value cannot be stored as JSON."""


class HumanTimeout(ProcessGPTSyncError):
    """No answer from a person in time."""


class ServerFailed(ProcessGPTSyncError):
    """A thread of the server died and the server stopped; the log has the traceback."""


class InfrastructureError(ProcessGPTSyncError):
    """The host could not provide what running a todo needs (an event loop, a socket, a file
    descriptor); the todo is given back, not failed."""


class ExecutorError(ProcessGPTSyncError):
    """The executor failed."""


class ExecutorTimeout(ExecutorError):
    """The executor did not finish in time."""


class NoResultError(ExecutorError):
    """The executor returned without a result."""


class BlockingCallInAsync(ExecutorError):
    """Blocking code called inside ``async def`` refused to run in the running event loop."""
