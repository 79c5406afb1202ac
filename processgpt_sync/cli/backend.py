"""Which database a command uses: ``--database-url``, else ``$DATABASE_URL``, else Supabase
(``$SUPABASE_URL`` and its key), else the embedded PostgreSQL.

Owns the choice and the opening; the commands own what they read and write. Must not print:
a wrong configuration is raised as an error for ``main`` to report.
"""

from __future__ import annotations

import argparse
import os

from ..settings import check_backend, environment_connection_options, supabase_key_from
from ..storage import Storage, connect


def backend_urls(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """The database URL, Supabase URL and Supabase key this command uses, checked: a partial
    Supabase configuration is an error rather than a silent switch to the embedded database."""
    database_url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    supabase_url = getattr(args, "supabase_url", None) or os.environ.get("SUPABASE_URL")
    supabase_key = supabase_key_from(os.environ)
    check_backend(database_url, supabase_url, supabase_key)
    return database_url, supabase_url, supabase_key


def connect_storage(args: argparse.Namespace) -> Storage:
    """The configured backend, not yet checked (``health`` checks it step by step)."""
    database_url, supabase_url, supabase_key = backend_urls(args)
    return connect(
        database_url=database_url,
        supabase_url=supabase_url,
        supabase_key=supabase_key,
        embedded_dir=os.environ.get("PROCESSGPT_EMBEDDED_DIR"),
        **environment_connection_options(os.environ, database_url),
    )


def checked_storage(args: argparse.Namespace) -> Storage:
    """The configured backend, checked now: unreachable or schema-less fails with one line."""
    storage = connect_storage(args)
    try:
        storage.check_schema()
    except BaseException:
        storage.close()
        raise
    return storage
