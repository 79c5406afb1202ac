"""Change notifications for the console's open pages, from one LISTEN connection or a poll.

Every open page (a Server-Sent Events stream) subscribes to one todo, or to any todo. A single
thread LISTENs on ``processgpt_sync_event`` (payload: the todo id) and wakes the matching
subscribers on their event loop; pages then read what changed. On a backend without LISTEN
(Supabase) the thread wakes every subscriber each ``poll_interval`` instead, and only while
someone is watching, so an idle console costs the database nothing there.

The database sends those notifications only while a console says it watches
(``processgpt_sync_console_watch_v1``, refreshed every ``WATCH_REFRESH`` seconds): each NOTIFY
takes a cluster-wide lock through commit, which servers should not pay for when nobody looks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..errors import StorageError, StorageUnavailable
from ..storage import Listener, Storage

logger = logging.getLogger(__name__)

CHANNEL = "processgpt_sync_event"
PROBE_INTERVAL = 30.0  # seconds of silence before checking the LISTEN connection still listens
WAIT_STEP = 1.0  # seconds per wait, so close() is quick
POLL_INTERVAL = 1.0  # seconds between wake-ups when the backend cannot LISTEN
RETRY_MAX = 10.0  # seconds: longest wait before reconnecting a lost LISTEN connection
WATCH_REFRESH = 20.0  # seconds between renewals of this console's watch
WATCH_SECONDS = 60  # how long one renewal keeps notifications on (a dead console's expire)
READ_ONLY = "25006"  # SQLSTATE of a write to a read-only database (a replica)


@dataclass(eq=False)
class Subscription:
    """One open page: woken when its todo (or, with ``todo_id`` None, any todo) changes."""

    todo_id: str | None
    loop: asyncio.AbstractEventLoop
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.changed.set)


class ChangeFeed:
    """Dispatches change notifications to subscriptions; start() once, close() at shutdown."""

    def __init__(self, storage: Storage, *, poll_interval: float = POLL_INTERVAL,
                 listen: bool = True) -> None:
        """:param listen: False polls instead, writing nothing (a read-only console's
            notifications would need its watch row)."""
        self._storage = storage
        self._listen_wanted = listen
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self._stop = threading.Event()
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self.listening = False
        """True while the LISTEN connection is up (False on polling backends)."""
        self._console = f"console-{uuid.uuid4()}"
        self._watch_due = 0.0
        self._watched = False  # a watch row was written: close() removes it

    def start(self) -> None:
        self._listener = self._storage.listener([CHANNEL]) if self._listen_wanted else None
        target = self._poll if self._listener is None else self._listen
        self._thread = threading.Thread(target=target, name="processgpt-console-feed",
                                        daemon=True)
        self._thread.start()

    def subscribe(self, todo_id: str | None) -> Subscription:
        """A subscription for the running event loop; pass it to unsubscribe() when done."""
        subscription = Subscription(todo_id, asyncio.get_running_loop())
        with self._lock:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def dispatch(self, todo_id: str | None) -> None:
        """Wake the subscribers of ``todo_id`` and those of any todo (None: everyone)."""
        with self._lock:
            targets = [s for s in self._subscriptions
                       if todo_id is None or s.todo_id is None or s.todo_id == todo_id]
        for subscription in targets:
            subscription.wake()

    def close(self) -> None:
        """Stop the thread and end every open stream."""
        self._stop.set()
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.closed = True
            subscription.wake()
        if self._thread is not None:
            self._thread.join(timeout=WAIT_STEP + 5)
        if self._listener is not None:
            self._listener.close()
        if self._watched:
            try:
                self._storage.call("console_unwatch", {"p_console": self._console})
            except StorageError as exc:
                logger.warning("console change feed: could not end its watch (%s); it expires "
                               "in %d s", exc, WATCH_SECONDS)

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_interval):
            with self._lock:
                watched = bool(self._subscriptions)
            if watched:
                self.dispatch(None)

    def _listen(self) -> None:
        assert self._listener is not None
        listener = self._listener
        delay = 0.5
        heard = time.monotonic()
        while not self._stop.is_set():
            try:
                if not self.listening:
                    listener.connect()
                    self.listening = True
                    delay = 0.5
                    self._watch_due = 0.0
                if time.monotonic() >= self._watch_due:
                    first = self._watch_due == 0.0
                    if not self._watch():
                        break
                    self._watch_due = time.monotonic() + WATCH_REFRESH
                    if first:  # changes made before the database notified this console
                        self.dispatch(None)
                notes = listener.wait(WAIT_STEP)
                if notes:
                    heard = time.monotonic()
                elif time.monotonic() - heard > PROBE_INTERVAL:
                    heard = time.monotonic()
                    if not listener.probe():
                        raise StorageError("the console's LISTEN connection stopped listening")
            except StorageError as exc:
                if self._stop.is_set():
                    break
                self.listening = False
                listener.close()
                if exc.code == READ_ONLY:  # LISTEN on a replica: no notifications come
                    logger.warning("console change feed: %s: open pages are read again every "
                                   "%g s instead", exc, self._poll_interval)
                    break
                logger.warning("console change feed: %s; reconnecting in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            for _channel, payload in notes:
                self.dispatch(payload or None)
        self.listening = False
        if not self._stop.is_set():  # its watch or LISTEN refused: poll, as --read-only does
            listener.close()
            self._poll()

    def _watch(self) -> bool:
        """Keep this console's notifications on; False when the database refuses the write (a
        role that may only read, a read-only replica): the open pages are then polled
        instead. An outage raises."""
        try:
            self._storage.call("console_watch", {"p_console": self._console,
                                                 "p_seconds": WATCH_SECONDS})
        except StorageError as exc:
            if isinstance(exc, StorageUnavailable) and exc.code != READ_ONLY:
                raise
            logger.warning("console change feed: the database refused this console's watch "
                           "(%s): open pages are read again every %g s instead", exc,
                           self._poll_interval)
            return False
        self._watched = True
        return True
