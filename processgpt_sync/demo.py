"""`processgpt-sync demo`: the whole loop on the embedded database, in a few seconds.

Enqueues a handful of todos, serves them with ``examples/blocking_executor.py``, shows live
counts, and ends with a table of every todo, its final state, its events, and the throughput.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg.rows import dict_row

from . import embedded
from .server import start
from .storage.postgres import PostgresStorage, install_schema

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
    *, database_url: str | None = None, todos: int = 8, workers: int = 4, out: TextIO = sys.stdout
) -> int:
    """Run the demo; return the process exit code (0 when every todo completed)."""
    print("processgpt-sync demo", file=out)
    if database_url:
        install_schema(database_url)
        print("  database: DATABASE_URL (schema installed)", file=out)
    else:
        print(f"  database: embedded PostgreSQL in {embedded.data_dir()}", file=out)
        database_url = embedded.start()
    storage = PostgresStorage(database_url, max_connections=workers + 4)
    inputs = [INPUTS[i % len(INPUTS)] for i in range(todos)]
    ids = [
        storage.enqueue(DEMO_AGENT, text, agent_mode="DRAFT" if i % 4 == 3 else "COMPLETE",
                        activity_name="demo")
        for i, text in enumerate(inputs)
    ]
    print(f"  enqueued {len(ids)} todos for agent_orch={DEMO_AGENT}; serving with {workers} "
          "workers (examples/blocking_executor.py)", file=out)
    executor = load_example("blocking_executor").WordCountExecutor(step_seconds=0.15)
    began = time.monotonic()
    with start(executor, agent_orch=DEMO_AGENT, storage=storage, workers=workers) as server:
        last = ""
        while time.monotonic() - began < DEADLINE:
            stats = server.stats()
            finished = _finished(database_url, ids)
            line = (f"  [{_bar(finished, len(ids))}] {finished}/{len(ids)} done, "
                    f"{stats['running']} running, {stats['events_written']} events written")
            if line != last:
                print(line, file=out, flush=True)
                last = line
            if finished == len(ids):
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - began
    storage.close()
    rows = _report(database_url, ids)
    _print_table(rows, out)
    completed = sum(r["draft_status"] == "COMPLETED" for r in rows)
    print(f"\n  {completed}/{len(ids)} completed in {elapsed:.2f}s "
          f"({len(ids) / elapsed:.1f} todos/s with {workers} workers)", file=out)
    return 0 if completed == len(ids) else 1


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // max(total, 1)
    return "#" * filled + "." * (width - filled)


def _finished(url: str, ids: list[str]) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM todolist WHERE id = ANY(%s::uuid[]) "
            "AND draft_status IN ('COMPLETED', 'FAILED', 'CANCELLED')", (ids,)
        ).fetchone()
    return int(row[0]) if row else 0


def _report(url: str, ids: list[str]) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(
            """SELECT t.id::text, t.query, t.agent_mode::text, t.status::text,
                      t.draft_status::text, coalesce(t.output, t.draft) AS result,
                      (SELECT count(*) FROM events e WHERE e.todo_id = t.id::text) AS events
               FROM todolist t WHERE t.id = ANY(%s::uuid[]) ORDER BY t.start_date""", (ids,)
        ).fetchall()


def _print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    header = f"\n  {'todo':8}  {'mode':8}  {'status':11}  {'draft':9}  {'events':>6}  result"
    print(header, file=out)
    print("  " + "-" * (len(header) + 20), file=out)
    for r in rows:
        result = str(r["result"])
        result = result if len(result) <= 48 else result[:45] + "..."
        print(f"  {r['id'][:8]:8}  {r['agent_mode']:8}  {r['status']:11}  "
              f"{r['draft_status'] or '-':9}  {r['events']:>6}  {result}", file=out)
