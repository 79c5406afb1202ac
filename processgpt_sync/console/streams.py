"""The console's live updates: Server-Sent Events streams fed by the change feed.

A stream waits for a change (or a keepalive interval), reads again and sends only what changed,
as named events the page's ``console.js`` swaps in. Owns the stream's framing, its keepalives,
the re-read cursor for a todo's events and the end of a stream on a database error. Must not
query the database or choose what a page shows: the caller passes the read and the render.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.responses import Response, StreamingResponse

from ..errors import StorageError
from .charts import parse_time
from .feed import ChangeFeed, Subscription

logger = logging.getLogger(__name__)

EVENT_OVERLAP = timedelta(seconds=2)  # re-read window: events may commit out of time order
EVENT_PAGE = 500  # events a todo page reads at a time
FIRST_EVENT = datetime(1970, 1, 1, tzinfo=timezone.utc)  # before any event a todo can have
KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream
LIST_DEBOUNCE = 0.25  # seconds a list stream gathers changes before re-reading
LIST_READ_PACE = 10.0  # a list stream waits this many times its last read's duration before
# the next (at most KEEPALIVE, so proxies see the stream alive): on a todolist of a few million
# rows (a read scans it for the counts) an open list costs the database a tenth of one backend
# at most, however busy the servers keep it
TODO_READ_PACE = 4.0  # a todo page's stream waits this many times its last read's duration
# before the next: reads of a todo with a large draft or output, woken by every batch of its
# events, cost the database a fifth of one backend per open page at most; a quick read waits
# a few milliseconds, so events still show at once

Body = Callable[[Subscription], AsyncIterator[str]]
Render = Callable[..., str]
"""``render(template_name, **context)``: a fragment of the page as HTML."""
ReadTodo = Callable[[str, str | None], Awaitable[Mapping[str, Any] | None]]
"""``read(since, after_id)``: the todo with a page of its events (see ``todo_updates``)."""


def event_stream(feed: ChangeFeed, todo_id: str | None, body: Body) -> Response:
    """The SSE response: ``body``'s chunks while subscribed to the changes of ``todo_id`` (or
    of every todo), then a ``failure`` event if the database failed."""

    async def events() -> AsyncIterator[str]:
        subscription = feed.subscribe(todo_id)
        try:
            yield "retry: 1000\n\n"
            async for chunk in body(subscription):
                yield chunk
        except StorageError as exc:
            logger.warning("console stream ended: %s", exc)
            yield sse("failure", f"database error: {exc}")
        finally:
            feed.unsubscribe(subscription)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"x-accel-buffering": "no"})


def list_updates(read: Callable[[], Awaitable[Mapping[str, Any]]],
                 render: Callable[[Mapping[str, Any]], str]) -> Body:
    """The todo list's rows, sent again whenever they render differently."""

    async def rows(subscription: Subscription) -> AsyncIterator[str]:
        last, first = "", True  # the first read catches up with the page's render
        took = 0.0
        while first or await changed(subscription, debounce=min(
                KEEPALIVE, max(LIST_DEBOUNCE, LIST_READ_PACE * took))):
            first = False
            began = time.monotonic()
            data = await read()
            took = time.monotonic() - began
            html = render(data)
            if html != last:
                last = html
                yield sse("rows", html)
            else:
                yield ": unchanged\n\n"

    return rows


PANELS = (("state", "_state.html"), ("questions", "_questions.html"))


def digest(html: str) -> str:
    """A short fingerprint of a rendered panel: what the page shows, named in its stream URL."""
    return hashlib.sha256(html.encode()).hexdigest()[:16]


def todo_updates(read: ReadTodo, render: Render, since: datetime,
                 shown: Mapping[str, str] | None = None,
                 floor: tuple[datetime, str] | None = None) -> Body:
    """One todo's new events (each sent once), and its state and questions panels whenever
    they render differently from what the page shows (``shown``: each panel's digest as the
    page rendered it, so a form being filled in is not replaced by the same panel on
    connect). ``read(since, after_id)`` is the todo with the first EVENT_PAGE of its events
    from ``since`` on (after ``after_id`` at ``since`` itself): a full page is followed by
    the next at once, so a burst larger than a page is shown whole. ``floor``: the page's
    last event when the page showed only the newest events; none up to it is sent (an older
    one would land below the newest), not even by the re-read of the last seconds."""

    async def updates(subscription: Subscription) -> AsyncIterator[str]:
        sent: dict[str, datetime] = {}
        on_page = {part: (shown or {}).get(part, "") for part, _ in PANELS}
        start, after = floor or (since, None)
        more = first = True
        took = 0.0
        while first or more or await changed(subscription, debounce=min(
                KEEPALIVE, TODO_READ_PACE * took)):
            first = False
            began = time.monotonic()
            detail = await read(start.isoformat(), after)
            took = time.monotonic() - began
            if detail is None:  # deleted: the page stops following it (no reconnects)
                yield sse("gone", "this todo no longer exists")
                return
            events = detail["events"]
            fresh = [e for e in events if e["id"] not in sent]
            for event in events:
                sent[event["id"]] = parse_time(event["timestamp"])
            more = len(events) >= EVENT_PAGE  # more may follow this page's last event
            if more:
                start, after = parse_time(events[-1]["timestamp"]), events[-1]["id"]
            elif sent:  # next: the last seconds again, for events that committed late
                start, after = max(sent.values()) - EVENT_OVERLAP, None
                sent = {k: v for k, v in sent.items() if v >= start}
                if floor is not None and start <= floor[0]:
                    start, after = floor
            if fresh:
                yield sse("events", render("_events.html", events=fresh))
            for part, template in PANELS:
                html = render(template, **detail)
                if digest(html) != on_page[part]:
                    on_page[part] = digest(html)
                    yield sse(part, html)

    return updates


async def changed(subscription: Subscription, debounce: float = 0.0) -> bool:
    """Wait for a change, or KEEPALIVE seconds (True: read again), or the console's
    shutdown (False)."""
    while True:
        try:
            await asyncio.wait_for(subscription.changed.wait(), KEEPALIVE)
        except asyncio.TimeoutError:
            if subscription.closed:
                return False
            return True  # re-read now and then: also a keepalive for the stream
        if subscription.closed:
            return False
        if debounce:
            await asyncio.sleep(debounce)
        subscription.changed.clear()
        return True


def sse(event: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n"


def cursor(value: str | None) -> datetime:
    """Where a todo page's stream starts reading events: a little before the page's last, or
    from the first when the page showed none (every event is then new to it)."""
    at = _time(value)
    if at is None or at - FIRST_EVENT <= EVENT_OVERLAP:
        return FIRST_EVENT
    return at - EVENT_OVERLAP


def floor_of(value: str | None, after: str | None) -> tuple[datetime, str] | None:
    """The page's last event, ``value`` its time and ``after`` its id, when the page said it
    showed only the newest events (it sends ``after`` then); None otherwise."""
    at = _time(value)
    return None if at is None or not after else (max(at, FIRST_EVENT), after)


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        at = parse_time(value)
    except (ValueError, OverflowError):  # not a time
        return None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)
