"""A host out of threads (``ulimit -u``, a container's pids limit), for real: each test runs
a child process as nobody with RLIMIT_NPROC lowered, takes every thread it may still start,
and checks that the library blames the host, not the todo, and leaves nothing behind."""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import as_nobody_with_threads

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="lowers RLIMIT_NPROC for another user: needs root"),
]


def run_with_few_threads(script: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True,
                          text=True, timeout=60, preexec_fn=as_nobody_with_threads(60),
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


TAKE_EVERY_THREAD = """
import threading

fillers = []  # each holds a thread until its event is set
try:
    while True:  # take every thread RLIMIT_NPROC allows
        ends = threading.Event()
        filler = threading.Thread(target=ends.wait, daemon=True)
        filler.start()
        fillers.append(ends)
except RuntimeError:
    pass
"""

SHARED_LOOP_SETUP = r"""
import asyncio, json, os, threading
from processgpt_sync.errors import InfrastructureError
from processgpt_sync.infra import infrastructure_problem
from processgpt_sync.loops import SharedLoop

async def answer():
    return 42

loop = SharedLoop()
"""

USE_THE_LOOP = r"""
fds = len(os.listdir("/proc/self/fd"))
errors = []
for _ in range(3):
    try:
        loop.start("t", answer).result()
    except InfrastructureError as exc:
        errors.append(infrastructure_problem(exc) is not None)
leaked = len(os.listdir("/proc/self/fd")) - fds
for ends in fillers:
    ends.set()
while threading.active_count() > 1:
    threading.Event().wait(0.01)
value = loop.start("t", answer).result()
loop.close()
print(json.dumps({"filled": len(fillers), "errors": errors, "leaked_fds": leaked,
                  "later": value}))
"""


def test_a_shared_loop_that_gets_no_thread_is_the_hosts_fault_and_leaks_nothing() -> None:
    """No thread for the loop (ulimit -u, a pids limit): each start raises an
    InfrastructureError (its todo is given back, not failed), closes what it opened, and the
    loop starts once threads are free."""
    result = run_with_few_threads(SHARED_LOOP_SETUP + TAKE_EVERY_THREAD + USE_THE_LOOP)
    assert isinstance(result["filled"], int) and result["filled"] > 0
    assert (result["errors"], result["leaked_fds"], result["later"]) == ([True] * 3, 0, 42)


DEADLINE_SETUP = r"""
import json, socket, threading, time
from processgpt_sync.storage.deadline import DEADLINES
"""

WATCH_A_STATEMENT = r"""
mine, peer = socket.socketpair()
with DEADLINES.watch(mine.fileno(), 0.1, "a statement with no watchdog"):
    mine.sendall(b"ran")
for ends in fillers:
    ends.set()
while threading.active_count() > 1:
    time.sleep(0.01)
time.sleep(0.2)  # the first statement's deadline has passed
other, _ = socket.socketpair()
with DEADLINES.watch(other.fileno(), 10, "a later statement"):  # starts the watchdog
    time.sleep(0.3)
mine.sendall(b" still open")
print(json.dumps({"filled": len(fillers), "read": peer.recv(100).decode()}))
"""


def test_a_statement_watched_while_no_thread_can_start_runs_and_leaves_no_stale_deadline() -> None:
    """The deadline watchdog cannot start (no thread): the statement runs unwatched, with a
    warning, and its entry is gone once it ends, so the watchdog, started later, does not shut
    down the socket that now has that fd."""
    result = run_with_few_threads(DEADLINE_SETUP + TAKE_EVERY_THREAD + WATCH_A_STATEMENT)
    assert isinstance(result["filled"], int) and result["filled"] > 0
    assert result["read"] == "ran still open"
    assert "cannot start the statement deadline watchdog" in str(result["stderr"])


CANCEL_HOOK = r"""
import json, logging, threading
from processgpt_sync.executor import BlockingObjectAdapter

class Records(logging.Handler):
    lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

logging.getLogger("processgpt_sync").addHandler(Records())
called = []

class Executor:
    def execute(self, todo, events):
        return {}
    def cancel(self, todo):
        called.append(todo.id)

class Todo:
    id = "t-1"

raised = None
try:
    BlockingObjectAdapter(Executor()).cancel(Todo())
except Exception as exc:
    raised = repr(exc)
for ends in fillers:
    ends.set()
print(json.dumps({"filled": len(fillers), "raised": raised, "called": called,
                  "said": Records.lines}))
"""


def test_a_cancel_hook_that_gets_no_thread_is_the_hosts_fault_not_the_hooks() -> None:
    """The UI cancels a blocking object executor while the host has no thread to spare for
    its cancel hook: said as the host's limit (the executor still sees ``todo.cancelled``),
    not raised into the heartbeat as the hook's failure."""
    result = run_with_few_threads(TAKE_EVERY_THREAD + CANCEL_HOOK)
    assert result["filled"], "the child could not start any thread"
    assert result["raised"] is None and result["called"] == []
    assert any("host is out of threads" in line and "t-1" in line
               for line in result["said"]), result["said"]


BOUNDED_CALL = r"""
import json, threading
from processgpt_sync.shutdown import bounded

done, result = bounded(lambda: "made", 1.0, "release")
def fails():
    raise ValueError("refused")
failed = bounded(fails, 1.0, "release")
for ends in fillers:
    ends.set()
while threading.active_count() > 1:
    threading.Event().wait(0.01)
print(json.dumps({"filled": len(fillers), "done": done, "result": result,
                  "failed": [failed[0], repr(failed[1])],
                  "later": bounded(lambda: "made", 1.0, "release")}))
"""


def test_a_stop_step_that_gets_no_thread_runs_on_the_stopping_thread() -> None:
    """Each of stop()'s database steps runs on a thread of its own, with a deadline: with no
    thread to be had, the step runs on the caller's thread (bounded by the connection's own
    timeouts) instead of raising out of stop(), which would leave ``join()`` waiting for ever,
    or being skipped (an embedded database left running, todos not given back)."""
    result = run_with_few_threads(TAKE_EVERY_THREAD + BOUNDED_CALL)
    assert result["filled"], "the child could not start any thread"
    assert (result["done"], result["result"]) == (True, "made")
    assert result["failed"] == [True, "ValueError('refused')"]
    assert result["later"] == [True, "made"]


POOL_WITH_ONE_THREAD = r"""
import json, threading
from processgpt_sync.pool import WorkerPool

busy, go = threading.Event(), threading.Event()
ran = []
waiting = WorkerPool(4, "records", wait_when_refused=True)
giving_back = WorkerPool(4, "claims")
waiting.submit(lambda: (busy.set(), go.wait(10), ran.append("first")))
giving_back.submit(go.wait, 10)  # it too has a busy thread
busy.wait(10)
"""

SUBMIT_WITH_NO_THREAD_LEFT = r"""
for n in range(3):  # each needs a thread the host refuses: they wait for the busy one
    waiting.submit(ran.append, n)
try:
    giving_back.submit(ran.append, "given back")
    refused = None
except RuntimeError as exc:
    refused = str(exc)
go.set()
for _ in range(1000):
    if len(ran) == 4:
        break
    threading.Event().wait(0.01)
threads = waiting.threads
waiting.shutdown()
giving_back.shutdown()
for ends in fillers:
    ends.set()
print(json.dumps({"filled": len(fillers), "ran": ran, "refused": refused, "threads": threads}))
"""


def test_a_pool_that_waits_runs_calls_the_host_has_no_thread_for_on_its_busy_thread() -> None:
    """Timed-out todos must be recorded, not given back: when the host refuses their pool a
    new thread (ulimit -u, a pids limit) while it has a busy one, they wait for that one, in
    order, instead of being recorded on the heartbeat's thread; a pool that gives its calls
    back still raises."""
    result = run_with_few_threads(POOL_WITH_ONE_THREAD + TAKE_EVERY_THREAD
                                  + SUBMIT_WITH_NO_THREAD_LEFT)
    assert result["filled"], "the child could not start any thread"
    assert result["ran"] == ["first", 0, 1, 2]
    assert result["threads"] == 1
    assert result["refused"] is not None and "thread" in str(result["refused"])


THREAD_BUDGET = r"""
import json, logging, resource, sys
import processgpt_sync as ps

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
outcome = {}
for workers in (100, 500):
    try:
        ps.start(lambda todo: {}, agent_orch="a", workers=workers,
                 database_url="postgresql://127.0.0.1:1/none", statement_timeout=1)
    except ps.ProcessGPTSyncError as exc:
        outcome[workers] = [type(exc).__name__, str(exc)]
outcome["soft"] = resource.getrlimit(resource.RLIMIT_NPROC)[0]
print(json.dumps(outcome))
"""


def test_the_thread_limit_is_raised_toward_the_hard_one_or_start_refuses_clearly() -> None:
    """A soft RLIMIT_NPROC below what the workers need is raised to the hard one, and said
    so (the start then fails only on the unreachable database); workers the hard limit
    cannot fit are refused with the numbers and the fix."""
    lower = as_nobody_with_threads(400)

    def preexec() -> None:
        lower()
        resource.setrlimit(resource.RLIMIT_NPROC, (40, 400))

    proc = subprocess.run([sys.executable, "-c", THREAD_BUDGET], cwd="/", capture_output=True,
                          text=True, timeout=60, preexec_fn=preexec,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "raised the thread limit (soft RLIMIT_NPROC) from 40 to 400" in proc.stderr
    assert result["soft"] == 400
    assert result["100"][0] != "ConfigurationError", result
    kind, message = result["500"]
    assert kind == "ConfigurationError"
    assert message.startswith("500 workers need up to ")
    assert "but RLIMIT_NPROC allows 400 threads: raise it (ulimit -u, LimitNPROC=" in message


def test_a_stop_step_left_behind_that_fails_later_is_logged(caplog) -> None:
    """A step the stop stopped waiting for, which fails once the link answers, is logged: its
    error is nobody else's to read."""
    from processgpt_sync.shutdown import bounded

    said = threading.Event()

    def fails_late():
        time.sleep(0.3)
        try:
            raise ConnectionError("server closed the connection")
        finally:
            said.set()

    with caplog.at_level(logging.WARNING, logger="processgpt_sync.shutdown"):
        assert bounded(fails_late, 0.05, "deregister") == (False, None)
        assert said.wait(5)
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [r.getMessage() for r in caplog.records if r.name == "processgpt_sync.shutdown"] == [
        "stopping: deregister, left behind unanswered, failed later: server closed the "
        "connection"]


SPAWN_A_PROCESS = r"""
import json, socket, subprocess
from processgpt_sync.infra import infrastructure_problem

try:
    subprocess.run(["true"], check=True)
    spawned = None
except OSError as exc:
    spawned = [type(exc).__name__, infrastructure_problem(exc)]
for ends in fillers:
    ends.set()
left, right = socket.socketpair()
left.setblocking(False)
try:
    left.recv(1)  # nothing to read: EAGAIN, the executor's own
    own = None
except BlockingIOError as exc:
    own = infrastructure_problem(exc)
print(json.dumps({"filled": len(fillers), "spawned": spawned, "own": own}))
"""


def test_a_process_the_host_refuses_to_start_is_the_hosts_failure() -> None:
    """An executor starting a process (a tool's subprocess, an MCP stdio server) on a host at
    its process limit gets EAGAIN from fork: the host's failure, so the todo is given back,
    not recorded FAILED; an EAGAIN of a non-blocking socket stays the executor's own."""
    result = run_with_few_threads(TAKE_EVERY_THREAD + SPAWN_A_PROCESS)
    assert result["filled"], "the child could not start any thread"
    assert result["spawned"] is not None, "the process started"
    kind, problem = result["spawned"]
    assert kind == "BlockingIOError"
    assert problem is not None and "the host refused a new process" in problem
    assert result["own"] is None
