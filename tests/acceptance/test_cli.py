"""The `processgpt-sync` command and the shipped wheel, run as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, env=None, timeout=120, check=True):
    result = subprocess.run([sys.executable, "-m", "processgpt_sync", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_init_db_enqueue_status(empty_database_url):
    url = ["--database-url", empty_database_url]
    assert "schema installed" in cli("init-db", *url).stdout
    assert "schema installed" in cli("init-db", *url).stdout, "idempotent"
    todo_id = cli("enqueue", *url, "--agent-orch", "cli-agent", "--input", "hi").stdout.strip()
    assert len(todo_id) == 36
    status = cli("status", *url).stdout
    assert "cli-agent" in status and "(claimable)" in status and " 1" in status


def test_errors_are_one_clear_line_without_a_traceback(empty_database_url, tmp_path):
    missing = cli("enqueue", "--database-url", empty_database_url, "--agent-orch", "a",
                  "--input", "x", check=False)
    assert missing.returncode == 2
    assert "init-db" in missing.stderr and "Traceback" not in missing.stderr
    unreachable = cli("status", "--database-url", f"postgresql://u@/db?host={tmp_path}",
                      check=False)
    assert unreachable.returncode == 2 and "database unreachable" in unreachable.stderr
    bad_target = cli("serve", "no_such_module:handle", "--agent-orch", "a",
                     "--database-url", empty_database_url, check=False)
    assert bad_target.returncode == 2 and "cannot import 'no_such_module'" in bad_target.stderr


def test_demo_on_a_fresh_embedded_database(tmp_path):
    result = cli("demo", "--todos", "6", env={"PROCESSGPT_EMBEDDED_DIR": str(tmp_path / "pg")})
    assert "6/6 completed" in result.stdout
    assert result.stdout.count("COMPLETED") == 6
    subprocess.run([sys.executable, "-c", "from processgpt_sync import embedded; "
                    f"embedded.stop({str(tmp_path / 'pg')!r})"], check=True, timeout=60)


def test_serve_subprocess_serves_then_drains_on_sigterm(database_url, tmp_path):
    (tmp_path / "slow_agent.py").write_text(
        "import time\n"
        "def handle(todo):\n"
        "    todo.events.progress('working')\n"
        "    time.sleep(0.5)\n"
        "    return {'done': todo.input}\n")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for i in range(4):
            conn.execute("SELECT processgpt_sync_enqueue_v1('sub', %s)", (f"q{i}",))
    proc = subprocess.Popen(
        [sys.executable, "-m", "processgpt_sync", "--log-format", "json", "serve",
         "slow_agent:handle", "--agent-orch", "sub", "--workers", "4",
         "--database-url", database_url],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT count(*) FROM todolist WHERE draft_status = "
                                          "'STARTED'").fetchone()[0] == 4, timeout=30)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert '"action": "stop_server"' in stderr
    with psycopg.connect(database_url) as conn:
        states = conn.execute("SELECT draft_status::text, count(*) FROM todolist GROUP BY 1"
                              ).fetchall()
    assert states == [("COMPLETED", 4)], "in-flight todos finished within the grace period"


@pytest.mark.slow
def test_wheel_ships_the_sql_and_examples(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("processgpt_sync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("processgpt_sync/sql/schema.sql", "processgpt_sync/sql/functions.sql",
                     "processgpt_sync/sql/queries.sql", "processgpt_sync/examples/quickstart.py",
                     "processgpt_sync/examples/blocking_executor.py", "processgpt_sync/py.typed"):
        assert required in names
    sql = zipfile.ZipFile(wheel).read("processgpt_sync/sql/functions.sql").decode()
    assert sql == (ROOT / "sql/functions.sql").read_text(), "the wheel ships the one source"


def test_asked_lists_open_questions_and_respond_answers_them(database_url):
    import processgpt_sync as ps
    from processgpt_sync.storage.postgres import PostgresStorage

    storage = PostgresStorage(database_url)
    storage.enqueue("cli-hitl", "x")
    url = ["--database-url", database_url]
    try:
        with ps.start(lambda todo: {"answer": todo.ask_human("Ship it?", kind="confirm")},
                      agent_orch="cli-hitl", storage=storage) as server:
            listing = wait_for(lambda: "Ship it?" in (out := cli("asked", *url).stdout) and out)
            job_id = next(line.split()[0] for line in listing.splitlines()
                          if "Ship it?" in line)
            assert "answered" in cli("respond", *url, job_id, "true").stdout
            wait_for(lambda: server.stats()["completed"] == 1)
        assert "(no open questions)" in cli("asked", *url).stdout
        unknown = cli("respond", *url, "human_asked_nope", "x", check=False)
        assert unknown.returncode == 2 and "no question with job_id" in unknown.stderr
    finally:
        storage.close()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT output FROM todolist").fetchone()[0] == {"answer": True}


def test_health_exit_codes_for_container_probes(database_url, empty_database_url, tmp_path):
    healthy = cli("health", "--database-url", database_url, check=False)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "LISTEN/NOTIFY round trip" in healthy.stdout
    missing = cli("health", "--database-url", empty_database_url, check=False)
    assert missing.returncode == 4 and "processgpt_sync_claim_v1" in missing.stdout
    unreachable = cli("health", "--database-url", f"postgresql://u@/db?host={tmp_path}",
                      check=False)
    assert unreachable.returncode == 3 and "FAIL database" in unreachable.stdout


def test_status_watch_refreshes_until_interrupted(database_url):
    proc = subprocess.Popen([sys.executable, "-m", "processgpt_sync", "status", "--watch",
                             "--interval", "0.2", "--database-url", database_url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert out.count("agent_orch") >= 2, out
