"""A todo's life across the server's threads: cancels that never wait on executor code, one run
per claim, every executor ending recorded, data snapshotted when handed over, writer threads
that survive a bad item, deadlines counted from the executor's start."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from typing import Any

import psycopg
import pytest

import processgpt_sync as ps
from processgpt_sync.event_writer import EventBuffer
from processgpt_sync.models import Claim
from processgpt_sync.outcomes import Outcome, OutcomeWriter
from tests.conftest import wait_for

a2a = pytest.importorskip("a2a")

from a2a.server.agent_execution import AgentExecutor, RequestContext  # noqa: E402
from a2a.server.events import EventQueue  # noqa: E402

from tests import a2a_events as ev  # noqa: E402


def row(db, todo_id):
    return db.execute("SELECT *, id::text AS id, draft_status::text AS state FROM todolist "
                      "WHERE id = %s", (todo_id,)).fetchone()


def event_data(db, todo_id, event_type="task_working"):
    return [e["data"] for e in db.execute(
        "SELECT data FROM events WHERE todo_id = %s AND event_type = %s ORDER BY timestamp",
        (todo_id, event_type))]


# -- cancels never wait on executor code ---------------------------------------------------------


class LoopBlocker(AgentExecutor):
    """Blocks its event loop inside ``async def`` (CrewAI ``kickoff()``) until released; the
    "well" todo awaits politely."""

    def __init__(self, hold: threading.Event, runs: list[str]) -> None:
        self.hold = hold
        self.runs = runs
        self.blocking = threading.Event()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        self.runs.append(text)
        if text == "block":
            self.blocking.set()
            self.hold.wait(30)  # a blocking call: the loop cannot take anything meanwhile
        else:
            await asyncio.sleep(3)  # > 2 leases of 1 s
            row = context.get_context_data()["row"]
            event_queue.enqueue_event(ev.artifact({"well": True}, row["id"], row["id"]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


def test_cancelling_an_executor_that_blocks_its_loop_does_not_stall_lease_renewal(
        storage, db, database_url):
    """The heartbeat cancels a todo whose event loop is blocked; it must go on renewing the
    other todos' leases, or a rival server runs them a second time."""
    hold = threading.Event()
    runs: list[str] = []
    block = storage.enqueue("a", "block")
    well = storage.enqueue("a", "well")
    executor = LoopBlocker(hold, runs)
    first = ps.start(executor, agent_orch="a", storage=storage, workers=2, lease_seconds=1)
    rival = None
    try:
        wait_for(lambda: sorted(runs) == ["block", "well"])
        assert executor.blocking.wait(10)
        # "block" loses its lease: the heartbeat cancels it (the executor's loop is blocked).
        db.execute("UPDATE todolist SET claim_token = gen_random_uuid() WHERE id = %s", (block,))
        rival = ps.start(lambda todo: runs.append(f"rival {todo.input}") or {"rival": True},
                         agent_orch="a", database_url=database_url, workers=2,
                         lease_seconds=1, poll_interval=0.2)
        wait_for(lambda: row(db, well)["state"] == "COMPLETED", timeout=20)
    finally:
        hold.set()
        if rival is not None:
            rival.stop(timeout=5)
        first.stop(timeout=5)
    assert "rival well" not in runs, "the well-behaved todo ran once"
    assert (row(db, well)["output"], row(db, well)["claim_count"]) == ({"well": True}, 1)


def test_stop_returns_while_an_a2a_executor_blocks_its_event_loop(storage, db):
    hold = threading.Event()
    todo_id = storage.enqueue("a", "block")
    executor = LoopBlocker(hold, [])
    server = ps.start(executor, agent_orch="a", storage=storage, workers=1)
    stopper = threading.Thread(target=server.stop, kwargs={"timeout": 0.2}, daemon=True)
    try:
        assert executor.blocking.wait(10)
        stopper.start()
        stopper.join(20)
        stopped_while_blocked = not stopper.is_alive()
    finally:
        hold.set()
        if stopper.ident is None:
            server.stop(timeout=5)
        stopper.join(30)
    assert stopped_while_blocked, "stop() waited for the executor's blocked loop"
    assert row(db, todo_id)["state"] is None, "given back"


class StuckHook:
    """A blocking executor object whose cancel hook never returns for the first todo."""

    def __init__(self) -> None:
        self.entered: dict[str, threading.Event] = {"stuck": threading.Event(),
                                                    "next": threading.Event()}
        self.release = threading.Event()

    def execute(self, todo, events):
        self.entered[todo.input].set()
        todo.cancel_event.wait(30)
        return {"cancelled": todo.cancelled}

    def cancel(self, todo):
        if todo.input == "stuck":
            self.release.wait(30)


def test_a_cancel_hook_that_never_returns_does_not_hold_up_other_cancels(storage, db):
    executor = StuckHook()
    stuck = storage.enqueue("a", "stuck")
    nxt = storage.enqueue("a", "next")
    server = ps.start(executor, agent_orch="a", storage=storage, workers=2)
    try:
        assert executor.entered["stuck"].wait(10) and executor.entered["next"].wait(10)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (stuck,))
        wait_for(lambda: row(db, stuck)["consumer"] is None)  # cancelled and given back
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (nxt,))
        wait_for(lambda: server.stats()["cancelled"] == 2, timeout=10)
    finally:
        executor.release.set()
        server.stop(timeout=5)
    assert row(db, nxt)["state"] == "CANCELLED" and row(db, nxt)["consumer"] is None


def threads_named(prefix: str) -> int:
    return sum(t.name.startswith(prefix) for t in threading.enumerate())


def peak_while(prefix: str, until: Any, timeout: float = 20) -> int:
    """The most live threads named ``prefix…`` seen every 5 ms until ``until()`` holds."""
    peak, end = 0, time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, f"timed out; peak so far {peak}"
        peak = max(peak, threads_named(prefix))
        time.sleep(0.005)
    return max(peak, threads_named(prefix))


class SlowHooks:
    """Every todo waits to be cancelled; the cancel hooks of the todos named in ``blocking``
    block until released, the others return at once."""

    def __init__(self, todos: int, blocking: Any) -> None:
        self.entered = threading.Barrier(todos + 1)
        self.blocking = blocking
        self.release = threading.Event()
        self.hooks_began: list[str] = []
        self.hooks_ended: list[str] = []

    def execute(self, todo, events):
        self.entered.wait(10)
        todo.cancel_event.wait(30)
        return None

    def cancel(self, todo):
        self.hooks_began.append(todo.input)
        if todo.input in self.blocking:
            self.release.wait(30)
        self.hooks_ended.append(todo.input)


def test_many_todos_cancelled_at_once_run_their_hooks_on_a_few_threads(storage, db):
    """24 todos cancelled together, each hook blocking for a moment: at most HOOK_THREADS hook
    threads at any time (before: one thread each, 24); the executors see the cancel at once,
    every hook runs once the first ones return, and the hook threads then end."""
    from processgpt_sync.hooks import HOOK_THREADS
    todos = 24
    names = [f"t{n}" for n in range(todos)]
    executor = SlowHooks(todos, blocking=set(names))
    ids = [storage.enqueue("a", name) for name in names]
    server = ps.start(executor, agent_orch="a", storage=storage, workers=todos)
    try:
        executor.entered.wait(10)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = ANY(%s::uuid[])",
                   (ids,))
        peak = peak_while("processgpt-sync-cancel-hook",
                          lambda: server.stats()["cancelled"] == todos)
        assert len(executor.hooks_began) == HOOK_THREADS, "the rest wait their turn"
        assert peak == HOOK_THREADS, peak
        executor.release.set()
        wait_for(lambda: len(executor.hooks_ended) == todos, timeout=10)
        assert sorted(executor.hooks_ended) == sorted(names), "each hook ran once"
        wait_for(lambda: threads_named("processgpt-sync-cancel-hook") == 0, timeout=5)
    finally:
        executor.release.set()
        server.stop(timeout=5)
    assert {row(db, i)["state"] for i in ids} == {"CANCELLED"}


def test_hooks_stuck_on_a_dead_service_do_not_hold_up_the_next_ones(storage, db, caplog,
                                                                    monkeypatch):
    """HOOK_THREADS hooks block (a remote cancel to a service that is down): a hook after them
    waits only until they have run HOOK_STUCK_AFTER seconds, then runs on a thread of its own,
    and the stuck ones are named."""
    from processgpt_sync import hooks
    monkeypatch.setattr(hooks, "HOOK_STUCK_AFTER", 0.5)
    stuck = [f"stuck{n}" for n in range(hooks.HOOK_THREADS)]
    executor = SlowHooks(len(stuck) + 1, blocking=set(stuck))
    stuck_ids = [storage.enqueue("a", name) for name in stuck]
    quick_id = storage.enqueue("a", "quick")
    server = ps.start(executor, agent_orch="a", storage=storage, workers=len(stuck) + 1)
    try:
        executor.entered.wait(10)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = ANY(%s::uuid[])",
                   (stuck_ids,))
        wait_for(lambda: len(executor.hooks_began) == len(stuck))
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (quick_id,))
        wait_for(lambda: "quick" in executor.hooks_ended, timeout=5)
        assert not set(stuck) & set(executor.hooks_ended), "the stuck ones still block"
        assert "has run for" in caplog.text and "the next waiting hooks" in caplog.text
    finally:
        executor.release.set()
        server.stop(timeout=5)
    wait_for(lambda: len(executor.hooks_ended) == len(stuck) + 1)


def test_many_todos_timing_out_at_once_are_recorded_on_a_few_threads(storage, db, database_url):
    """24 todos time out together while their events' write waits on a lock: recording a
    timeout waits for that write, on at most TIMED_OUT_THREADS threads (before: one thread
    each, 24); the heartbeat is not among them, and every todo is recorded FAILED once the
    write goes through."""
    from processgpt_sync.budget import TIMED_OUT_THREADS
    todos = 24
    started = threading.Barrier(todos + 1)

    def handle(todo):
        started.wait(10)
        todo.events.progress("begun")  # all 24 together: one batch, its write held up
        while not todo.cancelled:
            time.sleep(0.01)
        return None

    ids = [storage.enqueue("a", f"t{n}") for n in range(todos)]
    with psycopg.connect(database_url) as locker:
        locker.execute("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
        server = ps.start(handle, agent_orch="a", storage=storage, workers=todos, timeout=1.0)
        try:
            started.wait(10)
            peak = peak_while("processgpt-sync-timed-out",
                              lambda: threads_named("processgpt-sync-timed-out")
                              == TIMED_OUT_THREADS)
            time.sleep(1.0)  # every todo past its deadline: the rest wait their turn
            peak = max(peak, peak_while("processgpt-sync-timed-out", lambda: True))
            assert peak == TIMED_OUT_THREADS, peak
            assert server.stats()["failed"] == 0, "nothing recorded while the write waits"
            locker.rollback()
            wait_for(lambda: server.stats()["failed"] == todos, timeout=20)
        finally:
            server.stop(timeout=5)
    state = [row(db, i) for i in ids]
    assert {r["state"] for r in state} == {"FAILED"}
    assert all("timed out after 1 s" in r["log"] for r in state), state[0]["log"]
    assert len(db.execute("SELECT 1 FROM events WHERE data::text LIKE '%%begun%%'").fetchall()) \
        == todos, "each todo's event written once"


# -- one run per claim ---------------------------------------------------------------------------


def test_a_revision_claimed_mid_run_tells_the_first_run_and_keeps_the_second_runs_events(
        storage, db):
    """The UI asks for a revision while the todo runs: the same server claims it again. The
    first run learns it lost the todo; finishing, it must not take the second run's events."""
    todo_id = storage.enqueue("a", "x")
    first_started, second_emitted = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def handle(todo):
        if todo.resume.kind == "fresh":
            todo.events.progress("first")
            first_started.set()
            second_emitted.wait(10)
            seen["first told"] = todo.cancelled
            return {"run": "first"}
        todo.events.progress("second")  # still queued when the first run finishes
        second_emitted.set()
        time.sleep(0.3)
        return {"run": "second"}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=2)
    try:
        assert first_started.wait(10)
        wait_for(lambda: event_data(db, todo_id) == [{"message": "first"}])  # it is written
        db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', "
                   "feedback = '[{\"content\": \"again\"}]' WHERE id = %s", (todo_id,))
        wait_for(lambda: row(db, todo_id)["state"] == "COMPLETED")
        wait_for(lambda: server.stats()["running"] == 0)
    finally:
        second_emitted.set()
        server.stop(timeout=5)
    assert seen["first told"], "the first run was told it lost the todo"
    assert row(db, todo_id)["output"] == {"run": "second"}
    assert event_data(db, todo_id) == [{"message": "first"}, {"message": "second"}]
    assert server.stats()["lost"] == 1


# -- every executor ending is recorded -----------------------------------------------------------


def exit_from_argparse(todo):
    argparse.ArgumentParser(prog="tool").parse_args(["--nope"])


def interrupt(todo):
    raise KeyboardInterrupt


def cancelled_error_from_asyncio_run(todo):
    async def work():
        raise asyncio.CancelledError

    return asyncio.run(work())


@pytest.mark.parametrize(("executor", "message"), [
    (exit_from_argparse, "SystemExit: 2"),
    (interrupt, "KeyboardInterrupt"),
    (cancelled_error_from_asyncio_run, "CancelledError"),
])
def test_an_executor_raising_a_base_exception_fails_and_frees_its_slot(
        storage, db, executor, message):
    bad = storage.enqueue("a", "bad")
    server = ps.start(lambda todo: executor(todo) if todo.input == "bad" else {"ok": True},
                      agent_orch="a", storage=storage, workers=1)
    try:
        wait_for(lambda: row(db, bad)["state"] == "FAILED")
        good = storage.enqueue("a", "good")  # the only slot is free again
        wait_for(lambda: row(db, good)["state"] == "COMPLETED")
    finally:
        server.stop(timeout=5)
    assert message in row(db, bad)["log"]
    assert server.stats()["failed"] == 1


# -- data is snapshotted where it is handed over --------------------------------------------------


def test_events_and_results_keep_the_data_they_were_given(storage, db):
    todo_id = storage.enqueue("a", "x")

    def handle(todo):
        step: dict[str, Any] = {}
        for n in range(5):
            step["n"] = n
            todo.events.progress(step)
        result = {"n": 5}
        todo.events.result(result)
        result["n"] = 6
        return None

    server = ps.start(handle, agent_orch="a", storage=storage, workers=1)
    try:
        wait_for(lambda: row(db, todo_id)["state"] == "COMPLETED")
    finally:
        server.stop(timeout=5)
    assert event_data(db, todo_id) == [{"n": n} for n in range(5)]
    assert row(db, todo_id)["output"] == {"n": 5}


def test_a_value_that_is_not_json_added_after_it_was_handed_over_harms_nothing(storage, db):
    first = storage.enqueue("a", "first")

    def handle(todo):
        data = {"step": 1}
        todo.events.progress(data)
        result = {"done": True}
        todo.events.result(result)
        if todo.input == "first":
            data["late"] = object()
            result["late"] = object()
        return None

    server = ps.start(handle, agent_orch="a", storage=storage, workers=1)
    try:
        wait_for(lambda: row(db, first)["state"] is not None
                 and row(db, first)["state"] != "STARTED")
        second = storage.enqueue("a", "second")
        wait_for(lambda: row(db, second)["state"] == "COMPLETED")
    finally:
        server.stop(timeout=5)
    assert row(db, first)["state"] == "COMPLETED" and row(db, first)["output"] == {"done": True}
    assert event_data(db, first) == event_data(db, second) == [{"step": 1}]


def claim_of(storage, agent_orch="w"):
    (item,) = storage.claim(agent_orch=agent_orch, consumer="test", limit=1, lease_seconds=60,
                            max_claims=5, tenant_id=None)
    return item


def event_row(claim: Claim, data: Any) -> dict[str, Any]:
    return {"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
            "data": data, "job_id": None, "crew_type": None, "status": None}


def test_the_event_writer_survives_an_event_it_cannot_encode(storage, db, caplog):
    storage.enqueue("w", "x")
    claim = claim_of(storage)
    buffer = EventBuffer(storage, flush_interval=0.01, batch_size=100)
    buffer.start()
    try:
        with caplog.at_level(logging.WARNING):
            buffer.add(event_row(claim, {"bad": object()}))  # bypasses the call-site check
            buffer.add(event_row(claim, {"good": 1}))
            assert buffer.flush(timeout=10)
            buffer.add(event_row(claim, {"later": 2}))
            assert buffer.flush(timeout=10)
    finally:
        buffer.close(timeout=5)
    assert event_data(db, claim.todo_id) == [{"good": 1}, {"later": 2}]
    assert "not JSON serializable" in caplog.text or "not JSON-serialisable" in caplog.text


def test_an_event_write_that_fails_after_stop_gave_up_on_it_ends_the_writer(
        storage, db, database_url, caplog):
    """stop() waits for event writes within its bound, then closes the buffer; a write still
    under way that fails afterwards is reported as not written (not "will retry") and the
    writer thread ends instead of retrying against a stopped server."""
    storage.enqueue("w", "x")
    claim = claim_of(storage)
    buffer = EventBuffer(storage, flush_interval=0.01, batch_size=100)
    buffer.start()
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        buffer.add(event_row(claim, {"n": 1}))  # its write waits on the table lock
        waiting = wait_for(lambda: db.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%record_events%%'").fetchone())
        with caplog.at_level(logging.WARNING):
            assert not buffer.close(timeout=0.2), "the write is still under way"
            db.execute("SELECT pg_terminate_backend(%s)", (waiting["pid"],))
            wait_for(lambda: not buffer._thread.is_alive())
    assert "1 events not written: the server stopped" in caplog.text
    assert "will retry" not in caplog.text
    assert event_data(db, claim.todo_id) == []


def test_the_outcome_writer_refuses_only_the_outcome_it_cannot_encode(storage, db):
    storage.enqueue("w", "bad")
    bad = claim_of(storage)
    storage.enqueue("w", "good")
    good = claim_of(storage)
    writer = OutcomeWriter(storage, abort=threading.Event())
    writer.start()
    answers: dict[str, Any] = {}

    def write(name, outcome):
        try:
            answers[name] = writer.write(outcome)
        except Exception as exc:
            answers[name] = exc

    try:
        outcomes = [("bad", Outcome(bad, "completed", result={"x": object()})),
                    ("good", Outcome(good, "completed", result={"x": 1}))]
        threads = [threading.Thread(target=write, args=item, daemon=True) for item in outcomes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not any(t.is_alive() for t in threads), "a writer waits for ever"
    finally:
        writer.close(timeout=5)
    assert isinstance(answers["bad"], Exception)
    assert answers["good"].applied
    assert row(db, good.todo_id)["state"] == "COMPLETED"


def test_a_writer_thread_that_dies_anyway_reports_it(storage):
    died: list[tuple[str, BaseException]] = []

    def boom(n: int) -> None:
        raise SystemExit("counter broke")

    storage.enqueue("w", "x")
    claim = claim_of(storage)
    buffer = EventBuffer(storage, flush_interval=0.01, batch_size=100, on_written=boom,
                         on_crash=lambda name, exc: died.append((name, exc)))
    buffer.start()
    try:
        buffer.add(event_row(claim, {"n": 1}))
        wait_for(lambda: died)
    finally:
        buffer.close(timeout=1)
    assert died[0][0] == "event writer" and isinstance(died[0][1], SystemExit)


# -- refused writes on the timeout path ------------------------------------------------------------


def test_a_refused_write_on_the_timeout_path_does_not_stop_the_server(storage, db):
    db.execute("""
        CREATE FUNCTION refuse_failed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused by a site rule'; END $$;
        CREATE TRIGGER refuse_failed BEFORE UPDATE ON todolist FOR EACH ROW
        WHEN (NEW.draft_status = 'FAILED' AND NEW.query = 'hang') EXECUTE FUNCTION refuse_failed();
    """)
    release = threading.Event()
    hung = storage.enqueue("a", "hang")

    def handle(todo):
        if todo.input == "hang":
            release.wait(30)
        return {"ok": True}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=1, timeout=0.3)
    try:
        wait_for(lambda: server.stats()["running"] == 0 and row(db, hung)["state"] == "STARTED")
        time.sleep(0.5)
        after = storage.enqueue("a", "after")
        wait_for(lambda: row(db, after)["state"] == "COMPLETED")
    finally:
        release.set()
        server.stop(timeout=5)
    assert server.failure is None


# -- deadlines count from the executor's start -----------------------------------------------------


def test_no_todo_is_claimed_while_timed_out_executors_hold_every_thread_and_none_runs_twice(
        storage, db):
    """Two executors ignore their timeout and hold the worker thread and the spare one. The
    third todo must stay unclaimed (another server may take it) rather than wait for a thread
    under this server's lease, then run once, without a timeout counted before it started."""
    release = threading.Event()
    started: list[str] = []
    ids = [storage.enqueue("a", name) for name in ("hang 1", "hang 2", "queued")]

    def handle(todo):
        started.append(todo.input)
        if todo.input.startswith("hang"):
            release.wait(30)  # ignores todo.cancelled
        return {"ran": todo.input}

    server = ps.start(handle, agent_orch="a", storage=storage, workers=1, timeout=0.5,
                      poll_interval=0.1)
    try:
        wait_for(lambda: [row(db, i)["state"] for i in ids[:2]] == ["FAILED", "FAILED"])
        time.sleep(1.0)  # two timeouts' worth
        queued_state = row(db, ids[2])["state"]
        release.set()
        wait_for(lambda: row(db, ids[2])["state"] not in (None, "STARTED"))
        time.sleep(0.3)
    finally:
        release.set()
        server.stop(timeout=5)
    assert queued_state is None, "not claimed while no thread could run it"
    assert row(db, ids[2])["state"] == "COMPLETED"
    assert started.count("queued") == 1


def test_what_an_executor_raises_after_its_todo_was_cancelled_is_said_not_recorded(
        storage, db, caplog):
    """The UI cancels; the executor, unwinding, raises (a bug in its cleanup). The todo ends
    CANCELLED as the cancel says, and what it raised is logged, naming the todo. Before, the
    exception vanished without a line."""
    import logging

    import processgpt_sync as ps
    from tests.conftest import wait_for

    def handle(todo):
        todo.cancel_event.wait(20)
        raise KeyError("a bug in the executor's cleanup")

    todo_id = storage.enqueue("a", "q")
    with caplog.at_level(logging.INFO, "processgpt_sync"), ps.start(
            handle, agent_orch="a", storage=storage, workers=1) as server:
        wait_for(lambda: server.stats()["running"] == 1)
        storage.call("cancel", {"p_todo_id": todo_id})
        wait_for(lambda: server.stats()["cancelled"] == 1, timeout=20)
    said = [r for r in caplog.records if "when its executor raised" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert todo_id in said[0].getMessage() and "a bug in the executor's cleanup" in (
        said[0].getMessage())
    assert db.execute("SELECT draft_status::text AS s FROM todolist").fetchone()["s"] == (
        "CANCELLED")
