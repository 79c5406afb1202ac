"""CLI output: tables through rich, colours only on a terminal without NO_COLOR, --json."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import processgpt_sync as ps
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "processgpt_sync"]


def run(*args, env=None):
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def on_a_terminal(*args, env=None, until=lambda out: False, timeout=30.0):
    """Run the CLI with stdout on a pseudo-terminal; stop it with SIGINT once ``until(out)``."""
    master, slave = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=slave, stderr=subprocess.PIPE,
                            env={**environment, "TERM": "xterm-256color", **(env or {})})
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if until(out.decode(errors="replace")):
                    proc.send_signal(signal.SIGINT)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=20)
    finally:
        os.close(master)
        assert proc.stderr is not None
        errors = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode in (0, 130), errors
    return proc.returncode, out.decode(errors="replace")


def test_status_json_gives_the_counts(database_url):
    storage = PostgresStorage(database_url)
    try:
        storage.enqueue("json-agent", "a")
        storage.enqueue("json-agent", "b")
    finally:
        storage.close()
    done = run("status", "--json", "--database-url", database_url)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == [
        {"agent_orch": "json-agent", "draft_status": None, "claimable": True,
         "in_trash": False, "count": 2}]
    assert [(t["agent_orch"], t["queued"], t["running"]) for t in report["tenants"]] == [
        ("json-agent", 2, 0)]


def test_asked_json_lists_the_open_question(database_url):
    storage = PostgresStorage(database_url)
    storage.enqueue("json-hitl", "x")
    url = ["--database-url", database_url]
    try:
        with ps.start(lambda todo: {"ok": todo.ask_human("Ship it?", kind="confirm")},
                      agent_orch="json-hitl", storage=storage) as server:
            listing = wait_for(lambda: json.loads(run("asked", "--json", *url).stdout))
            (question,) = listing
            assert question["question"]["question"] == "Ship it?"
            assert question["agent_orch"] == "json-hitl" and question["waiting"] is True
            assert run("respond", *url, question["job_id"], "true").returncode == 0
            wait_for(lambda: server.stats()["completed"] == 1)
        assert json.loads(run("asked", "--json", *url).stdout) == []
    finally:
        storage.close()


def test_health_json_reports_each_check_and_keeps_the_exit_codes(database_url,
                                                                  empty_database_url):
    healthy = run("health", "--json", "--database-url", database_url)
    report = json.loads(healthy.stdout)
    assert healthy.returncode == 0 and report["healthy"] is True and report["exit_code"] == 0
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [
        ("database", True), ("schema", True), ("listen", True)]
    missing = run("health", "--json", "--database-url", empty_database_url)
    report = json.loads(missing.stdout)
    assert missing.returncode == 4 and report == {**report, "healthy": False, "exit_code": 4}
    assert report["checks"][-1]["name"] == "schema"
    assert report["checks"][-1]["detail"].startswith("missing SQL functions: processgpt_sync_")


def test_colours_only_on_a_terminal_without_no_color(database_url):
    code, coloured = on_a_terminal("health", "--database-url", database_url)
    assert code == 0 and "\x1b[" in coloured and "LISTEN/NOTIFY round trip" in coloured
    code, plain = on_a_terminal("health", "--database-url", database_url, env={"NO_COLOR": "1"})
    assert code == 0 and "\x1b[" not in plain and "ok   listen" in plain
    piped = run("health", "--database-url", database_url)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout


def test_status_watch_redraws_in_place_on_a_terminal(database_url):
    code, out = on_a_terminal("status", "--watch", "--interval", "0.1", "--database-url",
                              database_url, until=lambda out: out.count("(no todos)") >= 3)
    assert code == 130
    assert out.count("(no todos)") >= 3
    assert "\x1b[2K" in out  # rich's Live erases and redraws its lines


def test_status_watch_json_prints_one_document_per_refresh(database_url):
    proc = subprocess.Popen([*CLI, "status", "--watch", "--json", "--interval", "0.1",
                             "--database-url", database_url], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 130
    empty = {"counts": [], "tenants": [], "servers": []}
    assert [json.loads(line) for line in lines] == [empty] * 3
