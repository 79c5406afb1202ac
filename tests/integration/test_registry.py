"""The server registry and the heartbeat that keeps it, on both backends."""

from __future__ import annotations

import time
import uuid

import pytest

import processgpt_sync as ps
from tests.conftest import open_backend, wait_for


@pytest.fixture(params=["postgres", "supabase"])
def backend(request, database_url):
    yield from open_backend(request.param, database_url)


def test_a_heartbeat_registers_the_server_and_a_stale_one_shows_dead(backend, db):
    row = {"agent_orch": "reg", "host": "h1", "pid": 42, "version": "9.9",
           "heartbeat_seconds": 0.5, "running": 2, "completed": 7, "stats": {"failed": 1}}
    report = backend.heartbeat("c1", [], 60, row)
    assert report.renewed == frozenset() and report.orphans == frozenset()
    (server,) = backend.servers("reg")
    assert (server["consumer"], server["host"], server["pid"], server["running"],
            server["completed"], server["alive"]) == ("c1", "h1", 42, 2, 7, True)
    assert server["stats"] == {"failed": 1}
    time.sleep(1.6)  # three heartbeats of 0.5 s missed
    (server,) = backend.servers(consumer="c1")
    assert server["alive"] is False and server["seen_seconds_ago"] >= 1.5
    backend.heartbeat("c1", [], 60, row)
    assert backend.servers(consumer="c1")[0]["alive"] is True
    assert backend.server_stopped("c1") is True
    assert backend.servers("reg") == []


def test_the_heartbeat_gives_back_a_claim_whose_answer_was_lost(backend, db):
    first, lost = backend.enqueue("reg", "a"), backend.enqueue("reg", "b")
    (answered,) = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                                max_claims=3, call_id=str(uuid.uuid4()))
    assert answered.todo_id == first
    # The server never saw the answer of this call; it names the call in its heartbeat.
    call = str(uuid.uuid4())
    assert [c.todo_id for c in backend.claim(agent_orch="reg", consumer="c1", limit=1,
                                             lease_seconds=60, max_claims=3,
                                             call_id=call)] == [lost]
    report = backend.heartbeat("c1", [answered], 60, {"agent_orch": "reg", "unanswered": [call]})
    assert report.renewed == {first} and report.orphans == {lost}
    rows = {str(r["id"]): r for r in db.execute(
        "SELECT id, draft_status, claim_count FROM todolist").fetchall()}
    assert rows[lost]["draft_status"] is None and rows[lost]["claim_count"] == 0, (
        "claimable again, the lost claim not counted")
    assert rows[first]["draft_status"] == "STARTED"
    # Claimed again by a call that was answered: a heartbeat naming the old call again (the
    # server names it for a while) leaves it alone.
    again = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                          max_claims=3, call_id=str(uuid.uuid4()))
    assert [c.todo_id for c in again] == [lost]
    assert backend.heartbeat("c1", [answered, *again], 60,
                             {"agent_orch": "reg", "unanswered": [call]}).orphans == set()



def test_a_stop_gives_back_the_claims_of_calls_it_got_no_answer_to(backend, db):
    """A claim whose answer the server never got just before it stopped, which no heartbeat
    named since: the stop names the call and gives its todo back, rather than leave it to its
    lease's expiry and count it as one more claim. The run's other leases (an outcome still on
    its way) and other servers' are left alone."""
    lost, writing, others = (backend.enqueue("reg", q) for q in ("lost", "writing", "others"))
    run, call = str(uuid.uuid4()), str(uuid.uuid4())
    claims = [backend.claim(agent_orch="reg", consumer=consumer, limit=1, lease_seconds=60,
                            max_claims=3, call_id=call_id, instance=instance)[0]
              for consumer, call_id, instance in (("c1", call, run),
                                                  ("c1", str(uuid.uuid4()), run),
                                                  ("c2", call, str(uuid.uuid4())))]
    assert [c.todo_id for c in claims] == [lost, writing, others]
    backend.server_stopped("c1", run, [call])
    rows = {str(r["id"]): r for r in db.execute(
        "SELECT id, draft_status, consumer, claim_count FROM todolist")}
    assert (rows[lost]["draft_status"], rows[lost]["consumer"], rows[lost]["claim_count"]) == (
        None, None, 0), "claimable again, the lost claim not counted"
    assert rows[writing]["draft_status"] == rows[others]["draft_status"] == "STARTED"
    assert sorted(str(r["todo_id"]) for r in db.execute(
        "SELECT todo_id FROM processgpt_sync_lease")) == sorted([writing, others])


def test_a_heartbeat_renews_its_leases_while_an_orphans_row_is_held(backend, db,
                                                                     database_url):
    """Another transaction holds the row of a todo the heartbeat would give back: the
    heartbeat does not wait for it (every other lease would expire meanwhile); it renews the
    others, and the next heartbeat gives that todo back once the row is free."""
    import psycopg

    backend.enqueue("reg", "a")
    backend.enqueue("reg", "b")
    (answered,) = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                                max_claims=3, call_id=str(uuid.uuid4()))
    call = str(uuid.uuid4())
    (lost,) = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                            max_claims=3, call_id=call)
    server = {"agent_orch": "reg", "unanswered": [call]}
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (lost.todo_id,))
        began = time.monotonic()
        report = backend.heartbeat("c1", [answered], 60, server)
        assert time.monotonic() - began < 5, "it did not wait for the held row"
        assert report.renewed == {answered.todo_id} and report.orphans == frozenset()
    report = backend.heartbeat("c1", [answered], 60, server)
    assert report.orphans == {lost.todo_id}
    assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                      (lost.todo_id,)).fetchone()["draft_status"] is None

def test_a_heartbeat_the_network_delivers_late_gives_back_nothing_claimed_after_it(backend, db):
    """A heartbeat sent, held up on the way past its caller's deadline, and delivered after
    the server claimed more todos on a new connection: it names only the calls that had failed
    when it was sent, so the new claims stay this server's (a heartbeat that listed every todo
    the server held gave them back, and another server ran them again)."""
    import threading

    release = threading.Event()

    def handle(todo):
        release.wait(30)
        return {"ok": 1}

    held = backend.enqueue("reg", "held")
    server = ps.start(handle, agent_orch="reg", storage=backend, workers=2, lease_seconds=60,
                      consumer="late-1")
    try:
        wait_for(lambda: server.stats()["running"] == 1)
        # the heartbeat as the server sends it now, delivered only below
        late = (server._registry_row(15.0), [run.claim for run in server._inflight.runs()])
        fresh = backend.enqueue("reg", "fresh")
        wait_for(lambda: server.stats()["running"] == 2)
        report = backend.heartbeat("late-1", late[1], 60, late[0])
        assert report.orphans == frozenset() and report.renewed == {held}
        assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                          (fresh,)).fetchone()["draft_status"] == "STARTED"
        release.set()
        wait_for(lambda: server.stats()["completed"] == 2, timeout=20)
    finally:
        release.set()
        server.stop()
    assert server.stats()["lost"] == 0, "the fresh todo's run was not told it lost it"


def test_a_new_run_under_the_same_name_takes_over_and_the_old_one_can_do_nothing(backend, db):
    """A supervisor restarts a killed process under its consumer name: the new run's first
    heartbeat gives back the killed run's claims at once (not after their lease) and supersedes
    it, so the old run's heartbeats and claims the network still delivers do nothing, and its
    stop, delivered late, leaves the new run's row alone."""
    todo = backend.enqueue("reg", "a")
    (old_claim,) = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                                 max_claims=3, call_id=str(uuid.uuid4()), instance="run-1")
    backend.heartbeat("c1", [old_claim], 60, {"agent_orch": "reg", "instance": "run-1"})
    report = backend.heartbeat("c1", [], 60, {"agent_orch": "reg", "instance": "run-2"})
    assert report.orphans == {todo} and not report.superseded
    assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                      (todo,)).fetchone()["draft_status"] is None, "claimable again"
    late = backend.heartbeat("c1", [old_claim], 60, {"agent_orch": "reg", "instance": "run-1"})
    assert late.superseded and late.renewed == frozenset() and late.lost == {todo}
    with pytest.raises(ps.StorageError) as refused:
        backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                      max_claims=3, call_id=str(uuid.uuid4()), instance="run-1")
    assert refused.value.code == "PS001" and "superseded" in str(refused.value)
    (new_claim,) = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                                 max_claims=3, call_id=str(uuid.uuid4()), instance="run-2")
    assert backend.server_stopped("c1", "run-1") is False
    (row,) = backend.servers(consumer="c1")
    assert row["alive"]
    again = backend.heartbeat("c1", [new_claim], 60, {"agent_orch": "reg", "instance": "run-2"})
    assert again.renewed == {todo} and again.orphans == frozenset()


def test_a_claim_crossing_a_takeover_waits_for_it_and_claims_nothing(backend, db,
                                                                      database_url):
    """The old run's claim arrives while the new run's first heartbeat is taking the name
    over: it waits for the takeover and is refused. Had it gone ahead, its leases (made after
    the heartbeat gave the old run's back) would hold the todo for a run that can no longer
    renew them, and the todo would wait out the lease."""
    import threading

    import psycopg

    todo = backend.enqueue("reg", "a")
    backend.heartbeat("c1", [], 60, {"agent_orch": "reg", "instance": "run-1"})
    outcome: list[object] = []

    def old_run_claims() -> None:
        try:
            outcome.append(backend.claim(agent_orch="reg", consumer="c1", limit=1,
                                         lease_seconds=60, max_claims=3,
                                         call_id=str(uuid.uuid4()), instance="run-1"))
        except ps.StorageError as exc:
            outcome.append(exc)

    with psycopg.connect(database_url) as takeover:
        takeover.execute("SELECT processgpt_sync_heartbeat_v1('c1', '{}', '{}', 60, %s)",
                         ('{"agent_orch": "reg", "instance": "run-2"}',))
        claimer = threading.Thread(target=old_run_claims)
        claimer.start()
        wait_for(lambda: outcome or db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%claim_v4%%'").fetchone()["n"] == 1, timeout=10)
        takeover.commit()
    claimer.join(20)
    (result,) = outcome
    assert isinstance(result, ps.StorageError) and result.code == "PS001", result
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0
    assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                      (todo,)).fetchone()["draft_status"] is None, "claimable by the new run"


def test_a_server_of_an_earlier_version_still_has_its_unknown_leases_given_back(backend, db):
    """Servers of the previous version list every todo they hold (`known`) instead."""
    first, lost = backend.enqueue("reg", "a"), backend.enqueue("reg", "b")
    claims = {c.todo_id: c for c in backend.claim(agent_orch="reg", consumer="c1", limit=2,
                                                    lease_seconds=60, max_claims=3)}
    report = backend.heartbeat("c1", [claims[first]], 60,
                               {"agent_orch": "reg", "known": [first]})
    assert report.renewed == {first} and report.orphans == {lost}


def test_a_heartbeat_delivered_after_its_server_stopped_changes_nothing(backend, db):
    """The network may deliver a heartbeat after the stop that followed it: it neither brings
    the row back (a clean stop would show as a dead server for a day) nor touches the claims
    of a new instance of the same consumer; that new instance registers as usual."""
    old = {"agent_orch": "reg", "instance": "run-1"}
    backend.heartbeat("c1", [], 60, old)
    assert backend.server_stopped("c1", "run-1") is True
    first = backend.enqueue("reg", "a")
    claims = {c.todo_id: c for c in backend.claim(agent_orch="reg", consumer="c1", limit=1,
                                                    lease_seconds=60, max_claims=3)}
    assert set(claims) == {first}
    late = backend.heartbeat("c1", [claims[first]], 60, old)
    assert backend.servers("reg") == [], "the stopped server stays out of the registry"
    assert late.renewed == frozenset() and late.orphans == frozenset()
    assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                      (first,)).fetchone()["draft_status"] == "STARTED", "the claim is kept"
    new = {"agent_orch": "reg", "instance": "run-2"}
    assert backend.heartbeat("c1", [claims[first]], 60, new).renewed == {first}
    assert [row["consumer"] for row in backend.servers("reg")] == ["c1"]


def test_a_serving_server_is_listed_while_it_runs_and_removed_when_it_stops(backend, db):
    with ps.start(lambda todo: {"ok": 1}, agent_orch="reg", storage=backend,
                  lease_seconds=4, consumer="serving-1") as server:
        wait_for(lambda: backend.servers(consumer="serving-1"))
        (row,) = backend.servers("reg")
        assert row["alive"] and row["version"] == ps.__version__
        assert server.stats()["db_ok_seconds_ago"] < 4
    assert backend.servers("reg") == []


def test_a_server_superseded_by_a_newer_run_under_its_name_stops_and_says_why(backend, db):
    """Two servers under one consumer name (a misconfiguration, or a run thought dead): once a
    newer run takes the name, the older one stops, unhealthy, with the reason, rather than go
    on claiming todos whose leases it can no longer renew."""
    server = ps.start(lambda todo: {"ok": 1}, agent_orch="reg", storage=backend,
                      lease_seconds=4, consumer="dup")
    try:
        wait_for(lambda: backend.servers(consumer="dup"))
        backend.heartbeat("dup", [], 60, {"agent_orch": "reg", "instance": "newer-run"})
        todo = backend.enqueue("reg", "for the newer run")  # an idle Supabase server claims
        wait_for(lambda: server.failure is not None, timeout=10)
        reason = str(server.failure)
        assert "newer" in reason and "dup" in reason and "PROCESSGPT_CONSUMER" in reason, reason
        assert not server.healthy()[0]
        wait_for(lambda: server.join(0.1), timeout=20)
    finally:
        server.stop()
    (row,) = backend.servers(consumer="dup")
    assert row["alive"], "the newer run's row stays"
    assert server.stats()["claimed"] == 0
    assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                      (todo,)).fetchone()["draft_status"] is None, "left for the newer run"


def test_a_failed_deregister_names_the_claim_calls_whose_todos_wait_for_their_leases(
        database_url, caplog):
    """Leaving the registry also gives back what claim calls without an answer took: when
    that write fails, the warning names those calls (their todos run again only once their
    leases run out), not only the registry row."""
    import logging

    from processgpt_sync.settings import Settings
    from processgpt_sync.shutdown import Shutdown
    from processgpt_sync.stats import ServerStats
    from processgpt_sync.storage.postgres import PostgresStorage

    class Unreachable(PostgresStorage):
        def server_stopped(self, consumer, instance=None, unanswered=()):
            raise ps.StorageUnavailable("database unreachable (server_stopped)")

    storage = Unreachable(database_url)
    try:
        shutdown = Shutdown(storage, Settings(agent_orch="reg", consumer="c1"),
                            stats=ServerStats(), log=logging.getLogger("processgpt_sync.t"),
                            extra={})
        with caplog.at_level(logging.WARNING, "processgpt_sync"):
            shutdown.deregister(5.0, ["call-1", "call-2"])
    finally:
        storage.close()
    (record,) = [r for r in caplog.records if "registry" in r.getMessage()]
    assert "database unreachable" in record.getMessage()
    assert "the claim calls call-1, call-2 (no answer came)" in record.getMessage()
