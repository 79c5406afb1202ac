"""`processgpt-sync demo`: the whole loop on the embedded database, in a few seconds.

Enqueues a handful of todos, serves them with ``examples/blocking_executor.py``, shows a live
progress bar (on a terminal), and ends with a table of every todo, its final state, its events,
and the throughput.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg.rows import dict_row
from rich.console import Console
from rich.padding import Padding
from rich.progress import Progress, TextColumn

from . import cli_terminal as terminal
from . import embedded
from .serving import start
from .settings import SUPABASE_KEY_VARIABLES
from .storage.install import install_schema
from .storage.postgres import PostgresStorage

DEMO_AGENT = "processgpt-sync-demo"
INPUTS = [
    "Summarise the quarterly sales report for the board",
    "Draft a reply to the supplier about the late delivery",
    "List the open purchase orders over ten thousand dollars",
    "Check the travel request against the expense policy",
    "Prepare the onboarding checklist for the new engineer",
    "Classify this customer complaint by product and urgency",
    "Translate the meeting notes into a short action list",
    "Extract the contract renewal dates from the vendor file",
]
DEADLINE = 120.0  # seconds the demo waits for its todos


def load_example(module: str) -> Any:
    """Import ``examples/<module>.py``: shipped in the wheel, or from the source tree."""
    try:
        return importlib.import_module(f"processgpt_sync.examples.{module}")
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parent.parent / "examples" / f"{module}.py"
        spec = importlib.util.spec_from_file_location(f"processgpt_sync_example_{module}", path)
        if spec is None or spec.loader is None:
            raise
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded


def run(
    *, database_url: str | None = None, todos: int = 8, workers: int = 4, out: TextIO = sys.stdout,
    ignored: Sequence[str] = (), console_port: int | None = None,
) -> int:
    """Run the demo; return the process exit code (0 when every todo completed).

    :param ignored: environment variables that configure a database for real work
        (``DATABASE_URL``, ``SUPABASE_URL``): the demo says it does not use them.
    :param console_port: serve the web console on this port meanwhile (0: any free port).
    """
    console = terminal.console(out)
    console.print("[bold]processgpt-sync demo[/bold]")
    given_url = bool(database_url)
    if database_url:
        install_schema(database_url)
        console.print("  database: --database-url (schema installed)")
    else:
        note = (f" ({' and '.join(ignored)} not used: the demo never fills a database set for "
                "real work; pass --database-url to run it there)") if ignored else ""
        console.print(f"  database: embedded PostgreSQL in {embedded.data_dir()}{note}",
                      markup=False)
        database_url = embedded.start()
    storage = PostgresStorage(database_url, max_connections=workers + 4)
    inputs = [INPUTS[i % len(INPUTS)] for i in range(todos)]
    ids = [
        storage.enqueue(DEMO_AGENT, text, agent_mode="DRAFT" if i % 4 == 3 else "COMPLETE",
                        activity_name="demo")
        for i, text in enumerate(inputs)
    ]
    console.print(f"  enqueued {len(ids)} todos for agent_orch={DEMO_AGENT}; serving with "
                  f"{workers} workers (examples/blocking_executor.py)")
    web = None if console_port is None else _web_console(storage, console_port, console)
    executor = load_example("blocking_executor").WordCountExecutor(step_seconds=0.15)
    began = time.monotonic()
    # The bar redraws in place on a terminal; elsewhere its final state prints once.
    columns = (TextColumn("  "), *Progress.get_default_columns()[:-1],
               TextColumn("{task.completed}/{task.total} done, {task.fields[detail]}"))
    with start(executor, agent_orch=DEMO_AGENT, storage=storage, workers=workers) as server, \
            Progress(*columns, console=console) as progress:
        task = progress.add_task("todos", total=len(ids), detail="")
        while time.monotonic() - began < DEADLINE:
            stats = server.stats()
            finished, events = _progress(database_url, ids)
            progress.update(task, completed=finished,
                            detail=f"{stats['running']} running, {events} events stored")
            if finished == len(ids):
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - began
    rows = _report(database_url, ids)
    _print_table(rows, console, _show_command(given_url, ignored))
    completed = sum(r["draft_status"] == "COMPLETED" for r in rows)
    console.print(f"\n  {completed}/{len(ids)} completed in {elapsed:.2f}s "
                  f"({len(ids) / elapsed:.1f} todos/s with {workers} workers)")
    if web is not None:
        _keep_web_console_open(web, console)
    storage.close()
    return 0 if completed == len(ids) else 1


def _web_console(storage: PostgresStorage, port: int, console: Console) -> Any:
    from .console import ConsoleConfig, ConsoleServer

    web = ConsoleServer(storage, ConsoleConfig(port=port, agent_orch=DEMO_AGENT)).start()
    console.print(f"  console: {web.url}", markup=False, highlight=False)
    return web


def _keep_web_console_open(web: Any, console: Console) -> None:
    """In a terminal, leave the web console up to look around until Ctrl+C; then stop it."""
    if sys.stdin.isatty():
        console.print(f"  the console stays open at {web.url}; Ctrl+C to stop", markup=False,
                      highlight=False)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    web.stop()


def _progress(url: str, ids: list[str]) -> tuple[int, int]:
    """Finished todos and stored events, counted in the database as the final table is."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            """SELECT (SELECT count(*) FROM todolist WHERE id = ANY(%(ids)s::uuid[])
                         AND draft_status IN ('COMPLETED', 'FAILED', 'CANCELLED')),
                      (SELECT count(*) FROM events WHERE todo_id = ANY(%(ids)s::text[]))""",
            {"ids": ids},
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _report(url: str, ids: list[str]) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(
            """SELECT t.id::text, t.query, t.agent_mode::text, t.status::text,
                      t.draft_status::text, coalesce(t.output, t.draft) AS result,
                      (SELECT count(*) FROM events e WHERE e.todo_id = t.id::text) AS events
               FROM todolist t WHERE t.id = ANY(%s::uuid[]) ORDER BY t.start_date""", (ids,)
        ).fetchall()


def _short(result: Any, width: int = 48) -> str:
    text = json.dumps(result, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _show_command(given_url: bool, ignored: Sequence[str]) -> str:
    """The command that shows one of the demo's todos. Commands look where ``serve`` does, so
    an exported DATABASE_URL or SUPABASE_URL (ignored by the demo) must be unset for it (the
    embedded database stops with the demo, and the command starts it again); a
    --database-url is not remembered."""
    if given_url:
        return "processgpt-sync show {todo} --database-url URL (the demo's)"
    unset = list(ignored)
    if unset:  # SUPABASE_URL is unset for the command: a key without it is a half-made setup
        unset += [name for name in SUPABASE_KEY_VARIABLES if os.environ.get(name)]
    prefix = "".join(f"-u {name} " for name in unset)
    return f"env {prefix}processgpt-sync show {{todo}}" if unset else "processgpt-sync show {todo}"


def _print_table(rows: list[dict[str, Any]], console: Console, show: str) -> None:
    """The todos, their results, and the command that shows one."""
    console.print()
    console.print(Padding(terminal.table(
        ("todo", "mode", "status", "draft", "events", "result"),
        ((r["id"][:8], r["agent_mode"], r["status"], r["draft_status"], r["events"],
          _short(r["result"])) for r in rows),
        right=("events",), wrap=("result",)), (0, 0, 0, 2), expand=False))
    if any(r["agent_mode"] == "DRAFT" for r in rows):
        console.print("\n  DRAFT todos keep status IN_PROGRESS: their result is a draft for a "
                      "person to review in the\n  ProcessGPT UI, who then submits it; COMPLETE "
                      "todos are submitted at once (status SUBMITTED).")
    if rows:
        command = show.format(todo=rows[0]["id"][:8])
        console.print(f"  Look at one todo: {command}",
                      markup=False, highlight=False, soft_wrap=True)  # one line to copy
