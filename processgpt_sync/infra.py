"""Tell infrastructure failures apart from executor failures.

A todo whose run broke because the host ran out of file descriptors, threads or processes,
could not create an event loop, or lost the database is given back to be run again; recording
it FAILED would blame the executor for the host's problem.
"""

from __future__ import annotations

import errno

from .errors import InfrastructureError, StorageUnavailable

FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
FD_ADVICE = (
    "the process ran out of file descriptors: raise the limit (`ulimit -n`, LimitNOFILE= "
    "in systemd, nofile in Docker/Kubernetes) or run fewer workers"
)
NO_THREAD = "can't start new thread"  # CPython's RuntimeError when the OS refuses a thread
THREAD_ADVICE = (
    "the host refused a new thread: raise the thread limit (`ulimit -u`, TasksMax= in "
    "systemd, the pids limit in Docker/Kubernetes) or run fewer workers"
)

SPAWN_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM})
SPAWNERS = {"_execute_child": "/subprocess.py", "_posix_spawn": "/subprocess.py",
            "_launch": "/multiprocessing/popen_fork.py",
            "spawnv_passfds": "/multiprocessing/util.py"}  # what starts a process, and where
PROCESS_ADVICE = (
    "the host refused a new process: raise the process limit (`ulimit -u`, TasksMax= in "
    "systemd, the pids limit in Docker/Kubernetes), free memory, or run fewer workers"
)


def is_group(error: BaseException) -> bool:
    """An exception group (asyncio.TaskGroup, anyio's task groups, as MCP clients use):
    the built-in one or the ``exceptiongroup`` backport of Python 3.10."""
    return any(cls.__name__ == "BaseExceptionGroup" for cls in type(error).__mro__)


def inner_errors(error: BaseException) -> list[BaseException]:
    """The exceptions an exception group holds, however deeply nested; ``[error]`` for any
    other exception."""
    if not is_group(error):
        return [error]
    return [leaf for inner in getattr(error, "exceptions", ()) for leaf in inner_errors(inner)]


def infrastructure_problem(error: BaseException | None) -> str | None:
    """Why ``error`` is the infrastructure's fault (with advice), or None if it is not; inside
    an exception group, the first of its exceptions that is."""
    if error is not None and is_group(error):
        for inner in inner_errors(error):
            if (problem := infrastructure_problem(inner)) is not None:
                return problem
        return None
    seen: set[int] = set()
    current = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FD_ERRNOS:
            return f"{_said(current)}; {FD_ADVICE}"
        if (isinstance(current, OSError) and current.errno in SPAWN_ERRNOS
                and _spawning(current)):
            return f"{_said(current)}; {PROCESS_ADVICE}"
        if type(current) is RuntimeError and _said(current).startswith(NO_THREAD):
            return f"{_said(current)}; {THREAD_ADVICE}"
        if isinstance(current, (InfrastructureError, StorageUnavailable)):
            if "many open files" in _said(current):  # libpq reports EMFILE as text
                return f"{_said(current)}; {FD_ADVICE}"
            return _said(current)
        current = current.__cause__ or current.__context__
    return None


def _spawning(error: OSError) -> bool:
    """Whether ``error`` came from starting a process (subprocess, multiprocessing): the
    host's limit then, where an EAGAIN from a non-blocking socket is the executor's own."""
    frame = error.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        module = SPAWNERS.get(code.co_name)
        if module is not None and code.co_filename.endswith(module):
            return True
        frame = frame.tb_next
    return False


def _said(error: BaseException) -> str:
    """``str(error)``, or its type's name where that raises (an argument whose ``__str__``
    fails): telling the host's failures apart must not fail itself, or the todo would be
    recorded by nobody."""
    try:
        return str(error)
    except Exception:
        return type(error).__name__
