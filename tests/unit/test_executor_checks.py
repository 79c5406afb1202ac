"""Executors that cannot take the arguments the server passes are refused when the server is
built, not discovered as a FAILED todo each."""

from __future__ import annotations

import functools

import pytest

from processgpt_sync import ConfigurationError, Server, Settings

SETTINGS = Settings(agent_orch="checks", database_url="postgresql://unused")


def two(todo, events):
    return {}


class NeedsEvents:
    def execute(self, todo):
        return {}


class Fine:
    def execute(self, todo, events, extra=None):
        return {}

    def __call__(self, todo):
        return {}


def yields(todo):
    yield {"step": 1}


async def yields_async(todo):
    yield {"step": 1}


class ExecuteYields:
    def execute(self, todo, events):
        yield {}


class LooseExecute:  # binds two arguments on the class, but the first would be the todo
    def execute(self, *args, **kwargs):
        return {}


class CallYields:
    def __call__(self, todo):
        yield {}


class AsyncCancel:
    def execute(self, todo, events):
        return {}

    async def cancel(self, todo):
        pass


class A2ACancel:  # the signature of a2a's AgentExecutor.cancel, on a blocking executor
    def execute(self, todo, events):
        return {}

    def cancel(self, context, event_queue):
        pass


@pytest.mark.parametrize(("executor", "message"), [
    (AsyncCancel(), r"AsyncCancel.cancel is async, but a blocking executor's cancel\(todo\)"),
    (A2ACancel(), r"A2ACancel.cancel\(context, event_queue\) cannot be called as "
                  r"cancel\(todo\)"),
    (two, r"two\(todo, events\) cannot be called as fn\(todo\)"),
    (lambda: {}, r"cannot be called as fn\(todo\)"),
    (NeedsEvents(), r"NeedsEvents.execute\(todo\) cannot be called as execute\(todo, events\)"),
    (Fine, r"Fine is a class: pass an instance, e.g. serve\(Fine\(\)\)"),
    (LooseExecute, r"LooseExecute is a class: pass an instance"),
    (yields, r"yields is a generator function .*an executor returns its result"),
    (yields_async, r"yields_async is a generator function"),
    (ExecuteYields(), r"ExecuteYields.execute is a generator function"),
    (CallYields(), r"CallYields.*is a generator function"),
], ids=["async-cancel", "a2a-cancel", "two-arguments", "no-argument", "execute-one-argument",
         "a-class", "a-class-loose", "generator", "async-generator", "execute-generator",
         "call-generator"])
def test_executors_with_the_wrong_parameters_are_refused_at_start(executor, message):
    with pytest.raises(ConfigurationError, match=message):
        Server(executor, SETTINGS)


@pytest.mark.parametrize("executor", [
    lambda todo: {}, lambda todo, *rest: {}, lambda *args, **kwargs: {}, Fine(),
    functools.partial(two, events=None), print,
])
def test_executors_that_take_a_todo_are_accepted(executor):
    Server(executor, SETTINGS)


def test_an_async_todo_that_cannot_start_on_the_shared_loop_leaves_nothing_behind():
    """The shared loop is gone (closed at stop): start() raises, and the adapter forgets the
    todo at once instead of holding its cancel handle for ever."""
    import threading

    from processgpt_sync.errors import InfrastructureError
    from processgpt_sync.executor import AsyncFunctionAdapter
    from processgpt_sync.loops import SharedLoop
    from processgpt_sync.models import Claim
    from processgpt_sync.todo import Todo

    async def handle(todo: Todo) -> dict[str, bool]:
        return {"ok": True}

    def todo(n: int) -> Todo:
        claim = Claim(todo_id=f"t{n}", token="k", row={"id": f"t{n}", "query": "x"}, extras={})
        return Todo.from_claim(claim, events=None, cancel_event=threading.Event())  # type: ignore[arg-type]

    adapter = AsyncFunctionAdapter(handle, SharedLoop())
    ended = threading.Event()
    adapter.start(todo(1), lambda value, error: ended.set())
    assert ended.wait(5)
    adapter.close()
    with pytest.raises(InfrastructureError, match="the shared event loop is closed"):
        adapter.start(todo(2), lambda value, error: None)
    assert adapter._tasks == {}


class StaticExecute:
    @staticmethod
    def execute(todo, events):
        return {}


class ClassExecute:
    @classmethod
    def execute(cls, todo, events):
        return {}


@pytest.mark.parametrize("executor", [StaticExecute, ClassExecute])
def test_a_class_whose_execute_runs_on_the_class_is_accepted(executor):
    Server(executor, SETTINGS)


class AsyncCall:
    async def __call__(self, config, todo):
        return {"config": config}


def test_a_partial_of_an_object_whose_call_is_async_runs_as_async():
    """``functools.partial(AsyncCall(), config)``: inspect sees no coroutine function in the
    partial, nor in its __call__; the server looks at what it wraps, so the object's async
    __call__ is awaited. Before, every todo failed, told to declare async def."""
    from processgpt_sync.executor import AsyncFunctionAdapter, adapt

    adapter = adapt(functools.partial(AsyncCall(), "cfg"))
    try:
        assert isinstance(adapter, AsyncFunctionAdapter)
    finally:
        adapter.close()
