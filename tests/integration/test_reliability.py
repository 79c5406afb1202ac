"""Crashes, pauses, shutdowns, database restarts and scale-out, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

import processgpt_sync as ps
from processgpt_sync import embedded
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def spawn(database_url, target, *args, log, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "processgpt_sync", "--log-level", "DEBUG", "serve", target,
         "--database-url", database_url, *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def scalar(url, sql, *params):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchone()[0]


def stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_kill_9_mid_todo_is_reclaimed_by_another_process(database_url, tmp_path):
    todo = scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', '60')::text")
    args = ["--agent-orch", "rel", "--workers", "2", "--lease-seconds", "2"]
    with open(tmp_path / "log", "w") as log:
        first = spawn(database_url, "tests.agents:patient", *args, log=log)
        try:
            wait_for(lambda: scalar(database_url, "SELECT draft_status::text FROM todolist")
                     == "STARTED", timeout=30)
            first.kill()
            first.wait()
            killed_at = time.monotonic()
            # a lease running out sends no NOTIFY: it is looked for every poll_interval
            second = spawn(database_url, "tests.agents:patient", *args, log=log,
                           env={"PROCESSGPT_POLL_INTERVAL": "1"})
            try:
                wait_for(lambda: scalar(database_url, "SELECT draft_status::text FROM todolist")
                         == "COMPLETED", timeout=20)
                reclaimed_after = time.monotonic() - killed_at
            finally:
                stop_process(second)
        finally:
            stop_process(first)
    assert reclaimed_after < 2 + 1 + 3, "within lease + poll_interval (+ process start-up)"
    output = scalar(database_url, "SELECT output FROM todolist WHERE id = %s::uuid", todo)
    assert (output["resume"], output["attempt"]) == ("reclaim", 2)
    assert output["pid"] == second.pid
    assert scalar(database_url, "SELECT count(*) FROM events WHERE event_type = "
                  "'crew_completed'") == 1


def test_a_process_restarted_under_its_name_gives_back_the_killed_ones_claims_at_once(
        database_url, tmp_path):
    """A supervisor (or a container restart) brings a killed server back under the same
    consumer name: its first heartbeat gives the killed run's claim back, so the todo runs
    again within seconds, long before the killed run's 60 s lease would have run out."""
    (tmp_path / "restart_agent.py").write_text(
        "import os, time\n"
        "def handle(todo):\n"
        "    marker = os.environ['MARKER']\n"
        "    if not os.path.exists(marker):\n"
        "        open(marker, 'w').close()\n"
        "        time.sleep(120)\n"
        "    return {'pid': os.getpid()}\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",
           "MARKER": str(tmp_path / "ran"), "PROCESSGPT_CONSUMER": "same-name"}
    args = [sys.executable, "-m", "processgpt_sync", "serve", "restart_agent:handle",
            "--database-url", database_url, "--agent-orch", "rel", "--lease-seconds", "60"]
    todo = scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', 'x')::text")
    with open(tmp_path / "log", "w") as log:
        first = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: (tmp_path / "ran").exists(), timeout=30)
            first.kill()
            first.wait()
            killed_at = time.monotonic()
            second = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      env=env)
            try:
                wait_for(lambda: scalar(database_url, "SELECT draft_status::text FROM "
                                        "todolist") == "COMPLETED", timeout=40)
                rerun_after = time.monotonic() - killed_at
            finally:
                stop_process(second)
        finally:
            stop_process(first)
    assert rerun_after < 20, f"{rerun_after:.1f} s: the 60 s lease was waited out"
    output = scalar(database_url, "SELECT output FROM todolist WHERE id = %s::uuid", todo)
    assert output["pid"] == second.pid


def test_a_paused_worker_whose_lease_was_taken_over_cannot_overwrite(database_url, tmp_path):
    scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', '1.5')::text")
    args = ["--agent-orch", "rel", "--workers", "1", "--lease-seconds", "1"]
    with open(tmp_path / "log", "w") as log:
        paused = spawn(database_url, "tests.agents:patient", *args, log=log)
        second = None
        try:
            wait_for(lambda: scalar(database_url, "SELECT draft_status::text FROM todolist")
                     == "STARTED", timeout=30)
            paused.send_signal(signal.SIGSTOP)
            second = spawn(database_url, "tests.agents:patient", *args, log=log)
            wait_for(lambda: scalar(database_url, "SELECT draft_status::text FROM todolist")
                     == "COMPLETED", timeout=20)
            paused.send_signal(signal.SIGCONT)
            time.sleep(2.5)  # the paused executor wakes, finishes and tries to write
        finally:
            stop_process(paused)
            if second is not None:
                stop_process(second)
    output = scalar(database_url, "SELECT output FROM todolist")
    assert output["pid"] == second.pid and output["resume"] == "reclaim"
    assert scalar(database_url, "SELECT count(*) FROM events WHERE event_type = "
                  "'crew_completed'") == 1
    text = (tmp_path / "log").read_text()
    assert "lease lost" in text or "write refused" in text


def test_sigterm_with_8_todos_in_flight_leaves_nothing_started(database_url, tmp_path):
    for _ in range(8):
        scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', '30')::text")
    args = ["--agent-orch", "rel", "--workers", "8", "--grace-seconds", "0.5"]
    with open(tmp_path / "log", "w") as log:
        proc = spawn(database_url, "tests.agents:patient", *args, log=log)
        try:
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM events") == 8, timeout=30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            stop_process(proc)
    assert scalar(database_url, "SELECT count(*) FROM todolist WHERE draft_status IS NULL") == 8
    assert scalar(database_url, "SELECT count(*) FROM todolist WHERE draft_status = "
                  "'STARTED'") == 0
    assert scalar(database_url, "SELECT count(*) FROM events") == 8, "0 lost events"
    assert scalar(database_url, "SELECT count(*) FROM processgpt_sync_lease") == 0


def test_a_second_sigterm_exits_at_once_and_leaves_the_todo_to_its_lease(database_url, tmp_path):
    scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', '30')::text")
    args = ["--agent-orch", "rel", "--workers", "1", "--grace-seconds", "60"]
    with open(tmp_path / "log", "w") as log:
        proc = spawn(database_url, "tests.agents:patient", *args, log=log)
        try:
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM events") == 1, timeout=30)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "stopping gracefully" in (tmp_path / "log").read_text(), timeout=10)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 1, "the second signal does not wait for the 60 s grace"
        finally:
            stop_process(proc)
    assert "second signal: exiting now" in (tmp_path / "log").read_text()
    assert scalar(database_url, "SELECT draft_status::text FROM todolist") == "STARTED"
    assert scalar(database_url, "SELECT count(*) FROM processgpt_sync_lease") == 1, (
        "the lease stays and expires; another worker reclaims the todo")


def test_scale_out_3_processes_run_1000_todos_exactly_once(database_url, tmp_path):
    args = ["--agent-orch", "rel", "--workers", "4"]
    with open(tmp_path / "log", "w") as log:
        procs = [spawn(database_url, "tests.agents:steady", *args, log=log) for _ in range(3)]
        try:
            # The work arrives once all three serve and have each run a todo, and lasts
            # seconds: two processes alone can finish 1,000 short todos before a third, slower
            # to start on a busy machine, has claimed any. Until then, a few todos at a time.
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM processgpt_sync_server "
                                    "WHERE agent_orch = 'rel'") == 3, timeout=60)
            warm_up = 0
            with psycopg.connect(database_url, autocommit=True) as conn:
                deadline = time.monotonic() + 60
                while scalar(database_url, "SELECT count(DISTINCT output->>'pid') FROM todolist "
                             "WHERE draft_status = 'COMPLETED'") < 3:
                    assert time.monotonic() < deadline, "a process never ran a todo"
                    conn.execute("SELECT processgpt_sync_enqueue_v1('rel', 'w' || g) "
                                 "FROM generate_series(%s::int, %s::int) g",
                                 (warm_up + 1, warm_up + 12))
                    warm_up += 12
                    time.sleep(0.2)
                conn.execute("SELECT processgpt_sync_enqueue_v1('rel', 'q' || g) "
                             "FROM generate_series(1, 1000) g")
            total = warm_up + 1000
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM todolist WHERE "
                                    "draft_status = 'COMPLETED'") == total, timeout=120)
        finally:
            for proc in procs:
                stop_process(proc)
    runs = scalar(database_url, "SELECT array_agg(n) FROM (SELECT count(*) AS n FROM events "
                  "WHERE event_type = 'task_working' GROUP BY todo_id) s")
    assert len(runs) == total and set(runs) == {1}, "each todo executed exactly once"
    served = scalar(database_url, "SELECT array_agg(n) FROM (SELECT count(*) AS n FROM todolist "
                    "WHERE query LIKE 'q%%' GROUP BY output->>'pid') s")
    assert len(served) == 3, f"all three processes served (todos per process: {served})"


def test_database_restart_under_load_loses_nothing(tmp_path):
    directory = tmp_path / "pgdata"
    url = embedded.start(directory)
    server_handle = embedded._pgserver().get_server(directory, cleanup_mode="stop")
    storage = PostgresStorage(url, max_connections=8)
    ids = [storage.enqueue("restart", f"q{i}") for i in range(60)]
    in_flight = threading.Semaphore(0)

    def handle(todo):
        for step in range(3):
            todo.events.progress({"step": step})
            time.sleep(0.05)
        in_flight.release()
        return {"ok": todo.input}

    server = ps.start(handle, agent_orch="restart", storage=storage, workers=4,
                      lease_seconds=30)
    try:
        assert in_flight.acquire(timeout=30)
        server_handle.stop()          # the database goes away mid-run
        time.sleep(1.5)
        server_handle.start()         # and comes back
        wait_for(lambda: scalar(url, "SELECT count(*) FROM todolist WHERE draft_status = "
                                "'COMPLETED'") == 60, timeout=90)
    finally:
        server.stop(timeout=10)
        storage.close()
    with psycopg.connect(url) as conn:
        events = conn.execute("SELECT todo_id, array_agg(coalesce((data->>'step')::int, -1) "
                              "ORDER BY timestamp) FROM events GROUP BY todo_id").fetchall()
    assert len(events) == len(ids)
    assert {tuple(steps) for _, steps in events} == {(0, 1, 2, -1)}, "complete and in order"
    embedded.stop(directory)
