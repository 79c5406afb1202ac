"""The life of a todo (docs/todo-life.md), transition by transition, on both backends.

Each test names the transition it checks; the table in docs/todo-life.md points here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

import processgpt_sync as ps
from processgpt_sync.events import make_event
from processgpt_sync.human import question_data
from processgpt_sync.storage.install import install_schema
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import (
    SUPABASE_ROLES_SQL,
    lock_the_todo_during_a_wait_for_work,
    open_backend,
    wait_for,
)

LEASE = {"lease_seconds": 60, "max_claims": 3}


@pytest.fixture(params=["postgres", "supabase"])
def storage(request, database_url):
    yield from open_backend(request.param, database_url)


def claim(storage, consumer="w1", limit=10, **kw):
    return storage.claim(agent_orch="life", consumer=consumer, limit=limit, **{**LEASE, **kw})


def expire_leases(db):
    db.execute("UPDATE processgpt_sync_lease SET expires_at = now() - interval '1 second'")


def answer_as_the_ui(db, job_id, answer):
    db.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
               "(%s, %s, 'human_response', jsonb_build_object('answer', %s::jsonb), 'APPROVED')",
               (str(uuid.uuid4()), job_id, json.dumps(answer)))


def state(db, todo_id):
    return db.execute("SELECT draft_status::text, status::text, consumer, draft, claim_count "
                      "FROM todolist WHERE id = %s", (todo_id,)).fetchone()


def questions(db, todo_id):
    return [r["job_id"] for r in db.execute(
        "SELECT job_id FROM events WHERE todo_id = %s AND event_type = 'human_asked' "
        "ORDER BY timestamp", (todo_id,))]


# -- revision and cancel ---------------------------------------------------------------------------


# A status the UI or the process sets to end a step: CANCELLED, or DONE when a person (or the
# process) finished the step while the agent worked on it. Both stop the run the same way.
ENDED = pytest.mark.parametrize("ended", ["CANCELLED", "DONE"])
# ... and, for a running claim, SUBMITTED: a person submitted the step's result through the
# platform's /complete, which writes the whole row: status SUBMITTED, their output, no
# consumer; or the process submitted the step itself (a service task's, a subprocess's parent
# step), writing the status alone
ENDED_UNDER_CLAIM = pytest.mark.parametrize(
    "ended", ["CANCELLED", "DONE", "SUBMITTED", "SUBMITTED by the process"])
PERSONS_OUTPUT = {"by": "a person"}


def end_step(db, todo_id, ended):
    if ended == "SUBMITTED":
        db.execute("UPDATE todolist SET status = 'SUBMITTED', output = %s, consumer = NULL "
                   "WHERE id = %s", (Jsonb(PERSONS_OUTPUT), todo_id))
    else:
        db.execute("UPDATE todolist SET status = %s WHERE id = %s", (status_of(ended), todo_id))


def status_of(ended):
    return ended.split()[0]


def output_after(ended):
    """What the step keeps: the person's submitted result, or none."""
    return PERSONS_OUTPUT if ended == "SUBMITTED" else None


@ENDED
def test_a_revision_the_ui_cancelled_is_not_claimed(storage, db, ended):
    todo_id = storage.enqueue("life", "q")
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', status = %s "
               "WHERE id = %s", (ended, todo_id))
    assert claim(storage) == []


@pytest.mark.parametrize("status", ["TODO", "NEW", "PENDING", "SUBMITTED"])
def test_a_revision_of_a_step_not_in_progress_waits_until_the_process_puts_it_in_progress(
        storage, db, database_url, status):
    """The UI sends feedback (FB_REQUESTED) on any step not DONE: one its process has not
    reached (TODO, NEW, PENDING) or whose result it is taking (SUBMITTED). Upstream agents
    claim only steps IN_PROGRESS, and so does this library: run now, a COMPLETE-mode result
    would submit a step out of order. Once the process puts the step in progress, NOTIFY
    announces it and it runs as a revision."""
    todo_id = storage.enqueue("life", "q")
    store = PostgresStorage(database_url, max_connections=2)
    listener = store.listener(["processgpt_sync_todo"])
    listener.connect()
    try:
        listener.wait(2.0)  # the enqueue's own announcement
        db.execute("UPDATE todolist SET status = %s, draft_status = 'FB_REQUESTED', "
                   "feedback = '[{\"content\": \"shorter\"}]' WHERE id = %s",
                   (status, todo_id))
        assert listener.wait(0.5) == [], "not announced: no server may claim it"
        assert claim(storage) == []
        db.execute("UPDATE todolist SET status = 'IN_PROGRESS' WHERE id = %s", (todo_id,))
        assert listener.wait(2.0) == [("processgpt_sync_todo", "life")]
    finally:
        listener.close()
        store.close()
    (c,) = claim(storage)
    assert c.extras["resume"]["kind"] == "revision"


def test_a_running_revision_cancelled_by_the_ui_ends_cancelled_and_runs_once(storage, db):
    todo_id = storage.enqueue("life", "q")
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', "
               "feedback = '[{\"content\": \"shorter\"}]' WHERE id = %s", (todo_id,))
    starts = []

    def handle(todo):
        starts.append(todo.resume.kind)
        while not todo.cancelled:
            time.sleep(0.01)

    with ps.start(handle, agent_orch="life", storage=storage) as server:
        wait_for(lambda: starts)
        db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["cancelled"] == 1)
        time.sleep(0.5)  # a re-claim, if any, would happen now
    assert starts == ["revision"]
    assert state(db, todo_id)["draft_status"] == "CANCELLED"


@ENDED_UNDER_CLAIM
def test_writes_after_a_cancel_by_status_alone_are_refused_and_the_outcome_settles_it(
        storage, db, ended):
    # row 13 with the UI's other column: status CANCELLED (or DONE, or SUBMITTED by a person),
    # draft_status still STARTED
    todo_id = storage.enqueue("life", "q")
    (held,) = claim(storage)
    assert storage.renew("w1", [held], lease_seconds=60).renewed == {str(todo_id)}
    end_step(db, todo_id, ended)
    assert storage.renew("w1", [held], lease_seconds=60).cancelled == {str(todo_id)}
    event = make_event(str(todo_id), held.token, "task_working", {"step": 1})
    assert [r["reason"] for r in storage.record_events([event])] == [
        "not the owner of this todo (lease lost, cancelled or finished)"]
    draft = storage.save_result(held, {"partial": 1}, final=False)
    asked = storage.ask(held, "job-1", question_data("ok?", None, "confirm"))
    assert (draft.applied, draft.reason, asked.applied, asked.reason) == (
        False, "cancelled", False, "cancelled")
    assert state(db, todo_id)["draft_status"] == "STARTED"  # the run is told by its heartbeat

    (outcome,) = storage.finish([{"todo_id": held.todo_id, "token": held.token,
                                  "outcome": "completed", "result": {"done": True},
                                  "events": [event]}])
    assert (outcome.applied, outcome.reason) == (False, "cancelled")
    row = db.execute("SELECT draft_status::text, status::text, output, consumer FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert row == {"draft_status": "CANCELLED", "status": status_of(ended),
                   "output": output_after(ended),
                   "consumer": None}
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0
    assert db.execute("SELECT count(*) AS n FROM events WHERE todo_id = %s",
                      (todo_id,)).fetchone()["n"] == 0
    if ended.startswith("SUBMITTED"):  # the process takes that result: not run again
        retried = storage.call("retry", {"p_todo_id": str(todo_id)})
        assert retried["retried"] is False and "status SUBMITTED" in retried["reason"]


def test_a_suspend_written_after_a_person_submitted_the_step_is_refused_not_taken_as_done(
        storage, db):
    # row 13a: the run asked (HUMAN_ASKED), then a person submitted the step, clearing the
    # consumer; the suspend still to write is refused and settles the run, not "already applied"
    todo_id = storage.enqueue("life", "q")
    (held,) = claim(storage)
    assert storage.ask(held, "job-1", question_data("ok?", None, "confirm")).applied
    end_step(db, todo_id, "SUBMITTED")
    (outcome,) = storage.finish([{"todo_id": held.todo_id, "token": held.token,
                                  "outcome": "asked"}])
    assert (outcome.applied, outcome.reason) == (False, "cancelled")
    assert state(db, todo_id)["draft_status"] == "CANCELLED"
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


@ENDED_UNDER_CLAIM
@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_a_result_returned_as_the_ui_cancels_by_status_ends_cancelled(storage, db, outcome,
                                                                     ended):
    # the executor returns before the server hears of the cancel: its outcome must not undo it
    # (a step a person finished meanwhile keeps status DONE, not SUBMITTED, and their output;
    # a result a person submitted meanwhile is the one the process takes, not the agent's)
    todo_id = storage.enqueue("life", "q", agent_mode="COMPLETE")

    def cancel_then_return(todo):
        end_step(db, todo.id, ended)
        if outcome == "failed":
            raise ValueError("gave up")
        return {"done": True}

    with ps.start(cancel_then_return, agent_orch="life", storage=storage) as server:
        wait_for(lambda: server.stats()["cancelled"] == 1)
        assert server.stats()["completed"] == server.stats()["failed"] == 0
    row = db.execute("SELECT draft_status::text, status::text, output, consumer FROM todolist "
                     "WHERE id = %s", (todo_id,)).fetchone()
    assert row == {"draft_status": "CANCELLED", "status": status_of(ended),
                   "output": output_after(ended),
                   "consumer": None}


def test_a_suspended_todo_cancelled_by_status_is_not_listed_as_asking_and_can_be_retried(
        storage, db):
    todo_id = storage.enqueue("life", "q")
    (held,) = claim(storage)
    job = storage.ask(held, "job-1", question_data("ok?", None, "confirm"))
    assert job.applied and storage.suspend(held).applied
    assert [q["todo_id"] for q in storage.open_questions("life")] == [str(todo_id)]
    db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
    assert storage.open_questions("life") == []
    answer_as_the_ui(db, "job-1", "yes")  # too late: a cancelled todo is not resumed
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED" and claim(storage) == []
    retried = storage.call("retry", {"p_todo_id": str(todo_id)})
    assert retried["retried"] is True and retried["draft_status"] == "CANCELLED"
    (again,) = claim(storage)
    assert again.todo_id == todo_id


def test_a_step_finished_while_its_agent_asked_is_neither_waiting_nor_retried(storage, db):
    """Status DONE ends the agent's part of the step: the console shows the run cancelled,
    offers no answer and no Cancel, and `retry` does not reopen the step."""
    todo_id = storage.enqueue("life", "q")
    (held,) = claim(storage)
    assert storage.ask(held, "job-1", question_data("ok?", None, "confirm")).applied
    assert storage.suspend(held).applied
    db.execute("UPDATE todolist SET status = 'DONE' WHERE id = %s", (todo_id,))
    shown = db.execute("SELECT processgpt_sync_console_todo_v1(%s) AS v",
                       (todo_id,)).fetchone()["v"]
    assert (shown["todo"]["state"], shown["questions"]) == ("CANCELLED", [])
    cancel = db.execute("SELECT processgpt_sync_cancel_v1(%s) AS v", (todo_id,)).fetchone()["v"]
    assert (cancel["applied"], cancel["reason"]) == (False, "finished")
    retried = storage.call("retry", {"p_todo_id": str(todo_id)})
    assert retried["retried"] is False and "status DONE" in retried["reason"]
    assert state(db, todo_id)["status"] == "DONE" and claim(storage) == []


@ENDED_UNDER_CLAIM
def test_an_expired_claim_of_a_cancelled_todo_is_settled_cancelled(storage, db, ended):
    # a step submitted under a dead claim is not one its process took out of progress (17a):
    # its run is over, and the submitted result stays for the process to take
    todo_id = storage.enqueue("life", "q")
    claim(storage)
    end_step(db, todo_id, ended)
    expire_leases(db)
    assert claim(storage, consumer="w2") == []
    assert state(db, todo_id)["draft_status"] == "CANCELLED"
    assert db.execute("SELECT output FROM todolist WHERE id = %s",
                      (todo_id,)).fetchone()["output"] == output_after(ended)
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_the_expired_lease_of_a_todo_the_ui_cancelled_by_draft_status_is_removed(storage, db):
    todo_id = storage.enqueue("life", "q")
    claim(storage)
    db.execute("UPDATE todolist SET draft_status = 'CANCELLED' WHERE id = %s", (todo_id,))
    expire_leases(db)  # its owner died before hearing of the cancel
    assert claim(storage, consumer="w2") == []
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0
    assert state(db, todo_id)["draft_status"] == "CANCELLED"


def test_expired_leases_that_no_claim_would_settle_are_removed(storage, db):
    """Row 19's rule for every lease no claim would settle, whose owner died: the UI asked for
    a revision and cancelled it, handed the todo back to a person, or gave it to another agent
    that does not run. Such a lease kept every claim of every agent on its slow path (settling
    expired claims) for good."""
    revision_cancelled, with_a_person, elsewhere = (storage.enqueue("life", "q")
                                                    for _ in range(3))
    assert len(claim(storage)) == 3
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', status = 'CANCELLED' "
               "WHERE id = %s", (revision_cancelled,))
    db.execute("UPDATE todolist SET draft_status = NULL, status = 'TODO' WHERE id = %s",
               (with_a_person,))
    db.execute("UPDATE todolist SET agent_orch = 'retired' WHERE id = %s", (elsewhere,))
    expire_leases(db)

    def settling():
        return db.execute("SELECT processgpt_sync_claims_expired_v1('life') AS e").fetchone()["e"]

    assert settling()
    assert claim(storage, consumer="w2") == []
    assert not settling(), "the next claims take the fast path"
    leases = db.execute("SELECT todo_id FROM processgpt_sync_lease").fetchall()
    assert [str(r["todo_id"]) for r in leases] == [str(elsewhere)], (
        "the other agent's abandoned claim is its own to settle")
    assert [state(db, t)["draft_status"] for t in (revision_cancelled, with_a_person)] == [
        "FB_REQUESTED", None], "the todos themselves are left as the UI put them"


@pytest.mark.parametrize("status", ["TODO", "PENDING"])
def test_an_abandoned_claim_of_a_step_taken_out_of_progress_waits_for_the_step(
        storage, db, database_url, status):
    """Row 17a: the owner died after the process moved the step out of progress (a loop back
    to TODO, or PENDING; SUBMITTED ends the run, 13a). Running it again now would run a
    step the process does not have in progress; upstream workers take over only IN_PROGRESS
    steps. It stays abandoned, neither claimed nor failed nor keeping claims on their slow
    path, and is taken over (a reclaim, announced) once the step is in progress again."""
    fresh, revision, asking = (storage.enqueue("life", "q") for _ in range(3))
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', "
               "feedback = '[{\"content\": \"shorter\"}]' WHERE id = %s", (revision,))
    held = {c.todo_id: c for c in claim(storage, max_claims=2)}
    assert set(held) == {str(fresh), str(revision), str(asking)}
    assert storage.ask(held[str(asking)], "human_asked_q", question_data("Ok?", None,
                                                                         "confirm")).applied
    db.execute("UPDATE todolist SET status = %s WHERE id = ANY(%s)",
               (status, [fresh, revision, asking]))
    expire_leases(db)  # the owner died

    def settling():
        return db.execute("SELECT processgpt_sync_claims_expired_v1('life') AS e").fetchone()["e"]

    assert not settling(), "claims keep their fast path"
    assert not db.execute("SELECT processgpt_sync_wait_for_work_v1('life', 'w2', 0) AS w"
                          ).fetchone()["w"], "nor does a Supabase server's wait"
    assert claim(storage, consumer="w2", max_claims=2) == []
    assert [state(db, t)["draft_status"] for t in (fresh, revision, asking)] == [
        "STARTED", "STARTED", "HUMAN_ASKED"], "neither run nor failed (max_claims 2)"
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 3

    store = PostgresStorage(database_url, max_connections=2)
    listener = store.listener(["processgpt_sync_todo"])
    listener.connect()
    try:
        db.execute("UPDATE todolist SET status = 'IN_PROGRESS' WHERE id = ANY(%s)",
                   ([fresh, revision, asking],))
        assert listener.wait(2.0) == [("processgpt_sync_todo", "life")]
    finally:
        listener.close()
        store.close()
    assert db.execute("SELECT processgpt_sync_wait_for_work_v1('life', 'w3', 0) AS w"
                      ).fetchone()["w"]
    again = {c.todo_id: (c.extras["resume"]["kind"], c.extras["resume"]["attempt"])
             for c in claim(storage, consumer="w3", max_claims=2)}
    assert again == {t: ("reclaim", 2) for t in held}
    late = storage.save_result(held[str(fresh)], {"late": True})
    assert not late.applied, "the dead owner's late write is refused"


def test_a_dead_claim_of_a_step_the_process_then_finished_is_settled_cancelled(storage, db):
    # row 17a, then 19: the waiting claim's step ends (DONE): settled like any other
    todo_id = storage.enqueue("life", "q")
    claim(storage)
    db.execute("UPDATE todolist SET status = 'PENDING' WHERE id = %s", (todo_id,))
    expire_leases(db)
    assert claim(storage, consumer="w2") == []
    db.execute("UPDATE todolist SET status = 'DONE' WHERE id = %s", (todo_id,))
    assert claim(storage, consumer="w2") == []
    assert state(db, todo_id)["draft_status"] == "CANCELLED"
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_retry_refuses_a_completed_todo_the_ui_cancelled_afterwards(storage, db):
    # row 21: its result (the draft, in DRAFT mode) is kept
    todo_id = storage.enqueue("life", "q", agent_mode="DRAFT")
    (c,) = claim(storage)
    storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "completed",
                     "result": {"r": 1}}])
    db.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
    retried = storage.call("retry", {"p_todo_id": str(todo_id)})
    assert retried["retried"] is False and retried["reason"].startswith("it completed")
    assert (state(db, todo_id)["draft_status"], state(db, todo_id)["draft"]) == (
        "COMPLETED", {"r": 1})


# -- release ---------------------------------------------------------------------------------------


def test_a_draft_write_retried_after_a_lost_answer_writes_its_events_once(storage, db):
    """A draft (or a question) takes the todo's pending events along; the write is retried
    when its answer is lost after the commit, so those events carry ids the database skips."""
    from processgpt_sync.event_writer import EventBuffer

    todo_id = storage.enqueue("life", "q", agent_mode="DRAFT")
    (held,) = claim(storage)
    buffer = EventBuffer(storage, flush_interval=60, batch_size=100)  # never flushed here
    for step in (1, 2):
        buffer.add(make_event(str(todo_id), held.token, "task_working", {"step": step}))
    events = buffer.take(str(todo_id), held.token, ids=True)
    for _ in range(2):  # the first answer lost: the same call again
        assert storage.save_result(held, {"partial": 1}, final=False, events=events).applied
    steps = [r["data"]["step"] for r in db.execute(
        "SELECT data FROM events WHERE todo_id = %s ORDER BY timestamp", (str(todo_id),))]
    assert steps == [1, 2]


def test_a_todo_given_back_while_it_asks_returns_to_the_state_it_was_claimed_from(storage, db):
    # row 16 from "asking": a question stays asked (its event), the todo is queued again
    todo_id = storage.enqueue("life", "q")
    (held,) = claim(storage)
    assert storage.ask(held, "human_asked_q1", question_data("Ok?", None, "confirm")).applied
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
    assert storage.release([held]) == 1
    assert (state(db, todo_id)["draft_status"], state(db, todo_id)["consumer"]) == (None, None)
    (again,) = claim(storage, consumer="w2")
    assert again.extras["resume"]["kind"] == "fresh"
    assert questions(db, todo_id) == ["human_asked_q1"]  # asked again, it is waited on


def test_a_released_todo_with_an_intermediate_draft_is_claimable_again(storage, db):
    todo_id = storage.enqueue("life", "q", agent_mode="DRAFT")
    (first,) = claim(storage)
    saved = storage.save_result(first, {"partial": 1}, final=False)
    assert saved.applied and state(db, todo_id)["draft"] == {"partial": 1}
    assert storage.release([first]) == 1
    (again,) = claim(storage, consumer="w2")
    assert again.todo_id == todo_id and again.extras["resume"]["kind"] == "fresh"


def test_stop_gives_back_a_todo_that_wrote_a_draft_and_another_server_finishes_it(storage, db):
    todo_id = storage.enqueue("life", "q", agent_mode="DRAFT")
    started = threading.Event()

    def slow(todo):
        todo.events.result({"partial": True}, final=False)
        started.set()
        while not todo.cancelled:
            time.sleep(0.01)

    server = ps.start(slow, agent_orch="life", storage=storage)
    assert started.wait(5)
    server.stop(timeout=0.2)
    with ps.start(lambda todo: {"whole": True}, agent_orch="life", storage=storage) as second:
        wait_for(lambda: second.stats()["completed"] == 1)
    assert state(db, todo_id)["draft"] == {"whole": True}


# -- asking: blocking, suspended, crashes ---------------------------------------------------------


def test_a_crash_while_blocked_on_a_question_is_reclaimed_and_reuses_the_question(storage, db):
    todo_id = storage.enqueue("life", "q")
    (first,) = claim(storage)
    data = question_data("Ship it?", None, "confirm")
    asked = storage.ask(first, "human_asked_a", data)
    assert (asked.reason, asked.job_id) == ("ok", "human_asked_a")
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
    expire_leases(db)  # the owner died (kill -9) while it waited
    answer_as_the_ui(db, "human_asked_a", True)
    (second,) = claim(storage, consumer="w2")
    assert second.extras["resume"]["kind"] == "reclaim"
    again = storage.ask(second, "human_asked_b", data)
    assert (again.reason, again.answer) == ("answered_before", {"answer": True})
    assert questions(db, todo_id) == ["human_asked_a"]


def test_a_rerun_asking_an_unanswered_question_waits_on_the_same_one(storage, db):
    todo_id = storage.enqueue("life", "q")
    (first,) = claim(storage)
    data = question_data("Ship it?", None, "confirm")
    storage.ask(first, "human_asked_a", data)
    expire_leases(db)
    (second,) = claim(storage, consumer="w2")
    again = storage.ask(second, "human_asked_b", data)
    assert (again.applied, again.reason, again.job_id) == (True, "asked_before", "human_asked_a")
    assert questions(db, todo_id) == ["human_asked_a"]


def test_a_question_asked_again_after_a_later_one_is_asked_anew_not_answered_by_the_later(
        storage, db):
    """A blocking question timed out unanswered, then a later question suspended the todo and
    was answered. The resumed run asks the first question again: it is a new question (the
    todo waits on its latest question only), not the old one, which the later question's
    answer would then seem to answer, requeueing the todo without end."""
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage)
    style = question_data("Style?", None, "text")
    storage.ask(c, "job_style", style)
    storage.resume_asking(c)  # its wait timed out: the run goes on
    storage.ask(c, "job_approve", question_data("Approve?", None, "confirm"))
    (done,) = storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    assert done.applied
    answer_as_the_ui(db, "job_approve", True)
    (resumed,) = claim(storage, consumer="w2")
    assert resumed.extras["resume"]["job_id"] == "job_approve"
    again = storage.ask(resumed, "job_style_2", style)
    assert (again.reason, again.job_id) == ("ok", "job_style_2")
    (done,) = storage.finish([{"todo_id": resumed.todo_id, "token": resumed.token,
                               "outcome": "asked"}])
    assert done.applied
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
    assert [q["job_id"] for q in storage.open_questions("life")] == ["job_style_2"]


def test_a_todo_crashing_while_blocked_on_questions_fails_after_max_claims(storage, db):
    todo_id = storage.enqueue("life", "q")
    for consumer in ("w1", "w2"):
        (c,) = claim(storage, consumer=consumer, max_claims=2)
        storage.ask(c, f"human_asked_{consumer}", question_data("Ship it?", None, "confirm"))
        expire_leases(db)
    assert claim(storage, consumer="w3", max_claims=2) == []
    assert state(db, todo_id)["draft_status"] == "FAILED"


def test_an_answer_written_before_the_suspend_commits_requeues_the_todo(storage, db):
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage)
    asked = storage.ask(c, "human_asked_a", question_data("Ship it?", None, "confirm"))
    answer_as_the_ui(db, asked.job_id, True)  # the worker still owns the todo
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
    (done,) = storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    assert done.applied
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    (again,) = claim(storage, consumer="w2")
    assert again.extras["resume"]["kind"] == "human_answer"
    assert again.extras["resume"]["answer"] is True
    assert again.extras["resume"]["job_id"] == "human_asked_a"



def test_an_answer_inserted_while_the_suspend_commits_requeues_the_todo(database_url, db):
    """The suspend's transaction has looked for an answer and not committed yet when the UI
    inserts one: the UI's insert waits for it, and the todo is requeued, not left suspended
    with its question answered and nobody to run it."""
    store = PostgresStorage(database_url)
    try:
        todo_id = store.enqueue("life", "q")
        (c,) = claim(store)
        store.ask(c, "human_asked_a", question_data("Ship it?", None, "confirm"))
    finally:
        store.close()
    items = json.dumps([{"todo_id": c.todo_id, "token": str(c.token), "outcome": "asked"}])

    def answer() -> None:
        with psycopg.connect(database_url, autocommit=True) as ui:
            ui.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
                       "(%s, 'human_asked_a', 'human_response', '{\"answer\": true}', "
                       "'APPROVED')", (str(uuid.uuid4()),))

    with psycopg.connect(database_url) as worker:  # one transaction, open until commit()
        worker.execute("SELECT processgpt_sync_finish_v1(%s::jsonb)", (items,))
        ui = threading.Thread(target=answer)
        ui.start()
        ui.join(1.0)  # the answer's insert waits on the todo's row, or ran without waiting
        worker.commit()
    ui.join(10)
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"


def list_as_held(db, todo_id):
    """List ``todo_id`` as the answer trigger does (which alone may call the listing)."""
    db.execute("INSERT INTO processgpt_sync_answer_held (todo_id) VALUES (%s) ON CONFLICT "
               "(todo_id) DO UPDATE SET listed_at = clock_timestamp()", (todo_id,))


def listed_as_held(db):
    return [str(r["todo_id"]) for r in db.execute(
        "SELECT todo_id FROM processgpt_sync_answer_held ORDER BY todo_id")]


def as_on_supabase(database_url, db):
    """The roles and grants of a Supabase project, and a tenant its users sign in to."""
    db.execute(SUPABASE_ROLES)
    db.execute(SUPABASE_GRANTS)
    install_schema(database_url)
    db.execute("INSERT INTO tenants (id) VALUES ('acme') ON CONFLICT DO NOTHING")


def answer_as_a_signed_in_user(database_url, job_id, answer):
    """The UI's insert as a signed-in user of tenant acme, under a statement timeout as
    Supabase gives them one (8 s)."""
    with signed_in(database_url, "acme") as ui:
        ui.execute("SET statement_timeout = '6s'")
        answer_as_the_ui(ui, job_id, answer)


def suspended(storage, job_id="human_asked_a"):
    """A todo of tenant acme suspended on question ``job_id``: its id."""
    todo_id = storage.enqueue("life", "q", tenant_id="acme")
    (c,) = claim(storage)
    storage.ask(c, job_id, question_data("Ship it?", None, "confirm"))
    storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    return todo_id


@pytest.fixture
def supabase_store(database_url, db):
    """A Supabase storage (supabase-py through the test gateway) on a database with the roles
    and grants of a Supabase project."""
    as_on_supabase(database_url, db)
    yield from open_backend("supabase", database_url)


def test_an_answer_to_a_todo_whose_row_is_held_is_stored_at_once_and_requeued_once_free(
        storage, db, database_url):
    """The BPM engine or a person's open edit holds the suspended todo's row when the UI
    answers: the UI's insert does not wait for it (a signed-in user's statement timeout, 8 s on
    Supabase, would fail it and lose the answer); a heartbeat requeues the todo once the row is
    free, and not before. Nobody but the servers has rights on the list of such todos."""
    as_on_supabase(database_url, db)
    todo_id = suspended(storage)
    with psycopg.connect(database_url) as holder:  # one transaction, open until the block ends
        holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (todo_id,))
        answer_as_a_signed_in_user(database_url, "human_asked_a", True)
        assert listed_as_held(db) == [todo_id]
        storage.heartbeat("w1", [], 60, {"agent_orch": "life"})  # the row still held: left
        assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
        assert listed_as_held(db) == [todo_id]
    storage.heartbeat("w1", [], 60, {"agent_orch": "life"})
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    assert listed_as_held(db) == []
    with signed_in(database_url, "acme") as ui:
        for sql in ("INSERT INTO processgpt_sync_answer_held (todo_id) VALUES (%s)",
                    "SELECT * FROM processgpt_sync_answer_held"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                ui.execute(sql, (str(uuid.uuid4()),) if "%s" in sql else ())
    (again,) = claim(storage, consumer="w2")
    assert (again.extras["resume"]["kind"], again.extras["resume"]["answer"]) == (
        "human_answer", True)
    again_asked = suspended(storage, job_id="human_asked_b")  # no answer to it
    with signed_in(database_url, "acme") as ui:  # Supabase's REST API calls it so for anon
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="answer trigger only"):
            ui.execute("SELECT processgpt_sync_list_held_answer_v1(%s)", (again_asked,))
        # a trigger of the role's own lists nothing an answer would not
        ui.execute("CREATE TEMP TABLE poke (todo_id uuid)")
        ui.execute("CREATE FUNCTION pg_temp.poke() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN PERFORM processgpt_sync_list_held_answer_v1(NEW.todo_id); "
                   "RETURN NULL; END $$")
        ui.execute("CREATE TRIGGER poke AFTER INSERT ON poke FOR EACH ROW "
                   "EXECUTE FUNCTION pg_temp.poke()")
        ui.execute("INSERT INTO poke VALUES (%s)", (again_asked,))
    assert listed_as_held(db) == [], "the listing is the answer trigger's only"


def test_the_listing_runs_no_operator_another_role_made_in_the_schema(storage, database_url,
                                                                     db):
    """The listing runs with its owner's rights: an operator someone created in the install's
    schema (writable by every role before PostgreSQL 15) is not what it runs, pg_catalog's
    is."""
    as_on_supabase(database_url, db)
    todo_id = suspended(storage)
    db.execute("ALTER TABLE todolist ENABLE ROW LEVEL SECURITY")  # the trigger lists it
    db.execute("CREATE POLICY hidden_from_the_ui ON todolist AS RESTRICTIVE TO authenticated "
               "USING (false)")
    db.execute("CREATE FUNCTION evil_eq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql AS "
               "$$ BEGIN RAISE EXCEPTION 'run with the owner''s rights'; END $$")
    db.execute("CREATE OPERATOR = (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil_eq)")
    answer_as_a_signed_in_user(database_url, "human_asked_a", True)
    assert listed_as_held(db) == [todo_id]


def test_an_idle_supabase_servers_wait_for_work_requeues_an_answer_whose_todo_was_held(
        supabase_store, database_url, db):
    """An idle server on Supabase makes no heartbeats (its waits for work keep its registry
    row): the wait requeues a listed todo (at its end), and says there is work."""
    todo_id = suspended(supabase_store)
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (todo_id,))
        answer_as_a_signed_in_user(database_url, "human_asked_a", True)
    assert listed_as_held(db) == [todo_id]
    assert supabase_store.wait_for_work(agent_orch="life", consumer="w1", seconds=2)
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    assert listed_as_held(db) == []


def test_a_listed_todo_with_nothing_to_requeue_leaves_the_list_and_keeps_no_lock(
        supabase_store, database_url, db):
    """A todo listed as answered while held, whose latest question has no answer after all
    (asked again meanwhile, say): the look at it drops it from the list, and a wait for work
    that follows keeps no lock of its row, which a person may then write at once."""
    todo_id = suspended(supabase_store)
    list_as_held(db, todo_id)
    assert listed_as_held(db) == [todo_id]
    lock_the_todo_during_a_wait_for_work(supabase_store, database_url, todo_id)
    assert listed_as_held(db) == []
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"


def test_an_answer_while_a_wait_for_work_runs_is_not_held_up_by_it(
        supabase_store, database_url, db):
    """A todo is listed from an earlier answer with nothing to requeue now; an idle Supabase
    server waits for work; meanwhile the todo's row is held and a person answers it: the UI's
    insert lists it within its 2 s, not held up until the wait ends (its statement timeout
    would fail it, losing the answer), and the wait's look requeues it once free."""
    todo_id = suspended(supabase_store)
    list_as_held(db, todo_id)
    found: list[bool] = []
    waits = threading.Thread(target=lambda: found.append(supabase_store.wait_for_work(
        agent_orch="nothing-here", consumer="w1", seconds=7)))
    waits.start()
    time.sleep(0.5)
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (todo_id,))
        began = time.monotonic()
        answer_as_a_signed_in_user(database_url, "human_asked_a", True)
        took = time.monotonic() - began
    waits.join(15)
    assert took < 4.0, f"the answer took {took:.1f}s"
    assert found == [True]
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    assert listed_as_held(db) == []


def test_an_answer_committed_after_a_look_found_nothing_keeps_its_todo_listed(
        supabase_store, database_url, db):
    """The UI's answer lists a todo listed already while a server looks at the list; the
    look, which cannot see the answer yet, finds nothing to requeue: it leaves the listing the
    answer renewed, and the next look requeues the todo."""
    todo_id = suspended(supabase_store)
    list_as_held(db, todo_id)
    with psycopg.connect(database_url) as ui:
        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (todo_id,))
            answer_as_the_ui(ui, "human_asked_a", True)  # listed again, not committed
        look = "SELECT processgpt_sync_take_held_answers_v1(1) AS n"
        assert db.execute(look).fetchone()["n"] == 0  # the answer is not visible yet
        ui.commit()
    assert listed_as_held(db) == [todo_id]
    assert db.execute(look).fetchone()["n"] == 1
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    assert listed_as_held(db) == []


def test_an_answer_from_a_role_that_may_not_lock_the_todo_is_left_to_the_servers(
        supabase_store, database_url, db):
    """The UI's role may read but not update todolist (a site's own grants): the trigger
    cannot lock the todo to requeue it; the answer is stored, the todo listed, and the servers'
    next look requeues it, rather than leave it suspended for good."""
    db.execute("REVOKE UPDATE ON todolist FROM authenticated")
    try:
        todo_id = suspended(supabase_store)
        answer_as_a_signed_in_user(database_url, "human_asked_a", True)
        assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
        assert listed_as_held(db) == [todo_id]
        assert db.execute("SELECT processgpt_sync_take_held_answers_v1(1) AS n")\
            .fetchone()["n"] == 1
        assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    finally:
        db.execute("GRANT UPDATE ON todolist TO authenticated")


def test_an_answer_from_a_role_that_cannot_see_the_todo_is_left_to_the_servers(
        supabase_store, database_url, db):
    """Row security hides the todo from the answering role (a site's policy by assignee, say):
    the trigger cannot tell it from a deleted todo; it is listed, and the servers' next look
    requeues it, rather than leave it suspended for good. Answers naming a todo that does
    not exist, or one this library never ran, list nothing."""
    db.execute("ALTER TABLE todolist ENABLE ROW LEVEL SECURITY")
    db.execute("CREATE POLICY hidden_from_the_ui ON todolist AS RESTRICTIVE TO authenticated "
               "USING (false)")
    todo_id = suspended(supabase_store)
    never_ran = supabase_store.enqueue("someone-elses", "q", tenant_id="acme")
    with signed_in(database_url, "acme") as ui:
        for named in (str(uuid.uuid4()), never_ran):
            ui.execute("INSERT INTO events (id, job_id, todo_id, event_type, data, status) "
                       "VALUES (%s, 'human_asked_x', %s, 'human_response', '{}', 'APPROVED')",
                       (str(uuid.uuid4()), named))
    assert listed_as_held(db) == []
    answer_as_a_signed_in_user(database_url, "human_asked_a", True)
    assert listed_as_held(db) == [todo_id]
    assert db.execute("SELECT processgpt_sync_take_held_answers_v1(1) AS n").fetchone()["n"] == 1
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"


def test_an_answer_from_a_role_that_sees_the_todo_but_may_not_update_it_is_listed_at_once(
        supabase_store, database_url, db):
    """Row security lets the answering role read the todo but not update it (a site's policy):
    the trigger lists the todo for the servers at once, rather than take it for held and keep
    the UI's insert waiting its 2 s for a lock it can never get."""
    db.execute("ALTER TABLE todolist ENABLE ROW LEVEL SECURITY")
    db.execute("CREATE POLICY the_ui_reads ON todolist FOR SELECT TO authenticated "
               "USING (true)")
    db.execute("CREATE POLICY read_only_for_the_ui ON todolist AS RESTRICTIVE FOR UPDATE "
               "TO authenticated USING (false)")
    todo_id = suspended(supabase_store)
    began = time.monotonic()
    answer_as_a_signed_in_user(database_url, "human_asked_a", True)
    took = time.monotonic() - began
    assert listed_as_held(db) == [todo_id]
    assert took < 1.5, f"the answer took {took:.1f}s"
    assert db.execute("SELECT processgpt_sync_take_held_answers_v1(1) AS n").fetchone()["n"] == 1
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"


def answered_and_listed(store, database_url, db, count):
    """``count`` suspended todos, each answered (its trigger not run) and listed as held: ids."""
    todo_ids = [suspended(store, job_id=f"human_asked_{n}") for n in range(count)]
    with psycopg.connect(database_url, autocommit=True) as ui:
        ui.execute("SET session_replication_role = replica")
        for n, todo_id in enumerate(todo_ids):
            answer_as_the_ui(ui, f"human_asked_{n}", True)
            list_as_held(db, todo_id)
    return todo_ids


def slow_updates_of_todos(db, seconds):
    """A site's trigger that makes every update of a todo take ``seconds``."""
    db.execute("CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS "
               f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$")
    db.execute("CREATE TRIGGER slow_update BEFORE UPDATE ON todolist FOR EACH ROW "
               "EXECUTE FUNCTION slow_update()")


def test_a_heartbeat_renews_its_leases_when_a_listed_todo_runs_into_its_timeout(
        supabase_store, database_url, db):
    """A site trigger makes the requeue of a listed todo take longer than the role's statement
    timeout: the heartbeat's look gives up on it (moved to the back of the list) and the
    heartbeat still renews its leases, rather than fail whole, every time, until the running
    todos' leases run out."""
    (listed,) = answered_and_listed(supabase_store, database_url, db, 1)
    running = supabase_store.enqueue("life", "running", tenant_id="acme")
    (c,) = claim(supabase_store)
    slow_updates_of_todos(db, 1.5)
    with psycopg.connect(database_url, autocommit=True) as server:
        server.execute("SET statement_timeout = '1s'")
        (report,) = server.execute(
            "SELECT processgpt_sync_heartbeat_v1(%s, %s::uuid[], %s::uuid[], 60, %s::jsonb)",
            ("w1", [running], [c.token],
             json.dumps({"agent_orch": "life"}))).fetchone()
    assert report["renewed"] == [running]
    assert listed_as_held(db) == [listed]
    assert state(db, listed)["draft_status"] == "HUMAN_ASKED"


def test_a_heartbeat_keeps_no_requeued_todo_locked_while_it_waits_to_renew_a_lease(
        supabase_store, database_url, db):
    """A batch of outcomes holds the lease of one of the server's running todos when its
    heartbeat comes: the heartbeat waits for it to renew, and the todo its look requeues is not
    kept locked meanwhile (a second answer to it, the UI's edit would wait behind it)."""
    (listed,) = answered_and_listed(supabase_store, database_url, db, 1)
    running = supabase_store.enqueue("life", "running", tenant_id="acme")
    (c,) = claim(supabase_store)
    with psycopg.connect(database_url) as batch, \
            psycopg.connect(database_url, autocommit=True) as other:
        batch.execute("SELECT 1 FROM processgpt_sync_lease WHERE todo_id = %s FOR UPDATE",
                      (running,))
        reports = []

        def heartbeat():
            with psycopg.connect(database_url, autocommit=True) as server:
                reports.append(server.execute(
                    "SELECT processgpt_sync_heartbeat_v1(%s, %s::uuid[], %s::uuid[], 60, "
                    "%s::jsonb)", ("w1", [running], [c.token],
                                   json.dumps({"agent_orch": "life"}))).fetchone()[0])

        beating = threading.Thread(target=heartbeat)
        beating.start()
        time.sleep(1.0)  # the heartbeat waits for the lease
        other.execute("SET lock_timeout = '100ms'")
        other.execute("SELECT 1 FROM todolist WHERE id = %s FOR UPDATE", (listed,))
        batch.rollback()
        beating.join(10)
    assert reports and reports[0]["renewed"] == [running]
    assert state(db, listed)["draft_status"] == "FB_REQUESTED"
    assert listed_as_held(db) == []


def test_a_wait_for_work_does_not_wait_for_a_heartbeat_of_its_server(
        supabase_store, database_url, db):
    """A heartbeat of the same server holds its registry row (its look, its renewals) when a
    wait for work ends: the wait does not queue behind it to refresh the row the heartbeat
    refreshes anyway, keeping what its own look requeued locked, or running into the role's
    statement timeout."""
    db.execute("INSERT INTO processgpt_sync_server (consumer, agent_orch) VALUES ('w1', 'life')")
    with psycopg.connect(database_url) as heartbeat, \
            psycopg.connect(database_url, autocommit=True) as server:
        heartbeat.execute("SELECT 1 FROM processgpt_sync_server WHERE consumer = 'w1' "
                          "FOR NO KEY UPDATE")
        server.execute("SET statement_timeout = '2s'")
        began = time.monotonic()
        (found,) = server.execute(
            "SELECT processgpt_sync_wait_for_work_v1('nothing-here', 'w1', 0)").fetchone()
        took = time.monotonic() - began
        heartbeat.rollback()
    assert found is False
    assert took < 1.0, f"the wait took {took:.1f}s"


def test_an_answer_whose_requeue_a_site_trigger_refuses_is_stored_and_requeued_later(
        supabase_store, database_url, db):
    """A site's trigger refuses the update that requeues an answered todo (a check of its
    own): the UI's answer is stored all the same and the todo listed; once the trigger lets
    it through, a heartbeat's look requeues it."""
    todo_id = suspended(supabase_store)
    db.execute("CREATE FUNCTION site_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
               "IF NEW.draft_status = 'FB_REQUESTED' THEN RAISE EXCEPTION 'site check'; END IF; "
               "RETURN NEW; END $$")
    db.execute("CREATE TRIGGER site_check BEFORE UPDATE ON todolist FOR EACH ROW "
               "EXECUTE FUNCTION site_check()")
    answer_as_a_signed_in_user(database_url, "human_asked_a", True)
    assert listed_as_held(db) == [todo_id]
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
    db.execute("DROP TRIGGER site_check ON todolist")
    supabase_store.heartbeat("w1", [], 60, {"agent_orch": "life"})
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    assert listed_as_held(db) == []


def test_a_wait_for_work_with_a_long_list_ends_inside_the_roles_statement_timeout(
        supabase_store, database_url, db):
    """Five listed todos are answered and free, and a site's trigger makes each update of a
    todo take 0.3 s: the look at the end of a wait for work under a 2 s role timeout requeues
    what fits in its time and leaves the rest to the next, rather than run past the timeout and
    lose all it did (and the registry refresh) every time."""
    todo_ids = answered_and_listed(supabase_store, database_url, db, 5)
    slow_updates_of_todos(db, 0.3)
    with psycopg.connect(database_url, autocommit=True) as server:
        server.execute("SET statement_timeout = '2s'")
        for _ in range(5):
            (found,) = server.execute("SELECT processgpt_sync_wait_for_work_v1("
                                      "'nothing-here', 'w1', 8)").fetchone()
            assert found
            if not listed_as_held(db):
                break
    assert listed_as_held(db) == []
    assert {state(db, t)["draft_status"] for t in todo_ids} == {"FB_REQUESTED"}


def test_a_look_at_listed_answers_does_not_wait_for_another_callers_unlisting(
        supabase_store, database_url, db):
    """Two servers look at the list at once; the first unlists a todo with nothing to
    requeue and its transaction goes on (a wait for work holds it for seconds): the second
    does not wait for that transaction, it skips the todo and returns."""
    todo_id = suspended(supabase_store)
    list_as_held(db, todo_id)
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as second:
        first.execute("SELECT processgpt_sync_take_held_answers_v1(1)")  # not committed
        second.execute("SET statement_timeout = '2s'")
        began = time.monotonic()
        (requeued,) = second.execute(
            "SELECT processgpt_sync_take_held_answers_v1(1)").fetchone()
        took = time.monotonic() - began
        second.commit()
        first.commit()
    assert requeued == 0
    assert took < 1.5, f"the second look waited {took:.1f}s"
    assert listed_as_held(db) == []
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"


def test_a_late_failure_from_a_claim_that_ran_out_of_claims_is_refused_not_applied(
        storage, db):
    """The todo was FAILED for running out of claims while its last owner was cut off; that
    owner's own failure, written later, is not reported stored (it was not, nor its
    events): the owner learns its claim is gone."""
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage, max_claims=1)
    expire_leases(db)
    assert claim(storage, consumer="w2", max_claims=1) == []
    assert state(db, todo_id)["draft_status"] == "FAILED"
    (late,) = storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "failed",
                               "error": "boom"}])
    assert (late.applied, late.reason) == (False, "not_owner")

def test_a_retried_asked_outcome_writes_its_question_and_events_once(storage, db):
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage)
    question = make_event(c.todo_id, c.token, "human_asked", {"question": "ok?"},
                          status="ASKED")
    item = {"todo_id": c.todo_id, "token": c.token, "outcome": "asked", "events": [question]}
    (first,) = storage.finish([item])
    (retry,) = storage.finish([item])  # the first commit's reply was lost
    assert (first.reason, retry.applied, retry.reason) == ("ok", True, "already_applied")
    assert len(questions(db, todo_id)) == 1
    assert len(storage.open_questions("life")) == 1


def test_a_repeated_question_answered_before_still_writes_the_events_sent_with_it(storage, db):
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage)
    data = question_data("Ship it?", None, "confirm")
    storage.ask(c, "human_asked_a", data)
    answer_as_the_ui(db, "human_asked_a", True)
    progress = make_event(c.todo_id, c.token, "task_working", {"step": "after"})
    again = storage.ask(c, "human_asked_b", data, events=[progress])
    assert again.reason == "answered_before"
    assert db.execute("SELECT data FROM events WHERE todo_id = %s AND event_type = "
                      "'task_working'", (todo_id,)).fetchall() == [{"data": {"step": "after"}}]


def test_a_late_answer_to_an_earlier_question_does_not_resume_the_current_one(storage, db):
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage)
    storage.ask(c, "human_asked_q1", question_data("Approve budget?", None, "confirm"))
    storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    answer_as_the_ui(db, "human_asked_q1", True)
    (c2,) = claim(storage, consumer="w2")
    storage.ask(c2, "human_asked_q2", question_data("Deploy to production?", None, "confirm"))
    storage.finish([{"todo_id": c2.todo_id, "token": c2.token, "outcome": "asked"}])
    answer_as_the_ui(db, "human_asked_q1", True)  # a second submit of the first form
    assert state(db, todo_id)["draft_status"] == "HUMAN_ASKED"
    assert claim(storage, consumer="w3") == []
    answer_as_the_ui(db, "human_asked_q2", False)
    (c3,) = claim(storage, consumer="w3")
    assert (c3.extras["resume"]["job_id"], c3.extras["resume"]["answer"]) == (
        "human_asked_q2", False)


def test_a_second_answer_to_the_same_question_changes_nothing_the_first_is_the_answer(
        storage, db):
    # row 9, "a second answer": the rerun's resume and its repeated question agree
    storage.enqueue("life", "q")
    (c,) = claim(storage)
    data = question_data("Ship it?", None, "confirm")
    storage.ask(c, "human_asked_q1", data)
    storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    answer_as_the_ui(db, "human_asked_q1", "first")
    time.sleep(0.01)
    answer_as_the_ui(db, "human_asked_q1", "second")  # a second submit of the form
    (again,) = claim(storage, consumer="w2")
    assert again.extras["resume"]["answer"] == "first"
    asked_again = storage.ask(again, "human_asked_new", data)
    assert (asked_again.reason, asked_again.answer) == ("answered_before", {"answer": "first"})
    assert storage.answer(again, "human_asked_q1").answer == {"answer": "first"}


def test_suspend_for_human_returns_the_answer_when_the_resumed_run_asks_again(storage, db):
    todo_id = storage.enqueue("life", "q")
    runs = []

    def handle(todo):
        runs.append(todo.resume.kind)
        if not todo.suspend_for_human("Approve anyway?", kind="confirm"):
            return {"approved": False}
        if not todo.suspend_for_human("Really?", kind="confirm"):
            return {"approved": False}
        return {"approved": True}

    with ps.start(handle, agent_orch="life", storage=storage) as server:
        wait_for(lambda: server.stats()["asked"] == 1)
        answer_as_the_ui(db, questions(db, todo_id)[-1], True)
        wait_for(lambda: server.stats()["asked"] == 2)
        answer_as_the_ui(db, questions(db, todo_id)[-1], True)
        wait_for(lambda: server.stats()["completed"] == 1)
    assert runs == ["fresh", "human_answer", "human_answer"]
    assert db.execute("SELECT output FROM todolist").fetchone()["output"] == {"approved": True}
    assert len(questions(db, todo_id)) == 2


# -- roles, timestamps, deletes ------------------------------------------------------------------


SUPABASE_ROLES = SUPABASE_ROLES_SQL.read_text(encoding="utf-8")
# Supabase's default privileges: the API roles may use the tables of `public` (row security
# decides which rows), and new functions are executable by them unless revoked.
SUPABASE_GRANTS = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS
    TO anon, authenticated, service_role;
"""


def signed_in(database_url, tenant):
    """A connection as the ProcessGPT UI's: role authenticated, a JWT of ``tenant``."""
    ui = psycopg.connect(database_url, autocommit=True)
    ui.execute("SELECT set_config('request.jwt.claims', %s, false)", (json.dumps(
        {"sub": str(uuid.uuid4()), "role": "authenticated",
         "app_metadata": {"tenant_id": tenant}}),))
    ui.execute("SET ROLE authenticated")
    return ui


def test_an_answer_inserted_by_a_signed_in_user_requeues_the_suspended_todo(database_url, db):
    db.execute(SUPABASE_ROLES)
    db.execute(SUPABASE_GRANTS)
    install_schema(database_url)  # the grants as a Supabase project gets them
    db.execute("INSERT INTO tenants (id) VALUES ('acme')")
    store = PostgresStorage(database_url)
    try:
        todo_id = store.enqueue("life", "q", tenant_id="acme")
        (c,) = claim(store)
        store.ask(c, "human_asked_a", question_data("Ship it?", None, "confirm"))
        store.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    finally:
        store.close()
    # a user of the todo's tenant: on a platform database row level security lets them see
    # and change only that tenant's todos
    with signed_in(database_url, "acme") as ui:
        ui.execute("INSERT INTO events (id, job_id, event_type, data, status) VALUES "
                   "(%s, 'human_asked_a', 'human_response', '{\"answer\": true}', 'APPROVED')",
                   (str(uuid.uuid4()),))
        denied = ui.execute("SELECT has_function_privilege('processgpt_sync_claim_v1(text,text,"
                            "integer,integer,integer,text)', 'EXECUTE')").fetchone()
    assert state(db, todo_id)["draft_status"] == "FB_REQUESTED"
    assert denied == (False,)


def test_the_uis_writes_as_a_signed_in_user_reach_a_running_server(database_url, db):
    """A todo the UI adds, its revision request on the draft and its cancel, each written as a
    signed-in user (on a platform database under its row level security), fire this library's
    triggers with that user's rights: none fails, and the server acts on each."""
    db.execute(SUPABASE_ROLES)
    db.execute(SUPABASE_GRANTS)
    install_schema(database_url)
    db.execute("INSERT INTO tenants (id) VALUES ('acme')")
    runs = []

    def handle(todo):
        runs.append(todo.resume.kind)
        if todo.resume.kind == "revision":
            while not todo.cancelled:
                time.sleep(0.01)
        return {"n": len(runs)}

    with signed_in(database_url, "acme") as ui, ps.start(
            handle, agent_orch="life", database_url=database_url, poll_interval=30) as server:
        (todo_id,) = ui.execute(
            "INSERT INTO todolist (id, agent_orch, query, status, agent_mode, tenant_id) "
            "VALUES (gen_random_uuid(), 'life', 'q', 'IN_PROGRESS', 'DRAFT', 'acme') "
            "RETURNING id").fetchone()
        wait_for(lambda: state(db, todo_id)["draft_status"] == "COMPLETED")
        ui.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', "
                   "feedback = '[{\"content\": \"shorter\"}]' WHERE id = %s", (todo_id,))
        wait_for(lambda: runs == ["fresh", "revision"])
        ui.execute("UPDATE todolist SET status = 'CANCELLED' WHERE id = %s", (todo_id,))
        wait_for(lambda: server.stats()["cancelled"] == 1)
    assert state(db, todo_id)["draft_status"] == "CANCELLED"


def test_outcomes_written_together_are_not_stamped_in_the_future(storage, db):
    db.execute("""INSERT INTO todolist (id, agent_orch, query, status, agent_mode)
                  SELECT gen_random_uuid(), 'life', 'q' || g, 'IN_PROGRESS', 'COMPLETE'
                  FROM generate_series(1, 40) g""")
    claims = claim(storage, limit=40)
    items = [{"todo_id": c.todo_id, "token": c.token, "outcome": "completed", "result": {},
              "events": [make_event(c.todo_id, c.token, "task_working", {"n": k})
                         for k in range(3)]} for c in claims]
    storage.finish(items)
    ahead = db.execute("SELECT max(timestamp) - clock_timestamp() AS ahead FROM events"
                       ).fetchone()["ahead"]
    assert ahead.total_seconds() < 0
    order = db.execute("SELECT todo_id, event_type::text AS t FROM events "
                       "ORDER BY timestamp").fetchall()
    for c in claims:  # per todo: its events in order, crew_completed last
        mine = [r["t"] for r in order if r["todo_id"] == c.todo_id]
        assert mine == ["task_working"] * 3 + ["crew_completed"]


def test_a_claim_leaves_an_abandoned_lease_its_late_owner_holds_and_takes_it_later(
        storage, db, database_url):
    """Two claims ran out; their server, stalled, sends a late heartbeat just as another claim
    takes them over. The claim does not wait for the lease the heartbeat holds (the heartbeat
    takes its leases in order, so a wait could close a cycle): it takes the other, counts the
    held one as held back, and takes it once the heartbeat has ended."""
    for i in range(2):
        storage.enqueue("life", f"q{i}")
    first = claim(storage, consumer="stalled", limit=2)
    expire_leases(db)
    held = min(c.todo_id for c in first)
    with psycopg.connect(database_url) as heartbeat:
        heartbeat.execute("SELECT 1 FROM processgpt_sync_lease WHERE todo_id = %s FOR UPDATE",
                          (held,))
        taken = claim(storage, consumer="w2", limit=2)
    later = claim(storage, consumer="w2", limit=2)
    assert [c.todo_id for c in taken] == [max(c.todo_id for c in first)]
    assert taken.held_back == 1
    assert [c.todo_id for c in later] == [held]


def test_a_revision_claimed_while_its_last_run_s_heartbeat_holds_the_lease_is_taken_later(
        storage, db, database_url):
    """The UI asks for a revision while the todo still runs elsewhere; another server claims
    the revision just as the running server's heartbeat holds that run's lease. The claim,
    which takes the lease over, does not wait for it (the heartbeat takes its leases in order,
    so a wait could close a cycle): it leaves the revision, counted held back, and takes it
    once the heartbeat has ended."""
    todo_id = storage.enqueue("life", "q")
    claim(storage, consumer="w1")
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED', "
               "feedback = '[{\"content\": \"shorter\"}]' WHERE id = %s", (todo_id,))
    with psycopg.connect(database_url) as heartbeat:
        heartbeat.execute("SELECT 1 FROM processgpt_sync_lease WHERE todo_id = %s FOR UPDATE",
                          (todo_id,))
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")  # a wait fails the claim, not hangs it
            (answer,) = other.execute(
                "SELECT processgpt_sync_claim_v4('life', 'w2', 10, 60, 3)").fetchone()
        assert (answer["claims"], answer["held_back"]) == ([], 1)
    (revision,) = claim(storage, consumer="w2")
    assert revision.extras["resume"]["kind"] == "revision"


@pytest.mark.parametrize("ending", ["cancelled by the UI", "out of claims", "finished by the UI"])
def test_a_claim_settling_abandoned_claims_leaves_a_lease_a_late_heartbeat_holds(
        storage, db, database_url, ending):
    """Two claims ran out, to be settled by the next claim (cancelled, failed, or their lease
    dropped); their server, stalled, sends a late heartbeat holding one lease. The claim settles
    the other without waiting for the held lease (the heartbeat takes its leases in order, so a
    wait could close a cycle), and a claim after the heartbeat settles the held one."""
    for i in range(2):
        storage.enqueue("life", f"q{i}")
    first = claim(storage, consumer="stalled", limit=2)
    ids = sorted(c.todo_id for c in first)
    if ending == "cancelled by the UI":
        db.execute("UPDATE todolist SET status = 'CANCELLED'")
    elif ending == "finished by the UI":
        db.execute("UPDATE todolist SET draft_status = 'COMPLETED', status = 'SUBMITTED'")
    expire_leases(db)
    settled = {"cancelled by the UI": "CANCELLED", "out of claims": "FAILED",
               "finished by the UI": "COMPLETED"}[ending]
    max_claims = 1 if ending == "out of claims" else 3

    def leases():
        return {str(r["todo_id"]) for r in db.execute("SELECT todo_id FROM processgpt_sync_lease")}

    with psycopg.connect(database_url) as heartbeat:
        heartbeat.execute("SELECT 1 FROM processgpt_sync_lease WHERE todo_id = %s FOR UPDATE",
                          (ids[0],))
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")  # a wait fails the claim, not hangs it
            other.execute("SELECT processgpt_sync_claim_v4('life', 'w2', 10, 60, %s)",
                          (max_claims,))
        assert state(db, ids[1])["draft_status"] == settled
        assert leases() == {ids[0]}
        assert state(db, ids[0])["draft_status"] == ("COMPLETED" if settled == "COMPLETED"
                                                     else "STARTED")
    claim(storage, consumer="w2", max_claims=max_claims)
    assert state(db, ids[0])["draft_status"] == settled
    assert leases() == set()


def test_deleting_a_claimed_todo_removes_its_lease(storage, db):
    todo_id = storage.enqueue("life", "q")
    claim(storage)
    db.execute("DELETE FROM todolist WHERE id = %s", (todo_id,))
    assert db.execute("SELECT count(*) AS n FROM processgpt_sync_lease").fetchone()["n"] == 0


def test_a_result_whose_row_was_deleted_meanwhile_is_dropped_saying_so_not_failed(
        storage, db, caplog):
    """The row is deleted between the executor's return and its outcome's write (no heartbeat
    saw it first): the write is refused, nothing is written, the todo counts as lost, not
    failed, and the log says its row was deleted."""
    todo_id = storage.enqueue("life", "q")

    def delete_own_row(todo: ps.Todo) -> dict[str, bool]:
        db.execute("DELETE FROM todolist WHERE id = %s", (todo.id,))
        return {"ok": True}

    with ps.start(delete_own_row, agent_orch="life", storage=storage) as server:
        wait_for(lambda: server.stats()["lost"] == 1)
        stats = server.stats()
    assert (stats["completed"], stats["failed"]) == (0, 0)
    assert f"todo {todo_id}: completed write refused (its row was deleted)" in caplog.text
    assert db.execute("SELECT count(*) AS n FROM events WHERE todo_id = %s",
                      (todo_id,)).fetchone()["n"] == 0


def test_starting_servers_beside_busy_ones_skips_an_installed_schema(database_url, db):
    assert install_schema(database_url, if_changed=True) is False
    db.execute("COMMENT ON FUNCTION processgpt_sync_schema_v1() IS 'an older version'")
    assert install_schema(database_url, if_changed=True) is True
    assert install_schema(database_url, if_changed=True) is False


def test_a_schema_upgrade_on_a_busy_database_neither_deadlocks_nor_fails_todos(database_url, db):
    store = PostgresStorage(database_url, max_connections=12)
    try:
        for i in range(300):
            store.enqueue("life", f"q{i}")

        def handle(todo):
            todo.events.progress({"step": 1})
            return {"ok": True}

        errors: list[BaseException] = []
        with ps.start(handle, agent_orch="life", storage=store, workers=4) as server:
            def upgrade():
                try:
                    install_schema(database_url)
                except BaseException as exc:  # recorded for the assertion below
                    errors.append(exc)

            upgraders = [threading.Thread(target=upgrade) for _ in range(4)]
            for t in upgraders:
                t.start()
            for t in upgraders:
                t.join(60)
            wait_for(lambda: server.stats()["completed"] == 300, timeout=60)
            failed = server.stats()["failed"]
    finally:
        store.close()
    assert errors == [] and failed == 0


def test_a_job_id_reused_across_todos_and_questions_is_answered_per_todo_and_per_question(
        storage, db):
    """Executors reuse job ids (the seed's fixed "job-demo-0001", or job-{task_id} on every
    event of a task): an answer belongs to the question of its own todo that was asked before
    it, never to another todo's, nor to a later question under the same id."""
    a, b = storage.enqueue("life", "a"), storage.enqueue("life", "b")
    claims = {c.todo_id: c for c in claim(storage, limit=2)}
    for c in claims.values():
        assert storage.ask(c, "job-demo-0001", question_data(f"Approve {c.todo_id}?", None,
                                                             "confirm")).reason == "ok"
        storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "asked"}])
    db.execute("INSERT INTO events (id, job_id, todo_id, event_type, data, status) VALUES "
               "(%s, 'job-demo-0001', %s, 'human_response', '{\"answer\": \"yes for a\"}', "
               "'APPROVED')", (str(uuid.uuid4()), a))
    assert state(db, a)["draft_status"] == "FB_REQUESTED"
    assert state(db, b)["draft_status"] == "HUMAN_ASKED", "a's answer is not b's"
    assert [q["todo_id"] for q in storage.open_questions("life")] == [b]
    (resumed,) = claim(storage)
    assert resumed.todo_id == a and resumed.extras["resume"]["answer_raw"] == "yes for a"
    second = storage.ask(resumed, "job-demo-0001", question_data("And the amount?", None, "text"))
    assert second.reason == "ok", "a new question under the same id is asked"
    assert storage.answer(resumed, "job-demo-0001").reason == "waiting"
    with pytest.raises(ps.StorageError, match=r"open in 2 todos .*: name the todo"):
        storage.respond("job-demo-0001", "12")  # whose? a's second question, or b's first
    assert storage.respond("job-demo-0001", "12", todo_id=a) == a
    assert storage.answer(resumed, "job-demo-0001").answer == {"answer": "12", "user_id": None}
    assert state(db, b)["draft_status"] == "HUMAN_ASKED"
    assert storage.respond("job-demo-0001", "yes for b") == b, "the one still open"
    assert state(db, b)["draft_status"] == "FB_REQUESTED"
    with pytest.raises(ps.StorageError, match="already answered"):
        storage.respond("job-demo-0001", "again", todo_id=b)


def test_a_todo_whose_process_moved_on_gets_no_revision_from_the_console(storage, db):
    """Once the engine took the result and moved on (status DONE), a revision would rewrite
    history: the console's request is refused. A revision set on it anyway (the UI never
    does: it offers feedback only before DONE) is not claimed, as upstream agents claim none
    outside IN_PROGRESS: the step is over."""
    todo_id = storage.enqueue("life", "q")
    (c,) = claim(storage)
    storage.finish([{"todo_id": c.todo_id, "token": c.token, "outcome": "completed",
                     "result": {"v": 1}}])
    db.execute("UPDATE todolist SET status = 'DONE' WHERE id = %s", (todo_id,))
    refused = storage.call("request_revision", {"p_todo_id": todo_id, "p_feedback": "shorter",
                                                "p_user_id": None})
    assert (refused["applied"], refused["reason"]) == (False, "process_moved_on")
    db.execute("UPDATE todolist SET draft_status = 'FB_REQUESTED' WHERE id = %s", (todo_id,))
    assert claim(storage) == []
