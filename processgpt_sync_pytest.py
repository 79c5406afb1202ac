"""pytest fixtures, registered by installing processgpt-sync (entry point ``pytest11``).

- ``processgpt_databases`` (session): an :class:`~processgpt_sync.testing.EmbeddedDatabases`
  in a temporary folder of its own, started on first use;
- ``processgpt_database_url``: a fresh database with the schema, dropped after the test;
- ``processgpt_run``: :func:`~processgpt_sync.testing.run_todo` bound to that database.

Disable with ``-p no:processgpt_sync``. pytest loads this module in every test run of an
environment where the package is installed, so it lives outside the package (importing a
module of ``processgpt_sync`` imports the whole library, about 0.2 s): the library is imported
only when a fixture is used, and other test suites neither pay for it nor import it before
their coverage starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from processgpt_sync.testing import EmbeddedDatabases, TodoRecord


@pytest.fixture(scope="session")
def processgpt_databases() -> Iterator[EmbeddedDatabases]:
    """One embedded PostgreSQL for the test session, with the schema in a template database.

    Its data lives in a folder of its own, not under pytest's numbered temporary folders, which
    other pytest runs on the machine prune while this server may still use them.
    """
    from processgpt_sync.testing import EmbeddedDatabases

    databases = EmbeddedDatabases()
    yield databases
    databases.close()


@pytest.fixture
def processgpt_database_url(processgpt_databases: EmbeddedDatabases) -> Iterator[str]:
    """A fresh database with the processgpt-sync schema, dropped after the test."""
    with processgpt_databases.database() as url:
        yield url


@pytest.fixture
def processgpt_run(processgpt_database_url: str) -> Callable[..., TodoRecord]:
    """``run_todo(executor, input, ...)`` on this test's fresh database."""
    from processgpt_sync.testing import run_todo

    return partial(run_todo, database_url=processgpt_database_url)
