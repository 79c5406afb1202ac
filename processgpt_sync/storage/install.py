"""Installing and upgrading the schema: what ``init-db``, the embedded database and the test
fixtures call. Additive only, safe with concurrent callers and beside a busy fleet.

It never serves todos; it only applies ``sql/schema.sql`` and ``sql/functions.sql``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from typing import Any

import psycopg
from psycopg import sql

from ..errors import StorageError, StorageUnavailable
from ..queries import SCHEMA_FILES, read_sql
from .postgres import link_conninfo, redact, wrap_exceptions

logger = logging.getLogger(__name__)

BUSY_STATES = {"40P01", "40001", "55P03"}  # deadlock, serialization, lock not available
INSTALL_LOCK_TIMEOUT = 3  # seconds the schema install waits for one table lock per attempt
INSTALL_ATTEMPTS = 20
INSTALL_WAIT_FOR_OTHER = 600  # seconds an install waits for one under way elsewhere
INSTALL_IDLE_TIMEOUT = 30  # seconds an install's transaction may sit idle: its client is gone
# Whether the functions init-db's sweep calls are installed (a dry run counts with them)
_GONE_ROOTS_SWEEP_INSTALLED = (
    "to_regprocedure('processgpt_sync_gone_roots_v1()') IS NOT NULL AND "
    "to_regprocedure('processgpt_sync_cancel_under_gone_roots_v1(text[])') IS NOT NULL")

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


def _changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What ``after`` adds to ``before``, then what it dropped (only this library's own indexes
    of earlier versions, which the schema replaces, and its own functions no release calls);
    StorageError if an existing column changed its type."""
    changed = [f"{name}: {before[name]} -> {kind}" for name, kind in after.items()
               if name in before and before[name] != kind]
    if changed:
        raise StorageError("the schema would change existing column types, so nothing was "
                           f"installed: {'; '.join(sorted(changed))}")
    return (sorted(f"add {name}" + (f" {kind}" if kind else "")
                   for name, kind in after.items() if name not in before)
            + sorted(f"drop {name}" for name in before if name not in after))


def schema_version() -> str:
    """A digest of the shipped schema files: what ``install_schema`` records once applied."""
    digest = hashlib.sha256()
    for name in SCHEMA_FILES:
        digest.update(read_sql(name).encode())
    return f"processgpt-sync schema {digest.hexdigest()[:16]}"


def install_schema(conninfo: str, *, if_changed: bool = False, dry_run: bool = False,
                   added: list[str] | None = None) -> bool:
    """Apply sql/schema.sql and sql/functions.sql (idempotent; safe with concurrent callers).

    One transaction; it only adds, apart from replacing this library's own indexes of earlier
    versions and dropping its own functions that no release calls. Then, on a platform
    database with the trash, a second one cancels the todos left under process instances
    deleted for good (reported as "cancel N todos ...").
    ``added`` receives what it changed, one line each ("add column
    todolist.claim_token uuid", ..., "drop index todolist_processgpt_sync_claimable_idx"); with
    ``dry_run`` the transaction is rolled back, so it says what would change. A column whose
    type would change (never intended) stops the install with StorageError and nothing is
    changed.

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
                with psycopg.connect(link_conninfo(conninfo)) as conn:
                    if if_changed and _installed_version(conn) == version:
                        return False
                    # An installer whose link dies mid-way (a laptop's VPN) holds the tables'
                    # locks this long, not until the database's keepalives find it gone (two
                    # hours by default).
                    conn.execute("SET LOCAL idle_in_transaction_session_timeout = "
                                 f"'{INSTALL_IDLE_TIMEOUT}s'")
                    _wait_for_other_installers(conn)
                    if if_changed and _installed_version(conn) == version:
                        return False  # another process installed it while we waited
                    conn.execute(f"SET LOCAL lock_timeout = '{INSTALL_LOCK_TIMEOUT}s'")
                    before = _catalog(conn)
                    for name in SCHEMA_FILES:
                        conn.execute(read_sql(name).encode())
                    conn.execute(sql.SQL("COMMENT ON FUNCTION processgpt_sync_schema_v1() IS {}")
                                 .format(sql.Literal(version)))
                    changes = _changes(before, _catalog(conn))
                    if dry_run:
                        conn.rollback()
                    else:
                        conn.commit()
        except StorageUnavailable as exc:
            if exc.code not in BUSY_STATES:
                raise
            if attempt == INSTALL_ATTEMPTS:
                raise StorageUnavailable(
                    f"the schema install waited for a table lock {attempt} times and gave up: "
                    "a long transaction on todolist or events holds one it needs; try again "
                    f"once it ends ({exc})", code=exc.code) from exc
            logger.info("schema install waited too long for a lock on a busy database "
                        "(attempt %d), retrying", attempt, extra={"action": "init_db"})
            time.sleep(random.uniform(0.1, 0.5) * attempt)
            continue
        # in a transaction of its own, once the install's locks are released: the schema is in
        # place whatever it meets, and no claim waits on the tables while it runs
        cancelled = _cancel_under_gone_roots(conninfo, dry_run=dry_run)
        if cancelled:
            changes.append(f"cancel {cancelled} todo{'s' * (cancelled != 1)} of subprocesses "
                           "whose root process instance was deleted for good (a data change, "
                           "after the schema's)")
        if added is not None:
            added[:] = changes
        if dry_run:
            return False
        logger.info("schema installed (%d changes)", len(changes),
                    extra={"action": "init_db"})
        return True


def _cancel_under_gone_roots(conninfo: str, *, dry_run: bool = False) -> int:
    """Cancel the agent todos left under root process instances deleted for good before the
    trigger that does so was installed (or whose rows it skipped): the only data init-db
    writes, after the install, in a transaction of its own. A dry run does the same in a
    transaction it rolls back, where the installed functions exist already (on a first
    install there is nothing to count with yet). It never fails the install: an error (a lock
    held too long, a deadlock, no rights, a lost connection) leaves them to the next init-db,
    never claimed meanwhile, and is logged."""
    try:
        with psycopg.connect(link_conninfo(conninfo)) as own:
            if not dry_run:
                return _cancel_in(own)
            if own.execute(f"SELECT {_GONE_ROOTS_SWEEP_INSTALLED}").fetchone() != (True,):
                return 0
            with own.transaction(force_rollback=True):
                return _cancel_in(own)
    except psycopg.Error as exc:
        logger.warning("todos of subprocesses whose root process instance was deleted for good "
                       "were not cancelled (%s: %s); they are never claimed, and the next "
                       "init-db cancels them", exc.sqlstate or type(exc).__name__,
                       str(exc).strip(),
                       extra={"action": "init_db"})
        return 0


def _wait_for_other_installers(conn: psycopg.Connection[Any]) -> None:
    """Take the schema lock: an install under way elsewhere (another ``init-db``, a replica's
    init container, an embedded server installing at start) is waited for, as long as an
    install on a big platform database may take. The wait holds no table lock, so no claim
    waits on it."""
    conn.execute(f"SET LOCAL lock_timeout = '{INSTALL_WAIT_FOR_OTHER}s'")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('processgpt_sync_schema'))")
    except psycopg.errors.LockNotAvailable as exc:
        raise StorageUnavailable(
            f"another schema install has held the schema lock for {INSTALL_WAIT_FOR_OTHER}s "
            "(another init-db, or a server installing at start, whose transaction has not "
            "ended); try again once it ends") from exc


def _cancel_in(conn: psycopg.Connection[Any]) -> int:
    with conn.transaction():  # BEGIN ... COMMIT, or a savepoint in a dry run's transaction
        conn.execute(f"SET LOCAL lock_timeout = '{INSTALL_LOCK_TIMEOUT}s'")
        row = conn.execute("SELECT processgpt_sync_cancel_under_gone_roots_v1("
                           "processgpt_sync_gone_roots_v1())").fetchone()
    return int(row[0]) if row else 0


def _installed_version(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute("SELECT obj_description(to_regprocedure('processgpt_sync_schema_v1()'), "
                       "'pg_proc')").fetchone()
    return None if row is None else row[0]
