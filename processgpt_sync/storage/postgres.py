"""PostgreSQL backend: psycopg 3 + psycopg_pool, named queries, LISTEN/NOTIFY."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb, set_json_loads

from ..deep_json import read_json
from ..errors import ConfigurationError, SchemaMissing, StorageError, StorageUnavailable
from ..queries import queries
from .base import (
    FOREIGN_KEY_VIOLATION,
    INSTALL_HINT,
    MISSING_SCHEMA_STATES,
    Storage,
    transient_sqlstate,
)
from .deadline import DEADLINES, DeadlineExceeded

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10  # seconds to open one connection
POOL_TIMEOUT = 15.0  # seconds to wait for a pooled connection before reporting an outage
# seconds one chain of reconnection attempts lasts: psycopg_pool doubles its wait between
# attempts (1, 2, 4, 8 s ...) for that long, so after a long outage the next attempt could be
# a minute past the heal; a short chain gives up and the next checkout starts one from 1 s
RECONNECT_WINDOW = 10.0
TCP_TIMEOUT = 10.0  # seconds of silence from the peer before a connection counts as dead
STATEMENT_TIMEOUT = 10.0  # seconds one statement may run (server side)
DEADLINE_MARGIN = 3.0  # seconds past the statement timeout before the client drops the link
PROBE_DEADLINE = 5.0  # seconds the listener's liveness probe may take
CHANNEL_CHECK_EVERY = 8  # listener probes: the first after connecting and every 8th one ask
# which channels the connection listens on (a transaction); the others only ask for an answer
UNLIMITED_DEADLINE = 300.0  # seconds a statement may take when the URL lifts statement_timeout
WAKE_TIMEOUT = 1.0  # seconds each step of waking the listener may take (at stop)
DRAIN_INTERVAL = 1.0  # seconds between two drops of every idle pooled connection
_JSONB_PARAM = re.compile(r"%\((\w+)\)s::jsonb")
_TIMEOUT_OPTION = re.compile(r"statement[_-]timeout\s*=\s*'?(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\b")
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
# admin or crash shutdown, cannot connect now, its database dropped, idle_session_timeout: the
# server ended the session, so every idle connection of the pool is as dead
_SERVER_ENDED_STATES = {"57P01", "57P02", "57P03", "57P04", "57P05"}
# A transaction aborted for another's sake (deadlock, serialisation, a lock wait given up):
# psycopg raises these as OperationalError, so they are StorageUnavailable and retried.


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and error messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", re.sub(r"password=\S+", "password=***", url))


def url_problem(exc: Exception, conninfo: str) -> str:
    """libpq's complaint about a URL it cannot parse, without the text it quotes from the
    user and password part (often the password: a stray ``%`` or space in it)."""
    secrets = re.findall(r"://([^/?#]*)@", conninfo) + re.findall(r"password\s*=\s*(\S+)",
                                                                  conninfo)

    def hide(quoted: re.Match[str]) -> str:
        text = quoted.group(1)
        return '"***"' if text and any(text in secret for secret in secrets) else quoted.group(0)

    problem = re.sub(r'"([^"]*)"', hide, str(exc).strip())
    if problem == str(exc).strip():
        return problem
    return f"{problem} (special characters in the user or password must be percent-encoded)"


@contextmanager
def wrap_exceptions(target: str = "") -> Iterator[None]:
    """Turn psycopg errors into the library's own, with a message that says what to do."""
    where = f" ({target})" if target else ""
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise StorageUnavailable(f"no database connection available{where}: {exc}") from exc
    except DeadlineExceeded as exc:
        raise StorageUnavailable(str(exc)) from exc
    except psycopg.OperationalError as exc:
        if exc.sqlstate is not None and not transient_sqlstate(exc.sqlstate):
            raise _storage_error(exc) from exc  # a refusal (an index row too large), for good
        raise StorageUnavailable(
            f"database unreachable{where}: {str(exc).strip()}", code=exc.sqlstate
        ) from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise StorageUnavailable(
            f"the database is read-only{where} (a failover under way, or the URL names a "
            f"replica): {str(exc).strip()}", code=exc.sqlstate) from exc
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:  # refused by the driver before it reached the database (a
            # value it cannot send); the URL was parsed, and any problem named, at the start
            raise StorageError(f"the database driver refused the call{where}: {exc}") from exc
        raise _storage_error(exc) from exc
    except psycopg.Error as exc:
        raise _storage_error(exc) from exc


def _storage_error(exc: psycopg.Error) -> StorageError:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if exc.sqlstate in MISSING_SCHEMA_STATES:
        return SchemaMissing(
            f"{message}; {INSTALL_HINT}", code=exc.sqlstate, hint=diag.message_hint
        )
    if exc.sqlstate == FOREIGN_KEY_VIOLATION and diag.message_detail:
        message = f"{message}: {diag.message_detail}"
    detail = f" ({diag.message_hint})" if diag.message_hint else ""
    return StorageError(f"{message}{detail}", code=exc.sqlstate, hint=diag.message_hint)


def link_conninfo(conninfo: str, *, tcp_timeout: float = TCP_TIMEOUT) -> str:
    """``conninfo`` with dead-peer detection added: TCP keepalives, ``tcp_user_timeout`` and
    ``connect_timeout``. Whatever the URL (or PGCONNECT_TIMEOUT) sets explicitly wins.

    With the default 10 s an idle connection to a vanished peer is found dead after about
    11 s (keepalive idle 5 s + 3 probes 2 s apart), a busy one after 10 s unacknowledged.
    """
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"invalid database URL: {url_problem(exc, conninfo)}") from exc
    defaults: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": max(1, round(tcp_timeout / 2)),
        "keepalives_interval": max(1, round(tcp_timeout / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": int(tcp_timeout * 1000),
    }
    if not os.environ.get("PGCONNECT_TIMEOUT"):
        defaults["connect_timeout"] = CONNECT_TIMEOUT
    added = {key: value for key, value in defaults.items() if key not in given}
    return make_conninfo(conninfo, **added) if added else conninfo


def sets_statement_timeout(conninfo: str) -> bool:
    """True when the URL (``options``) or PGOPTIONS already sets statement_timeout."""
    return "statement_timeout" in _options(conninfo)


def given_statement_timeout(conninfo: str) -> float | None:
    """The statement_timeout in seconds the URL (``options``) or PGOPTIONS sets, in a form
    PostgreSQL reads (milliseconds, or with a unit); 0 when it lifts the limit, None when it
    sets none."""
    found = _TIMEOUT_OPTION.findall(_options(conninfo))
    if not found:
        return None
    number, unit = found[-1]  # the last one wins, as in PostgreSQL
    return float(number) * _TIME_UNITS[unit or "ms"]


def _options(conninfo: str) -> str:
    """The server options a connection gets: the URL's, else PGOPTIONS (libpq reads the
    environment only for what the URL leaves out)."""
    given = str(conninfo_to_dict(conninfo).get("options") or "")
    return given or os.environ.get("PGOPTIONS", "")


class PostgresStorage(Storage):
    """Talks to PostgreSQL through a connection pool; one SQL function call per request."""

    backend = "postgres"

    def __init__(
        self,
        conninfo: str,
        *,
        max_connections: int = 8,
        prepare: bool = True,
        statement_timeout: float | None = STATEMENT_TIMEOUT,
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> None:
        """:param prepare: use server-side prepared statements (not behind a transaction
        pooler).
        :param statement_timeout: seconds one statement may run, set on each connection
            unless the URL sets it (None: not set); the client drops a connection that has
            not answered ``DEADLINE_MARGIN`` seconds later.
        :param tcp_timeout: seconds of silence before a connection counts as dead."""
        self.conninfo = conninfo
        self.prepare = prepare
        self._link = link_conninfo(conninfo, tcp_timeout=tcp_timeout)
        user_timeout = sets_statement_timeout(conninfo)
        self._statement_ms = (
            None if statement_timeout is None or user_timeout or not prepare
            else int(statement_timeout * 1000))  # behind a transaction pooler SET is lost
        # the client gives a statement as long as the server does (a URL that lifts the
        # server's limit still gets a last-resort deadline against a path that never answers)
        limit = given_statement_timeout(conninfo) if user_timeout else statement_timeout
        self.deadline = (UNLIMITED_DEADLINE if limit == 0
                         else (limit or STATEMENT_TIMEOUT) + DEADLINE_MARGIN)
        self._drain_lock = threading.Lock()
        self._drained = 0.0
        self._pool = psycopg_pool.ConnectionPool(
            self._link,
            min_size=1,
            max_size=max(2, max_connections),
            kwargs={"autocommit": True, "prepare_threshold": 5 if prepare else None},
            configure=self._configure,
            timeout=POOL_TIMEOUT,
            reconnect_timeout=RECONNECT_WINDOW,
            name="processgpt-sync",
            open=False,
        )
        self._pool.open(wait=False)

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Claims and writes rely on READ COMMITTED (a lock waited for, then the rows as they
        are now), so a database or role whose default is stricter must not apply here.
        JSON is read by ``read_json``: a claimed row nested too deeply for ``json.loads`` fails
        its own todo, not the claim that brought it and the todos claimed with it."""
        set_json_loads(read_json, conn)
        if not self.prepare:  # behind a transaction pooler a SET is lost: claims check it
            return
        settings = {"default_transaction_isolation": "read committed"}
        if self._statement_ms is not None:
            settings["statement_timeout"] = f"{self._statement_ms}ms"
            if self._statement_ms:
                # a row another transaction holds (the platform's trigger waits on the process
                # instance's) ends the wait as a lock timeout, an outage retried until it is
                # free, before the statement timeout would take the write for a heavy one
                settings["lock_timeout"] = f"{max(1, self._statement_ms // 2)}ms"
        calls = ", ".join("set_config(%s, %s, false)" for _ in settings)
        # before its statement_timeout applies, on a link that may have gone silent since the
        # handshake: unwatched, the pool's worker opening it would wait for ever
        with _watched(conn, PROBE_DEADLINE, "configure", self):
            conn.execute(f"SELECT {calls}", [item for pair in settings.items() for item in pair])

    def __repr__(self) -> str:
        return f"PostgresStorage({redact(self.conninfo)!r})"

    def call(self, query: str, params: Mapping[str, Any]) -> Any:
        text = queries()[query]
        wrapped = _jsonb_params(query)
        values = {
            key: Jsonb(value) if key in wrapped else value for key, value in params.items()
        }
        try:
            with wrap_exceptions(query), self._pool.connection() as conn:
                with _watched(conn, self.deadline, query, self):
                    row = conn.execute(text, values).fetchone()
        except StorageUnavailable as exc:
            if isinstance(exc.__cause__, DeadlineExceeded) or conn_broken(exc):
                self._drop_idle_connections()
            raise
        self.last_success = time.monotonic()
        return None if row is None else row[0]

    def _drop_idle_connections(self) -> None:
        """One connection died: the idle ones went through the same network path, so replace
        them all rather than find each dead one by waiting on it."""
        now = time.monotonic()
        with self._drain_lock:
            if now - self._drained < DRAIN_INTERVAL:
                return
            self._drained = now
        drain = getattr(self._pool, "drain", None)  # psycopg_pool >= 3.3
        if drain is not None:
            logger.info("a database connection died: replacing the idle ones",
                        extra={"action": "pool"})
            drain()

    def ping(self) -> None:
        """Open one connection now, so a wrong URL fails at start with a clear message."""
        with wrap_exceptions(redact(self.conninfo)):
            psycopg.connect(self._link).close()
        self.last_success = time.monotonic()

    def check_schema(self) -> None:
        self.ping()
        super().check_schema()

    def listener(self, channels: Sequence[str]) -> PostgresListener:
        return PostgresListener(self._link, channels, on_dead=self._listener_died,
                                notify=self._notify)

    def _notify(self, channel: str) -> None:
        """NOTIFY ``channel`` on a pooled connection (the listener's own is busy waiting),
        within about a second: it only saves a wait that ends on its own."""
        with wrap_exceptions("notify"), self._pool.connection(timeout=WAKE_TIMEOUT) as conn:
            with _watched(conn, WAKE_TIMEOUT, "notify", self):
                conn.execute("SELECT pg_notify(%s, '')", (channel,))

    def _listener_died(self, silent: bool) -> None:
        """The LISTEN connection died; when it went silent (no answer, rather than closed),
        statements in flight on the same path are as good as dead: end them now."""
        if silent and DEADLINES.expire(self):
            logger.warning("the listener's connection went silent: ending the statements in "
                           "flight on the same path", extra={"action": "pool"})
        self._drop_idle_connections()

    def close(self) -> None:
        self._pool.close()


def conn_broken(exc: BaseException) -> bool:
    """True when ``exc`` came from a connection that is unusable now (not a server refusal):
    dropped, ended by the server (a restart, a terminated backend), or left on a server that
    turned read-only (a failover: a new connection reaches the new primary)."""
    cause = exc.__cause__
    if isinstance(cause, (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)):
        return False
    if isinstance(cause, psycopg.errors.ReadOnlySqlTransaction):
        return True
    if not isinstance(cause, psycopg.OperationalError):
        return False
    state = cause.sqlstate
    return state is None or state.startswith("08") or state in _SERVER_ENDED_STATES


@cache
def _jsonb_params(query: str) -> frozenset[str]:
    """The parameters of a named query passed as jsonb (found once per query)."""
    return frozenset(_JSONB_PARAM.findall(queries()[query]))


@contextmanager
def _watched(conn: psycopg.Connection[Any], seconds: float, what: str,
             owner: object) -> Iterator[None]:
    """``DEADLINES.watch`` on ``conn``'s socket. A connection whose socket the deadline shut
    down is closed however the block ended (answered just then, or an error buffered before):
    the pool never hands it to another caller, whose statement would fail on it."""
    with DEADLINES.watch(conn.fileno(), seconds, what, owner) as watch:
        try:
            yield
        finally:
            if watch.fired and not conn.closed:
                conn.close()


class PostgresListener:
    """A dedicated LISTEN connection (``notifies()`` holds its connection's lock while waiting)."""

    def __init__(self, conninfo: str, channels: Sequence[str], *,
                 on_dead: Callable[[bool], None] | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        """:param on_dead: called when the probe finds the connection dead, with True when it
        went silent (the pool's connections likely went the same way).
        :param notify: sends a NOTIFY on another connection: ``wake`` uses it on a channel
            only this listener listens on."""
        self._conninfo = conninfo
        self._wake_channel = f"processgpt_sync_wake_{uuid.uuid4().hex}"
        self._channels = [*channels, self._wake_channel]
        self._notify = notify
        self._on_dead = on_dead
        self._conn: psycopg.Connection[Any] | None = None
        self._probes = 0

    def connect(self) -> None:
        """(Re)open the connection and LISTEN on every channel."""
        self.close()
        with wrap_exceptions("listen"):
            conn = psycopg.connect(self._conninfo, autocommit=True)
            try:
                with DEADLINES.watch(conn.fileno(), PROBE_DEADLINE, "LISTEN"):
                    for channel in self._channels:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            except BaseException:
                conn.close()
                raise
        self._conn = conn
        self._probes = 0

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        if self._conn is None or self._conn.closed:
            self.connect()
        assert self._conn is not None
        try:
            with wrap_exceptions("listen"):
                return [
                    (n.channel, n.payload)
                    for n in self._conn.notifies(timeout=timeout, stop_after=1)
                ]
        except StorageUnavailable:
            self.close()
            raise

    def wake(self) -> None:
        """Make a wait in progress return now, through a NOTIFY on this listener's own
        channel; without one, the wait ends within its timeout."""
        if self._notify is not None and self._conn is not None and not self._conn.closed:
            try:
                self._notify(self._wake_channel)
            except StorageError as exc:
                logger.debug("waking the listener failed: %s", exc)

    def probe(self) -> bool:
        """Check that the server still answers on this connection (a listener can die
        silently) and, on the first probe and every ``CHANNEL_CHECK_EVERY``-th, that it still
        listens on every channel (a pooler may ignore LISTEN). The other probes send only a
        protocol Sync: a round trip that starts no transaction (any statement, even an empty
        one, would be one), so an idle server costs the database less."""
        if self._conn is None or self._conn.closed:
            return False
        conn = self._conn
        check_channels = (self._probes % CHANNEL_CHECK_EVERY == 0
                          or not psycopg.Pipeline.is_supported())
        self._probes += 1
        try:
            with wrap_exceptions("listen probe"):
                with DEADLINES.watch(conn.fileno(), PROBE_DEADLINE, "the listener probe"):
                    if not check_channels:
                        with conn.pipeline():
                            pass  # leaving it sends a Sync and waits for ReadyForQuery
                        return True
                    rows = conn.execute("SELECT pg_listening_channels()").fetchall()
        except StorageUnavailable as exc:
            self.close()
            if self._on_dead is not None:
                self._on_dead(isinstance(exc.__cause__, DeadlineExceeded))
            raise
        return {row[0] for row in rows} >= set(self._channels)

    def backend_pid(self) -> int | None:
        return None if self._conn is None or self._conn.closed else self._conn.info.backend_pid

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except psycopg.Error:
                logger.debug("closing the listener connection failed", exc_info=True)
