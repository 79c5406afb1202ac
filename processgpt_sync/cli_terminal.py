"""Terminal output for the CLI and the demo, through rich.

Colours and live refreshes only on a terminal; plain text when piped or when ``NO_COLOR`` is
set (https://no-color.org). Used only by the CLI, which is the only part that prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .deep_json import shown_json, with_deep_values_noted

PIPED_WIDTH = 200  # columns when not on a terminal: keep table rows on one line for grep


def console(file: TextIO | None = None) -> Console:
    """A console for ``file`` (default stdout) that honours NO_COLOR and non-terminals."""
    file = file or sys.stdout
    terminal = file.isatty()
    width = None if terminal or os.environ.get("COLUMNS") else PIPED_WIDTH
    plain = bool(os.environ.get("NO_COLOR")) or not terminal
    # color_system=None drops every style code (bold too); live refreshes still work.
    return Console(file=file, width=width, highlight=False, soft_wrap=False,
                   color_system=None if plain else "auto")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
          right: Sequence[str] = (), wrap: Sequence[str] = ()) -> Table:
    """A plain table: a bold header over a rule, no borders. Only the ``wrap`` columns may
    wrap on a narrow terminal; the others (ids) stay whole on one line."""
    grid = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in columns:
        grid.add_column(name, justify="right" if name in right else "left",
                        no_wrap=name not in wrap)
    for row in rows:
        grid.add_row(*(Text("-" if cell is None else str(cell)) for cell in row))  # no markup
    return grid


def counted(count: int, noun: str) -> str:
    """``1 todo``, ``2 todos``: a count and its noun, in the singular for one."""
    return f"{count} {noun}{'s' * (count != 1)}"


def print_json(value: Any, file: TextIO | None = None) -> None:
    """One JSON document on one line, for scripts (``--json``)."""
    print(json.dumps(with_deep_values_noted(value, default=str), ensure_ascii=False,
                     default=str),
          file=file or sys.stdout, flush=True)


def question_text(question: Mapping[str, Any] | Any) -> str:
    """An open question as one line: its text and its options."""
    data = question if isinstance(question, Mapping) else {"question": question}
    text = data.get("question") or data.get("text") or data
    if not isinstance(text, str):
        text = shown_json(text, ensure_ascii=False, default=str)
    options = data.get("options")
    return f"{text} {shown_json(options, ensure_ascii=False, default=str)}" if options else text
