"""Many workers in one process: async a2a executors per-thread and shared, plain functions.

Run by ``bench/run.py --only scale``; each measurement runs in a process of its own that first
lowers the soft ``RLIMIT_NOFILE`` (the default of many systems, 1,024), so the server has to
raise it as a user's would:

    python -m bench.scale --url URL --kind async --workers 1024 --todos 8192 --nofile 1024

prints one JSON object: efficiency (ideal time / elapsed), failed, peak threads, peak RSS,
peak open files, CPU per todo (and the kernel's share of it: thread switches, system calls),
and the soft limit the server ran with.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import processgpt_sync as ps  # noqa: E402
from processgpt_sync.storage.postgres import PostgresStorage  # noqa: E402

AGENT = "bench"
SLEEP = 1.0  # seconds each todo waits, as an agent waits on a model


def seed_executor() -> Any:
    """The seed's MinimalExecutor shape: status event, ``await asyncio.sleep``, final artifact,
    events enqueued without await."""
    from a2a.server.agent_execution import AgentExecutor

    from tests import a2a_events as ev

    class MinimalExecutor(AgentExecutor):  # type: ignore[misc]
        async def execute(self, context: Any, event_queue: Any) -> None:
            row = context.get_context_data()["row"]
            event_queue.enqueue_event(ev.status("working", {"step": "start"}, row["id"],
                                                row["id"]))
            await asyncio.sleep(SLEEP)
            event_queue.enqueue_event(ev.artifact({"ok": True}, row["id"], row["id"]))

        async def cancel(self, context: Any, event_queue: Any) -> None:
            pass

    return MinimalExecutor()


def plain(todo: ps.Todo) -> dict[str, Any]:
    todo.events.progress({"step": "start"})
    time.sleep(SLEEP)
    return {"ok": True}


async def async_plain(todo: ps.Todo) -> dict[str, Any]:
    todo.events.progress({"step": "start"})
    await asyncio.sleep(SLEEP)
    return {"ok": True}


def measure(url: str, kind: str, workers: int, todos: int, loop: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT processgpt_sync_enqueue_v1(%s, 'q' || g) "
                     "FROM generate_series(1, %s) g", (AGENT, todos))
    executor = {"plain": plain, "async-def": async_plain}.get(kind) or seed_executor()
    process = psutil.Process()
    storage = PostgresStorage(url, max_connections=32)  # the embedded server allows 100
    peak = {"threads": 0, "rss": 0, "fds": 0}
    began = time.perf_counter()
    cpu = process.cpu_times()
    server = ps.start(executor, agent_orch=AGENT, storage=storage, workers=workers, loop=loop,
                      poll_interval=0.5)
    try:
        # the end is seen within 20 ms (a 2 s run loses no more than 1 % to the polling); the
        # process's resources are sampled every 200 ms
        for tick in itertools.count():
            stats = server.stats()
            if tick % 10 == 0:
                peak["threads"] = max(peak["threads"], threading.active_count())
                peak["rss"] = max(peak["rss"], process.memory_info().rss)
                peak["fds"] = max(peak["fds"], process.num_fds())
            if stats["completed"] + stats["failed"] >= todos:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - began
        after = process.cpu_times()
    finally:
        server.stop(timeout=10)
    ideal = todos / workers * SLEEP
    return {"efficiency": round(ideal / elapsed, 3), "failed": stats["failed"],
            "completed": stats["completed"], "elapsed_s": round(elapsed, 1),
            "threads": peak["threads"], "rss_mb": round(peak["rss"] / 2**20, 1),
            "fds": peak["fds"],
            "sys_ms_per_todo": round((after.system - cpu.system) * 1000 / todos, 3),
            "cpu_ms_per_todo": round(
                (after.user + after.system - cpu.user - cpu.system) * 1000 / todos, 2),
            "nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["async", "async-def", "plain"], default="async")
    parser.add_argument("--loop", choices=["thread", "shared"], default="thread")
    parser.add_argument("--workers", type=int, default=1024)
    parser.add_argument("--todos", type=int, default=8192)
    parser.add_argument("--nofile", type=int, default=1024, help="soft RLIMIT_NOFILE to start with")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))
    logging.basicConfig(level=logging.WARNING)
    result = measure(args.url, args.kind, args.workers, args.todos, args.loop)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
