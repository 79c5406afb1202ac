"""Cancel hooks on a few threads: started in the order given, threads made only while hooks
wait and ended when none does, and a hook that stays stuck no longer holding up the next."""

from __future__ import annotations

import threading
import time

from processgpt_sync import hooks
from processgpt_sync.hooks import HookThreads
from tests.conftest import wait_for


def named(name: str) -> int:
    return sum(t.name == name for t in threading.enumerate())


def test_hooks_start_in_the_order_given_on_at_most_the_bound_and_their_threads_end():
    runner = HookThreads(name="hooks-order")
    release = threading.Event()
    began: list[int] = []
    for n in range(3 * hooks.HOOK_THREADS):
        runner.run(f"t{n}", lambda n=n: (began.append(n), release.wait(10)))
    wait_for(lambda: len(began) == hooks.HOOK_THREADS)
    time.sleep(0.05)
    assert named("hooks-order") == hooks.HOOK_THREADS == runner.threads
    release.set()
    wait_for(lambda: runner.threads == 0 and named("hooks-order") == 0)
    assert began == list(range(3 * hooks.HOOK_THREADS)), "in the order given"


def test_a_hook_waiting_behind_stuck_ones_runs_once_they_stop_counting(monkeypatch, caplog):
    monkeypatch.setattr(hooks, "HOOK_STUCK_AFTER", 0.2)
    runner = HookThreads(name="hooks-stuck")
    release, ran = threading.Event(), threading.Event()
    for n in range(hooks.HOOK_THREADS):
        runner.run(f"stuck-{n}", lambda: release.wait(10))
    runner.run("quick", ran.set)
    try:
        assert not ran.wait(0.1), "it waits while the others may still end"
        assert ran.wait(2), "then it runs on a thread of its own"
        assert "the cancel hook of todo stuck-0 has run for" in caplog.text
    finally:
        release.set()
    wait_for(lambda: runner.threads == 0)


def test_a_stuck_hook_that_returns_does_not_add_its_thread_to_those_made_meanwhile(monkeypatch):
    """Eight hooks stuck, eight more threads made for the next: when the stuck ones return,
    their threads end rather than take waiting hooks beside the eight (else every round of
    stuck hooks adds eight threads for good). Quick hooks take a tenth of the stuck limit, so
    none of them counts as stuck on a loaded machine."""
    monkeypatch.setattr(hooks, "HOOK_STUCK_AFTER", 1.0)
    runner = HookThreads(name="hooks-bound")
    release = threading.Event()
    lock = threading.Lock()
    quick = {"now": 0, "peak": 0, "done": 0}

    def quick_hook() -> None:
        with lock:
            quick["now"] += 1
            quick["peak"] = max(quick["peak"], quick["now"])
        time.sleep(0.1)
        with lock:
            quick["now"] -= 1
            quick["done"] += 1

    for n in range(hooks.HOOK_THREADS):
        runner.run(f"stuck-{n}", lambda: release.wait(10))
    for n in range(6 * hooks.HOOK_THREADS):
        runner.run(f"quick-{n}", quick_hook)
    try:
        wait_for(lambda: quick["now"] == hooks.HOOK_THREADS)
        release.set()
        wait_for(lambda: quick["done"] == 6 * hooks.HOOK_THREADS)
    finally:
        release.set()
    assert quick["peak"] == hooks.HOOK_THREADS
    wait_for(lambda: runner.threads == 0 and named("hooks-bound") == 0)


def test_a_hook_that_raises_even_system_exit_is_logged_and_the_next_ones_run(caplog):
    runner = HookThreads(name="hooks-raise")
    ran: list[int] = []

    def leaves() -> None:
        raise SystemExit(2)

    runner.run("exits", leaves)
    for n in range(3):
        runner.run(f"t{n}", lambda n=n: ran.append(n))
    wait_for(lambda: ran == [0, 1, 2])
    wait_for(lambda: runner.threads == 0 and named("hooks-raise") == 0)
    assert "the cancel hook of todo exits raised" in caplog.text
