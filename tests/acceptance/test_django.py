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
