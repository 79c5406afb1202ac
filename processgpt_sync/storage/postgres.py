"""PostgreSQL backend: psycopg 3 + psycopg_pool, named queries, LISTEN/NOTIFY."""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.types.json import Jsonb

from ..errors import ConfigurationError, SchemaMissing, StorageError, StorageUnavailable
from ..queries import SCHEMA_FILES, queries, read_sql
from .base import INSTALL_HINT, Storage

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10  # seconds to open one connection
POOL_TIMEOUT = 15.0  # seconds to wait for a pooled connection before reporting an outage
_JSONB_PARAM = re.compile(r"%\((\w+)\)s::jsonb")
_MISSING_SCHEMA_STATES = {"42883", "42P01", "42704"}  # undefined function / table / object
# A transaction aborted for another's sake (deadlock, serialisation, a lock wait given up):
# psycopg raises these as OperationalError, so they are StorageUnavailable and retried.
_BUSY_STATES = {"40P01", "40001", "55P03"}
INSTALL_LOCK_TIMEOUT = 3  # seconds the schema install waits for one table lock per attempt
INSTALL_ATTEMPTS = 20


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and error messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", re.sub(r"password=\S+", "password=***", url))


@contextmanager
def wrap_exceptions(target: str = "") -> Iterator[None]:
    """Turn psycopg errors into the library's own, with a message that says what to do."""
    where = f" ({target})" if target else ""
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise StorageUnavailable(f"no database connection available{where}: {exc}") from exc
    except psycopg.OperationalError as exc:
        raise StorageUnavailable(
            f"database unreachable{where}: {str(exc).strip()}", code=exc.sqlstate
        ) from exc
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:  # raised by libpq before any query: a malformed conninfo
            raise ConfigurationError(f"invalid database URL{where}: {exc}") from exc
        raise _storage_error(exc) from exc
    except psycopg.Error as exc:
        raise _storage_error(exc) from exc


def _storage_error(exc: psycopg.Error) -> StorageError:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if exc.sqlstate in _MISSING_SCHEMA_STATES:
        return SchemaMissing(
            f"{message}; {INSTALL_HINT}", code=exc.sqlstate, hint=diag.message_hint
        )
    detail = f" ({diag.message_hint})" if diag.message_hint else ""
    return StorageError(f"{message}{detail}", code=exc.sqlstate, hint=diag.message_hint)


# What init-db reports: every table, column (with its type), enum label, index, trigger and
# function of the current schema, as {description: column type or ""}.
_CATALOG = """
SELECT 'table ' || c.relname, '' FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
  AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'enum value ' || t.typname || '.' || e.enumlabel, '' FROM pg_enum e
JOIN pg_type t ON t.oid = e.enumtypid WHERE t.typnamespace = current_schema()::regnamespace
UNION ALL
SELECT 'index ' || c.relname, '' FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'i'
UNION ALL
SELECT 'trigger ' || g.tgname || ' on ' || c.relname, '' FROM pg_trigger g
JOIN pg_class c ON c.oid = g.tgrelid
WHERE c.relnamespace = current_schema()::regnamespace AND NOT g.tgisinternal
UNION ALL
SELECT 'function ' || p.oid::regprocedure::text, '' FROM pg_proc p
WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'processgpt\\_sync\\_%'
"""


def _catalog(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {str(name): str(kind) for name, kind in conn.execute(_CATALOG).fetchall()}


def _additions(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What ``after`` adds to ``before``; StorageError if an existing column changed its type."""
    changed = [f"{name}: {before[name]} -> {kind}" for name, kind in after.items()
               if name in before and before[name] != kind]
    if changed:
        raise StorageError("the schema would change existing column types, so nothing was "
                           f"installed: {'; '.join(sorted(changed))}")
    return sorted(f"add {name}" + (f" {kind}" if kind else "")
                  for name, kind in after.items() if name not in before)


def schema_version() -> str:
    """A digest of the shipped schema files: what ``install_schema`` records once applied."""
    digest = hashlib.sha256()
    for name in SCHEMA_FILES:
        digest.update(read_sql(name).encode())
    return f"processgpt-sync schema {digest.hexdigest()[:16]}"


def install_schema(conninfo: str, *, if_changed: bool = False, dry_run: bool = False,
                   added: list[str] | None = None) -> bool:
    """Apply sql/schema.sql and sql/functions.sql (idempotent; safe with concurrent callers).

    One transaction; it only adds. ``added`` receives what it added, one line each ("add column
    todolist.claim_token uuid", ...); with ``dry_run`` the transaction is rolled back, so it says
    what would be added. A column whose type would change (never intended) stops the install with
    StorageError and nothing is changed.

    The DDL takes strong locks on todolist and events: on a busy database it waits behind
    running statements, and every claim queues behind it. So it gives up a lock wait after
    ``INSTALL_LOCK_TIMEOUT`` and tries again, instead of stalling (or deadlocking) the fleet.

    :param if_changed: skip when this exact version is installed already (server start-up).
    :returns: whether the schema was applied.
    """
    version = schema_version()
    attempt = 0
    while True:
        attempt += 1
        try:
            with wrap_exceptions(redact(conninfo)):
                with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT) as conn:
                    if if_changed and _installed_version(conn) == version:
                        return False
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext('processgpt_sync_schema'))")
                    if if_changed and _installed_version(conn) == version:
                        return False  # another process installed it while we waited
                    conn.execute(f"SET LOCAL lock_timeout = '{INSTALL_LOCK_TIMEOUT}s'")
                    before = _catalog(conn)
                    for name in SCHEMA_FILES:
                        conn.execute(read_sql(name).encode())
                    conn.execute(sql.SQL("COMMENT ON FUNCTION processgpt_sync_schema_v1() IS {}")
                                 .format(sql.Literal(version)))
                    additions = _additions(before, _catalog(conn))
                    if dry_run:
                        conn.rollback()
                    else:
                        conn.commit()
        except StorageUnavailable as exc:
            if exc.code not in _BUSY_STATES or attempt == INSTALL_ATTEMPTS:
                raise
            logger.info("schema install waited too long for a lock on a busy database "
                        "(attempt %d), retrying", attempt, extra={"action": "init_db"})
            time.sleep(random.uniform(0.1, 0.5) * attempt)
            continue
        if added is not None:
            added[:] = additions
        if dry_run:
            return False
        logger.info("schema installed (%d additions)", len(additions),
                    extra={"action": "init_db"})
        return True


def _installed_version(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute("SELECT obj_description(to_regprocedure('processgpt_sync_schema_v1()'), "
                       "'pg_proc')").fetchone()
    return None if row is None else row[0]


class PostgresStorage(Storage):
    """Talks to PostgreSQL through a connection pool; one SQL function call per request."""

    backend = "postgres"

    def __init__(self, conninfo: str, *, max_connections: int = 8, prepare: bool = True) -> None:
        """:param prepare: use server-side prepared statements (not behind a transaction
        pooler)."""
        self.conninfo = conninfo
        self.prepare = prepare
        self._pool = psycopg_pool.ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(2, max_connections),
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
                    "prepare_threshold": 5 if prepare else None},
            timeout=POOL_TIMEOUT,
            name="processgpt-sync",
            open=False,
        )
        self._pool.open(wait=False)

    def __repr__(self) -> str:
        return f"PostgresStorage({redact(self.conninfo)!r})"

    def call(self, query: str, params: Mapping[str, Any]) -> Any:
        text = queries()[query]
        values = {
            key: Jsonb(value) if key in _jsonb_params(query) else value
            for key, value in params.items()
        }
        with wrap_exceptions(query), self._pool.connection() as conn:
            row = conn.execute(text, values).fetchone()
        return None if row is None else row[0]

    def ping(self) -> None:
        """Open one connection now, so a wrong URL fails at start with a clear message."""
        with wrap_exceptions(redact(self.conninfo)):
            psycopg.connect(self.conninfo, connect_timeout=CONNECT_TIMEOUT).close()

    def check_schema(self) -> None:
        self.ping()
        super().check_schema()

    def listener(self, channels: Sequence[str]) -> PostgresListener:
        return PostgresListener(self.conninfo, channels)

    def close(self) -> None:
        self._pool.close()


def _jsonb_params(query: str) -> frozenset[str]:
    return frozenset(_JSONB_PARAM.findall(queries()[query]))


class PostgresListener:
    """A dedicated LISTEN connection (``notifies()`` holds its connection's lock while waiting)."""

    def __init__(self, conninfo: str, channels: Sequence[str]) -> None:
        self._conninfo = conninfo
        self._channels = list(channels)
        self._conn: psycopg.Connection[Any] | None = None

    def connect(self) -> None:
        """(Re)open the connection and LISTEN on every channel."""
        self.close()
        with wrap_exceptions("listen"):
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
            for channel in self._channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._conn = conn

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

    def probe(self) -> bool:
        """Ask the server whether this connection still listens on every channel (a listener
        can die silently, or sit behind a pooler that ignores LISTEN)."""
        if self._conn is None or self._conn.closed:
            return False
        with wrap_exceptions("listen probe"):
            rows = self._conn.execute("SELECT pg_listening_channels()").fetchall()
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
