"""A fault-injecting TCP proxy on 127.0.0.1 for tests: the network failures production sees.

``FaultProxy(target)`` listens on a free loopback port and forwards every connection to
``target`` (a Unix socket path, such as the embedded PostgreSQL's, or a (host, port) pair).
Faults, switchable at any time from any thread:

- ``latency(s)``: every chunk is delayed by ``s`` seconds;
- ``stall()``: the connections open now stop forwarding for ever, both ways, and stay open
  (half-open: a NAT or load balancer lost their state); new connections work;
- ``partition()``: nothing is forwarded on any connection, old or new, until ``heal()``
  (new connections are accepted by the kernel but never reach the target);
- ``reset()``: the open connections are closed with a TCP RST;
- ``refuse()``: new connections are refused (nothing listens) until ``heal()``.

Bounded: at most ``max_connections`` at once (more are closed at once), loopback only, one
event loop thread, everything closed by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

CHUNK = 65536
GATE_POLL = 0.02  # seconds between checks of a closed gate


class _Link:
    """One proxied connection: the client's side, the target's side, and whether it is dead."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.stalled = False
        self.tasks: list[asyncio.Task[None]] = []


class FaultProxy:
    def __init__(self, target: str | tuple[str, int], *, max_connections: int = 200) -> None:
        self.target = target
        self.max_connections = max_connections
        self.delay = 0.0
        self.partitioned = False
        self.refusing = False
        self.accepted = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._thread.start()
        self.port = 0
        self._run(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    # -- faults (call from any thread) -------------------------------------------------------

    def latency(self, seconds: float) -> None:
        self.delay = seconds

    def stall(self) -> int:
        """Half-open every connection open now; return how many."""
        return self._run(self._stall())

    def partition(self) -> None:
        self.partitioned = True

    def reset(self) -> int:
        """Close every open connection with a RST; return how many."""
        return self._run(self._reset())

    def refuse(self) -> None:
        self.refusing = True
        self._run(self._unlisten())

    def heal(self) -> None:
        """End a partition, refusal and latency (stalled connections stay dead)."""
        self.partitioned = False
        self.delay = 0.0
        if self.refusing:
            self.refusing = False
            self._run(self._listen())

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def close(self) -> None:
        self._run(self._unlisten())
        self._run(self._reset())
        self._run(self._cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    # -- URLs --------------------------------------------------------------------------------

    def url_for(self, conninfo: str) -> str:
        """``conninfo`` pointed at this proxy (host 127.0.0.1, our port)."""
        params = conninfo_to_dict(conninfo)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    @staticmethod
    def socket_of(conninfo: str) -> str:
        """The Unix socket path a libpq conninfo with a directory ``host`` connects to."""
        params = conninfo_to_dict(conninfo)
        return f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}"

    # -- inside the loop ---------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stall(self) -> int:
        for link in self._links:
            link.stalled = True
        return len(self._links)

    async def _reset(self) -> int:
        links = list(self._links)
        for link in links:
            for writer in (link.client, link.upstream):
                if writer is None:
                    continue
                sock = writer.get_extra_info("socket")
                if sock is not None and sock.family != socket.AF_UNIX and sock.fileno() >= 0:
                    with contextlib.suppress(OSError):  # already closed by its peer
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                writer.transport.abort()
            for task in link.tasks:
                task.cancel()
        self._links.difference_update(links)
        return len(links)

    async def _gate(self, link: _Link) -> None:
        """Wait while this link may not forward."""
        while link.stalled or self.partitioned:
            await asyncio.sleep(GATE_POLL)
        if self.delay:
            await asyncio.sleep(self.delay)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._links) >= self.max_connections:
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._gate(link)  # a partition: the target is never reached
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            link.upstream = up_writer
            link.tasks = [asyncio.ensure_future(self._pump(link, reader, up_writer)),
                          asyncio.ensure_future(self._pump(link, up_reader, writer))]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            for side in (writer, link.upstream):
                if side is not None:
                    side.transport.abort()

    async def _pump(self, link: _Link, source: asyncio.StreamReader,
                    sink: asyncio.StreamWriter) -> None:
        while True:
            data = await source.read(CHUNK)
            await self._gate(link)
            if not data:
                break
            sink.write(data)
            await sink.drain()
        # One side closed cleanly: close the other (nothing is forwarded once stalled).
        for task in link.tasks:
            task.cancel()
