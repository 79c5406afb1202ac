"""Shared fixtures: one embedded PostgreSQL per test session, a fresh database per test.

The databases come from the package's own testing kit (``processgpt_sync.testing``, whose
pytest plugin provides ``processgpt_databases``): the schema is applied once to a template
database; each test gets ``CREATE DATABASE ... TEMPLATE`` (about 20 ms), dropped afterwards.

``--schema platform`` (or ``PROCESSGPT_TEST_SCHEMA=platform``) runs the tests on a ProcessGPT
platform database instead: ``tests/fixtures/platform_schema.sql`` with ``init-db`` applied on top,
as a user would. Its "empty" database then holds the platform's tables without processgpt-sync.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from processgpt_sync.storage.postgres import PostgresStorage
from processgpt_sync.testing import EmbeddedDatabases
from processgpt_sync.testing.databases import TEMPLATE

SCHEMAS = ("ours", "platform")
_SCHEMA_FROM_ENV = os.environ.get("PROCESSGPT_TEST_SCHEMA") or "ours"
for _name in list(os.environ):
    if (_name.startswith(("PROCESSGPT_", "SUPABASE_"))
            or _name in ("DATABASE_URL", "SERVICE_ROLE_KEY")):
        del os.environ[_name]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SUPABASE_ROLES_SQL = FIXTURES / "supabase_roles.sql"
PLATFORM_SQL = FIXTURES / "platform_schema.sql"
UPSTREAM_LEASE_SQL = FIXTURES / "upstream_lease.sql"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--schema", choices=SCHEMAS, default=_SCHEMA_FROM_ENV,
        help="database shape the tests run on: processgpt-sync's own schema (ours) or a "
             "ProcessGPT platform database with init-db applied (platform)")


def pytest_report_header(config: pytest.Config) -> str:
    return f"database schema: {config.getoption('--schema')}"


@pytest.fixture(scope="session")
def schema(request: pytest.FixtureRequest) -> str:
    """Which database shape this session runs on: "ours" or "platform"."""
    return str(request.config.getoption("--schema"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give each run its own temporary root: pytest's shared numbered folders are pruned by
    other runs on the same machine, which would delete a running embedded server's data."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="processgpt-sync-tests-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


_OWN_BASETEMP = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def pg_url(processgpt_databases: EmbeddedDatabases) -> str:
    """The embedded server's maintenance database."""
    return processgpt_databases.url


@pytest.fixture(scope="session")
def template(processgpt_databases: EmbeddedDatabases, schema: str) -> str:
    if schema == "platform":
        return processgpt_databases.template(f"{TEMPLATE}_platform", SUPABASE_ROLES_SQL,
                                             PLATFORM_SQL)
    return TEMPLATE


@pytest.fixture(scope="session")
def platform_bare_template(processgpt_databases: EmbeddedDatabases) -> str:
    return processgpt_databases.template(f"{TEMPLATE}_platform_bare", SUPABASE_ROLES_SQL,
                                         PLATFORM_SQL, install=False)


@pytest.fixture(scope="session")
def upstream_template(processgpt_databases: EmbeddedDatabases) -> str:
    return processgpt_databases.template(f"{TEMPLATE}_upstream", SUPABASE_ROLES_SQL, PLATFORM_SQL,
                                         UPSTREAM_LEASE_SQL)


@pytest.fixture
def empty_database_url(processgpt_databases: EmbeddedDatabases, schema: str,
                       request: pytest.FixtureRequest) -> Iterator[str]:
    """A database without processgpt-sync: nothing at all, or the platform's bare tables."""
    source = request.getfixturevalue("platform_bare_template") if schema == "platform" else None
    with processgpt_databases.database(schema=False, template=source) as url:
        yield url


@pytest.fixture
def platform_database_url(processgpt_databases: EmbeddedDatabases,
                          platform_bare_template: str) -> Iterator[str]:
    """A ProcessGPT platform database without processgpt-sync, whatever ``--schema`` says."""
    with processgpt_databases.database(template=platform_bare_template) as url:
        yield url


@pytest.fixture
def upstream_database_url(processgpt_databases: EmbeddedDatabases,
                          upstream_template: str) -> Iterator[str]:
    """A platform database with upstream's lease functions and processgpt-sync installed."""
    with processgpt_databases.database(template=upstream_template) as url:
        yield url


@pytest.fixture
def database_url(processgpt_databases: EmbeddedDatabases, template: str) -> Iterator[str]:
    """A fresh database with the processgpt-sync schema installed (on ``--schema``'s shape)."""
    with processgpt_databases.database(template=template) as url:
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit connection to the test database, rows as dicts."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def storage(database_url: str) -> Iterator[PostgresStorage]:
    store = PostgresStorage(database_url, max_connections=12)
    yield store
    store.close()


def open_backend(name: str, database_url: str) -> Iterator[Any]:
    """A storage of backend ``name`` on ``database_url``: Postgres directly, or Supabase through
    supabase-py and the PostgREST-protocol test gateway."""
    if name == "postgres":
        store: Any = PostgresStorage(database_url, max_connections=12)
        yield store
        store.close()
        return
    from processgpt_sync.storage.supabase import SupabaseStorage
    from tests.postgrest_gateway import SERVICE_KEY, Gateway

    gateway = Gateway(database_url)
    store = SupabaseStorage(gateway.url, SERVICE_KEY)
    store.gateway = gateway
    yield store
    store.close()
    gateway.close()


def as_nobody_with_threads(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a subprocess that may start at most ``limit`` threads (as ``ulimit
    -u`` or a container's pids limit would allow): RLIMIT_NPROC binds only a user other than
    root, so the child runs as nobody. Nobody keeps one capability, to read and search any
    directory, so that it can run an interpreter installed where only root may look (a
    ``/root`` of mode 700); nothing else of root's."""
    def preexec() -> None:
        _keep_capabilities(True)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        _keep_only(CAP_DAC_READ_SEARCH)
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))

    return preexec


CAP_DAC_READ_SEARCH = 2  # linux/capability.h
_PR_SET_KEEPCAPS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 8, 47, 2  # linux/prctl.h
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc_call(name: str, *args: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _keep_capabilities(keep: bool) -> None:
    """Keep the permitted capabilities across the coming setuid (prctl PR_SET_KEEPCAPS)."""
    _libc_call("prctl", _PR_SET_KEEPCAPS, int(keep), 0, 0, 0)


def _keep_only(capability: int) -> None:
    """Drop every capability but ``capability``, and make it ambient, so that it survives the
    exec of a program that has no file capabilities."""
    bit = 1 << capability
    data = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))
    _libc_call("capset", ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), data)
    _libc_call("prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, capability, 0, 0)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def lock_the_todo_during_a_wait_for_work(store: Any, database_url: str, todo_id: str) -> None:
    """A person locks the todo's row, waiting 500 ms at most, while the storage's wait for
    work (3 s) runs: raises ``LockNotAvailable`` if the wait holds the row."""
    waits = threading.Thread(target=store.wait_for_work, kwargs={
        "agent_orch": "nothing-here", "consumer": "w1", "seconds": 3})
    waits.start()
    time.sleep(1.0)
    try:
        with psycopg.connect(database_url) as person:
            person.execute("SET lock_timeout = '500ms'")
            person.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (todo_id,))
    finally:
        waits.join(10)


def deeper_than_python_reads(*depths: int) -> str:
    """A JSON array nested more deeply than this Python's ``json.loads`` reads (about 1,000
    levels on CPython 3.11; later versions read more), at the first of ``depths`` that is;
    the test is skipped where none is."""
    for depth in depths or (5_000, 9_000):  # PostgreSQL keeps these on its default stack
        text = "[" * depth + "]" * depth
        try:
            json.loads(text)
        except RecursionError:
            return text
    pytest.skip(f"this Python's json reads {depth} levels")


@pytest.fixture
def deep_json_text() -> str:
    """See ``deeper_than_python_reads``."""
    return deeper_than_python_reads()
