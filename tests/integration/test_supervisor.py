"""serve --processes N: a supervisor over N server processes, and thread_safe = False."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

import processgpt_sync as ps
from tests.agents import ProcessWide
from tests.conftest import wait_for
from tests.integration.test_reliability import ROOT, scalar, stop_process


def supervise(database_url, *args, log):
    return subprocess.Popen(
        [sys.executable, "-m", "processgpt_sync", "serve", "tests.agents:ProcessWide",
         "--database-url", database_url, "--agent-orch", "pw", *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def enqueue(url, n):
    for _ in range(n):
        scalar(url, "SELECT processgpt_sync_enqueue_v1('pw', 'x')::text")


def pids(url):
    with_outputs = ("SELECT array_agg(DISTINCT (output ->> 'pid')::int) FROM todolist "
                    "WHERE output IS NOT NULL")
    return set(scalar(url, with_outputs) or [])


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_not_thread_safe_executor_refuses_more_than_one_worker():
    with pytest.raises(ps.ConfigurationError) as caught:
        ps.start(ProcessWide(), agent_orch="pw", workers=4)
    assert str(caught.value) == (
        "ProcessWide declares thread_safe = False, so it cannot run on 4 worker threads: use "
        "workers=1 and scale with processes (--processes 4 --workers 1)")


def test_a_not_thread_safe_executor_that_times_out_is_not_joined_by_the_next_todo(
        storage, db):
    """``thread_safe = False`` with one worker and a per-todo timeout: a todo that times out
    is recorded FAILED at once, but the next todo starts only once its executor has returned,
    not on a spare thread beside it, over the process-wide state it declared unsafe."""
    import threading

    running, most = [0], [0]
    lock = threading.Lock()

    class Unsafe:
        thread_safe = False

        def execute(self, todo, events):  # ignores todo.cancelled, as a stuck tool does
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(1.5)
            with lock:
                running[0] -= 1
            return {"ok": True}

    storage.enqueue("unsafe", "first")
    storage.enqueue("unsafe", "second")
    with ps.start(Unsafe(), agent_orch="unsafe", storage=storage, workers=1, timeout=0.5,
                  poll_interval=0.1) as server:
        wait_for(lambda: server.stats()["failed"] == 2, timeout=20)
    assert most[0] == 1, "the second todo ran beside the first, still running"


def test_the_cli_refuses_it_in_one_line_before_starting_processes():
    result = subprocess.run(
        [sys.executable, "-m", "processgpt_sync", "serve", "tests.agents:ProcessWide",
         "--agent-orch", "pw", "--workers", "2", "--processes", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--processes 2 --workers 1" in result.stderr


def test_processes_need_an_executor_that_can_reach_another_process():
    """What cannot be sent to a server process is named: the executor, ``setup``, or the
    setting (before, a lambda setting was blamed on the executor)."""
    with pytest.raises(ps.ConfigurationError, match=r"needs the executor .* module-level"):
        ps.serve(lambda todo: {}, agent_orch="pw", workers=1, processes=2)
    with pytest.raises(ps.ConfigurationError, match="needs setup to be sent"):
        ps.serve(ProcessWide(), agent_orch="pw", workers=1, processes=2, setup=lambda: None)
    with pytest.raises(ps.ConfigurationError, match="needs the setting summarize_feedback"):
        ps.serve(ProcessWide(), agent_orch="pw", workers=1, processes=2,
                 summarize_feedback=lambda items, current: "")


def test_a_restart_scheduled_as_the_stop_began_does_not_spin_the_supervisor(monkeypatch):
    """A child died just as the stop's signal came, and its restart was scheduled after the
    handler cleared the schedule: while stopping, the supervisor still waits on its children
    (here one that takes a second to end) instead of polling them in a busy loop, each wait
    of no time, until they all exited."""
    import multiprocessing
    import multiprocessing.connection

    from processgpt_sync.settings import Settings
    from processgpt_sync.supervisor import ChildSpec, Supervisor

    waits: list[float] = []
    real_wait = multiprocessing.connection.wait

    def recorded(objects, timeout=None):
        waits.append(timeout)
        return real_wait(objects, timeout)

    supervisor = Supervisor(ChildSpec(executor="tests.agents:quick",
                                      settings=Settings(agent_orch="pw")), 2)
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(1.0,))
    child.start()
    monkeypatch.setattr(multiprocessing.connection, "wait", recorded)
    try:
        supervisor._children[0] = child
        supervisor._started_at[0] = time.monotonic()
        supervisor._signals = 1
        supervisor._restart_at[1] = time.monotonic() - 1  # the stale restart
        while supervisor._children and len(waits) < 1000:
            supervisor._watch()
    finally:
        child.join(5)
    assert waits and min(waits) > 0, f"{waits.count(0.0)} waits of no time while stopping"
    assert not supervisor._restart_at


@pytest.mark.slow
def test_processes_serve_one_todo_each_restart_a_killed_child_and_stop_on_sigterm(
        database_url, tmp_path):
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        group = supervise(database_url, "--processes", "2", "--workers", "1",
                          "--metrics-port", "0", "--metrics-host", "127.0.0.1", log=log)
        try:
            wait_for(lambda: log_path.read_text().count("serving agent_orch=pw") == 2,
                     timeout=30)
            # port 0: each child on a free port of its own, which its log line names
            ports = {int(p) for p in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/",
                                                log_path.read_text())}
            assert len(ports) == 2 and min(ports) >= 1024, ports  # not 0 + i
            for port in ports:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    pass
            enqueue(database_url, 12)
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM todolist WHERE "
                                    "draft_status = 'COMPLETED'") == 12, timeout=60)
            first = pids(database_url)
            assert len(first) == 2 and group.pid not in first, "two children served"
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: log_path.read_text().count("serving agent_orch=pw") == 3,
                     timeout=30)
            enqueue(database_url, 20)
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM todolist WHERE "
                                    "draft_status = 'COMPLETED'") == 32, timeout=60)
            children = pids(database_url) - {victim}
            assert len(children) == 2, "the restarted child serves beside the survivor"
            registered = scalar(database_url, "SELECT array_agg(consumer ORDER BY consumer) "
                                "FROM processgpt_sync_server WHERE agent_orch = 'pw'")
            assert len(registered) == 2, "the restarted child took over its slot's row"
            group.send_signal(signal.SIGTERM)
            assert group.wait(30) == 0
        finally:
            stop_process(group)
    text = log_path.read_text()
    assert f"(pid {victim}) died with exit code -9" in text and "restarting in 1s" in text
    assert "two todos at once" not in text
    deadline = time.monotonic() + 5
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in children), "the children stopped with the supervisor"
    assert scalar(database_url, "SELECT count(*) FROM processgpt_sync_lease") == 0
    assert scalar(database_url, "SELECT count(*) FROM processgpt_sync_server") == 0, (
        "no row left behind for health to report dead")


def started_children(text):
    return [int(line.split("(pid ")[1].split(")")[0]) for line in text.splitlines()
            if "started server process" in line]


def serve_patient(database_url, grace, log):
    return subprocess.Popen(
        [sys.executable, "-m", "processgpt_sync", "serve", "tests.agents:patient",
         "--database-url", database_url, "--agent-orch", "rel", "--processes", "2",
         "--workers", "1", "--grace-seconds", str(grace)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_a_stop_that_signals_every_process_of_the_group_still_lets_the_todo_finish(
        database_url, tmp_path):
    """systemd's default stop sends SIGTERM to every process of the unit while the supervisor
    forwards its own: each child gets two SIGTERMs for one stop (here one after the other, as
    when the child handled systemd's before the supervisor's came), and still stops gracefully.
    A second signal to the supervisor is still an exit now."""
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        group = serve_patient(database_url, 30, log)
        try:
            wait_for(lambda: log_path.read_text().count("serving agent_orch=rel") == 2,
                     timeout=30)
            scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', '2')::text")
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM events") == 1,
                     timeout=30)
            for pid in started_children(log_path.read_text()):  # systemd's SIGTERM first
                os.kill(pid, signal.SIGTERM)
            wait_for(lambda: log_path.read_text().count("SIGTERM: stopping gracefully") == 2,
                     timeout=10)
            group.send_signal(signal.SIGTERM)  # then the supervisor's, forwarded
            assert group.wait(30) == 0, log_path.read_text()
        finally:
            stop_process(group)
    assert scalar(database_url, "SELECT draft_status::text FROM todolist") == "COMPLETED"
    assert "second signal" not in log_path.read_text()

    todo = scalar(database_url, "SELECT processgpt_sync_enqueue_v1('rel', '30')::text")
    with open(log_path, "w") as log:
        group = serve_patient(database_url, 60, log)
        try:
            wait_for(lambda: scalar(database_url, "SELECT count(*) FROM events "
                                    f"WHERE todo_id = '{todo}'") == 1, timeout=30)
            group.send_signal(signal.SIGTERM)
            wait_for(lambda: "stopping 2 server processes gracefully" in log_path.read_text(),
                     timeout=10)
            group.send_signal(signal.SIGTERM)
            assert group.wait(10) == 1, "the second signal does not wait for the 60 s grace"
        finally:
            stop_process(group)
    assert "second signal: exiting now" in log_path.read_text()
    assert scalar(database_url, "SELECT draft_status::text FROM todolist "
                  f"WHERE id = '{todo}'") == "STARTED", "left to its lease"


@pytest.mark.slow
def test_a_stop_while_the_children_still_start_is_a_clean_stop_of_all_of_them(
        database_url, tmp_path):
    """SIGTERM right after the children were started, before they set their own handlers:
    each ends, none is left serving, and the group exits 0 (a stop asked for, not a crash)."""
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        group = supervise(database_url, "--processes", "2", "--workers", "1", log=log)
        try:
            wait_for(lambda: "supervising 2 server processes" in log_path.read_text(),
                     timeout=30, interval=0.005)
            group.send_signal(signal.SIGTERM)
            assert group.wait(30) == 0, log_path.read_text()
        finally:
            stop_process(group)
    text = log_path.read_text()
    children = started_children(text)
    assert len(children) == 2, text
    deadline = time.monotonic() + 5
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in children), "no child serves on alone"
    assert "exited with" not in text, text


@pytest.mark.slow
def test_a_child_failing_on_its_configuration_stops_the_group_with_exit_2(
        empty_database_url, tmp_path):
    with open(tmp_path / "log", "w") as log:
        group = supervise(empty_database_url, "--processes", "2", "--workers", "1", log=log)
        try:
            assert group.wait(60) == 2
        finally:
            stop_process(group)
    text = (tmp_path / "log").read_text()
    assert "failed on its configuration; stopping the group" in text
    assert "restarting in" not in text



def test_a_child_the_database_refuses_at_start_stops_the_group_with_exit_2(
        database_url, db, tmp_path):
    """A role that may not call the library's functions (a wrong key, no grant) is refused
    at start: a restart would be refused again, so the group stops with 2, as one process
    does, instead of restarting for ever."""
    import uuid

    from psycopg.conninfo import make_conninfo

    role = f"no_grant_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC")
    try:
        with open(tmp_path / "log", "w") as log:
            group = supervise(make_conninfo(database_url, user=role), "--processes", "2",
                              "--workers", "1", log=log)
            try:
                assert group.wait(60) == 2
            finally:
                stop_process(group)
    finally:
        db.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC")
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")
    text = (tmp_path / "log").read_text()
    assert "permission denied" in text
    assert "failed on its configuration; stopping the group" in text
    assert "restarting in" not in text

@pytest.mark.slow
def test_serve_with_processes_from_python_runs_the_children_and_returns_on_sigterm(
        database_url, tmp_path):
    """``serve(..., processes=2, setup=configure)`` from a script: each process runs
    ``setup`` first, so its log has the script's format and level (a spawned process does not
    run the script's ``__main__`` block)."""
    script = ("import logging\n"
              "from processgpt_sync import serve\n"
              "from tests.agents import ProcessWide\n"
              "def configure():\n"
              "    logging.basicConfig(level=logging.INFO, format='in-child %(message)s')\n"
              "if __name__ == '__main__':\n"
              f"    serve(ProcessWide(), agent_orch='pw', workers=1, processes=2, "
              f"database_url={database_url!r}, setup=configure)\n")
    (tmp_path / "main.py").write_text(script)
    with open(tmp_path / "log", "w") as log:
        group = subprocess.Popen([sys.executable, str(tmp_path / "main.py")], cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            def both_served():
                enqueue(database_url, 4)  # until both children (started at their pace) served
                wait_for(lambda: scalar(database_url, "SELECT count(*) FROM todolist WHERE "
                                        "draft_status IS DISTINCT FROM 'COMPLETED'") == 0,
                         timeout=30)
                return len(pids(database_url)) == 2

            wait_for(both_served, timeout=60, interval=0.2)
            assert group.pid not in pids(database_url)
            group.send_signal(signal.SIGTERM)
            assert group.wait(30) == 0
        finally:
            stop_process(group)
    # each process ran setup first: its INFO lines in the script's format
    assert (tmp_path / "log").read_text().count("in-child serving agent_orch=pw") == 2


@pytest.mark.slow
def test_a_supervisor_that_fails_stops_its_children_before_the_error_reaches_the_caller(
        database_url):
    """The supervisor's own loop raising (here: its watch step, once both children served)
    must not leave the children serving on without it: they are stopped gracefully before
    run() raises."""
    from processgpt_sync.settings import Settings
    from processgpt_sync.supervisor import ChildSpec, Supervisor

    class FailsWhileWatching(Supervisor):
        def _watch(self) -> None:
            enqueue(database_url, 4)
            wait_for(lambda: len(pids(database_url)) == 2, timeout=60, interval=0.2)
            raise RuntimeError("the supervisor's loop failed")

    spec = ChildSpec(executor="tests.agents:ProcessWide",
                     settings=Settings(agent_orch="pw", workers=1, database_url=database_url,
                                       grace_seconds=5))
    with pytest.raises(RuntimeError, match="loop failed"):
        FailsWhileWatching(spec, 2).run()
    children = pids(database_url)
    assert len(children) == 2
    assert not any(alive(p) for p in children), "no child serves on without its supervisor"
    assert scalar(database_url, "SELECT count(*) FROM processgpt_sync_lease") == 0
