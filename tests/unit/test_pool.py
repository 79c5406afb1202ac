"""The worker pool: threads made only as calls need them, order kept, errors logged, a
shutdown that drops what was queued and lets every thread end."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

from processgpt_sync import pool as pool_module
from processgpt_sync.pool import WorkerPool


def settle(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}_")]


def test_calls_run_in_order_and_an_idle_thread_is_reused_before_a_new_one_is_made():
    pool = WorkerPool(8, name="reuse")
    seen: list[int] = []
    done = threading.Event()
    try:
        for n in range(50):
            pool.submit(seen.append, n)
            assert settle(lambda n=n: len(seen) == n + 1 and pool.idle == 1)  # one at a time
        pool.submit(done.set)
        assert done.wait(5)
        assert seen == list(range(50))
        assert pool.threads == 1 and len(pool_threads("reuse")) == 1
    finally:
        pool.shutdown()


def test_threads_grow_with_concurrent_calls_up_to_the_bound_and_the_rest_wait_their_turn():
    pool = WorkerPool(3, name="bound")
    release = threading.Event()
    started: list[int] = []
    finished: list[int] = []
    try:
        for n in range(5):
            pool.submit(lambda n=n: (started.append(n), release.wait(10), finished.append(n)))
        assert settle(lambda: len(started) == 3)
        time.sleep(0.1)
        assert sorted(started) == [0, 1, 2], "calls beyond the bound wait for a thread"
        assert pool.threads == 3 and len(pool_threads("bound")) == 3
        release.set()
        assert settle(lambda: len(finished) == 5)
        # the last thread counts itself idle just after its call
        assert settle(lambda: pool.idle == 3), \
            "threads that took a waiting call were owed to it, not idle"
        assert pool.threads == 3
    finally:
        release.set()
        pool.shutdown()


def test_a_call_that_raises_is_logged_and_the_thread_serves_on(caplog):
    pool = WorkerPool(1, name="raises")
    done = threading.Event()

    def broken() -> None:
        raise ValueError("the recorder broke")

    try:
        with caplog.at_level(logging.ERROR, logger="processgpt_sync.pool"):
            pool.submit(broken)
            pool.submit(done.set)
            assert done.wait(5)
        assert "a call on a worker thread raised" in caplog.text
        assert "ValueError: the recorder broke" in caplog.text
        assert pool.threads == 1
    finally:
        pool.shutdown()


def test_shutdown_drops_queued_calls_refuses_new_ones_and_every_thread_ends():
    pool = WorkerPool(2, name="stops")
    release = threading.Event()
    began: list[int] = []
    ran: list[int] = []
    for n in range(6):
        pool.submit(lambda n=n: (began.append(n), release.wait(10), ran.append(n)))
    assert settle(lambda: len(began) == 2)
    assert pool.shutdown() == 4, "the four calls still waiting for a thread are dropped"
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(ran.append, 99)
    release.set()
    assert settle(lambda: not pool_threads("stops")), "no thread outlives its current call"
    assert sorted(ran) == [0, 1]
    assert pool.shutdown() == 0


def test_idle_threads_end_at_shutdown():
    pool = WorkerPool(4, name="idle")
    release = threading.Event()
    for _ in range(4):
        pool.submit(release.wait, 10)
    release.set()
    assert settle(lambda: pool.idle == 4), "all four wait for a call"
    pool.shutdown()
    assert settle(lambda: not pool_threads("idle"))


def test_a_thread_the_system_refuses_raises_and_queues_nothing(monkeypatch):
    """CPython reports a refused thread as RuntimeError; the claimer gives the todo back on it,
    so the call must not also run later."""
    pool = WorkerPool(4, name="refused")
    first = threading.Event()
    release = threading.Event()
    ran: list[str] = []
    try:
        pool.submit(lambda: (first.set(), release.wait(10)))
        assert first.wait(5)

        class Refused(threading.Thread):
            def start(self) -> None:
                raise RuntimeError("can't start new thread")

        monkeypatch.setattr(pool_module, "threading", SimpleNamespace(Thread=Refused))
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.submit(ran.append, "given back")
        monkeypatch.undo()
        release.set()
        assert settle(lambda: pool_threads("refused") and pool.threads == 1)
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(5)
        assert ran == [], "a refused call never runs"
    finally:
        release.set()
        pool.shutdown()


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        WorkerPool(0, name="none")


def test_a_retired_pool_runs_what_was_queued_then_its_threads_end():
    """retire(), unlike shutdown(): the calls already handed over (timed-out todos waiting to
    be recorded) still run; nothing new is taken."""
    pool = WorkerPool(2, name="retired")
    release = threading.Event()
    ran: list[int] = []
    for n in range(6):
        pool.submit(lambda n=n: (release.wait(10), ran.append(n)))
    assert settle(lambda: len(pool_threads("retired")) == 2)
    pool.retire()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(ran.append, 99)
    release.set()
    assert settle(lambda: sorted(ran) == list(range(6)))
    assert settle(lambda: not pool_threads("retired")), "every thread ends after the queue"
    assert pool.shutdown() == 0
