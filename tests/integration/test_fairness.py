"""Fair claims across tenants and fleet-wide limits, computed in the claim statement."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

import processgpt_sync as ps
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import open_backend, wait_for

LEASE = {"lease_seconds": 60, "max_claims": 3}


@pytest.fixture(autouse=True)
def tenants(database_url):
    """The tenants these todos name, as a platform database holds them (its todolist's
    tenant_id references tenants)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id) VALUES ('a'), ('b'), ('c') ON CONFLICT DO NOTHING")


@pytest.fixture(params=["postgres", "supabase"])
def storage(request, database_url):
    yield from open_backend(request.param, database_url)


def claim(storage, consumer="w1", limit=10, **kw):
    return storage.claim(agent_orch="fair", consumer=consumer, limit=limit, **{**LEASE, **kw})


def enqueue(storage, tenant, n):
    return [storage.enqueue("fair", f"{tenant}{i}", tenant_id=tenant) for i in range(n)]


def test_tenants_take_turns_oldest_first_within_each(storage):
    enqueue(storage, "a", 5)
    enqueue(storage, "b", 3)
    enqueue(storage, "c", 2)
    order = [c.row["query"] for c in claim(storage, limit=10)]
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "a3", "a4"]


def test_a_tenant_with_running_todos_waits_behind_one_without(storage):
    enqueue(storage, "a", 4)
    claim(storage, limit=2)  # a0, a1 now running
    enqueue(storage, "b", 2)
    order = [c.row["query"] for c in claim(storage, consumer="w2", limit=3)]
    assert order == ["b0", "b1", "a2"]


def test_oldest_first_when_fairness_is_off(storage):
    enqueue(storage, "a", 3)
    enqueue(storage, "b", 2)
    order = [c.row["query"] for c in claim(storage, limit=4, fair=False)]
    assert order == ["a0", "a1", "a2", "b0"]


def test_a_capped_tenant_with_a_backlog_does_not_block_other_tenants(storage):
    enqueue(storage, "a", 6)
    enqueue(storage, "b", 2)
    first = claim(storage, limit=10, max_running_per_tenant=2)
    assert sorted(c.row["query"] for c in first) == ["a0", "a1", "b0", "b1"]
    assert claim(storage, consumer="w2", limit=10, max_running_per_tenant=2) == []
    enqueue(storage, "c", 3)
    again = claim(storage, consumer="w2", limit=10, max_running_per_tenant=2)
    assert sorted(c.row["query"] for c in again) == ["c0", "c1"]


def test_max_running_caps_the_whole_agent_orch(storage):
    enqueue(storage, "a", 3)
    enqueue(storage, "b", 3)
    assert len(claim(storage, limit=10, max_running=4)) == 4
    assert claim(storage, consumer="w2", limit=10, max_running=4) == []


def test_reclaims_and_answers_are_claimed_within_the_limits(storage, db):
    (a0,) = [c for c in claim_after(storage, "a", 1)]
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    enqueue(storage, "a", 1)
    revision = enqueue(storage, "b", 1)[0]
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', feedback = "
               "'[{\"content\": \"again\"}]' WHERE id = %s", (revision,))
    got = claim(storage, consumer="w2", limit=10, max_running_per_tenant=1)
    kinds = {c.row["query"]: c.extras["resume"]["kind"] for c in got}
    # the expired claim no longer counts as running; a's reclaim is older than a's new todo
    assert kinds == {"a0": "reclaim", "b0": "revision"}
    assert a0.todo_id in {c.todo_id for c in got}


def test_an_abandoned_claim_takes_its_turn_by_age_among_waiting_todos(storage, db):
    """Abandoned claims come from their expired leases, not from the waiting-todo index: a
    tenant whose only todo was abandoned still gets its turn, oldest first on ties."""
    claim_after(storage, "a", 1)
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    enqueue(storage, "b", 2)
    got = claim(storage, consumer="w2", limit=3)
    assert [(c.row["query"], c.extras["resume"]["kind"]) for c in got] == [
        ("a0", "reclaim"), ("b0", "fresh"), ("b1", "fresh")]


@pytest.mark.parametrize("fair", [True, False])
def test_an_older_abandoned_claim_goes_before_newer_waiting_todos(storage, db, fair):
    claim_after(storage, "a", 1)
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    for name in ("later1", "later2"):
        storage.enqueue("fair", name, tenant_id="a")
    got = claim(storage, consumer="w2", limit=2, fair=fair)
    assert [(c.row["query"], c.extras["resume"]["kind"]) for c in got] == [
        ("a0", "reclaim"), ("later1", "fresh")]


def claim_after(storage, tenant, n):
    enqueue(storage, tenant, n)
    return claim(storage, limit=n)


def test_status_shows_queued_and_running_per_tenant(storage):
    enqueue(storage, "a", 3)
    enqueue(storage, "b", 1)
    claim(storage, limit=1, fair=False)
    load = {(r["tenant_id"], r["queued"], r["running"]) for r in storage.tenant_load("fair")}
    assert load == {("a", 2, 1), ("b", 1, 0)}


def test_a_flooding_tenant_does_not_hold_up_another_tenants_todo(database_url, db):
    """B's todo runs at the next free slot when fair; behind A's whole backlog when not."""
    started: list[str] = []
    lock = threading.Lock()

    def handle(todo):
        with lock:
            started.append(todo.input)
        time.sleep(0.02)
        return {}

    def a_todos_run_before_b(fair):
        store = PostgresStorage(database_url)
        try:
            db.execute("DELETE FROM todolist")
            started.clear()
            enqueue(store, "a", 60)
            with ps.start(handle, agent_orch="fair", storage=store, workers=2,
                          fair=fair) as server:
                wait_for(lambda: len(started) >= 4)
                enqueue(store, "b", 1)
                with lock:  # B is stored: A's todos starting later were claimed before it
                    before = len(started)
                wait_for(lambda: "b0" in started, timeout=30)
                with lock:
                    after = started.index("b0")
                server.stop(timeout=0)
        finally:
            store.close()
        return after - before

    fair = a_todos_run_before_b(True)
    fifo = a_todos_run_before_b(False)
    assert fair <= 2  # at most the two slots' claims already made when B arrived
    assert fifo > 20


@pytest.mark.slow
def test_limits_hold_with_three_servers_claiming_at_once(database_url, db):
    store = PostgresStorage(database_url)
    try:
        for tenant in ("a", "b", "c"):
            enqueue(store, tenant, 40)
    finally:
        store.close()
    peaks = {"total": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rows = db.execute("SELECT tenant_id, count(*) AS n FROM todolist "
                              "WHERE draft_status = 'STARTED' GROUP BY tenant_id").fetchall()
            for r in rows:
                peaks[r["tenant_id"]] = max(peaks.get(r["tenant_id"], 0), r["n"])
            peaks["total"] = max(peaks["total"], sum(r["n"] for r in rows))
            time.sleep(0.005)

    def handle(todo):
        time.sleep(0.03)
        return {}

    sampler = threading.Thread(target=sample)
    sampler.start()
    servers = [ps.start(handle, agent_orch="fair", workers=4, database_url=database_url,
                        max_running=5, max_running_per_tenant=2) for _ in range(3)]
    try:
        wait_for(lambda: db.execute("SELECT count(*) AS n FROM todolist WHERE draft_status = "
                                    "'COMPLETED'").fetchone()["n"] == 120, timeout=60)
    finally:
        for server in servers:
            server.stop()
        stop.set()
        sampler.join()
    assert peaks["total"] <= 5 and max(peaks[t] for t in "abc") <= 2
    assert peaks["total"] >= 4  # the limits were reached, not just never approached


def claim_in_open_transaction(conn: psycopg.Connection, consumer: str, fair: bool) -> None:
    """A claim of another server, its transaction still open: it holds the rows it took."""
    conn.execute("SELECT processgpt_sync_claim_v4(p_agent_orch => 'fair', p_consumer => %s, "
                 "p_limit => 1, p_lease_seconds => 60, p_max_claims => 3, p_fair => %s)",
                 (consumer, fair))


@pytest.mark.parametrize("candidates", ["tenants' turns", "abandoned claims"])
def test_a_claim_passes_over_candidates_concurrent_claims_hold_and_takes_others(
        storage, database_url, candidates):
    """Servers woken by the same NOTIFY claim at once. A claim that picks from a short list of
    candidates (its limit twice: tenants taking turns; or the oldest waiting todos with the
    abandoned claims) takes the next ones when concurrent claims hold all of those. Before,
    it came back empty, and its server waited for its poll with todos waiting."""
    fair = candidates == "tenants' turns"
    if fair:
        enqueue(storage, "a", 1)
        enqueue(storage, "b", 1)
        enqueue(storage, "a", 2)
        others = 2  # a0 and b0, the list of a claim of 1
    else:
        enqueue(storage, "a", 5)
        claim(storage, consumer="dead", limit=1, fair=False)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 s'")
        others = 3  # the abandoned a0, a1 and a2
    holders = [psycopg.connect(database_url) for _ in range(others)]
    try:
        for i, conn in enumerate(holders):
            claim_in_open_transaction(conn, f"w{i}", fair)
        taken = claim(storage, consumer="w-last", limit=1, fair=fair)
    finally:
        for conn in holders:
            conn.close()
    assert len(taken) == 1, "came back empty while todos waited"
