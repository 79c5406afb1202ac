"""The server registry and the heartbeat that keeps it, on both backends."""

from __future__ import annotations

import time

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
    claims = {c.todo_id: c for c in backend.claim(agent_orch="reg", consumer="c1", limit=2,
                                                    lease_seconds=60, max_claims=3)}
    assert set(claims) == {first, lost}
    # The server only learned of `first`; the answer naming `lost` never arrived.
    report = backend.heartbeat("c1", [claims[first]], 60,
                               {"agent_orch": "reg", "known": [first]})
    assert report.renewed == {first} and report.orphans == {lost}
    rows = {str(r["id"]): r for r in db.execute(
        "SELECT id, draft_status, claim_count FROM todolist").fetchall()}
    assert rows[lost]["draft_status"] is None and rows[lost]["claim_count"] == 0, (
        "claimable again, the lost claim not counted")
    assert rows[first]["draft_status"] == "STARTED"
    # Without `known` (a claim call in flight) nothing is given back.
    again = backend.claim(agent_orch="reg", consumer="c1", limit=1, lease_seconds=60,
                          max_claims=3)
    assert [c.todo_id for c in again] == [lost]
    assert backend.heartbeat("c1", [claims[first]], 60, {"agent_orch": "reg"}).orphans == set()


def test_a_heartbeat_delivered_after_its_server_stopped_changes_nothing(backend, db):
    """The network may deliver a heartbeat after the stop that followed it: it neither brings
    the row back (a clean stop would show as a dead server for a day) nor touches the claims
    of a new instance of the same consumer; that new instance registers as usual."""
    old = {"agent_orch": "reg", "instance": "run-1", "known": []}
    backend.heartbeat("c1", [], 60, old)
    assert backend.server_stopped("c1") is True
    first = backend.enqueue("reg", "a")
    claims = {c.todo_id: c for c in backend.claim(agent_orch="reg", consumer="c1", limit=1,
                                                    lease_seconds=60, max_claims=3)}
    assert set(claims) == {first}
    late = backend.heartbeat("c1", [claims[first]], 60, old)
    assert backend.servers("reg") == [], "the stopped server stays out of the registry"
    assert late.renewed == frozenset() and late.orphans == frozenset()
    assert db.execute("SELECT draft_status FROM todolist WHERE id = %s",
                      (first,)).fetchone()["draft_status"] == "STARTED", "the claim is kept"
    new = {"agent_orch": "reg", "instance": "run-2", "known": [first]}
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
