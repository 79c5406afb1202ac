"""Blocking code inside ``async def``: why it fails there and the one-line fix.

Libraries that have both a blocking and an async API (CrewAI 1.x ``crew.kickoff()``,
``asyncio.run``) refuse the blocking call on a thread whose event loop is running, and an
executor's ``async def execute`` always runs inside one. That cannot be undone soundly from
outside: the refusal happens deep inside the library, and hiding the running loop from it
would let it start a second loop on the same thread. So the todo fails with the fix instead.
"""

from __future__ import annotations

from .errors import BlockingCallInAsync

# Messages of the refusals seen in the wild (CrewAI 1.x, asyncio, nest-less event loops).
SIGNS = (
    "invoked synchronously from within a running event loop",
    "cannot be called from a running event loop",
    "this event loop is already running",
    "cannot run the event loop while another loop is running",
)
FIX = (
    "blocking code called inside async def refused to run in the running event loop ({cause}); "
    "await its async form instead (CrewAI: `await crew.kickoff_async(...)`), or run it on a "
    "thread: `await anyio.to_thread.run_sync(crew.kickoff)`; a plain def executor may call it "
    "directly"
)


def explain(exc: RuntimeError) -> RuntimeError | BlockingCallInAsync:
    """``exc`` itself, or a ``BlockingCallInAsync`` naming the fix when ``exc`` is a refusal
    to run blocking code inside a running event loop."""
    text = str(exc)
    if not any(sign in text.lower() for sign in SIGNS):
        return exc
    first_sentence = text.strip().splitlines()[0].split(". ")[0].rstrip(".")
    return BlockingCallInAsync(FIX.format(cause=first_sentence))
