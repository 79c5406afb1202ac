from __future__ import annotations

import re
from pathlib import Path

from processgpt_sync import queries as q

ROOT = Path(__file__).resolve().parents[2]


def test_parse_query_file_splits_named_sections_and_drops_comments():
    text = "-- intro\n\n-- first --\n-- what it does\nSELECT 1\n\n-- second --\nSELECT f(%(a)s)\n"
    assert q.parse_query_file(text) == {"first": "SELECT 1", "second": "SELECT f(%(a)s)"}


def test_every_query_used_by_the_storage_layer_exists():
    source = (ROOT / "processgpt_sync/storage/base.py").read_text()
    used = set(re.findall(r'self\.call\(\s*"([a-z_]+)"', source))
    assert used, "no call sites found"
    assert used <= set(q.queries())


def test_every_called_function_is_defined_in_functions_sql():
    functions = (ROOT / "sql/functions.sql").read_text()
    defined = set(re.findall(r"CREATE OR REPLACE FUNCTION (processgpt_sync_\w+)\(", functions))
    assert q.required_functions() <= defined
    assert all(re.search(r"_v\d+$", name) for name in defined), "functions carry a version suffix"


def test_function_name_reads_the_called_function():
    assert q.function_name("claim") == "processgpt_sync_claim_v4"
