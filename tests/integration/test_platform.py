"""Running on a ProcessGPT platform database, next to upstream agents (process-gpt-agent-sdk).

The platform database comes from tests/fixtures/platform_schema.sql; "upstream" adds the lease
functions of the original SDK (tests/fixtures/upstream_lease.sql), which claim from the same
`todolist` with `fetch_pending_task`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

import processgpt_sync as ps
from processgpt_sync.console import ConsoleConfig, ConsoleServer
from processgpt_sync.errors import StorageError
from processgpt_sync.events import make_event
from processgpt_sync.human import question_data
from processgpt_sync.models import Claim
from processgpt_sync.retrying import HELD_BACK_MAX
from processgpt_sync.stats import ServerStats
from processgpt_sync.storage import install
from processgpt_sync.storage.install import install_schema
from processgpt_sync.storage.postgres import PostgresStorage
from tests.acceptance.test_cli import cli
from tests.conftest import lock_the_todo_during_a_wait_for_work, open_backend, wait_for


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def column(db: psycopg.Connection, table: str, name: str) -> dict:
    return db.execute(
        "SELECT data_type, column_default, is_nullable FROM information_schema.columns "
        "WHERE table_name = %s AND column_name = %s", (table, name)).fetchone()


def lease_table_exists(db: psycopg.Connection) -> bool:
    found = db.execute("SELECT to_regclass('processgpt_sync_lease') AS t").fetchone()
    return found["t"] is not None


@pytest.fixture
def upstream(upstream_database_url: str) -> Iterator[tuple[PostgresStorage, psycopg.Connection]]:
    store = PostgresStorage(upstream_database_url, max_connections=6)
    with connect(upstream_database_url) as db:
        yield store, db
    store.close()


def fetch_upstream(db: psycopg.Connection, consumer: str = "upstream-w1", limit: int = 1,
                   agent_orch: str = "shared") -> list[str]:
    """Claim as an upstream worker does: fetch_pending_task with a 120 s lease."""
    rows = db.execute("SELECT id FROM fetch_pending_task(%s, %s, %s, 'prod', 120, 3)",
                      (agent_orch, consumer, limit)).fetchall()
    return [str(r["id"]) for r in rows]


def claim_ours(store: PostgresStorage, consumer: str = "ours-w1", limit: int = 1) -> list:
    return store.claim(agent_orch="shared", consumer=consumer, limit=limit, lease_seconds=60,
                       max_claims=3)


# --- init-db on an existing platform database -------------------------------------------------

def test_init_db_on_a_platform_database_prints_what_it_adds_and_keeps_platform_columns(
        platform_database_url):
    dry = cli("init-db", "--dry-run", "--database-url", platform_database_url).stdout
    assert "CREATE TABLE IF NOT EXISTS processgpt_sync_lease" in dry, "the SQL is shown"
    assert "--   add table processgpt_sync_lease" in dry
    assert "--   add column todolist.claim_token uuid" in dry
    with connect(platform_database_url) as db:
        assert not lease_table_exists(db)
        platform_before = {c: column(db, t, c) for t, c in (
            ("todolist", "id"), ("todolist", "start_date"), ("todolist", "claim_count"),
            ("events", "id"), ("events", "tenant_id"), ("notifications", "id"))}

    done = cli("init-db", "--database-url", platform_database_url).stdout
    added = [line for line in done.splitlines() if line.startswith("add ")]
    assert added == [line.removeprefix("--   ") for line in dry.splitlines()
                     if line.startswith("--   add ")], "a dry run names exactly what is added"
    assert "add column todolist.lease_until timestamp with time zone" in added
    assert not [a for a in added if a.startswith(("add column events.", "add table todolist"))]
    assert "up to date" in cli("init-db", "--database-url", platform_database_url).stdout

    with connect(platform_database_url) as db:
        after = {c: column(db, t, c) for t, c in (
            ("todolist", "id"), ("todolist", "start_date"), ("todolist", "claim_count"),
            ("events", "id"), ("events", "tenant_id"), ("notifications", "id"))}
    assert {k: v for k, v in after.items() if k != "claim_count"} == {
        k: v for k, v in platform_before.items() if k != "claim_count"}
    assert after["start_date"]["data_type"] == "timestamp without time zone"
    assert after["id"]["column_default"] is None


def test_init_db_refuses_to_change_the_type_of_an_existing_column(platform_database_url,
                                                                   monkeypatch):
    real = install.read_sql

    def altered(name: str) -> str:
        extra = "\nALTER TABLE todolist ALTER COLUMN start_date TYPE timestamptz;\n"
        return real(name) + (extra if name == "schema.sql" else "")

    monkeypatch.setattr(install, "read_sql", altered)
    with pytest.raises(StorageError, match=r"column todolist.start_date: timestamp without "
                                           r"time zone -> timestamp with time zone"):
        install_schema(platform_database_url)
    with connect(platform_database_url) as db:
        assert column(db, "todolist", "start_date")["data_type"] == "timestamp without time zone"
        assert not lease_table_exists(db)


# --- side by side with upstream workers ---------------------------------------------------------

def test_a_todo_we_run_is_never_taken_by_an_upstream_worker(upstream):
    store, db = upstream
    todo = store.enqueue("shared", "ours")
    # An old lease from an earlier upstream claim, long expired, still on the row.
    db.execute("UPDATE todolist SET lease_until = now() - interval '1 hour' WHERE id = %s",
               (todo,))
    (claim,) = claim_ours(store)
    assert fetch_upstream(db) == [], "upstream reclaims a STARTED todo only past its lease_until"
    row = db.execute("SELECT lease_until, consumer FROM todolist").fetchone()
    assert row == {"lease_until": None, "consumer": "ours-w1"}
    assert store.renew("ours-w1", [claim], 60).renewed == {todo}


def test_our_heartbeat_reports_a_todo_lost_once_another_worker_holds_it(upstream):
    store, db = upstream
    todo = store.enqueue("shared", "ours")
    (claim,) = claim_ours(store)
    db.execute("UPDATE todolist SET consumer = 'upstream-w1', "
               "lease_until = now() + interval '2 minutes' WHERE id = %s", (todo,))
    report = store.renew("ours-w1", [claim], 60)
    assert report.lost == {todo} and not report.renewed


def test_a_revision_an_upstream_worker_took_from_our_running_claim_is_not_ours_to_write(
        upstream):
    """The UI asks for a revision while our run works; an upstream worker fetches it (it keeps
    our token on the row, as it sets none). Our run's late writes are refused, and giving it
    back leaves the upstream worker's claim alone."""
    store, db = upstream
    todo = store.enqueue("shared", "ours first")
    (claim,) = claim_ours(store)
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED' WHERE id = %s", (todo,))
    assert fetch_upstream(db) == [todo]
    event = make_event(todo, claim.token, "task_working", {"stale": True})
    assert [r["reason"] for r in store.record_events([event])] == [
        "not the owner of this todo (lease lost, cancelled or finished)"]
    draft = store.save_result(claim, {"stale": True}, final=False)
    final = store.save_result(claim, {"stale": True})
    failed = store.fail(claim, "stale")
    (finished,) = store.finish([{"todo_id": todo, "token": claim.token, "outcome": "completed",
                                 "result": {"stale": True}, "events": [event]}])
    assert [(o.applied, o.reason) for o in (draft, final, failed, finished)] == [
        (False, "not_owner")] * 4
    assert store.release([claim]) == 0
    row = db.execute("SELECT draft_status::text, consumer, output, draft FROM todolist "
                     "WHERE id = %s", (todo,)).fetchone()
    assert row == {"draft_status": "STARTED", "consumer": "upstream-w1", "output": None,
                   "draft": None}
    assert db.execute("SELECT count(*) AS n FROM events WHERE todo_id = %s",
                      (todo,)).fetchone()["n"] == 0
    assert db.execute("SELECT renew_task_lease(%s, 'upstream-w1', 60) ->> 'reason' AS r",
                      (todo,)).fetchone()["r"] == "ok"
    assert store.renew("ours-w1", [claim], 60).lost == {todo}


def test_we_never_take_a_todo_an_upstream_worker_holds(upstream):
    store, db = upstream
    theirs = store.enqueue("shared", "theirs")
    assert fetch_upstream(db) == [theirs]
    assert claim_ours(store) == [], "a live upstream lease is theirs"
    # Even a todo we ran once, whose lease in our table expired, is left alone while an
    # upstream worker holds it (its consumer on the row, its lease live).
    ours = store.enqueue("shared", "ours first")
    claim_ours(store)
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    db.execute("UPDATE todolist SET consumer = 'upstream-w2', "
               "lease_until = now() + interval '2 minutes' WHERE id = %s", (ours,))
    assert claim_ours(store, consumer="ours-w2") == []
    rows = {r["id"]: r for r in db.execute("SELECT id::text, consumer FROM todolist")}
    assert rows[theirs]["consumer"] == "upstream-w1" and rows[ours]["consumer"] == "upstream-w2"


def expire_upstream_lease(db: psycopg.Connection, todo_id: str) -> None:
    db.execute("UPDATE todolist SET lease_until = now() - interval '1 second' WHERE id = %s",
               (todo_id,))


def test_an_upstream_claim_whose_lease_ran_out_is_taken_over_as_upstream_workers_would(upstream):
    """Servers that replace upstream agents on an agent_orch inherit what those held: by the
    SDK's own rule a STARTED todo past its lease_until is abandoned, so we reclaim it (one more
    claim), and the upstream worker, should it come back, finds it is no longer its own."""
    store, db = upstream
    todo = store.enqueue("shared", "held by a worker that died")
    assert fetch_upstream(db) == [todo]
    expire_upstream_lease(db, todo)
    (claim,) = claim_ours(store)
    assert claim.todo_id == todo
    assert claim.extras["resume"]["kind"] == "reclaim"
    row = db.execute("SELECT consumer, lease_until, claim_count, draft_status::text "
                     "FROM todolist").fetchone()
    assert row == {"consumer": "ours-w1", "lease_until": None, "claim_count": 2,
                   "draft_status": "STARTED"}
    (renew,) = db.execute("SELECT renew_task_lease(%s, 'upstream-w1', 120) AS r",
                          (todo,)).fetchone().values()
    assert renew == {"renewed": False, "reason": "not_owner"}
    # Given back (our server stops): an expired upstream-style claim again, claimable by either.
    assert store.release([claim]) == 0
    row = db.execute("SELECT consumer, draft_status::text, lease_until < now() AS expired "
                     "FROM todolist").fetchone()
    assert row == {"consumer": None, "draft_status": "STARTED", "expired": True}
    assert fetch_upstream(db, consumer="upstream-w2") == [todo]
    late = store.save_result(claim, {"stale": True})  # our run, still going after the stop
    assert not late.applied, "a given-back run's writes are refused once another worker has it"
    assert db.execute("SELECT output FROM todolist").fetchone() == {"output": None}


def test_an_idle_supabase_server_takes_over_an_upstream_claim_soon_after_it_runs_out(
        upstream_database_url: str) -> None:
    """An upstream worker claimed a todo with a short lease and died. An idle server on the
    Supabase backend (no LISTEN) waits on the database for work: that wait counts an upstream
    claim that ran out, as the claim's own probe does, so the todo is taken over within
    seconds. Before, the wait saw only waiting todos and this library's own expired leases:
    the todo waited for the poll (30 s here), or for some other todo to arrive."""
    db = connect(upstream_database_url)
    store = next(backends := open_backend("supabase", upstream_database_url))
    ran: list[str] = []
    try:
        with ps.start(lambda t: ran.append(t.id) or {"ok": True}, agent_orch="shared",
                      storage=store, poll_interval=30) as server:
            time.sleep(0.5)  # idle: its wait for work is under way
            with db.transaction():  # made and taken at once: no server saw it waiting
                todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('shared', 'q') AS id"
                                      ).fetchone()["id"])
                assert [str(r["id"]) for r in db.execute(
                    "SELECT id FROM fetch_pending_task('shared', 'upstream-w1', 1, 'prod', 2, "
                    "3)")] == [todo]
            taken_until = time.monotonic() + 2
            wait_for(lambda: server.stats()["completed"] == 1, timeout=12)
            assert time.monotonic() >= taken_until, "taken before the upstream lease ran out"
    finally:
        next(backends, None)
        db.close()
    assert ran == [todo]


def test_an_upstream_claim_that_ran_out_is_settled_cancelled_or_failed_and_can_be_retried(
        upstream):
    store, db = upstream
    cancelled, exhausted, stuck = (store.enqueue("shared", q) for q in ("c", "x", "s"))
    assert sorted(fetch_upstream(db, limit=3)) == sorted([cancelled, exhausted, stuck])
    db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (cancelled,))
    db.execute("UPDATE todolist SET claim_count = 3 WHERE id = %s", (exhausted,))
    for todo in (cancelled, exhausted, stuck):
        expire_upstream_lease(db, todo)
    (claim,) = claim_ours(store, limit=3)
    assert claim.todo_id == stuck
    states = {r["id"]: r["draft_status"] for r in db.execute(
        "SELECT id::text, draft_status::text FROM todolist")}
    assert states == {cancelled: "CANCELLED", exhausted: "FAILED", stuck: "STARTED"}
    (error,) = db.execute("SELECT data->>'error' AS e FROM events WHERE todo_id = %s",
                          (exhausted,)).fetchall()
    assert error["e"] == "claimed 3 times without finishing (max_claims=3)"
    # An expired upstream claim is abandoned, so retry takes it (a live one is refused).
    other = store.enqueue("shared", "o")
    assert fetch_upstream(db) == [other]
    assert "it is running" in cli("retry", other, "--database-url", db.info.dsn,
                                  check=False).stderr
    expire_upstream_lease(db, other)
    # ... while its step is in progress: once the process moved it on, it is the process's
    db.execute("UPDATE todolist SET status = 'PENDING' WHERE id = %s", (other,))
    refused = cli("retry", other, "--database-url", db.info.dsn, check=False)
    assert "ran out while the step is not in progress (status PENDING)" in refused.stderr
    assert claim_ours(store, limit=3) == [], "nor is it taken over"
    db.execute("UPDATE todolist SET status = 'IN_PROGRESS' WHERE id = %s", (other,))
    cli("retry", other, "--database-url", db.info.dsn)
    assert db.execute("SELECT draft_status, consumer FROM todolist WHERE id = %s",
                      (other,)).fetchone() == {"draft_status": None, "consumer": None}


def test_our_claims_and_upstream_claims_interleave_without_running_a_todo_twice(upstream):
    store, db = upstream
    ids = {store.enqueue("shared", f"q{i}") for i in range(240)}
    taken: dict[str, list[str]] = {"ours": [], "theirs": []}
    errors: list[BaseException] = []
    # All four start claiming at once, each on a connection opened before (opening one takes
    # longer than the other side needs to claim everything).
    together = threading.Barrier(4, timeout=30)

    def ours() -> None:
        try:
            store.claim(agent_orch="nobody", consumer="warm-up", limit=1, lease_seconds=60,
                        max_claims=3)
            together.wait()
            while batch := claim_ours(store, consumer=f"ours-{threading.get_ident()}", limit=2):
                taken["ours"].extend(c.todo_id for c in batch)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def theirs() -> None:
        try:
            with connect(db.info.dsn) as own:
                together.wait()
                while batch := fetch_upstream(own, consumer=f"up-{threading.get_ident()}",
                                              limit=2):
                    taken["theirs"].extend(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (ours, theirs, ours, theirs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    everything = taken["ours"] + taken["theirs"]
    assert sorted(everything) == sorted(ids), "every todo claimed exactly once"
    assert taken["ours"] and taken["theirs"]
    # Both kinds of claim stay put: neither side takes the other's over afterwards.
    assert claim_ours(store, consumer="late", limit=200) == []
    assert fetch_upstream(db, consumer="late", limit=200) == []


def test_an_answer_to_an_upstream_agents_question_leaves_its_todo_alone(upstream):
    store, db = upstream
    todo = store.enqueue("shared", "theirs")
    assert fetch_upstream(db) == [todo]
    db.execute("UPDATE todolist SET draft_status = 'HUMAN_ASKED', consumer = NULL, "
               "lease_until = NULL WHERE id = %s", (todo,))
    db.execute("INSERT INTO events (id, job_id, todo_id, event_type, data, status) VALUES "
               "(%s, 'upstream-q1', %s, 'human_asked', '{\"text\": \"ok?\"}', 'ASKED')",
               (str(uuid.uuid4()), todo))
    db.execute("INSERT INTO events (id, job_id, todo_id, event_type, data, status) VALUES "
               "(%s, 'upstream-q1', %s, 'human_response', '{\"answer\": \"yes\"}', 'APPROVED')",
               (str(uuid.uuid4()), todo))
    row = db.execute("SELECT draft_status::text, feedback FROM todolist").fetchone()
    assert row == {"draft_status": "HUMAN_ASKED", "feedback": None}


# --- what the platform adds --------------------------------------------------------------------

def test_event_types_are_the_databases_own(platform_database_url, processgpt_databases):
    install_schema(platform_database_url)
    outcomes: dict[str, object] = {}

    def handle(todo):
        todo.events.emit("gateway_decision", {"selectedSequenceIds": ["Flow_3"]})
        try:
            todo.events.emit("gateway_verdict", {})
        except ValueError as exc:
            outcomes["unknown"] = str(exc)
        return {"ok": True}

    store = PostgresStorage(platform_database_url, max_connections=6)
    try:
        store.enqueue("platform", "x")
        with ps.start(handle, agent_orch="platform", storage=store) as server:
            wait_for(lambda: server.stats()["completed"] == 1)
    finally:
        store.close()
    assert "unknown event_type 'gateway_verdict'" in str(outcomes["unknown"])
    assert "gateway_decision_trace" in str(outcomes["unknown"]), "the message lists what exists"
    with connect(platform_database_url) as db:
        types = [r["event_type"] for r in db.execute(
            "SELECT event_type::text FROM events ORDER BY timestamp")]
    assert types == ["gateway_decision", "crew_completed"]

    # Our own schema's enum has no gateway types: the same call fails at the call site there.
    with processgpt_databases.database(schema=False) as own:
        install_schema(own)
        store = PostgresStorage(own, max_connections=4)
        try:
            assert "gateway_decision" not in store.event_types()
            assert "task_working" in store.event_types()
        finally:
            store.close()


def test_enqueue_writes_start_date_in_utc_whatever_the_session_time_zone(platform_database_url):
    install_schema(platform_database_url)
    stores = {zone: PostgresStorage(make_conninfo(platform_database_url,
                                                  options=f"-c TimeZone={zone}"),
                                    max_connections=2)
              for zone in ("Asia/Seoul", "America/Los_Angeles")}
    try:
        first = stores["Asia/Seoul"].enqueue("tz", "enqueued first, in Seoul")
        time.sleep(0.01)
        second = stores["America/Los_Angeles"].enqueue("tz", "enqueued second, in LA")
        claimed = [c.todo_id for c in stores["America/Los_Angeles"].claim(
            agent_orch="tz", consumer="w", limit=2, lease_seconds=60, max_claims=3)]
    finally:
        for store in stores.values():
            store.close()
    assert claimed == [first, second], "pickup follows enqueue order across time zones"
    with connect(platform_database_url) as db:
        row = db.execute("SELECT start_date, now() AT TIME ZONE 'UTC' AS utc FROM todolist "
                         "WHERE id = %s", (first,)).fetchone()
    assert abs(row["utc"] - row["start_date"]) < timedelta(minutes=5)


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_a_todo_for_a_tenant_the_platform_lacks_is_refused_naming_it(platform_database_url,
                                                                      backend):
    """todolist.tenant_id references tenants on the platform: the refusal names the key."""
    install_schema(platform_database_url)
    with connect(platform_database_url) as db:
        db.execute("INSERT INTO tenants (id) VALUES ('acme')")
    store = next(backends := open_backend(backend, platform_database_url))
    try:
        assert store.enqueue("tenants", "q", tenant_id="acme")
        with pytest.raises(StorageError, match=r'todolist_tenant_id_fkey.*Key \(tenant_id\)='
                                               r'\(acme-typo\) is not present in table "tenants"'):
            store.enqueue("tenants", "q", tenant_id="acme-typo")
    finally:
        next(backends, None)
    refused = cli("enqueue", "--database-url", platform_database_url, "--agent-orch", "tenants",
                  "--input", "q", "--tenant", "acme-typo", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert '(tenant_id)=(acme-typo) is not present in table "tenants"' in refused.stderr


def test_pickup_time_reads_a_start_date_without_time_zone_as_utc(monkeypatch):
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "Asia/Seoul")
    time.tzset()
    try:
        stats = ServerStats()
        naive_utc = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=2)
        stats.pickup(naive_utc.isoformat())
        p50 = stats.snapshot()["pickup_seconds_p50"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert 1.5 < p50 < 600, f"read as local time it would be 9 hours off: {p50}"


def test_service_role_key_of_the_platforms_env_file_is_accepted():
    settings = ps.Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "SUPABASE_URL": "https://x",
                                     "SERVICE_ROLE_KEY": "platform-key"})
    assert settings.supabase_key == "platform-key" and settings.backend == "supabase"
    preferred = ps.Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a", "SUPABASE_URL": "https://x",
                                      "SERVICE_ROLE_KEY": "platform-key", "SUPABASE_KEY": "k"})
    assert preferred.supabase_key == "k"



def test_only_an_upstream_claim_that_can_be_settled_or_claimed_counts_as_expired(upstream):
    """A STARTED todo past its lease_until that the UI finished meanwhile (status DONE) is
    neither settled nor claimed: it must not send every claim down the expiry path."""
    store, db = upstream
    todo = store.enqueue("shared", "finished in the UI")
    assert fetch_upstream(db) == [todo]
    expire_upstream_lease(db, todo)

    def expired() -> bool:
        return db.execute("SELECT processgpt_sync_claims_expired_v1('shared') AS e"
                          ).fetchone()["e"]

    assert expired(), "IN_PROGRESS: claimable"
    db.execute("UPDATE todolist SET status = 'DONE' WHERE id = %s", (todo,))
    assert not expired()
    assert claim_ours(store) == []
    db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo,))
    assert expired(), "CANCELLED: to be settled"


def test_batches_of_todos_sharing_process_instances_never_deadlock_on_the_platforms_trigger(
        upstream_database_url):
    """The platform's trigger touches a todo's bpm_proc_inst row on every update of it. Claims
    and finishes of many todos each took those rows in their own plan's order, so two of them
    sharing process instances deadlocked (PostgreSQL's detector aborts one after a second of
    waiting; the server retried it). Every batch now takes them sorted first."""
    with connect(upstream_database_url) as db:
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) SELECT 'p' || g "
                   "FROM generate_series(0, 5) g")
        db.execute("SELECT processgpt_sync_enqueue_v1('parallel', 'q' || g, 'COMPLETE', NULL, "
                   "'step', 'p' || (g % 6)) FROM generate_series(1, 2400) g")
    assert run_in_parallel(upstream_database_url, "parallel") == (0, [], 0)


DEADLOCKS = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"


def run_in_parallel(url: str, agent_orch: str) -> tuple[int, list[BaseException], int]:
    """Six workers claim and finish batches of 16 todos of ``agent_orch`` until none is left
    (an outcome answered 'busy', for a held process instance, is written again). Returns the
    deadlocks the database counted meanwhile, the errors, and the todos left unfinished."""
    with connect(url) as db:
        before = db.execute(DEADLOCKS).fetchone()["deadlocks"]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        store = PostgresStorage(url, max_connections=1)
        try:
            while batch := store.claim(agent_orch=agent_orch, consumer=f"w{n}", limit=16,
                                       lease_seconds=60, max_claims=3):
                items = [{"todo_id": c.todo_id, "token": c.token, "outcome": "completed",
                          "result": {"n": n}, "events": []} for c in batch]
                while items:
                    items = [item for item, outcome
                             in zip(items, store.finish(items), strict=True)
                             if outcome.reason == "busy"]
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    with connect(url) as db:
        left = db.execute("SELECT count(*) AS n FROM todolist WHERE agent_orch::text = %s "
                          "AND draft_status IS DISTINCT FROM 'COMPLETED'",
                          (agent_orch,)).fetchone()["n"]
        return db.execute(DEADLOCKS).fetchone()["deadlocks"] - before, errors, left


def test_batches_across_process_instances_of_shared_projects_never_deadlock(
        upstream_database_url):
    """The platform's triggers write a todo's process instance, and that instance's project,
    on every update of the todo; many instances share one project. Batches whose todos span
    two projects took the project rows in their own plan's order, so two of them deadlocked.
    Every batch takes the projects sorted too, after the instances."""
    with connect(upstream_database_url) as db:
        db.execute("INSERT INTO project (project_id) SELECT ('00000000-0000-0000-0000-00000000000'"
                   " || g)::uuid FROM generate_series(0, 1) g")
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, project_id) SELECT 'p' || g, "
                   "('00000000-0000-0000-0000-00000000000' || (g % 2))::uuid "
                   "FROM generate_series(0, 199) g")
        db.execute("SELECT processgpt_sync_enqueue_v1('projects', 'q' || g, 'COMPLETE', NULL, "
                   "'step', 'p' || (g % 200)) FROM generate_series(1, 2400) g")
    assert run_in_parallel(upstream_database_url, "projects") == (0, [], 0)
    with connect(upstream_database_url) as db:
        touched = db.execute("SELECT count(*) AS n FROM project "
                             "WHERE updated_at > now() - interval '5 minutes'").fetchone()["n"]
    assert touched == 2, "the platform's trigger wrote both projects"


def test_a_project_another_transaction_holds_leaves_out_only_its_instances_todos(
        upstream: tuple[PostgresStorage, psycopg.Connection], upstream_database_url: str) -> None:
    """A project the BPM engine or a person holds for long holds up the todos of its process
    instances alone: a claim takes the others (under fleet limits too, where it waits for
    none), and its todos once the project is free. An instance naming a project that does not
    exist (the column has no foreign key) holds nothing up."""
    store, db = upstream
    held_project, other_project = str(uuid.uuid4()), str(uuid.uuid4())
    db.execute("INSERT INTO project (project_id) VALUES (%s), (%s)",
               (held_project, other_project))
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, project_id) VALUES "
               "('in-held', %s), ('in-other', %s), ('dangling', %s), ('none', NULL)",
               (held_project, other_project, str(uuid.uuid4())))
    ids = {inst: enqueue_in(db, "shared", inst) for inst in ("in-held", "in-other", "dangling",
                                                            "none")}
    with psycopg.connect(upstream_database_url) as holder:
        holder.execute("SELECT 1 FROM project WHERE project_id = %s FOR UPDATE", (held_project,))
        first = store.claim(agent_orch="shared", consumer="w1", limit=4, lease_seconds=60,
                            max_claims=3, max_running=10)
    later = store.claim(agent_orch="shared", consumer="w1", limit=4, lease_seconds=60,
                        max_claims=3, max_running=10)
    names = {v: k for k, v in ids.items()}
    assert sorted(names[c.todo_id] for c in first) == ["dangling", "in-other", "none"]
    assert first.held_back == 1
    assert [names[c.todo_id] for c in later] == ["in-held"]


def test_giving_todos_back_waits_for_a_single_write_without_deadlocking_on_the_trigger(
        upstream_database_url):
    """A stop gives back todos of two process instances while a single-row write (the UI's,
    an intermediate draft) holds one of them, then touches a todo of the other instance. The
    release takes its todos first, as the single write does, and its process instances
    after: it waits, and both end."""
    with connect(upstream_database_url) as db:
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('p1'), ('p2')")
        a, b, other = (str(db.execute(
            "SELECT processgpt_sync_enqueue_v1(%s, 'q', 'COMPLETE', NULL, 'step', %s) AS id",
            (agent, inst)).fetchone()["id"])
            for agent, inst in (("rel", "p1"), ("rel", "p2"), ("elsewhere", "p1")))
        before = db.execute(DEADLOCKS).fetchone()["deadlocks"]
    store = PostgresStorage(upstream_database_url, max_connections=2)
    claims = store.claim(agent_orch="rel", consumer="w", limit=2, lease_seconds=60,
                         max_claims=3)
    assert {c.todo_id for c in claims} == {a, b}
    released: list[int] = []
    with psycopg.connect(upstream_database_url) as writer, connect(upstream_database_url) as db:
        writer.execute("UPDATE todolist SET updated_at = now() WHERE id = %s", (b,))
        giving_back = threading.Thread(target=lambda: released.append(store.release(claims)))
        giving_back.start()
        wait_for(lambda: db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()").fetchone()["n"] == 1)
        writer.execute("UPDATE todolist SET updated_at = now() WHERE id = %s", (other,))
        writer.commit()
        giving_back.join(30)
        assert released == [2]
        assert db.execute(DEADLOCKS).fetchone()["deadlocks"] - before == 0
    store.close()


def claim_waits_for_a_lock(db: psycopg.Connection) -> bool:
    """Whether a claim, in another session, waits for a row lock now."""
    return bool(db.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() "
        "AND datname = current_database() "
        "AND query LIKE '%processgpt_sync_claim%') AS w").fetchone()["w"])


def todo_states(db: psycopg.Connection) -> dict[str, tuple[str | None, str | None]]:
    """Every todo's (draft_status, consumer), by id."""
    return {r["id"]: (r["draft_status"], r["consumer"]) for r in db.execute(
        "SELECT id::text, draft_status::text, consumer FROM todolist")}


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_a_give_back_leaves_out_only_the_todo_whose_process_instance_is_held(
        upstream_database_url: str, backend: str) -> None:
    """The BPM engine holds one process instance's row, which the platform's trigger touches
    on every update of its todos. Giving back todos of it and of another instance gives the
    other's back at once and names the held one's, which keeps its claim until a later
    give-back once the row is free. Before, the give-back waited for the row up to the
    connection's lock_timeout and then gave back neither."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held'), ('free')")
    ids = {inst: str(db.execute("SELECT processgpt_sync_enqueue_v1('giveback', 'q', 'COMPLETE', "
                                "NULL, 'step', %s) AS id", (inst,)).fetchone()["id"])
           for inst in ("held", "free")}
    store = next(backends := open_backend(backend, upstream_database_url))
    try:
        claims = store.claim(agent_orch="giveback", consumer="w", limit=2, lease_seconds=60,
                             max_claims=3)
        assert len(claims) == 2
        with psycopg.connect(upstream_database_url) as engine:
            engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            released = store.release(claims)
            meanwhile = todo_states(db)
        again = store.release([c for c in claims if c.todo_id in released.held_back])
        after = todo_states(db)
    finally:
        next(backends, None)
        db.close()
    assert (released, released.held_back) == (1, (ids["held"],))
    assert meanwhile == {ids["free"]: (None, None), ids["held"]: ("STARTED", "w")}
    assert (again, again.held_back) == (1, ())
    assert after == {ids["free"]: (None, None), ids["held"]: (None, None)}


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_a_todo_given_back_while_its_instance_is_held_is_claimed_once_free_and_not_counted(
        upstream_database_url: str, backend: str) -> None:
    """A give-back the held process instance keeps from writing its todos marks their leases
    given back and expired. The given-back run can write nothing more and its heartbeat does
    not renew them; once the row is free, a claim takes them at once (not after the lease's
    minute), from the state they were claimed from and without counting the claim again, as
    a written give-back leaves them: queued (an intermediate draft dropped), and a todo on
    its last claim (max_claims 3) runs again rather than being FAILED as a crash's is."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held')")
    enqueue = ("SELECT processgpt_sync_enqueue_v1('counted', 'q', 'COMPLETE', NULL, 'step', "
               "'held') AS id")
    last = str(db.execute(enqueue).fetchone()["id"])
    store = next(backends := open_backend(backend, upstream_database_url))
    claim = partial(store.claim, agent_orch="counted", consumer="w", lease_seconds=60,
                    max_claims=3)
    try:
        for _ in range(2):  # `last` is claimed and its server crashes, twice
            assert [c.todo_id for c in claim(limit=1)] == [last]
            db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
        fresh = str(db.execute(enqueue).fetchone()["id"])
        claims = {c.todo_id: c for c in claim(limit=2)}
        assert {t: c.extras["resume"]["attempt"] for t, c in claims.items()} == {fresh: 1,
                                                                                  last: 3}
        assert store.save_result(claims[fresh], {"half": True}, final=False).applied
        with psycopg.connect(upstream_database_url) as engine:
            engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            released = store.release(claims.values())
            leases = {r["todo_id"]: r for r in db.execute(
                "SELECT todo_id::text, given_back, expires_at <= now() AS expired "
                "FROM processgpt_sync_lease")}
            late = store.record_events([{"todo_id": fresh, "token": claims[fresh].token,
                                         "event_type": "task_working", "data": {}}])
            renewed = store.renew("w", claims.values(), 60)
            expired_after = db.execute("SELECT bool_and(expires_at <= now()) AS e "
                                       "FROM processgpt_sync_lease").fetchone()["e"]
        again = {c.todo_id: c for c in claim(limit=2)}
        rows = {r["id"]: r for r in db.execute(
            "SELECT id::text, draft_status::text, claim_count, draft FROM todolist")}
    finally:
        next(backends, None)
        db.close()
    assert (released, set(released.held_back)) == (0, {fresh, last})
    assert {t: (r["given_back"], r["expired"]) for t, r in leases.items()} == {
        fresh: (True, True), last: (True, True)}
    assert [r["reason"][:20] for r in late] == ["not the owner of thi"], "it writes nothing more"
    assert expired_after and renewed.renewed == {fresh, last}, "kept expired, not reported lost"
    assert set(again) == {fresh, last}, "claimed at once, not after the lease's minute"
    assert {t: (c.extras["resume"]["kind"], c.extras["resume"]["attempt"])
            for t, c in again.items()} == {fresh: ("fresh", 1), last: ("fresh", 1)}, \
        "as a written give-back leaves them: queued as before their claim"
    assert rows[fresh]["draft"] is None, "a fresh claim's intermediate draft is dropped"
    assert {t: (r["draft_status"], r["claim_count"]) for t, r in rows.items()} == {
        fresh: ("STARTED", 1), last: ("STARTED", 1)}


def test_marking_a_give_back_never_touches_a_claim_another_server_made_since(upstream):
    """A heartbeat's orphan (or a give-back) is marked given back by its own claim token: the
    todo claimed by another server in between keeps that server's live lease and its writes
    (matched by todo alone, the new claim would be expired and the todo run twice)."""
    store, db = upstream
    db.execute("SELECT processgpt_sync_enqueue_v1('shared', 'q')")
    (old,) = claim_ours(store)
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    (new,) = claim_ours(store, consumer="ours-w2")
    db.execute("SELECT processgpt_sync_give_back_held_v1(%s::uuid[], %s::uuid[])",
               ([old.todo_id], [old.token]))
    lease = db.execute("SELECT consumer, given_back, expires_at > now() AS live "
                       "FROM processgpt_sync_lease").fetchone()
    written = store.save_result(new, {"ok": True})
    assert (new.todo_id, new.token != old.token) == (old.todo_id, True)
    assert lease == {"consumer": "ours-w2", "given_back": False, "live": True}
    assert written.applied


def test_giving_back_a_todo_an_upstream_worker_took_over_leaves_it_and_does_not_name_it(
        upstream):
    """An upstream worker took a revision over from our run (our token stays on the row), and
    the BPM engine holds its process instance. Our give-back is no longer ours to make: it
    drops our lease, leaves the row to the upstream worker, and does not name the todo as one
    to give back later (a stop would ask again for it until its time ran out)."""
    store, db = upstream
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held')")
    todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('shared', 'q', 'COMPLETE', NULL, "
                          "'step', 'held') AS id").fetchone()["id"])
    (claim,) = claim_ours(store)
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED' WHERE id = %s", (todo,))
    assert fetch_upstream(db) == [todo]
    with psycopg.connect(db.info.dsn) as engine:
        engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
        released = store.release([claim])
    assert (released, released.held_back) == (0, ())
    assert todo_states(db) == {todo: ("STARTED", "upstream-w1")}
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_a_stop_gives_back_every_todo_it_can_at_once_and_a_held_instance_s_once_it_is_free(
        upstream_database_url: str) -> None:
    """A server stops with two todos running, one of a process instance the BPM engine holds
    for a second. The other todo goes back to the queue at once; the held one's as soon as
    the row is free, within the stop, not when its lease expires a minute later."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held'), ('free')")
    ids = {inst: str(db.execute("SELECT processgpt_sync_enqueue_v1('stopping', 'q', 'COMPLETE', "
                                "NULL, 'step', %s) AS id", (inst,)).fetchone()["id"])
           for inst in ("held", "free")}
    started = threading.Semaphore(0)

    def until_cancelled(todo: ps.Todo) -> None:
        started.release()
        while not todo.cancelled:
            time.sleep(0.01)

    store = PostgresStorage(upstream_database_url, statement_timeout=2.0)
    try:
        server = ps.start(until_cancelled, agent_orch="stopping", storage=store, workers=2,
                          lease_seconds=60)
        assert started.acquire(timeout=10) and started.acquire(timeout=10)
        with psycopg.connect(upstream_database_url) as engine:
            engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            stopping = threading.Thread(target=server.stop, kwargs={"timeout": 0.1})
            stopping.start()
            wait_for(lambda: todo_states(db)[ids["free"]] == (None, None), timeout=5)
            meanwhile = todo_states(db)[ids["held"]]
            time.sleep(1.0)
        stopping.join(15)
        after = todo_states(db)
        released = server.stats()["released"]
    finally:
        store.close()
        db.close()
    assert not stopping.is_alive()
    assert meanwhile == ("STARTED", server.settings.consumer), "not while the row is held"
    assert after == {ids["free"]: (None, None), ids["held"]: (None, None)}
    assert released == 2


@pytest.mark.parametrize("freed", ["before the stop", "never"])
def test_a_todo_the_host_could_not_run_is_given_back_once_its_held_instance_is_free(
        upstream_database_url: str, caplog: pytest.LogCaptureFixture, freed: str) -> None:
    """The host fails a todo's run (no thread to be had) while the BPM engine holds its
    process instance: the give-back waits for the row, asking again on the held-instance
    schedule (not recorded FAILED, not an outage), and the todo runs again once the row is
    free. A stop meanwhile ends the asking at once, the todo marked given back (claimed by
    the next claim once the row is free), so the stop's time goes to the outcomes on their
    way."""
    caplog.set_level(logging.INFO, logger="processgpt_sync")
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held')")
    todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('no-thread', 'q', 'COMPLETE', "
                          "NULL, 'step', 'held') AS id").fetchone()["id"])
    calls: list[float] = []
    engine = psycopg.connect(upstream_database_url)

    def handle(t: ps.Todo) -> dict[str, bool]:
        calls.append(time.monotonic())
        if len(calls) == 1:
            engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            raise RuntimeError("can't start new thread")
        return {"ok": True}

    store = PostgresStorage(upstream_database_url, statement_timeout=2.0)
    try:
        server = ps.start(handle, agent_orch="no-thread", storage=store)
        try:
            wait_for(lambda: "waits to be given back" in caplog.text, timeout=10)
            time.sleep(1.5)
            meanwhile = todo_states(db)[todo]
            if freed == "before the stop":
                engine.commit()
                freed_at = time.monotonic()
                wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
        finally:
            began = time.monotonic()
            server.stop(timeout=0.5)
            stopping = time.monotonic() - began
        stats = server.stats()
        after = todo_states(db)[todo]
        engine.rollback()  # the BPM engine lets go of the instance
        taken = store.claim(agent_orch="no-thread", consumer="next", limit=1, lease_seconds=60,
                            max_claims=3)
    finally:
        store.close()
        engine.close()
        db.close()
    assert meanwhile == ("STARTED", server.settings.consumer)
    assert stats["failed"] == 0
    assert caplog.text.count("waits to be given back") == 1, "one line, not one per try"
    assert "failed (attempt" not in caplog.text, "a held instance is not an outage"
    if freed == "before the stop":
        assert len(calls) == 2 and stats["released"] == 1
        assert calls[1] - freed_at < 5, "given back and run again soon after the row was free"
    else:
        assert len(calls) == 1 and stats["released"] == 0
        assert after == ("STARTED", server.settings.consumer), "the row could not be written"
        assert "it is marked given back" in caplog.text
        assert stopping < 5, f"{stopping:.1f}s: the stop waited for the held instance"
        assert [(c.todo_id, c.extras["resume"]["attempt"]) for c in taken] == [(todo, 1)], \
            "claimed at once once free, not after its lease, and not counted twice"


def test_a_person_submitting_the_step_while_the_agent_runs_stops_the_run_and_keeps_theirs(
        upstream_database_url: str) -> None:
    """The platform's /complete writes the whole row: status SUBMITTED, the person's output,
    no consumer (its Vue form cancels the agent first; its API and call bot do not). The run
    is told at once (a NOTIFY: its heartbeat is 15 s away), its result is refused, and the
    step keeps the person's output, with no consumer, for the platform's worker to take."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('p1')")
    todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('submitted', 'q', 'COMPLETE', NULL, "
                          "'step', 'p1') AS id").fetchone()["id"])
    started, told = threading.Event(), threading.Event()

    def handle(t: ps.Todo) -> dict[str, str]:
        started.set()
        while not t.cancelled and not told.wait(0.01):
            pass
        told.set()
        return {"by": "the agent"}

    store = PostgresStorage(upstream_database_url)
    try:
        with ps.start(handle, agent_orch="submitted", storage=store) as server:
            assert started.wait(10)
            db.execute("UPDATE todolist SET status = 'SUBMITTED', output = %s, consumer = NULL "
                       "WHERE id = %s", (Jsonb({"by": "a person"}), todo))
            submitted = time.monotonic()
            assert told.wait(5), "the run was not told"
            noticed = time.monotonic() - submitted
            wait_for(lambda: server.stats()["cancelled"] == 1)
            stats = server.stats()
        row = db.execute("SELECT status::text, draft_status::text, output, consumer "
                         "FROM todolist WHERE id = %s", (todo,)).fetchone()
    finally:
        store.close()
        db.close()
    assert noticed < 3, f"told after {noticed:.1f}s: by the heartbeat, not the NOTIFY"
    assert stats["completed"] == 0
    assert row == {"status": "SUBMITTED", "draft_status": "CANCELLED",
                   "output": {"by": "a person"}, "consumer": None}


def test_a_dead_claim_of_a_step_a_platform_worker_is_completing_is_left_to_it(upstream):
    """The platform's worker takes a submitted step (its consumer on the row) to complete it.
    The claim our dead server left on the step is over: its writes are refused, and the next
    claim drops its lease without writing the row (clearing the consumer would hand the step
    to the platform's workers a second time)."""
    store, db = upstream
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('p1')")
    todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('shared', 'q', 'COMPLETE', NULL, "
                          "'step', 'p1') AS id").fetchone()["id"])
    (claim,) = claim_ours(store)
    db.execute("UPDATE todolist SET status = 'SUBMITTED', output = %s, consumer = 'pod-1' "
               "WHERE id = %s", (Jsonb({"by": "a person"}), todo))
    report = store.renew("ours-w1", [claim], 60)
    refused = store.save_result(claim, {"by": "the agent"})
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    assert claim_ours(store, consumer="ours-w2") == []
    row = db.execute("SELECT status::text, output, consumer FROM todolist WHERE id = %s",
                     (todo,)).fetchone()
    assert report.lost == {todo}
    assert (refused.applied, refused.reason) == (False, "not_owner")
    assert row == {"status": "SUBMITTED", "output": {"by": "a person"}, "consumer": "pod-1"}
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_a_write_waiting_on_a_process_instance_another_transaction_holds_is_not_a_failure(
        upstream_database_url: str) -> None:
    """The platform's trigger touches the todo's bpm_proc_inst row on every update. Another
    transaction (the BPM engine, a migration) holds that row past the statement timeout when
    the result is written: a lock wait, retried until the row is free, not a write too heavy
    to store that the todo's FAILED for."""
    with psycopg.connect(upstream_database_url, autocommit=True, row_factory=dict_row) as db:
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held')")
        todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('held', 'q', 'COMPLETE', NULL, "
                              "'step', 'held') AS id").fetchone()["id"])
        with psycopg.connect(upstream_database_url) as blocker:
            ran = threading.Event()

            def handle(t: ps.Todo) -> dict[str, bool]:
                blocker.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' "
                                "FOR UPDATE")
                ran.set()
                return {"ok": True}

            store = PostgresStorage(upstream_database_url, statement_timeout=1.0)
            try:
                with ps.start(handle, agent_orch="held", storage=store, lease_seconds=120):
                    assert ran.wait(20)
                    time.sleep(5)  # five statement timeouts: three gave the result up before
                    blocker.commit()
                    wait_for(lambda: db.execute(
                        "SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                        (todo,)).fetchone()["s"] in ("COMPLETED", "FAILED"), timeout=30)
            finally:
                store.close()
        row = db.execute("SELECT draft_status::text, output, log FROM todolist WHERE id = %s",
                         (todo,)).fetchone()
    assert (row["draft_status"], row["output"]) == ("COMPLETED", {"ok": True}), row["log"]


def test_a_process_instance_held_elsewhere_holds_up_only_its_own_todos(
        upstream_database_url: str) -> None:
    """The BPM engine (or a person's open transaction) holds one process instance's row,
    which the platform's trigger touches on every update of its todos. The todos of other
    instances are claimed and their outcomes written meanwhile: the held instance's todo
    waits, unclaimed or its outcome answered busy, and ends once the row is free."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held'), ('free')")

    def enqueue(instance: str, text: str) -> str:
        return str(db.execute("SELECT processgpt_sync_enqueue_v1('inst', %s, 'COMPLETE', NULL, "
                              "'step', %s) AS id", (text, instance)).fetchone()["id"])

    def state(todo: str) -> str | None:
        return db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                          (todo,)).fetchone()["s"]

    blocker = psycopg.connect(upstream_database_url)
    hold = "SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE"
    gate = threading.Event()

    def handle(todo: ps.Todo) -> dict[str, str]:
        if todo.input == "held-late":
            blocker.execute(hold)  # its outcome meets the held row
            gate.set()
        return {"ran": str(todo.input)}

    store = PostgresStorage(upstream_database_url)
    try:
        blocker.execute(hold)
        # the held instance's todos first in line (parallel steps of one process)
        waiting, sibling = enqueue("held", "held"), enqueue("held", "held-sibling")
        free = enqueue("free", "free")
        # left out of a claim, as a todo row another transaction holds is: claimed by the
        # next one (a NOTIFY, or the idle poll every lease/4)
        # one worker: the claim asks for one todo, and takes the free one in the held one's place
        with ps.start(handle, agent_orch="inst", storage=store, workers=1,
                      lease_seconds=4) as server:
            wait_for(lambda: state(free) == "COMPLETED")
            assert state(waiting) is None and state(sibling) is None, "not while it is held"
            blocker.commit()
            wait_for(lambda: state(waiting) == state(sibling) == "COMPLETED")

            late = enqueue("held", "held-late")
            assert gate.wait(10)
            after = enqueue("free", "free-after")
            wait_for(lambda: state(after) == "COMPLETED")
            assert state(late) == "STARTED", "its outcome waits for the row"
            blocker.commit()
            wait_for(lambda: state(late) == "COMPLETED")
            assert server.stats()["failed"] == 0
    finally:
        blocker.close()
        store.close()
        db.close()
    with connect(upstream_database_url) as check:
        outputs = {r["query"]: r["output"] for r in check.execute(
            "SELECT query, output FROM todolist")}
    assert outputs == {text: {"ran": text} for text in ("held", "held-sibling", "free",
                                                         "held-late", "free-after")}


def test_a_batch_waits_for_process_instances_in_turn_and_leaves_out_only_one_held_long(
        upstream_database_url: str) -> None:
    """Of two instances another transaction holds, one is let go after 50 ms: its todo is
    kept. The other, held on, costs the rest of the 200 ms and leaves only its own todo out."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('a-brief'), ('b-long')")
    ids = {inst: str(db.execute("SELECT processgpt_sync_enqueue_v1('turns', 'q', 'COMPLETE', "
                                "NULL, 'step', %s) AS id", (inst,)).fetchone()["id"])
           for inst in ("a-brief", "b-long")}
    holders = {inst: psycopg.connect(upstream_database_url) for inst in ids}
    try:
        for inst, holder in holders.items():
            holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = %s FOR UPDATE",
                           (inst,))
        threading.Timer(0.05, holders["a-brief"].commit).start()
        with psycopg.connect(upstream_database_url) as batch:
            began = time.monotonic()
            (held,) = batch.execute("SELECT processgpt_sync_lock_proc_insts_v1(%s::uuid[], true)",
                                    (list(ids.values()),)).fetchone()
            waited = time.monotonic() - began
            assert batch.execute("SHOW lock_timeout").fetchone()[0] == "0", "restored"
    finally:
        for holder in holders.values():
            holder.close()
        db.close()
    assert [str(todo) for todo in held] == [ids["a-brief"]]
    assert waited > 0.15, "the long-held one was waited for, within the 200 ms"


@pytest.mark.parametrize("per_tenant", [None, 1])
def test_todos_taken_in_place_of_a_held_instance_s_follow_the_tenants_turns(
        upstream_database_url: str, per_tenant: int | None) -> None:
    """Two tenants wait with two todos each, and two worker slots are free. Tenant a's first
    todo is of a process instance another transaction holds: it is left out, and the one taken
    in its place is a's next todo, not b's second while a has none running (nor, under a cap of
    one running todo per tenant, nothing at all)."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO tenants (id) VALUES ('a'), ('b') ON CONFLICT DO NOTHING")
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held'), ('a2'), ('b1'), "
               "('b2')")
    ids = {}
    for minute, (name, tenant, inst) in enumerate((("b1", "b", "b1"), ("b2", "b", "b2"),
                                                   ("a1", "a", "held"), ("a2", "a", "a2"))):
        ids[name] = str(db.execute(
            "SELECT processgpt_sync_enqueue_v1('turns', %s, 'COMPLETE', %s, 'step', %s) AS id",
            (name, tenant, inst)).fetchone()["id"])
        db.execute("UPDATE todolist SET start_date = now() - make_interval(mins => 10 - %s) "
                   "WHERE id = %s", (minute, ids[name]))
    store = PostgresStorage(upstream_database_url)
    try:
        with psycopg.connect(upstream_database_url) as holder:
            holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            claims = store.claim(agent_orch="turns", consumer="w", limit=2, lease_seconds=60,
                                 max_claims=3, max_running_per_tenant=per_tenant)
    finally:
        store.close()
        db.close()
    names = {v: k for k, v in ids.items()}
    assert sorted(names[c.todo_id] for c in claims) == ["a2", "b1"]


def test_a_claim_waits_for_held_process_instances_once_not_in_every_round(
        upstream_database_url: str) -> None:
    """Three instances another transaction holds, their todos first in line: the claim waits
    200 ms for the first and takes no time over the todos it tries in its place (a wait there
    could also be on an instance that sorts before one it holds, against the lock order)."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('h1'), ('h2'), ('h3'), ('f')")
    for minute, inst in enumerate(("h1", "h2", "h3", "f")):
        todo = db.execute("SELECT processgpt_sync_enqueue_v1('rounds', 'q', 'COMPLETE', NULL, "
                          "'step', %s) AS id", (inst,)).fetchone()["id"]
        db.execute("UPDATE todolist SET start_date = now() - make_interval(mins => 10 - %s) "
                   "WHERE id = %s", (minute, todo))
    store = PostgresStorage(upstream_database_url)
    try:
        store.event_types()  # the pool's first connection set up before the clock starts
        with psycopg.connect(upstream_database_url) as holder:
            holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id IN ('h1', 'h2', 'h3') "
                           "FOR UPDATE")
            began = time.monotonic()
            claims = store.claim(agent_orch="rounds", consumer="w", limit=1, lease_seconds=60,
                                 max_claims=3)
            took = time.monotonic() - began
    finally:
        store.close()
        db.close()
    assert claims == [] and claims.held_back == 3, "three rounds, each on a held instance"
    assert 0.15 < took < 0.6, f"{took:.2f}s: one 200 ms budget, where each round had its own"


def waits_for_work(store: Any) -> int:
    """The Supabase backend's calls of the wait for work so far (0 on Postgres: it listens)."""
    gateway = getattr(store, "gateway", None)
    return 0 if gateway is None else gateway.calls["processgpt_sync_wait_for_work_v1"]


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_a_todo_left_for_a_held_process_instance_is_claimed_soon_after_the_row_is_free(
        upstream_database_url: str, backend: str) -> None:
    """Nothing announces that the BPM engine let go of a process instance: a server whose
    claim left a todo for it asks again within a second or two (every 2 s while the row stays
    held), not at its idle poll (a quarter of the lease, 15 s by default); on Supabase, not
    after a back-off grown to poll_interval while its wait for work returned at once."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('busy')")
    store = next(backends := open_backend(backend, upstream_database_url))
    try:
        with psycopg.connect(upstream_database_url) as holder:
            holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'busy' FOR UPDATE")
            with ps.start(lambda todo: {"ok": True}, agent_orch="soon", storage=store,
                          workers=1) as server:
                todo = db.execute("SELECT processgpt_sync_enqueue_v1('soon', 'q', 'COMPLETE', "
                                  "NULL, 'step', 'busy') AS id").fetchone()["id"]
                wait_for(lambda: server.stats()["held_back"] >= 1)  # the NOTIFY's claim
                waits = waits_for_work(store)
                time.sleep(4.5)
                # again after 0.5, 1 and 2 s (each claim waits 0.2 s for the row): neither
                # 15 s apart nor a back-off that starts at 50 ms
                asked = server.stats()["held_back"]
                # an idle Supabase server sends no heartbeat: its waits for work keep its
                # registry row fresh, so it does not show as dead while the row is held
                refreshed = waits_for_work(store) - waits
                holder.commit()
                freed = time.monotonic()
                wait_for(lambda: db.execute(
                    "SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                    (todo,)).fetchone()["s"] == "COMPLETED", timeout=20)
                took = time.monotonic() - freed
    finally:
        next(backends, None)
        db.close()
    assert 3 <= asked <= 5, f"{asked} claims in the 4.5 s the row was held"
    assert backend == "postgres" or refreshed >= 2, f"{refreshed} waits for work meanwhile"
    assert took < HELD_BACK_MAX + 2, f"claimed {took:.1f}s after its process instance was free"


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_an_answer_while_the_engine_holds_the_process_instance_resumes_the_todo_once_free(
        upstream_database_url: str, backend: str) -> None:
    """The BPM engine holds a suspended todo's process instance (which the platform's trigger
    writes on every update of the todo) when a signed-in user answers: the UI's insert returns
    within its statement timeout instead of waiting for the engine, and the running server
    resumes the todo with the answer soon after the engine lets go."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held')")
    runs: list[tuple[str, Any]] = []

    def handle(todo: ps.Todo) -> dict:
        runs.append((todo.resume.kind, todo.resume.answer))
        if todo.resume.kind != "human_answer":
            todo.suspend_for_human("Ship it?", kind="confirm")
        return {"shipped": todo.resume.answer}

    store = next(backends := open_backend(backend, upstream_database_url))
    try:
        with ps.start(handle, agent_orch="held-answer", storage=store, lease_seconds=8) as server:
            todo = db.execute("SELECT processgpt_sync_enqueue_v1('held-answer', 'q', 'COMPLETE', "
                              "NULL, 'step', 'held') AS id").fetchone()["id"]
            wait_for(lambda: server.stats()["asked"] == 1)
            job_id = db.execute("SELECT job_id FROM events WHERE todo_id = %s AND "
                                "event_type = 'human_asked'", (str(todo),)).fetchone()["job_id"]
            with psycopg.connect(upstream_database_url) as engine:
                engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' "
                               "FOR UPDATE")
                with psycopg.connect(upstream_database_url, autocommit=True) as ui:
                    ui.execute("SET statement_timeout = '6s'")
                    ui.execute("INSERT INTO events (id, job_id, event_type, data, status) "
                               "VALUES (%s, %s, 'human_response', '{\"answer\": true}', "
                               "'APPROVED')", (str(uuid.uuid4()), job_id))
                time.sleep(2.5)  # a heartbeat or a wait for work meanwhile takes nothing
                meanwhile = db.execute("SELECT draft_status::text AS s FROM todolist "
                                       "WHERE id = %s", (todo,)).fetchone()["s"]
            wait_for(lambda: server.stats()["completed"] == 1, timeout=20)
    finally:
        next(backends, None)
        db.close()
    assert meanwhile == "HUMAN_ASKED"
    assert runs == [("fresh", None), ("human_answer", True)]


def test_a_wait_for_work_keeps_no_lock_of_a_listed_todo_whose_instance_is_still_held(
        upstream_database_url: str) -> None:
    """An idle Supabase server's wait for work looks at the todos answered while held: one
    whose process instance is still held is left, and the wait keeps none of the rows it
    took meanwhile (the todo's), which a person or the engine may then write at once."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held')")
    store = next(backends := open_backend("supabase", upstream_database_url))
    try:
        todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('held-wait', 'q', 'COMPLETE', "
                              "NULL, 'step', 'held') AS id").fetchone()["id"])
        (c,) = store.claim(agent_orch="held-wait", consumer="w", limit=1, lease_seconds=60,
                           max_claims=3)
        store.ask(c, "job-w", question_data("Ship it?", None, "confirm"))
        store.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
        with psycopg.connect(upstream_database_url) as engine:
            engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            db.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
                       "(%s, 'job-w', 'human_response', '{\"answer\": true}', 'APPROVED')",
                       (str(uuid.uuid4()),))
            lock_the_todo_during_a_wait_for_work(store, upstream_database_url, todo)
        listed = [str(r["todo_id"]) for r in db.execute(
            "SELECT todo_id FROM processgpt_sync_answer_held")]
    finally:
        next(backends, None)
        db.close()
    assert listed == [todo]


def test_two_servers_waiting_on_one_held_process_instance_run_its_todos_once_soon_after(
        upstream_database_url: str) -> None:
    """Two servers of one agent_orch both meet a process instance the BPM engine holds. Each
    asks again on its own schedule (0.5 s, 1 s, then every 2 s, each claim waiting its 200 ms
    for the row), neither more often nor on the other's claims; once the row is free, each of
    the instance's todos runs once, within a few seconds."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('busy')")
    runs: list[str] = []
    lock = threading.Lock()

    def handle(todo: ps.Todo) -> dict[str, bool]:
        with lock:
            runs.append(todo.id)
        return {"ok": True}

    stores = [PostgresStorage(upstream_database_url, max_connections=4) for _ in range(2)]
    try:
        with psycopg.connect(upstream_database_url) as holder:
            holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'busy' FOR UPDATE")
            with ps.start(handle, agent_orch="pair", storage=stores[0], workers=1,
                          consumer="pair-a") as a, \
                    ps.start(handle, agent_orch="pair", storage=stores[1], workers=1,
                             consumer="pair-b") as b:
                todos = [str(db.execute(
                    "SELECT processgpt_sync_enqueue_v1('pair', 'q', 'COMPLETE', NULL, 'step', "
                    "'busy') AS id").fetchone()["id"]) for _ in range(2)]
                wait_for(lambda: a.stats()["held_back"] >= 1 and b.stats()["held_back"] >= 1)
                before = [a.stats()["held_back"], b.stats()["held_back"]]
                time.sleep(4.5)
                asked = [a.stats()["held_back"] - before[0], b.stats()["held_back"] - before[1]]
                holder.commit()
                freed = time.monotonic()
                wait_for(lambda: db.execute(
                    "SELECT count(*) AS n FROM todolist WHERE agent_orch = 'pair' "
                    "AND draft_status = 'COMPLETED'").fetchone()["n"] == 2, timeout=20)
                took = time.monotonic() - freed
    finally:
        for store in stores:
            store.close()
        db.close()
    assert all(1 <= n <= 5 for n in asked), f"claims meanwhile, by server: {asked}"
    assert sorted(runs) == sorted(todos), "each todo once"
    assert took < HELD_BACK_MAX + 2, f"claimed {took:.1f}s after its process instance was free"


@pytest.mark.parametrize("ending", ["exhausted", "cancelled"])
def test_a_crashed_server_s_claim_on_a_held_process_instance_does_not_hold_up_claims(
        upstream_database_url: str, ending: str) -> None:
    """A server died with a todo past its last claim, or one the UI cancelled; the BPM engine
    holds that todo's process instance. Every claim settles such claims first, and the update
    the settling makes waits for the instance's row: left for a later claim instead, the other
    todos are claimed at once, and the dead server's todo is settled once the row is free."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held'), ('free')")

    def enqueue(instance: str) -> str:
        return str(db.execute("SELECT processgpt_sync_enqueue_v1('settle', 'q', 'COMPLETE', "
                              "NULL, 'step', %s) AS id", (instance,)).fetchone()["id"])

    dead_one = enqueue("held")
    store = PostgresStorage(upstream_database_url, statement_timeout=2.0)
    try:
        (claim,) = store.claim(agent_orch="settle", consumer="dead", limit=1, lease_seconds=60,
                               max_claims=1)
        db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
        max_claims = 1 if ending == "exhausted" else 3
        if ending == "cancelled":
            db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (dead_one,))
        waiting = enqueue("free")
        with psycopg.connect(upstream_database_url) as engine:
            engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
            claims = store.claim(agent_orch="settle", consumer="alive", limit=2,
                                 lease_seconds=60, max_claims=max_claims)
            assert [c.todo_id for c in claims] == [waiting]
            assert db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                              (dead_one,)).fetchone()["s"] == "STARTED", "not while it is held"
        assert store.claim(agent_orch="settle", consumer="alive", limit=2, lease_seconds=60,
                           max_claims=max_claims) == []
        row = db.execute("SELECT draft_status::text AS s, log FROM todolist WHERE id = %s",
                         (dead_one,)).fetchone()
    finally:
        store.close()
        db.close()
    assert claim.todo_id == dead_one
    if ending == "exhausted":
        assert row["s"] == "FAILED" and "claimed 1 times without finishing" in row["log"]
    else:
        assert row["s"] == "CANCELLED"


def test_a_heartbeat_leaves_an_orphan_whose_process_instance_is_held_for_later(
        upstream_database_url: str) -> None:
    """A restarted server's first heartbeat gives back what its previous run claimed. The BPM
    engine holds one of those todos' process instance: waiting for it would hold up the
    renewal of every lease in the same call, so that todo's lease is marked given back (a
    claim takes it once the row is free, as a written give-back leaves it) and the others are
    given back at once."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('held'), ('free')")
    ids = {inst: str(db.execute("SELECT processgpt_sync_enqueue_v1('orphans', 'q', 'COMPLETE', "
                                "NULL, 'step', %s) AS id", (inst,)).fetchone()["id"])
           for inst in ("held", "free")}
    def claim_in(run: str) -> list:
        store = PostgresStorage(upstream_database_url)
        try:
            return store.claim(agent_orch="orphans", consumer="w", limit=2, lease_seconds=60,
                               max_claims=3, instance=run)
        finally:
            store.close()

    assert len(claim_in("first-run")) == 2
    with psycopg.connect(upstream_database_url) as engine, \
            psycopg.connect(upstream_database_url, autocommit=True) as server:
        engine.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'held' FOR UPDATE")
        server.execute("SET lock_timeout = '2s'")
        (report,) = server.execute(
            "SELECT processgpt_sync_heartbeat_v1('w', '{}', '{}', 60, "
            "'{\"instance\": \"second-run\"}')").fetchone()
        rows = {r["id"]: r["draft_status"] for r in db.execute(
            "SELECT id::text, draft_status::text FROM todolist")}
        marked = db.execute("SELECT todo_id::text, given_back, expires_at <= now() AS expired "
                            "FROM processgpt_sync_lease").fetchall()
    taken = claim_in("second-run")
    db.close()
    assert report["orphans"] == [ids["free"]]
    assert rows == {ids["free"]: None, ids["held"]: "STARTED"}
    assert [tuple(r.values()) for r in marked] == [(ids["held"], True, True)], \
        "marked given back, for the next claim once the row is free"
    assert sorted((c.todo_id, c.extras["resume"]["kind"], c.extras["resume"]["attempt"])
                  for c in taken) == sorted([(ids["free"], "fresh", 1),
                                             (ids["held"], "fresh", 1)])


def test_under_fleet_limits_a_claim_takes_another_todo_instead_of_waiting_for_an_instance(
        upstream_database_url: str) -> None:
    """Fleet-wide limits make every server's claim queue on one lock: a claim that waited for
    a process instance held elsewhere (even briefly, as for the 200 ms a claim without limits
    waits) would hold them all up. It takes the next todo instead."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('brief'), ('free')")
    ids = {}
    for minute, inst in enumerate(("brief", "free")):
        ids[inst] = str(db.execute(
            "SELECT processgpt_sync_enqueue_v1('limits', 'q', 'COMPLETE', NULL, 'step', %s) "
            "AS id", (inst,)).fetchone()["id"])
        db.execute("UPDATE todolist SET start_date = now() - make_interval(mins => 10 - %s) "
                   "WHERE id = %s", (minute, ids[inst]))
    db.close()
    store = PostgresStorage(upstream_database_url)

    def claim_while_held(limits: dict[str, int]) -> str:
        """The todo a claim takes while another session holds 'brief' until the claim waits
        for it (freed within the claim's 200 ms), or until it is done."""
        claimed: list[Claim] = []
        with psycopg.connect(upstream_database_url) as holder, \
                connect(upstream_database_url) as watcher:
            holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'brief' "
                           "FOR UPDATE")
            claim = threading.Thread(target=lambda: claimed.extend(store.claim(
                agent_orch="limits", consumer="w", limit=1, lease_seconds=60, max_claims=3,
                **limits)))
            claim.start()
            wait_for(lambda: claimed or claim_waits_for_a_lock(watcher), interval=0.005)
            holder.rollback()
            claim.join(10)
        store.release(claimed)
        return claimed[0].todo_id

    try:
        # a loaded machine can free 'brief' only after the claim gave up: tried again
        waited: list[str] = []
        while ids["brief"] not in waited and len(waited) < 3:
            waited.append(claim_while_held({}))
        limited = claim_while_held({"max_running": 5})
    finally:
        store.close()
    assert ids["brief"] in waited, waited
    assert limited == ids["free"]


# --- process instances in the platform's trash ----------------------------------------------

def trash(db: psycopg.Connection, proc_inst_id: str, deleted: bool = True) -> None:
    """The UI's delete (or restore) of a process instance: it only flags the row, by an upsert
    (PostgREST's, which the UI's putObject sends)."""
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, is_deleted, deleted_at) "
               "VALUES (%s, %s, CASE WHEN %s THEN now() END) ON CONFLICT (proc_inst_id) "
               "DO UPDATE SET is_deleted = EXCLUDED.is_deleted, deleted_at = EXCLUDED.deleted_at",
               (proc_inst_id, deleted, deleted))


def enqueue_in(db: psycopg.Connection, agent_orch: str, proc_inst_id: str,
               root_proc_inst_id: str | None = None) -> str:
    """A todo of a process instance (of a subprocess under root_proc_inst_id), written at once
    as the platform does, so a running server never sees it half made."""
    with db.transaction():
        todo = str(db.execute("SELECT processgpt_sync_enqueue_v1(%s, 'q', 'COMPLETE', NULL, "
                              "'step', %s) AS id", (agent_orch, proc_inst_id)).fetchone()["id"])
        if root_proc_inst_id is not None:
            db.execute("UPDATE todolist SET root_proc_inst_id = %s WHERE id = %s",
                       (root_proc_inst_id, todo))
    return todo


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_todos_of_a_process_instance_in_the_trash_wait_and_run_soon_after_it_is_restored(
        upstream_database_url: str, backend: str) -> None:
    """Deleting a process instance in the UI only flags it (is_deleted), restorably: its todos,
    and those of its subprocesses (root_proc_inst_id), are not run meanwhile, and once restored
    they are claimed soon, not at the idle poll (15 s here)."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('binned'), ('child'), ('live')")
    trash(db, "binned")
    ran: list[str] = []
    store = next(backends := open_backend(backend, upstream_database_url))
    try:
        with ps.start(lambda todo: ran.append(todo.id) or {"ok": True},
                      agent_orch="trash", storage=store, workers=2, poll_interval=15) as server:
            binned = {enqueue_in(db, "trash", "binned"),
                      enqueue_in(db, "trash", "child", "binned")}
            live = enqueue_in(db, "trash", "live")
            wait_for(lambda: server.stats()["completed"] == 1)
            time.sleep(1.5)  # a wait for work that took the binned todos would run them now
            waited = set(ran)
            shown = cli("show", next(iter(binned)), "--database-url", upstream_database_url)
            counted = cli("status", "--agent-orch", "trash", "--database-url",
                          upstream_database_url)
            trash(db, "binned", deleted=False)
            # woken by the restore: within 10 s, where the next poll is 15 s away
            wait_for(lambda: server.stats()["completed"] == 3, timeout=10)
    finally:
        next(backends, None)
        db.close()
    assert waited == {live}
    assert "in the ProcessGPT trash" in shown.stdout
    assert "2 waiting todos belong to process instances in the ProcessGPT trash" in counted.stdout
    assert set(ran) == binned | {live}


def test_a_claim_abandoned_in_a_trashed_instance_waits_for_the_restore_without_a_look_each_claim(
        upstream: tuple[PostgresStorage, psycopg.Connection], upstream_database_url: str) -> None:
    """A claim that died while its process instance is in the trash is neither taken over
    (with claims left) nor failed on its last claim, ours or an upstream worker's, even by a
    claim that settles other expired claims; nor does its expired lease alone make every claim
    look for expired claims; `show` says it waits for the restore. Restored, it is taken over
    as any abandoned claim is."""
    store, db = upstream
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('binned'), ('live')")
    ours = enqueue_in(db, "shared", "binned")
    (claim,) = claim_ours(store)
    theirs = enqueue_in(db, "shared", "binned")
    assert fetch_upstream(db) == [theirs]
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    expire_upstream_lease(db, theirs)
    trash(db, "binned")
    with_claims_left = claim_ours(store, consumer="ours-w2", limit=5)
    shown = {todo: cli("show", todo, "--database-url", upstream_database_url).stdout
             for todo in (ours, theirs)}
    db.execute("UPDATE todolist SET claim_count = 3")  # each on its last claim
    looks = db.execute("SELECT processgpt_sync_claims_expired_v1('shared') AS e").fetchone()["e"]
    waited = db.execute(  # what a Supabase server's wait for work answers
        "SELECT processgpt_sync_wait_for_work_v1('shared', 'ours-w2', 0) AS w").fetchone()["w"]
    taken = claim_ours(store, consumer="ours-w2", limit=5)
    # an abandoned claim elsewhere: this claim settles expired claims, and takes that one only
    other = enqueue_in(db, "shared", "live")
    claim_ours(store, consumer="ours-w3")
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    settling = claim_ours(store, consumer="ours-w2", limit=5)
    states = todo_states(db)
    trash(db, "binned", deleted=False)
    db.execute("UPDATE todolist SET claim_count = 1 WHERE id IN (%s, %s)", (ours, theirs))
    retaken = claim_ours(store, consumer="ours-w2", limit=5)
    assert claim.todo_id == ours
    assert with_claims_left == []
    assert all("no server takes the todo over unless the instance is restored" in text
               for text in shown.values()), shown
    assert (looks, waited, taken) == (False, False, [])
    assert [c.todo_id for c in settling] == [other]
    assert {k: v for k, v in states.items() if k != other} == {
        ours: ("STARTED", "ours-w1"), theirs: ("STARTED", "upstream-w1")}
    assert sorted(c.todo_id for c in retaken) == sorted([ours, theirs])


def test_the_console_marks_the_todos_of_an_instance_in_the_trash(
        upstream: tuple[PostgresStorage, psycopg.Connection]) -> None:
    """The console's list and todo page say which todos wait for their process instance's
    restore; a todo of an instance out of the trash has no such mark."""
    store, db = upstream
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('binned'), ('live')")
    binned, live = enqueue_in(db, "shared", "binned"), enqueue_in(db, "shared", "live")
    trash(db, "binned")
    with ConsoleServer(store, ConsoleConfig(port=0)) as console, \
            httpx.Client(base_url=f"http://127.0.0.1:{console.port}", timeout=10) as http:
        listed = http.get("/todos").text
        pages = {todo: http.get(f"/todos/{todo}").text for todo in (binned, live)}
    rows = {todo: re.search(rf'<tr id="todo-{todo}">.*?</tr>', listed, re.S).group(0)
            for todo in (binned, live)}
    assert "in the trash" in rows[binned] and "in the trash" not in rows[live]
    assert "is in the ProcessGPT trash: no server starts it" in pages[binned]
    assert "ProcessGPT trash" not in pages[live]


def cron_cleanup(db: psycopg.Connection) -> None:
    """The platform's cron job: process instances 7 days in the trash are deleted for good (the
    platform's trigger deletes their own todos)."""
    db.execute("UPDATE bpm_proc_inst SET deleted_at = now() - interval '8 days' "
               "WHERE is_deleted")
    db.execute("DELETE FROM bpm_proc_inst WHERE deleted_at IS NOT NULL "
               "AND deleted_at < now() - interval '7 days'")


def test_deleting_a_root_for_good_cancels_the_agent_todos_of_its_subprocesses(
        upstream: tuple[PostgresStorage, psycopg.Connection], upstream_database_url: str) -> None:
    """The cron job deletes the root instance and its own todos; a subprocess's agent todos
    would stay, waiting in the trash for good, rows every claim passes over. They are
    cancelled (queued, abandoned and running ones alike), each with a line in its log; a human
    step, a step whose draft a person wrote, an ended todo and the todos under other roots are
    left alone, and `retry` of a cancelled one says why it would not run. A todo whose row,
    or whose own process instance, another transaction holds is skipped, not waited for (the
    cron job is not held up), and the next init-db cancels it."""
    store, db = upstream
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) "
               "VALUES ('root'), ('child'), ('busy-child'), ('other-root'), ('other-child')")
    ids = {name: enqueue_in(db, "shared", "child", "root") for name in ("abandoned", "running")}
    claim_ours(store, limit=2)
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second' "
               "WHERE todo_id = %s", (ids["abandoned"],))
    for name in ("queued", "human", "drafted", "completed", "held"):
        ids[name] = enqueue_in(db, "shared", "child", "root")
    db.execute("UPDATE todolist SET agent_mode = NULL WHERE id = %s", (ids["human"],))
    db.execute("UPDATE todolist SET draft = '{\"by\": \"a person\"}' WHERE id = %s",
               (ids["drafted"],))
    db.execute("UPDATE todolist SET draft_status = 'COMPLETED' WHERE id = %s",
               (ids["completed"],))
    ids["busy"] = enqueue_in(db, "shared", "busy-child", "root")
    ids["elsewhere"] = enqueue_in(db, "shared", "other-child", "other-root")
    root_own = enqueue_in(db, "shared", "root")
    trash(db, "root")
    with psycopg.connect(upstream_database_url) as holder:
        holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (ids["held"],))
        holder.execute("SELECT 1 FROM bpm_proc_inst WHERE proc_inst_id = 'busy-child' "
                       "FOR UPDATE")  # the BPM engine writing that subprocess
        db.execute("SET lock_timeout = '2s'")  # a cancel that waited would give up
        cron_cleanup(db)
        db.execute("RESET lock_timeout")
    rows = {r["id"]: (r["draft_status"], r["log"]) for r in db.execute(
        "SELECT id::text, draft_status::text, log FROM todolist")}
    taken = claim_ours(store, consumer="ours-w3", limit=5)
    refused = db.execute("SELECT processgpt_sync_retry_v1(%s) AS r",
                         (ids["queued"],)).fetchone()["r"]
    swept: list[str] = []
    install_schema(upstream_database_url, added=swept)
    after = todo_states(db)
    assert root_own not in rows, "the platform's trigger deleted the root's own todo"
    assert {name: rows[todo][0] for name, todo in ids.items()} == {
        "abandoned": "CANCELLED", "running": "CANCELLED", "queued": "CANCELLED",
        "human": None, "drafted": None, "completed": "COMPLETED", "held": None, "busy": None,
        "elsewhere": None}
    assert all("(root) was deleted for good" in rows[ids[name]][1]
               for name in ("abandoned", "running", "queued"))
    assert [c.todo_id for c in taken] == [ids["elsewhere"]]
    assert not refused["retried"] and "ProcessGPT trash" in refused["reason"]
    assert any(line.startswith("cancel 2 todos of subprocesses whose root process instance was "
                               "deleted for good") for line in swept), swept
    assert (after[ids["held"]][0], after[ids["busy"]][0]) == ("CANCELLED", "CANCELLED")


def test_a_run_whose_root_is_deleted_while_its_row_is_held_is_cancelled_by_its_heartbeat(
        upstream_database_url: str) -> None:
    """The cron job's cancel skips a todo whose row another transaction holds at that moment (a
    claim taking it, a draft being written). A run that goes on under a root deleted for good
    is cancelled by its server's next heartbeat, with a line in its log; a waiting todo the
    cancel skipped is never claimed, and waits for init-db's sweep (the heartbeat looks at its
    own todos only, by id: the platform's todolist has no index on the root)."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('root'), ('child')")
    running = enqueue_in(db, "gone", "child", "root")
    started, ended = threading.Event(), threading.Event()

    def handle(t: ps.Todo) -> dict[str, str]:
        started.set()
        while not t.cancelled and not ended.wait(0.02):
            pass
        return {"ran": "to the end"}

    store = PostgresStorage(upstream_database_url)
    try:
        with ps.start(handle, agent_orch="gone", storage=store, workers=1,
                      lease_seconds=2) as server:
            assert started.wait(10)
            trash(db, "root")
            waiting = enqueue_in(db, "gone", "child", "root")
            with psycopg.connect(upstream_database_url) as holder:
                holder.execute("SELECT 1 FROM todolist WHERE id IN (%s, %s) FOR UPDATE",
                               (running, waiting))
                cron_cleanup(db)
                skipped = todo_states(db)
            wait_for(lambda: server.stats()["cancelled"] == 1, timeout=10)
            stats = server.stats()
            ended.set()
        rows = {r["id"]: (r["draft_status"], r["log"]) for r in db.execute(
            "SELECT id::text, draft_status::text, log FROM todolist")}
        swept: list[str] = []
        install_schema(upstream_database_url, added=swept)
        after = todo_states(db)
    finally:
        ended.set()
        store.close()
        db.close()
    assert (skipped[running][0], skipped[waiting][0]) == ("STARTED", None)
    assert stats["completed"] == 0
    assert (rows[running][0], rows[waiting][0]) == ("CANCELLED", None)
    assert "(root) was deleted for good" in rows[running][1]
    assert after[waiting][0] == "CANCELLED"


@pytest.mark.parametrize("project", ["none", "free", "held"])
def test_a_cron_job_running_as_another_role_than_init_db_s_still_cancels(
        upstream: tuple[PostgresStorage, psycopg.Connection], upstream_database_url: str,
        project: str) -> None:
    """The platform's cron job may run as a role other than the one that ran init-db (one that
    bypasses row security, as Supabase's `postgres` does): the functions the cancel calls are
    callable by it, and run with its own rights: with no rights on the platform's projects
    (none of its instances in one), or with them. A subprocess whose project another
    transaction holds is skipped, not waited for, as one whose own row is held."""
    _, db = upstream
    db.execute("INSERT INTO project (project_id) VALUES ('00000000-0000-0000-0000-000000000001')")
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, project_id) VALUES ('root', NULL), "
               "('child', CASE WHEN %s THEN '00000000-0000-0000-0000-000000000001'::uuid END)",
               (project != "none",))
    todo = enqueue_in(db, "shared", "child", "root")
    trash(db, "root")
    db.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cron_runner') "
               "THEN CREATE ROLE cron_runner BYPASSRLS; END IF; END $$")
    db.execute("GRANT SELECT, UPDATE, DELETE ON todolist, bpm_proc_inst TO cron_runner")
    if project != "none":  # as the platform's trigger on bpm_proc_inst needs for its writes
        db.execute("GRANT SELECT, UPDATE ON project TO cron_runner")
    with psycopg.connect(upstream_database_url) as holder:
        if project == "held":
            holder.execute("SELECT 1 FROM project FOR UPDATE")
        db.execute("SET ROLE cron_runner")
        try:
            db.execute("SET lock_timeout = '5s'")  # a cancel that waited would give up
            began = time.monotonic()
            cron_cleanup(db)
            took = time.monotonic() - began
        finally:
            db.execute("RESET lock_timeout")
            db.execute("RESET ROLE")
    assert todo_states(db)[todo][0] == (None if project == "held" else "CANCELLED")
    assert took < 4, f"the cron job's delete waited {took:.1f} s"


def test_todos_under_a_root_deleted_before_init_db_are_never_run_and_init_db_cancels_them(
        upstream: tuple[PostgresStorage, psycopg.Connection], upstream_database_url: str) -> None:
    """A root the cron job deleted before this library's trigger was installed (an older
    version): its subprocess's todos stay, under a root that is gone, and must not run. Todos
    of instances the database never recorded still run; the CLI counts as in the trash only
    the todos a server would otherwise claim, and `retry` says why one waits. The next
    init-db cancels them, as the trigger would have, and says so; its dry run counts them and
    changes nothing."""
    store, db = upstream
    db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('root'), ('child')")
    enqueue_in(db, "shared", "root")
    orphan = enqueue_in(db, "shared", "child", "root")
    unrecorded = enqueue_in(db, "shared", "nowhere", "nowhere-root")
    human = enqueue_in(db, "shared", "child", "root")
    db.execute("UPDATE todolist SET agent_mode = NULL WHERE id = %s", (human,))
    rootless = enqueue_in(db, "shared", "child")  # an insert that leaves the root unset
    db.execute("UPDATE todolist SET root_proc_inst_id = NULL WHERE id = %s", (rootless,))
    db.execute("DROP TRIGGER processgpt_sync_roots_deleted ON bpm_proc_inst")
    trash(db, "root")
    cron_cleanup(db)
    taken = claim_ours(store, limit=5)
    counts = db.execute("SELECT processgpt_sync_status_v1('shared') AS s").fetchone()["s"]
    shown = {t: db.execute("SELECT processgpt_sync_show_v1(%s) -> 'in_trash' AS t",
                           (t,)).fetchone()["t"] for t in (orphan, human)}
    refused = db.execute("SELECT processgpt_sync_retry_v1(%s) AS r", (orphan,)).fetchone()["r"]
    planned: list[str] = []
    install_schema(upstream_database_url, dry_run=True, added=planned)
    before = todo_states(db)
    done: list[str] = []
    install_schema(upstream_database_url, added=done)
    after = todo_states(db)
    cancel = "cancel 1 todo of subprocesses whose root process instance was deleted for good"
    planned, done = ([line for line in lines if line.startswith(cancel)]
                     for lines in (planned, done))
    assert sorted(c.todo_id for c in taken) == sorted([unrecorded, rootless])
    assert [(c["draft_status"], c["claimable"], c["in_trash"], c["count"]) for c in counts] == [
        (None, False, False, 1), (None, False, True, 1), ("STARTED", False, False, 2)]
    assert shown == {orphan: True, human: False}
    assert not refused["retried"] and "ProcessGPT trash" in refused["reason"]
    assert len(planned) == len(done) == 1
    assert (before[orphan][0], after[orphan][0], after[human][0]) == (None, "CANCELLED", None)


def test_init_db_again_neither_waits_for_nor_blocks_writers_of_process_instances(
        upstream_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The BPM engine and the UI write bpm_proc_inst all the time: an upgrade's init-db, its
    triggers there already in place, takes no lock on it that would queue behind them (and
    every claim and UI write behind itself)."""
    monkeypatch.setattr(install, "INSTALL_LOCK_TIMEOUT", 0.5)
    monkeypatch.setattr(install, "INSTALL_ATTEMPTS", 1)
    with connect(upstream_database_url) as db:
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES ('busy')")
    with psycopg.connect(upstream_database_url) as engine:
        engine.execute("UPDATE bpm_proc_inst SET updated_at = now() WHERE proc_inst_id = 'busy'")
        install_schema(upstream_database_url)  # a lock wait past 0.5 s raises StorageError
        engine.rollback()


def test_an_instance_deleted_while_a_claim_waits_for_its_lock_is_left_by_that_claim(
        upstream: tuple[PostgresStorage, psycopg.Connection], upstream_database_url: str) -> None:
    """The UI's delete holds the instance's row while a claim, which found the todo before the
    delete committed, waits for it (up to 200 ms): once the delete commits, the claim reads the
    trash again and leaves the todo waiting, rather than running a process someone threw
    away; and it says it left one, so its server claims again soon. (A claim that gave up its
    wait, the commit coming late on a loaded machine, takes the free todo: tried again.)"""
    store, db = upstream
    result: dict[str, Any] = {}
    for attempt in range(3):
        result.clear()
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id) VALUES (%s), (%s)",
                   (f"binned-{attempt}", f"free-{attempt}"))
        todo = enqueue_in(db, "shared", f"binned-{attempt}")
        free = enqueue_in(db, "shared", f"free-{attempt}")  # what a claim that gave up takes
        with psycopg.connect(upstream_database_url) as ui:
            trash(ui, f"binned-{attempt}")  # not committed yet: the row is held
            claim = threading.Thread(target=lambda: result.update(taken=claim_ours(store)))
            claim.start()
            # the claim found the todo and waits for the instance's lock (or, loaded, it gave
            # up its wait already: tried again)
            wait_for(lambda: "taken" in result or claim_waits_for_a_lock(db), interval=0.005)
            ui.commit()
            claim.join(timeout=10)
        assert not claim.is_alive()
        if [c.todo_id for c in result["taken"]] != [free]:
            break
        db.execute("DELETE FROM todolist WHERE id = %s", (free,))  # and its lease
    state = db.execute("SELECT draft_status::text AS d FROM todolist WHERE id = %s",
                       (todo,)).fetchone()["d"]
    assert ([c.todo_id for c in result["taken"]], result["taken"].held_back, state) == (
        [], 1, None), f"attempt {attempt + 1}"


def test_a_trash_column_the_platform_adds_after_init_db_is_named_at_start_until_init_db_again(
        platform_database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """init-db reads the database it installs on: a platform database that gains the trash
    column later (its migration.sql adds it) has servers that still run trashed todos, so
    their start warns with the fix, until init-db runs again."""
    with connect(platform_database_url) as db:
        db.execute("ALTER TABLE bpm_proc_inst DROP COLUMN is_deleted")
        install_schema(platform_database_url)
        db.execute("ALTER TABLE bpm_proc_inst ADD COLUMN is_deleted boolean DEFAULT false")
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, is_deleted) VALUES ('binned', true)")
        store = PostgresStorage(platform_database_url)
        try:
            stale = store.schema_warnings()
            with caplog.at_level(logging.WARNING, logger="processgpt_sync"), \
                    ps.start(lambda todo: {"ok": True}, agent_orch="late", storage=store):
                pass
            todo = enqueue_in(db, "late", "binned")
            before = store.claim(agent_orch="late", consumer="w", limit=1, lease_seconds=60,
                                 max_claims=3)
            db.execute("DELETE FROM processgpt_sync_lease")
            db.execute("UPDATE todolist SET draft_status = NULL, consumer = NULL")
            install_schema(platform_database_url)
            after = store.claim(agent_orch="late", consumer="w", limit=1, lease_seconds=60,
                                max_claims=3)
            warnings = store.schema_warnings()
        finally:
            store.close()
    assert len(stale) == 1 and "processgpt-sync init-db" in stale[0]
    assert any("bpm_proc_inst.is_deleted" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    assert [c.todo_id for c in before] == [todo], "stale: the trashed todo was still claimed"
    assert (after, warnings) == ([], [])


def test_a_signed_in_user_restoring_an_instance_wakes_the_servers_with_their_own_rights(
        platform_database_url: str) -> None:
    """The UI restores an instance as a signed-in admin of its tenant, under row level
    security: this library's trigger on bpm_proc_inst runs with that user's rights, never
    fails the restore, and wakes the servers of the instance's todos."""
    from tests.integration.test_todo_life import SUPABASE_GRANTS, SUPABASE_ROLES, signed_in

    with connect(platform_database_url) as db:
        db.execute(SUPABASE_ROLES)
        db.execute(SUPABASE_GRANTS)
        install_schema(platform_database_url)
        admin = str(uuid.uuid4())
        db.execute("INSERT INTO tenants (id) VALUES ('acme')")
        db.execute("INSERT INTO users (id, is_admin, tenant_id) VALUES (%s, true, 'acme')",
                   (admin,))
        db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, tenant_id, is_deleted) "
                   "VALUES ('binned', 'acme', true)")
        todo = str(db.execute("SELECT processgpt_sync_enqueue_v1('woken', 'q', 'COMPLETE', "
                              "'acme', 'step', 'binned') AS id").fetchone()["id"])
        with psycopg.connect(platform_database_url, autocommit=True) as listener:
            listener.execute("LISTEN processgpt_sync_todo")
            with signed_in(platform_database_url, "acme") as ui:
                claims = json.loads(ui.execute(
                    "SELECT current_setting('request.jwt.claims')").fetchone()[0])
                ui.execute("SELECT set_config('request.jwt.claims', %s, false)", (json.dumps(
                    {**claims, "sub": admin}),))
                restored = ui.execute("UPDATE bpm_proc_inst SET is_deleted = false, "
                                      "deleted_at = NULL WHERE proc_inst_id = 'binned'").rowcount
            notes = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
        store = PostgresStorage(platform_database_url)
        try:
            taken = store.claim(agent_orch="woken", consumer="w", limit=1, lease_seconds=60,
                                max_claims=3)
        finally:
            store.close()
    assert restored == 1
    assert notes == ["woken"]
    assert [c.todo_id for c in taken] == [todo]


@pytest.mark.parametrize("backend", ["postgres", "supabase"])
def test_deleting_a_tenant_while_its_todos_run_stops_them_and_spares_the_other_tenants(
        upstream_database_url: str, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """The platform deletes a tenant with everything of it: the foreign keys cascade to its
    todos, process instances and projects. A busy server's claims and batches, which take
    todos, then their instances, then the instances' projects, neither deadlock with the
    cascade nor hold it up; the tenant's runs stop (nothing is written for them, none is
    counted failed, the log says the todo was deleted); its queued todos are never run; the
    other tenant's todos all complete."""
    db = connect(upstream_database_url)
    db.execute("INSERT INTO tenants (id) VALUES ('doomed'), ('kept')")
    todos: dict[str, list[str]] = {"doomed": [], "kept": []}
    for tenant, per_instance in (("doomed", 4), ("kept", 25)):
        projects = [str(r["project_id"]) for r in db.execute(
            "INSERT INTO project (name, tenant_id) VALUES ('a', %s), ('b', %s) "
            "RETURNING project_id", (tenant, tenant))]
        for i in range(6):
            inst = f"{tenant}-{i}"
            db.execute("INSERT INTO bpm_proc_inst (proc_inst_id, tenant_id, project_id) "
                       "VALUES (%s, %s, %s)", (inst, tenant, projects[i % 2]))
            with db.transaction():
                for _ in range(per_instance):
                    todo = enqueue_in(db, "cascade", inst)
                    db.execute("UPDATE todolist SET tenant_id = %s WHERE id = %s",
                               (tenant, todo))
                    todos[tenant].append(todo)
    doomed = set(todos["doomed"])
    ran: set[str] = set()
    stopped: set[str] = set()

    def handle(t: ps.Todo) -> dict[str, bool]:
        ran.add(t.id)
        if t.id in doomed:
            while not t.cancelled and time.monotonic() - begun < 20:
                time.sleep(0.02)
            stopped.add(t.id)
        else:
            time.sleep(0.01)
        return {"done": True}

    store = next(backends := open_backend(backend, upstream_database_url))
    begun = time.monotonic()
    try:
        with ps.start(handle, agent_orch="cascade", storage=store, workers=6,
                      lease_seconds=2) as server:
            wait_for(lambda: len(ran & doomed) >= 3, timeout=20)
            db.execute("SET lock_timeout = '5s'")  # a delete held up would fail the test
            before_delete = time.monotonic()
            db.execute("DELETE FROM tenants WHERE id = 'doomed'")
            delete_seconds = time.monotonic() - before_delete
            wait_for(lambda: server.stats()["completed"] == len(todos["kept"]), timeout=60)
            wait_for(lambda: (ran & doomed) <= stopped, timeout=10)
            stats = server.stats()
            ran_doomed = ran & doomed
        left = {r["id"] for r in db.execute("SELECT id::text FROM todolist "
                                            "WHERE tenant_id = 'doomed'")}
        leases = db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"]
        kept = {r["draft_status"] for r in db.execute("SELECT draft_status::text FROM todolist")}
    finally:
        next(backends, None)
        db.close()
    assert delete_seconds < 5 and left == set() and leases == 0
    assert len(ran_doomed) < len(doomed), "the deleted tenant's queued todos ran"
    assert stats["failed"] == 0 and stats["completed"] == len(todos["kept"]) and kept == {
        "COMPLETED"}
    # each run of the tenant's, and each claim of its that had not started its executor yet
    deleted = [r.getMessage() for r in caplog.records if "its row was deleted" in r.getMessage()]
    assert stats["lost"] == len(deleted) >= len(ran_doomed) >= 3, deleted
