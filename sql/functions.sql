-- processgpt-sync functions: the whole hot-path contract shared by the Postgres, embedded and
-- Supabase backends (Supabase calls them through `rpc(name, params)` with the same argument names).
--
-- Every name carries the prefix `processgpt_sync_` and a version suffix; a signature change means
-- a new `_v2`, never an edit in place. Idempotent: apply after schema.sql, as often as you like.
--
-- Fencing: a claim stamps `todolist.claim_token`; every write passes that token and is refused
-- unless the row still carries it and is still running. The token stays on the row after the
-- final write, so a retried final write (after an ambiguous network error) is recognised.

CREATE OR REPLACE FUNCTION processgpt_sync_uuid_or_null_v1(p_text text)
RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_text ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN p_text::uuid
    END
$$;

-- Why this run happens: fresh, reclaim (a previous owner's lease expired, also while it waited
-- for an answer), human_answer (with the answered question's job_id), revision.
CREATE OR REPLACE FUNCTION processgpt_sync_resume_v1(
    p_prev_status draft_status, p_claim_count integer, p_feedback jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    WITH last AS (
        SELECT CASE WHEN jsonb_typeof(p_feedback) = 'array' AND jsonb_array_length(p_feedback) > 0
                    THEN p_feedback -> -1 END AS item
    )
    SELECT jsonb_build_object(
        'kind', CASE
            WHEN p_prev_status IN ('STARTED', 'HUMAN_ASKED') THEN 'reclaim'
            WHEN jsonb_typeof(last.item) = 'object' AND last.item ->> 'kind' = 'human_answer'
                THEN 'human_answer'
            WHEN last.item IS NOT NULL THEN 'revision'
            ELSE 'fresh'
        END,
        'attempt', p_claim_count,
        'answer', CASE WHEN jsonb_typeof(last.item) = 'object' THEN last.item -> 'content' END,
        'job_id', CASE WHEN jsonb_typeof(last.item) = 'object' THEN last.item ->> 'job_id' END)
    FROM last
$$;

-- Context extras for one todo, from its own tenant only (agents, humans, form, MCP, sources).
-- plpgsql so its plans are cached; lookups a todo does not need are skipped. The keys are a
-- superset of process-gpt-agent-sdk 0.11's context (same names and types: notify_user_emails
-- is a comma-separated string, form_id and form_fields fall back to a free-form field,
-- summarized_feedback is the latest feedback's text); notify_emails is our list form.
CREATE OR REPLACE FUNCTION processgpt_sync_context_v1(p_todo todolist, p_resume jsonb)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ids uuid[];
    v_agents jsonb := '[]'::jsonb;
    v_users jsonb := '[]'::jsonb;
    v_emails jsonb := '[]'::jsonb;
    v_form_id text;
    v_fields jsonb;
    v_html text;
    v_mcp jsonb;
    v_sources jsonb := '[]'::jsonb;
    v_proc text := coalesce(p_todo.root_proc_inst_id, p_todo.proc_inst_id);
    v_last jsonb := CASE WHEN jsonb_typeof(p_todo.feedback) = 'array'
                         THEN p_todo.feedback -> -1 END;
    v_feedback jsonb;
BEGIN
    IF coalesce(p_todo.user_id, '') <> '' THEN
        SELECT array_agg(DISTINCT processgpt_sync_uuid_or_null_v1(trim(x))) INTO v_ids
        FROM unnest(string_to_array(p_todo.user_id, ',')) AS x;
        -- An agent's row is its configuration (persona, tools, model): all of it but a push
        -- token. Of a person, only who they are: the platform's users rows also hold device
        -- tokens, admin flags and activity times, which are no executor's business.
        SELECT coalesce(jsonb_agg(to_jsonb(u) - 'device_token' ORDER BY u.username)
                        FILTER (WHERE u.is_agent), '[]'::jsonb),
               coalesce(jsonb_agg((SELECT jsonb_object_agg(f.key, f.value)
                                   FROM jsonb_each(to_jsonb(u)) AS f
                                   WHERE f.key IN ('id', 'tenant_id', 'username', 'email', 'role',
                                                   'profile'))
                                  ORDER BY u.username)
                        FILTER (WHERE NOT coalesce(u.is_agent, false)), '[]'::jsonb),
               coalesce(jsonb_agg(DISTINCT u.email)
                        FILTER (WHERE NOT coalesce(u.is_agent, false) AND u.email IS NOT NULL),
                        '[]'::jsonb)
        INTO v_agents, v_users, v_emails
        FROM users u
        WHERE u.id = ANY (v_ids) AND u.tenant_id IS NOT DISTINCT FROM p_todo.tenant_id;
    END IF;
    IF p_todo.tool LIKE 'formHandler:%' THEN
        v_form_id := substr(p_todo.tool, 13);
        SELECT f.fields_json, f.html INTO v_fields, v_html FROM form_def f
        WHERE f.id = v_form_id AND f.tenant_id IS NOT DISTINCT FROM p_todo.tenant_id LIMIT 1;
    END IF;
    IF v_fields IS NULL OR v_fields IN ('null'::jsonb, '[]'::jsonb) THEN
        v_form_id := coalesce(nullif(v_form_id, ''), nullif(p_todo.tool, ''), 'freeform');
        v_fields := '[{"key": "freeform", "type": "textarea", "text": "Free-form input",
                       "placeholder": "Write anything"}]'::jsonb;
    END IF;
    v_feedback := CASE WHEN jsonb_typeof(v_last) = 'object' THEN v_last -> 'content' ELSE v_last END;
    IF p_todo.tenant_id IS NOT NULL THEN
        SELECT t.mcp INTO v_mcp FROM tenants t WHERE t.id = p_todo.tenant_id;
    END IF;
    IF v_proc IS NOT NULL THEN
        SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.created_at), '[]'::jsonb) INTO v_sources
        FROM proc_inst_source s WHERE s.proc_inst_id = v_proc;
    END IF;
    RETURN jsonb_build_object(
        'agents', v_agents, 'users', v_users, 'notify_emails', v_emails,
        'form_id', v_form_id, 'form_fields', v_fields, 'form_html', v_html,
        'tenant_mcp', v_mcp, 'sources', v_sources, 'resume', p_resume,
        'id', p_todo.id, 'proc_inst_id', v_proc, 'root_proc_inst_id', p_todo.root_proc_inst_id,
        'activity_name', p_todo.activity_name, 'request_kind', 'process',
        'notify_user_emails', (SELECT coalesce(string_agg(e, ',' ORDER BY e), '')
                               FROM jsonb_array_elements_text(v_emails) AS e),
        'summarized_feedback', CASE
            WHEN v_feedback IS NULL OR v_feedback = 'null'::jsonb THEN ''
            WHEN jsonb_typeof(v_feedback) = 'string' THEN v_feedback #>> '{}'
            ELSE v_feedback::text END);
END
$$;

-- The platform's trigger on todolist (trigger_update_bpm_proc_inst_updated_at) touches the
-- todo's bpm_proc_inst row on every update, in whatever order a batch's plan visits its todos,
-- and its trigger on bpm_proc_inst (trigger_update_project_updated_at) touches the instance's
-- project, a row many instances share; two batches of todos sharing process instances or
-- projects then deadlock, each waiting deadlock_timeout (1 s by default) before one is aborted.
-- So a batch takes its todos' rows (sorted by id; with p_skip_locked, only those no other
-- transaction holds), then their process instances' rows (sorted), then those instances'
-- projects (sorted), before it updates: every transaction takes them in one order, todos first
-- as a single-row write does. Returns the todos held, or NULL where nothing needs it: one todo
-- given back, or no bpm_proc_inst table.
-- With p_skip_locked (a claim, a batch of outcomes) the process instances, then the projects,
-- are taken one by one in order, waiting at most p_wait_ms in all (usually the holder is one
-- of ours, a claim or an outcome of a todo of the same instance or project, for a moment); one
-- the BPM engine or a person holds longer leaves its todos out of the answer, so they do not
-- hold up the rest: a claim takes other todos in their place (passing over the instance's
-- other todos, so it is not waited for twice, and waiting for none: those may sort before
-- instances it holds already), a batch of outcomes answers them 'busy' (written later).
CREATE OR REPLACE FUNCTION processgpt_sync_lock_proc_insts_v1(p_todo_ids uuid[],
                                                              p_skip_locked boolean,
                                                              p_wait_ms integer)
RETURNS uuid[] LANGUAGE plpgsql AS $$
DECLARE
    v_held uuid[];
    v_inst text;
    v_project uuid;
    v_left_out text[] := '{}';
    v_deadline timestamptz;
BEGIN
    -- one todo given back alone waits for its instance as any single-row write does
    IF coalesce(cardinality(p_todo_ids), 0) < 2 - p_skip_locked::integer
       OR NOT processgpt_sync_has_proc_insts_v1() THEN
        RETURN NULL;
    END IF;
    IF NOT p_skip_locked THEN
        SELECT coalesce(array_agg(x.id), '{}') INTO v_held FROM (
            SELECT t.id FROM todolist t WHERE t.id = ANY (p_todo_ids)
            ORDER BY t.id FOR UPDATE OF t) x;
        PERFORM 1 FROM bpm_proc_inst p
        WHERE p.proc_inst_id IN (SELECT t.proc_inst_id FROM todolist t
                                 WHERE t.id = ANY (v_held) AND t.proc_inst_id IS NOT NULL)
        ORDER BY p.proc_inst_id
        FOR NO KEY UPDATE OF p;
        IF processgpt_sync_has_projects_v1() THEN
            PERFORM 1 FROM project j
            WHERE j.project_id IN (SELECT p.project_id FROM bpm_proc_inst p
                                   JOIN todolist t ON t.proc_inst_id = p.proc_inst_id
                                   WHERE t.id = ANY (v_held))
            ORDER BY j.project_id
            FOR NO KEY UPDATE OF j;
        END IF;
        RETURN v_held;
    END IF;
    SELECT coalesce(array_agg(x.id), '{}') INTO v_held FROM (
        SELECT t.id FROM todolist t WHERE t.id = ANY (p_todo_ids)
        ORDER BY t.id FOR UPDATE OF t SKIP LOCKED) x;
    v_deadline := clock_timestamp() + make_interval(secs => greatest(p_wait_ms, 0) / 1000.0);
    FOR v_inst IN
        SELECT DISTINCT p.proc_inst_id FROM bpm_proc_inst p
        WHERE p.proc_inst_id IN (SELECT t.proc_inst_id FROM todolist t
                                 WHERE t.id = ANY (v_held) AND t.proc_inst_id IS NOT NULL)
        ORDER BY p.proc_inst_id
    LOOP
        IF NOT processgpt_sync_lock_by_v1(v_inst, NULL, v_deadline) THEN
            v_left_out := v_left_out || v_inst;  -- held longer: its todos are left out
        END IF;
    END LOOP;
    IF processgpt_sync_has_projects_v1() THEN
        -- the projects the trigger would write: rows that exist, and this role sees
        -- (bpm_proc_inst.project_id has no foreign key, and project has row security)
        FOR v_project IN
            SELECT j.project_id FROM project j
            WHERE j.project_id IN (SELECT p.project_id FROM bpm_proc_inst p
                                   JOIN todolist t ON t.proc_inst_id = p.proc_inst_id
                                   WHERE t.id = ANY (v_held)
                                     AND NOT p.proc_inst_id = ANY (v_left_out))
            ORDER BY j.project_id
        LOOP
            IF NOT processgpt_sync_lock_by_v1(NULL, v_project, v_deadline) THEN
                v_left_out := v_left_out || ARRAY(  -- and so are those of its instances
                    SELECT p.proc_inst_id FROM bpm_proc_inst p
                    JOIN todolist t ON t.proc_inst_id = p.proc_inst_id
                    WHERE t.id = ANY (v_held) AND p.project_id = v_project);
            END IF;
        END LOOP;
    END IF;
    IF cardinality(v_left_out) > 0 THEN
        v_held := ARRAY(SELECT t.id FROM todolist t
                        WHERE t.id = ANY (v_held)
                          AND (t.proc_inst_id IS NULL OR NOT t.proc_inst_id = ANY (v_left_out)));
    END IF;
    RETURN v_held;
END
$$;

-- Take one process instance's row (or, with p_proc_inst_id NULL, one project's) for this
-- transaction: at once if no other transaction holds it, else waiting until p_deadline at
-- most. Whether it was taken.
CREATE OR REPLACE FUNCTION processgpt_sync_lock_by_v1(p_proc_inst_id text, p_project_id uuid,
                                                      p_deadline timestamptz)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_wait_ms integer;
    v_lock_timeout text;
BEGIN
    IF p_proc_inst_id IS NOT NULL THEN
        PERFORM 1 FROM bpm_proc_inst p WHERE p.proc_inst_id = p_proc_inst_id
        FOR NO KEY UPDATE OF p SKIP LOCKED;
    ELSE
        PERFORM 1 FROM project j WHERE j.project_id = p_project_id
        FOR NO KEY UPDATE OF j SKIP LOCKED;
    END IF;
    IF FOUND THEN
        RETURN true;
    END IF;
    v_wait_ms := floor(extract(epoch FROM p_deadline - clock_timestamp()) * 1000);
    IF v_wait_ms < 1 THEN
        RETURN false;
    END IF;
    v_lock_timeout := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', v_wait_ms || 'ms', true);
    BEGIN
        IF p_proc_inst_id IS NOT NULL THEN
            PERFORM 1 FROM bpm_proc_inst p WHERE p.proc_inst_id = p_proc_inst_id
            FOR NO KEY UPDATE OF p;
        ELSE
            PERFORM 1 FROM project j WHERE j.project_id = p_project_id FOR NO KEY UPDATE OF j;
        END IF;
    EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
        RETURN false;
    END;
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION processgpt_sync_lock_proc_insts_v1(p_todo_ids uuid[],
                                                              p_skip_locked boolean)
RETURNS uuid[] LANGUAGE sql AS $$  -- a batch of outcomes, a give-back, earlier versions
    SELECT processgpt_sync_lock_proc_insts_v1(p_todo_ids, p_skip_locked, 200)
$$;

-- Of todos this transaction holds, those whose process instance it could take now without
-- waiting (all of them where there are no process instances).
CREATE OR REPLACE FUNCTION processgpt_sync_free_of_held_insts_v1(p_todo_ids uuid[])
RETURNS uuid[] LANGUAGE sql AS $$
    SELECT CASE WHEN cardinality(p_todo_ids) = 0 THEN p_todo_ids
                ELSE coalesce(processgpt_sync_lock_proc_insts_v1(p_todo_ids, true, 0),
                              p_todo_ids) END
$$;

-- Whether this database has the platform's process instances (bpm_proc_inst), which its
-- trigger touches on every update of a todo.
CREATE OR REPLACE FUNCTION processgpt_sync_has_proc_insts_v1()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_attribute a
                   WHERE a.attrelid = to_regclass('bpm_proc_inst') AND a.attname = 'proc_inst_id'
                     AND NOT a.attisdropped)
$$;

-- Whether this database's process instances belong to the platform's projects
-- (bpm_proc_inst.project_id, a uuid naming a row of project), which its trigger on
-- bpm_proc_inst touches on every update of an instance, and the calling role may take their
-- rows (one that may not could not write a todo of a project: the trigger would fail).
CREATE OR REPLACE FUNCTION processgpt_sync_has_projects_v1()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT processgpt_sync_has_proc_insts_v1()
           AND EXISTS (SELECT 1 FROM pg_attribute a
                       WHERE a.attrelid = to_regclass('bpm_proc_inst')
                         AND a.attname = 'project_id' AND a.atttypid = 'uuid'::regtype
                         AND NOT a.attisdropped)
           AND EXISTS (SELECT 1 FROM pg_attribute a
                       WHERE a.attrelid = to_regclass('project')
                         AND a.attname = 'project_id' AND a.atttypid = 'uuid'::regtype
                         AND NOT a.attisdropped)
           AND has_table_privilege(to_regclass('project'), 'SELECT')
           AND has_table_privilege(to_regclass('project'), 'UPDATE')
$$;

-- Whether this database's process instances have the platform's trash (bpm_proc_inst's
-- is_deleted column, which its migration.sql adds to older databases).
CREATE OR REPLACE FUNCTION processgpt_sync_has_trash_v1()
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT processgpt_sync_has_proc_insts_v1()
           AND EXISTS (SELECT 1 FROM pg_attribute a
                       WHERE a.attrelid = to_regclass('bpm_proc_inst')
                         AND a.attname = 'is_deleted' AND NOT a.attisdropped)
$$;

-- Whether a todo's process instance, or the process it runs under (its root), is in the
-- platform's trash (bpm_proc_inst.is_deleted: the UI's delete, which its restore undoes; a cron
-- job deletes it for good 7 days later, with the todos of that instance alone; a subprocess's
-- todos then stay, under a root that is gone, and count as in the trash for good). Its todos wait, as a step out of progress does: never
-- claimed, run again or failed, and claimable again once restored. Defined by what the
-- database has when the schema is installed: without the column, false, which costs the
-- claim nothing; with it, replaced just below. A database that gains the column later needs
-- init-db again (a server's start warns: processgpt_sync_schema_warnings_v1).
CREATE OR REPLACE FUNCTION processgpt_sync_in_trash_v1(p_proc_inst_id text,
                                                       p_root_proc_inst_id text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT false  -- no trash in this database
$$;

-- Whether a subprocess's root was deleted for good (the cron job deletes the root's own todos
-- only): the subprocess is in the trash for good, never restored. Only where the subprocess has
-- its row, so a database that does not record every instance loses nothing. The one rule the
-- claim (in_trash_v1) and the cancel of such todos (cancel_under_gone_roots_v1) share.
CREATE OR REPLACE FUNCTION processgpt_sync_root_gone_v1(p_proc_inst_id text,
                                                        p_root_proc_inst_id text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT false  -- no trash in this database
$$;

DO $$
BEGIN
    IF processgpt_sync_has_trash_v1() THEN
        CREATE OR REPLACE FUNCTION processgpt_sync_root_gone_v1(p_proc_inst_id text,
                                                                p_root_proc_inst_id text)
        RETURNS boolean LANGUAGE sql STABLE AS $f$
            SELECT coalesce(p_root_proc_inst_id <> p_proc_inst_id, false)
                   AND NOT EXISTS (SELECT 1 FROM bpm_proc_inst p
                                   WHERE p.proc_inst_id = p_root_proc_inst_id)
                   AND EXISTS (SELECT 1 FROM bpm_proc_inst p
                               WHERE p.proc_inst_id = p_proc_inst_id)
        $f$;
        CREATE OR REPLACE FUNCTION processgpt_sync_in_trash_v1(p_proc_inst_id text,
                                                               p_root_proc_inst_id text)
        RETURNS boolean LANGUAGE sql STABLE AS $f$
            SELECT EXISTS (SELECT 1 FROM bpm_proc_inst p
                           WHERE p.proc_inst_id IN (p_proc_inst_id, p_root_proc_inst_id)
                             AND p.is_deleted)
                OR processgpt_sync_root_gone_v1(p_proc_inst_id, p_root_proc_inst_id)
        $f$;
    END IF;
END
$$;

-- What a server's start warns of: the platform's trash column added after the install, whose
-- todos the claims then still take (processgpt_sync_in_trash_v1 was defined without it).
CREATE OR REPLACE FUNCTION processgpt_sync_schema_warnings_v1()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(w.text), '[]'::jsonb) FROM (
        SELECT 'bpm_proc_inst.is_deleted (the platform''s trash) was added after processgpt-sync '
               'was installed, so todos of process instances in the trash are still claimed; '
               'run `processgpt-sync init-db` again' AS text
        WHERE processgpt_sync_has_trash_v1()
          AND NOT EXISTS (SELECT 1 FROM pg_proc p
                          WHERE p.oid = to_regprocedure('processgpt_sync_in_trash_v1(text, text)')
                            AND p.prosrc LIKE '%is_deleted%')) w
$$;

-- Whether a todo row's own state lets it be claimed now: queued, answered / revision (unless
-- the UI cancelled it), or abandoned (its claim's lease expired, claims left). The claim
-- (processgpt_sync_is_claimable_v1) also looks at its process instance; the CLI tells a todo
-- that waits only for its instance's restore by this.
CREATE OR REPLACE FUNCTION processgpt_sync_ready_v1(p_todo todolist, p_max_claims integer)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_todo.draft_status IS NULL THEN
            p_todo.status = 'IN_PROGRESS' AND p_todo.agent_mode IN ('DRAFT', 'COMPLETE')
            AND p_todo.draft IS NULL
        WHEN p_todo.status IN ('CANCELLED', 'DONE') THEN false
        -- as upstream's fetch_pending_task: a revision of a step its process has not reached
        -- (TODO, NEW, PENDING) or has taken (SUBMITTED) waits until the step is in progress
        WHEN p_todo.draft_status = 'FB_REQUESTED' THEN coalesce(p_todo.status = 'IN_PROGRESS',
                                                                false)
        -- abandoned: runs again only while its step is in progress (else it waits for the step)
        WHEN p_todo.draft_status IN ('STARTED', 'HUMAN_ASKED') THEN
            coalesce(p_todo.status = 'IN_PROGRESS', false)
            AND (
                -- an upstream worker's claim (they set lease_until; this library never does)
                -- whose lease ran out: abandoned by the upstream SDK's own rule
                (p_todo.draft_status = 'STARTED' AND p_todo.lease_until < now()
                 AND p_todo.claim_count < p_max_claims)
                -- ours: never while an upstream worker holds it (its consumer, its live lease);
                -- a claim given back (see release_v2) is not counted
                OR ((p_todo.lease_until IS NULL OR p_todo.lease_until < now()) AND EXISTS (
                    SELECT 1 FROM processgpt_sync_lease l
                    WHERE l.todo_id = p_todo.id AND l.claim_token = p_todo.claim_token
                      -- (a consumer the platform cleared is no other worker's)
                      AND (p_todo.consumer IS NULL OR p_todo.consumer = l.consumer)
                      AND l.expires_at < now()
                      AND p_todo.claim_count - l.given_back::integer < p_max_claims)))
        ELSE false
    END
$$;

-- Whether a todo row may be claimed now: ready (processgpt_sync_ready_v1), and its process
-- instance not in the trash, where it waits to be restored. The claim scans only rows of the
-- waiting-todo indexes (draft_status NULL, FB_REQUESTED) and the expired leases; this decides.
CREATE OR REPLACE FUNCTION processgpt_sync_is_claimable_v1(p_todo todolist, p_max_claims integer)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT processgpt_sync_ready_v1(p_todo, p_max_claims)
           AND NOT processgpt_sync_in_trash_v1(p_todo.proc_inst_id, p_todo.root_proc_inst_id)
$$;

-- Whether any claim has expired that a claim of p_agent_orch would settle or take: a lease of
-- one of its todos (another agent's are its own claims' to settle; an abandoned claim whose
-- step is out of progress waits, and counts again once the step is), or an upstream worker's
-- claim (lease_until set and past) that can be settled or claimed (status IN_PROGRESS or
-- CANCELLED; one the UI finished meanwhile never counts, or every claim would walk it). One
-- probe of each expiry index.
CREATE OR REPLACE FUNCTION processgpt_sync_claims_expired_v1(p_agent_orch text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM processgpt_sync_lease l JOIN todolist t ON t.id = l.todo_id
                   WHERE l.expires_at < now() AND t.agent_orch::text = p_agent_orch
                     -- not one of ours abandoned while its step is out of progress: it waits
                     -- for the step, as a revision does (settled cancelled once it ends); nor
                     -- one in the trash, which waits to be restored
                     AND NOT (coalesce(t.draft_status IN ('STARTED', 'HUMAN_ASKED'), false)
                              AND t.claim_token IS NOT DISTINCT FROM l.claim_token
                              AND (t.consumer IS NULL OR t.consumer = l.consumer)
                              AND (coalesce(t.status NOT IN ('IN_PROGRESS', 'CANCELLED', 'DONE',
                                                             'SUBMITTED'), true)
                                   OR (t.status = 'IN_PROGRESS' AND processgpt_sync_in_trash_v1(
                                           t.proc_inst_id, t.root_proc_inst_id)))))
        OR EXISTS (SELECT 1 FROM todolist t
                   WHERE t.draft_status = 'STARTED' AND t.lease_until < now()
                     AND t.status IN ('IN_PROGRESS', 'CANCELLED')
                     AND t.agent_orch::text = p_agent_orch
                     AND (t.status = 'CANCELLED'
                          OR NOT processgpt_sync_in_trash_v1(t.proc_inst_id,
                                                             t.root_proc_inst_id)))
$$;

-- Of these todos (whose rows the caller holds), those whose lease, if any, this transaction
-- now holds, in order and without a wait: a lease a late heartbeat holds right now, or
-- renewed since the caller found it run out, is left to a later call. A claim's writes to
-- leases it did not give out must never wait: a heartbeat takes its leases in order, so a wait
-- could close a cycle with it.
CREATE OR REPLACE FUNCTION processgpt_sync_leases_taken_v1(p_todo_ids uuid[])
RETURNS uuid[] LANGUAGE plpgsql AS $$
DECLARE
    v_locked uuid[];
BEGIN
    v_locked := ARRAY(SELECT l.todo_id FROM processgpt_sync_lease l
                      WHERE l.todo_id = ANY (p_todo_ids)
                        -- not a lease a late heartbeat renewed after the caller found it run
                        -- out: its owner runs on (a statement sees what committed before it,
                        -- and a lock taken after a commit reads the row again)
                        AND NOT (l.expires_at >= now() AND NOT l.given_back AND EXISTS (
                            SELECT 1 FROM todolist t
                            WHERE t.id = l.todo_id AND t.claim_token = l.claim_token
                              AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
                              AND (t.consumer IS NULL OR t.consumer = l.consumer)))
                      ORDER BY l.todo_id FOR UPDATE OF l SKIP LOCKED);
    RETURN ARRAY(
        SELECT u.id FROM unnest(p_todo_ids) WITH ORDINALITY AS u(id, n)
        WHERE u.id = ANY (v_locked)
           OR NOT EXISTS (SELECT 1 FROM processgpt_sync_lease l WHERE l.todo_id = u.id)
        ORDER BY u.n);
END
$$;

-- Claim up to p_limit todos for one agent_orch in one call (SKIP LOCKED), each with a lease, a
-- fencing token and its context extras. Expired claims (running, or waiting in a blocking
-- ask_human) are settled first: CANCELLED when the UI cancelled them, FAILED past p_max_claims;
-- the others are claimable again. The life of a todo is specified in docs/todo-life.md.
-- Returns {"claims": [...], "held_back": n}: n > 0 when it left todos for later because another
-- transaction held their process instance (n counts those it tried and the expired claims it
-- could not settle; claimed, or settled, by a later call), or found in the trash once their
-- instance's lock was held (their places then taken by a later call), so the caller claims
-- again soon rather than at its idle poll, which nothing else may bring sooner.
--
-- Order: with p_fair, tenants take turns: a tenant's k-th oldest claimable todo has priority
-- (its running todos + k), lowest first, oldest first on ties; so a tenant with a backlog cannot
-- delay another tenant's first todo by more than the todos already running. Without, oldest
-- first. Todos concurrent claims hold are passed over, the next ones taken in their place. Limits (across every server of the agent_orch, counted from live leases):
-- p_max_running todos at once, p_max_running_per_tenant per tenant; claims of an agent_orch
-- with limits take turns on an advisory lock, so concurrent claims never exceed them.
--
-- The claim commits without waiting for its WAL flush (synchronous_commit off for this
-- transaction only): it is visible at once as ever, and every later synchronous commit (the
-- todo's events and outcome) flushes it first. Only a crash of the database in the first
-- ~200 ms can forget it: the todo is then claimable again and the run's writes are refused by
-- fencing, as when a lease is lost. Its statements keep one generic plan each
-- (plan_cache_mode): a custom plan per call cost more to plan than the claim costs to run.
--
-- p_call names this call (the caller's random id) on each lease it makes: a caller that got no
-- answer reports the call in its heartbeat, which gives back exactly the todos it claimed.
-- p_instance names the caller's run: a run that stopped, or that a newer run under the same
-- consumer name superseded, claims nothing (SQLSTATE PS001 says so). The claim holds its
-- consumer's registry lock shared (claims never wait for each other), so a heartbeat taking the
-- name over waits for a claim already under way and gives its todos back, and a claim arriving
-- during the takeover waits for it and is refused.
-- Claims and every write after them rely on READ COMMITTED (a lock waited for, then the rows as
-- they are now): in a stricter transaction the claim refuses to run (SQLSTATE PS002).
CREATE OR REPLACE FUNCTION processgpt_sync_claim_v4(
    p_agent_orch text,
    p_consumer text,
    p_limit integer,
    p_lease_seconds integer DEFAULT 60,
    p_max_claims integer DEFAULT 3,
    p_tenant_id text DEFAULT NULL,
    p_fair boolean DEFAULT true,
    p_max_running integer DEFAULT NULL,
    p_max_running_per_tenant integer DEFAULT NULL,
    p_call uuid DEFAULT NULL,
    p_instance text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_limit integer := p_limit;
    v_ids uuid[];
    v_held uuid[];
    v_kept uuid[] := '{}';
    v_passed uuid[] := '{}';  -- picked already: kept, or left out for a held process instance
    v_round integer := 0;
    v_wanted uuid[];  -- a round's candidates, where it picks from a list (spares included)
    v_short boolean;  -- a round took fewer than it could: concurrent claims held candidates
    v_claimed jsonb;
    v_expired boolean;
    v_abandoned uuid[] := '{}';
    v_settle uuid[];
    v_groups text[];
    v_held_back integer := 0;  -- todos left for later: their process instance was held
    v_found uuid[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'claims need READ COMMITTED transactions, and this one is %',
            upper(current_setting('transaction_isolation')) USING ERRCODE = 'PS002',
            HINT = format('the database''s or role''s default is stricter; for this role: '
                          'ALTER ROLE %I SET default_transaction_isolation = '
                          '''read committed''', current_user);
    END IF;
    IF p_instance IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared(hashtext('processgpt_sync_server'),
                                             hashtext(p_consumer));
    END IF;
    IF EXISTS (SELECT 1 FROM processgpt_sync_server_stopped WHERE instance = p_instance) THEN
        RAISE EXCEPTION 'server run % was superseded: a newer run took the consumer name %',
            p_instance, p_consumer USING ERRCODE = 'PS001';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RETURN jsonb_build_object('claims', '[]'::jsonb, 'held_back', 0);
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);

    -- Settle expired claims, ours and upstream workers'; usually there are none. Each is
    -- settled only while its process instance is free (no wait: a claim must not hold up every
    -- server's claims for one instance the BPM engine holds); the others at a later claim.
    v_expired := processgpt_sync_claims_expired_v1(p_agent_orch);
    IF v_expired THEN
    -- An upstream worker's claim that ran out after the UI cancelled it: cancelled.
    v_found := ARRAY(
        SELECT u.id FROM todolist u
        WHERE u.draft_status = 'STARTED' AND u.lease_until < now()
          AND u.agent_orch::text = p_agent_orch AND u.status = 'CANCELLED'
        FOR UPDATE OF u SKIP LOCKED);
    v_settle := processgpt_sync_free_of_held_insts_v1(v_found);
    v_held_back := v_held_back + cardinality(v_found) - cardinality(v_settle);
    UPDATE todolist t SET draft_status = 'CANCELLED', consumer = NULL, lease_until = NULL,
                          updated_at = now()
    WHERE t.id = ANY (v_settle);
    v_found := ARRAY(
        SELECT t.id FROM todolist t
        JOIN processgpt_sync_lease l ON l.todo_id = t.id AND l.claim_token = t.claim_token
        WHERE l.expires_at < now() AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
          AND t.agent_orch::text = p_agent_orch
          AND (t.status IN ('CANCELLED', 'DONE')
               -- submitted by someone else while it ran; not while a platform worker
               -- completes the step (its consumer on the row)
               OR (t.status = 'SUBMITTED' AND (t.consumer IS NULL OR t.consumer = l.consumer)))
        FOR UPDATE OF t SKIP LOCKED);
    v_settle := processgpt_sync_leases_taken_v1(processgpt_sync_free_of_held_insts_v1(v_found));
    v_held_back := v_held_back + cardinality(v_found) - cardinality(v_settle);
    WITH settled AS (
        UPDATE todolist t SET draft_status = 'CANCELLED', consumer = NULL, updated_at = now()
        WHERE t.id = ANY (v_settle)
        RETURNING t.id
    )
    DELETE FROM processgpt_sync_lease l USING settled s WHERE l.todo_id = s.id;
    -- An expired lease no claim would settle would keep this probe true on every claim: its
    -- todo ended without its owner (the UI cancelled it by draft_status, then the owner died),
    -- or left its claim (a revision the UI cancelled, a todo given back to a person), or
    -- another worker took it over.
    -- One a late heartbeat holds right now is left to a later claim.
    DELETE FROM processgpt_sync_lease d WHERE d.todo_id IN (
        SELECT l.todo_id FROM processgpt_sync_lease l JOIN todolist t ON t.id = l.todo_id
        WHERE l.expires_at < now() AND t.agent_orch::text = p_agent_orch
          AND (t.draft_status IS NULL OR t.draft_status NOT IN ('STARTED', 'HUMAN_ASKED')
               OR t.claim_token IS DISTINCT FROM l.claim_token
               OR t.consumer <> l.consumer)  -- (NULL: cleared by the platform, not taken)
        ORDER BY l.todo_id FOR UPDATE OF l SKIP LOCKED);

    v_found := ARRAY(
        WITH exhausted_ours AS (
            SELECT t.id FROM todolist t
            JOIN processgpt_sync_lease l ON l.todo_id = t.id AND l.claim_token = t.claim_token
            WHERE l.expires_at < now() AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
              AND t.agent_orch::text = p_agent_orch
              AND t.claim_count - l.given_back::integer >= p_max_claims
              AND t.status = 'IN_PROGRESS' AND (t.consumer IS NULL OR t.consumer = l.consumer)
              AND (t.lease_until IS NULL OR t.lease_until < now())
              AND NOT processgpt_sync_in_trash_v1(t.proc_inst_id, t.root_proc_inst_id)
            FOR UPDATE OF t SKIP LOCKED
        ), exhausted_upstream AS (  -- as the upstream SDK fails them
            SELECT t.id FROM todolist t
            WHERE t.draft_status = 'STARTED' AND t.lease_until < now()
              AND t.agent_orch::text = p_agent_orch AND t.claim_count >= p_max_claims
              AND t.status = 'IN_PROGRESS'
              AND NOT processgpt_sync_in_trash_v1(t.proc_inst_id, t.root_proc_inst_id)
            FOR UPDATE OF t SKIP LOCKED
        )
        SELECT id FROM exhausted_ours UNION SELECT id FROM exhausted_upstream);
    v_settle := processgpt_sync_leases_taken_v1(processgpt_sync_free_of_held_insts_v1(v_found));
    v_held_back := v_held_back + cardinality(v_found) - cardinality(v_settle);
    WITH failed AS (  -- the token cleared: the lost claim's late write is refused, not "applied"
        UPDATE todolist t
        SET draft_status = 'FAILED', consumer = NULL, lease_until = NULL, claim_token = NULL,
            updated_at = now(), log = concat_ws(E'\n', t.log, format(
                'claimed %s times without finishing (max_claims=%s); marked FAILED',
                t.claim_count, p_max_claims))
        WHERE t.id = ANY (v_settle)
        RETURNING t.id, coalesce(t.root_proc_inst_id, t.proc_inst_id) AS proc_inst_id, t.claim_count,
                  t.tenant_id
    ), dropped AS (
        DELETE FROM processgpt_sync_lease l USING failed f WHERE l.todo_id = f.id
    )
    INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data, "timestamp",
                        tenant_id)
    SELECT gen_random_uuid()::text, 'TASK_ERROR', f.id::text, f.proc_inst_id, 'agent', 'error',
           jsonb_build_object('error', m.text, 'message', m.text), clock_timestamp(), f.tenant_id
    FROM failed f, LATERAL (SELECT format('claimed %s times without finishing (max_claims=%s)',
                                          f.claim_count, p_max_claims) AS text) m;
    END IF;

    IF p_max_running IS NOT NULL OR p_max_running_per_tenant IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('processgpt_sync_claim'), hashtext(p_agent_orch));
    END IF;
    IF p_max_running IS NOT NULL THEN
        SELECT least(v_limit, p_max_running - count(*)) INTO v_limit
        FROM processgpt_sync_lease l
        JOIN todolist t ON t.id = l.todo_id AND t.claim_token = l.claim_token
        WHERE l.expires_at >= now() AND t.agent_orch::text = p_agent_orch
          AND t.draft_status IN ('STARTED', 'HUMAN_ASKED');
        IF v_limit < 1 THEN
            RETURN jsonb_build_object('claims', '[]'::jsonb, 'held_back', v_held_back);
        END IF;
    END IF;

    -- The abandoned claims that may run again (their lease expired): found from the leases, as
    -- the waiting-todo indexes hold no running todos.
    IF v_expired THEN
        SELECT coalesce(array_agg(a.id), '{}') INTO v_abandoned FROM (
            SELECT t.id FROM processgpt_sync_lease l
            JOIN todolist t ON t.id = l.todo_id AND t.claim_token = l.claim_token
            WHERE l.expires_at < now() AND t.agent_orch::text = p_agent_orch
              AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
              AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
              AND processgpt_sync_is_claimable_v1(t, p_max_claims)
            UNION
            SELECT t.id FROM todolist t
            WHERE t.draft_status = 'STARTED' AND t.lease_until < now()
              AND t.status = 'IN_PROGRESS' AND t.agent_orch::text = p_agent_orch
              AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
              AND processgpt_sync_is_claimable_v1(t, p_max_claims)) a;
    END IF;

    IF p_fair OR p_max_running_per_tenant IS NOT NULL THEN
        -- The tenants with waiting todos (a skip scan over the fair index), with abandoned ones.
        WITH RECURSIVE tenants(k) AS (
            (SELECT coalesce(t.tenant_id, '') FROM todolist t
             WHERE t.agent_orch::text = p_agent_orch AND p_tenant_id IS NULL
               AND t.status = 'IN_PROGRESS'
               AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED')
             ORDER BY coalesce(t.tenant_id, '') LIMIT 1)
            UNION ALL
            SELECT (SELECT coalesce(t.tenant_id, '') FROM todolist t
                    WHERE t.agent_orch::text = p_agent_orch AND coalesce(t.tenant_id, '') > g.k
                      AND t.status = 'IN_PROGRESS'
                      AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED')
                    ORDER BY coalesce(t.tenant_id, '') LIMIT 1)
            FROM tenants g WHERE g.k IS NOT NULL
        )
        SELECT array_agg(DISTINCT g.k) INTO v_groups FROM (
            SELECT k FROM tenants WHERE k IS NOT NULL
            UNION ALL SELECT p_tenant_id WHERE p_tenant_id IS NOT NULL
            UNION ALL SELECT coalesce(t.tenant_id, '') FROM todolist t
                      WHERE t.id = ANY (v_abandoned) AND p_tenant_id IS NULL) g;
    END IF;

    -- Turns between tenants need the running counts, which cost a look at every live lease;
    -- with one tenant waiting (and no per-tenant cap) its turn is simply oldest first.
    LOOP
        v_round := v_round + 1;
        IF p_max_running_per_tenant IS NOT NULL
           OR (p_fair AND (cardinality(v_groups) > 1 OR p_tenant_id IS NOT NULL)) THEN
            WITH live AS MATERIALIZED (  -- from the leases (the todos in flight), not the queue
                SELECT l.todo_id, l.claim_token FROM processgpt_sync_lease l
                WHERE l.expires_at >= now()
            ), running AS (  -- and those this claim kept in an earlier round
                SELECT r.k, count(*) AS n FROM (
                    SELECT coalesce(t.tenant_id, '') AS k
                    FROM live l
                    JOIN todolist t ON t.id = l.todo_id AND t.claim_token = l.claim_token
                    WHERE t.agent_orch::text = p_agent_orch
                      AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
                    UNION ALL
                    SELECT coalesce(t.tenant_id, '') FROM todolist t WHERE t.id = ANY (v_kept)) r
                GROUP BY 1
            ), groups AS (
                SELECT g.k, coalesce(r.n, 0) AS running, greatest(0, least(
                           2 * v_limit, coalesce(p_max_running_per_tenant - coalesce(r.n, 0),
                                                 2 * v_limit))) AS room
                FROM unnest(v_groups) AS g(k)
                LEFT JOIN running r ON r.k = g.k
            ), wanted AS MATERIALIZED (
                SELECT c.id, c.start_date, g.running + c.n AS priority
                FROM groups g
                CROSS JOIN LATERAL (
                    SELECT u.id, u.start_date,
                           row_number() OVER (ORDER BY u.start_date NULLS LAST, u.id) AS n
                    FROM ((SELECT t.id, t.start_date FROM todolist t
                           WHERE t.agent_orch::text = p_agent_orch
                             AND coalesce(t.tenant_id, '') = g.k
                             AND t.status = 'IN_PROGRESS'
                             AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED')
                             AND processgpt_sync_is_claimable_v1(t, p_max_claims)
                             AND NOT t.id = ANY (v_passed)
                           ORDER BY t.start_date NULLS LAST, t.id
                           LIMIT g.room)
                          UNION ALL
                          SELECT t.id, t.start_date FROM todolist t
                          WHERE t.id = ANY (v_abandoned) AND coalesce(t.tenant_id, '') = g.k
                            AND NOT t.id = ANY (v_passed)) u
                    ORDER BY u.start_date NULLS LAST, u.id
                    LIMIT g.room) c
                ORDER BY priority, c.start_date NULLS LAST, c.id
                LIMIT 2 * v_limit  -- spares for rows a concurrent claim holds
            )
            SELECT array_agg(w.id ORDER BY w.priority, w.start_date NULLS LAST, w.id)
            INTO v_wanted FROM wanted w;
            SELECT array_agg(x.id) INTO v_ids FROM (
                SELECT t.id FROM todolist t
                JOIN unnest(v_wanted) WITH ORDINALITY AS w(id, n) ON w.id = t.id
                WHERE processgpt_sync_is_claimable_v1(t, p_max_claims)
                ORDER BY w.n
                LIMIT v_limit
                FOR UPDATE OF t SKIP LOCKED) x;
        ELSIF cardinality(v_abandoned) = 0 THEN
            v_wanted := NULL;  -- the index scan itself passes over rows others hold
            SELECT array_agg(x.id) INTO v_ids FROM (
                SELECT t.id FROM todolist t
                WHERE t.agent_orch::text = p_agent_orch
                  AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
                  AND t.status = 'IN_PROGRESS'
                  AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED')
                  AND processgpt_sync_is_claimable_v1(t, p_max_claims)
                  AND NOT t.id = ANY (v_passed)
                ORDER BY t.start_date NULLS LAST, t.id
                LIMIT v_limit
                FOR UPDATE OF t SKIP LOCKED) x;
        ELSE  -- abandoned claims compete with the oldest waiting todos (spares as above)
            v_wanted := ARRAY(
                (SELECT w.id FROM todolist w
                 WHERE w.agent_orch::text = p_agent_orch
                   AND (p_tenant_id IS NULL OR w.tenant_id = p_tenant_id)
                   AND w.status = 'IN_PROGRESS'
                   AND (w.draft_status IS NULL OR w.draft_status = 'FB_REQUESTED')
                   AND processgpt_sync_is_claimable_v1(w, p_max_claims)
                   AND NOT w.id = ANY (v_passed)
                 ORDER BY w.start_date NULLS LAST, w.id
                 LIMIT 2 * v_limit)
                UNION ALL
                SELECT a.id FROM unnest(v_abandoned) AS a(id) WHERE NOT a.id = ANY (v_passed));
            SELECT array_agg(x.id) INTO v_ids FROM (
                SELECT t.id FROM todolist t
                WHERE t.id = ANY (v_wanted)
                  AND processgpt_sync_is_claimable_v1(t, p_max_claims)
                ORDER BY t.start_date NULLS LAST, t.id
                LIMIT v_limit
                FOR UPDATE OF t SKIP LOCKED) x;
        END IF;
        -- Candidates picked from a list that concurrent claims (woken by the same NOTIFY) held
        -- or took meanwhile: others in their place in a later round, rather than come back
        -- with fewer, or none, while more wait (the caller would then wait for its poll).
        v_short := coalesce(cardinality(v_ids), 0) < v_limit
                   AND coalesce(cardinality(v_wanted), 0) > coalesce(cardinality(v_ids), 0);
        IF v_ids IS NULL THEN
            EXIT WHEN NOT v_short OR v_round = 3;
            v_passed := v_passed || v_wanted;
            CONTINUE;
        END IF;
        -- the todos are held already; their process instances, but for one held long elsewhere
        -- (waited for in the first round only: one budget for the call, and one lock order; and
        -- not under fleet limits, whose lock every server's claim queues on meanwhile)
        v_held := processgpt_sync_lock_proc_insts_v1(v_ids, true, CASE
            WHEN v_round = 1 AND p_max_running IS NULL AND p_max_running_per_tenant IS NULL
            THEN 200 ELSE 0 END);
        v_kept := v_kept || CASE WHEN v_held IS NULL THEN v_ids ELSE ARRAY(
            SELECT u.id FROM unnest(v_ids) WITH ORDINALITY AS u(id, n)
            WHERE u.id = ANY (v_held) ORDER BY u.n) END;
        v_held_back := v_held_back + cardinality(v_ids) - coalesce(cardinality(v_held),
                                                                   cardinality(v_ids));
        -- todos left out for a held process instance (or held by concurrent claims): others
        -- in their place, twice at most
        EXIT WHEN ((v_held IS NULL OR cardinality(v_held) = cardinality(v_ids)) AND NOT v_short)
                  OR v_round = 3;
        -- passed over too: the candidates concurrent claims held (each one the round did not
        -- take, when it took fewer than it could), and the other waiting todos of the instances
        -- found held (not waited for again)
        v_passed := v_passed || v_ids || CASE WHEN v_short THEN v_wanted ELSE '{}' END || ARRAY(
            SELECT t.id FROM todolist t
            WHERE t.proc_inst_id IN (SELECT u.proc_inst_id FROM todolist u
                                     WHERE u.id = ANY (v_ids) AND NOT u.id = ANY (v_held))
              AND t.agent_orch::text = p_agent_orch
              AND (t.id = ANY (v_abandoned)
                   OR (t.status = 'IN_PROGRESS'
                       AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED'))));
        v_limit := v_limit - coalesce(cardinality(v_held), cardinality(v_ids));
    END LOOP;
    IF cardinality(v_kept) = 0 THEN
        RETURN jsonb_build_object('claims', '[]'::jsonb, 'held_back', v_held_back);
    END IF;
    v_ids := v_kept;
    IF cardinality(v_abandoned) > 0
       OR EXISTS (SELECT 1 FROM processgpt_sync_lease l WHERE l.todo_id = ANY (v_ids)) THEN
        -- the leases this takes over (of abandoned claims, or of a run still going when the
        -- UI asked for a revision); one its owner's heartbeat holds right now is left, as a
        -- held process instance's todo is
        v_kept := processgpt_sync_leases_taken_v1(v_ids);
        v_held_back := v_held_back + cardinality(v_ids) - cardinality(v_kept);
        v_ids := v_kept;
        IF cardinality(v_ids) = 0 THEN
            RETURN jsonb_build_object('claims', '[]'::jsonb, 'held_back', v_held_back);
        END IF;
    END IF;

    -- A claim given back while its process instance was held (release_v2) is claimed as if
    -- the give-back had been written: from the state it was claimed from, not counted again.
    -- The trash is read again (this statement sees what committed while the claim waited for a
    -- process instance's lock): a todo whose instance was deleted meanwhile is left, unchanged.
    WITH candidate AS (
        SELECT t.id, CASE WHEN g.todo_id IS NULL THEN t.draft_status
                          ELSE g.prev_draft_status END AS prev_status,
               g.todo_id IS NOT NULL AS given_back, t.start_date
        FROM todolist t
        LEFT JOIN processgpt_sync_lease g ON g.todo_id = t.id AND g.claim_token = t.claim_token
                                         AND g.given_back
                                         AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
        WHERE t.id = ANY (v_ids)
          AND NOT processgpt_sync_in_trash_v1(t.proc_inst_id, t.root_proc_inst_id)
    ), claimed AS (
        UPDATE todolist t
        SET draft_status = 'STARTED', consumer = p_consumer, claim_token = gen_random_uuid(),
            claim_count = CASE WHEN c.prev_status IN ('STARTED', 'HUMAN_ASKED')
                               THEN t.claim_count + 1 - c.given_back::integer ELSE 1 END,
            draft = CASE WHEN c.given_back AND c.prev_status IS NULL THEN NULL ELSE t.draft END,
            lease_until = NULL,  -- upstream workers never take over a claim without expiry
            updated_at = now()
        FROM candidate c WHERE t.id = c.id
        RETURNING t AS todo, c.prev_status, c.start_date
    ), leased AS (
        INSERT INTO processgpt_sync_lease AS l
            (todo_id, claim_token, consumer, expires_at, prev_draft_status, claim_call, instance)
        SELECT (c.todo).id, (c.todo).claim_token, p_consumer,
               now() + make_interval(secs => p_lease_seconds), c.prev_status, p_call, p_instance
        FROM claimed c
        ON CONFLICT (todo_id) DO UPDATE
        SET claim_token = EXCLUDED.claim_token, consumer = EXCLUDED.consumer,
            expires_at = EXCLUDED.expires_at, claimed_at = now(),
            claim_call = EXCLUDED.claim_call, instance = EXCLUDED.instance, given_back = false,
            prev_draft_status = CASE WHEN EXCLUDED.prev_draft_status IN ('STARTED', 'HUMAN_ASKED')
                                     THEN l.prev_draft_status
                                     ELSE EXCLUDED.prev_draft_status END
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'row', to_jsonb(c.todo) - 'claim_token',
               'token', (c.todo).claim_token,
               'extras', processgpt_sync_context_v1(c.todo, processgpt_sync_resume_v1(
                   c.prev_status, (c.todo).claim_count, (c.todo).feedback)))
               ORDER BY array_position(v_ids, (c.todo).id)), '[]'::jsonb)
    INTO v_claimed
    FROM claimed c;
    -- todos left for the trash read again: counted, so the caller claims again soon for the
    -- places they took
    v_held_back := v_held_back + cardinality(v_ids) - jsonb_array_length(v_claimed);

    RETURN jsonb_build_object('claims', v_claimed, 'held_back', v_held_back);
END
$$;

-- The claim as servers before held_back was reported call it: the claims alone.
CREATE OR REPLACE FUNCTION processgpt_sync_claim_v3(
    p_agent_orch text,
    p_consumer text,
    p_limit integer,
    p_lease_seconds integer DEFAULT 60,
    p_max_claims integer DEFAULT 3,
    p_tenant_id text DEFAULT NULL,
    p_fair boolean DEFAULT true,
    p_max_running integer DEFAULT NULL,
    p_max_running_per_tenant integer DEFAULT NULL,
    p_call uuid DEFAULT NULL,
    p_instance text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT processgpt_sync_claim_v4(p_agent_orch, p_consumer, p_limit, p_lease_seconds,
                                    p_max_claims, p_tenant_id, p_fair, p_max_running,
                                    p_max_running_per_tenant, p_call, p_instance) -> 'claims'
$$;


-- The earlier claim signatures, kept for servers of an earlier version: v2 names no call,
-- v1 claims oldest first without limits.
CREATE OR REPLACE FUNCTION processgpt_sync_claim_v2(
    p_agent_orch text,
    p_consumer text,
    p_limit integer,
    p_lease_seconds integer DEFAULT 60,
    p_max_claims integer DEFAULT 3,
    p_tenant_id text DEFAULT NULL,
    p_fair boolean DEFAULT true,
    p_max_running integer DEFAULT NULL,
    p_max_running_per_tenant integer DEFAULT NULL)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT processgpt_sync_claim_v3(p_agent_orch, p_consumer, p_limit, p_lease_seconds,
                                    p_max_claims, p_tenant_id, p_fair, p_max_running,
                                    p_max_running_per_tenant, NULL, NULL)
$$;

CREATE OR REPLACE FUNCTION processgpt_sync_claim_v1(
    p_agent_orch text,
    p_consumer text,
    p_limit integer,
    p_lease_seconds integer DEFAULT 60,
    p_max_claims integer DEFAULT 3,
    p_tenant_id text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT processgpt_sync_claim_v3(p_agent_orch, p_consumer, p_limit, p_lease_seconds,
                                    p_max_claims, p_tenant_id, false, NULL, NULL, NULL, NULL)
$$;

-- Why an event element cannot be written, or NULL when it can. The enum labels are passed in
-- (computed once per call by the caller); p_owned says the caller checked the fencing token.
CREATE OR REPLACE FUNCTION processgpt_sync_event_problem_v1(
    p_ev jsonb, p_owned boolean, p_types text[], p_statuses text[])
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_ev) <> 'object' THEN 'not a JSON object'
        WHEN coalesce(p_ev ->> 'event_type', '') <> ALL (p_types)
            THEN format('unknown event_type %s', coalesce(quote_literal(p_ev ->> 'event_type'),
                                                         'NULL'))
        WHEN p_ev ->> 'status' IS NOT NULL AND p_ev ->> 'status' <> ALL (p_statuses)
            THEN format('unknown status %s', quote_literal(p_ev ->> 'status'))
        WHEN NOT coalesce(p_owned, false)
            THEN 'not the owner of this todo (lease lost, cancelled or finished)'
    END
$$;

-- The `events` row for one valid event element: job_id defaults to the todo id, proc_inst_id
-- to the todo's (root first), data to {}.
CREATE OR REPLACE FUNCTION processgpt_sync_event_row_v1(
    p_ev jsonb, p_todo_id uuid, p_proc_inst_id text, p_timestamp timestamptz)
RETURNS TABLE (id text, job_id text, todo_id text, proc_inst_id text, crew_type text,
               event_type event_type_enum, data jsonb, status event_status, ts timestamptz)
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(nullif(p_ev ->> 'id', ''), gen_random_uuid()::text),
           coalesce(nullif(p_ev ->> 'job_id', ''), p_todo_id::text),
           p_todo_id::text,
           coalesce(nullif(p_ev ->> 'proc_inst_id', ''), p_proc_inst_id),
           nullif(p_ev ->> 'crew_type', ''),
           (p_ev ->> 'event_type')::event_type_enum,
           coalesce(nullif(p_ev -> 'data', 'null'::jsonb), '{}'::jsonb),
           (p_ev ->> 'status')::event_status,
           p_timestamp
$$;

-- Whether the claim with p_token still holds the running todo p_todo_id, whose row names
-- p_consumer: its lease is there, made for that consumer (asked only of a row that names one: a
-- todo our run suspended has none, and no lease, and stays its run's to re-apply the suspend). An upstream worker that took the row
-- over (an FB_REQUESTED revision, fetched by process-gpt-agent-sdk) leaves our token on it, as
-- it sets none, but puts its own consumer name there: the claim is no longer ours to write.
CREATE OR REPLACE FUNCTION processgpt_sync_lease_holds_v1(p_todo_id uuid, p_token uuid,
                                                          p_consumer text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM processgpt_sync_lease l
                   WHERE l.todo_id = p_todo_id AND l.claim_token = p_token
                     AND l.consumer IS NOT DISTINCT FROM p_consumer AND NOT l.given_back)
$$;

-- Record a batch of events (possibly for many todos) in order. Each element:
-- {todo_id, token, id?, job_id?, crew_type?, event_type, data?, status?}. An element with an
-- unknown event_type or status, or from a worker that no longer owns its todo, is rejected on its
-- own; the others are written. Returns {inserted, rejected: [{index, reason}]}; reason 'busy'
-- when another transaction holds the todo's row: the caller sends those events again.
CREATE OR REPLACE FUNCTION processgpt_sync_record_events_v1(p_events jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_base timestamptz := clock_timestamp();
    v_types text[] := enum_range(NULL::event_type_enum)::text[];
    v_statuses text[] := enum_range(NULL::event_status)::text[];
    v_inserted integer;
    v_rejected jsonb;
BEGIN
    IF p_events IS NULL OR jsonb_typeof(p_events) <> 'array' OR jsonb_array_length(p_events) = 0 THEN
        RETURN jsonb_build_object('inserted', 0, 'rejected', '[]'::jsonb);
    END IF;

    WITH input AS (
        SELECT e.value AS ev, e.ordinality AS n,
               CASE WHEN jsonb_typeof(e.value) = 'object'
                    THEN processgpt_sync_uuid_or_null_v1(e.value ->> 'todo_id') END AS todo_id,
               CASE WHEN jsonb_typeof(e.value) = 'object'
                    THEN processgpt_sync_uuid_or_null_v1(e.value ->> 'token') END AS token
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e
    ), owned AS (
        SELECT t.id, t.claim_token, coalesce(t.root_proc_inst_id, t.proc_inst_id) AS proc_inst_id,
               t.tenant_id, t.consumer
        FROM todolist t
        WHERE t.id IN (SELECT todo_id FROM input)
          AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
          AND coalesce(t.status NOT IN ('CANCELLED', 'DONE', 'SUBMITTED'), true)
        FOR SHARE OF t SKIP LOCKED
    ), busy AS MATERIALIZED (
        -- running todos whose row another transaction holds: their events are refused as
        -- 'busy' and sent again later, so one held row does not hold up the others' events
        SELECT t.id FROM todolist t
        WHERE (SELECT count(*) FROM owned) < (SELECT count(DISTINCT todo_id) FROM input)
          AND t.id IN (SELECT todo_id FROM input) AND t.id NOT IN (SELECT id FROM owned)
          AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
          AND coalesce(t.status NOT IN ('CANCELLED', 'DONE', 'SUBMITTED'), true)
    ), checked AS MATERIALIZED (
        SELECT i.n, i.ev, i.todo_id, o.proc_inst_id, o.tenant_id,
               CASE WHEN o.id IS NULL AND i.todo_id IN (SELECT id FROM busy) THEN 'busy'
                    ELSE processgpt_sync_event_problem_v1(
                        i.ev, o.id IS NOT NULL AND o.claim_token IS NOT DISTINCT FROM i.token
                              AND (o.consumer IS NULL
                                   OR processgpt_sync_lease_holds_v1(o.id, i.token, o.consumer)),
                        v_types, v_statuses) END AS reason
        FROM input i LEFT JOIN owned o ON o.id = i.todo_id
    ), inserted AS (
        INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data,
                            status, "timestamp", tenant_id)
        SELECT r.id, r.job_id, r.todo_id, r.proc_inst_id, r.crew_type, r.event_type, r.data,
               r.status, r.ts, c.tenant_id FROM checked c,
             LATERAL processgpt_sync_event_row_v1(c.ev, c.todo_id, c.proc_inst_id,
                                                  v_base + c.n * interval '1 microsecond') r
        WHERE c.reason IS NULL
          AND NOT EXISTS (SELECT 1 FROM events x WHERE x.id = c.ev ->> 'id')
        ORDER BY c.n
        -- the same events sent again while their first write still commits (it was cut off
        -- from its caller): the write that commits first keeps them
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM inserted),
           coalesce(jsonb_agg(jsonb_build_object('index', c.n - 1, 'reason', c.reason) ORDER BY c.n)
                    FILTER (WHERE c.reason IS NOT NULL), '[]'::jsonb)
    INTO v_inserted, v_rejected
    FROM checked c;

    RETURN jsonb_build_object('inserted', v_inserted, 'rejected', v_rejected);
END
$$;

-- A fenced write waits for a row another transaction holds (the platform's engine, a trigger
-- on the process instance) at most half the statement timeout (5 s without one), then fails as
-- lock_not_available: an outage its caller retries until the row is free, before the statement
-- timeout would take it for a write too heavy to store. For this transaction, and only where
-- the session set no lock_timeout: through Supabase's REST API (or a transaction pooler) no
-- session setting of this library reaches the database.
CREATE OR REPLACE FUNCTION processgpt_sync_bound_lock_wait_v1()
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_statement_ms double precision;
BEGIN
    IF current_setting('lock_timeout') = '0' THEN
        v_statement_ms := extract(epoch FROM current_setting('statement_timeout')::interval)
                          * 1000;
        PERFORM set_config('lock_timeout',
                           CASE WHEN v_statement_ms > 0
                                THEN greatest(1, floor(v_statement_ms / 2))::bigint
                                ELSE 5000 END || 'ms', true);
    END IF;
END
$$;

-- Lock a todo for a fenced write. Returns NULL when the caller owns it and it is still running,
-- else the reason ('missing', 'not_owner', 'cancelled' when the UI cancelled it by either
-- column, or the row's draft_status in lower case).
CREATE OR REPLACE FUNCTION processgpt_sync_fence_v1(p_todo_id uuid, p_token uuid)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_token uuid;
    v_status draft_status;
    v_cancelled boolean;
    v_consumer text;
BEGIN
    PERFORM processgpt_sync_bound_lock_wait_v1();
    -- status SUBMITTED on a running claim: someone else submitted the step's result (the
    -- platform's /complete; a claim's own result sets COMPLETED with it, in one write)
    SELECT claim_token, draft_status, status::text IN ('CANCELLED', 'DONE', 'SUBMITTED'), consumer
    INTO v_token, v_status, v_cancelled, v_consumer
    FROM todolist WHERE id = p_todo_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'missing';
    ELSIF v_token IS DISTINCT FROM p_token THEN
        RETURN 'not_owner';
    ELSIF v_status IS NULL OR v_status NOT IN ('STARTED', 'HUMAN_ASKED') THEN
        RETURN lower(coalesce(v_status::text, 'released'));
    ELSIF v_consumer IS NOT NULL
          AND NOT processgpt_sync_lease_holds_v1(p_todo_id, p_token, v_consumer) THEN
        RETURN 'not_owner';
    ELSIF v_cancelled THEN
        RETURN 'cancelled';
    END IF;
    RETURN NULL;
END
$$;

-- A final write (result, failure, suspend) that met the UI's cancel: the todo ends CANCELLED
-- now, its lease dropped, instead of staying STARTED until the lease expires. Only the owner's
-- claims are settled (release_v1 matches the token and the lease).
CREATE OR REPLACE FUNCTION processgpt_sync_settle_cancelled_v1(p_todo_ids uuid[], p_tokens uuid[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM processgpt_sync_release_v1(p_todo_ids, p_tokens);
END
$$;

-- Save a result: the pending events first, then an intermediate draft, or the final result by
-- agent_mode (COMPLETE: output + SUBMITTED; DRAFT: draft), COMPLETED, lease dropped, and one
-- crew_completed event. Fenced. Returns {applied, reason, events}.
CREATE OR REPLACE FUNCTION processgpt_sync_save_result_v1(
    p_todo_id uuid,
    p_token uuid,
    p_result jsonb,
    p_final boolean DEFAULT true,
    p_events jsonb DEFAULT '[]'::jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_refused text := processgpt_sync_fence_v1(p_todo_id, p_token);
    v_events jsonb;
BEGIN
    IF v_refused = 'completed' AND p_final AND NOT EXISTS (  -- our own write dropped our lease
            SELECT 1 FROM processgpt_sync_lease l
            WHERE l.todo_id = p_todo_id AND l.claim_token = p_token) THEN
        RETURN jsonb_build_object('applied', true, 'reason', 'already_applied');
    ELSIF v_refused IS NOT NULL THEN
        IF v_refused = 'cancelled' AND p_final THEN
            PERFORM processgpt_sync_settle_cancelled_v1(ARRAY[p_todo_id], ARRAY[p_token]);
        END IF;
        RETURN jsonb_build_object('applied', false, 'reason', v_refused);
    END IF;

    IF NOT p_final AND NOT EXISTS (SELECT 1 FROM processgpt_sync_lease l
                                   WHERE l.todo_id = p_todo_id AND l.claim_token = p_token) THEN
        -- a draft on its way when its run suspended the todo (the suspend dropped the lease,
        -- and may have stored the draft the person is asked about): not written over it
        RETURN jsonb_build_object('applied', false, 'reason', 'released');
    END IF;
    v_events := processgpt_sync_record_events_v1(p_events);
    IF NOT p_final THEN
        UPDATE todolist SET draft = p_result, updated_at = now() WHERE id = p_todo_id;
        RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'events', v_events);
    END IF;

    UPDATE todolist
    SET output = CASE WHEN agent_mode = 'COMPLETE' THEN p_result ELSE output END,
        draft = CASE WHEN agent_mode = 'COMPLETE' THEN draft ELSE p_result END,
        status = CASE WHEN agent_mode = 'COMPLETE' THEN 'SUBMITTED'::todo_status ELSE status END,
        draft_status = 'COMPLETED', consumer = NULL, updated_at = now()
    WHERE id = p_todo_id;
    DELETE FROM processgpt_sync_lease WHERE todo_id = p_todo_id;

    INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data, "timestamp",
                        tenant_id)
    SELECT gen_random_uuid()::text, 'CREW_FINISHED', t.id::text,
           coalesce(t.root_proc_inst_id, t.proc_inst_id), 'crew', 'crew_completed', '{}'::jsonb,
           clock_timestamp(), t.tenant_id
    FROM todolist t WHERE t.id = p_todo_id;
    RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'events', v_events);
END
$$;

-- Fail a todo: the pending events, then FAILED with the message in `log` and one `error` event.
CREATE OR REPLACE FUNCTION processgpt_sync_fail_v1(
    p_todo_id uuid,
    p_token uuid,
    p_error text,
    p_events jsonb DEFAULT '[]'::jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_refused text := processgpt_sync_fence_v1(p_todo_id, p_token);
    v_events jsonb;
BEGIN
    IF v_refused = 'failed' AND NOT EXISTS (  -- our own write dropped our lease
            SELECT 1 FROM processgpt_sync_lease l
            WHERE l.todo_id = p_todo_id AND l.claim_token = p_token) THEN
        RETURN jsonb_build_object('applied', true, 'reason', 'already_applied');
    ELSIF v_refused IS NOT NULL THEN
        IF v_refused = 'cancelled' THEN
            PERFORM processgpt_sync_settle_cancelled_v1(ARRAY[p_todo_id], ARRAY[p_token]);
        END IF;
        RETURN jsonb_build_object('applied', false, 'reason', v_refused);
    END IF;

    v_events := processgpt_sync_record_events_v1(p_events);
    UPDATE todolist
    SET draft_status = 'FAILED', consumer = NULL, updated_at = now(),
        log = concat_ws(E'\n', log, p_error)
    WHERE id = p_todo_id;
    DELETE FROM processgpt_sync_lease WHERE todo_id = p_todo_id;

    INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data, "timestamp",
                        tenant_id)
    SELECT gen_random_uuid()::text, 'TASK_ERROR', t.id::text,
           coalesce(t.root_proc_inst_id, t.proc_inst_id), 'agent', 'error',
           jsonb_build_object('error', p_error, 'message', p_error), clock_timestamp(), t.tenant_id
    FROM todolist t WHERE t.id = p_todo_id;
    RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'events', v_events);
END
$$;

-- Suspend a todo that asked a person: pending events, then HUMAN_ASKED with the lease released.
-- The todo runs again (resume kind human_answer) once the UI answers and sets FB_REQUESTED.
CREATE OR REPLACE FUNCTION processgpt_sync_suspend_v1(
    p_todo_id uuid,
    p_token uuid,
    p_events jsonb DEFAULT '[]'::jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_refused text := processgpt_sync_fence_v1(p_todo_id, p_token);
    v_events jsonb;
BEGIN
    IF v_refused = 'human_asked' THEN
        v_refused := NULL;
    END IF;
    IF v_refused IS NOT NULL THEN
        IF v_refused = 'cancelled' THEN
            PERFORM processgpt_sync_settle_cancelled_v1(ARRAY[p_todo_id], ARRAY[p_token]);
        END IF;
        RETURN jsonb_build_object('applied', false, 'reason', v_refused);
    END IF;
    v_events := processgpt_sync_record_events_v1(p_events);
    UPDATE todolist SET draft_status = 'HUMAN_ASKED', consumer = NULL, updated_at = now()
    WHERE id = p_todo_id;
    DELETE FROM processgpt_sync_lease WHERE todo_id = p_todo_id;
    PERFORM processgpt_sync_take_answer_v1(p_todo_id);
    RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'events', v_events);
END
$$;

-- Record the outcomes of many todos in one statement (one commit for all: group commit).
-- Each item: {todo_id, token, outcome: completed|failed|asked, result?, error?, events?}; it is
-- fenced like save_result / fail / suspend and has the same effects, the item's events first.
-- Returns one {applied, reason, events: {rejected}, error?} per item, in order; reason 'busy'
-- (nothing written) when another transaction holds the todo's row: the caller tries it again.
CREATE OR REPLACE FUNCTION processgpt_sync_finish_v1(p_items jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_base timestamptz := clock_timestamp();
    v_types text[] := enum_range(NULL::event_type_enum)::text[];
    v_statuses text[] := enum_range(NULL::event_status)::text[];
    v_out jsonb;
    v_held uuid[];  -- NULL: no order to keep (see processgpt_sync_lock_proc_insts_v1)
    v_mine uuid[];
BEGIN
    v_held := processgpt_sync_lock_proc_insts_v1(ARRAY(
        SELECT processgpt_sync_uuid_or_null_v1(i ->> 'todo_id')
        FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) AS i
        WHERE jsonb_typeof(i) = 'object'), true);
    -- The todo rows this call writes (those another transaction holds are answered 'busy'; a
    -- row freed meanwhile is left to a later call), then their leases, which it deletes, in
    -- order (see renew_v1): only those of rows it holds, so it never waits on the lease of a
    -- todo being deleted or taken over meanwhile.
    v_mine := ARRAY(
        SELECT t.id FROM todolist t
        WHERE t.id IN (SELECT processgpt_sync_uuid_or_null_v1(i ->> 'todo_id')
                       FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) AS i
                       WHERE jsonb_typeof(i) = 'object')
          AND (v_held IS NULL OR t.id = ANY (v_held))
        ORDER BY t.id FOR UPDATE OF t SKIP LOCKED);
    PERFORM 1 FROM processgpt_sync_lease l WHERE l.todo_id = ANY (v_mine)
    ORDER BY l.todo_id FOR UPDATE OF l;
    WITH items AS MATERIALIZED (
        SELECT i.ordinality AS n, i.value AS item, i.value ->> 'outcome' AS outcome,
               processgpt_sync_uuid_or_null_v1(i.value ->> 'todo_id') AS todo_id,
               processgpt_sync_uuid_or_null_v1(i.value ->> 'token') AS token,
               CASE WHEN jsonb_typeof(i.value -> 'events') = 'array'
                    THEN jsonb_array_length(i.value -> 'events') ELSE 0 END AS n_events
        FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) WITH ORDINALITY AS i
    ), locked AS MATERIALIZED (  -- the rows held above
        SELECT t.id, t.claim_token, t.draft_status, t.consumer, t.status::text AS status,
               coalesce(t.root_proc_inst_id, t.proc_inst_id) AS proc_inst_id, t.tenant_id
        FROM todolist t WHERE t.id = ANY (v_mine)
    ), busy AS MATERIALIZED (
        -- rows another transaction holds: 'busy', written in a later call, so one held row
        -- does not hold up the batch's other todos
        SELECT t.id FROM todolist t
        WHERE (SELECT count(*) FROM locked) < (SELECT count(*) FROM items)  -- else not scanned
          AND t.id IN (SELECT todo_id FROM items) AND t.id NOT IN (SELECT id FROM locked)
    ), judged AS MATERIALIZED (
        SELECT i.n, i.item, i.outcome, i.todo_id, i.token, l.proc_inst_id, l.tenant_id, i.n_events,
            -- each item's slot in the batch's timeline: its events, then its closing event
            sum(i.n_events + 1) OVER (ORDER BY i.n) - i.n_events - 1 AS slot,
            CASE
                WHEN i.outcome IS NULL OR i.outcome NOT IN ('completed', 'failed', 'asked')
                    THEN 'error'
                WHEN i.outcome = 'completed' AND i.item -> 'result' IS NULL THEN 'error'
                WHEN l.id IS NULL AND i.todo_id IN (SELECT id FROM busy) THEN 'busy'
                WHEN l.id IS NULL THEN 'missing'
                WHEN l.claim_token IS DISTINCT FROM i.token THEN 'not_owner'
                WHEN i.outcome = 'asked' AND l.consumer IS NULL
                     AND l.draft_status IN ('HUMAN_ASKED', 'FB_REQUESTED')
                     -- not a suspend still to write, whose consumer someone else cleared
                     AND NOT EXISTS (SELECT 1 FROM processgpt_sync_lease x
                                     WHERE x.todo_id = i.todo_id AND x.claim_token = i.token)
                    THEN 'already_applied'
                WHEN l.draft_status IN ('STARTED', 'HUMAN_ASKED')
                     AND l.consumer IS NOT NULL
                     AND NOT processgpt_sync_lease_holds_v1(i.todo_id, i.token, l.consumer)
                    THEN 'not_owner'
                WHEN l.draft_status IN ('STARTED', 'HUMAN_ASKED')
                     AND l.status IN ('CANCELLED', 'DONE', 'SUBMITTED')
                    THEN 'cancelled'
                WHEN l.draft_status IN ('STARTED', 'HUMAN_ASKED') THEN 'ok'
                -- ours only if our own write dropped our lease: the UI (or anyone) finishing
                -- the todo while our claim ran leaves it, and our result was never stored
                WHEN (i.outcome, l.draft_status) IN (('completed', 'COMPLETED'),
                                                     ('failed', 'FAILED'))
                     AND NOT EXISTS (SELECT 1 FROM processgpt_sync_lease x
                                     WHERE x.todo_id = i.todo_id AND x.claim_token = i.token)
                    THEN 'already_applied'
                ELSE lower(coalesce(l.draft_status::text, 'released'))
            END AS reason
        FROM items i LEFT JOIN locked l ON l.id = i.todo_id
    ), evs AS MATERIALIZED (
        SELECT j.n, j.todo_id, j.proc_inst_id, j.tenant_id, e.value AS ev, e.ordinality AS k,
               j.slot,
               processgpt_sync_event_problem_v1(
                   e.value,
                   processgpt_sync_uuid_or_null_v1(e.value ->> 'todo_id') = j.todo_id
                   AND processgpt_sync_uuid_or_null_v1(e.value ->> 'token') = j.token,
                   v_types, v_statuses) AS reason
        FROM judged j
        CROSS JOIN LATERAL jsonb_array_elements(
            CASE WHEN jsonb_typeof(j.item -> 'events') = 'array' THEN j.item -> 'events'
                 ELSE '[]'::jsonb END) WITH ORDINALITY AS e
        WHERE j.reason = 'ok'
    ), inserted AS (
        INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data,
                            status, "timestamp", tenant_id)
        SELECT r.id, r.job_id, r.todo_id, r.proc_inst_id, r.crew_type, r.event_type, r.data,
               r.status, r.ts, v.tenant_id FROM evs v,
             LATERAL processgpt_sync_event_row_v1(
                 v.ev, v.todo_id, v.proc_inst_id,
                 v_base + (v.slot + v.k) * interval '1 microsecond') r
        WHERE v.reason IS NULL AND NOT EXISTS (SELECT 1 FROM events x WHERE x.id = v.ev ->> 'id')
    ), updated AS (
        UPDATE todolist t
        SET output = CASE WHEN j.outcome = 'completed' AND t.agent_mode = 'COMPLETE'
                          THEN j.item -> 'result' ELSE t.output END,
            draft = CASE WHEN j.outcome = 'completed' AND t.agent_mode IS DISTINCT FROM 'COMPLETE'
                         THEN j.item -> 'result'
                         -- a suspend's draft: what the person is asked about (an a2a report)
                         WHEN j.outcome = 'asked'
                              AND coalesce(jsonb_typeof(j.item -> 'result'), 'null') <> 'null'
                         THEN j.item -> 'result' ELSE t.draft END,
            status = CASE WHEN j.outcome = 'completed' AND t.agent_mode = 'COMPLETE'
                          THEN 'SUBMITTED'::todo_status ELSE t.status END,
            draft_status = CASE j.outcome WHEN 'completed' THEN 'COMPLETED'
                                          WHEN 'failed' THEN 'FAILED'
                                          ELSE 'HUMAN_ASKED' END::draft_status,
            log = CASE WHEN j.outcome = 'failed' THEN concat_ws(E'\n', t.log, j.item ->> 'error')
                       ELSE t.log END,
            consumer = NULL, updated_at = now()
        FROM judged j WHERE t.id = j.todo_id AND j.reason = 'ok'
    ), dropped AS (
        DELETE FROM processgpt_sync_lease l USING judged j
        WHERE l.todo_id = j.todo_id AND j.reason = 'ok'
    ), closing AS (
        INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data,
                            "timestamp", tenant_id)
        SELECT gen_random_uuid()::text,
               CASE j.outcome WHEN 'completed' THEN 'CREW_FINISHED' ELSE 'TASK_ERROR' END,
               j.todo_id::text, j.proc_inst_id,
               CASE j.outcome WHEN 'completed' THEN 'crew' ELSE 'agent' END,
               CASE j.outcome WHEN 'completed' THEN 'crew_completed'
                              ELSE 'error' END::event_type_enum,
               CASE j.outcome WHEN 'completed' THEN '{}'::jsonb
                              ELSE jsonb_build_object('error', j.item ->> 'error',
                                                      'message', j.item ->> 'error') END,
               v_base + (j.slot + j.n_events + 1) * interval '1 microsecond', j.tenant_id
        FROM judged j WHERE j.reason = 'ok' AND j.outcome IN ('completed', 'failed')
    )
    SELECT jsonb_agg(jsonb_build_object(
               'applied', j.reason IN ('ok', 'already_applied'),
               'reason', j.reason,
               'error', CASE WHEN j.reason = 'error' THEN format(
                   'unknown outcome %s or missing result', coalesce(quote_literal(j.outcome),
                                                                    'NULL')) END,
               'events', jsonb_build_object('rejected', coalesce(
                   (SELECT jsonb_agg(jsonb_build_object('index', v.k - 1, 'reason', v.reason)
                                     ORDER BY v.k)
                    FROM evs v WHERE v.n = j.n AND v.reason IS NOT NULL), '[]'::jsonb)))
               ORDER BY j.n)
    INTO v_out
    FROM judged j;

    -- A question answered before its todo was suspended: claimable again at once.
    PERFORM processgpt_sync_take_answer_v1(processgpt_sync_uuid_or_null_v1(i.value ->> 'todo_id'))
    FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) WITH ORDINALITY AS i(value, n)
    JOIN jsonb_array_elements(v_out) WITH ORDINALITY AS o(value, n) ON o.n = i.n
    WHERE i.value ->> 'outcome' = 'asked' AND o.value ->> 'reason' = 'ok';

    -- An outcome that met the UI's cancel: the todo ends CANCELLED now.
    PERFORM processgpt_sync_settle_cancelled_v1(
        array_agg(processgpt_sync_uuid_or_null_v1(i.value ->> 'todo_id')),
        array_agg(processgpt_sync_uuid_or_null_v1(i.value ->> 'token')))
    FROM jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) WITH ORDINALITY AS i(value, n)
    JOIN jsonb_array_elements(v_out) WITH ORDINALITY AS o(value, n) ON o.n = i.n
    WHERE o.value ->> 'reason' = 'cancelled'
    HAVING count(*) > 0;
    RETURN coalesce(v_out, '[]'::jsonb);
END
$$;

-- The first answer to one question: a human_response with the question's job_id, for its todo
-- (or naming none), written after it. Executors reuse job ids (one fixed id, or one per task),
-- so the job_id alone would let another todo's answer, or the answer to an earlier question,
-- answer this one. Executable by every role (the answer trigger runs as the UI's).
CREATE OR REPLACE FUNCTION processgpt_sync_answer_to_v1(
    p_job_id text, p_todo_id text, p_asked_at timestamptz)
RETURNS SETOF events LANGUAGE sql STABLE AS $$
    SELECT r.* FROM events r
    WHERE r.job_id = p_job_id AND r.event_type = 'human_response'
      AND (r.todo_id IS NULL OR r.todo_id = p_todo_id)
      AND (r."timestamp" IS NULL OR r."timestamp" >= p_asked_at)
    ORDER BY r."timestamp" LIMIT 1
$$;

-- Ask a person (ask_human, suspend_for_human): the pending events first, then the question.
-- The same question (same signature) asked before in this todo is not asked again: its answer is
-- returned ('answered_before'), or, while unanswered and the todo's latest question, its job_id
-- is waited on again ('asked_before'; a retried call after an ambiguous commit, or a rerun after
-- a crash or a restart). Otherwise a `human_asked` event (job_id, question data) and a notification per human
-- user; draft_status HUMAN_ASKED while the lease is kept. Returns {applied, reason, job_id?,
-- answer?, events}.
CREATE OR REPLACE FUNCTION processgpt_sync_ask_v1(
    p_todo_id uuid,
    p_token uuid,
    p_job_id text,
    p_question jsonb,
    p_events jsonb DEFAULT '[]'::jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_refused text := processgpt_sync_fence_v1(p_todo_id, p_token);
    v_todo todolist;
    v_job_id text;
    v_answer jsonb;
    v_answer_status text;
    v_asked_at timestamptz;
    v_events jsonb;
BEGIN
    IF v_refused IS NOT NULL THEN
        RETURN jsonb_build_object('applied', false, 'reason', v_refused);
    END IF;
    v_events := processgpt_sync_record_events_v1(p_events);
    SELECT q.job_id, r.data, r.status, q."timestamp"
    INTO v_job_id, v_answer, v_answer_status, v_asked_at
    FROM events q
    LEFT JOIN LATERAL processgpt_sync_answer_to_v1(q.job_id, q.todo_id, q."timestamp") r ON true
    WHERE q.todo_id = p_todo_id::text AND q.event_type = 'human_asked'
      AND q.data ->> 'signature' = p_question ->> 'signature'
    ORDER BY r.data IS NOT NULL DESC, q."timestamp" DESC LIMIT 1;
    IF FOUND AND v_answer IS NOT NULL THEN
        RETURN jsonb_build_object('applied', true, 'reason', 'answered_before', 'job_id', v_job_id,
                                  'answer', v_answer, 'answer_status', v_answer_status,
                                  'events', v_events);
    END IF;
    UPDATE todolist SET draft_status = 'HUMAN_ASKED', updated_at = now() WHERE id = p_todo_id;
    -- waited on again only while it is the todo's latest question: the todo waits on that one
    -- (take_answer_v1, respond_v2), whose answer must not seem to answer an older question
    IF v_job_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM events x
            WHERE x.todo_id = p_todo_id::text AND x.event_type = 'human_asked'
              AND x."timestamp" > v_asked_at) THEN
        RETURN jsonb_build_object('applied', true, 'reason', 'asked_before', 'job_id', v_job_id,
                                  'events', v_events);
    END IF;

    SELECT * INTO v_todo FROM todolist WHERE id = p_todo_id;
    INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data, status,
                        "timestamp", tenant_id)
    VALUES (gen_random_uuid()::text, p_job_id, p_todo_id::text,
            coalesce(v_todo.root_proc_inst_id, v_todo.proc_inst_id), 'agent', 'human_asked',
            p_question, 'ASKED', clock_timestamp(), v_todo.tenant_id);
    BEGIN  -- a platform notifications table of another shape must not stop the question
        INSERT INTO notifications (id, user_id, tenant_id, title, description, type, url)
        SELECT gen_random_uuid(), u.id::text, v_todo.tenant_id,
               coalesce(v_todo.activity_name, 'Question'),
               p_question ->> 'question', 'workitem_bpm', '/todolist/' || p_todo_id
        FROM users u
        WHERE u.id = ANY (ARRAY(SELECT processgpt_sync_uuid_or_null_v1(trim(x))
                                FROM unnest(string_to_array(coalesce(v_todo.user_id, ''), ','))
                                AS x))
          AND u.tenant_id IS NOT DISTINCT FROM v_todo.tenant_id
          AND NOT coalesce(u.is_agent, false);
    EXCEPTION WHEN undefined_table OR undefined_column OR datatype_mismatch THEN
        RAISE WARNING 'processgpt-sync: notification not written: %', SQLERRM;
    END;
    RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'job_id', p_job_id,
                              'events', v_events);
END
$$;

-- The answer to a question (job_id), if there is one yet; when found, the todo is running
-- again (draft_status STARTED). Fenced. Returns {applied, reason, answer?, answer_status?}: the
-- status is REJECTED when the person declined (the UI's Cancel), APPROVED otherwise.
CREATE OR REPLACE FUNCTION processgpt_sync_answer_v1(p_todo_id uuid, p_token uuid, p_job_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_refused text := processgpt_sync_fence_v1(p_todo_id, p_token);
    v_answer jsonb;
    v_answer_status text;
BEGIN
    IF v_refused IS NOT NULL THEN
        RETURN jsonb_build_object('applied', false, 'reason', v_refused);
    END IF;
    SELECT r.data, r.status INTO v_answer, v_answer_status FROM (
        SELECT q."timestamp" FROM events q
        WHERE q.todo_id = p_todo_id::text AND q.job_id = p_job_id AND q.event_type = 'human_asked'
        ORDER BY q."timestamp" DESC LIMIT 1) q
    CROSS JOIN LATERAL processgpt_sync_answer_to_v1(p_job_id, p_todo_id::text, q."timestamp") r;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('applied', true, 'reason', 'waiting');
    END IF;
    UPDATE todolist SET draft_status = 'STARTED', updated_at = now()
    WHERE id = p_todo_id AND draft_status = 'HUMAN_ASKED';
    RETURN jsonb_build_object('applied', true, 'reason', 'answered', 'answer', v_answer,
                              'answer_status', v_answer_status);
END
$$;

-- Stop waiting for an answer (timeout): the todo runs on (draft_status STARTED). Fenced.
CREATE OR REPLACE FUNCTION processgpt_sync_resume_asking_v1(p_todo_id uuid, p_token uuid)
RETURNS boolean LANGUAGE sql AS $$
    UPDATE todolist SET draft_status = 'STARTED', updated_at = now()
    WHERE id = p_todo_id AND claim_token = p_token AND draft_status = 'HUMAN_ASKED'
      AND (consumer IS NULL OR processgpt_sync_lease_holds_v1(p_todo_id, p_token, consumer))
    RETURNING true
$$;

-- Answer a question as the ProcessGPT UI does: a `human_response` event with the question's
-- job_id (CLI `respond`, the console). The question is the open one with that job_id, of todo
-- p_todo_id when given: executors reuse job ids across todos, so where that leaves several
-- open questions the todo must be named. An answer of JSON false declines, as the UI's Cancel
-- does (status REJECTED). Returns the todo id, or NULL when no such question exists; raises
-- when it was answered already, when its todo waits on a later question (see
-- awaited_question_v1), or when which one is meant is ambiguous.
CREATE OR REPLACE FUNCTION processgpt_sync_respond_v2(
    p_job_id text, p_answer jsonb, p_user_id text DEFAULT NULL, p_todo_id text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_question events;
    v_todos text[];
    v_awaited text;
BEGIN
    -- One answer per question: a second one would be ignored by the waiting todo anyway.
    PERFORM pg_advisory_xact_lock(hashtext('processgpt_sync_respond'), hashtext(p_job_id));
    SELECT array_agg(DISTINCT q.todo_id) INTO v_todos FROM events q
    WHERE q.job_id = p_job_id AND q.event_type = 'human_asked'
      AND (p_todo_id IS NULL OR q.todo_id = p_todo_id)
      AND NOT EXISTS (SELECT 1 FROM processgpt_sync_answer_to_v1(q.job_id, q.todo_id,
                                                                 q."timestamp"));
    IF cardinality(v_todos) > 1 THEN
        RAISE EXCEPTION 'question % is open in % todos (%): name the todo', p_job_id,
            cardinality(v_todos), array_to_string(v_todos, ', ')
            USING HINT = 'processgpt-sync respond JOB_ID ANSWER --todo TODO_ID';
    END IF;
    SELECT * INTO v_question FROM events q
    WHERE q.job_id = p_job_id AND q.event_type = 'human_asked'
      AND q.todo_id = coalesce(v_todos[1], p_todo_id, q.todo_id)
    ORDER BY q."timestamp" DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_todos IS NULL THEN
        RAISE EXCEPTION 'question % was already answered', p_job_id
            USING HINT = format('processgpt-sync show %s shows the answer', v_question.todo_id);
    END IF;
    SELECT a.job_id INTO v_awaited FROM todolist t
    CROSS JOIN LATERAL processgpt_sync_awaited_question_v1(t) a
    WHERE t.id = processgpt_sync_uuid_or_null_v1(v_question.todo_id) AND a.id <> v_question.id;
    IF FOUND THEN
        -- the todo waits on a later question: this answer would resume nothing. (A todo that
        -- waits on none keeps it, for the same question asked again after a retry.)
        RAISE EXCEPTION 'question % is no longer awaited: todo % waits on question %',
            p_job_id, v_question.todo_id, v_awaited
            USING HINT = 'processgpt-sync asked lists the questions awaited';
    END IF;
    INSERT INTO events (id, job_id, todo_id, proc_inst_id, crew_type, event_type, data, status,
                        "timestamp", tenant_id)
    VALUES (gen_random_uuid()::text, p_job_id, v_question.todo_id, v_question.proc_inst_id,
            v_question.crew_type, 'human_response',
            jsonb_build_object('answer', p_answer, 'user_id', p_user_id),
            (CASE WHEN p_answer = 'false'::jsonb THEN 'REJECTED' ELSE 'APPROVED' END)::event_status,
            clock_timestamp(), v_question.tenant_id);
    RETURN v_question.todo_id;
END
$$;

-- The first respond signature (kept for servers of an earlier version).
CREATE OR REPLACE FUNCTION processgpt_sync_respond_v1(
    p_job_id text, p_answer jsonb, p_user_id text DEFAULT NULL)
RETURNS text LANGUAGE sql AS $$
    SELECT processgpt_sync_respond_v2(p_job_id, p_answer, p_user_id, NULL)
$$;

-- The question a todo waits on: its latest human_asked, while it is HUMAN_ASKED. An earlier
-- one (timed out, then another asked) resumes nothing when answered (take_answer_v1 reads the
-- latest alone), so it is neither listed nor answerable.
CREATE OR REPLACE FUNCTION processgpt_sync_awaited_question_v1(p_todo todolist)
RETURNS SETOF events LANGUAGE sql STABLE AS $$
    SELECT q.* FROM events q
    WHERE q.todo_id = p_todo.id::text AND q.event_type = 'human_asked'
      AND p_todo.draft_status = 'HUMAN_ASKED'
      AND coalesce(p_todo.status NOT IN ('CANCELLED', 'DONE', 'SUBMITTED'), true)
    ORDER BY q."timestamp" DESC LIMIT 1
$$;

-- Questions still waiting for an answer (CLI `asked`).
CREATE OR REPLACE FUNCTION processgpt_sync_open_questions_v1(p_agent_orch text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'job_id', q.job_id, 'todo_id', q.todo_id, 'agent_orch', t.agent_orch::text,
               'question', q.data, 'asked_at', q."timestamp", 'waiting', t.consumer IS NOT NULL)
               ORDER BY q."timestamp"), '[]'::jsonb)
    FROM todolist t  -- from the waiting todos: their questions by the index on events(todo_id)
    CROSS JOIN LATERAL processgpt_sync_awaited_question_v1(t) q
    WHERE t.draft_status = 'HUMAN_ASKED'
      AND (p_agent_orch IS NULL OR t.agent_orch::text = p_agent_orch)
      AND NOT EXISTS (SELECT 1 FROM processgpt_sync_answer_to_v1(q.job_id, q.todo_id,
                                                                 q."timestamp"))
$$;

-- A suspended todo (HUMAN_ASKED, no owner) whose latest question has an answer becomes
-- claimable (FB_REQUESTED) with that answer as its last feedback, so it runs again with resume
-- kind human_answer. An answer to an earlier question, or a second answer, changes nothing.
-- Only todos this library ran (claim_token set) are touched: upstream agents' todos are theirs.
-- Executable by every role: the answer trigger runs as the role that inserts the answer (the
-- ProcessGPT UI's), under that role's own privileges and row security.
CREATE OR REPLACE FUNCTION processgpt_sync_take_answer_v1(p_todo_id uuid)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_job_id text;
    v_asked_at timestamptz;
    v_answer events;
BEGIN
    -- The row first: a suspend being committed meanwhile (its outcome holds the row) is
    -- waited for, so that the reads below see it; else this answer, committed after the
    -- suspend looked for one, would find the todo still owned and requeue nothing, ever.
    PERFORM 1 FROM todolist t WHERE t.id = p_todo_id FOR NO KEY UPDATE;
    SELECT q.job_id, q."timestamp" INTO v_job_id, v_asked_at FROM events q
    WHERE q.todo_id = p_todo_id::text AND q.event_type = 'human_asked'
    ORDER BY q."timestamp" DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT * INTO v_answer FROM processgpt_sync_answer_to_v1(v_job_id, p_todo_id::text, v_asked_at);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE todolist t
    SET draft_status = 'FB_REQUESTED', updated_at = now(),
        feedback = CASE WHEN jsonb_typeof(t.feedback) = 'array' THEN t.feedback ELSE '[]'::jsonb
                   END || jsonb_build_array(jsonb_build_object(
                       'time', now(), 'kind', 'human_answer', 'job_id', v_job_id,
                       'content', coalesce(v_answer.data -> 'answer', v_answer.data),
                       'user_id', v_answer.data ->> 'user_id'))
    WHERE t.id = p_todo_id AND t.draft_status = 'HUMAN_ASKED' AND t.consumer IS NULL
      AND t.claim_token IS NOT NULL
      AND coalesce(t.status NOT IN ('CANCELLED', 'DONE', 'SUBMITTED'), true);
    RETURN FOUND;
END
$$;

-- NOTIFY that never makes the writer's statement fail: PostgreSQL refuses a payload of 8,000
-- bytes or more, and these triggers run inside other writers' inserts (the platform's UI and
-- agents). A payload that long is sent empty: the console reads it as "look again", a server
-- as nobody's (no agent_orch or job_id of ours is that long).
CREATE OR REPLACE FUNCTION processgpt_sync_notify_text_v1(p_channel text, p_payload text)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify(p_channel, CASE WHEN octet_length(p_payload) < 8000 THEN p_payload ELSE '' END)
$$;

-- Whether this transaction holds the todo's row now and, where the platform's trigger writes
-- them on every update of a todo, its process instance's and project's rows, having waited
-- p_wait_ms at most for them. A todo that does not exist is free. One the caller sees but
-- may not lock (row security lets it read the todo, not update it) is not, at once: waiting
-- would not help.
CREATE OR REPLACE FUNCTION processgpt_sync_todo_free_v1(p_todo_id uuid, p_wait_ms integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_deadline timestamptz := clock_timestamp()
                              + make_interval(secs => greatest(p_wait_ms, 0) / 1000.0);
BEGIN
    LOOP
        PERFORM 1 FROM todolist t WHERE t.id = p_todo_id FOR NO KEY UPDATE SKIP LOCKED;
        EXIT WHEN FOUND;
        IF NOT EXISTS (SELECT 1 FROM todolist t WHERE t.id = p_todo_id) THEN
            RETURN true;
        END IF;
        BEGIN  -- seen, not taken: held, or not this role's to update (no wait would help)?
            PERFORM 1 FROM todolist t WHERE t.id = p_todo_id FOR NO KEY UPDATE NOWAIT;
            IF FOUND THEN
                EXIT;  -- freed meanwhile; the lock outlives this block
            END IF;
            RETURN false;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- held by another transaction: looked at again until the deadline
        END;
        IF clock_timestamp() >= v_deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
    RETURN coalesce(p_todo_id = ANY (processgpt_sync_lock_proc_insts_v1(
        ARRAY[p_todo_id], true,
        greatest(0, floor(extract(epoch FROM v_deadline - clock_timestamp()) * 1000))::integer)),
        true);
END
$$;

-- List a todo whose answer came while its row was held (the answer trigger, as the role
-- answering). Runs with its owner's rights, so that no other role needs any on the list: it
-- lists only a todo this library ran, and once. A todo listed already gets a new listed_at:
-- a look that found nothing to requeue before this answer was committed then leaves it listed
-- (take_held_answers_v1 unlists only the listing it looked at). Every role may execute it,
-- since the trigger runs as the role answering; but only from a trigger: called directly (by
-- anon through Supabase's REST API, say) it refuses. And it lists only a todo that has an
-- answer (to it, or to one of its questions): a role's own trigger calling it (on a
-- temporary table) can list nothing that inserting an answer would not have listed anyway.
CREATE OR REPLACE FUNCTION processgpt_sync_list_held_answer_v1(p_todo_id uuid)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = 'processgpt_sync_list_held_answer_v1 is called by the answer trigger '
                      'only; a server lists nothing by hand';
    END IF;
    INSERT INTO processgpt_sync_answer_held (todo_id)
    SELECT t.id FROM todolist t WHERE t.id = p_todo_id AND t.claim_token IS NOT NULL
      AND EXISTS (SELECT 1 FROM events a
                  WHERE a.event_type = 'human_response'
                    AND (a.todo_id = p_todo_id::text
                         OR a.job_id IN (SELECT q.job_id FROM events q
                                         WHERE q.todo_id = p_todo_id::text
                                           AND q.event_type = 'human_asked')))
    ON CONFLICT (todo_id) DO UPDATE SET listed_at = clock_timestamp();
END
$$;

-- The todos whose answers came while their rows were held (processgpt_sync_answer_held), the
-- longest waiting first, at most 30 a call: those free now are requeued (take_answer_v1) and
-- leave the list, as does one with nothing to requeue (asked again, answered meanwhile,
-- ended); one still held, or whose requeue failed (a warning says why), stays, moved to the
-- back of the list, so that a few held for hours do not keep the others from being looked at.
-- No lock is waited for, and none kept of a todo not requeued (its subtransaction is rolled
-- back); a todo another caller is at is skipped. No todo is begun after p_seconds, nor later
-- than half a second before the caller's statement timeout; one that runs into the timeout (a
-- slow site trigger) ends the look, moved to the back of the list, and the caller's own work (a
-- heartbeat's renewals) goes on. The number of todos requeued.
DROP FUNCTION IF EXISTS processgpt_sync_take_held_answers_v1();  -- a pre-release form
CREATE OR REPLACE FUNCTION processgpt_sync_take_held_answers_v1(p_seconds real)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_timeout real := extract(epoch FROM current_setting('statement_timeout')::interval);
    v_until timestamptz := clock_timestamp() + make_interval(secs => greatest(p_seconds, 0));
    v_out_of_time boolean := false;
    v_todo_id uuid;
    v_listed_at timestamptz;
    v_requeued integer := 0;
    v_unlist boolean;
BEGIN
    IF v_timeout > 0 THEN
        v_until := least(v_until, statement_timestamp() + make_interval(secs => v_timeout - 0.5));
    END IF;
    FOR v_todo_id, v_listed_at IN
        SELECT h.todo_id, h.listed_at FROM processgpt_sync_answer_held h
        ORDER BY h.listed_at LIMIT 30  -- 2 subtransactions kept each (rarely 3): past 64
                                       -- they overflow the cache every snapshot reads
    LOOP
        EXIT WHEN clock_timestamp() >= v_until;  -- the rest at the next look
        v_unlist := true;
        BEGIN
            IF NOT processgpt_sync_todo_free_v1(v_todo_id, 0) THEN
                RAISE EXCEPTION USING ERRCODE = 'lock_not_available';  -- drops its locks
            END IF;
            IF processgpt_sync_take_answer_v1(v_todo_id) THEN
                v_requeued := v_requeued + 1;
            ELSE  -- nothing to requeue: its locks dropped too, though it leaves the list
                RAISE EXCEPTION USING ERRCODE = 'PS003';
            END IF;
        EXCEPTION
            WHEN lock_not_available THEN
                v_unlist := false;  -- still held: looked at again later
            WHEN SQLSTATE 'PS003' THEN
                NULL;
            WHEN query_canceled THEN  -- the statement timeout (not caught by OTHERS)
                v_unlist := false;
                v_out_of_time := true;
                RAISE WARNING 'processgpt-sync: todo % answered, not requeued yet: %',
                    v_todo_id, SQLERRM;
            WHEN OTHERS THEN
                v_unlist := false;
                RAISE WARNING 'processgpt-sync: todo % answered, not requeued yet: %',
                    v_todo_id, SQLERRM;
        END;
        BEGIN  -- the listing looked at: not one an answer renewed since (its answer may
               -- have been invisible to the look), nor one another caller is at
            IF v_unlist THEN
                DELETE FROM processgpt_sync_answer_held h
                WHERE h.todo_id IN (SELECT x.todo_id FROM processgpt_sync_answer_held x
                                    WHERE x.todo_id = v_todo_id FOR UPDATE SKIP LOCKED)
                  AND h.listed_at = v_listed_at;
            ELSE
                UPDATE processgpt_sync_answer_held h SET listed_at = clock_timestamp()
                WHERE h.todo_id IN (SELECT x.todo_id FROM processgpt_sync_answer_held x
                                    WHERE x.todo_id = v_todo_id FOR UPDATE SKIP LOCKED)
                  AND h.listed_at = v_listed_at;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'processgpt-sync: the listing of answered todo % not changed: %',
                v_todo_id, SQLERRM;
        END;
        EXIT WHEN v_out_of_time;
    END LOOP;
    RETURN v_requeued;
END
$$;

-- An answer arrives: wake the waiting worker ('processgpt_sync_answer', payload job_id), and
-- requeue the todo it answers if that todo is suspended waiting for it. Never makes the UI's
-- insert fail: for a role that may not see the todo, update it or lock its process
-- instance's row, or a requeue that fails (a site's trigger refuses it), the todo is listed as
-- below instead (a warning says why). Nor wait
-- long: a todo whose row (or process instance) another transaction holds for more than 2 s
-- (the BPM engine, a person's open edit) is listed in processgpt_sync_answer_held for the
-- servers to requeue once it is free, rather than holding the UI's insert until a statement
-- timeout (Supabase gives signed-in users 8 s) fails it. The 2 s wait covers a suspend being
-- committed at that moment (see take_answer_v1).
CREATE OR REPLACE FUNCTION processgpt_sync_answer_trigger_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_todo_id uuid;
BEGIN
    IF NEW.event_type IS DISTINCT FROM 'human_response' THEN
        RETURN NULL;
    END IF;
    PERFORM processgpt_sync_notify_text_v1('processgpt_sync_answer', NEW.job_id);
    v_todo_id := processgpt_sync_uuid_or_null_v1(NEW.todo_id);  -- the answer's own todo first
    IF v_todo_id IS NULL THEN
        SELECT processgpt_sync_uuid_or_null_v1(q.todo_id) INTO v_todo_id FROM events q
        WHERE q.job_id = NEW.job_id AND q.event_type = 'human_asked'
        ORDER BY q."timestamp" DESC LIMIT 1;
    END IF;
    IF v_todo_id IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM todolist t WHERE t.id = v_todo_id) THEN
            -- deleted, or hidden from this role by row security (a site's policy): the
            -- listing, with its owner's rights, lists it if it is there
            PERFORM processgpt_sync_list_held_answer_v1(v_todo_id);
        ELSIF processgpt_sync_todo_free_v1(v_todo_id, 2000) THEN
            PERFORM processgpt_sync_take_answer_v1(v_todo_id);
        ELSE
            PERFORM processgpt_sync_list_held_answer_v1(v_todo_id);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- a role that may not lock the todo's rows (or update the todo), a site's trigger
        -- that refuses the requeue: the answer is stored all the same, the servers requeue
        -- the todo (their looks retry it, with a warning while it fails)
        RAISE WARNING 'processgpt-sync: answer % stored, todo left to the servers to requeue: %',
            NEW.job_id, SQLERRM;
        BEGIN
            PERFORM processgpt_sync_list_held_answer_v1(v_todo_id);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'processgpt-sync: answer % stored, todo not requeued: %',
                NEW.job_id, SQLERRM;
        END;
    END;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS processgpt_sync_answer ON events;
CREATE TRIGGER processgpt_sync_answer
    AFTER INSERT ON events
    FOR EACH ROW WHEN (NEW.event_type = 'human_response')
    EXECUTE FUNCTION processgpt_sync_answer_trigger_v1();

-- Claims given back whose todo row cannot be written now (another transaction holds its
-- process instance, which every update of the todo touches): their leases are marked given
-- back and expired, which needs no lock beyond the lease's. Any claim then takes such a todo
-- as soon as its instance is free, from the state it was claimed from and without counting
-- the claim again (claim_v4), rather than after the lease's time and as one more claim
-- against max_claims; the given-back run's writes are refused (lease_holds_v1) and its
-- heartbeat no longer renews the lease.
-- Matched by token: a todo another server claimed meanwhile (a new token) is not touched.
CREATE OR REPLACE FUNCTION processgpt_sync_give_back_held_v1(p_todo_ids uuid[], p_tokens uuid[])
RETURNS void LANGUAGE sql AS $$
    -- the leases in order first, as finish_v1 and renew_v1 take them: no deadlock with them
    SELECT 1 FROM processgpt_sync_lease l WHERE l.todo_id = ANY (p_todo_ids)
    ORDER BY l.todo_id FOR UPDATE OF l;
    UPDATE processgpt_sync_lease l
    SET given_back = true, expires_at = least(l.expires_at, now())
    FROM unnest(p_todo_ids, p_tokens) AS p(todo_id, token), todolist t
    WHERE l.todo_id = p.todo_id AND l.claim_token = p.token
      AND t.id = l.todo_id AND t.claim_token = p.token
$$;

-- Give claims back: a running todo returns to the state it was claimed from (claimable again,
-- the claim not counted, an intermediate draft of a fresh claim dropped so the row is claimable
-- exactly as before); a todo the UI cancelled ends CANCELLED. Returns how many todos became
-- claimable.
CREATE OR REPLACE FUNCTION processgpt_sync_release_v1(p_todo_ids uuid[], p_tokens uuid[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_released integer;
BEGIN
    PERFORM processgpt_sync_lock_proc_insts_v1(p_todo_ids, false);
    WITH pairs AS (
        SELECT p.todo_id, p.token FROM unnest(p_todo_ids, p_tokens) AS p(todo_id, token)
    ), judged AS (
        SELECT t.id, l.prev_draft_status,
               CASE WHEN t.status IN ('CANCELLED', 'DONE') OR t.draft_status = 'CANCELLED'
                         OR (t.status = 'SUBMITTED'
                             AND t.draft_status IN ('STARTED', 'HUMAN_ASKED'))
                    THEN 'cancelled'
                    WHEN t.draft_status IN ('STARTED', 'HUMAN_ASKED') THEN 'running'
                    ELSE 'finished' END AS state
        FROM pairs p
        JOIN todolist t ON t.id = p.todo_id AND t.claim_token = p.token
        JOIN processgpt_sync_lease l ON l.todo_id = p.todo_id AND l.claim_token = p.token
        -- not a row another worker took over meanwhile (see processgpt_sync_lease_holds_v1)
        WHERE t.consumer IS NULL OR t.consumer = l.consumer
        FOR UPDATE OF t
    ), released AS (
        UPDATE todolist t
        SET draft_status = CASE j.state WHEN 'cancelled' THEN 'CANCELLED'::draft_status
                                        WHEN 'running' THEN j.prev_draft_status
                                        ELSE t.draft_status END,
            draft = CASE WHEN j.state = 'running' AND j.prev_draft_status IS NULL THEN NULL
                         ELSE t.draft END,
            claim_count = CASE WHEN j.state = 'running' THEN greatest(t.claim_count - 1, 0)
                               ELSE t.claim_count END,
            -- a claim taken over from an upstream worker goes back to an expired one, which
            -- any worker, theirs or ours, may claim again
            lease_until = CASE WHEN j.state = 'running' AND j.prev_draft_status = 'STARTED'
                               THEN now() ELSE t.lease_until END,
            -- the given-back run's token no longer passes the fence, even when the next
            -- owner is an upstream worker (which never sets a token of its own)
            claim_token = CASE WHEN j.state = 'running' THEN NULL ELSE t.claim_token END,
            consumer = NULL, updated_at = now()
        FROM judged j
        WHERE t.id = j.id
        RETURNING t.id, t.draft_status, j.state
    ), dropped AS (
        DELETE FROM processgpt_sync_lease l USING pairs p
        WHERE l.todo_id = p.todo_id AND l.claim_token = p.token
    )
    SELECT count(*) INTO v_released FROM released r
    WHERE r.state = 'running' AND (r.draft_status IS NULL OR r.draft_status = 'FB_REQUESTED');
    RETURN v_released;
END
$$;

-- Give claims back, leaving out those whose process instance another transaction holds for
-- long (the BPM engine, a person's open transaction): the todo rows first, waiting as any
-- single-row write does (sorted by id), then the process instances of the todos still ours,
-- in order, waiting at most 200 ms in all, as a claim does. A todo whose instance stays held
-- keeps its claim and is named in the answer, so one held instance does not keep every other
-- todo of a stop from going back (release_v1 waited for all, up to lock_timeout, and then gave
-- none back); the caller asks again for those. A todo no longer ours (another worker took it
-- over, see processgpt_sync_lease_holds_v1) is left alone, as release_v1 leaves it, and only
-- our lease on it dropped, without waiting for its instance. Returns {"released": n,
-- "held_back": [todo ids]}: n counts the todos that became claimable again, as release_v1's
-- answer.
CREATE OR REPLACE FUNCTION processgpt_sync_release_v2(p_todo_ids uuid[], p_tokens uuid[])
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_ours uuid[];
    v_free uuid[];
    v_held uuid[];
    v_ids uuid[];
    v_tokens uuid[];
    v_released integer;
BEGIN
    PERFORM 1 FROM todolist t WHERE t.id = ANY (p_todo_ids) ORDER BY t.id FOR UPDATE OF t;
    v_ours := ARRAY(
        SELECT DISTINCT p.todo_id FROM unnest(p_todo_ids, p_tokens) AS p(todo_id, token)
        JOIN todolist t ON t.id = p.todo_id AND t.claim_token = p.token
        JOIN processgpt_sync_lease l ON l.todo_id = p.todo_id AND l.claim_token = p.token
        WHERE t.consumer IS NULL OR t.consumer = l.consumer);
    v_free := coalesce(processgpt_sync_lock_proc_insts_v1(v_ours, true, 200), v_ours);
    PERFORM 1 FROM processgpt_sync_lease l WHERE l.todo_id = ANY (p_todo_ids)
    ORDER BY l.todo_id FOR UPDATE OF l;  -- last, in order (see renew_v1)
    DELETE FROM processgpt_sync_lease l USING unnest(p_todo_ids, p_tokens) AS p(todo_id, token)
    WHERE l.todo_id = p.todo_id AND l.claim_token = p.token AND NOT p.todo_id = ANY (v_ours);
    SELECT coalesce(array_agg(p.todo_id), '{}'), coalesce(array_agg(p.token), '{}')
    INTO v_ids, v_tokens
    FROM unnest(p_todo_ids, p_tokens) AS p(todo_id, token)
    WHERE p.todo_id = ANY (v_free);
    v_held := ARRAY(SELECT unnest(v_ours) EXCEPT SELECT unnest(v_free) ORDER BY 1);
    v_released := processgpt_sync_release_v1(v_ids, v_tokens);
    IF cardinality(v_held) > 0 THEN
        SELECT array_agg(p.todo_id), array_agg(p.token) INTO v_ids, v_tokens
        FROM unnest(p_todo_ids, p_tokens) AS p(todo_id, token)
        WHERE p.todo_id = ANY (v_held);
        PERFORM processgpt_sync_give_back_held_v1(v_ids, v_tokens);
    END IF;
    RETURN jsonb_build_object('released', v_released, 'held_back', to_jsonb(v_held));
END
$$;

-- Renew the leases of many todos in one call. Reports which todos were renewed, which were
-- cancelled (by the UI, or here: under a root deleted for good), and which were lost: to another
-- owner, or deleted (also named under 'deleted': the platform deleting a tenant with its todos).
-- Writes todolist only for such a cancel.
CREATE OR REPLACE FUNCTION processgpt_sync_renew_v1(
    p_consumer text,
    p_todo_ids uuid[],
    p_tokens uuid[],
    p_lease_seconds integer DEFAULT 60)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_report jsonb;
BEGIN
    -- a run whose root the cron job deleted for good while a claim or a write held its row
    -- (the delete's cancel skipped it) is cancelled now
    PERFORM processgpt_sync_cancel_gone_v1(p_todo_ids);
    -- the leases in order, as every write of several leases takes them (a batch of outcomes
    -- deletes leases this renews): two such writes never deadlock
    PERFORM 1 FROM processgpt_sync_lease l WHERE l.todo_id = ANY (p_todo_ids)
    ORDER BY l.todo_id FOR UPDATE OF l;
    WITH pairs AS (
        SELECT p.todo_id, p.token FROM unnest(p_todo_ids, p_tokens) AS p(todo_id, token)
    ), state AS (
        SELECT p.todo_id, p.token,
               -- a consumer cleared by someone else's write of the whole row (the
               -- platform's /complete) leaves the claim ours, as fence_v1 reads it
               t.claim_token IS NOT DISTINCT FROM p.token
                   AND (t.consumer IS NULL OR t.consumer = p_consumer) AS owned,
               (t.draft_status = 'CANCELLED' OR t.status IN ('CANCELLED', 'DONE')
                OR (t.status = 'SUBMITTED' AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')))
                   AS cancelled,
               t.draft_status IN ('STARTED', 'HUMAN_ASKED') AS running,
               t.id IS NULL AS deleted
        FROM pairs p LEFT JOIN todolist t ON t.id = p.todo_id
    ), renewed AS (
        UPDATE processgpt_sync_lease l  -- a claim given back keeps its expiry (release_v2)
        SET expires_at = CASE WHEN l.given_back THEN l.expires_at
                              ELSE now() + make_interval(secs => p_lease_seconds) END
        FROM state s
        WHERE l.todo_id = s.todo_id AND l.claim_token = s.token AND l.consumer = p_consumer
          AND s.owned AND s.running AND NOT coalesce(s.cancelled, false)
        RETURNING l.todo_id
    )
    SELECT jsonb_build_object(
        'renewed', coalesce(jsonb_agg(s.todo_id) FILTER (WHERE r.todo_id IS NOT NULL), '[]'::jsonb),
        'cancelled', coalesce(jsonb_agg(s.todo_id) FILTER (
            WHERE r.todo_id IS NULL AND s.owned AND coalesce(s.cancelled, false)), '[]'::jsonb),
        'lost', coalesce(jsonb_agg(s.todo_id) FILTER (
            WHERE r.todo_id IS NULL AND NOT (s.owned AND coalesce(s.cancelled, false))),
            '[]'::jsonb),
        'deleted', coalesce(jsonb_agg(s.todo_id) FILTER (WHERE s.deleted), '[]'::jsonb))
    INTO v_report
    FROM state s LEFT JOIN renewed r ON r.todo_id = s.todo_id;
    RETURN v_report;
END
$$;

-- Insert a claimable todo (CLI `enqueue`, the demo, tests). Returns its id. Values go through
-- jsonb_populate_record so they take each column's own type (agent_orch is an enum in old installs).
-- The id is generated here (the platform's todolist.id has no default), and start_date is given
-- in UTC with a 'Z': a timestamptz column reads the instant, the platform's timestamp without
-- time zone the UTC wall-clock time, whatever the session's TimeZone.
CREATE OR REPLACE FUNCTION processgpt_sync_enqueue_v1(
    p_agent_orch text,
    p_input text,
    p_agent_mode text DEFAULT 'COMPLETE',
    p_tenant_id text DEFAULT NULL,
    p_activity_name text DEFAULT NULL,
    p_proc_inst_id text DEFAULT NULL,
    p_user_id text DEFAULT NULL)
RETURNS uuid LANGUAGE sql AS $$
    INSERT INTO todolist (id, agent_orch, query, description, agent_mode, status, tenant_id,
                          activity_name, proc_inst_id, root_proc_inst_id, user_id, start_date)
    SELECT gen_random_uuid(), r.agent_orch, r.query, r.description, r.agent_mode, r.status,
           r.tenant_id, r.activity_name, r.proc_inst_id, r.root_proc_inst_id, r.user_id,
           r.start_date
    FROM jsonb_populate_record(NULL::todolist, jsonb_build_object(
        'start_date', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                              'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'agent_orch', p_agent_orch, 'query', p_input, 'description', p_input,
        'agent_mode', upper(p_agent_mode), 'status', 'IN_PROGRESS', 'tenant_id', p_tenant_id,
        'activity_name', p_activity_name, 'proc_inst_id', p_proc_inst_id,
        'root_proc_inst_id', p_proc_inst_id, 'user_id', p_user_id)) AS r
    RETURNING id
$$;

-- Whether a server would claim this todo now, apart from expired leases of running ones
-- (CLI `status` and `show`): the claim's own rule, for queued and answered todos.
CREATE OR REPLACE FUNCTION processgpt_sync_claimable_v1(p_todo todolist)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (p_todo.draft_status IS NULL OR p_todo.draft_status = 'FB_REQUESTED')
           AND coalesce(processgpt_sync_is_claimable_v1(p_todo, 1), false)
$$;

-- Whether a queued or answered todo waits only for its process instance to leave the platform's
-- trash (CLI `status`, `show`, `retry`): a server would claim it but for that.
CREATE OR REPLACE FUNCTION processgpt_sync_waits_in_trash_v1(p_todo todolist)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (p_todo.draft_status IS NULL OR p_todo.draft_status = 'FB_REQUESTED')
           AND coalesce(processgpt_sync_ready_v1(p_todo, 1), false)
           AND processgpt_sync_in_trash_v1(p_todo.proc_inst_id, p_todo.root_proc_inst_id)
$$;

-- Todo counts by agent_orch and draft_status (CLI `status`).
-- `claimable` tells rows a server would pick up from rows no server ever will (e.g. a plain
-- insert without status IN_PROGRESS and agent_mode); `in_trash`, waiting rows that wait for
-- their process instance to be restored from the platform's trash.
CREATE OR REPLACE FUNCTION processgpt_sync_status_v1(p_agent_orch text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'agent_orch', s.agent_orch, 'draft_status', s.draft_status, 'count', s.n,
               'claimable', s.claimable, 'in_trash', s.in_trash)
               ORDER BY s.agent_orch, s.draft_status NULLS FIRST, s.claimable DESC,
                        s.in_trash), '[]'::jsonb)
    FROM (
        SELECT c.agent_orch, c.draft_status, c.claimable,
               -- looked up only for the waiting todos a claim passes over
               NOT c.claimable AND coalesce(processgpt_sync_waits_in_trash_v1(c.t), false)
                   AS in_trash,
               count(*) AS n
        FROM (SELECT t.agent_orch::text AS agent_orch, t.draft_status::text AS draft_status,
                     processgpt_sync_claimable_v1(t) AS claimable, t
              FROM todolist t
              WHERE p_agent_orch IS NULL OR t.agent_orch::text = p_agent_orch) c
        GROUP BY 1, 2, 3, 4
    ) s
$$;

-- Queued and running todos per agent_orch and tenant (CLI `status`): the load fair claims
-- balance and the limits cap. Running counts live leases only.
CREATE OR REPLACE FUNCTION processgpt_sync_tenant_load_v1(p_agent_orch text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'agent_orch', s.agent_orch, 'tenant_id', s.tenant_id, 'queued', s.queued,
               'running', s.running) ORDER BY s.agent_orch, s.tenant_id NULLS FIRST), '[]'::jsonb)
    FROM (
        SELECT t.agent_orch::text AS agent_orch, t.tenant_id,
               count(*) FILTER (WHERE processgpt_sync_claimable_v1(t)) AS queued,
               count(*) FILTER (WHERE t.draft_status IN ('STARTED', 'HUMAN_ASKED')
                                  AND EXISTS (SELECT 1 FROM processgpt_sync_lease l
                                              WHERE l.todo_id = t.id
                                                AND l.claim_token = t.claim_token
                                                AND l.expires_at >= now())) AS running
        FROM todolist t
        WHERE (p_agent_orch IS NULL OR t.agent_orch::text = p_agent_orch)
          AND (t.draft_status IS NULL
               OR t.draft_status IN ('FB_REQUESTED', 'STARTED', 'HUMAN_ASKED'))
        GROUP BY 1, 2
    ) s
    WHERE s.queued > 0 OR s.running > 0
$$;

-- The labels of event_type_enum: the event types this database accepts (platforms add some).
CREATE OR REPLACE FUNCTION processgpt_sync_event_types_v1()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT to_jsonb(enum_range(NULL::event_type_enum)::text[])
$$;

-- A NOTIFY for `processgpt-sync health` to hear back on its LISTEN connection.
CREATE OR REPLACE FUNCTION processgpt_sync_notify_health_v1()
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('processgpt_sync_health', 'ping');
    RETURN true;
END
$$;

-- The processgpt-sync functions installed, so a server can name any that are missing.
CREATE OR REPLACE FUNCTION processgpt_sync_schema_v1()
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(DISTINCT p.proname::text), '[]'::jsonb)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.proname LIKE 'processgpt\_sync\_%' AND n.nspname = current_schema()
$$;

-- Wake workers: new claimable work on 'processgpt_sync_todo' (payload: agent_orch), a running
-- todo cancelled by the UI on 'processgpt_sync_cancel' (payload: todo id).
CREATE OR REPLACE FUNCTION processgpt_sync_notify_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.draft_status IS NULL AND NEW.status = 'IN_PROGRESS'
        AND NEW.agent_mode IN ('DRAFT', 'COMPLETE') AND NEW.draft IS NULL)
       OR (NEW.draft_status = 'FB_REQUESTED' AND NEW.status = 'IN_PROGRESS')
       -- a claim whose step left progress, back in progress: if its owner died meanwhile,
       -- a claim takes it over now rather than at the next look for expired leases
       OR (TG_OP = 'UPDATE' AND NEW.draft_status IN ('STARTED', 'HUMAN_ASKED')
           AND NEW.status = 'IN_PROGRESS' AND OLD.status IS DISTINCT FROM 'IN_PROGRESS') THEN
        PERFORM processgpt_sync_notify_text_v1('processgpt_sync_todo',
                                               coalesce(NEW.agent_orch::text, ''));
    ELSIF TG_OP = 'UPDATE'
          AND ((NEW.consumer IS NOT NULL
                AND (NEW.draft_status = 'CANCELLED' OR NEW.status IN ('CANCELLED', 'DONE')))
               -- a person submitted the step's result while it ran (the platform's /complete
               -- clears the consumer as it writes status SUBMITTED)
               OR (NEW.draft_status IN ('STARTED', 'HUMAN_ASKED')
                   AND NEW.status IN ('CANCELLED', 'DONE', 'SUBMITTED')))
          AND (OLD.draft_status IS DISTINCT FROM NEW.draft_status
               OR OLD.status IS DISTINCT FROM NEW.status) THEN
        PERFORM pg_notify('processgpt_sync_cancel', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS processgpt_sync_notify ON todolist;
CREATE TRIGGER processgpt_sync_notify
    AFTER INSERT OR UPDATE OF status, draft_status, agent_orch, agent_mode, draft ON todolist
    FOR EACH ROW EXECUTE FUNCTION processgpt_sync_notify_v1();

-- A process instance restored from the platform's trash: its waiting todos are claimable
-- again, so the servers of their agent_orchs are woken as for a new todo (abandoned claims are
-- taken at a server's next look for expired leases). Runs as the UI's role, which may read its
-- own todos: a failure only loses the wake-up (logged), never the UI's restore.
CREATE OR REPLACE FUNCTION processgpt_sync_restored_notify_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM processgpt_sync_notify_text_v1('processgpt_sync_todo', w.agent_orch)
    FROM (SELECT DISTINCT coalesce(t.agent_orch::text, '') AS agent_orch FROM todolist t
          WHERE t.status = 'IN_PROGRESS'
            AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED')
            AND NEW.proc_inst_id IN (t.proc_inst_id, t.root_proc_inst_id)) w;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'processgpt-sync: process instance % restored, servers not woken: %',
        NEW.proc_inst_id, SQLERRM;
    RETURN NULL;
END
$$;

-- A process instance deleted for good (the platform's cron job deletes those 7 days in the
-- trash; its own trigger deletes the instance's own todos): the todos of the subprocesses under
-- it would wait in the trash for good (processgpt_sync_in_trash_v1), rows every claim of their
-- agent_orch passes over. Those a server would take, or holds, are cancelled as the UI cancels
-- a todo (draft_status CANCELLED; a run under way ends as cancelled), with a line in their log.
-- Human steps (and steps whose draft a person wrote) and ended ones are left as they are. A
-- todo whose row, or whose own process instance, another transaction holds at that moment is
-- skipped, never waited for (the cron job's delete is not held up, and no lock order can
-- deadlock): a run or claim under way is cancelled by its server's next heartbeat
-- (processgpt_sync_renew_v1); a waiting todo stays in the trash for good, never claimed, until
-- init-db sweeps it (processgpt_sync_gone_roots_v1). Of the todos p_ids, those under a root
-- deleted for good; returns the count.
CREATE OR REPLACE FUNCTION processgpt_sync_cancel_gone_v1(p_ids uuid[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
BEGIN
    v_ids := ARRAY(
        SELECT t.id FROM todolist t
        WHERE t.id = ANY (p_ids) AND t.status = 'IN_PROGRESS'
          AND (t.draft_status IN ('FB_REQUESTED', 'STARTED', 'HUMAN_ASKED')
               OR (t.draft_status IS NULL AND t.agent_mode IN ('DRAFT', 'COMPLETE')
                   AND t.draft IS NULL))
          AND processgpt_sync_root_gone_v1(t.proc_inst_id, t.root_proc_inst_id)
        ORDER BY t.id
        FOR UPDATE OF t SKIP LOCKED);
    IF cardinality(v_ids) = 0 THEN
        RETURN 0;
    END IF;
    -- and only those whose own instance is free now (each write touches it: the platform's
    -- trigger), taken in order without a wait
    v_ids := processgpt_sync_free_of_held_insts_v1(v_ids);
    UPDATE todolist t
    SET draft_status = 'CANCELLED', updated_at = now(),
        log = concat_ws(E'\n', t.log, format(
            '%s: cancelled: the process it runs under (%s) was deleted for good',
            to_char(now(), 'YYYY-MM-DD HH24:MI:SS TZ'), t.root_proc_inst_id))
    WHERE t.id = ANY (v_ids);
    RETURN cardinality(v_ids);
END
$$;

-- The same for every todo under these roots (the cron job's delete, init-db's sweep).
CREATE OR REPLACE FUNCTION processgpt_sync_cancel_under_gone_roots_v1(p_roots text[])
RETURNS integer LANGUAGE sql AS $$
    SELECT CASE WHEN coalesce(cardinality(p_roots), 0) = 0 THEN 0
                ELSE processgpt_sync_cancel_gone_v1(ARRAY(
                    SELECT t.id FROM todolist t WHERE t.root_proc_inst_id = ANY (p_roots)))
           END
$$;

-- The roots of subprocess todos in progress whose root process instance is gone (deleted for
-- good before this library's trigger existed, or its cancel skipped a held row): what init-db
-- sweeps, after its install commits.
CREATE OR REPLACE FUNCTION processgpt_sync_gone_roots_v1()
RETURNS text[] LANGUAGE sql STABLE AS $$
    SELECT ARRAY(SELECT DISTINCT t.root_proc_inst_id FROM todolist t
                 WHERE t.status = 'IN_PROGRESS'
                   AND processgpt_sync_root_gone_v1(t.proc_inst_id, t.root_proc_inst_id))
$$;

CREATE OR REPLACE FUNCTION processgpt_sync_roots_deleted_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM processgpt_sync_cancel_under_gone_roots_v1(ARRAY(SELECT g.proc_inst_id
                                                              FROM gone g));
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'processgpt-sync: process instances deleted, todos of their subprocesses '
        'not cancelled: %', SQLERRM;
    RETURN NULL;
END
$$;

-- Whether a table lacks a trigger of that name calling that function.
CREATE OR REPLACE FUNCTION processgpt_sync_trigger_missing_v1(p_table regclass, p_name text,
                                                              p_function regprocedure)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT NOT EXISTS (SELECT 1 FROM pg_trigger g
                       WHERE g.tgrelid = p_table AND g.tgname = p_name
                         AND g.tgfoid = p_function)
$$;

-- The triggers on the platform's bpm_proc_inst are created only where missing (or calling
-- another function: a changed trigger calls a new function version), so an install never takes
-- the exclusive lock replacing one needs on a table the UI and the BPM engine write all the
-- time.
DO $$
BEGIN
    IF processgpt_sync_has_trash_v1() THEN
        IF processgpt_sync_trigger_missing_v1('bpm_proc_inst', 'processgpt_sync_restored',
                                              'processgpt_sync_restored_notify_v1()') THEN
            DROP TRIGGER IF EXISTS processgpt_sync_restored ON bpm_proc_inst;
            CREATE TRIGGER processgpt_sync_restored
                AFTER UPDATE OF is_deleted ON bpm_proc_inst
                FOR EACH ROW WHEN (OLD.is_deleted IS TRUE AND NEW.is_deleted IS NOT TRUE)
                EXECUTE FUNCTION processgpt_sync_restored_notify_v1();
        END IF;
        IF processgpt_sync_trigger_missing_v1('bpm_proc_inst', 'processgpt_sync_roots_deleted',
                                              'processgpt_sync_roots_deleted_v1()') THEN
            DROP TRIGGER IF EXISTS processgpt_sync_roots_deleted ON bpm_proc_inst;
            CREATE TRIGGER processgpt_sync_roots_deleted
                AFTER DELETE ON bpm_proc_inst REFERENCING OLD TABLE AS gone
                FOR EACH STATEMENT EXECUTE FUNCTION processgpt_sync_roots_deleted_v1();
        END IF;
    END IF;
END
$$;

-- The todos a CLI argument names: a whole id, or a unique prefix of at least 4 hex digits
-- (`status`, `asked` and the demo print 8). At most 5 are returned.
CREATE OR REPLACE FUNCTION processgpt_sync_match_todo_v1(p_todo_id text)
RETURNS uuid[] LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN processgpt_sync_uuid_or_null_v1(trim(p_todo_id)) IS NOT NULL THEN ARRAY(
            SELECT t.id FROM todolist t
            WHERE t.id = processgpt_sync_uuid_or_null_v1(trim(p_todo_id)))
        WHEN lower(trim(p_todo_id)) ~ '^[0-9a-f]{4}[0-9a-f-]*$' THEN ARRAY(
            SELECT t.id FROM todolist t WHERE t.id::text LIKE lower(trim(p_todo_id)) || '%'
            ORDER BY t.id LIMIT 5)
        ELSE '{}'::uuid[]
    END
$$;

-- One todo for `processgpt-sync show`: its row (without the fencing token), whether a server
-- would claim it, whether it waits only for its process instance to leave the platform's trash
-- (`in_trash`) and whether that instance is in it at all (`instance_in_trash`), its lease, and
-- its events in order. When the id matches no todo or several,
-- only `matches` (the ids found).
CREATE OR REPLACE FUNCTION processgpt_sync_show_v1(p_todo_id text)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ids uuid[] := processgpt_sync_match_todo_v1(p_todo_id);
    v_todo todolist;
BEGIN
    IF cardinality(v_ids) <> 1 THEN
        RETURN jsonb_build_object('matches', to_jsonb(v_ids));
    END IF;
    SELECT * INTO v_todo FROM todolist WHERE id = v_ids[1];
    RETURN jsonb_build_object(
        'matches', to_jsonb(v_ids),
        'row', to_jsonb(v_todo) - 'claim_token',
        'claimable', processgpt_sync_claimable_v1(v_todo),
        'in_trash', coalesce(processgpt_sync_waits_in_trash_v1(v_todo), false),
        -- any todo's: an abandoned claim there is not taken over until the restore
        'instance_in_trash', coalesce(processgpt_sync_in_trash_v1(v_todo.proc_inst_id,
                                                                  v_todo.root_proc_inst_id),
                                      false),
        'lease', (SELECT jsonb_build_object('consumer', l.consumer, 'expires_at', l.expires_at,
                                            'claimed_at', l.claimed_at,
                                            'expired', l.expires_at < now())
                  FROM processgpt_sync_lease l WHERE l.todo_id = v_todo.id),
        'events', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'timestamp', e."timestamp", 'event_type', e.event_type::text,
                       'job_id', e.job_id, 'crew_type', e.crew_type, 'status', e.status::text,
                       'data', e.data) ORDER BY e."timestamp", e.id), '[]'::jsonb)
                   FROM events e WHERE e.todo_id = v_todo.id::text));
END
$$;

-- `processgpt-sync retry`: a FAILED or CANCELLED todo becomes claimable again as if new
-- (draft_status NULL, status IN_PROGRESS, claim count 0, no owner, no partial draft); its log
-- keeps the history and gains a line. Running, waiting, completed and already claimable todos
-- are refused with the reason, as is a step its process finished (status DONE) and a todo whose
-- process instance (or root) is in the platform's trash or was deleted from it. When the id
-- matches no todo or several, only `matches`.
CREATE OR REPLACE FUNCTION processgpt_sync_retry_v1(p_todo_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[] := processgpt_sync_match_todo_v1(p_todo_id);
    v_todo todolist;
    v_was text;
    v_reason text;
BEGIN
    IF cardinality(v_ids) <> 1 THEN
        RETURN jsonb_build_object('retried', false, 'matches', to_jsonb(v_ids));
    END IF;
    SELECT * INTO v_todo FROM todolist WHERE id = v_ids[1] FOR UPDATE;
    v_was := CASE WHEN v_todo.draft_status IS DISTINCT FROM 'FAILED'
                       AND v_todo.status::text = 'CANCELLED' THEN 'CANCELLED'
                  ELSE coalesce(v_todo.draft_status::text,
                                'status ' || coalesce(v_todo.status::text, 'NULL')) END;
    v_reason := CASE
        WHEN v_todo.status::text = 'DONE' THEN  -- a person or the process finished the step
            'its process finished this step (status DONE); enqueue a new todo to run the work '
            'again'
        WHEN v_todo.status::text = 'SUBMITTED'
             AND v_todo.draft_status IN ('STARTED', 'HUMAN_ASKED', 'CANCELLED') THEN
            'a result was submitted for this step (status SUBMITTED) while it ran, and its '
            'process takes that one; enqueue a new todo to run the work again'
        WHEN v_todo.draft_status = 'HUMAN_ASKED' AND v_todo.consumer IS NULL
             AND v_todo.status::text = 'CANCELLED' THEN NULL  -- suspended, then cancelled
        WHEN v_todo.draft_status = 'HUMAN_ASKED' AND v_todo.consumer IS NULL THEN
            'it waits for an answer to its question (see processgpt-sync asked)'
        WHEN v_todo.draft_status = 'STARTED' AND v_todo.lease_until < now()
             AND v_todo.status::text IN ('IN_PROGRESS', 'CANCELLED') THEN
            NULL  -- an upstream worker's claim whose lease ran out: abandoned
        WHEN v_todo.draft_status = 'STARTED' AND v_todo.lease_until < now() THEN format(
            'its worker''s claim ran out while the step is not in progress (status %s); it is '
            'taken over once its process puts the step in progress, and running it now would '
            'run a step out of order', coalesce(v_todo.status::text, 'NULL'))
        WHEN v_todo.draft_status IN ('STARTED', 'HUMAN_ASKED') THEN format(
            'it is running (draft_status %s, on %s); cancel it in the ProcessGPT UI, or wait '
            'until it ends', v_todo.draft_status, v_todo.consumer)
        WHEN v_todo.draft_status IN ('FAILED', 'CANCELLED') THEN NULL
        WHEN v_todo.draft_status = 'COMPLETED' THEN  -- even if cancelled later: keep its result
            'it completed and its result is stored; enqueue a new todo to run the work again'
        WHEN v_todo.status::text = 'CANCELLED' THEN NULL
        WHEN v_todo.draft_status = 'FB_REQUESTED'
             AND v_todo.status::text IS DISTINCT FROM 'IN_PROGRESS' THEN format(
            'it waits for its process to put the step in progress (status %s): its answer or '
            'revision runs then, and running it now would run a step out of order',
            coalesce(v_todo.status::text, 'NULL'))
        WHEN processgpt_sync_waits_in_trash_v1(v_todo) THEN
            'its process instance, or the process it runs under, is in the ProcessGPT trash '
            '(or was deleted from it): it runs only once the instance is restored'
        WHEN processgpt_sync_claimable_v1(v_todo) THEN
            'it is already claimable; a server for its agent_orch picks it up'
        ELSE format('it never ran and is not claimable (status %s, agent_mode %s, draft %s); '
                    'a claimable todo needs status IN_PROGRESS, agent_mode DRAFT or COMPLETE '
                    'and no draft', coalesce(v_todo.status::text, 'NULL'),
                    coalesce(v_todo.agent_mode::text, 'NULL'),
                    CASE WHEN v_todo.draft IS NULL THEN 'NULL' ELSE 'set' END)
    END;
    IF v_reason IS NULL
       AND processgpt_sync_in_trash_v1(v_todo.proc_inst_id, v_todo.root_proc_inst_id) THEN
        -- made claimable, it would only wait there (the todo stays as it is, to retry later)
        v_reason := 'its process instance, or the process it runs under, is in the ProcessGPT '
                    'trash: restore the instance, then retry (one deleted for good from the '
                    'trash cannot be restored: enqueue a new todo)';
    END IF;
    IF v_reason IS NOT NULL THEN
        RETURN jsonb_build_object('retried', false, 'matches', to_jsonb(v_ids),
                                  'draft_status', v_todo.draft_status::text, 'reason', v_reason);
    END IF;
    UPDATE todolist t
    SET draft_status = NULL, status = r.status, draft = NULL, claim_count = 0, consumer = NULL,
        claim_token = NULL, updated_at = now(),
        log = concat_ws(E'\n', t.log, format('%s: retried (was %s); claimable again',
                                             to_char(now(), 'YYYY-MM-DD HH24:MI:SS TZ'), v_was))
    FROM jsonb_populate_record(NULL::todolist, '{"status": "IN_PROGRESS"}') AS r
    WHERE t.id = v_todo.id;
    DELETE FROM processgpt_sync_lease WHERE todo_id = v_todo.id;
    RETURN jsonb_build_object('retried', true, 'matches', to_jsonb(v_ids), 'draft_status', v_was);
END
$$;

-- Claims a server holds leases of but does not run (orphans: a claim whose answer it never got,
-- the runs of its earlier run; at its stop, what it could not give back or write): given back
-- now rather than at their leases' expiry. Only rows no other transaction holds (a person's
-- open UPDATE) are written, whose process instance is free too: waiting here would hold up the
-- caller (a heartbeat: the renewal of every other lease of its server). A held one is marked
-- given back (see give_back_held_v1) for any claim to take once free. The claims written back
-- (o_ids) and how many were (o_released).
CREATE OR REPLACE FUNCTION processgpt_sync_give_back_orphans_v1(
    p_todo_ids uuid[], p_tokens uuid[], OUT o_ids uuid[], OUT o_released integer)
RETURNS record LANGUAGE plpgsql AS $$
DECLARE
    v_tokens uuid[];
    v_free uuid[];
BEGIN
    o_released := 0;
    WITH lockable AS (
        SELECT o.todo_id, o.token
        FROM unnest(p_todo_ids, p_tokens) AS o(todo_id, token)
        JOIN todolist t ON t.id = o.todo_id
        ORDER BY o.todo_id
        FOR UPDATE OF t SKIP LOCKED
    )
    SELECT array_agg(todo_id), array_agg(token) INTO o_ids, v_tokens FROM lockable;
    IF o_ids IS NOT NULL THEN  -- nor those whose process instance another one holds
        v_free := processgpt_sync_free_of_held_insts_v1(o_ids);
        SELECT array_agg(o.todo_id), array_agg(o.token) INTO o_ids, v_tokens
        FROM unnest(o_ids, v_tokens) AS o(todo_id, token)
        WHERE o.todo_id = ANY (v_free);
    END IF;
    IF o_ids IS NOT NULL THEN
        o_released := processgpt_sync_release_v1(o_ids, v_tokens);
    END IF;
    PERFORM processgpt_sync_give_back_held_v1(  -- those given back leave their leases
        ARRAY(SELECT o.todo_id FROM unnest(p_todo_ids, p_tokens) AS o(todo_id, token)
              WHERE NOT o.todo_id = ANY (coalesce(o_ids, '{}')) ORDER BY o.todo_id),
        ARRAY(SELECT o.token FROM unnest(p_todo_ids, p_tokens) AS o(todo_id, token)
              WHERE NOT o.todo_id = ANY (coalesce(o_ids, '{}')) ORDER BY o.todo_id));
END
$$;

-- The heartbeat of one server: renew its leases (as processgpt_sync_renew_v1) and refresh its
-- row in the server registry, in one call and one transaction. p_server holds agent_orch,
-- host, pid, version, heartbeat_seconds, running, completed and any other counters (stats),
-- plus `unanswered`, the claim calls (p_call of processgpt_sync_claim_v4) the server got no
-- answer to: their leases are orphans (a claim that ran after its caller gave up on a dead
-- connection), given back at once instead of waiting for their expiry. Naming the calls, not
-- the todos the server holds, keeps a heartbeat the network delivers late from giving back
-- todos claimed after it was sent. And `instance`, this run of the server: the first heartbeat
-- of a new run under a consumer name gives back the leases of the runs before it (one that
-- ended without a clean stop: a supervisor's restarted process, a restarted container) and
-- supersedes them; a heartbeat of a run that stopped cleanly or was superseded (one the network
-- delayed) does nothing and says so (`superseded`). `known` (every todo id the server holds;
-- leases of this consumer not in it are orphans) is still read from servers of an earlier
-- version. Rows of servers unseen for a day are removed. And answers whose todos were held
-- when they came are requeued where free now (take_held_answers_v1).
CREATE OR REPLACE FUNCTION processgpt_sync_heartbeat_v1(
    p_consumer text,
    p_todo_ids uuid[],
    p_tokens uuid[],
    p_lease_seconds integer,
    p_server jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_instance text := p_server->>'instance';
    v_current text;
    v_new_run boolean := false;
    v_orphan_ids uuid[];
    v_orphan_tokens uuid[];
    v_orphans integer := 0;
    v_renewed jsonb;
BEGIN
    -- one registry change per consumer at a time (a stop and a late heartbeat may cross)
    PERFORM pg_advisory_xact_lock(hashtext('processgpt_sync_server'), hashtext(p_consumer));
    -- sent before its run stopped (or a newer run took its name), delivered after: it renews,
    -- registers and gives back nothing; a superseded run still sending keeps its mark fresh
    UPDATE processgpt_sync_server_stopped SET stopped_at = now() WHERE instance = v_instance;
    IF FOUND THEN
        RETURN jsonb_build_object('renewed', '[]'::jsonb, 'cancelled', '[]'::jsonb,
                                  'lost', coalesce(to_jsonb(p_todo_ids), '[]'::jsonb),
                                  'orphans', '[]'::jsonb, 'orphans_released', 0,
                                  'superseded', true);
    END IF;
    IF v_instance IS NOT NULL THEN
        SELECT s.instance INTO v_current FROM processgpt_sync_server s
        WHERE s.consumer = p_consumer;
        v_new_run := v_current IS DISTINCT FROM v_instance;
        IF v_new_run AND v_current IS NOT NULL THEN
            -- a new run under this name: the previous one ended without a clean stop
            INSERT INTO processgpt_sync_server_stopped (instance) VALUES (v_current)
            ON CONFLICT (instance) DO NOTHING;
        END IF;
    END IF;
    SELECT array_agg(l.todo_id), array_agg(l.claim_token)
    INTO v_orphan_ids, v_orphan_tokens
    FROM processgpt_sync_lease l
    WHERE l.consumer = p_consumer
      AND NOT l.todo_id = ANY(coalesce(p_todo_ids, '{}'))
      AND ((jsonb_typeof(p_server->'unanswered') = 'array'
            AND l.claim_call IN (SELECT processgpt_sync_uuid_or_null_v1(c)
                                 FROM jsonb_array_elements_text(p_server->'unanswered') c))
           OR (v_new_run AND l.instance IS DISTINCT FROM v_instance)
           OR (v_instance IS NULL AND jsonb_typeof(p_server->'known') = 'array'
               AND NOT l.todo_id::text IN (SELECT jsonb_array_elements_text(p_server->'known'))));
    IF v_orphan_ids IS NOT NULL THEN
        SELECT g.o_ids, g.o_released INTO v_orphan_ids, v_orphans
        FROM processgpt_sync_give_back_orphans_v1(v_orphan_ids, v_orphan_tokens) g;
    END IF;
    INSERT INTO processgpt_sync_server AS s
        (consumer, agent_orch, host, pid, version, heartbeat_seconds, running, completed, stats,
         instance)
    VALUES (p_consumer, coalesce(p_server->>'agent_orch', ''), p_server->>'host',
            (p_server->>'pid')::integer, p_server->>'version',
            coalesce((p_server->>'heartbeat_seconds')::real, 15),
            coalesce((p_server->>'running')::integer, 0),
            coalesce((p_server->>'completed')::bigint, 0),
            coalesce(p_server->'stats', '{}'::jsonb), v_instance)
    ON CONFLICT (consumer) DO UPDATE
    SET last_seen = now(), heartbeat_seconds = EXCLUDED.heartbeat_seconds,
        running = EXCLUDED.running, completed = EXCLUDED.completed, stats = EXCLUDED.stats,
        instance = EXCLUDED.instance,
        agent_orch = CASE WHEN v_new_run THEN EXCLUDED.agent_orch ELSE s.agent_orch END,
        host = CASE WHEN v_new_run THEN EXCLUDED.host ELSE s.host END,
        pid = CASE WHEN v_new_run THEN EXCLUDED.pid ELSE s.pid END,
        version = CASE WHEN v_new_run THEN EXCLUDED.version ELSE s.version END,
        started_at = CASE WHEN v_new_run THEN now() ELSE s.started_at END;
    DELETE FROM processgpt_sync_server WHERE last_seen < now() - interval '1 day';
    v_renewed := processgpt_sync_renew_v1(p_consumer, coalesce(p_todo_ids, '{}'),
                                          coalesce(p_tokens, '{}'), p_lease_seconds);
    -- last, 1 s at most: a todo the look requeues stays locked only until the commit that
    -- follows, not while the renewals wait for a lease a batch of outcomes holds
    PERFORM processgpt_sync_take_held_answers_v1(1);
    RETURN v_renewed
           || jsonb_build_object('orphans', coalesce(to_jsonb(v_orphan_ids), '[]'::jsonb),
                                 'orphans_released', v_orphans);
END
$$;

-- A server stopped: remove its registry row, remember its run (p_instance) so that a
-- heartbeat of it still on its way is ignored, and give back the claims of the calls it got no
-- answer to (p_unanswered, as its heartbeat names them: the claim committed, the server never
-- learned of it, and no heartbeat named it since), rather than leave them to their leases'
-- expiry and count them as one more claim. Its other leases are left alone: an outcome it
-- could not write in time may still be on its way. A claim of the run under way is waited for
-- (the lock below), a later one is refused. Only that run's row is removed: a stop the network
-- delivers after a new run took the name leaves the new run alone. True if there was a row.
CREATE OR REPLACE FUNCTION processgpt_sync_server_stopped_v3(p_consumer text, p_instance text,
                                                             p_unanswered jsonb)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_gone boolean;
    v_ids uuid[];
    v_tokens uuid[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('processgpt_sync_server'), hashtext(p_consumer));
    DELETE FROM processgpt_sync_server_stopped WHERE stopped_at < now() - interval '1 day';
    IF p_instance IS NOT NULL THEN
        INSERT INTO processgpt_sync_server_stopped (instance) VALUES (p_instance)
        ON CONFLICT (instance) DO NOTHING;
    END IF;
    IF jsonb_typeof(p_unanswered) = 'array' THEN
        SELECT array_agg(l.todo_id ORDER BY l.todo_id), array_agg(l.claim_token ORDER BY l.todo_id)
        INTO v_ids, v_tokens
        FROM processgpt_sync_lease l
        WHERE l.consumer = p_consumer AND NOT l.given_back
          AND l.claim_call IN (SELECT processgpt_sync_uuid_or_null_v1(c)
                               FROM jsonb_array_elements_text(p_unanswered) c);
        IF v_ids IS NOT NULL THEN
            PERFORM processgpt_sync_give_back_orphans_v1(v_ids, v_tokens);
        END IF;
    END IF;
    WITH gone AS (DELETE FROM processgpt_sync_server
                  WHERE consumer = p_consumer AND instance IS NOT DISTINCT FROM p_instance
                  RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone) INTO v_gone;
    RETURN v_gone;
END
$$;

CREATE OR REPLACE FUNCTION processgpt_sync_server_stopped_v2(p_consumer text, p_instance text)
RETURNS boolean LANGUAGE sql AS $$  -- servers of earlier versions
    SELECT processgpt_sync_server_stopped_v3(p_consumer, p_instance, NULL)
$$;

-- The stop of servers of an earlier version (they name no run): remove the row.
CREATE OR REPLACE FUNCTION processgpt_sync_server_stopped_v1(p_consumer text)
RETURNS boolean LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM processgpt_sync_server WHERE consumer = p_consumer RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$$;

-- The registry: servers (of one agent_orch, or one consumer, or all), each with `alive` false
-- when its last heartbeat is older than three heartbeat intervals, and seconds since it.
CREATE OR REPLACE FUNCTION processgpt_sync_servers_v1(
    p_agent_orch text DEFAULT NULL,
    p_consumer text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'consumer', s.consumer, 'agent_orch', s.agent_orch, 'host', s.host,
               'pid', s.pid, 'version', s.version, 'started_at', s.started_at,
               'last_seen', s.last_seen, 'heartbeat_seconds', s.heartbeat_seconds,
               'seen_seconds_ago', round(extract(epoch FROM now() - s.last_seen)::numeric, 1),
               'alive', s.last_seen >= now() - make_interval(secs => 3 * s.heartbeat_seconds),
               'running', s.running, 'completed', s.completed, 'stats', s.stats)
               ORDER BY s.agent_orch, s.started_at), '[]'::jsonb)
    FROM processgpt_sync_server s
    WHERE (p_agent_orch IS NULL OR s.agent_orch = p_agent_orch)
      AND (p_consumer IS NULL OR s.consumer = p_consumer)
$$;

-- Wait up to p_seconds for work a claim of p_agent_orch would act on (a claimable todo, or an
-- expired claim to settle), checking every 100 ms; true as soon as there is some, false when the
-- time is up. For servers that cannot LISTEN (Supabase, through PostgREST): one call replaces
-- dozens of empty claims, at the price of one database connection held while it waits. The wait
-- stays a second inside the caller's statement_timeout, and the look that follows half a
-- second, so a role's timeout never cancels the call. Answers whose todos were held when they
-- came are requeued there where free (take_held_answers_v1), as the heartbeat an idle server
-- makes none of would. It ends by refreshing the caller's registry row (last_seen only; not
-- while a heartbeat of the caller's holds it, which refreshes it itself), so an idle server
-- stays alive in the registry without heartbeats. now() is the call's start: a
-- lease that expires during the wait is seen by the next call.
CREATE OR REPLACE FUNCTION processgpt_sync_wait_for_work_v1(
    p_agent_orch text,
    p_consumer text,
    p_seconds real DEFAULT 5,
    p_tenant_id text DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_timeout real := extract(epoch FROM current_setting('statement_timeout')::interval);
    v_until timestamptz := clock_timestamp() + make_interval(secs => greatest(0, least(
        coalesce(p_seconds, 0), 30, CASE WHEN v_timeout > 0 THEN v_timeout - 1 ELSE 30 END)));
    v_found boolean;
BEGIN
    LOOP
        SELECT EXISTS (
            SELECT 1 FROM todolist t
            WHERE t.agent_orch::text = p_agent_orch
              AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
              AND t.status = 'IN_PROGRESS'
              AND (t.draft_status IS NULL OR t.draft_status = 'FB_REQUESTED')
              AND processgpt_sync_is_claimable_v1(t, NULL))
        OR EXISTS (
            SELECT 1 FROM processgpt_sync_lease l
            JOIN todolist t ON t.id = l.todo_id AND t.claim_token = l.claim_token
            WHERE l.expires_at < now() AND t.agent_orch::text = p_agent_orch
              AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
              AND t.draft_status IN ('STARTED', 'HUMAN_ASKED')
              AND (t.status IN ('CANCELLED', 'DONE')
                   OR (t.status = 'SUBMITTED' AND (t.consumer IS NULL OR t.consumer = l.consumer))
                   OR (t.status = 'IN_PROGRESS' AND (t.consumer IS NULL OR t.consumer = l.consumer)
                       AND (t.lease_until IS NULL OR t.lease_until < now())
                       AND NOT processgpt_sync_in_trash_v1(t.proc_inst_id,
                                                           t.root_proc_inst_id))))
        OR EXISTS (  -- an upstream worker's claim that ran out: settled or claimed as the
                     -- claim's own probe (claims_expired_v1) finds it
            SELECT 1 FROM todolist t
            WHERE t.draft_status = 'STARTED' AND t.lease_until < now()
              AND t.status IN ('IN_PROGRESS', 'CANCELLED')
              AND t.agent_orch::text = p_agent_orch
              AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
              AND (t.status = 'CANCELLED'
                   OR NOT processgpt_sync_in_trash_v1(t.proc_inst_id, t.root_proc_inst_id)))
        INTO v_found;
        EXIT WHEN v_found OR clock_timestamp() >= v_until;
        PERFORM pg_sleep(0.1);
    END LOOP;
    -- answers whose todos were held when they came, looked at last: what the look writes
    -- (a todo requeued, one unlisted) is committed as the call returns, never kept through
    -- the wait, where it would hold up the UI's next answer to that todo (its listing waits
    -- for the unlisting); a requeued todo is work, of this server or another
    v_found := processgpt_sync_take_held_answers_v1(0.5) > 0 OR v_found;
    -- not while a heartbeat of the caller's holds the row (it refreshes it itself): that
    -- would keep what the look wrote locked, and might run into the statement timeout
    UPDATE processgpt_sync_server s SET last_seen = clock_timestamp()
    WHERE s.consumer IN (SELECT x.consumer FROM processgpt_sync_server x
                         WHERE x.consumer = p_consumer FOR NO KEY UPDATE SKIP LOCKED);
    RETURN v_found;
END
$$;

-- Console: an open console keeps change notifications on for p_seconds more (it calls this
-- again before they run out). True.
CREATE OR REPLACE FUNCTION processgpt_sync_console_watch_v1(p_console text, p_seconds integer)
RETURNS boolean LANGUAGE sql AS $$
    INSERT INTO processgpt_sync_console_watch AS w (console, expires_at)
    VALUES (p_console, now() + make_interval(secs => p_seconds))
    ON CONFLICT (console) DO UPDATE SET expires_at = EXCLUDED.expires_at
    RETURNING true
$$;

-- Console: a console closed; its notifications stop (rows of consoles that expired go too).
-- True if it was watching.
CREATE OR REPLACE FUNCTION processgpt_sync_console_unwatch_v1(p_console text)
RETURNS boolean LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM processgpt_sync_console_watch
                  WHERE console = p_console OR expires_at < now() RETURNING console)
    SELECT EXISTS (SELECT 1 FROM gone WHERE console = p_console)
$$;

-- Console (`processgpt-sync console`): something about a todo changed, on
-- 'processgpt_sync_event' with the todo id as payload: events were written for it, or its row
-- was inserted or updated. One NOTIFY per todo and statement, so a batch of events costs one;
-- none while no console watches (see processgpt_sync_console_watch).
CREATE OR REPLACE FUNCTION processgpt_sync_changed_notify_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM processgpt_sync_console_watch WHERE expires_at > now()) THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'events' THEN
        PERFORM processgpt_sync_notify_text_v1('processgpt_sync_event', c.todo_id)
        FROM (SELECT DISTINCT coalesce(n.todo_id::text, '') AS todo_id
              FROM processgpt_sync_changed n) c;
    ELSE
        PERFORM pg_notify('processgpt_sync_event', c.id)
        FROM (SELECT DISTINCT n.id::text AS id FROM processgpt_sync_changed n) c;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS processgpt_sync_event_changed ON events;
CREATE TRIGGER processgpt_sync_event_changed
    AFTER INSERT ON events REFERENCING NEW TABLE AS processgpt_sync_changed
    FOR EACH STATEMENT EXECUTE FUNCTION processgpt_sync_changed_notify_v1();
DROP TRIGGER IF EXISTS processgpt_sync_todo_inserted ON todolist;
CREATE TRIGGER processgpt_sync_todo_inserted
    AFTER INSERT ON todolist REFERENCING NEW TABLE AS processgpt_sync_changed
    FOR EACH STATEMENT EXECUTE FUNCTION processgpt_sync_changed_notify_v1();
DROP TRIGGER IF EXISTS processgpt_sync_todo_updated ON todolist;
CREATE TRIGGER processgpt_sync_todo_updated
    AFTER UPDATE ON todolist REFERENCING NEW TABLE AS processgpt_sync_changed
    FOR EACH STATEMENT EXECUTE FUNCTION processgpt_sync_changed_notify_v1();

-- The state a person reads: CANCELLED (either column, or a run or wait its step's status DONE
-- ended), QUEUED (claimable, never run), else draft_status, else the platform's status. Text
-- arguments: any install's column types fit.
CREATE OR REPLACE FUNCTION processgpt_sync_state_v1(p_status text, p_draft_status text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_draft_status = 'CANCELLED' OR p_status = 'CANCELLED' THEN 'CANCELLED'
        WHEN p_status = 'DONE' AND p_draft_status IN ('STARTED', 'HUMAN_ASKED', 'FB_REQUESTED')
            THEN 'CANCELLED'
        -- a run someone else submitted the step's result under (the platform's /complete)
        WHEN p_status = 'SUBMITTED' AND p_draft_status IN ('STARTED', 'HUMAN_ASKED')
            THEN 'CANCELLED'
        -- answered or revised, of a step its process has not reached or has taken: it runs
        -- once the step is IN_PROGRESS (FB_REQUESTED alone is the claimable kind)
        WHEN p_draft_status = 'FB_REQUESTED' AND p_status IS DISTINCT FROM 'IN_PROGRESS'
            THEN 'WAITING_FOR_STEP'
        WHEN p_draft_status IS NOT NULL THEN p_draft_status
        WHEN p_status = 'IN_PROGRESS' THEN 'QUEUED'
        ELSE coalesce(p_status, 'NEW')
    END
$$;

-- The state a person reads (v2: QUEUED only for a todo a server would claim; v1 showed a
-- person's task, or an agent's step whose draft someone already wrote, as QUEUED too):
-- CANCELLED (either column, or a run or wait its step's status DONE ended), QUEUED (an agent's
-- step in progress with neither draft_status nor draft), else draft_status, else the
-- platform's status. Text arguments: any install's column types fit.
CREATE OR REPLACE FUNCTION processgpt_sync_state_v2(
    p_status text, p_draft_status text, p_agent_mode text, p_has_draft boolean)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_draft_status IS NULL AND p_status = 'IN_PROGRESS'
             AND p_agent_mode IN ('DRAFT', 'COMPLETE') AND NOT coalesce(p_has_draft, false)
            THEN 'QUEUED'
        WHEN p_draft_status IS NULL AND p_status = 'IN_PROGRESS' THEN 'IN_PROGRESS'
        ELSE processgpt_sync_state_v1(p_status, p_draft_status)
    END
$$;

-- Console todo list: the newest p_limit todos matching the filters (NULL: any), with the
-- agent_orch and tenant values to filter by and the counts per state. Two passes over todolist
-- (which has no index for them on a platform database): the page finds its ids first and
-- builds rows for those alone, and one grouping by agent_orch, tenant and state gives the
-- counts and both filter lists (three scans before, 2.4 times slower on 500,000 todos).
CREATE OR REPLACE FUNCTION processgpt_sync_console_todos_v1(
    p_agent_orch text DEFAULT NULL,
    p_tenant_id text DEFAULT NULL,
    p_state text DEFAULT NULL,
    p_limit integer DEFAULT 100)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT t.id FROM todolist t
        WHERE (p_agent_orch IS NULL OR t.agent_orch::text = p_agent_orch)
          AND (p_tenant_id IS NULL OR t.tenant_id = p_tenant_id)
          AND (p_state IS NULL
               OR processgpt_sync_state_v2(t.status::text, t.draft_status::text,
                                           t.agent_mode::text, t.draft IS NOT NULL) = p_state)
        ORDER BY t.start_date DESC NULLS LAST, t.id
        LIMIT greatest(coalesce(p_limit, 100), 1)
    ), groups AS MATERIALIZED (
        SELECT t.agent_orch::text AS agent_orch, t.tenant_id,
               processgpt_sync_state_v2(t.status::text, t.draft_status::text,
                                        t.agent_mode::text, t.draft IS NOT NULL) AS state,
               count(*) AS n
        FROM todolist t GROUP BY 1, 2, 3
    )
    SELECT jsonb_build_object(
        'todos', (SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.start_date DESC NULLS LAST,
                                                              s.id), '[]'::jsonb)
                  FROM (SELECT t.id, t.agent_orch::text AS agent_orch, t.tenant_id,
                               t.activity_name, t.agent_mode::text AS agent_mode,
                               t.status::text AS status, t.draft_status::text AS draft_status,
                               t.consumer, t.start_date, t.updated_at,
                               left(coalesce(t.query, t.description), 200) AS input,
                               processgpt_sync_state_v2(
                                   t.status::text, t.draft_status::text, t.agent_mode::text,
                                   t.draft IS NOT NULL) AS state,
                               -- the page's rows alone: a lookup each, none for the counts
                               processgpt_sync_in_trash_v1(t.proc_inst_id,
                                                           t.root_proc_inst_id) AS in_trash
                        FROM todolist t JOIN page p ON p.id = t.id) s),
        'counts', (SELECT coalesce(jsonb_object_agg(c.state, c.n), '{}'::jsonb)
                   FROM (SELECT g.state, sum(g.n)::bigint AS n FROM groups g
                         WHERE (p_agent_orch IS NULL OR g.agent_orch = p_agent_orch)
                           AND (p_tenant_id IS NULL OR g.tenant_id = p_tenant_id)
                         GROUP BY g.state) c),
        'agent_orchs', (SELECT coalesce(jsonb_agg(DISTINCT g.agent_orch), '[]'::jsonb)
                        FROM groups g WHERE g.agent_orch IS NOT NULL),
        'tenants', (SELECT coalesce(jsonb_agg(DISTINCT g.tenant_id), '[]'::jsonb)
                    FROM groups g WHERE g.tenant_id IS NOT NULL))
$$;


-- Console todo page (v2: a page of events from a place on, so a live page reads a burst
-- larger than one page in full; v1 gave the newest p_limit from p_since and skipped the rest).
-- The row (without its fencing token) and state, its open questions, and its events in
-- ("timestamp", id) order: with p_since NULL the newest p_limit; else the first p_limit after
-- (p_since, p_after_id), p_since itself included when p_after_id is NULL.
CREATE OR REPLACE FUNCTION processgpt_sync_console_todo_v2(
    p_todo_id uuid,
    p_since timestamptz DEFAULT NULL,
    p_after_id text DEFAULT NULL,
    p_limit integer DEFAULT 500)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'todo', to_jsonb(t) - 'claim_token' || jsonb_build_object(
                    'state', processgpt_sync_state_v2(t.status::text, t.draft_status::text,
                                                      t.agent_mode::text, t.draft IS NOT NULL),
                    'in_trash', processgpt_sync_in_trash_v1(t.proc_inst_id,
                                                            t.root_proc_inst_id)),
        'events', (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e."timestamp" NULLS FIRST,
                                                               e.id), '[]'::jsonb)
                   FROM ((SELECT ev.id::text AS id, ev.job_id,
                                 ev.event_type::text AS event_type, ev.crew_type,
                                 ev.status::text AS status, ev.data, ev."timestamp"
                          FROM events ev
                          WHERE p_since IS NULL AND ev.todo_id = t.id::text
                          ORDER BY ev."timestamp" DESC NULLS LAST, ev.id::text DESC
                          LIMIT greatest(coalesce(p_limit, 500), 1))
                         UNION ALL
                         (SELECT ev.id::text, ev.job_id, ev.event_type::text, ev.crew_type,
                                 ev.status::text, ev.data, ev."timestamp"
                          FROM events ev
                          WHERE p_since IS NOT NULL AND ev.todo_id = t.id::text
                            AND (ev."timestamp", ev.id::text) > (p_since, coalesce(p_after_id, ''))
                          ORDER BY ev."timestamp", ev.id::text
                          LIMIT greatest(coalesce(p_limit, 500), 1))) e),
        'questions', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                 'job_id', q.job_id, 'todo_id', q.todo_id, 'question', q.data,
                                 'asked_at', q."timestamp")
                                 ORDER BY q."timestamp"), '[]'::jsonb)
                      FROM processgpt_sync_awaited_question_v1(t) q
                      WHERE NOT EXISTS (SELECT 1 FROM processgpt_sync_answer_to_v1(
                                            q.job_id, q.todo_id, q."timestamp"))))
    FROM todolist t WHERE t.id = p_todo_id
$$;

-- The first console todo page (kept for consoles of an earlier version): v2's row, state and
-- questions, with the newest p_limit events from p_since on. NULL for an unknown todo.
CREATE OR REPLACE FUNCTION processgpt_sync_console_todo_v1(
    p_todo_id uuid,
    p_since timestamptz DEFAULT NULL,
    p_limit integer DEFAULT 500)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT d || jsonb_build_object(
        'events', (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e."timestamp", e.id),
                                   '[]'::jsonb)
                   FROM (SELECT ev.id, ev.job_id, ev.event_type::text AS event_type,
                                ev.crew_type, ev.status::text AS status, ev.data, ev."timestamp"
                         FROM events ev
                         WHERE ev.todo_id = p_todo_id::text
                           AND (p_since IS NULL OR ev."timestamp" >= p_since)
                         ORDER BY ev."timestamp" DESC, ev.id DESC
                         LIMIT greatest(coalesce(p_limit, 500), 1)) e))
    FROM processgpt_sync_console_todo_v2(p_todo_id, NULL, NULL, 1) d
    WHERE d IS NOT NULL
$$;

-- Cancel a todo as the ProcessGPT UI does: status and draft_status CANCELLED. A running
-- server stops its executor at the next heartbeat (or at once through NOTIFY). Refused for
-- a finished todo, and for a todo that is not an agent's work in progress (a person's task, a
-- step its process moved past or has not reached). Returns {applied, reason, state}.
CREATE OR REPLACE FUNCTION processgpt_sync_cancel_v1(p_todo_id uuid)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_todo todolist;
    v_state text;
BEGIN
    SELECT * INTO v_todo FROM todolist WHERE id = p_todo_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('applied', false, 'reason', 'not_found');
    END IF;
    v_state := processgpt_sync_state_v2(v_todo.status::text, v_todo.draft_status::text,
                                        v_todo.agent_mode::text, v_todo.draft IS NOT NULL);
    IF v_state IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN
        RETURN jsonb_build_object('applied', false, 'reason', 'finished', 'state', v_state);
    END IF;
    -- Only an agent's work in progress: a person's task, or a step its process already took
    -- (SUBMITTED, DONE) or has not reached (TODO, PENDING), is the process's own business.
    IF v_state NOT IN ('QUEUED', 'STARTED', 'HUMAN_ASKED', 'FB_REQUESTED')  -- not WAITING_FOR_STEP
       -- a run (or a dead one) of a step the process took out of progress is the process's
       OR v_todo.status::text IS DISTINCT FROM 'IN_PROGRESS'
       OR v_todo.agent_mode IS NULL OR v_todo.agent_mode::text NOT IN ('DRAFT', 'COMPLETE') THEN
        RETURN jsonb_build_object('applied', false, 'reason', 'not_agent_work',
                                  'state', v_state);
    END IF;
    UPDATE todolist SET status = 'CANCELLED', draft_status = 'CANCELLED', updated_at = now()
    WHERE id = p_todo_id;
    RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'state', 'CANCELLED');
END
$$;

-- Ask for a revision of a finished todo as the ProcessGPT UI does: the feedback appended to
-- todolist.feedback as {time, content, user_id, kind: 'revision'} and draft_status
-- FB_REQUESTED, so it is claimed again with resume kind 'revision'. A result submitted to the
-- process (COMPLETE mode: status SUBMITTED) is taken back (status IN_PROGRESS) while no
-- platform worker holds it (consumer NULL); once one does, or the process took it (DONE), the
-- request is refused, as it is while the todo runs or waits. Returns {applied, reason, state}.
CREATE OR REPLACE FUNCTION processgpt_sync_request_revision_v1(
    p_todo_id uuid, p_feedback text, p_user_id text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_todo todolist;
    v_state text;
BEGIN
    -- blank: nothing but white space, Unicode's included (a lone newline, NBSP, U+3000)
    IF coalesce(p_feedback, '') ~ ('^[[:space:]\u0085\u00a0\u1680\u2000-\u200b\u2028\u2029'
                                   || '\u202f\u205f\u3000\ufeff]*$') THEN
        RETURN jsonb_build_object('applied', false, 'reason', 'empty_feedback');
    END IF;
    SELECT * INTO v_todo FROM todolist WHERE id = p_todo_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('applied', false, 'reason', 'not_found');
    END IF;
    v_state := processgpt_sync_state_v2(v_todo.status::text, v_todo.draft_status::text,
                                        v_todo.agent_mode::text, v_todo.draft IS NOT NULL);
    IF v_state NOT IN ('COMPLETED', 'FAILED') THEN
        RETURN jsonb_build_object('applied', false, 'reason', 'not_finished', 'state', v_state);
    END IF;
    IF v_todo.status::text = 'DONE' THEN  -- the process took its result and moved on
        RETURN jsonb_build_object('applied', false, 'reason', 'process_moved_on',
                                  'state', v_state);
    END IF;
    IF v_todo.status::text = 'SUBMITTED' AND v_todo.consumer IS NOT NULL THEN
        -- a platform worker is completing the step with the submitted result
        RETURN jsonb_build_object('applied', false, 'reason', 'process_taking',
                                  'state', v_state, 'consumer', v_todo.consumer);
    END IF;
    UPDATE todolist t
    SET draft_status = 'FB_REQUESTED', updated_at = now(),
        status = CASE WHEN t.status::text = 'SUBMITTED' THEN 'IN_PROGRESS'::todo_status
                      ELSE t.status END,
        feedback = CASE WHEN jsonb_typeof(t.feedback) = 'array' THEN t.feedback ELSE '[]'::jsonb
                   END || jsonb_build_array(jsonb_build_object(
                       'time', now(), 'content', p_feedback, 'user_id', p_user_id,
                       'kind', 'revision'))
    WHERE t.id = p_todo_id
    RETURNING processgpt_sync_state_v2(t.status::text, t.draft_status::text,
                                       t.agent_mode::text, t.draft IS NOT NULL) INTO v_state;
    -- FB_REQUESTED, or WAITING_FOR_STEP for a step its process has not reached (TODO, PENDING)
    RETURN jsonb_build_object('applied', true, 'reason', 'ok', 'state', v_state);
END
$$;

-- Console charts: finished todos per p_bucket_seconds over the last p_minutes, oldest first,
-- with the mean time from start_date to the outcome.
CREATE OR REPLACE FUNCTION processgpt_sync_console_activity_v1(
    p_agent_orch text DEFAULT NULL,
    p_minutes integer DEFAULT 10,
    p_bucket_seconds integer DEFAULT 10)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'now', now(), 'bucket_seconds', p_bucket_seconds,
        'buckets', coalesce(jsonb_agg(jsonb_build_object(
            'start', b.start, 'completed', b.completed, 'failed', b.failed,
            'turnaround_seconds', b.turnaround) ORDER BY b.start), '[]'::jsonb))
    FROM (
        SELECT to_timestamp(floor(extract(epoch FROM t.updated_at) / p_bucket_seconds)
                            * p_bucket_seconds) AS start,
               count(*) FILTER (WHERE t.draft_status = 'COMPLETED') AS completed,
               count(*) FILTER (WHERE t.draft_status = 'FAILED') AS failed,
               -- each as seconds: the platform's start_date, a timestamp without time zone
               -- holding UTC, is not shifted by the session's TimeZone
               round(avg(extract(epoch FROM t.updated_at) - extract(epoch FROM t.start_date))
                     ::numeric, 3) AS turnaround
        FROM todolist t
        WHERE t.draft_status IN ('COMPLETED', 'FAILED')
          AND t.updated_at >= now() - make_interval(mins => p_minutes)
          AND (p_agent_orch IS NULL OR t.agent_orch::text = p_agent_orch)
        GROUP BY 1
    ) b
$$;

-- Only the service role (Supabase) or the owner may call these; never anon or authenticated.
DO $$
DECLARE
    f record;
    r text;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.proname LIKE 'processgpt\_sync\_%' AND n.nspname = current_schema()
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', f.sig, r);
            END IF;
        END LOOP;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f.sig);
        END IF;
    END LOOP;
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('REVOKE ALL ON processgpt_sync_lease FROM %I', r);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        GRANT ALL ON processgpt_sync_lease TO service_role;
    END IF;
    -- The triggers run as the role writing the row (the ProcessGPT UI's, another agent's):
    -- what they call must be executable by that role. None of these functions reaches past
    -- the caller's own privileges, but list_held_answer_v1 (below), which runs with its
    -- owner's, only from a trigger, and only lists an existing todo of this library for the
    -- servers to look at.
    GRANT EXECUTE ON FUNCTION processgpt_sync_notify_text_v1(text, text) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_uuid_or_null_v1(text) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_take_answer_v1(uuid) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_todo_free_v1(uuid, integer) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_list_held_answer_v1(uuid) TO PUBLIC;
    -- with its owner's rights: its names resolve in pg_catalog first (no operator another
    -- role creates in this schema is run with them), then this schema, pg_temp last
    EXECUTE format('ALTER FUNCTION processgpt_sync_list_held_answer_v1(uuid) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    GRANT EXECUTE ON FUNCTION processgpt_sync_answer_to_v1(text, text, timestamptz) TO PUBLIC;
    -- the cancel under roots deleted for good, whatever role runs the platform's cron job
    GRANT EXECUTE ON FUNCTION processgpt_sync_cancel_under_gone_roots_v1(text[]) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_cancel_gone_v1(uuid[]) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_free_of_held_insts_v1(uuid[]) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_lock_proc_insts_v1(uuid[], boolean, integer)
        TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_lock_by_v1(text, uuid, timestamptz) TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_has_proc_insts_v1() TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_has_projects_v1() TO PUBLIC;
    GRANT EXECUTE ON FUNCTION processgpt_sync_root_gone_v1(text, text) TO PUBLIC;
END
$$;

-- PostgREST (Supabase's REST API) keeps a cache of the functions it can call: told to reload
-- it, the functions above are callable at once, not after its next restart. Sent when this
-- transaction commits; nothing listens on a plain PostgreSQL, and a rolled-back install sends
-- nothing.
NOTIFY pgrst, 'reload schema';
