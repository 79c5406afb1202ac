"""How long to wait before trying a database call again (capped exponential back-off with
full jitter, or what the service asked for), and when a refused key means to stop trying:
shared by every loop that retries through an outage."""

from __future__ import annotations

import random
import time

from .errors import AccessDenied

STATEMENT_TIMEOUT = "57014"  # SQLSTATE query_canceled: the server ended a statement it ran
TIMEOUTS_ALONE_MAX = 3  # a write timing out alone this often (others answered) is given up
UNANSWERED_ALONE_MAX = 10  # a write alone given no answer within the read timeout this often
# (others answered) is given up too: the database may have stored it, and a proxy stalling only
# large bodies looks the same, so it gets more tries; but sending it again is safe (events are
# kept once, outcomes fenced), and one never answered would otherwise hold its todo for ever
HELD_ROW_WARN_AFTER = 5.0  # seconds a todo row held by another transaction may delay its writes
# before a warning names it (the other todos' writes go on meanwhile)
RETRY_DELAY_MAX = 2.0  # seconds between write attempts during an outage (a healed network is used
# within this; each attempt waits for a pooled connection first, so retries stay cheap)
RETRY_AFTER_MAX = 30.0  # seconds: the longest wait a service's Retry-After may ask of a retry
HELD_BACK_RETRY = 0.5  # seconds: first wait before asking again for todos a claim or a give-back
# left for a process instance another transaction held (nothing announces when it is free)
HELD_BACK_MAX = 2.0  # seconds: the longest such wait, however long the instance is held
ACCESS_DENIED_STOP_AFTER = 60.0  # seconds of refusals of the key, with no call answered meanwhile,
# before a server stops (one refusal may be a gateway's blip; a revoked key stays revoked)


def backoff(attempt: int, *, base: float = 0.1, cap: float = RETRY_DELAY_MAX,
            after: BaseException | None = None) -> float:
    """Capped exponential back-off with full jitter; at least what the failure ``after`` asked
    for (a rate limit's ``Retry-After``, up to ``RETRY_AFTER_MAX``)."""
    delay = float(random.uniform(0, min(cap, base * 2 ** min(attempt, 16))))
    asked = getattr(after, "retry_after", None)
    return max(delay, min(float(asked), RETRY_AFTER_MAX)) if asked else delay


def held_back_wait(asked: int) -> float:
    """Seconds before asking again for todos left for a process instance another transaction
    holds, after ``asked`` calls in a row that left some: 0.5, 1, then every 2."""
    return float(min(HELD_BACK_RETRY * 2 ** min(max(asked, 1) - 1, 8), HELD_BACK_MAX))


def denied_for_good(exc: BaseException, last_success: float) -> str | None:
    """Why the server should stop, when ``exc`` refuses its key and no call was answered for
    ``ACCESS_DENIED_STOP_AFTER`` seconds (``last_success`` is the storage's, monotonic)."""
    if not isinstance(exc, AccessDenied):
        return None
    silent = time.monotonic() - last_success
    if silent < ACCESS_DENIED_STOP_AFTER:
        return None
    return (f"{exc}; every call was refused for {silent:.0f}s, so this server stops (start it "
            "again with the right key)")
