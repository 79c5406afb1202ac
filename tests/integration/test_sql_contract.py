"""The SQL functions, called through the Postgres storage: claims, events, fencing, leases."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import psycopg
import pytest
from psycopg.types.json import Jsonb

from processgpt_sync import SchemaMissing, StorageError
from processgpt_sync.events import make_event
from processgpt_sync.models import Claim
from tests.conftest import wait_for

CLAIM = {"lease_seconds": 60, "max_claims": 3}


def claim(storage, agent="a", limit=10, consumer="w1", **kw):
    return storage.claim(agent_orch=agent, consumer=consumer, limit=limit,
                         **{**CLAIM, **kw})


def event(c: Claim, event_type="task_working", data=None, **kw):
    return make_event(c.todo_id, c.token, event_type, data or {"n": 1}, **kw)


def test_claim_under_concurrency_claims_every_todo_exactly_once(storage, db):
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode)
                  SELECT gen_random_uuid(), 'a', 'q' || g, 'IN_PROGRESS', 'COMPLETE'
                  FROM generate_series(1, 500) g""")
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name):
        while batch := claim(storage, limit=7, consumer=name):
            with lock:
                claimed.extend(c.todo_id for c in batch)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(claimed)
    assert len(counts) == 500 and max(counts.values()) == 1
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 500


def test_claim_returns_oldest_first_and_respects_limit_and_agent(storage):
    first = storage.enqueue("a", "first")
    second = storage.enqueue("a", "second")
    storage.enqueue("other", "not mine")
    got = claim(storage, limit=1)
    assert [c.todo_id for c in got] == [first]
    assert [c.todo_id for c in claim(storage)] == [second]
    assert claim(storage) == []



def test_a_claim_commits_without_waiting_for_the_wal_flush_and_leaves_the_session_alone(
        storage, database_url):
    """Only the claim's own transaction skips the flush wait: the todo's events and outcome
    (later synchronous commits) flush it, and the caller's session setting is untouched."""
    storage.enqueue("a", "q")
    with psycopg.connect(database_url) as conn:
        claimed = conn.execute("SELECT processgpt_sync_claim_v2('a', 'w1', 5)").fetchone()[0]
        assert len(claimed) == 1
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
        conn.commit()
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        conn.rollback()

def test_claim_skips_rows_that_are_not_claimable(storage, db):
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode, draft,
                  draft_status) VALUES
        (gen_random_uuid(), 'a', 'done', 'IN_PROGRESS', 'COMPLETE', NULL, 'COMPLETED'),
        (gen_random_uuid(), 'a', 'has draft', 'IN_PROGRESS', 'DRAFT', '{"x":1}', NULL),
        (gen_random_uuid(), 'a', 'not in progress', 'TODO', 'COMPLETE', NULL, NULL),
        (gen_random_uuid(), 'a', 'no mode', 'IN_PROGRESS', NULL, NULL, NULL),
        (gen_random_uuid(), 'a', 'revision', 'IN_PROGRESS', 'COMPLETE', NULL, 'FB_REQUESTED'),
        (gen_random_uuid(), 'a', 'revision, result submitted', 'SUBMITTED', 'COMPLETE', NULL,
         'FB_REQUESTED'),
        (gen_random_uuid(), 'a', 'revision, step not reached', 'TODO', 'COMPLETE', NULL,
         'FB_REQUESTED')""")
    got = claim(storage)
    assert [c.row["query"] for c in got] == ["revision"]
    assert got[0].extras["resume"]["kind"] == "fresh"


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "oldest-first"])
def test_claims_and_waits_for_work_skip_agent_todos_that_ended_without_a_run(db, fair):
    """An agent's todos that a person completed, or whose process was cancelled, keep
    draft_status NULL for good; on a platform they pile up by the hundred thousand. A claim, and
    the idle wait for work, must find the few queued todos without reading them, nor revision
    requests whose step was then cancelled or finished by status alone."""
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode, start_date,
                                        draft_status)
                  SELECT gen_random_uuid(), 'a', 'q', (CASE WHEN g % 2 = 0 THEN 'DONE'
                                                      ELSE 'CANCELLED' END)::todo_status,
                         'COMPLETE', now() - interval '30 days',
                         (CASE WHEN g % 5 = 0 THEN 'FB_REQUESTED' END)::draft_status
                  FROM generate_series(1, 5000) g""")
    queued = db.execute("SELECT processgpt_sync_enqueue_v1('a', 'q')::text AS id").fetchone()["id"]
    db.execute("ANALYZE todolist")

    def rows_read(statement, **params):
        db.execute("SELECT pg_stat_force_next_flush()")  # earlier statements' counts: flushed
        db.execute("SELECT 1")  # at this statement's end, so the counts below start at zero
        with db.transaction():
            got = next(iter(db.execute(statement, params).fetchone().values()))
            # heap pages asked for (a row walked past by a scan is not a row returned)
            read = db.execute("SELECT pg_stat_get_xact_blocks_fetched('todolist'::regclass) AS n"
                              ).fetchone()["n"]
        return got, read

    found, read = rows_read("SELECT processgpt_sync_wait_for_work_v1('a', 'w', 0)")
    assert found is True and read < 50, f"the wait for work read {read} pages"
    claimed, read = rows_read("SELECT processgpt_sync_claim_v3('a', 'w', 4, p_fair => "
                                 "%(fair)s)", fair=fair)
    assert [c["row"]["id"] for c in claimed] == [queued]
    assert read < 50, f"the claim read {read} pages"


def test_claim_context_extras_come_from_the_todos_tenant_only(storage, db):
    agent, human, foreign = (str(uuid.uuid4()) for _ in range(3))
    db.execute("INSERT INTO tenants (id, mcp) VALUES ('t1', '{\"servers\": 1}')")
    db.execute("ALTER TABLE users ADD COLUMN IF NOT EXISTS device_token text")  # the platform's
    db.execute("""INSERT INTO users (id, tenant_id, username, email, is_agent, device_token)
        VALUES (%s, 't1', 'bot', NULL, true, 'push-1'),
               (%s, 't1', 'ann', 'ann@example.com', false, 'push-2'),
               (%s, 't2', 'spy', 'spy@example.com', true, NULL)""", (agent, human, foreign))
    db.execute("""INSERT INTO form_def (id, tenant_id, fields_json, html, proc_def_id, activity_id)
        VALUES ('f1', 't1', '[{"key": "a"}]', '<form/>', 'p', 'a'),
               ('f1', 't2', '[{"key": "leak"}]', 'x', 'p', 'a')""")
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode, tenant_id,
                  user_id, tool, proc_inst_id) VALUES (gen_random_uuid(), 'a', 'q', 'IN_PROGRESS',
                  'COMPLETE', 't1', %s, 'formHandler:f1', 'p1')""",
               (f"{agent}, {human},{foreign}, not-a-uuid",))
    db.execute("INSERT INTO proc_inst_source (proc_inst_id, file_name) VALUES ('p1', 'a.pdf')")
    (c,) = claim(storage)
    extras = c.extras
    assert [a["username"] for a in extras["agents"]] == ["bot"]
    assert [u["email"] for u in extras["users"]] == ["ann@example.com"]
    assert set(extras["users"][0]) <= {"id", "tenant_id", "username", "email", "role", "profile"}
    assert "device_token" not in extras["agents"][0], "a person's push token reaches no executor"
    assert extras["agents"][0]["is_agent"] is True, "an agent's configuration comes whole"
    assert extras["notify_emails"] == ["ann@example.com"]
    assert extras["form_fields"] == [{"key": "a"}] and extras["form_html"] == "<form/>"
    assert extras["tenant_mcp"] == {"servers": 1}
    assert [s["file_name"] for s in extras["sources"]] == ["a.pdf"]


def todolist_index_tuples_read(conn: psycopg.Connection) -> int:
    conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's counts, at its commit
    return conn.execute("SELECT sum(idx_tup_read)::bigint FROM pg_stat_user_indexes "
                        "WHERE relname = 'todolist'").fetchone()[0]


@pytest.mark.parametrize("fair", [True, False])
def test_a_claim_does_not_walk_past_the_todos_in_flight(database_url, db, fair):
    """The claim's cost must not grow with the number of running todos: its indexes hold only
    waiting todos, and abandoned claims are found from their expired leases."""
    # an autoanalyze running as the next claim scans would hold back the horizon below which
    # that scan marks the claimed rows' old index entries dead: the measured claim would read
    # them all (a busy machine's timing, not the claim's cost)
    db.execute("ALTER TABLE todolist SET (autovacuum_enabled = false)")
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode, start_date)
                  SELECT gen_random_uuid(), 'a', 'q' || g, 'IN_PROGRESS', 'COMPLETE',
                         now() - interval '1 hour' FROM generate_series(1, 2000) g""")
    with psycopg.connect(database_url, autocommit=True) as conn:
        call = "SELECT jsonb_array_length(processgpt_sync_claim_v2('a', 'w1', %s, 60, 3, " \
               "NULL, %s))"
        assert conn.execute(call, (2000, fair)).fetchone()[0] == 2000
        # the first scan after the claims marks the entries of the rows' old versions dead
        assert conn.execute(call, (10, fair)).fetchone()[0] == 0
        conn.execute("INSERT INTO todolist (id, agent_orch, query, status, agent_mode) "
                     "VALUES (gen_random_uuid(), 'a', 'next', 'IN_PROGRESS', 'COMPLETE')")
        before = todolist_index_tuples_read(conn)
        assert conn.execute(call, (10, fair)).fetchone()[0] == 1
        read = todolist_index_tuples_read(conn) - before
    assert read < 50, f"one claim read {read} index entries of todolist with 2,000 running"


def test_event_batch_with_one_invalid_type_keeps_the_others(storage, db):
    storage.enqueue("a", "q")
    (c,) = claim(storage)
    batch = [event(c, data={"i": 0}), {**event(c), "event_type": "notice"},
             event(c, "task_completed", data={"i": 2})]
    rejected = storage.record_events(batch)
    assert rejected == [{"index": 1, "reason": "unknown event_type 'notice'"}]
    rows = db.execute("SELECT event_type::text, data, job_id FROM events "
                      "ORDER BY timestamp").fetchall()
    assert [(r["event_type"], r["data"]) for r in rows] == [
        ("task_working", {"i": 0}), ("task_completed", {"i": 2})]
    assert all(r["job_id"] == c.todo_id for r in rows), "job_id defaults to the todo id"


def test_events_of_a_todo_the_ui_cancelled_by_status_are_refused_not_held(storage, db):
    """'busy' is only for a row another transaction holds: a todo cancelled by its status
    alone (draft_status still STARTED) is not written to, whoever holds what."""
    storage.enqueue("a", "q")
    (c,) = claim(storage)
    db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (c.todo_id,))
    (rejected,) = storage.record_events([event(c)])
    assert rejected["reason"] != "busy"
    assert db.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 0


def test_event_writes_are_idempotent_by_event_id(storage, db):
    storage.enqueue("a", "q")
    (c,) = claim(storage)
    batch = [{**event(c), "id": str(uuid.uuid4())}]  # the flusher gives each event an id
    storage.record_events(batch)
    storage.record_events(batch)  # a retry after an ambiguous network error
    assert db.execute("SELECT count(*) AS n FROM events").fetchone()["n"] == 1


def test_fenced_result_is_refused_for_a_non_owner_and_the_owner_result_stands(storage, db):
    storage.enqueue("a", "q")
    (mine,) = claim(storage)
    stale = Claim(todo_id=mine.todo_id, token=str(uuid.uuid4()), row=mine.row, extras={})
    refused = storage.save_result(stale, {"from": "stale"}, events=[event(stale)])
    assert (refused.applied, refused.reason) == (False, "not_owner")
    applied = storage.save_result(mine, {"from": "owner"})
    assert applied.applied
    again = storage.save_result(mine, {"from": "owner"})
    assert (again.applied, again.reason) == (True, "already_applied")
    row = db.execute("SELECT output, status::text, draft_status::text, consumer FROM todolist"
                     ).fetchone()
    assert row == {"output": {"from": "owner"}, "status": "SUBMITTED",
                   "draft_status": "COMPLETED", "consumer": None}
    types = [r["event_type"] for r in db.execute(
        "SELECT event_type::text FROM events ORDER BY timestamp").fetchall()]
    assert types == ["crew_completed"], "the stale event was refused, crew_completed written once"


def test_draft_mode_writes_draft_and_intermediate_results_keep_running(storage, db):
    storage.enqueue("a", "q", agent_mode="DRAFT")
    (c,) = claim(storage)
    assert storage.save_result(c, {"partial": 1}, final=False).applied
    assert db.execute("SELECT draft_status::text AS s FROM todolist").fetchone()["s"] == "STARTED"
    assert storage.save_result(c, {"final": 1}).applied
    row = db.execute("SELECT draft, output, status::text, draft_status::text FROM todolist"
                     ).fetchone()
    assert row == {"draft": {"final": 1}, "output": None, "status": "IN_PROGRESS",
                   "draft_status": "COMPLETED"}


def test_a_draft_arriving_after_its_run_suspended_the_todo_is_refused(storage, db):
    """A draft written late (a pool thread's, on the shared loop) after its run suspended the
    todo with the draft the person is asked about: refused, not written over that draft."""
    storage.enqueue("a", "q")
    (c,) = claim(storage)
    (done,) = storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked",
                               "result": "the report"}])
    assert done.applied
    late = storage.save_result(c, "the report, half written", final=False)
    assert (late.applied, late.reason) == (False, "released")
    row = db.execute("SELECT draft, draft_status::text FROM todolist").fetchone()
    assert row == {"draft": "the report", "draft_status": "HUMAN_ASKED"}


def test_fail_keeps_the_message_in_log_and_an_error_event(storage, db):
    storage.enqueue("a", "q")
    (c,) = claim(storage)
    assert storage.fail(c, "ValueError: boom", events=[event(c)]).applied
    row = db.execute("SELECT draft_status::text, log FROM todolist").fetchone()
    assert row == {"draft_status": "FAILED", "log": "ValueError: boom"}
    events = db.execute("SELECT event_type::text, data FROM events ORDER BY timestamp").fetchall()
    assert [e["event_type"] for e in events] == ["task_working", "error"]
    # `message` is the field the ProcessGPT UI shows for an error event.
    assert events[1]["data"] == {"error": "ValueError: boom", "message": "ValueError: boom"}


def test_lease_renewal_reports_renewed_lost_and_cancelled(storage, db):
    ids = [storage.enqueue("a", f"q{i}") for i in range(3)]
    claims = {c.todo_id: c for c in claim(storage)}
    db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (ids[1],))
    db.execute("UPDATE todolist SET claim_token = gen_random_uuid() WHERE id = %s", (ids[2],))
    updates_before = db.execute("SELECT n_tup_upd AS n FROM pg_stat_user_tables "
                                "WHERE relname = 'todolist'").fetchone()["n"]
    report = storage.renew("w1", claims.values(), 60)
    assert report.renewed == {ids[0]}
    assert report.cancelled == {ids[1]}
    assert report.lost == {ids[2]}
    updates_after = db.execute("SELECT n_tup_upd AS n FROM pg_stat_user_tables "
                               "WHERE relname = 'todolist'").fetchone()["n"]
    assert updates_after == updates_before, "a heartbeat must not rewrite todolist rows"


def test_expired_lease_is_reclaimed_then_fails_after_max_claims(storage, db):
    todo = storage.enqueue("a", "q")
    expire = "UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'"
    (first,) = claim(storage, max_claims=2)
    assert claim(storage, max_claims=2) == [], "a live lease is not reclaimed"
    db.execute(expire)
    (second,) = claim(storage, consumer="w2", max_claims=2)
    assert second.extras["resume"] == {"kind": "reclaim", "attempt": 2, "answer": None,
                                       "job_id": None, "key": todo, "answer_raw": ""}
    assert not storage.save_result(first, {"late": True}).applied, "old owner is fenced"
    db.execute(expire)
    assert claim(storage, max_claims=2) == []
    row = db.execute("SELECT draft_status::text, log FROM todolist WHERE id = %s", (todo,)
                     ).fetchone()
    assert row["draft_status"] == "FAILED" and "claimed 2 times" in row["log"]


def test_release_returns_todos_to_the_state_they_were_claimed_from(storage, db):
    storage.enqueue("a", "fresh")
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode, draft_status,
                  feedback, start_date) VALUES (gen_random_uuid(), 'a', 'revise', 'IN_PROGRESS',
                  'COMPLETE', 'FB_REQUESTED', '[{"content": "shorter", "kind": "revision"}]',
                  now())""")
    claims = claim(storage)
    assert storage.release(claims) == 2
    rows = db.execute("SELECT query, draft_status::text, claim_count, consumer FROM todolist "
                      "ORDER BY start_date").fetchall()
    assert [(r["query"], r["draft_status"], r["claim_count"], r["consumer"]) for r in rows] == [
        ("fresh", None, 0, None), ("revise", "FB_REQUESTED", 0, None)]
    again = {c.row["query"]: c.extras["resume"]["kind"] for c in claim(storage)}
    assert again == {"fresh": "fresh", "revise": "revision"}


def test_notify_trigger_wakes_listeners_for_new_work_and_cancels(storage, database_url, db):
    listener = storage.listener(["processgpt_sync_todo", "processgpt_sync_cancel"])
    listener.connect()
    try:
        todo = storage.enqueue("a", "q")
        assert listener.wait(2.0) == [("processgpt_sync_todo", "a")]
        claim(storage)
        db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo,))
        assert listener.wait(2.0) == [("processgpt_sync_cancel", todo)]
    finally:
        listener.close()


def test_schema_check_names_missing_functions_and_the_fix(empty_database_url):
    from processgpt_sync.storage.postgres import PostgresStorage

    store = PostgresStorage(empty_database_url)
    try:
        with pytest.raises(SchemaMissing, match=r"processgpt_sync_claim_v4.*init-db"):
            store.check_schema()
    finally:
        store.close()


def test_bad_input_gets_one_clear_error(storage):
    with pytest.raises(StorageError, match="invalid input syntax for type uuid"):
        storage.save_result(Claim(todo_id="not-a-uuid", token=str(uuid.uuid4()), row={},
                                  extras={}), {"x": 1})
    with pytest.raises(StorageError, match="invalid input value for enum agent_mode"):
        storage.enqueue("a", "q", agent_mode="SOMETIMES")


def test_wrong_url_is_a_clear_configuration_or_connection_error(tmp_path, database_url):
    from processgpt_sync import ConfigurationError, StorageError, StorageUnavailable
    from processgpt_sync.storage.postgres import PostgresStorage

    store = PostgresStorage(f"postgresql://nobody@/nodb?host={tmp_path}")
    try:
        with pytest.raises(StorageUnavailable, match="database unreachable"):
            store.check_schema()
    finally:
        store.close()
    with pytest.raises(ConfigurationError, match="invalid database URL"):
        PostgresStorage("postgresql://x/db?bogus_option=1").ping()
    store = PostgresStorage(database_url)
    try:  # a value the driver cannot send is the call's problem, not the URL's
        with pytest.raises(StorageError, match=r"driver refused the call \(enqueue\): cannot "
                                               r"adapt type 'object'") as refused:
            store.call("enqueue", {"p_agent_orch": "x", "p_input": object(),
                                   "p_agent_mode": "COMPLETE", "p_tenant_id": None,
                                   "p_activity_name": None, "p_proc_inst_id": None,
                                   "p_user_id": None})
        assert not isinstance(refused.value, ConfigurationError)
    finally:
        store.close()
    for password in ("hun%zzter2", "my secret"):  # a stray % or space: libpq quotes the text
        with pytest.raises(ConfigurationError, match="must be percent-encoded") as refused:
            PostgresStorage(f"postgresql://u:{password}@127.0.0.1:1/db")
        assert password not in str(refused.value)


def test_functions_are_not_granted_to_anon(pg_url, database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') "
                     "THEN CREATE ROLE anon; END IF; END $$")
        from processgpt_sync.storage.install import install_schema

        install_schema(database_url)
        allowed = conn.execute("SELECT has_function_privilege('anon', "
                               "'processgpt_sync_claim_v1(text,text,integer,integer,integer,text)',"
                               " 'EXECUTE')").fetchone()
    assert allowed == (False,)


def test_finish_records_many_outcomes_in_one_call_and_isolates_a_bad_item(storage, db):
    for i in range(4):
        storage.enqueue("a", f"q{i}")
    c = claim(storage)
    stale = {"todo_id": c[3].todo_id, "token": str(uuid.uuid4()), "outcome": "completed",
             "result": {"stale": True}}
    items = [
        {"todo_id": c[0].todo_id, "token": c[0].token, "outcome": "completed",
         "result": {"n": 0}, "events": [event(c[0])]},
        {"todo_id": c[1].todo_id, "token": c[1].token, "outcome": "failed", "error": "boom"},
        {"todo_id": c[2].todo_id, "token": c[2].token, "outcome": "exploded"},
        stale,
    ]
    out = storage.finish(items)
    assert [(o.applied, o.reason) for o in out] == [
        (True, "ok"), (True, "ok"), (False, "error"), (False, "not_owner")]
    assert "unknown outcome 'exploded'" in (out[2].error or "")
    assert out[0].rejected == []
    states = {r["id"]: r["draft_status"] for r in db.execute(
        "SELECT id::text, draft_status::text FROM todolist")}
    assert [states[x.todo_id] for x in c] == ["COMPLETED", "FAILED", "STARTED", "STARTED"]


def test_a_todo_finished_by_someone_else_while_claimed_is_not_taken_for_our_result(storage,
                                                                                   db):
    """The UI (or a person in SQL) completes a todo while our claim runs: our result was
    never stored, so it is refused as finished, not reported as already applied; a retry of
    a write that did commit is still already applied."""
    for kind in ("finish", "save_result", "fail"):
        storage.enqueue("a", kind)
        (c,) = claim(storage)
        finished = "FAILED" if kind == "fail" else "COMPLETED"
        db.execute("UPDATE todolist SET draft_status = %s, output = '{\"by\": \"person\"}' "
                   "WHERE id = %s", (finished, c.todo_id))
        if kind == "finish":
            (answer,) = storage.finish([{"todo_id": c.todo_id, "token": c.token,
                                         "outcome": "completed", "result": {"by": "agent"},
                                         "events": []}])
        elif kind == "save_result":
            answer = storage.save_result(c, {"by": "agent"})
        else:
            answer = storage.fail(c, "boom")
        assert (answer.applied, answer.reason) == (False, finished.lower()), kind
        output = db.execute("SELECT output FROM todolist WHERE id = %s",
                            (c.todo_id,)).fetchone()["output"]
        assert output == {"by": "person"}, kind


def test_events_sent_again_while_their_first_write_commits_are_stored_once(storage, db,
                                                                           database_url):
    """A batch cut off from its caller can still be committing when the writer sends it again:
    the second write waits for the first and keeps its events, instead of failing on their
    ids (a unique violation, which the writer would take for a refusal of the batch)."""
    storage.enqueue("a", "q")
    (held,) = claim(storage)
    sent = {**event(held), "id": str(uuid.uuid4())}
    answers = []
    with psycopg.connect(database_url) as first:  # the first write, not committed yet
        first.execute("SELECT processgpt_sync_record_events_v1(%s::jsonb)", (Jsonb([sent]),))

        def send_again():
            try:
                answers.append(storage.record_events([sent]))
            except StorageError as exc:
                answers.append(exc)

        again = threading.Thread(target=send_again)
        again.start()
        wait_for(lambda: db.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()["n"] == 1)
        first.commit()
        again.join(10)
    assert answers == [[]]  # nothing refused
    assert db.execute("SELECT count(*) AS n FROM events WHERE id = %s",
                      (sent["id"],)).fetchone()["n"] == 1


def test_a_payload_too_long_to_notify_never_fails_another_writers_insert(db, database_url):
    """PostgreSQL refuses a NOTIFY payload of 8,000 bytes; our triggers run inside the UI's and
    other agents' inserts, so a value that long is announced empty instead of failing them."""
    long = "x" * 9000
    with psycopg.connect(database_url, autocommit=True) as listener:
        for channel in ("processgpt_sync_answer", "processgpt_sync_todo", "processgpt_sync_event"):
            listener.execute(f"LISTEN {channel}")
        db.execute("SELECT processgpt_sync_console_watch_v1('long-payloads', 60)")
        db.execute("INSERT INTO events (id, job_id, todo_id, event_type, data) "
                   "VALUES (%s, %s, %s, 'human_response', '{}')",
                   (str(uuid.uuid4()), long, long))
        todo_id = uuid.uuid4()
        db.execute("INSERT INTO todolist (id, agent_orch, query, status, agent_mode) "
                   "VALUES (%s, %s, 'q', 'IN_PROGRESS', 'COMPLETE')", (todo_id, long))
        db.execute("SELECT processgpt_sync_console_unwatch_v1('long-payloads')")
        heard = {(n.channel, n.payload) for n in listener.notifies(timeout=1, stop_after=4)}
    assert db.execute("SELECT count(*) AS n FROM events WHERE job_id = %s",
                      (long,)).fetchone()["n"] == 1
    assert db.execute("SELECT agent_orch FROM todolist WHERE id = %s",
                      (todo_id,)).fetchone()["agent_orch"] == long
    assert {("processgpt_sync_answer", ""), ("processgpt_sync_todo", ""),
            ("processgpt_sync_event", ""), ("processgpt_sync_event", str(todo_id))} <= heard


def test_console_todo_pages_events_in_time_and_id_order(storage, db):
    """The newest p_limit with no place given; else the first p_limit after (p_since,
    p_after_id), p_since itself included without an id: a page may end inside one timestamp
    and the next goes on from there. An event with no time is shown only when room is left."""
    todo_id = storage.enqueue("a", "paged")
    db.execute("INSERT INTO events (id, job_id, data, todo_id, event_type, \"timestamp\") SELECT "
               "'e' || lpad(g::text, 2, '0'), 'j', '{}', %s, 'task_working', '2026-01-01 10:00+00'"
               "::timestamptz + (g / 4) * interval '1 second' FROM generate_series(0, 11) g",
               (todo_id,))
    db.execute("INSERT INTO events (id, job_id, data, todo_id, event_type, \"timestamp\") "
               "VALUES ('no-time', 'j', '{}', %s, 'task_working', NULL)", (todo_id,))

    def page(since=None, after=None, limit=5):
        detail = storage.call("console_todo", {"p_todo_id": todo_id, "p_since": since,
                                               "p_after_id": after, "p_limit": limit})
        return [e["id"] for e in detail["events"]]

    assert page() == ["e07", "e08", "e09", "e10", "e11"]
    assert page(limit=20)[0] == "no-time"  # first, so the page's last event has a time
    assert page("2026-01-01 10:00:01+00") == ["e04", "e05", "e06", "e07", "e08"]
    assert page("2026-01-01 10:00:01+00", "e05") == ["e06", "e07", "e08", "e09", "e10"]
    assert page("2026-01-01 10:00:02+00", "e10", limit=20) == ["e11"]
    assert page("2026-01-01 10:00:02+00", "e11") == []


def test_a_lease_renewed_after_a_claim_found_it_run_out_is_not_taken_over(storage, db):
    """A claim found a todo's lease run out; before it took the lease over, the owner's late
    heartbeat renewed it. The claim leaves it (its owner runs on) rather than take it over
    under a server that goes on running the executor, whose side effects would then happen
    twice. A lease that did run out, or of a run the UI asked to revise, is taken."""
    todo_id = storage.enqueue("a", "q")
    storage.claim(agent_orch="a", consumer="c1", limit=1, lease_seconds=60, max_claims=3)

    def taken() -> list[str]:
        with db.transaction():
            row = db.execute("SELECT processgpt_sync_leases_taken_v1(ARRAY[%s]::uuid[]) AS ids",
                             (todo_id,)).fetchone()
        return [str(i) for i in row["ids"]]

    assert taken() == [], "renewed: its owner runs on"
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    assert taken() == [todo_id], "run out"
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() + interval '60 seconds'")
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED' WHERE id = %s", (todo_id,))
    assert taken() == [todo_id], "a revision takes over the run still going"


def test_a_claim_whose_consumer_the_platform_cleared_is_settled_or_claimed_not_left_started(
        storage, db, database_url):
    """The platform clears ``consumer`` on a running claim (its /complete submits the step:
    SUBMITTED; or another write) and the owner dies. Its lease is kept until a claim settles
    the todo (CANCELLED, as todo-life 13b has it) or claims it again (the step still in
    progress), even when the row was held as a claim walked past. Before, the claim took the
    cleared consumer for another worker's and deleted the lease: the todo stayed STARTED,
    claimed by nobody, for ever."""
    submitted, cleared = storage.enqueue("a", "submitted"), storage.enqueue("a", "cleared")
    storage.claim(agent_orch="a", consumer="c1", limit=2, lease_seconds=60, max_claims=3)
    db.execute("UPDATE todolist SET status = 'SUBMITTED', consumer = NULL WHERE id = %s",
               (submitted,))
    db.execute("UPDATE todolist SET consumer = NULL WHERE id = %s", (cleared,))
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")
    with psycopg.connect(database_url) as engine:  # the process engine holds both rows
        engine.execute("SELECT id FROM todolist FOR UPDATE")
        assert storage.claim(agent_orch="a", consumer="c2", limit=2, lease_seconds=60,
                             max_claims=3) == []
    claims = storage.claim(agent_orch="a", consumer="c2", limit=2, lease_seconds=60,
                           max_claims=3)
    assert [c.todo_id for c in claims] == [cleared], "claimed again: its step is in progress"
    state = db.execute("SELECT draft_status::text AS s FROM todolist WHERE id = %s",
                       (submitted,)).fetchone()["s"]
    assert state == "CANCELLED", "settled as 13b says, not left STARTED"


def test_console_turnaround_on_the_platforms_start_date_ignores_the_sessions_time_zone(
        upstream_database_url):
    """The platform's start_date is a timestamp without time zone holding UTC: the console's
    time from start to outcome is the same in a session of another TimeZone (Asia/Seoul).
    Before, the subtraction read start_date in the session's zone: 9 hours off there."""
    with psycopg.connect(upstream_database_url, autocommit=True) as conn:
        todo_id = conn.execute("SELECT processgpt_sync_enqueue_v1('a', 'q')").fetchone()[0]
        conn.execute("UPDATE todolist SET draft_status = 'COMPLETED', start_date = "
                     "(now() AT TIME ZONE 'UTC') - interval '2 seconds' WHERE id = %s",
                     (todo_id,))
        conn.execute("SET TimeZone = 'Asia/Seoul'")
        (activity,) = conn.execute("SELECT processgpt_sync_console_activity_v1('a')").fetchone()
    (bucket,) = activity["buckets"]
    assert 1.5 <= bucket["turnaround_seconds"] <= 60, bucket
