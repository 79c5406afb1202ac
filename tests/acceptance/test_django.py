"""The Django management command, run as a subprocess on examples/django_app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import wait_for

pytest.importorskip("django")
ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "django_app"
pytestmark = pytest.mark.slow


def test_worker_command_serves_orm_todos_with_bounded_connections(database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(APP)])}
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=APP,
                   env=env, check=True, timeout=120)
    dbname = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    enqueue = ("SELECT processgpt_sync_enqueue_v1('django-notes', 'note ' || g) "
               "FROM generate_series(%s::int, %s::int) g")
    with psycopg.connect(database_url, autocommit=True) as conn:
        peak = 0

        def finished(n):
            nonlocal peak
            peak = max(peak, conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchone()[0])
            return conn.execute("SELECT count(*) FROM todolist WHERE draft_status IN "
                                "('COMPLETED', 'FAILED')").fetchone()[0] >= n

        conn.execute(enqueue, (1, 100))
        log = open(tmp_path / "log", "w")
        proc = subprocess.Popen([sys.executable, "manage.py", "processgpt_worker", "--workers",
                                 "8"], cwd=APP, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: finished(100), timeout=90, interval=0.05)
            time.sleep(0.3)  # workers idle; their ORM connections stay open (CONN_MAX_AGE)
            killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM "
                                  "pg_stat_activity WHERE datname = %s AND "
                                  "pid <> pg_backend_pid()", (dbname,)).fetchone()[0]
            conn.execute(enqueue, (101, 200))
            wait_for(lambda: finished(200), timeout=90, interval=0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        notes = conn.execute("SELECT count(*) FROM notes_note").fetchone()[0]
        failed = conn.execute("SELECT count(*) FROM todolist WHERE draft_status = 'FAILED'"
                              ).fetchone()[0]
    output = (tmp_path / "log").read_text()
    assert killed >= 8, "the ORM connections of the worker threads were killed between jobs"
    assert (notes, failed) == (200, 0), output[-3000:]
    # 8 worker threads (plus spares) with one ORM connection each, the library's pool
    # (workers + 4), the listener and this test's own connection.
    assert peak <= 16 + 12 + 2, f"{peak} connections"


def test_worker_command_says_what_it_serves_and_takes_the_serve_options(database_url, tmp_path):
    pytest.importorskip("prometheus_client")
    import socket
    import urllib.request

    env = {**os.environ, "DATABASE_URL": database_url,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(APP)])}
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=APP,
                   env=env, check=True, timeout=120)
    refused = subprocess.run([sys.executable, "manage.py", "processgpt_worker", "--max-claims",
                              "0"], cwd=APP, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "max_claims must be a positive whole number" in refused.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for tenant in ("mine", "theirs"):
            conn.execute("SELECT processgpt_sync_enqueue_v1('django-notes', %s, p_tenant_id => %s)",
                         (f"note for {tenant}", tenant))
        out = open(tmp_path / "out", "w")
        proc = subprocess.Popen([sys.executable, "manage.py", "processgpt_worker", "--tenant",
                                 "mine", "--max-claims", "2", "--metrics-port", str(port),
                                 "--metrics-host", "127.0.0.1"], cwd=APP, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: conn.execute("SELECT count(*) FROM todolist WHERE draft_status = "
                                          "'COMPLETED'").fetchone()[0] == 1, timeout=60)
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            out.close()
        states = dict(conn.execute("SELECT tenant_id, coalesce(draft_status::text, '-') "
                                   "FROM todolist").fetchall())
    output = (tmp_path / "out").read_text()
    assert states == {"mine": "COMPLETED", "theirs": "-"}, output
    assert 'processgpt_sync_completed_total{agent_orch="django-notes"} 1.0' in body.decode()
    assert "serving agent_orch=django-notes with 4 workers" in output
    assert "tenant mine" in output and "stopped: 1 completed, 0 failed" in output
