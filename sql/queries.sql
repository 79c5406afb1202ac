-- Named queries used by the Postgres backend; each calls one function of functions.sql.
-- The Supabase backend calls the same function with the same named arguments through rpc().
-- Format: `-- name --`, one comment line saying what it does, then the SQL.

-- claim --
-- Claim up to p_limit todos for an agent_orch (tenants in turn, fleet-wide limits), with leases, tokens and context extras, and how many were left for later (process instance held, or trashed during the wait)
SELECT processgpt_sync_claim_v4(p_agent_orch => %(p_agent_orch)s::text, p_consumer => %(p_consumer)s::text, p_limit => %(p_limit)s::integer, p_lease_seconds => %(p_lease_seconds)s::integer, p_max_claims => %(p_max_claims)s::integer, p_tenant_id => %(p_tenant_id)s::text, p_fair => %(p_fair)s::boolean, p_max_running => %(p_max_running)s::integer, p_max_running_per_tenant => %(p_max_running_per_tenant)s::integer, p_call => %(p_call)s::uuid, p_instance => %(p_instance)s::text)

-- record_events --
-- Write a batch of events in order; invalid or unowned ones are rejected one by one
SELECT processgpt_sync_record_events_v1(p_events => %(p_events)s::jsonb)

-- save_result --
-- Write pending events, then an intermediate draft or the final result (fenced)
SELECT processgpt_sync_save_result_v1(p_todo_id => %(p_todo_id)s::uuid, p_token => %(p_token)s::uuid, p_result => %(p_result)s::jsonb, p_final => %(p_final)s::boolean, p_events => %(p_events)s::jsonb)

-- fail --
-- Write pending events, then mark the todo FAILED with its error message (fenced)
SELECT processgpt_sync_fail_v1(p_todo_id => %(p_todo_id)s::uuid, p_token => %(p_token)s::uuid, p_error => %(p_error)s::text, p_events => %(p_events)s::jsonb)

-- suspend --
-- Write pending events, then HUMAN_ASKED with the lease released (fenced)
SELECT processgpt_sync_suspend_v1(p_todo_id => %(p_todo_id)s::uuid, p_token => %(p_token)s::uuid, p_events => %(p_events)s::jsonb)

-- finish --
-- Record the outcomes (result, failure, question) of many todos in one transaction
SELECT processgpt_sync_finish_v1(p_items => %(p_items)s::jsonb)

-- ask --
-- Ask a person: pending events, human_asked event, notifications; or reuse an earlier answer
SELECT processgpt_sync_ask_v1(p_todo_id => %(p_todo_id)s::uuid, p_token => %(p_token)s::uuid, p_job_id => %(p_job_id)s::text, p_question => %(p_question)s::jsonb, p_events => %(p_events)s::jsonb)

-- answer --
-- The answer to a question, if any yet (the todo then runs again)
SELECT processgpt_sync_answer_v1(p_todo_id => %(p_todo_id)s::uuid, p_token => %(p_token)s::uuid, p_job_id => %(p_job_id)s::text)

-- resume_asking --
-- Stop waiting for an answer: the todo runs on
SELECT processgpt_sync_resume_asking_v1(p_todo_id => %(p_todo_id)s::uuid, p_token => %(p_token)s::uuid)

-- respond --
-- Answer a question as the ProcessGPT UI does
SELECT processgpt_sync_respond_v2(p_job_id => %(p_job_id)s::text, p_answer => %(p_answer)s::jsonb, p_user_id => %(p_user_id)s::text, p_todo_id => %(p_todo_id)s::text)

-- open_questions --
-- Questions still waiting for an answer
SELECT processgpt_sync_open_questions_v1(p_agent_orch => %(p_agent_orch)s::text)

-- release --
-- Give claims back so the todos are claimable again; name those whose process instance is held
SELECT processgpt_sync_release_v2(p_todo_ids => %(p_todo_ids)s::uuid[], p_tokens => %(p_tokens)s::uuid[])

-- renew --
-- Renew the leases of all in-flight todos; report lost and cancelled ones
SELECT processgpt_sync_renew_v1(p_consumer => %(p_consumer)s::text, p_todo_ids => %(p_todo_ids)s::uuid[], p_tokens => %(p_tokens)s::uuid[], p_lease_seconds => %(p_lease_seconds)s::integer)

-- heartbeat --
-- Renew the leases of all in-flight todos and refresh this server's registry row, in one call
SELECT processgpt_sync_heartbeat_v1(p_consumer => %(p_consumer)s::text, p_todo_ids => %(p_todo_ids)s::uuid[], p_tokens => %(p_tokens)s::uuid[], p_lease_seconds => %(p_lease_seconds)s::integer, p_server => %(p_server)s::jsonb)

-- wait_for_work --
-- Wait server-side until there is work to claim (or the time is up); refreshes the registry row
SELECT processgpt_sync_wait_for_work_v1(p_agent_orch => %(p_agent_orch)s::text, p_consumer => %(p_consumer)s::text, p_seconds => %(p_seconds)s::real, p_tenant_id => %(p_tenant_id)s::text)

-- server_stopped --
-- Remove a stopped server's registry row; give back the claims of calls it got no answer to
SELECT processgpt_sync_server_stopped_v3(p_consumer => %(p_consumer)s::text, p_instance => %(p_instance)s::text, p_unanswered => %(p_unanswered)s::jsonb)

-- servers --
-- The server registry, with each server's liveness
SELECT processgpt_sync_servers_v1(p_agent_orch => %(p_agent_orch)s::text, p_consumer => %(p_consumer)s::text)

-- enqueue --
-- Insert a claimable todo and return its id
SELECT processgpt_sync_enqueue_v1(p_agent_orch => %(p_agent_orch)s::text, p_input => %(p_input)s::text, p_agent_mode => %(p_agent_mode)s::text, p_tenant_id => %(p_tenant_id)s::text, p_activity_name => %(p_activity_name)s::text, p_proc_inst_id => %(p_proc_inst_id)s::text, p_user_id => %(p_user_id)s::text)

-- event_types --
-- The labels of the database's event_type_enum
SELECT processgpt_sync_event_types_v1()

-- status --
-- Todo counts by agent_orch and draft_status
SELECT processgpt_sync_status_v1(p_agent_orch => %(p_agent_orch)s::text)

-- tenant_load --
-- Queued and running todos per agent_orch and tenant
SELECT processgpt_sync_tenant_load_v1(p_agent_orch => %(p_agent_orch)s::text)

-- notify_health --
-- Send a NOTIFY the health check's listener must hear
SELECT processgpt_sync_notify_health_v1()

-- schema --
-- Names of the installed processgpt_sync functions
SELECT processgpt_sync_schema_v1()

-- schema_warnings --
-- What the installed schema does not yet know of this database, each with its fix
SELECT processgpt_sync_schema_warnings_v1()

-- show --
-- One todo: its row, whether it is claimable, its lease and its events
SELECT processgpt_sync_show_v1(p_todo_id => %(p_todo_id)s::text)

-- retry --
-- Make a FAILED or CANCELLED todo claimable again, or say why not
SELECT processgpt_sync_retry_v1(p_todo_id => %(p_todo_id)s::text)

-- console_watch --
-- An open console keeps change notifications on for p_seconds more
SELECT processgpt_sync_console_watch_v1(p_console => %(p_console)s::text, p_seconds => %(p_seconds)s::integer)

-- console_unwatch --
-- A console closed: its change notifications stop
SELECT processgpt_sync_console_unwatch_v1(p_console => %(p_console)s::text)

-- console_todos --
-- Console: the newest todos matching agent_orch, tenant and state, with filter values and counts
SELECT processgpt_sync_console_todos_v1(p_agent_orch => %(p_agent_orch)s::text, p_tenant_id => %(p_tenant_id)s::text, p_state => %(p_state)s::text, p_limit => %(p_limit)s::integer)

-- console_todo --
-- Console: one todo, a page of its events (the newest, or the first after a place), and its open questions
SELECT processgpt_sync_console_todo_v2(p_todo_id => %(p_todo_id)s::uuid, p_since => %(p_since)s::timestamptz, p_after_id => %(p_after_id)s::text, p_limit => %(p_limit)s::integer)

-- console_activity --
-- Console: finished todos per time bucket over the last minutes
SELECT processgpt_sync_console_activity_v1(p_agent_orch => %(p_agent_orch)s::text, p_minutes => %(p_minutes)s::integer, p_bucket_seconds => %(p_bucket_seconds)s::integer)

-- cancel --
-- Cancel a todo as the ProcessGPT UI does (status and draft_status CANCELLED)
SELECT processgpt_sync_cancel_v1(p_todo_id => %(p_todo_id)s::uuid)

-- request_revision --
-- Ask for a revision of a finished todo with feedback, as the ProcessGPT UI does (FB_REQUESTED)
SELECT processgpt_sync_request_revision_v1(p_todo_id => %(p_todo_id)s::uuid, p_feedback => %(p_feedback)s::text, p_user_id => %(p_user_id)s::text)
