"""Outcomes are written by one writer thread while worker threads go on: a worker's thread
and slot are free once its executor returns, the run is held until its outcome is stored,
and what cannot be stored is reported, never left waiting."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import processgpt_sync as ps
from processgpt_sync.errors import ServerFailed
from processgpt_sync.event_writer import EventBuffer
from processgpt_sync.inflight import InFlight
from processgpt_sync.outcomes import Outcome, OutcomeWriter
from processgpt_sync.retrying import TIMEOUTS_ALONE_MAX, UNANSWERED_ALONE_MAX
from processgpt_sync.runs import TodoRun
from processgpt_sync.settings import Settings
from processgpt_sync.shutdown import Shutdown
from processgpt_sync.stats import ServerStats
from processgpt_sync.storage.postgres import PostgresStorage, wrap_exceptions
from tests.conftest import wait_for

AGENT = "writes"


@contextlib.contextmanager
def holding_rows(database_url: str, todo_ids: list[str]) -> Iterator[None]:
    """Another transaction holds these todo rows (a person's open UPDATE) until the block ends."""
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT id FROM todolist WHERE id = ANY(%s::uuid[]) FOR UPDATE",
                       (list(todo_ids),))
        yield


@contextlib.contextmanager
def heartbeats(storage: Any, claims: list[Any], every: float = 0.1) -> Iterator[None]:
    """What a server does while its outcomes wait to be written: it renews their leases, and
    the database answers (a statement timeout of the outcome alone then marks it heavy)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(ps.StorageUnavailable):  # the next beat tries again
                storage.renew("c", claims, 60)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join(10)


def test_worker_threads_run_the_next_todos_while_earlier_outcomes_wait_to_be_written(
        database_url, db, caplog, monkeypatch):
    """20 workers (36 pool threads): the first 20 todos' rows are locked once they run, so
    their outcomes cannot be written; the next 20 todos all run meanwhile, which needs the
    first 20 threads back (16 spares would not do), and their outcomes are written: rows
    another transaction holds do not hold up the others' writes."""
    monkeypatch.setattr("processgpt_sync.outcomes.HELD_ROW_WARN_AFTER", 0.3)
    workers = 20
    storage = PostgresStorage(database_url)
    for i in range(2 * workers):
        storage.enqueue(AGENT, f"q{i}")
    started: list[str] = []
    lock = threading.Lock()
    release_first = threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        with lock:
            started.append(todo.id)
            first_round = len(started) <= workers
        if first_round:
            release_first.wait(20)
        return {"ok": True}

    server = ps.start(handle, agent_orch=AGENT, storage=storage, workers=workers)
    try:
        wait_for(lambda: len(started) == workers, timeout=20)
        with holding_rows(database_url, started):
            release_first.set()
            wait_for(lambda: len(started) == 2 * workers, timeout=20)
            wait_for(lambda: server.stats()["completed"] == workers, timeout=20)
            written = db.execute("SELECT count(*) AS n FROM todolist WHERE id = ANY(%s::uuid[]) "
                                 "AND draft_status = 'COMPLETED'",
                                 (started[:workers],)).fetchone()["n"]
            assert written == 0, "the first outcomes were written despite the lock"
            # held until written (a run is forgotten just after it counts as completed)
            wait_for(lambda: server.stats()["running"] == workers)
            wait_for(lambda: all(f"outcome of todo {todo_id} has waited" in caplog.text
                                 for todo_id in started[:workers]), timeout=10)
        wait_for(lambda: server.stats()["completed"] == 2 * workers, timeout=30)
        wait_for(lambda: server.stats()["running"] == 0)
    finally:
        server.stop()
        storage.close()


def test_events_of_a_todo_whose_row_is_held_wait_without_holding_up_other_todos_events(
        database_url, db, caplog, monkeypatch):
    """Another transaction holds one running todo's row: the other todo's progress events are
    written meanwhile; the held todo's are sent again until the row is free, in order, and a
    warning names the todo."""
    monkeypatch.setattr("processgpt_sync.event_writer.HELD_ROW_WARN_AFTER", 0.3)
    storage = PostgresStorage(database_url)
    held_id, free_id = storage.enqueue(AGENT, "held"), storage.enqueue(AGENT, "free")
    go, finish = threading.Event(), threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        go.wait(20)
        for step in range(3):
            todo.events.progress({"step": step})
        finish.wait(20)
        return {"ok": True}

    def steps(todo_id: str) -> list[int]:
        return [r["data"]["step"] for r in db.execute(
            "SELECT data FROM events WHERE todo_id = %s AND event_type = 'task_working' "
            "ORDER BY timestamp", (todo_id,))]

    server = ps.start(handle, agent_orch=AGENT, storage=storage, workers=2)
    try:
        wait_for(lambda: server.stats()["running"] == 2, timeout=20)
        with holding_rows(database_url, [held_id]):
            go.set()
            wait_for(lambda: steps(free_id) == [0, 1, 2], timeout=10)
            wait_for(lambda: f"todo {held_id} has been held" in caplog.text, timeout=10)
            assert steps(held_id) == []
        wait_for(lambda: steps(held_id) == [0, 1, 2], timeout=10)
        finish.set()
        wait_for(lambda: server.stats()["completed"] == 2, timeout=20)
    finally:
        finish.set()
        server.stop()
        storage.close()
    assert f"todo {free_id} has been held" not in caplog.text


def test_an_outcome_whose_row_stays_held_is_reported_unstored_once_the_server_aborts(
        database_url, db):
    """The writer waits for a held row, the other outcome of its batch written at once; when
    the stopping server aborts the writes, the waiting outcome is reported as not stored (so
    its lease, not the writer, decides what becomes of it) and the writer thread ends."""
    storage = PostgresStorage(database_url)
    held_id, free_id = storage.enqueue(AGENT, "held"), storage.enqueue(AGENT, "free")
    claims = {c.todo_id: c for c in storage.claim(agent_orch=AGENT, consumer="c", limit=2,
                                                  lease_seconds=60, max_claims=3)}
    abort = threading.Event()
    writer = OutcomeWriter(storage, abort=abort)
    writer.start()
    told: dict[str, tuple[Any, BaseException | None]] = {}

    def stored_as(todo_id: str) -> Any:
        return lambda result, failure: told.__setitem__(todo_id, (result, failure))

    try:
        with holding_rows(database_url, [held_id]):
            for todo_id in (held_id, free_id):
                writer.submit(Outcome(claims[todo_id], "completed", result={"ok": 1}),
                              stored_as(todo_id))
            wait_for(lambda: free_id in told, timeout=10)
            assert told[free_id][0].applied
            assert held_id not in told
            writer.close(timeout=0.3)  # the row is still held: close gives up waiting
            abort.set()
            wait_for(lambda: held_id in told, timeout=5)
            result, failure = told[held_id]
            assert result is None and isinstance(failure, ps.StorageUnavailable)
            assert "another transaction holds its todo row" in str(failure)
        writer._thread.join(5)
        assert not writer._thread.is_alive()
    finally:
        storage.close()
    rows = {r["id"]: r["draft_status"] for r in db.execute(
        "SELECT id::text, draft_status::text FROM todolist")}
    assert rows == {free_id: "COMPLETED", held_id: "STARTED"}


def test_stop_gives_an_unfinished_todo_back_while_another_outcome_waits_for_its_held_row(
        database_url, db, monkeypatch):
    """At stop, one todo's outcome waits for a row another transaction holds and another
    todo's executor is still running after the grace period: the running one is given back
    (its claim not counted) instead of waiting out the whole stop behind the held row."""
    monkeypatch.setattr("processgpt_sync.server.STOP_MARGIN", 2.0)
    storage = PostgresStorage(database_url)
    held_id, slow_id = storage.enqueue(AGENT, "held"), storage.enqueue(AGENT, "slow")
    go, returned, finish = threading.Event(), threading.Event(), threading.Event()

    def handle(todo: ps.Todo) -> dict[str, Any]:
        if todo.id == held_id:
            go.wait(20)
            returned.set()
        else:
            finish.wait(20)
        return {"ok": True}

    server = ps.start(handle, agent_orch=AGENT, storage=storage, workers=2)
    try:
        wait_for(lambda: server.stats()["running"] == 2, timeout=20)
        with holding_rows(database_url, [held_id]):
            go.set()
            assert returned.wait(10)
            server.stop(timeout=0.2)
            slow = db.execute("SELECT draft_status, consumer, claim_count FROM todolist "
                              "WHERE id = %s", (slow_id,)).fetchone()
            assert slow == {"draft_status": None, "consumer": None, "claim_count": 0}
            assert server.stats()["released"] == 1
    finally:
        finish.set()
        server.stop()
        storage.close()


SLOW_TRIGGER = """
CREATE FUNCTION slow_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(CASE WHEN NEW.output ? 'heavy' THEN 5 ELSE 0.1 END);
    RETURN NEW;
END $$;
CREATE TRIGGER slow_result BEFORE UPDATE ON todolist
    FOR EACH ROW WHEN (NEW.output IS NOT NULL) EXECUTE FUNCTION slow_result();
"""


def test_a_batch_past_the_statement_timeout_is_written_in_halves_and_a_heavy_one_waits(
        database_url, db, caplog, monkeypatch):
    """A site's trigger makes each result slow to store: 12 outcomes in one statement run past
    the statement timeout, the same batch would for ever; halves are written instead. One
    outcome too heavy on its own waits and is tried again alone without holding up the
    others, and is stored once it fits."""
    monkeypatch.setattr("processgpt_sync.outcomes.TIMEOUTS_ALONE_MAX", 1000)
    db.execute(SLOW_TRIGGER)
    storage = PostgresStorage(database_url, statement_timeout=0.5)
    for i in range(12):
        storage.enqueue(AGENT, f"q{i}")
    claims = storage.claim(agent_orch=AGENT, consumer="c", limit=12, lease_seconds=60,
                           max_claims=3)
    heavy = claims[5].todo_id
    writer = OutcomeWriter(storage, abort=threading.Event())
    writer.start()
    told: dict[str, Any] = {}
    try:
        for claim in claims:
            result = {"heavy": True} if claim.todo_id == heavy else {"ok": True}
            writer.submit(Outcome(claim, "completed", result=result),
                          lambda r, f, todo_id=claim.todo_id: told.__setitem__(todo_id, (r, f)))
        wait_for(lambda: len(told) == 11, timeout=30)
        assert all(r.applied for r, _ in told.values()) and heavy not in told
        assert "writing them in halves" in caplog.text
        assert f"writing the outcome of todo {heavy} ran past the statement timeout" in (
            caplog.text)
        wait_for(lambda: caplog.text.count(f"todo {heavy} ran past") >= 3, timeout=10)
        db.execute("DROP TRIGGER slow_result ON todolist")
        wait_for(lambda: heavy in told, timeout=10)
        assert told[heavy][0].applied
    finally:
        writer.close(timeout=5)
        storage.close()
    assert db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = 'COMPLETED'"
                      ).fetchone()["n"] == 12


def slow_events(db: Any, seconds: float) -> None:
    """A site's trigger that takes ``seconds`` to store each event."""
    db.execute(f"""
        CREATE FUNCTION slow_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$;
        CREATE TRIGGER slow_event BEFORE INSERT ON events
            FOR EACH ROW EXECUTE FUNCTION slow_event();""")


def add_steps(buffer: EventBuffer, claims: list[Any], counts: dict[str, int]) -> None:
    """Each claim's progress events, numbered from 0, todo after todo."""
    for claim in claims:
        for step in range(counts[claim.todo_id]):
            buffer.add({"todo_id": claim.todo_id, "token": claim.token,
                        "event_type": "task_working", "data": {"step": step}, "job_id": None,
                        "crew_type": None, "status": None})


def stored_steps(db: Any, todo_id: str) -> list[int]:
    return [r["data"]["step"] for r in db.execute(
        "SELECT data FROM events WHERE todo_id = %s ORDER BY timestamp", (todo_id,))]


def judge_events(db: Any, *, slow: str) -> None:
    """A site's trigger on ``events``: it refuses an event marked 'refuse me', and takes 2 s
    over those the SQL condition ``slow`` (on NEW) selects."""
    db.execute(f"""
        CREATE FUNCTION judge_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.data ? 'refuse me' THEN RAISE EXCEPTION 'event refused by a trigger'; END IF;
            IF {slow} THEN PERFORM pg_sleep(2); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER judge_event BEFORE INSERT ON events
            FOR EACH ROW EXECUTE FUNCTION judge_event();""")


def two_claims(storage: Any) -> tuple[Any, Any, Any]:
    """``storage`` with two todos enqueued and claimed: (storage, first, second)."""
    for query in ("a", "b"):
        storage.enqueue(AGENT, query)
    first, second = storage.claim(agent_orch=AGENT, consumer="c", limit=2, lease_seconds=60,
                                  max_claims=3)
    return storage, first, second


def test_an_event_timing_out_among_a_refused_batch_written_one_by_one_is_given_up_in_time(
        database_url, db, caplog, monkeypatch):
    """A batch the database refuses whole (a site's trigger refuses one event) is written one
    event at a time; one of those runs past the statement timeout on its own (a heavy one).
    It waits alone, its todo's later events behind it, while the rest are written, and is
    given up in time. Before, the timeout sent the whole batch back, the events written
    already too, to be refused or time out whole again: it reached the heavy event alone
    only where the order of the batch's claims happened to change between tries."""
    monkeypatch.setattr("processgpt_sync.event_writer.TIMEOUTS_ALONE_MAX", 1)
    judge_events(db, slow="NEW.data ? 'heavy'")
    storage, first, second = two_claims(PostgresStorage(database_url, statement_timeout=0.5))
    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
    for claim, data in ((first, {"refuse me": 1}), (first, {"step": 1}),
                        (second, {"heavy": 1}), (second, {"step": 2}), (second, {"step": 3})):
        buffer.add({"todo_id": claim.todo_id, "token": claim.token,
                    "event_type": "task_working", "data": data, "job_id": None,
                    "crew_type": None, "status": None})
    buffer.start()
    try:
        assert buffer.flush(timeout=30)
    finally:
        buffer.close(timeout=5)
        storage.close()
    assert stored_steps(db, first.todo_id) == [1]
    assert stored_steps(db, second.todo_id) == [2, 3], "written after the heavy one, in order"
    assert "event refused by a trigger" in caplog.text
    assert "ran past the statement timeout 1 times alone" in caplog.text
    assert "will retry" not in caplog.text, "the batch was not sent whole again"


def test_events_written_one_by_one_stop_at_a_timeout_when_none_went_through(database_url, db):
    """Written one by one, the first event timing out with none written before it (the
    database slow for every write) sends the rest back to be tried again, rather than each
    wait out the statement timeout in turn (500 events, 10 s each, held every take() of those
    todos for over an hour)."""
    from processgpt_sync.event_writer import write_one_by_one

    judge_events(db, slow="true")

    class Counting(PostgresStorage):
        calls = 0

        def record_events(self, events):
            Counting.calls += 1
            return super().record_events(events)

    storage, first, second = two_claims(Counting(database_url, statement_timeout=0.5))
    try:
        batch = [{"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
                  "data": data, "job_id": None, "crew_type": None, "status": None}
                 for claim, data in ((first, {"refuse me": 1}), (first, {"step": 1}),
                                     (second, {"step": 1}), (second, {"step": 2}))]
        timed_out = []
        rejected = write_one_by_one(storage, batch, lambda event, exc: timed_out.append(event))
    finally:
        storage.close()
    reasons = [r["reason"] for r in sorted(rejected, key=lambda r: r["index"])]
    assert reasons[1:] == ["timed_out", "later", "later"], reasons
    assert "event refused by a trigger" in reasons[0]
    assert (Counting.calls, timed_out) == (2, [batch[1]])


def test_events_past_the_buffers_bound_are_dropped_and_said_so_the_rest_written_in_order(
        storage, db, caplog, monkeypatch):
    """Through a long outage the executors still running go on emitting: past
    ``MAX_BUFFERED_EVENTS`` unwritten events, new ones are dropped with a warning, rather
    than grow the process until the host kills it with every todo it runs. The events kept
    are written in order once the database answers, and the next event is accepted again."""
    monkeypatch.setattr("processgpt_sync.event_writer.MAX_BUFFERED_EVENTS", 30)
    storage.enqueue(AGENT, "chatty")
    (claim,) = storage.claim(agent_orch=AGENT, consumer="c", limit=1, lease_seconds=60,
                             max_claims=3)
    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)  # not yet writing
    add_steps(buffer, [claim], {claim.todo_id: 40})
    assert buffer.pending == 30
    said = [r.getMessage() for r in caplog.records if "are dropped" in r.getMessage()]
    assert said == ["30 events wait to be written (is the database unreachable?): new events "
                    "of running todos are dropped, 1 so far"]
    buffer.start()
    try:
        assert buffer.flush(timeout=10)
        buffer.add({"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
                    "data": {"step": 99}, "job_id": None, "crew_type": None, "status": None})
        assert buffer.flush(timeout=10)
    finally:
        buffer.close(timeout=5)
    assert stored_steps(db, claim.todo_id) == [*range(30), 99]


@pytest.mark.parametrize(("sizes", "held_index"), [((2, 5, 5, 4), 2), ((16,), 0)],
                         ids=["four-todos", "one-todo"])
def test_a_batch_of_events_past_the_statement_timeout_is_written_in_halves(
        database_url, db, caplog, sizes, held_index):
    """A site's trigger makes each event slow to store: 16 events in one statement run past
    the statement timeout, and the same batch would for ever; halves are written instead, on
    a boundary between todos where there are several, each todo's events in the order
    emitted. One todo's row is held by another transaction meanwhile: its events wait, all
    of them, and follow once it is free."""
    slow_events(db, 0.08)
    storage = PostgresStorage(database_url, statement_timeout=0.5)
    for i in range(len(sizes)):
        storage.enqueue(AGENT, f"q{i}")
    claims = storage.claim(agent_orch=AGENT, consumer="c", limit=len(sizes),
                           lease_seconds=60, max_claims=3)
    counts = dict(zip((c.todo_id for c in claims), sizes, strict=True))
    held = claims[held_index].todo_id  # its events straddle the middle of the batch
    buffer = EventBuffer(storage, flush_interval=60, batch_size=100)
    buffer.start()
    try:
        with holding_rows(database_url, [held]):
            add_steps(buffer, claims, counts)
            assert not buffer.flush(timeout=3), "the held todo's events still wait"
        assert buffer.flush(timeout=20)
    finally:
        buffer.close(timeout=5)
        storage.close()
    for claim in claims:
        steps = stored_steps(db, claim.todo_id)
        assert steps == list(range(counts[claim.todo_id])), (claim.todo_id == held, steps)
    assert "writing 16 events ran past the statement timeout" in caplog.text


def test_a_supabase_batch_past_the_read_timeout_while_others_are_answered_is_written_in_halves(
        database_url, db, caplog, monkeypatch):
    """The key's role has a statement_timeout (1.2 s) above the HTTP read timeout (1 s), so a
    batch of events too heavy for it gets no answer at all rather than 57014, and the
    database rolls it back. Alone (nothing else answered: a partition looks the same), that
    is an outage; while other calls are answered, it is taken for a statement timeout and
    written in halves, where before it was sent whole, and rolled back, for ever."""
    from processgpt_sync.errors import StorageUnavailable
    from processgpt_sync.retrying import STATEMENT_TIMEOUT
    from processgpt_sync.storage import supabase as supabase_module
    from tests.postgrest_gateway import SERVICE_KEY, Gateway

    monkeypatch.setattr(supabase_module, "READ_MARGIN", 0.5)  # read timeout: 1 s
    slow_events(db, 0.06)  # 24 events: 1.4 s in one statement, 0.7 s in halves
    gateway = Gateway(make_conninfo(database_url, options="-c statement_timeout=1200"))
    storage = supabase_module.SupabaseStorage(gateway.url, SERVICE_KEY, timeout=0.5)
    others = threading.Event()

    def answered_meanwhile() -> None:  # a heartbeat's light calls, from another thread
        while not others.wait(0.1):
            storage.status(AGENT)

    try:
        storage.enqueue(AGENT, "q")
        claim, = storage.claim(agent_orch=AGENT, consumer="c", limit=1, lease_seconds=60,
                               max_claims=3)
        counts = {claim.todo_id: 24}
        steps = [{"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
                  "data": {"step": n}} for n in range(24)]
        with pytest.raises(StorageUnavailable) as alone:
            storage.record_events(steps)
        assert alone.value.code != STATEMENT_TIMEOUT, "nothing else answered: an outage"

        helper = threading.Thread(target=answered_meanwhile, daemon=True)
        helper.start()
        buffer = EventBuffer(storage, flush_interval=60, batch_size=100)
        buffer.start()
        try:
            add_steps(buffer, [claim], counts)
            assert buffer.flush(timeout=30)
        finally:
            buffer.close(timeout=5)
    finally:
        others.set()
        storage.close()
        gateway.close()
    assert stored_steps(db, claim.todo_id) == list(range(24))
    assert "writing 24 events ran past the statement timeout" in caplog.text


class UnansweredHeavyEvent(PostgresStorage):
    """The Supabase case on the PostgreSQL backend: a write holding the heavy event gets no
    answer within the read timeout while every other call is answered (taken for a statement
    timeout, ``unanswered``); the database itself never refuses it."""

    def record_events(self, events):
        if any(e["data"].get("heavy") for e in events):
            self.heavy_tries += 1
            timed_out = ps.StorageUnavailable("no answer within the read timeout",
                                              code="57014")
            timed_out.unanswered = True
            raise timed_out
        return super().record_events(events)


def test_an_event_that_gets_no_answer_alone_is_tried_more_often_then_dropped(database_url, db,
                                                                             monkeypatch, caplog):
    """A read timeout taken for a statement timeout halves a batch; an event that gets no
    answer alone is not dropped after TIMEOUTS_ALONE_MAX as a refused heavy one is (the
    database may have stored it), but it is after UNANSWERED_ALONE_MAX, its todo's next event
    following: never answered, it would hold that todo's events for ever."""
    from processgpt_sync import event_writer

    monkeypatch.setattr(event_writer, "ALONE_RETRY_MAX", 0.05)
    storage = UnansweredHeavyEvent(database_url)
    storage.heavy_tries = 0
    for name in ("heavy", "light"):
        storage.enqueue(AGENT, name)
    heavy, light = storage.claim(agent_orch=AGENT, consumer="c", limit=2, lease_seconds=60,
                                 max_claims=3)
    buffer = EventBuffer(storage, flush_interval=0.01, batch_size=100)
    buffer.start()

    def step(claim: Any, number: int, **more: Any) -> dict[str, Any]:
        return {"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
                "data": {"step": number, **more}, "job_id": None, "crew_type": None,
                "status": None}

    light_steps: list[int] = []
    said_at_timeouts_max = ""
    try:
        buffer.add(step(heavy, 0, heavy=True))
        buffer.add(step(heavy, 1))
        deadline = time.monotonic() + 30
        while stored_steps(db, heavy.todo_id) != [1] and time.monotonic() < deadline:
            buffer.add(step(light, len(light_steps)))  # other events written between its tries
            light_steps.append(len(light_steps))
            if storage.heavy_tries <= 2 * TIMEOUTS_ALONE_MAX:
                said_at_timeouts_max = caplog.text
            time.sleep(0.05)
        assert buffer.flush(timeout=10)
    finally:
        buffer.close(timeout=1)
        storage.close()
    assert stored_steps(db, heavy.todo_id) == [1], "dropped in the end, its next event written"
    assert storage.heavy_tries >= UNANSWERED_ALONE_MAX
    assert "not written" not in said_at_timeouts_max
    assert (f"got no answer within the read timeout {UNANSWERED_ALONE_MAX} times alone while "
            "other events were written; not written") in caplog.text
    assert stored_steps(db, light.todo_id) == light_steps


class UnansweredHeavyOutcome(PostgresStorage):
    """As UnansweredHeavyEvent, for a todo's outcome: never answered within the read timeout
    while every other call is."""

    def finish(self, items):
        if any((i.get("result") or {}).get("heavy") for i in items):
            self.heavy_tries += 1
            time.sleep(0.05)  # waiting for its answer, while the heartbeat's are answered
            timed_out = ps.StorageUnavailable("no answer within the read timeout",
                                              code="57014")
            timed_out.unanswered = True
            raise timed_out
        return super().finish(items)


def test_an_outcome_never_answered_alone_is_given_up_after_more_tries_than_a_heavy_one(
        database_url, db, monkeypatch):
    """An outcome that never gets an answer while the others are written and the heartbeat
    is answered is refused in the end (the recorder then stores less), not retried for ever
    with its lease renewed; it gets UNANSWERED_ALONE_MAX tries, not TIMEOUTS_ALONE_MAX."""
    monkeypatch.setattr("processgpt_sync.outcomes.WAIT_RETRY_MAX", 0.05)
    storage = UnansweredHeavyOutcome(database_url)
    storage.heavy_tries = 0
    ids = [storage.enqueue(AGENT, f"q{i}") for i in range(3)]
    claims = {c.todo_id: c for c in storage.claim(agent_orch=AGENT, consumer="c", limit=3,
                                                  lease_seconds=60, max_claims=3)}
    writer = OutcomeWriter(storage, abort=threading.Event())
    writer.start()
    told: dict[str, Any] = {}
    try:
        with heartbeats(storage, list(claims.values()), every=0.01):
            for todo_id in ids:
                result = {"heavy": True} if todo_id == ids[0] else {"ok": True}
                writer.submit(Outcome(claims[todo_id], "completed", result=result),
                              lambda r, f, todo_id=todo_id: told.__setitem__(todo_id, (r, f)))
            wait_for(lambda: ids[0] in told, timeout=30)
    finally:
        writer.close(timeout=5)
        storage.close()
    assert all(told[todo_id][0].applied for todo_id in ids[1:])
    result, failure = told[ids[0]]
    assert result is None and isinstance(failure, ps.StorageError)
    assert not isinstance(failure, ps.StorageUnavailable)
    assert f"got no answer within the read timeout {UNANSWERED_ALONE_MAX} times" in str(failure)
    assert storage.heavy_tries >= UNANSWERED_ALONE_MAX


def test_an_event_too_heavy_to_store_holds_up_its_todos_events_only_and_is_dropped_after_its_tries(
        database_url, db, caplog):
    """A site's trigger takes longer than the statement timeout to store one event of a todo,
    while another todo's events keep being written: the first todo's later events wait behind
    it, the other todo's are written meanwhile; timing out alone TIMEOUTS_ALONE_MAX times with
    other events written in between, the heavy event is dropped with a warning and its todo's
    later events follow, in order."""
    db.execute("""
        CREATE FUNCTION heavy_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.data->>'heavy' = 'yes' THEN PERFORM pg_sleep(5); END IF; RETURN NEW; END $$;
        CREATE TRIGGER heavy_event BEFORE INSERT ON events
            FOR EACH ROW EXECUTE FUNCTION heavy_event();""")
    storage = PostgresStorage(database_url, statement_timeout=0.3)
    for name in ("heavy", "light"):
        storage.enqueue(AGENT, name)
    heavy, light = storage.claim(agent_orch=AGENT, consumer="c", limit=2, lease_seconds=60,
                                 max_claims=3)

    def step(claim: Any, number: int, **more: str) -> dict[str, Any]:
        return {"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
                "data": {"step": number, **more}, "job_id": None, "crew_type": None,
                "status": None}

    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
    buffer.start()
    light_steps = [0]
    try:
        for event in (step(heavy, 0), step(heavy, 1, heavy="yes"), step(heavy, 2),
                      step(light, 0)):
            buffer.add(event)
        wait_for(lambda: stored_steps(db, light.todo_id) == [0], timeout=10)
        assert stored_steps(db, heavy.todo_id) == [0]
        deadline = time.monotonic() + 40
        while stored_steps(db, heavy.todo_id) != [0, 2] and time.monotonic() < deadline:
            buffer.add(step(light, len(light_steps)))  # the light todo goes on meanwhile
            light_steps.append(len(light_steps))
            time.sleep(0.2)
        assert buffer.flush(timeout=10)
    finally:
        buffer.close(timeout=5)
        storage.close()
    assert stored_steps(db, heavy.todo_id) == [0, 2]
    assert stored_steps(db, light.todo_id) == light_steps
    assert (f"ran past the statement timeout {TIMEOUTS_ALONE_MAX} times alone while other "
            "events were written; not written") in caplog.text


def test_events_that_all_time_out_while_other_calls_are_answered_wait_and_are_written_after(
        database_url, db, caplog):
    """For a while every write of events runs past the statement timeout (a site's trigger on
    the table slow for every row, a database too loaded for any insert) while the database
    answers the server's other calls: nothing is dropped as too heavy; the events wait and are
    all written, in order, once writes go through again."""
    storage = PostgresStorage(database_url, statement_timeout=0.3)
    for name in ("a", "b"):
        storage.enqueue(AGENT, name)
    claims = storage.claim(agent_orch=AGENT, consumer="c", limit=2, lease_seconds=60,
                           max_claims=3)
    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
    buffer.start()
    try:
        slow_events(db, 0.5)
        with heartbeats(storage, claims):
            add_steps(buffer, claims, {c.todo_id: 3 for c in claims})
            assert not buffer.flush(timeout=8)
            db.execute("DROP TRIGGER slow_event ON events")
            assert buffer.flush(timeout=60)
    finally:
        buffer.close(timeout=5)
        storage.close()
    for claim in claims:
        assert stored_steps(db, claim.todo_id) == [0, 1, 2]
    assert "not written" not in caplog.text


def test_events_given_back_after_a_failed_draft_are_written_within_the_flush_interval(
        database_url, db):
    """A draft took its todo's waiting events along and its write failed: the events given
    back are written by the idle flusher within its interval, not when some other event or the
    todo's outcome comes along."""
    storage = PostgresStorage(database_url)
    storage.enqueue(AGENT, "q")
    (claim,) = storage.claim(agent_orch=AGENT, consumer="c", limit=1, lease_seconds=60,
                             max_claims=3)
    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
    buffer.start()
    try:
        assert buffer.flush(timeout=5)  # the flusher is idle
        add_steps(buffer, [claim], {claim.todo_id: 1})
        taken = buffer.take(claim.todo_id, claim.token, ids=True)
        time.sleep(0.3)  # the draft's write fails meanwhile; the flusher, with nothing, idles
        buffer.give_back(claim.todo_id, claim.token, taken)
        wait_for(lambda: stored_steps(db, claim.todo_id) == [0], timeout=5)
    finally:
        buffer.close(timeout=5)
        storage.close()


class OutageOnOneCall(PostgresStorage):
    """The events write numbered ``fail_on`` meets a dropped connection; the others reach the
    database."""

    calls = 0
    fail_on = 0

    def record_events(self, events: Any) -> Any:
        OutageOnOneCall.calls += 1
        if OutageOnOneCall.calls == OutageOnOneCall.fail_on:
            raise ps.StorageUnavailable("the connection dropped")
        return super().record_events(events)


@pytest.mark.parametrize(("sizes", "fail_on", "sent_again"), [((4, 4), 3, 4), ((1, 6, 1), 5, 7)],
                         ids=["second-half", "inside-the-first-half"])
def test_when_part_of_a_halved_batch_meets_an_outage_only_what_is_unwritten_is_sent_again(
        database_url, db, caplog, sizes, fail_on, sent_again):
    """Events time out together (at most 4 fit in a statement here) and are written in
    halves, and one of those writes meets an outage: what was written stays written, what
    was not (the rest of that half, and every later half) is sent again, and every event is
    stored once, in order. 2 todos: the first half written, the second's outage. 3 todos
    (1, 6 and 1 events): the 6 split again inside the first half, whose first part meets the
    outage: those 6 and the last todo's event go back."""
    slow_events(db, 0.1)
    OutageOnOneCall.calls, OutageOnOneCall.fail_on = 0, fail_on
    storage = OutageOnOneCall(database_url, statement_timeout=0.5)
    for i in range(len(sizes)):
        storage.enqueue(AGENT, f"q{i}")
    claims = storage.claim(agent_orch=AGENT, consumer="c", limit=len(sizes),
                           lease_seconds=60, max_claims=3)
    counts = dict(zip((c.todo_id for c in claims), sizes, strict=True))
    buffer = EventBuffer(storage, flush_interval=60, batch_size=100)
    buffer.start()
    try:
        add_steps(buffer, claims, counts)
        assert buffer.flush(timeout=20)
    finally:
        buffer.close(timeout=5)
        storage.close()
    for claim in claims:
        assert stored_steps(db, claim.todo_id) == list(range(counts[claim.todo_id]))
    assert f"writing {sent_again} events failed, will retry: the connection dropped" in (
        caplog.text)


@pytest.mark.parametrize("others", [1, 7])
def test_an_outcome_that_keeps_timing_out_alone_is_given_up_and_holds_up_no_other(
        database_url, db, monkeypatch, others):
    """Alone, it times out again and again while the others are written and the heartbeat
    is answered: after a few tries it is refused (so the recorder falls back to storing
    less), not retried for ever with its lease renewed. First in a batch of 8, the halving
    counts a timeout per level: alone, it had then taken as many timeouts in a row as an
    outage does, and was retried in place for ever with every other outcome of the batch
    behind it; it waits instead."""
    monkeypatch.setattr("processgpt_sync.outcomes.TIMEOUTS_ALONE_MAX", 2)
    db.execute(SLOW_TRIGGER)
    storage = PostgresStorage(database_url, statement_timeout=0.5)
    ids = [storage.enqueue(AGENT, f"q{i}") for i in range(1 + others)]
    claims = {c.todo_id: c for c in storage.claim(agent_orch=AGENT, consumer="c",
                                                  limit=len(ids), lease_seconds=60,
                                                  max_claims=3)}
    heavy_id = ids[0]  # first: in the first half of every halving
    writer = OutcomeWriter(storage, abort=threading.Event())
    writer.start()
    told: dict[str, Any] = {}
    try:
        for todo_id in ids:
            result = {"heavy": True} if todo_id == heavy_id else {"ok": True}
            writer.submit(Outcome(claims[todo_id], "completed", result=result),
                          lambda r, f, todo_id=todo_id: told.__setitem__(todo_id, (r, f)))
        wait_for(lambda: len(told) >= others, timeout=30)
        written = dict(told)
        with heartbeats(storage, list(claims.values())):
            wait_for(lambda: heavy_id in told, timeout=30)
    finally:
        writer.close(timeout=5)
        storage.close()
    assert sorted(written) == sorted(ids[1:]) and all(r.applied for r, _ in written.values())
    result, failure = told[heavy_id]
    assert result is None and isinstance(failure, ps.StorageError)
    assert not isinstance(failure, ps.StorageUnavailable)
    assert "ran past the statement timeout 2 times" in str(failure)


class SlowForEveryCall(PostgresStorage):
    """While ``slow`` is set, the database ends every call at its statement timeout, as an
    overloaded server does: a real statement on one of the storage's connections, which the
    server cancels, before each call (the heartbeat's and the claims' too)."""

    slow = threading.Event()

    def call(self, query: str, params: Any) -> Any:
        if SlowForEveryCall.slow.is_set():
            with wrap_exceptions(query), self._pool.connection() as conn:
                conn.execute("SELECT pg_sleep(60)")
        return super().call(query, params)


@pytest.mark.parametrize("events", [0, 2])
def test_a_result_made_while_the_database_is_slow_for_every_call_is_stored_whole_after(
        database_url, db, events):
    """The database ends every call at its statement timeout for a while: the outcome of a
    todo that finished meanwhile times out alone again and again with no other call
    answered, which says the database is slow, not that the outcome is heavy. It waits as
    through an outage and is stored whole once calls go through: neither recorded FAILED
    (before, its third timeout gave it up, and a result without events became a failure)
    nor stored without its events."""
    SlowForEveryCall.slow = threading.Event()
    storage = SlowForEveryCall(database_url, statement_timeout=0.3)
    todo_id = storage.enqueue(AGENT, "q")

    def handle(todo: ps.Todo) -> dict[str, Any]:
        for step in range(events):
            todo.events.progress({"step": step})
        SlowForEveryCall.slow.set()
        return {"ok": True}

    server = ps.start(handle, agent_orch=AGENT, storage=storage, lease_seconds=30)
    try:
        wait_for(SlowForEveryCall.slow.is_set, timeout=10)
        time.sleep(3.0)  # ten statement timeouts
        SlowForEveryCall.slow.clear()
        wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1,
                 timeout=30)
        stats = server.stats()
    finally:
        SlowForEveryCall.slow.clear()
        server.stop()
        storage.close()
    row = db.execute("SELECT draft_status::text, output FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert (stats["completed"], stats["failed"]) == (1, 0)
    assert row == {"draft_status": "COMPLETED", "output": {"ok": True}}
    steps = [r["step"] for r in db.execute(
        "SELECT (data ->> 'step')::int AS step FROM events WHERE todo_id = %s AND data ? 'step' "
        "ORDER BY timestamp", (todo_id,))]
    assert steps == list(range(events))


class FinishUnreachable(PostgresStorage):
    """The outcome write cannot reach the database until ``healed`` is set; every other call
    (the heartbeat too) can."""

    healed = threading.Event()

    def finish(self, items: list[dict[str, Any]]) -> Any:
        if not self.healed.is_set():
            raise ps.StorageUnavailable("the write's connection broke")
        return super().finish(items)


def test_a_lease_is_renewed_while_the_todos_outcome_waits_to_be_written(database_url, db):
    """The executor returned, its outcome cannot be written yet: the todo is still this
    server's, so its lease is renewed and no other server takes it over; once the write
    goes through, the result is stored."""
    FinishUnreachable.healed = threading.Event()
    storage = FinishUnreachable(database_url)
    other = PostgresStorage(database_url)
    todo_id = storage.enqueue(AGENT, "x")
    server = ps.start(lambda todo: {"ok": True}, agent_orch=AGENT, storage=storage,
                      lease_seconds=2)
    try:
        wait_for(lambda: db.execute("SELECT 1 FROM processgpt_sync_lease").fetchone(),
                 timeout=10)
        time.sleep(4)  # two leases' time: only heartbeats keep it
        assert other.claim(agent_orch=AGENT, consumer="other", limit=1, lease_seconds=60,
                           max_claims=3) == []
        FinishUnreachable.healed.set()
        wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
    finally:
        FinishUnreachable.healed.set()
        server.stop()
        storage.close()
        other.close()
    row = db.execute("SELECT draft_status::text AS s, output, claim_count FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert (row["s"], row["output"], row["claim_count"]) == ("COMPLETED", {"ok": True}, 1)


@pytest.mark.parametrize("ends", ["returns", "raises a host failure"])
def test_a_timed_out_todo_whose_executor_then_returns_keeps_its_lease_until_it_is_written(
        database_url, db, ends):
    """The todo timed out and its executor returned as it was told to stop (or raised what
    looks like the host's failure), while the timeout's failure cannot be written yet: the
    run stays this server's until it is, its lease renewed, so no other server runs it again
    meanwhile."""
    FinishUnreachable.healed = threading.Event()
    storage = FinishUnreachable(database_url)
    other = PostgresStorage(database_url)
    todo_id = storage.enqueue(AGENT, "x")

    returned = threading.Event()

    def handle(todo):
        todo.cancel_event.wait(30)
        returned.set()
        if ends == "raises a host failure":
            raise OSError(errno.EMFILE, "Too many open files")
        return {"too": "late"}

    server = ps.start(handle, agent_orch=AGENT, storage=storage, lease_seconds=2, timeout=0.5)
    try:
        assert returned.wait(10)  # told to stop by the timeout
        time.sleep(4)  # two leases' time: only heartbeats keep it
        taken = other.claim(agent_orch=AGENT, consumer="other", limit=1, lease_seconds=60,
                            max_claims=3)
        FinishUnreachable.healed.set()
        wait_for(lambda: server.stats()["failed"] == 1, timeout=20)
    finally:
        FinishUnreachable.healed.set()
        server.stop()
        storage.close()
        other.close()
    assert taken == []
    row = db.execute("SELECT draft_status::text AS s, log, claim_count FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert (row["s"], row["claim_count"]) == ("FAILED", 1)
    assert "timed out after 0.5 s" in row["log"]


class SlowEvents(PostgresStorage):
    """Each write of events takes 2 s (a slow database, a statement waiting on a lock)."""

    def record_events(self, events: Any) -> Any:
        time.sleep(2.0)
        return super().record_events(events)


def test_a_draft_waiting_for_its_todos_events_write_is_not_counted_against_the_timeout(
        database_url, db):
    """A draft takes the todo's waiting events with it, and waits for a write of them under
    way first: that wait is the database's time, not the executor's, as the draft's own
    write is."""
    storage = SlowEvents(database_url)
    todo_id = storage.enqueue(AGENT, "x")

    def handle(todo):
        todo.events.progress("working")
        time.sleep(0.3)  # its write is under way
        todo.events.result({"half": True}, final=False)
        return {"done": True}

    try:
        with ps.start(handle, agent_orch=AGENT, storage=storage, timeout=1.5) as server:
            wait_for(lambda: server.stats()["completed"] + server.stats()["failed"] == 1,
                     timeout=20)
    finally:
        storage.close()
    row = db.execute("SELECT draft_status::text AS s, output FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert (row["s"], row["output"]) == ("COMPLETED", {"done": True})


class DiesOnFinish(PostgresStorage):
    def finish(self, items: list[dict[str, Any]]) -> Any:
        raise SystemExit("the driver broke")


def test_a_dead_outcome_writer_reports_its_death_before_the_stranded_outcomes_are_handled(
        database_url):
    """What the stranded outcomes' handlers write next is written on the dying thread and may
    retry through an outage: the server must hear of the death first, so it stops and aborts
    those retries."""
    storage = DiesOnFinish(database_url)
    claim = storage.claim(agent_orch=AGENT, consumer="c", limit=1, lease_seconds=60,
                          max_claims=3) if storage.enqueue(AGENT, "x") else []
    order: list[str] = []
    handled = threading.Event()

    def stored(result: Any, failure: BaseException | None) -> None:
        order.append(type(failure).__name__)
        handled.set()

    writer = OutcomeWriter(storage, abort=threading.Event(),
                           on_crash=lambda name, exc: order.append(f"crash: {name}"))
    writer.start()
    try:
        writer.submit(Outcome(claim[0], "completed", result={"ok": True}), stored)
        assert handled.wait(10)
    finally:
        writer.close(timeout=5)
        storage.close()
    assert order == ["crash: outcome writer", ServerFailed.__name__]


def test_a_failing_step_after_the_write_still_lets_the_run_go(database_url, db, caplog):
    """Counting or logging a stored outcome raised: the outcome is stored, the error logged,
    and the run is forgotten all the same (else its slot leaks and stop() waits for it)."""
    import logging

    from processgpt_sync.event_writer import EventBuffer
    from processgpt_sync.recorder import Recorder
    from processgpt_sync.runs import TodoRun

    storage = PostgresStorage(database_url)
    todo_id = storage.enqueue(AGENT, "x")
    claim = storage.claim(agent_orch=AGENT, consumer="c", limit=1, lease_seconds=60,
                          max_claims=3)[0]
    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
    writer = OutcomeWriter(storage, abort=threading.Event())
    writer.start()

    def count(name: str, n: int = 1) -> None:
        raise RuntimeError("the counter broke")

    recorder = Recorder(storage, writer, buffer, log=logging.getLogger("test"), extra={},
                        count=count, on_run_time=lambda s: None, abort=threading.Event())
    run = TodoRun(claim, buffer, timeout=None, intermediate=lambda run, data: None)
    let_go = threading.Event()
    try:
        recorder.finish(run, {"ok": True}, None, then=let_go.set)
        assert let_go.wait(10)
    finally:
        writer.close(timeout=5)
        storage.close()
    assert db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                      (todo_id,)).fetchone()["s"] == "COMPLETED"
    assert "the counter broke" in caplog.text


REFUSING_TRIGGERS = """
CREATE FUNCTION refuse_marked_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.output ? 'refuse me' THEN
        RAISE EXCEPTION 'result refused by a trigger';
    END IF;
    RETURN NEW;
END $$;
CREATE FUNCTION refuse_marked_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.data ? 'refuse me' THEN
        RAISE EXCEPTION 'event refused by a trigger';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE UPDATE ON todolist
    FOR EACH ROW EXECUTE FUNCTION refuse_marked_result();
CREATE TRIGGER refuse_marked BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_marked_event();
"""


def test_a_suspend_the_database_refuses_with_no_events_to_leave_out_is_recorded_failed(
        storage, db):
    """A site's trigger refuses the suspend of a todo whose question is written already
    (``suspend_for_human``) and which has no other events to leave out: the todo is recorded
    FAILED with why, once. Before, it was left to its lease, to run again and be refused
    again until its claims ran out."""
    db.execute("""
        CREATE FUNCTION refuse_suspend() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'suspend refused by a trigger'; END $$;
        CREATE TRIGGER refuse_suspend BEFORE UPDATE ON todolist FOR EACH ROW
            WHEN (NEW.draft_status = 'HUMAN_ASKED' AND OLD.consumer IS NOT NULL
                  AND NEW.consumer IS NULL)
            EXECUTE FUNCTION refuse_suspend();""")
    todo_id = storage.enqueue(AGENT, "ask")
    runs: list[str] = []

    def handle(todo: ps.Todo) -> dict[str, Any]:
        runs.append(todo.id)
        return todo.suspend_for_human("go on?")  # type: ignore[no-any-return]

    with ps.start(handle, agent_orch=AGENT, storage=storage, lease_seconds=2) as server:
        wait_for(lambda: server.stats()["failed"] == 1, timeout=20)
        time.sleep(1.5)  # past a lease: a todo left to it would run again now
        stats = server.stats()
    row = db.execute("SELECT draft_status::text, log FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert runs == [todo_id] and (stats["asked"], stats["failed"]) == (0, 1)
    assert row["draft_status"] == "FAILED"
    assert "its suspend could not be stored: suspend refused by a trigger" in row["log"]


def test_a_suspend_whose_events_are_refused_is_stored_without_them(storage, db, caplog,
                                                                   monkeypatch):
    """An event written after the question (here from a ``finally``) is refused with the
    suspend: the todo still waits for its answer in the database, its lease given up, rather
    than staying claimed until the lease runs out and running again."""
    db.execute(REFUSING_TRIGGERS)
    monkeypatch.setattr("processgpt_sync.server.EVENT_FLUSH_INTERVAL", 60.0)
    todo_id = storage.enqueue(AGENT, "ask")

    def handle(todo: ps.Todo) -> dict[str, Any]:
        try:
            return todo.suspend_for_human("go on?")  # type: ignore[no-any-return]
        finally:
            todo.events.progress({"refuse me": True})

    with ps.start(handle, agent_orch=AGENT, storage=storage) as server:
        wait_for(lambda: server.stats()["asked"] == 1, timeout=20)
    row = db.execute("SELECT draft_status::text, consumer FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert row == {"draft_status": "HUMAN_ASKED", "consumer": None}
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0
    assert "suspending it without them" in caplog.text


class HolderCommitsMidway(PostgresStorage):
    """The transaction holding a todo row commits right after the first event written alone."""

    holder: psycopg.Connection[Any] | None = None

    def record_events(self, events: Any) -> Any:
        answer = super().record_events(events)
        if len(events) == 1 and self.holder is not None:
            self.holder.commit()
            self.holder = None
        return answer


def test_a_refused_batch_written_one_by_one_keeps_a_held_todos_events_in_order(
        database_url, db):
    """A batch refused as a whole is written event by event; the first event of a todo whose
    row is held waits, and so do that todo's later ones, even if the row is freed meanwhile:
    its events still land in the order it emitted them."""
    from processgpt_sync.event_writer import EventBuffer

    db.execute(REFUSING_TRIGGERS)
    storage = HolderCommitsMidway(database_url)
    held_id, other_id = storage.enqueue(AGENT, "held"), storage.enqueue(AGENT, "other")
    claims = {c.todo_id: c for c in storage.claim(agent_orch=AGENT, consumer="c", limit=2,
                                                  lease_seconds=60, max_claims=3)}

    def event(todo_id: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"todo_id": todo_id, "token": claims[todo_id].token,
                "event_type": "task_working", "data": data}

    buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
    holder = psycopg.connect(database_url)
    holder.execute("SELECT id FROM todolist WHERE id = %s FOR UPDATE", (held_id,))
    storage.holder = holder
    try:
        buffer.add(event(held_id, {"n": 1}))
        buffer.add(event(held_id, {"n": 2}))
        buffer.add(event(other_id, {"refuse me": True}))  # refuses the batch
        buffer.start()
        assert buffer.flush(timeout=10)
    finally:
        buffer.close(timeout=5)
        holder.close()
        storage.close()
    written = [r["data"]["n"] for r in db.execute(
        "SELECT data FROM events WHERE todo_id = %s ORDER BY timestamp", (held_id,))]
    assert written == [1, 2]


def test_what_the_database_refuses_is_recorded_as_a_failure_with_the_reason(
        storage, db, caplog, monkeypatch):
    """A platform trigger or constraint may refuse a todo's write (an error, not an outage):
    a refused result is recorded as FAILED with why, keeping its events; when its events are
    what is refused, the result is stored without them (an event must not cost the result).
    Neither todo is left running."""
    db.execute(REFUSING_TRIGGERS)
    # events wait for their todo's outcome and are written with it, never on their own first
    monkeypatch.setattr("processgpt_sync.server.EVENT_FLUSH_INTERVAL", 60.0)
    result_refused = storage.enqueue(AGENT, "result")
    events_refused = storage.enqueue(AGENT, "events")

    def handle(todo: ps.Todo) -> dict[str, Any]:
        if todo.input == "result":
            todo.events.progress({"step": 1})
            return {"refuse me": True}
        todo.events.progress({"refuse me": True})
        return {"ok": True}

    with ps.start(handle, agent_orch=AGENT, storage=storage) as server:
        wait_for(lambda: server.stats()["failed"] + server.stats()["completed"] == 2,
                 timeout=20)
    rows = {r["id"]: r for r in db.execute(
        "SELECT id::text, draft_status::text, log, output FROM todolist")}
    failed = rows[result_refused]
    assert (failed["draft_status"], failed["output"]) == ("FAILED", None)
    assert "result could not be stored" in failed["log"]
    assert "result refused by a trigger" in failed["log"]
    kept = [r["data"] for r in db.execute(
        "SELECT data FROM events WHERE todo_id = %s AND event_type = 'task_working'",
        (result_refused,))]
    assert kept == [{"step": 1}], "the refused result's progress events are kept"
    stored = rows[events_refused]
    assert (stored["draft_status"], stored["output"], stored["log"]) == (
        "COMPLETED", {"ok": True}, None)
    assert db.execute("SELECT count(*) AS n FROM events WHERE data ? 'refuse me'"
                      ).fetchone()["n"] == 0
    assert "event refused by a trigger" in caplog.text
    assert "storing its result without them" in caplog.text
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_a_stop_gives_back_the_runs_it_stopped_not_one_whose_outcome_is_on_its_way(
        database_url, db):
    """Two todos run as stop() ends its grace; one's executor returns just then, and the
    recorder closes its run and hands its outcome to the writer before the stop cancels it.
    That one is not given back (its result would be refused and the todo run again): the stop
    waits for its outcome instead."""
    storage = PostgresStorage(database_url)
    try:
        for text in ("ending", "running"):
            storage.enqueue(AGENT, text)
        claims = storage.claim(agent_orch=AGENT, consumer="w1", limit=2, lease_seconds=60,
                               max_claims=3)
        buffer = EventBuffer(storage, flush_interval=0.05, batch_size=100)
        inflight = InFlight(2, 0)
        runs = {c.row["query"]: TodoRun(c, buffer, timeout=None, intermediate=None)
                for c in claims}
        for run in runs.values():
            inflight.add(run)

        def cancel(run: TodoRun, reason: str) -> None:
            if run is runs["ending"]:
                assert run.close()  # the recorder's, a moment before
            with run.lock:  # as TodoWorker.cancel: a closed run is left to its outcome
                if not run.closed:
                    run.cancel_reason = reason
                    run.cancel_event.set()

        shutdown = Shutdown(storage, Settings(agent_orch=AGENT, consumer="w1"),
                            stats=ServerStats(), log=logging.getLogger("test"), extra={})
        deadline = time.monotonic() + 1.0
        shutdown.drain(inflight, buffer, cancel, 0.0,
                       lambda: max(0.0, deadline - time.monotonic()))
        buffer.close()
    finally:
        storage.close()
    states = {r["query"]: r["state"] for r in db.execute(
        "SELECT query, draft_status::text AS state FROM todolist")}
    assert states == {"ending": "STARTED", "running": None}
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 1


def serve_until_completed(storage: Any, executor: Any, db: Any, todo_id: str) -> None:
    """Serve ``todo_id`` with one worker until it is COMPLETED, then close ``storage``."""
    try:
        with ps.start(executor, agent_orch=AGENT, storage=storage, workers=1):
            wait_for(lambda: db.execute("SELECT draft_status::text AS s FROM todolist WHERE "
                                        "id = %s", (todo_id,)).fetchone()["s"] == "COMPLETED",
                     timeout=30)
    finally:
        storage.close()


class UnansweredDraft(PostgresStorage):
    """A draft marked ``slow`` gets no answer within the read timeout, every time, while the
    server's other calls are answered (a read timeout taken for a statement timeout)."""

    def save_result(self, claim, data, *, final, events=()):
        if not final and isinstance(data, dict) and data.get("slow"):
            self.tries += 1
            timed_out = ps.StorageUnavailable("no answer within the read timeout",
                                              code="57014")
            timed_out.unanswered = True
            raise timed_out
        return super().save_result(claim, data, final=final, events=events)


def test_a_draft_that_never_gets_an_answer_is_dropped_after_more_tries_and_the_todo_goes_on(
        database_url, db, caplog, monkeypatch):
    """As a draft that keeps timing out, but with no answer at all: it gets
    ``UNANSWERED_ALONE_MAX`` tries in a row, not ``TIMEOUTS_ALONE_MAX``, then the executor
    goes on and the todo completes."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr("processgpt_sync.recorder.backoff", lambda attempt, after=None: 0.01)
    storage = UnansweredDraft(database_url)
    storage.tries = 0
    todo_id = storage.enqueue(AGENT, "q")

    def drafts(todo: ps.Todo) -> dict[str, Any]:
        todo.events.result({"slow": True}, final=False)
        return {"done": True}

    serve_until_completed(storage, drafts, db, todo_id)
    assert storage.tries == UNANSWERED_ALONE_MAX
    assert f"draft of todo {todo_id} dropped" in caplog.text


def test_a_draft_that_keeps_timing_out_is_dropped_and_the_todo_goes_on(database_url, db,
                                                                        caplog):
    """A draft the executor writes runs past the statement timeout again and again (a site's
    trigger makes it slow): after ``TIMEOUTS_ALONE_MAX`` tries it is dropped with a warning,
    not retried for ever while the executor waits; the executor goes on, its event before the
    draft is written with its result."""
    caplog.set_level(logging.WARNING)
    db.execute("""
        CREATE FUNCTION slow_draft() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
        CREATE TRIGGER slow_draft BEFORE UPDATE ON todolist FOR EACH ROW
            WHEN (NEW.output ? 'slow' OR NEW.draft ? 'slow') EXECUTE FUNCTION slow_draft();""")
    storage = PostgresStorage(database_url, statement_timeout=0.5)
    todo_id = storage.enqueue(AGENT, "q")
    went_on = threading.Event()

    def drafts(todo: ps.Todo) -> dict[str, Any]:
        todo.events.progress({"step": 1})
        todo.events.result({"slow": True}, final=False)
        went_on.set()
        return {"done": True}

    serve_until_completed(storage, drafts, db, todo_id)
    assert went_on.is_set()
    assert (f"draft of todo {todo_id} dropped: writing it ran past the statement timeout "
            f"{TIMEOUTS_ALONE_MAX} times") in caplog.text
    assert caplog.text.count(f"save_draft for todo {todo_id} failed") == TIMEOUTS_ALONE_MAX - 1
    row = db.execute("SELECT output, draft FROM todolist WHERE id = %s", (todo_id,)).fetchone()
    assert row["output"] == {"done": True} and row["draft"] is None
    steps = db.execute("SELECT count(*) AS n FROM events WHERE todo_id = %s AND event_type = "
                       "'task_working'", (todo_id,)).fetchone()["n"]
    assert steps == 1


def test_a_timeout_while_its_events_are_being_written_does_not_hold_up_the_heartbeat(
        database_url, db):
    """A todo times out while a write of its events is on its way (a slow site trigger): its
    failure waits for that write, to keep its events in order, but not on the heartbeat's
    thread, which goes on renewing leases and keeping deadlines meanwhile (seen here in the
    server registry: a heartbeat every 0.5 s with 2 s leases)."""
    db.execute("""
        CREATE FUNCTION slow_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(4); RETURN NEW; END $$;
        CREATE TRIGGER slow_event BEFORE INSERT ON events FOR EACH ROW
            WHEN (NEW.data->>'slow' = 'yes') EXECUTE FUNCTION slow_event();""")
    storage = PostgresStorage(database_url, max_connections=6)
    todo_id = storage.enqueue(AGENT, "slow")

    def handle(todo: ps.Todo) -> dict[str, Any]:
        todo.events.progress({"slow": "yes"})
        time.sleep(1.0)  # past its timeout, while its event is still being written
        return {"ok": True}

    seen: list[float] = []
    try:
        with ps.start(handle, agent_orch=AGENT, storage=storage, timeout=0.5,
                      lease_seconds=2) as server:
            began = time.monotonic()
            while time.monotonic() - began < 5.0:  # the slow write and the failure after it
                last = db.execute("SELECT extract(epoch FROM max(last_seen)) AS t "
                                  "FROM processgpt_sync_server").fetchone()["t"]
                if last is not None and (not seen or float(last) != seen[-1]):
                    seen.append(float(last))
                time.sleep(0.05)
            wait_for(lambda: server.stats()["failed"] == 1, timeout=10)
    finally:
        storage.close()
    row = db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert row["s"] == "FAILED"
    assert len(seen) > 5 and max(gaps) < 2.0, f"the heartbeat stopped for {max(gaps):.1f} s"


class FailsFirstFinish(PostgresStorage):
    """The first outcome write fails with ``failure`` (a driver bug that kills the writer
    thread, a host out of file descriptors); later ones work."""

    failure: BaseException = SystemExit("the driver broke")
    failed = False

    def finish(self, items: list[dict[str, Any]]) -> Any:
        if not self.failed:
            self.failed = True
            raise self.failure
        return super().finish(items)


@pytest.mark.parametrize("failure", [SystemExit("the driver broke"),
                                     OSError(errno.EMFILE, "Too many open files")],
                         ids=["writer-died", "no-file-descriptor"])
def test_an_outcome_the_server_or_host_failed_to_write_is_not_taken_for_a_refusal(
        database_url, db, caplog, failure):
    """The writer thread died with an outcome in hand, or the host had no file descriptor for
    the write: the database refused nothing, so the result is not stored without its events
    (nor the todo recorded FAILED for it); the todo's lease expires for it to run again."""
    storage = FailsFirstFinish(database_url)
    storage.failure = failure
    todo_id = storage.enqueue(AGENT, "q")
    server = ps.start(lambda todo: {"ok": True}, agent_orch=AGENT, storage=storage)
    try:
        wait_for(lambda: f"outcome of todo {todo_id} could not be recorded" in caplog.text,
                 timeout=10)
    finally:
        with contextlib.suppress(ps.ProcessGPTSyncError):
            server.stop(timeout=2)
        storage.close()
    row = db.execute("SELECT draft_status::text AS s, output FROM todolist WHERE id = %s",
                     (todo_id,)).fetchone()
    assert row == {"s": "STARTED", "output": None}
    assert "could not be stored" not in caplog.text


@pytest.mark.parametrize("finish_order", ["same", "reversed"])
def test_a_heartbeat_and_a_batch_of_outcomes_on_the_same_leases_never_deadlock(
        database_url, db, finish_order):
    """The heartbeat renews the lease of every todo in flight, those whose outcomes are being
    written too, while the outcome writer deletes those leases: both take the lease rows in
    order, so neither waits for the other in a cycle (a site's slow trigger on the lease
    table widens the window here). Before, they took them in their own orders and deadlocked,
    each hit costing a second and a failed call."""
    storage = PostgresStorage(database_url)
    try:
        for i in range(4):
            storage.enqueue(AGENT, f"q{i}")
        claims = storage.claim(agent_orch=AGENT, consumer="c", limit=4, lease_seconds=60,
                               max_claims=3)
        db.execute("""
            CREATE FUNCTION slow_lease() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.2); RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
            END $$;
            CREATE TRIGGER slow_lease BEFORE UPDATE OR DELETE ON processgpt_sync_lease
                FOR EACH ROW EXECUTE FUNCTION slow_lease();""")
        items = [{"todo_id": c.todo_id, "token": c.token, "outcome": "completed",
                  "result": {"ok": True}, "events": []} for c in claims]
        if finish_order == "reversed":
            items.reverse()
        failures: list[BaseException] = []

        def call(write: Any) -> None:
            try:
                write()
            except ps.StorageError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=call, args=(lambda: storage.renew("c", claims, 60),)),
                   threading.Thread(target=call, args=(lambda: storage.finish(items),))]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(30)
    finally:
        storage.close()
    assert failures == []
    assert db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = 'COMPLETED'"
                      ).fetchone()["n"] == 4


class RateLimitedOnce(PostgresStorage):
    """The first events write is refused for now, asked to come back in 5 s (a gateway's 429
    with Retry-After); the rest reach the database."""

    refused = False

    def record_events(self, events: Any) -> Any:
        if not RateLimitedOnce.refused:
            RateLimitedOnce.refused = True
            refusal = ps.StorageUnavailable("rate limited")
            refusal.retry_after = 5
            raise refusal
        return super().record_events(events)


def test_a_todo_ending_while_its_events_wait_out_a_back_off_takes_them_at_once(database_url, db):
    """The flusher's write of a todo's events was refused and waits 5 s to try again; the todo
    ends meanwhile and takes its events for its own final write: at once, not after the wait
    (an executor's question or result would otherwise sit out the back-off, on its clock)."""
    RateLimitedOnce.refused = False
    storage = RateLimitedOnce(database_url)
    storage.enqueue(AGENT, "q")
    (claim,) = storage.claim(agent_orch=AGENT, consumer="c", limit=1, lease_seconds=60,
                             max_claims=3)
    buffer = EventBuffer(storage, flush_interval=0.01, batch_size=100)
    buffer.start()
    try:
        buffer.add({"todo_id": claim.todo_id, "token": claim.token,
                    "event_type": "task_working", "data": {"n": 1}})
        wait_for(lambda: RateLimitedOnce.refused, timeout=5)
        began = time.monotonic()
        taken = buffer.take(claim.todo_id, claim.token)
        took = time.monotonic() - began
    finally:
        buffer.close(timeout=1)
        storage.close()
    assert [e["data"] for e in taken] == [{"n": 1}]
    assert took < 2.5, f"take() waited {took:.1f}s for the write's back-off"
