"""Where async executors run: a loop per worker thread (a blocking executor stalls only its own
todo), or one shared loop (async clients kept across todos work; the lag watchdog names the todo
that blocks it); and the open-file budget checked at start, under lowered RLIMIT_NOFILE."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import processgpt_sync as ps
from processgpt_sync.errors import InfrastructureError
from processgpt_sync.loops import LABEL
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def states(db) -> dict[str, str | None]:
    return {r["input"]: r["state"] for r in db.execute(
        "SELECT query AS input, draft_status::text AS state FROM todolist")}


def test_an_async_executor_blocking_its_loop_stalls_only_its_own_todo(storage, db):
    hold = threading.Event()
    for name in ["block", *(f"well {i}" for i in range(6))]:
        storage.enqueue("a", name)

    async def handle(todo):
        if todo.input == "block":
            hold.wait(30)  # a blocking call inside async def (CrewAI kickoff())
        else:
            await asyncio.sleep(0.05)
        return {"done": todo.input}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=2)
    try:
        wait_for(lambda: sum(s == "COMPLETED" for s in states(db).values()) == 6)
        blocked_state = states(db)["block"]
        hold.set()
        wait_for(lambda: states(db)["block"] == "COMPLETED")
    finally:
        hold.set()
        server.stop(timeout=5)
    assert blocked_state == "STARTED"


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection

    def do_GET(self) -> None:
        body = b'{"hello": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_result_returned_in_time_stands_while_a_task_it_left_running_ends_slowly(
        storage, db):
    """Thread mode ends the tasks a todo left running once its coroutine returns (as
    ``asyncio.run`` does), giving them a second. That wait is not the executor's time: a
    result returned within the timeout is recorded. Before, the todo timed out during it
    and its result was lost."""
    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.8)  # cleans up before it ends

    async def handle(todo: ps.Todo) -> dict[str, int]:
        leftover = asyncio.ensure_future(slow_to_end())
        await asyncio.sleep(0.5)
        assert not leftover.done()
        return {"ok": 1}

    todo_id = storage.enqueue("a", "x")
    with ps.start(handle, agent_orch="a", storage=storage, workers=1, timeout=1.0):
        wait_for(lambda: states(db)["x"] in ("FAILED", "COMPLETED"), timeout=15)
    row = db.execute("SELECT draft_status::text AS state, output, log FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert (row["state"], row["output"]) == ("COMPLETED", {"ok": 1}), row["log"]


def test_a_task_left_running_that_exits_as_it_is_ended_does_not_replace_the_result(
        storage, db, caplog):
    """A task the todo left running calls ``sys.exit`` when thread mode cancels it (a tool's
    cleanup): the todo's result, returned before, stands and the failure is logged. Before,
    the SystemExit came out of the loop in place of the result and the todo was FAILED."""
    async def exits_when_cancelled() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            sys.exit(3)

    async def handle(todo: ps.Todo) -> dict[str, int]:
        leftover = asyncio.ensure_future(exits_when_cancelled())
        await asyncio.sleep(0.05)
        assert not leftover.done()
        return {"ok": 1}

    todo_id = storage.enqueue("a", "x")
    with ps.start(handle, agent_orch="a", storage=storage, workers=1):
        wait_for(lambda: states(db)["x"] in ("FAILED", "COMPLETED"), timeout=15)
    row = db.execute("SELECT draft_status::text AS state, output, log FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert (row["state"], row["output"]) == ("COMPLETED", {"ok": 1}), row["log"]
    assert "left running failed as it was ended (SystemExit(3))" in caplog.text


def test_a_task_left_running_that_ignores_cancellation_is_waited_for_once_not_every_todo(
        storage, db, caplog):
    """A task the first todo left running swallows every cancellation: its thread's loop is
    closed with it, so the worker's later todos neither wait a second more each at their end
    nor resume it inside them, and the warning names the todo that left it, once."""
    resumed: list[str] = []
    left: list[asyncio.Future[None]] = []

    async def ignores_cancellation() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                resumed.append(str(LABEL.get()))

    async def handle(todo: ps.Todo) -> dict[str, int]:
        if todo.input == "leaves one":
            left.append(asyncio.ensure_future(ignores_cancellation()))
            await asyncio.sleep(0.05)
        return {"ok": 1}

    first = storage.enqueue("a", "leaves one")
    with ps.start(handle, agent_orch="a", storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["completed"] == 1, timeout=10)
        for n in range(3):
            storage.enqueue("a", f"later {n}")
        wait_for(lambda: server.stats()["completed"] == 4, timeout=10)
    said = [r.getMessage() for r in caplog.records if "ignore cancellation" in r.getMessage()]
    assert len(said) == 1 and first in said[0], said
    assert resumed == [first], "cancelled once, at the end of its own todo only"


def test_loops_closed_as_a_worker_takes_its_loop_leave_that_loop_to_its_todo(monkeypatch):
    """The server closes its loops as it stops while a worker thread, between taking its loop
    and running its todo on it, is about to start (a todo handed over just then): that loop is
    left to the todo, which runs, and closed once it ends. Before, the close took it for idle
    and closed it, and the todo failed with "Event loop is closed", blamed on its executor."""
    from processgpt_sync import loops as loops_module

    loops = loops_module.ThreadLoops()

    async def answer(n: int) -> int:
        await asyncio.sleep(0)
        return n

    assert loops.start("first", answer, 1).result() == 1  # the thread's loop, idle now
    real = loops_module.ThreadLoops._loop

    def taken_then_closed(self):
        loop = real(self)
        closer = threading.Thread(target=self.close)
        closer.start()
        closer.join(0.5)  # closing waits for the loop's todo to have begun, or closes it now
        return loop

    monkeypatch.setattr(loops_module.ThreadLoops, "_loop", taken_then_closed)
    assert loops.start("second", answer, 2).result() == 2
    monkeypatch.undo()
    wait_for(lambda: not loops._loops and not loops._running, timeout=5)


TO_THREAD_THAT_NEVER_RETURNS = r"""
import asyncio, threading, time
from processgpt_sync.loops import ThreadLoops

never = threading.Event()
loops = ThreadLoops()

async def times_out():
    try:
        await asyncio.wait_for(asyncio.to_thread(never.wait), 0.2)
    except asyncio.TimeoutError:
        pass

worker = threading.Thread(target=lambda: loops.start("t", times_out).result(), daemon=True)
worker.start()
worker.join(10)
loops.close()
print("closed", flush=True)
"""


@pytest.mark.slow
def test_a_to_thread_call_that_never_returns_does_not_hold_the_process_at_exit() -> None:
    """An executor's ``asyncio.to_thread`` call (CrewAI's ``kickoff_async``) never returns
    after its todo timed out: once the loops are closed at the stop, the process exits, as it
    does with a blocking executor's worker thread. Before, Python joined that thread at exit,
    for ever."""
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", TO_THREAD_THAT_NEVER_RETURNS], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - began
    assert proc.returncode == 0 and proc.stdout.strip() == "closed", proc.stderr[-2000:]
    assert took < 30, f"the process took {took:.0f} s to exit"


def test_shared_loop_reuses_one_async_client_across_todos_of_different_worker_threads(
        storage, db, http_url):
    httpx = pytest.importorskip("httpx")

    class Agent:
        """Keeps one AsyncClient (its connection pool is bound to the loop that used it)."""

        def __init__(self) -> None:
            self.client: Any = None
            self.clients = 0
            self.loops: set[int] = set()
            self.workers: set[int] = set()
            self.running = 0
            self.most = 0

        async def __call__(self, todo: ps.Todo) -> dict[str, Any]:
            if todo.input == "close":
                await self.client.aclose()
                return {"closed": True}
            if self.client is None:
                self.client = httpx.AsyncClient()
                self.clients += 1
            self.loops.add(id(asyncio.get_running_loop()))
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                await asyncio.sleep(0.2)
                response = await self.client.get(http_url)
            finally:
                self.running -= 1
            return response.json()

    agent = Agent()
    for i in range(8):
        storage.enqueue("a", f"t{i}")
    server = ps.start(agent, agent_orch="a", storage=storage, workers=4, loop="shared")
    try:
        wait_for(lambda: list(states(db).values()).count("COMPLETED") == 8)
        storage.enqueue("a", "close")
        wait_for(lambda: states(db)["close"] == "COMPLETED")
    finally:
        server.stop(timeout=5)
    outputs = [r["output"] for r in db.execute("SELECT output FROM todolist WHERE query <> "
                                               "'close'")]
    assert outputs == [{"hello": True}] * 8
    assert agent.clients == 1 and len(agent.loops) == 1
    assert agent.most >= 2, "todos of several worker threads ran at once on the one client"


def test_the_loop_lag_warning_names_the_todo_that_blocked_the_shared_loop(storage, db, caplog):
    blocker = storage.enqueue("a", "block")
    polite = storage.enqueue("a", "polite")

    async def handle(todo):
        if todo.input == "block":
            time.sleep(1.2)  # blocks the shared loop
        else:
            await asyncio.sleep(0.01)
        return {"done": todo.input}

    with caplog.at_level(logging.WARNING, logger="processgpt_sync.loops"):
        with ps.start(handle, agent_orch="a", storage=storage, workers=2, loop="shared"):
            wait_for(lambda: set(states(db).values()) == {"COMPLETED"})
            wait_for(lambda: any("blocked the shared event loop for" in r.getMessage()
                                 for r in caplog.records))
    lag = [r for r in caplog.records if r.name == "processgpt_sync.loops"]
    assert lag and all(getattr(r, "todo_id", None) == blocker for r in lag)
    final = next(r.getMessage() for r in lag if "blocked the shared event loop for" in
                 r.getMessage())
    seconds = float(final.rsplit(" ", 1)[1].rstrip("s"))
    assert final.startswith(f"todo {blocker} ") and 0.5 <= seconds
    assert polite not in " ".join(r.getMessage() for r in lag)



@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_to_thread_and_dns_lookups_share_one_pool_across_the_loops(storage, db, loop):
    """asyncio's default executor (``to_thread``, ``getaddrinfo`` as httpx and anyio call it)
    is one pool for every loop of the server, its threads made only as calls overlap: not a
    pool per worker's loop, kept for the loop's life; and on the shared loop not asyncio's
    ``min(32, cpus + 4)``, which would run only a few todos' blocking calls at a time."""
    workers = 8
    overlap = threading.Barrier(workers, timeout=10)

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        running = asyncio.get_running_loop()
        await running.getaddrinfo("localhost", 80)
        await asyncio.to_thread(overlap.wait)  # every todo's blocking call at once
        return {"ok": True}

    for i in range(2 * workers):
        storage.enqueue("a", f"q{i}")
    before = set(threading.enumerate())  # threads other tests left behind do not count
    with ps.start(handle, agent_orch="a", storage=storage, workers=workers,
                  loop=loop) as server:
        wait_for(lambda: server.stats()["completed"] == 2 * workers, timeout=30)
        names = [t.name for t in set(threading.enumerate()) - before]
    assert not [n for n in names if n.startswith("asyncio_")], names
    pool = [n for n in names if n.startswith("processgpt-sync-to-thread")]
    # one per overlapping call (a thread that just ended a call may not count as idle yet)
    assert workers <= len(pool) <= 2 * workers, pool

# -- the open-file budget, in processes with a lowered RLIMIT_NOFILE ------------------------------

LIMITED = """
import json, logging, resource, sys, threading, time
soft, hard = {soft}, {hard}
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
import asyncio
import processgpt_sync as ps
from processgpt_sync.storage.postgres import PostgresStorage

async def handle(todo):
    await asyncio.sleep({sleep})
    return {{"ok": True}}

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
url = sys.argv[1]
storage = PostgresStorage(url, max_connections=16) if url else None
try:
    server = ps.start(handle, agent_orch="a", storage=storage, workers={workers},
                      database_url=url or "postgresql://127.0.0.1:1/none")
except ps.ConfigurationError as exc:
    print(json.dumps({{"refused": str(exc)}}))
    sys.exit(3)
peak = 0
while server.stats()["completed"] + server.stats()["failed"] < {todos}:
    peak = max(peak, threading.active_count())
    time.sleep(0.1)
stats = server.stats()
server.stop(timeout=10)
print(json.dumps({{"completed": stats["completed"], "failed": stats["failed"], "threads": peak,
                  "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}}))
"""


def run_limited(url: str, *, soft: int, hard: int, workers: int, todos: int = 0,
                sleep: float = 0.5, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    script = LIMITED.format(soft=soft, hard=hard, workers=workers, todos=todos, sleep=sleep)
    out = subprocess.run([sys.executable, "-c", script, url], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, check=False)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
    return out.returncode, json.loads(last), out.stderr


def test_start_refuses_workers_the_hard_open_file_limit_cannot_fit(storage):
    code, result, _ = run_limited("", soft=256, hard=256, workers=200)
    assert code == 3
    message = result["refused"]
    assert "\n" not in message
    assert message.startswith("200 workers need up to ")
    assert "but the open-file limit is 256 (hard RLIMIT_NOFILE): raise it (ulimit -Hn " in message
    assert "or use at most " in message and "--loop shared" in message


@pytest.mark.slow
def test_a_process_with_soft_limit_1024_serves_1024_async_workers_after_raising_it(
        database_url, db):
    db.execute("SELECT processgpt_sync_enqueue_v1('a', 'q' || g) "
               "FROM generate_series(1, 1024) g")
    code, result, stderr = run_limited(database_url, soft=1024, hard=8192, workers=1024,
                                       todos=1024, timeout=300)
    assert code == 0, stderr[-3000:]
    assert result["completed"] == 1024 and result["failed"] == 0
    assert result["soft"] == 8192
    assert "raised the open-file limit (soft RLIMIT_NOFILE) from 1024 to 8192" in stderr
    assert result["threads"] <= 1024 + 16


def test_a_server_with_many_workers_raises_the_gc_threshold_while_it_runs(storage, db):
    """Many running todos keep many objects alive: frequent collections would walk them all."""
    before = gc.get_threshold()
    seen: list[int] = []

    def handle(todo: ps.Todo) -> dict[str, Any]:
        seen.append(gc.get_threshold()[0])
        return {"ok": True}

    storage.enqueue("a", "x")
    with ps.start(handle, agent_orch="a", storage=storage, workers=100):
        wait_for(lambda: seen)
    assert seen == [max(before[0], 10_000)]
    assert gc.get_threshold() == before


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is Python 3.11+")
@pytest.mark.parametrize("loop", ["thread", "shared"])
def test_what_a_task_group_raises_is_judged_by_the_exceptions_inside_it(storage, db, loop):
    """asyncio.TaskGroup (and anyio's task groups, which MCP clients use) wrap what their
    tasks raise in an exception group: a suspend inside one still suspends the todo, a host
    failure inside one still gives it back (it runs again), and a failure's log names the
    error inside, not only "unhandled errors in a TaskGroup"."""
    runs: dict[str, int] = {}

    async def handle(todo: ps.Todo) -> dict[str, Any]:
        runs[todo.input] = runs.get(todo.input, 0) + 1

        async def step() -> None:
            await asyncio.sleep(0)
            if todo.input in ("ask", "ask-and-fail"):
                todo.suspend_for_human("which region?")
            if todo.input == "host" and runs["host"] == 1:
                raise InfrastructureError("could not create an event loop: too many open "
                                          "files")
            if todo.input == "fail":
                raise ValueError("503 Service Unavailable")

        async def sibling() -> None:
            await asyncio.sleep(0)
            if todo.input == "ask-and-fail":
                raise KeyError("the other task's own failure")
            await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as group:
            group.create_task(step())
            group.create_task(sibling())
        return {"runs": runs[todo.input]}

    for name in ("ask", "host", "fail", "ask-and-fail"):
        storage.enqueue("a", name)
    with ps.start(handle, agent_orch="a", storage=storage, workers=3, loop=loop) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"]
                 + server.stats()["asked"] == 4, timeout=20)
    assert states(db) == {"ask": "HUMAN_ASKED", "host": "COMPLETED", "fail": "FAILED",
                          "ask-and-fail": "FAILED"}, "a failure beside a suspend is a failure"
    rows = {r["query"]: r for r in db.execute("SELECT query, output, log FROM todolist")}
    assert rows["host"]["output"] == {"runs": 2}, "given back, then run again"
    assert "ValueError: 503 Service Unavailable" in rows["fail"]["log"]
    assert "KeyError: \"the other task's own failure\"" in rows["ask-and-fail"]["log"]
