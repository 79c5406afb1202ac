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
