-- processgpt-sync schema: the ProcessGPT tables this library touches, plus its lease and server
-- registry tables.
--
-- Idempotent: running it again changes nothing. On an existing ProcessGPT database it only adds
-- what is missing (enum types, columns, the lease table, indexes); it never rewrites data and
-- never changes the type of a column that already exists (init-db stops if it would). The shapes
-- below serve fresh databases; where the platform's own DDL differs (todolist.id and events.id
-- without defaults, start_date without time zone, ...) the functions work with either.
-- Apply with `processgpt-sync init-db`, or paste it into the Supabase SQL editor before
-- functions.sql. Needs PostgreSQL 13 or newer (gen_random_uuid is built in).


-- Enums, created only when absent (ProcessGPT installs already have them).
DO $$
BEGIN
    IF to_regtype('todo_status') IS NULL THEN
        CREATE TYPE todo_status AS ENUM
            ('NEW', 'TODO', 'IN_PROGRESS', 'SUBMITTED', 'PENDING', 'DONE', 'CANCELLED');
    END IF;
    IF to_regtype('agent_mode') IS NULL THEN
        CREATE TYPE agent_mode AS ENUM ('DRAFT', 'COMPLETE');
    END IF;
    IF to_regtype('draft_status') IS NULL THEN
        CREATE TYPE draft_status AS ENUM
            ('STARTED', 'CANCELLED', 'COMPLETED', 'FB_REQUESTED', 'HUMAN_ASKED', 'FAILED');
    END IF;
    IF to_regtype('event_type_enum') IS NULL THEN
        CREATE TYPE event_type_enum AS ENUM
            ('task_started', 'task_completed', 'tool_usage_started', 'tool_usage_finished',
             'crew_completed', 'human_asked', 'human_response', 'human_checked', 'task_working',
             'error', 'waiting_for_user', 'task_cancelled', 'human_feedback_submitted');
    END IF;
    IF to_regtype('event_status') IS NULL THEN
        CREATE TYPE event_status AS ENUM ('ASKED', 'APPROVED', 'REJECTED');
    END IF;
END
$$;

-- Databases installed from older ProcessGPT files have fewer event types (no task_working,
-- task_cancelled, ...) than this library writes: add the missing labels, as the platform's own
-- migration does. Adding a label changes nothing that exists.
DO $$
DECLARE
    v_label text;
BEGIN
    FOREACH v_label IN ARRAY ARRAY[
            'task_started', 'task_completed', 'tool_usage_started', 'tool_usage_finished',
            'crew_completed', 'human_asked', 'human_response', 'human_checked', 'task_working',
            'error', 'waiting_for_user', 'task_cancelled', 'human_feedback_submitted'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_enum
                       WHERE enumtypid = 'event_type_enum'::regtype AND enumlabel = v_label) THEN
            EXECUTE format('ALTER TYPE event_type_enum ADD VALUE %L', v_label);
        END IF;
    END LOOP;
END
$$;

-- Read-only context tables (owned by ProcessGPT; minimal shapes for fresh databases).
CREATE TABLE IF NOT EXISTS tenants (
    id text PRIMARY KEY,
    mcp jsonb
);

CREATE TABLE IF NOT EXISTS users (
    id uuid NOT NULL,
    tenant_id text NOT NULL,
    username text,
    email text,
    is_agent boolean DEFAULT false,
    role text,
    goal text,
    persona text,
    tools text,
    profile text,
    model text,
    endpoint text,
    tool_priority jsonb,
    PRIMARY KEY (id, tenant_id)
);

CREATE TABLE IF NOT EXISTS form_def (
    id text NOT NULL,
    tenant_id text,
    fields_json jsonb,
    html text,
    proc_def_id text,
    activity_id text
);

CREATE TABLE IF NOT EXISTS proc_inst_source (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    proc_inst_id text,
    file_name text,
    file_path text,
    created_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS todolist (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid()
);

-- Every column the library reads or writes; added one by one so an older table is upgraded.
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS user_id text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS proc_inst_id text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS root_proc_inst_id text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS activity_name text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS tool text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS tenant_id text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS description text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS query text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS status todo_status;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS agent_mode agent_mode;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS agent_orch text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS draft jsonb;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS output jsonb;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS feedback jsonb;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS draft_status draft_status;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS consumer text;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS start_date timestamptz DEFAULT now();
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS updated_at timestamptz DEFAULT now();
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS log text;
-- Added by processgpt-sync: claims in the current run cycle, and the fencing token of the claim.
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS claim_count integer NOT NULL DEFAULT 0;
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS claim_token uuid;
-- Shared with upstream agents (process-gpt-agent-sdk 0.11 adds both claim_count and this): their
-- lease. processgpt-sync leases live in processgpt_sync_lease, and its claims set this to NULL,
-- which upstream workers read as a claim they must never take over.
ALTER TABLE todolist ADD COLUMN IF NOT EXISTS lease_until timestamptz;

CREATE TABLE IF NOT EXISTS events (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text
);
ALTER TABLE events ADD COLUMN IF NOT EXISTS job_id text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS todo_id text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS proc_inst_id text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS crew_type text;
ALTER TABLE events ADD COLUMN IF NOT EXISTS event_type event_type_enum;
ALTER TABLE events ADD COLUMN IF NOT EXISTS data jsonb;
ALTER TABLE events ADD COLUMN IF NOT EXISTS status event_status;
ALTER TABLE events ADD COLUMN IF NOT EXISTS "timestamp" timestamptz DEFAULT now();
-- The todo's tenant, so tenant-filtered views of the UI show the event (the platform's default
-- reads the caller's JWT, which a service-role or direct connection does not have).
ALTER TABLE events ADD COLUMN IF NOT EXISTS tenant_id text;

-- Events are read by todo. ProcessGPT databases index that already (idx_events_todo_id): a
-- second index would only slow every event write, so ours is made only where none exists (and
-- dropped where an earlier version added it beside the platform's).
DO $$
DECLARE
    v_others boolean := EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'events'::regclass AND a.attname = 'todo_id'
          AND i.indpred IS NULL AND i.indexprs IS NULL AND c.relname <> 'events_todo_id_idx');
BEGIN
    IF v_others THEN
        DROP INDEX IF EXISTS events_todo_id_idx;
    ELSE
        CREATE INDEX IF NOT EXISTS events_todo_id_idx ON events (todo_id);
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS events_job_id_idx ON events (job_id);

-- Leases live beside todolist so heartbeats never rewrite todolist rows (ProcessGPT has update
-- triggers there). One row per claimed todo; its token fences every write of the claim.
CREATE TABLE IF NOT EXISTS processgpt_sync_lease (
    todo_id uuid PRIMARY KEY,
    claim_token uuid NOT NULL,
    consumer text NOT NULL,
    expires_at timestamptz NOT NULL,
    prev_draft_status draft_status,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
-- The claim call that made the lease (its caller's id): a call that got no answer is named in
-- the heartbeat, which gives its todos back.
ALTER TABLE processgpt_sync_lease ADD COLUMN IF NOT EXISTS claim_call uuid;
-- The run of the server that made it: a new run under the same consumer name gives back the
-- leases of the runs before it.
ALTER TABLE processgpt_sync_lease ADD COLUMN IF NOT EXISTS instance text;
-- Given back while its todo row could not be written (another transaction held its process
-- instance): expired at once, claimable as the state it was claimed from (release_v2).
ALTER TABLE processgpt_sync_lease ADD COLUMN IF NOT EXISTS given_back boolean NOT NULL
    DEFAULT false;
CREATE INDEX IF NOT EXISTS processgpt_sync_lease_expires_idx ON processgpt_sync_lease (expires_at);

-- A deleted todo takes its lease with it (the cascade runs with the table owner's rights, so the
-- UI deleting a todo needs no right on the lease table). Needs a unique todolist.id, as
-- ProcessGPT has; lease rows of todos deleted before this constraint existed are removed.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'processgpt_sync_lease_todo_fk'
                     AND conrelid = 'processgpt_sync_lease'::regclass)
       AND EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                       ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                   WHERE i.indrelid = 'todolist'::regclass AND i.indisunique
                     AND i.indnkeyatts = 1 AND a.attname = 'id' AND i.indpred IS NULL) THEN
        DELETE FROM processgpt_sync_lease l
        WHERE NOT EXISTS (SELECT 1 FROM todolist t WHERE t.id = l.todo_id);
        ALTER TABLE processgpt_sync_lease ADD CONSTRAINT processgpt_sync_lease_todo_fk
            FOREIGN KEY (todo_id) REFERENCES todolist (id) ON DELETE CASCADE;
    END IF;
END
$$;

-- Serving processes: one row per server, refreshed by its heartbeat (the same call that renews
-- its leases), deleted when it stops cleanly. A row whose last_seen is older than three
-- heartbeats belongs to a server that is dead, stalled or cut off from the database.
CREATE TABLE IF NOT EXISTS processgpt_sync_server (
    consumer text PRIMARY KEY,
    agent_orch text NOT NULL,
    host text,
    pid integer,
    version text,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    heartbeat_seconds real NOT NULL DEFAULT 15,
    running integer NOT NULL DEFAULT 0,
    completed bigint NOT NULL DEFAULT 0,
    stats jsonb NOT NULL DEFAULT '{}'::jsonb
);
ALTER TABLE processgpt_sync_server ADD COLUMN IF NOT EXISTS instance text;

-- Server runs that stopped cleanly or that a newer run under the same consumer name superseded
-- (kept a day). A heartbeat the network delivers after its run ended must not bring the row
-- back, as a dead server, nor touch the leases of the run that has the name now.
CREATE TABLE IF NOT EXISTS processgpt_sync_server_stopped (
    instance text PRIMARY KEY,
    stopped_at timestamptz NOT NULL DEFAULT now()
);

-- Answers that came while another transaction held their todo's row (or its process
-- instance's): the answer trigger does not keep the UI's insert waiting for it, and lists the
-- todo here instead (through list_held_answer_v1: no other role has rights on the table).
-- Heartbeats (and Supabase servers' waits for work) requeue a listed todo once its row is free.
CREATE TABLE IF NOT EXISTS processgpt_sync_answer_held (
    todo_id uuid PRIMARY KEY,
    listed_at timestamptz NOT NULL DEFAULT now()
);

-- Open consoles. The change triggers send their NOTIFY only while a console watches: a NOTIFY
-- holds a cluster-wide lock until its transaction commits, which would serialise every claim
-- and finish of every server. Each console refreshes its row; the row of one that died expires.
-- Readable by every role (the triggers run as the role writing todolist and events).
CREATE TABLE IF NOT EXISTS processgpt_sync_console_watch (
    console text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

-- Supabase grants new public tables to anon and authenticated by default: take that back.
DO $$
DECLARE
    r text;
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['processgpt_sync_server', 'processgpt_sync_server_stopped',
                             'processgpt_sync_console_watch', 'processgpt_sync_answer_held'] LOOP
        FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('REVOKE ALL ON %I FROM %I', t, r);
            END IF;
        END LOOP;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE format('GRANT ALL ON %I TO service_role', t);
        END IF;
    END LOOP;
    GRANT SELECT ON processgpt_sync_console_watch TO PUBLIC;
END
$$;

-- Waiting todos only (queued, or answered / sent back for revision) of steps in progress:
-- running and finished rows stay out, so a claim never walks past the todos in flight to reach
-- the next one, nor past the agent todos that ended without an agent run (completed by a
-- person, their process cancelled), which keep draft_status NULL for good, nor past revisions
-- of steps the process has not reached or has taken. Abandoned claims are found from their
-- expired leases instead (processgpt_sync_lease_expires_idx).
-- One index serves oldest-first claims, one the tenants' turns of fair claims (a skip scan over
-- tenants, then each tenant's oldest todos). Old installs have an enum agent_orch, whose cast to
-- text cannot be indexable: index by date only there.
-- Upstream workers' claims by the end of their lease (they set lease_until; this library never
-- does), indexed the same way: one probe per claim finds any that ran out and can be settled
-- or claimed here (status IN_PROGRESS or CANCELLED; others, e.g. a todo the UI finished
-- meanwhile, never count).
DROP INDEX IF EXISTS todolist_processgpt_sync_claim_idx;  -- before HUMAN_ASKED was reclaimable
DROP INDEX IF EXISTS todolist_processgpt_sync_claimable_idx;  -- held running todos too
DROP INDEX IF EXISTS todolist_processgpt_sync_fair_idx;  -- held running todos too
DROP INDEX IF EXISTS todolist_processgpt_sync_upstream_lease_idx;  -- counted every status
DROP INDEX IF EXISTS todolist_processgpt_sync_waiting_idx;  -- held todos that never run again
DROP INDEX IF EXISTS todolist_processgpt_sync_waiting_fair_idx;  -- the same
DROP INDEX IF EXISTS todolist_processgpt_sync_queued_idx;  -- held revisions of steps not in
DROP INDEX IF EXISTS todolist_processgpt_sync_queued_fair_idx;  -- progress, which never run
DO $$
BEGIN
    IF (SELECT data_type FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'todolist'
          AND column_name = 'agent_orch') = 'text' THEN
        CREATE INDEX IF NOT EXISTS todolist_processgpt_sync_ready_idx
            ON todolist (agent_orch, start_date, id)
            WHERE status = 'IN_PROGRESS'
              AND (draft_status IS NULL OR draft_status = 'FB_REQUESTED');
        CREATE INDEX IF NOT EXISTS todolist_processgpt_sync_ready_fair_idx
            ON todolist (agent_orch, (coalesce(tenant_id, '')), start_date, id)
            WHERE status = 'IN_PROGRESS'
              AND (draft_status IS NULL OR draft_status = 'FB_REQUESTED');
        CREATE INDEX IF NOT EXISTS todolist_processgpt_sync_upstream_expiry_idx
            ON todolist (agent_orch, lease_until)
            WHERE draft_status = 'STARTED' AND lease_until IS NOT NULL
              AND status IN ('IN_PROGRESS', 'CANCELLED');
    ELSE
        CREATE INDEX IF NOT EXISTS todolist_processgpt_sync_ready_idx
            ON todolist (start_date, id)
            WHERE status = 'IN_PROGRESS'
              AND (draft_status IS NULL OR draft_status = 'FB_REQUESTED');
        CREATE INDEX IF NOT EXISTS todolist_processgpt_sync_upstream_expiry_idx
            ON todolist (lease_until)
            WHERE draft_status = 'STARTED' AND lease_until IS NOT NULL
              AND status IN ('IN_PROGRESS', 'CANCELLED');
    END IF;
END
$$;

-- ProcessGPT notifications (the platform's shape): a question to a human creates one.
CREATE TABLE IF NOT EXISTS notifications (
    id uuid PRIMARY KEY,
    user_id text,
    tenant_id text,
    title text,
    description text,
    type text,
    url text,
    from_user_id text,
    consumer text,
    is_checked boolean DEFAULT false,
    time_stamp timestamptz DEFAULT now()
);
