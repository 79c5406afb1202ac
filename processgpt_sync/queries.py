"""Load the SQL shipped in the package: the schema, the functions and the named queries.

The top-level ``sql/`` folder is the one source of truth; the build maps it into the package as
``processgpt_sync.sql`` so ``importlib.resources`` finds it after ``pip install``.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

from typing_extensions import LiteralString

SQL_PACKAGE = "processgpt_sync.sql"
SCHEMA_FILES = ("schema.sql", "functions.sql")
_QUERY_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)
_FUNCTION_CALL = re.compile(r"\bSELECT (processgpt_sync_[a-z0-9_]+)\(")


SOURCE_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def read_sql(name: str) -> str:
    """Return the text of one SQL file: from the installed package, or from the source tree's
    ``sql/`` in an editable install (which does not map ``sql/`` into the package)."""
    try:
        return resources.files(SQL_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        return (SOURCE_SQL_DIR / name).read_text(encoding="utf-8")


def parse_query_file(text: str) -> dict[str, LiteralString]:
    """Split a file of ``-- name --`` sections into {name: sql}, dropping comment lines."""
    parts = _QUERY_HEADER.split(text)
    queries: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if line and not line.startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


@cache
def queries() -> dict[str, LiteralString]:
    """The named queries of ``queries.sql``."""
    return parse_query_file(read_sql("queries.sql"))


def function_name(query_name: str) -> str:
    """The SQL function a named query calls: what the Supabase backend passes to ``rpc()``."""
    match = _FUNCTION_CALL.search(queries()[query_name])
    if match is None:
        raise LookupError(f"query {query_name!r} does not call a processgpt_sync function")
    return match.group(1)


def required_functions() -> frozenset[str]:
    """Every function the named queries call: what a server checks for at start."""
    return frozenset(function_name(name) for name in queries())
