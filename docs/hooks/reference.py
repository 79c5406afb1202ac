"""MkDocs hook: render the reference pages from the code, so they never drift from it.

A page holding ``<!-- reference:cli -->``, ``<!-- reference:settings -->`` or
``<!-- reference:sql -->`` gets that marker replaced by Markdown generated from the CLI's
argparse parser, the ``Settings`` dataclass, or ``sql/functions.sql`` and ``sql/queries.sql``;
Sphinx roles left in rendered docstrings are shown as plain code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for name, render in (("cli", cli_markdown), ("settings", settings_markdown),
                         ("sql", sql_markdown)):
        marker = f"<!-- reference:{name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~[\w.]*\.)?")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Docstrings use Sphinx roles (:class:`X`); show them as plain code, as Sphinx would."""
    return _SPHINX_ROLE.sub("<code>", html)


# -- the CLI ---------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_markdown() -> str:
    from processgpt_sync import cli

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width
    parser = cli.build_parser()
    parts = ["## processgpt-sync", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subcommands(parser).items():
        parts += [f"## {name}", "", sub.description or "", "", "```text",
                  sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


# -- settings ----------------------------------------------------------------------------------


def _attribute_docs() -> dict[str, str]:
    """The docstring written under each Settings field (as mkdocstrings reads them)."""
    import ast
    import inspect

    from processgpt_sync import settings

    tree = ast.parse(inspect.getsource(settings))
    cls = next(node for node in tree.body
               if isinstance(node, ast.ClassDef) and node.name == "Settings")
    docs = {}
    for field, doc in zip(cls.body, cls.body[1:], strict=False):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            docs[field.target.id] = str(doc.value.value)
    return docs


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        return "—" if field.default in (None, "") else f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        doc = (field.default_factory.__doc__ or "").strip().split("\n")[0]
        return f"computed: {doc[0].lower() + doc[1:]}" if doc else "computed"
    return "required"


def settings_markdown() -> str:
    from processgpt_sync.settings import ENVIRONMENT, Settings

    docs = _attribute_docs()
    variables: dict[str, list[str]] = {}
    for variable, name in ENVIRONMENT.items():
        variables.setdefault(name, []).append(f"`{variable}`")
    rows = ["| setting | environment | type | default | meaning |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(Settings):
        env = ", ".join(variables.get(field.name, [])) or "—"
        meaning = " ".join(docs.get(field.name, "").split()).replace("|", "\\|")
        kind = str(field.type).replace("|", "\\|")
        rows.append(f"| `{field.name}` | {env} | `{kind}` | {_default(field)} | {meaning} |")
    return "\n".join(rows)


# -- the SQL contract ----------------------------------------------------------------------------

_FUNCTION = re.compile(
    r"(?P<comment>(?:^--[^\n]*\n)*)^CREATE OR REPLACE FUNCTION (?P<name>\w+)\((?P<args>.*?)\)\s*"
    r"\nRETURNS (?P<returns>[^$]+?)\s+LANGUAGE", re.MULTILINE | re.DOTALL)
_QUERY_CALL = re.compile(r"^-- ([a-z_]+) --\n(?:--[^\n]*\n)*SELECT (processgpt_sync_\w+)\(",
                         re.MULTILINE)


def sql_functions(text: str) -> list[dict[str, str]]:
    """Each function of ``functions.sql``: name, arguments, return type and its comment."""
    found = []
    for match in _FUNCTION.finditer(text):
        comment = " ".join(line[2:].strip() for line in match["comment"].splitlines())
        args = " ".join(match["args"].split())
        returns = " ".join(match["returns"].split())
        found.append({"name": match["name"], "args": args, "returns": returns,
                      "comment": comment.strip()})
    return found


def sql_markdown() -> str:
    functions_sql = (ROOT / "sql" / "functions.sql").read_text(encoding="utf-8")
    queries_sql = (ROOT / "sql" / "queries.sql").read_text(encoding="utf-8")
    from processgpt_sync.storage.base import Storage

    callers: dict[str, list[str]] = {}
    for query, function in _QUERY_CALL.findall(queries_sql):
        method = {"schema": "check_schema"}.get(query, query)
        callers.setdefault(function, []).append(
            f"`Storage.{method}()`" if hasattr(Storage, method) else f"the named query `{query}`")
    header = functions_sql.split("CREATE OR REPLACE FUNCTION", 1)[0]
    intro = "\n".join(line[3:] if line.startswith("-- ") else line[2:]
                      for line in header.splitlines() if line.startswith("--"))
    parts = [intro.strip(), ""]
    for function in sql_functions(functions_sql):
        parts += [f"### `{function['name']}`", "",
                  "```sql", f"{function['name']}({function['args']})",
                  f"RETURNS {function['returns']}", "```", "",
                  function["comment"] or "(internal helper)", ""]
        if function["name"] in callers:
            parts += [f"Called by {', '.join(callers[function['name']])}.", ""]
    return "\n".join(parts)
