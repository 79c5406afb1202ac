"""`processgpt-sync console`: watch, answer, cancel and enqueue todos in a local browser.

Needs the ``console`` extra (from a checkout: ``pip install ".[console]"``): Starlette,
uvicorn, Jinja2 and python-multipart. Serves on 127.0.0.1 unless given a host and an access token.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any
from urllib.parse import quote

try:
    import uvicorn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra only
    from ..errors import ConfigurationError

    raise ConfigurationError(
        "the console needs its extra: from a checkout of processgpt-sync, pip install "
        f"'.[console]' ({exc})"
    ) from exc

from ..errors import ConfigurationError
from ..storage import Storage
from .app import ConsoleConfig, create_app

__all__ = ["ConsoleConfig", "ConsoleServer", "create_app"]

STOP_SECONDS = 5  # longest wait for open streams to close on stop()


class _Server(uvicorn.Server):
    """uvicorn's server, ending the open event streams first on a stop (they would otherwise
    hold the graceful shutdown for its whole timeout)."""

    def __init__(self, config: uvicorn.Config, end_streams: Callable[[], None]) -> None:
        super().__init__(config)
        self.end_streams = end_streams

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        threading.Thread(target=self.end_streams, daemon=True).start()
        super().handle_exit(sig, frame)


class ConsoleServer:
    """The console on its own uvicorn server: ``run()`` in the foreground, or ``start()`` in a
    thread (the demo, tests) and ``stop()``. The socket is bound at construction, so ``url``
    is known at once (port 0 picks a free one)."""

    def __init__(self, storage: Storage, config: ConsoleConfig | None = None) -> None:
        self.config = config or ConsoleConfig()
        self._socket = _listening_socket(self.config.host, self.config.port)
        self.port = int(self._socket.getsockname()[1])
        self.app = create_app(storage, self.config)
        # log_config=None: uvicorn's records go where the application's logging sends them
        # (the CLI's format and level), with no handler of its own added to the process
        self._server = _Server(uvicorn.Config(
            self.app, log_config=None, log_level=None, access_log=False, lifespan="on",
            timeout_graceful_shutdown=STOP_SECONDS), self.app.state.console.feed.close)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open; with the access token when one is set."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        token = f"?token={quote(self.config.token, safe='')}" if self.config.token else ""
        return f"http://{host}:{self.port}/{token}"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (or stop() from another thread)."""
        self._server.run(sockets=[self._socket])

    def start(self) -> ConsoleServer:
        """Serve from a background thread; return once the console accepts requests."""
        self._thread = threading.Thread(target=self.run, name="processgpt-console", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the console server failed to start")
            self._thread.join(0.02)
        return self

    def stop(self) -> None:
        self._server.end_streams()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_SECONDS + 5)
        self._socket.close()

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _listening_socket(host: str, port: int) -> socket.socket:
    """The console's socket, bound and listening (connections wait in the backlog until
    uvicorn has started); a port in use or out of range, or an unknown host, is a
    ConfigurationError saying which."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ConfigurationError(f"cannot serve the console on {host}:{port}: {exc}") from exc
    return sock
