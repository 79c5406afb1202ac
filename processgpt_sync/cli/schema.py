"""``processgpt-sync init-db``: install or upgrade the schema and functions, or show (dry run)
what that would add.

Owns the command's output; the SQL and the installing belong to :mod:`processgpt_sync.queries`
and the Postgres storage. Must not change a database on ``--dry-run``.
"""

from __future__ import annotations

import argparse

from .. import cli_terminal as terminal
from .. import embedded
from ..errors import ConfigurationError
from ..queries import SCHEMA_FILES, read_sql
from ..storage.install import install_schema
from .backend import backend_urls


def cmd_init_db(args: argparse.Namespace) -> int:
    url, supabase_url, _ = backend_urls(args)
    if not url and supabase_url:
        raise ConfigurationError(
            "init-db needs a direct database connection: pass --database-url with the Supabase "
            "connection string, or paste sql/schema.sql then sql/functions.sql into the "
            "Supabase SQL editor"
        )
    where = "" if url else f" in the embedded database ({embedded.data_dir()})"
    added: list[str] = []
    install_schema(url or embedded.start(install=False), dry_run=args.dry_run, added=added)
    if args.dry_run:
        print("\n".join(read_sql(name) for name in SCHEMA_FILES))
        print(f"-- dry run{where}: nothing was changed; this SQL would make these changes:")
        print("\n".join(f"--   {line}" for line in added) or "--   nothing (up to date)")
        return 0
    print("\n".join(added))
    print(f"schema installed{where}: " + (terminal.counted(len(added), "change") if added
                                       else "up to date"))
    return 0
