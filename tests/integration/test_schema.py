"""schema.sql + functions.sql: idempotent, and an upgrade that keeps ProcessGPT data intact."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg.rows import dict_row

import processgpt_sync as ps
from processgpt_sync.storage.install import install_schema
from processgpt_sync.storage.postgres import PostgresStorage

CATALOG = """
SELECT 'column' AS kind, table_name || '.' || column_name || ':' || data_type AS item
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL SELECT 'function', p.oid::regprocedure::text || md5(p.prosrc)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
UNION ALL SELECT 'index', indexname || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL SELECT 'type', t.typname || ':' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
  FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname
UNION ALL SELECT 'trigger', tgname FROM pg_trigger WHERE NOT tgisinternal
ORDER BY 1, 2
"""


def snapshot(url):
    with psycopg.connect(url) as conn:
        return conn.execute(CATALOG).fetchall()


def test_schema_is_idempotent(empty_database_url):
    install_schema(empty_database_url)
    first = snapshot(empty_database_url)
    install_schema(empty_database_url)
    assert snapshot(empty_database_url) == first
    assert any(kind == "function" and "processgpt_sync_claim_v1" in item for kind, item in first)


OLD_PROCESSGPT = """
CREATE TYPE todo_status AS ENUM
  ('NEW','TODO','IN_PROGRESS','SUBMITTED','PENDING','DONE','CANCELLED');
CREATE TYPE agent_mode AS ENUM ('DRAFT','COMPLETE');
CREATE TYPE draft_status AS ENUM
  ('STARTED','CANCELLED','COMPLETED','FB_REQUESTED','HUMAN_ASKED','FAILED');
CREATE TYPE agent_orch AS ENUM ('crewai-action','a2a');
CREATE TYPE event_type_enum AS ENUM ('task_started','task_completed','tool_usage_started',
  'tool_usage_finished','crew_completed','human_asked','human_response','human_checked',
  'task_working','error','waiting_for_user','task_cancelled','human_feedback_submitted');
CREATE TABLE todolist (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id text, proc_inst_id text,
  activity_name text, status todo_status, agent_mode agent_mode, agent_orch agent_orch,
  description text, draft jsonb, output jsonb, draft_status draft_status, consumer text,
  start_date timestamptz DEFAULT now(), tenant_id text, extra_platform_column text);
CREATE TABLE events (id text PRIMARY KEY, job_id text NOT NULL, todo_id text,
  event_type event_type_enum NOT NULL, data jsonb NOT NULL, "timestamp" timestamptz DEFAULT now());
INSERT INTO todolist (status, agent_mode, agent_orch, description, draft_status, output,
                      extra_platform_column)
VALUES ('SUBMITTED', 'COMPLETE', 'a2a', 'old finished', 'COMPLETED', '{"kept": true}', 'x'),
       ('IN_PROGRESS', 'COMPLETE', 'crewai-action', 'waiting work', NULL, NULL, 'y');
INSERT INTO events (id, job_id, todo_id, event_type, data)
VALUES ('e1', 'j1', 't1', 'task_started', '"old"');
"""


def test_upgrade_of_an_existing_processgpt_database_keeps_its_data(empty_database_url):
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(OLD_PROCESSGPT)
    install_schema(empty_database_url)
    with psycopg.connect(empty_database_url, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT description, output, draft_status::text, claim_count, "
                            "extra_platform_column, agent_orch::text FROM todolist "
                            "ORDER BY description").fetchall()
        assert rows == [
            {"description": "old finished", "output": {"kept": True}, "draft_status": "COMPLETED",
             "claim_count": 0, "extra_platform_column": "x", "agent_orch": "a2a"},
            {"description": "waiting work", "output": None, "draft_status": None,
             "claim_count": 0, "extra_platform_column": "y", "agent_orch": "crewai-action"},
        ]
        assert conn.execute("SELECT data FROM events").fetchall() == [{"data": "old"}]
    # The enum-typed agent_orch of old installs is served like text.
    store = PostgresStorage(empty_database_url)
    try:
        store.check_schema()
        claims = store.claim(agent_orch="crewai-action", consumer="w", limit=5,
                             lease_seconds=60, max_claims=3)
        assert [c.row["description"] for c in claims] == ["waiting work"]
        (claim,) = claims
        event = {"todo_id": claim.todo_id, "token": claim.token, "event_type": "task_working",
                 "data": {"step": 1}, "job_id": "j2", "crew_type": "action"}
        assert store.record_events([{**event, "id": "e2"}]) == []
        (done,) = store.finish([{"todo_id": claim.todo_id, "token": claim.token,
                                 "outcome": "completed", "result": {"done": 1},
                                 "events": [{**event, "data": {"step": 2}}]}])
        assert done.applied
    finally:
        store.close()
    with psycopg.connect(empty_database_url) as conn:
        written = conn.execute("SELECT job_id, event_type::text, data, crew_type FROM events "
                               "WHERE todo_id <> 't1' ORDER BY timestamp").fetchall()
    assert written == [("j2", "task_working", {"step": 1}, "action"),
                       ("j2", "task_working", {"step": 2}, "action"),
                       ("CREW_FINISHED", "crew_completed", {}, "crew")]


def test_an_upgrade_replaces_the_claim_indexes_of_earlier_versions_and_says_so(database_url):
    """Earlier claim indexes held running todos too; the install drops them (only its own) and
    reports it, and a second install changes nothing."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""CREATE INDEX todolist_processgpt_sync_claimable_idx
                        ON todolist (agent_orch, start_date, id)
                        WHERE draft_status IS NULL
                           OR draft_status IN ('FB_REQUESTED', 'STARTED', 'HUMAN_ASKED')""")
    changes: list[str] = []
    install_schema(database_url, added=changes)
    assert changes == ["drop index todolist_processgpt_sync_claimable_idx"]
    with psycopg.connect(database_url) as conn:
        names = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'todolist'")}
    assert "todolist_processgpt_sync_claimable_idx" not in names
    assert "todolist_processgpt_sync_ready_idx" in names
    install_schema(database_url, added=changes)
    assert changes == []


def test_an_install_drops_the_pre_release_look_at_held_answers(database_url):
    """A database that ran a pre-release install keeps no zero-argument look at held answers
    beside the one the servers call."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION processgpt_sync_take_held_answers_v1() RETURNS integer "
                     "LANGUAGE sql AS 'SELECT 0'")
    changes: list[str] = []
    install_schema(database_url, added=changes)
    assert changes == ["drop function processgpt_sync_take_held_answers_v1()"]
    with psycopg.connect(database_url) as conn:
        forms = [r[0] for r in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc "
            "WHERE proname = 'processgpt_sync_take_held_answers_v1'")]
    assert forms == ["processgpt_sync_take_held_answers_v1(real)"]


OLDER_EVENT_TYPES = ("task_started", "task_completed", "tool_usage_started",
                     "tool_usage_finished", "crew_completed", "human_asked", "human_response",
                     "error")  # the platform's migration.sql creates only these when absent


def test_init_db_adds_the_event_types_an_older_platform_install_lacks(empty_database_url):
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("DROP TYPE IF EXISTS event_type_enum CASCADE")
        conn.execute(psycopg.sql.SQL("CREATE TYPE event_type_enum AS ENUM ({})").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Literal, OLDER_EVENT_TYPES))))
    added: list[str] = []
    install_schema(empty_database_url, added=added)
    new = {"human_checked", "task_working", "waiting_for_user", "task_cancelled",
           "human_feedback_submitted"}
    assert {f"add enum value event_type_enum.{label}" for label in new} <= set(added)
    store = PostgresStorage(empty_database_url)
    try:
        assert new <= store.event_types()
    finally:
        store.close()


def test_a_server_refuses_a_database_without_the_event_types_it_writes(database_url):
    """A database installed from older platform files, without init-db: refused at start
    with the fix, rather than failing todos when a progress event or an a2a cancel is
    written; init-db adds the labels and the server starts."""
    import pytest

    import processgpt_sync as ps

    with psycopg.connect(database_url, autocommit=True) as conn:  # as an older install
        conn.execute("DELETE FROM pg_enum WHERE enumtypid = 'event_type_enum'::regtype "
                     "AND enumlabel IN ('task_working', 'task_cancelled')")
    server = ps.Server(lambda todo: {}, ps.Settings(agent_orch="a", database_url=database_url))
    with pytest.raises(ps.SchemaMissing) as refused:
        server.start()
    assert str(refused.value).startswith(
        "events.event_type lacks task_cancelled, task_working, which this library writes")
    assert "processgpt-sync init-db" in str(refused.value)
    install_schema(database_url)
    server.start()
    server.stop()


def test_init_db_keeps_one_index_on_events_todo_id_beside_the_platforms(platform_database_url):
    """The platform indexes events(todo_id) as idx_events_todo_id: init-db adds no second
    one, and drops the duplicate an earlier version added; a fresh database gets ours."""
    def todo_id_indexes(url):
        with psycopg.connect(url) as conn:
            return sorted(r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'events' "
                "AND indexdef LIKE '%(todo_id)'"))

    added: list[str] = []
    install_schema(platform_database_url, added=added)
    assert todo_id_indexes(platform_database_url) == ["idx_events_todo_id"]
    assert not any("events_todo_id_idx" in line for line in added)
    with psycopg.connect(platform_database_url, autocommit=True) as conn:  # an earlier install's
        conn.execute("CREATE INDEX events_todo_id_idx ON events (todo_id)")
    install_schema(platform_database_url, added=added)
    assert added == ["drop index events_todo_id_idx"]
    assert todo_id_indexes(platform_database_url) == ["idx_events_todo_id"]


def test_a_fresh_database_gets_its_index_on_events_todo_id(database_url):
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('events_todo_id_idx') IS NOT NULL").fetchone()[0]


def test_an_install_tells_postgrest_to_reload_its_schema_cache_and_a_dry_run_does_not(
        empty_database_url):
    """Supabase's REST API finds the functions init-db added only once PostgREST reloads its
    schema cache: the install asks it to (``NOTIFY pgrst``), when it commits."""
    with psycopg.connect(empty_database_url, autocommit=True) as listener:
        listener.execute("LISTEN pgrst")
        install_schema(empty_database_url, dry_run=True)
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
        install_schema(empty_database_url)
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == [
            "reload schema"]


def test_an_install_waiting_on_another_installer_gives_up_in_bounded_time_saying_why(
        database_url, monkeypatch):
    """Another install holds the schema lock and does not end (its client went silent
    mid-way): the next one waits a bounded time per attempt and, after its attempts, says
    what holds it up, rather than waiting for ever."""
    from processgpt_sync.storage import install

    monkeypatch.setattr(install, "INSTALL_WAIT_FOR_OTHER", 2)
    with psycopg.connect(database_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(hashtext('processgpt_sync_schema'))")
        began = time.monotonic()
        with pytest.raises(ps.StorageUnavailable,
                           match="another schema install has held the schema lock for 2s"):
            install_schema(database_url)
        took = time.monotonic() - began
    assert took < 10, took
