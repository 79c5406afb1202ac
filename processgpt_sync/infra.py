"""Tell infrastructure failures apart from executor failures.

A todo whose run broke because the host ran out of file descriptors, could not create an
event loop, or lost the database is given back to be run again; recording it FAILED would
blame the executor for the host's problem.
"""

from __future__ import annotations

import errno

from .errors import InfrastructureError, StorageUnavailable

FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
FD_ADVICE = (
    "the process ran out of file descriptors: raise the limit (`ulimit -n`, LimitNOFILE= "
    "in systemd, nofile in Docker/Kubernetes) or run fewer workers"
)


def infrastructure_problem(error: BaseException | None) -> str | None:
    """Why ``error`` is the infrastructure's fault (with advice), or None if it is not."""
    seen: set[int] = set()
    current = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FD_ERRNOS:
            return f"{current}; {FD_ADVICE}"
        if isinstance(current, (InfrastructureError, StorageUnavailable)):
            if "many open files" in str(current):  # libpq reports EMFILE as text
                return f"{current}; {FD_ADVICE}"
            return str(current)
        current = current.__cause__ or current.__context__
    return None
