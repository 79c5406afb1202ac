"""The server's shared state: slots, runs of the same todo, timed-out executors."""

from __future__ import annotations

import time
from typing import Any

from processgpt_sync.events import EVENT_TYPES
from processgpt_sync.inflight import InFlight
from processgpt_sync.models import Claim
from processgpt_sync.runs import TodoRun


class ListQueue:
    event_types = EVENT_TYPES

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def make_run(todo_id: str, token: str) -> TodoRun:
    claim = Claim.from_json({"row": {"id": todo_id, "query": "q"}, "token": token,
                             "extras": {}})
    return TodoRun(claim, ListQueue(), timeout=None, intermediate=lambda run, data: None)


def test_a_second_claim_of_a_running_todo_reports_the_first_as_stale() -> None:
    inflight = InFlight(workers=4, spare_threads=1)
    first, other, second = make_run("a", "t1"), make_run("b", "t1"), make_run("a", "t2")
    assert inflight.add(first) == []
    assert inflight.add(other) == []
    assert inflight.add(second) == [first]
    assert inflight.latest("a") is second
    assert inflight.todo_ids() == ["a", "b"]
    assert inflight.free_slots() == 1


def test_forgetting_runs_frees_their_slots_and_their_todo() -> None:
    inflight = InFlight(workers=2, spare_threads=0)
    first, second = make_run("a", "t1"), make_run("a", "t2")
    inflight.add(first)
    inflight.add(second)
    inflight.forget(first)
    assert inflight.latest("a") is second
    inflight.forget(second)
    inflight.forget(second)  # twice: the slot is freed once
    assert inflight.latest("a") is None
    assert inflight.todo_ids() == []
    assert inflight.free_slots() == 2


def test_a_timed_out_executor_beyond_the_spares_holds_a_slot_until_it_returns() -> None:
    inflight = InFlight(workers=2, spare_threads=1)
    runs = [make_run(str(i), "t") for i in range(2)]
    for run in runs:
        inflight.add(run)
        inflight.timed_out(run)
    assert inflight.free_slots() == 1  # two overdue, one spare thread
    inflight.executor_returned(runs[0])
    assert inflight.free_slots() == 2
    assert inflight.runs() == []


def test_at_stop_a_run_whose_executor_ended_is_waited_for_not_given_back() -> None:
    """An async todo on the shared loop may end while its outcome waits for a pool thread:
    stop() must wait for that outcome, not give the todo back to run again."""
    import threading

    inflight = InFlight(workers=4, spare_threads=1)
    running, ended = make_run("a", "t"), make_run("b", "t")
    inflight.add(running)
    inflight.add(ended)
    inflight.executor_returned(ended)  # outcome not written yet
    assert inflight.wait_empty(0.01) == [running]
    threading.Timer(0.1, inflight.forget, args=(ended,)).start()
    assert inflight.wait_written([running], 5.0) == []
    assert inflight.wait_written([running], 0.0) == []


def test_a_run_whose_executor_ended_is_not_timed_out_while_its_outcome_waits() -> None:
    """The deferred end clears the deadline: a wait for a pool thread to record the outcome is
    not the executor's time, and its result must not be replaced by a timeout."""
    import logging
    from contextlib import nullcontext

    from processgpt_sync.executor import FunctionAdapter
    from processgpt_sync.settings import Settings
    from processgpt_sync.worker import TodoWorker

    run = make_run("a", "t")
    assert run.begin()
    run.deadline = None  # as TodoWorker._deferred_end leaves it
    worker = TodoWorker(FunctionAdapter(lambda todo: None), Settings(agent_orch="a", timeout=1),
                        inflight=InFlight(workers=1, spare_threads=1), recorder=None,  # type: ignore[arg-type]
                        desk=None, stats=None, around_todo=nullcontext,  # type: ignore[arg-type]
                        log=logging.getLogger("test"), extra={})
    worker.time_out(run)
    assert not run.closed and not run.cancel_event.is_set()


def test_running_todos_are_counted_by_tenant_as_they_come_and_go() -> None:
    inflight = InFlight(workers=4, spare_threads=0)

    def run_of(todo_id: str, tenant: str | None) -> TodoRun:
        claim = Claim.from_json({"row": {"id": todo_id, "query": "q", "tenant_id": tenant},
                                 "token": "t", "extras": {}})
        return TodoRun(claim, ListQueue(), timeout=None, intermediate=lambda run, data: None)

    a1, a2, b, none = run_of("1", "a"), run_of("2", "a"), run_of("3", "b"), run_of("4", None)
    for run in (a1, a2, b, none):
        inflight.add(run)
    assert inflight.tenants() == {"a": 2, "b": 1, None: 1}
    inflight.forget(a1)
    inflight.forget(b)
    inflight.forget(b)  # twice: counted once
    assert inflight.tenants() == {"a": 1, None: 1}


def test_a_slot_is_free_once_its_executor_returns_and_at_most_workers_outcomes_wait() -> None:
    """The claimer claims the next todo while an ended todo's outcome is written; outcomes
    waiting to be written are bounded by the workers too."""
    inflight = InFlight(workers=2, spare_threads=1)
    first, second = make_run("a", "t"), make_run("b", "t")
    inflight.add(first)
    inflight.add(second)
    assert inflight.free_slots() == 0
    inflight.wake.clear()
    inflight.executor_returned(first)
    assert inflight.free_slots() == 1 and inflight.wake.is_set()
    inflight.executor_returned(first)  # twice: freed once
    assert inflight.free_slots() == 1
    third = make_run("c", "t")
    inflight.add(third)
    inflight.executor_returned(second)
    inflight.executor_returned(third)
    assert inflight.free_slots() == 1  # no executor runs, but three outcomes wait: 4 - 3
    inflight.forget(first)
    assert inflight.free_slots() == 2
    inflight.forget(second)
    inflight.forget(third)
    assert inflight.free_slots() == 2


def test_with_fleet_limits_a_written_outcome_wakes_the_claimer_even_when_no_work_is_known() -> None:
    """``max_running`` counts the todo in the database until its outcome is written: the claim
    refused at the executor's return may succeed now."""
    for limits in (False, True):
        inflight = InFlight(workers=2, spare_threads=0, fleet_limits=limits)
        run = make_run("a", "t")
        inflight.add(run)
        inflight.maybe_more = False  # the last claim got fewer todos than it asked for
        inflight.executor_returned(run)
        inflight.forget(run)
        assert inflight.wake.is_set() is limits


def test_claim_calls_without_an_answer_are_named_until_they_could_no_longer_matter(
        monkeypatch):
    import processgpt_sync.inflight as module

    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    inflight = InFlight(workers=2, spare_threads=0)
    assert inflight.unanswered_claims(120) == [] and not inflight.claim_unanswered
    inflight.claim_failed("call-1")
    clock[0] += 60
    inflight.claim_failed("call-2")
    assert inflight.claim_unanswered
    assert inflight.unanswered_claims(120) == ["call-1", "call-2"]
    clock[0] += 61  # call-1 failed 121 s ago: a lease it made would have run out twice
    assert inflight.unanswered_claims(120) == ["call-2"]
    clock[0] += 60
    assert inflight.unanswered_claims(120) == []


def test_a_write_the_executor_waits_on_moves_its_deadline_on_by_the_time_it_took() -> None:
    """The timeout counts the executor's time, not the time its writes wait on the database:
    the deadline moves on by the write's length once the last of overlapping writes ends,
    and not at all once the executor has returned (its allowance to leave is set anew)."""
    run = make_run("a", "t1")
    run.timeout = 10.0
    assert run.begin()
    assert run.deadline is not None
    before = run.deadline
    began = time.monotonic()
    with run.clock_stopped():
        with run.clock_stopped():
            assert run.writing_for_executor == 2
            time.sleep(0.2)
        assert run.deadline == before  # not yet: a write is still under way
        time.sleep(0.1)
    took = time.monotonic() - began
    assert run.writing_for_executor == 0
    assert 0.3 <= run.deadline - before <= took
    run.leaving = True
    left_at = run.deadline
    with run.clock_stopped():
        time.sleep(0.05)
    assert run.deadline == left_at
