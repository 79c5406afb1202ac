"""The compat section: real agent code served end to end, and --processes 8 --workers 1.

    pip install -e ".[a2a]" "crewai>=1,<2" "langchain-core>=1,<2" "langgraph>=1,<2"
    python bench/compat.py [--quick] [--json]

- crewai: a CrewAI 1.x crew (scripted LLM, one tool call, the event bridge on) in a plain
  function, ``serve --workers 4``;
- langchain: a LangChain chain's ``.invoke`` on a fake chat model, ``serve --workers 4``;
- processes_8x1: the no-op executor under ``serve --processes 8 --workers 1``.

Each runs as its own ``processgpt-sync serve`` process tree; RSS is the peak of the whole tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import AGENT, Bench  # noqa: E402

QUIET = {"CREWAI_DISABLE_TELEMETRY": "true", "CREWAI_TRACING_ENABLED": "false",
         "OTEL_SDK_DISABLED": "true"}


def served(bench: Bench, target: str, todos: int, text: str, *args: str,
           servers: int = 1) -> tuple[float, float]:
    """(todos/s, peak RSS MB of the process tree) serving ``todos`` todos with ``target``,
    timed from when all ``servers`` serve and one warm-up todo is done."""
    url = bench.database()
    env = {**os.environ, **QUIET, "PYTHONPATH": str(ROOT)}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "processgpt_sync", "--log-level", "INFO",
                             "serve", target, "--agent-orch", AGENT, "--database-url", url,
                             *args], env=env, cwd=ROOT, stderr=log)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.wait(0.05):
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    while text_of(log).count("serving agent_orch=") < servers:
        if proc.poll() is not None:
            raise RuntimeError(f"{target} exited with {proc.returncode}")
        time.sleep(0.05)
    with psycopg.connect(url, autocommit=True) as conn:
        # Start the clock once the servers are up: import time is not serving time.
        conn.execute("SELECT processgpt_sync_enqueue_v1(%s, %s)", (AGENT, text))
        while conn.execute("SELECT count(*) FROM todolist WHERE draft_status = 'COMPLETED'"
                           ).fetchone()[0] < 1:
            if proc.poll() is not None:
                raise RuntimeError(f"{target} exited with {proc.returncode}")
            time.sleep(0.05)
        began = time.perf_counter()
        conn.execute("SELECT processgpt_sync_enqueue_v1(%s, %s) FROM generate_series(1, %s)",
                     (AGENT, text, todos))
        while conn.execute("SELECT count(*) FROM todolist WHERE draft_status = 'COMPLETED'"
                           ).fetchone()[0] < todos + 1:
            time.sleep(0.02)
        elapsed = time.perf_counter() - began
        failed = conn.execute("SELECT count(*) FROM todolist WHERE draft_status = 'FAILED'"
                              ).fetchone()[0]
    done.set()
    sampler.join()
    proc.terminate()
    proc.wait(60)
    log.close()
    if failed:
        raise RuntimeError(f"{failed} todos failed serving {target}")
    return todos / elapsed, peak


def text_of(log: Any) -> str:
    log.seek(0)
    return str(log.read())


def measure(bench: Bench, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    agent_todos = 100 if quick else 300
    rate, rss = served(bench, "tests.compat.crew_agents:crew_function", agent_todos,
                       "lookup the quarterly report", "--workers", "4")
    results["crewai_todos_per_s"], results["crewai_rss_mb"] = rate, rss
    rate, rss = served(bench, "tests.compat.lc_agents:chain_function", agent_todos,
                       "the quarterly report", "--workers", "4")
    results["langchain_todos_per_s"], results["langchain_rss_mb"] = rate, rss
    rate, rss = served(bench, "bench.run:noop", bench.todos, "q", "--processes", "8",
                       "--workers", "1", servers=8)
    results["processes_8x1_todos_per_s"], results["processes_8x1_rss_mb"] = rate, rss
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer todos")
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    args = parser.parse_args()
    bench = Bench(args.quick)
    try:
        results = measure(bench, args.quick)
    finally:
        bench.close()
    for key, value in results.items():
        print(f"{key:32} {value:,.2f}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
