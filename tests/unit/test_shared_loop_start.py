"""Coroutines handed to the shared loop from many threads at once: each starts, in its
starter's context, and each gets its own outcome (starts queued together share one wake-up of
the loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import logging
import threading
import time
from typing import Any

import pytest

from processgpt_sync.errors import InfrastructureError
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


def test_starts_racing_the_loops_close_are_each_refused_or_told_they_ended() -> None:
    """The server stops while worker threads still start todos: a start is either refused (the
    todo is given back) or its callback hears how it ended, cancelled; none is left waiting for
    good on a loop that stopped. A task slow to end once cancelled keeps the close busy while
    the starts go on."""
    loop = SharedLoop()
    told: dict[int, BaseException | None] = {}
    started: set[int] = set()
    refused: list[BaseException] = []
    lock = threading.Lock()

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise

    def record(n: int, finished: Finished[Any]) -> None:
        try:
            result_of(finished)
            error: BaseException | None = None
        except BaseException as exc:  # the outcome under test
            error = exc
        with lock:
            told[n] = error

    stop_starting = threading.Event()

    def starter(thread: int) -> None:
        for i in range(100_000):
            n = thread * 100_000 + i
            try:
                loop.start(f"todo {n}", asyncio.sleep, 30).then(
                    lambda f, n=n: record(n, f))
            except Exception as exc:  # refused: the server stopped
                with lock:
                    refused.append(exc)
                return
            with lock:
                started.add(n)
            if stop_starting.wait(0.002):
                return

    loop.start("slow", slow_to_end).then(lambda f: None)
    threads = [threading.Thread(target=starter, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.2)
    loop.close()
    stop_starting.set()
    for thread in threads:
        thread.join(10)
    deadline = threading.Event()
    for _ in range(50):
        with lock:
            if started <= told.keys():
                break
        deadline.wait(0.1)
    with lock:
        unheard = started - told.keys()
        errors = list(told.values())
    assert not unheard, f"{len(unheard)} of {len(started)} starts never heard how they ended"
    assert all(isinstance(e, concurrent.futures.CancelledError) for e in errors)
    assert all(isinstance(e, InfrastructureError) for e in refused), refused


def test_a_coroutine_that_ignores_its_cancellation_is_told_ended_when_the_loop_closes(
        caplog: pytest.LogCaptureFixture) -> None:
    """A todo's coroutine catches the stop's cancellation and goes on: the loop closes
    without it, and its caller hears it ended (cancelled) rather than wait for good; the
    blocking ``result()`` too."""
    loop = SharedLoop()
    heard: list[BaseException] = []
    began: list[bool] = []

    async def stubborn() -> None:
        began.append(True)
        for _ in range(30):
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass

    def record(finished: Finished[Any]) -> None:
        try:
            result_of(finished)
        except BaseException as exc:  # the outcome under test
            heard.append(exc)

    loop.start("stubborn", stubborn).then(record)
    waiting = loop.start("stubborn too", stubborn)
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def wait_for_it() -> None:
        try:
            outcome.set_result(waiting.result())
        except BaseException as exc:  # the outcome under test
            outcome.set_exception(exc)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    deadline = time.monotonic() + 5
    while len(began) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(began) == 2
    with caplog.at_level(logging.WARNING, logger="processgpt_sync.loops"):
        loop.close()
    assert "2 tasks on the shared event loop did not end when cancelled" in caplog.text
    assert len(heard) == 1 and isinstance(heard[0], concurrent.futures.CancelledError)
    assert "did not end when cancelled" in str(heard[0])
    with pytest.raises(concurrent.futures.CancelledError):
        outcome.result(timeout=5)
    waiter.join(5)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        waiting = None  # type: ignore[assignment]
        gc.collect()  # the tasks left go now: asyncio does not name each again
    assert "Task was destroyed but it is pending" not in caplog.text
