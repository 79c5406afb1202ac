"""The table of docs/todo-life.md names, for each transition, the tests that check it: each
name must be a test module or a test function that exists, so a renamed test is not left
behind in the specification."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_todo_life_table_names_exists() -> None:
    table = (ROOT / "docs" / "todo-life.md").read_text(encoding="utf-8")
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("*.py"))
    modules = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    defined = set(re.findall(r"^\s*(?:async )?def (test_\w+)", sources, re.M))
    named = set(re.findall(r"\b(test_\w+)", table)) - modules
    assert named, "the table names no tests"
    assert sorted(named - defined) == []
