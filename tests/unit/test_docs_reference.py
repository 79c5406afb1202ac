"""The reference pages are generated from the code (docs/hooks/reference.py); they cover it."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from processgpt_sync.cli import build_parser
from processgpt_sync.queries import function_name, queries
from processgpt_sync.settings import ENVIRONMENT, Settings

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs/hooks/reference.py")
assert spec is not None and spec.loader is not None
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)


def test_every_sql_function_is_in_the_sql_reference_with_its_signature():
    text = (ROOT / "sql" / "functions.sql").read_text()
    declared = re.findall(r"^CREATE OR REPLACE FUNCTION (\w+)\(", text, re.M)
    parsed = reference.sql_functions(text)
    assert [f["name"] for f in parsed] == declared
    claim = next(f for f in parsed if f["name"] == function_name("claim"))
    assert claim["args"].startswith("p_agent_orch text, p_consumer text, p_limit integer")
    assert claim["returns"] == "jsonb" and "SKIP LOCKED" in claim["comment"]


def test_every_named_query_names_its_python_caller_in_the_sql_reference():
    page = reference.sql_markdown()
    assert page.count("Called by ") == len(queries())
    assert "Called by `Storage.claim()`." in page


def test_the_cli_reference_has_every_command_and_option():
    page = reference.cli_markdown()
    for name, sub in reference._subcommands(build_parser()).items():
        assert f"## {name}\n" in page
        for action in sub._actions:
            for option in action.option_strings:
                assert option in page


def test_the_settings_reference_has_every_field_and_variable_with_its_meaning():
    page = reference.settings_markdown()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) == len(dataclasses.fields(Settings))
    assert all(not row.rstrip().endswith("|  |") for row in rows)  # each has its docstring
    for variable in ENVIRONMENT:
        assert f"`{variable}`" in page
    assert "| `workers` | `PROCESSGPT_WORKERS` | `int` | `4` | Worker threads" in page
