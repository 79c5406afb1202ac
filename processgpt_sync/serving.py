"""The two ways to serve: ``start`` (a handle, for Jupyter, Django and tests) and ``serve``
(block until a signal; one process or a supervised group of them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dotenv import load_dotenv

from .errors import ConfigurationError, ServerFailed
from .executor import check_thread_safety
from .server import Server
from .settings import Settings
from .storage import Storage
from .supervisor import EXIT_CONFIG, EXIT_OK, ChildSpec, Supervisor, check_picklable


def start(
    executor: Any,
    *,
    agent_orch: str | None = None,
    workers: int | None = None,
    database_url: str | None = None,
    settings: Settings | None = None,
    storage: Storage | None = None,
    **options: Any,
) -> Server:
    """Start a server in background threads and return its handle (Jupyter, Django, tests).

    Options are :class:`Settings` fields; unset ones come from the environment.
    """
    settings = _settings_from(settings, agent_orch=agent_orch, workers=workers,
                              database_url=database_url, **options)
    return Server(executor, settings, storage=storage).start()


def serve(
    executor: Any,
    *,
    agent_orch: str | None = None,
    workers: int | None = None,
    database_url: str | None = None,
    settings: Settings | None = None,
    env_file: str | None = None,
    processes: int = 1,
    setup: Callable[[], None] | None = None,
    **options: Any,
) -> None:
    """Serve until SIGINT/SIGTERM, then stop gracefully and return.

    :param env_file: a ``.env`` file to load first (nothing is read unless asked).
    :param processes: run this many server processes under one supervisor (see
        :mod:`processgpt_sync.supervisor`); the executor must be picklable.
    :param setup: with processes, a module-level function each server process runs first:
        configure logging there (a new process does not run the script's
        ``if __name__ == "__main__":`` block, so without it only warnings reach stderr).
    :raises ServerFailed: a server (or, with processes, a server process) failed.
    """
    if env_file is not None:
        load_dotenv(env_file)
    settings = _settings_from(settings, agent_orch=agent_orch, workers=workers,
                              database_url=database_url, **options)
    if processes == 1:
        if setup is not None:
            setup()
        Server(executor, settings).run_forever()
        return
    check_thread_safety(executor, settings.workers)
    spec = ChildSpec(executor=executor, settings=settings, setup=setup)
    check_picklable(spec)
    code = Supervisor(spec, processes).run()
    if code == EXIT_CONFIG:
        raise ConfigurationError("a server process failed on its configuration; see its log")
    if code != EXIT_OK:
        raise ServerFailed(f"a server process failed (exit code {code}); see its log")


def _settings_from(settings: Settings | None, **options: Any) -> Settings:
    """``settings`` as given, or built from the options and the environment. Both at once is
    refused: which of the two wins would be a guess."""
    if settings is None:
        return Settings.from_env(**options)
    if not isinstance(settings, Settings):
        raise ConfigurationError(
            f"settings must be a processgpt_sync.Settings, got {type(settings).__name__}; "
            "pass options such as workers=... directly instead")
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise ConfigurationError(
            f"pass either settings=... or options, not both (given: {', '.join(given)}); "
            f"use dataclasses.replace(settings, {given[0]}=...) to change one")
    return settings
