"""Coroutines handed to the shared loop from many threads at once: each starts, in its
starter's context, and each gets its own outcome (starts queued together share one wake-up of
the loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from typing import Any

import pytest

from processgpt_sync.loops import Finished, SharedLoop, result_of

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


async def echo(value: int) -> tuple[int, str]:
    await asyncio.sleep(0)
    return value, WHO.get()


async def boom(value: int) -> None:
    raise ValueError(f"bad {value}")


def test_starts_from_many_threads_each_get_their_own_outcome_and_context() -> None:
    loop = SharedLoop()
    outcomes: dict[int, Any] = {}
    lock = threading.Lock()
    all_done = threading.Event()
    total = 8 * 250

    def record(n: int, finished: Finished[Any]) -> None:
        try:
            value: Any = result_of(finished)
        except BaseException as exc:  # the outcome under test
            value = exc
        with lock:
            outcomes[n] = value
            if len(outcomes) == total:
                all_done.set()

    def starter(thread: int) -> None:
        WHO.set(f"thread {thread}")
        for i in range(250):
            n = thread * 250 + i
            fn = boom if n % 7 == 0 else echo
            loop.start(f"todo {n}", fn, n).then(lambda f, n=n: record(n, f))

    threads = [threading.Thread(target=starter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert all_done.wait(10)
    finally:
        loop.close()
    for n, value in outcomes.items():
        if n % 7 == 0:
            assert isinstance(value, ValueError) and str(value) == f"bad {n}"
        else:
            assert value == (n, f"thread {n // 250}")


def test_a_cancelled_start_ends_with_a_cancelled_error_and_result_still_waits() -> None:
    loop = SharedLoop()
    ended: concurrent.futures.Future[Finished[Any]] = concurrent.futures.Future()
    try:
        task = loop.start("long", asyncio.sleep, 30)
        task.then(ended.set_result)
        task.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            result_of(ended.result(timeout=5))
        assert loop.start("short", echo, 5).result() == (5, "nobody")
    finally:
        loop.close()


def test_task_factories_take_every_keyword_create_task_hands_them() -> None:
    """Python 3.13.3+ hands the task factory ``name`` (anyio task groups, MCP clients always
    give one) and ``eager_start`` besides ``context``: both loops' factories must take them."""
    import weakref

    from processgpt_sync.loops import _tracking_factory

    loop = asyncio.new_event_loop()
    try:
        for factory in (_tracking_factory(weakref.WeakSet()), SharedLoop()._labelled_task):
            task = factory(loop, echo(7), name="mcp-reader", context=contextvars.copy_context())
            assert task.get_name() == "mcp-reader"
            assert loop.run_until_complete(task) == (7, "nobody")
    finally:
        loop.close()
