"""Throw-away databases for tests: one embedded PostgreSQL, a template holding the schema, and
a fresh clone of it per test (``CREATE DATABASE ... TEMPLATE`` takes 130 to 180 ms on a 2-core
machine, installing the schema each time would take far longer). The next clone of each
template is made while the test runs, so a test does not wait for its own."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .. import embedded
from ..errors import ConfigurationError
from ..storage.install import install_schema

TEMPLATE = "processgpt_sync_template"
SPARE_WAIT = 5.0  # seconds close() waits for a clone being made to end

logger = logging.getLogger(__name__)


class EmbeddedDatabases:
    """An embedded PostgreSQL that hands out fresh databases, with or without the schema.

    ``directory`` is the server's data folder; by default a temporary one, removed on
    :meth:`close`. A given one must be this object's alone: :meth:`start` rebuilds the template
    there and :meth:`close` stops that server. Use it as a context manager, or call
    :meth:`start` and :meth:`close`; with ``close_at_exit``, :meth:`close` also runs at
    interpreter exit.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 close_at_exit: bool = False) -> None:
        self._close_at_exit = close_at_exit
        self._owned_dir: str | None = None
        if directory is None:
            self._owned_dir = tempfile.mkdtemp(prefix="processgpt-sync-test-")
            directory = Path(self._owned_dir) / "pgdata"
        if close_at_exit:  # the folder, even if no server ever starts (start adds the server)
            atexit.register(self.close)
        self.directory = Path(directory)
        self._url: str | None = None
        self._templates: set[str] = set()
        self._lock = threading.Lock()
        # A clone made ahead for each source last asked for (None: an empty database), by a
        # thread of its own; it stops for good at its first failure (the clone is then made
        # as it is asked for, as before).
        self._spares: dict[str | None, str] = {}
        self._wanted: list[str | None] = []
        self._spares_ready = threading.Condition(self._lock)
        self._spare_maker: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's maintenance database URL (starts the server on first use)."""
        return self.start()._url  # type: ignore[return-value]

    def start(self) -> EmbeddedDatabases:
        """Start the server and build the template database once; idempotent."""
        with self._lock:
            if self._url is None:
                try:
                    url = embedded.start(self.directory, install=False)
                except BaseException as exc:  # failed or interrupted: the folder is this
                    # object's alone, and close() would remove it under a server left running
                    embedded.stop_if_running(self.directory)
                    if not isinstance(exc, ConfigurationError):
                        raise
                    raise ConfigurationError(
                        f"cannot start the test databases' PostgreSQL in {self.directory}: "
                        f"{exc.__cause__ or exc} (it needs a writable folder with a short path, "
                        "its socket's included: set TMPDIR to one, or pass one as "
                        "EmbeddedDatabases(directory))"
                    ) from exc
                try:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(
                            sql.Identifier(TEMPLATE)))
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(
                            sql.Identifier(TEMPLATE)))
                    install_schema(make_conninfo(url, dbname=TEMPLATE))
                except BaseException:  # close() would remove the folder under a running server
                    embedded.stop(self.directory)
                    raise
                self._url = url
                if self._close_at_exit:
                    # Registered after the embedded server's own exit handler, so it runs
                    # before it: stopping a server that handler already stopped would start
                    # it again first.
                    atexit.register(self.close)
        return self

    def template(self, name: str, *scripts: Path, install: bool = True) -> str:
        """Build (once per server) a template database of another shape: ``scripts`` run in
        order (e.g. a platform's own DDL), then the processgpt-sync schema when ``install``.
        Pass the returned name to :meth:`create` or :meth:`database`."""
        with self._lock:
            if name in self._templates:
                return name
        url = self.url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        target = make_conninfo(url, dbname=name)
        with psycopg.connect(target, autocommit=True) as conn:
            for script in scripts:
                conn.execute(script.read_text(encoding="utf-8").encode())
        if install:
            install_schema(target)
        with self._lock:
            self._templates.add(name)
        return name

    def create(self, *, schema: bool = True, template: str | None = None) -> str:
        """A new database: a copy of ``template`` (see :meth:`template`), else of the schema
        template when ``schema``, else empty; its URL."""
        source = template or (TEMPLATE if schema else None)
        url = self.url
        with self._lock:
            name = self._spares.pop(source, None)
            if source not in self._wanted:
                self._wanted.append(source)
            if self._spare_maker is None and self._url is not None:
                self._spare_maker = threading.Thread(
                    target=self._make_spares, args=(url,), daemon=True,
                    name="processgpt-sync-test-databases")
                self._spare_maker.start()
            self._spares_ready.notify_all()
        if name is None:
            name = _clone(url, source)
        return make_conninfo(url, dbname=name)

    def _make_spares(self, url: str) -> None:
        """Keep one clone ready of each source asked for, until close()."""
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    while self._spare_maker is me and all(s in self._spares
                                                          for s in self._wanted):
                        self._spares_ready.wait()
                    if self._spare_maker is not me:  # close()
                        return
                    source = next(s for s in self._wanted if s not in self._spares)
                name = _clone(url, source)
                with self._lock:
                    self._spares[source] = name
        except Exception:
            logger.warning("test databases are no longer cloned ahead; each is made when a "
                           "test asks for it", exc_info=True)

    def drop(self, url: str) -> None:
        """Drop a database made by :meth:`create`, closing its remaining connections."""
        name = conninfo_to_dict(url).get("dbname")
        if not isinstance(name, str) or not name.startswith("test_"):
            raise ValueError(f"not a database made by create(): {name!r}")
        _drop(self.url, name)

    @contextmanager
    def database(self, *, schema: bool = True, template: str | None = None) -> Iterator[str]:
        """A fresh database for the ``with`` block, dropped afterwards."""
        url = self.create(schema=schema, template=template)
        try:
            yield url
        finally:
            self.drop(url)

    def close(self) -> None:
        """Stop the server; remove its data folder when it was a temporary one."""
        with self._lock:
            maker, self._spare_maker = self._spare_maker, None  # it stops
            self._spares_ready.notify_all()
        if maker is not None:
            maker.join(SPARE_WAIT)
        with self._lock:
            spares = list(self._spares.values())
            self._spares.clear()
            if self._url is not None:
                if self._owned_dir is None:  # a folder kept: no clone left behind in it
                    for name in spares:
                        _drop(self._url, name)
                embedded.stop(self.directory)
                self._url = None
            if self._owned_dir is not None:
                shutil.rmtree(self._owned_dir, ignore_errors=True)
                self._owned_dir = None

    def __enter__(self) -> EmbeddedDatabases:
        try:
            return self.start()
        except BaseException:  # no __exit__ follows: remove the temporary folder now
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


_shared: EmbeddedDatabases | None = None
_shared_lock = threading.Lock()


def shared_databases() -> EmbeddedDatabases:
    """One :class:`EmbeddedDatabases` for this process, stopped at interpreter exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EmbeddedDatabases(close_at_exit=True)
        return _shared


@contextmanager
def fresh_database(*, schema: bool = True) -> Iterator[str]:
    """A fresh database URL on this process's shared embedded server, dropped afterwards."""
    with shared_databases().start().database(schema=schema) as url:
        yield url


def _clone(url: str, source: str | None) -> str:
    """Create a database named ``test_...`` from ``source`` (None: an empty one); its name."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if source:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(source))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(query)
    return name


def _drop(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
