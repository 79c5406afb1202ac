"""Server settings: one frozen dataclass, read from arguments and the environment."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
DEFAULT_LEASE_SECONDS = 60  # seconds
DEFAULT_MAX_CLAIMS = 3
DEFAULT_GRACE_SECONDS = 30.0  # seconds
DEFAULT_POLL_INTERVAL = 5.0  # seconds between fallback polls when idle
EVENT_FLUSH_INTERVAL = 0.05  # seconds an event may wait for its batch
EVENT_BATCH_SIZE = 500  # events per write
MAX_PENDING_EVENTS = 20_000  # unwritten events before claiming pauses
DEFAULT_STATEMENT_TIMEOUT = 10.0  # seconds one SQL statement may run
DEFAULT_TCP_TIMEOUT = 10.0  # seconds of silence before a database connection counts as dead

# Environment variable -> field, the first one set wins. SUPABASE_* keep the names supabase-py
# users already know; SERVICE_ROLE_KEY is the name of the ProcessGPT platform's own `.env`.
ENVIRONMENT = {
    "PROCESSGPT_AGENT_ORCH": "agent_orch",
    "PROCESSGPT_WORKERS": "workers",
    "DATABASE_URL": "database_url",
    "SUPABASE_URL": "supabase_url",
    "SUPABASE_KEY": "supabase_key",
    "SUPABASE_SERVICE_ROLE_KEY": "supabase_key",
    "SERVICE_ROLE_KEY": "supabase_key",
    "PROCESSGPT_EMBEDDED_DIR": "embedded_dir",
    "PROCESSGPT_TENANT_ID": "tenant_id",
    "PROCESSGPT_LEASE_SECONDS": "lease_seconds",
    "PROCESSGPT_MAX_CLAIMS": "max_claims",
    "PROCESSGPT_GRACE_SECONDS": "grace_seconds",
    "PROCESSGPT_POLL_INTERVAL": "poll_interval",
    "PROCESSGPT_TIMEOUT": "timeout",
    "PROCESSGPT_CONSUMER": "consumer",
    "PROCESSGPT_TRANSACTION_POOLER": "transaction_pooler",
    "PROCESSGPT_FAIR": "fair",
    "PROCESSGPT_LISTEN": "listen",
    "PROCESSGPT_MAX_RUNNING": "max_running",
    "PROCESSGPT_MAX_RUNNING_PER_TENANT": "max_running_per_tenant",
    "PROCESSGPT_STATEMENT_TIMEOUT": "statement_timeout",
    "PROCESSGPT_TCP_TIMEOUT": "tcp_timeout",
    "PROCESSGPT_LOOP": "loop",
    "PROCESSGPT_GC_THRESHOLD": "gc_threshold",
}


SUPABASE_KEY_VARIABLES = tuple(v for v, name in ENVIRONMENT.items() if name == "supabase_key")
OTHER_VARIABLES = ("PROCESSGPT_LOG_LEVEL", "PROCESSGPT_CONSOLE_TOKEN")  # read by the CLI


def supabase_key_from(environ: Mapping[str, str]) -> str | None:
    """The Supabase service-role key from the first of its variables that is set."""
    return next((environ[v] for v in SUPABASE_KEY_VARIABLES if environ.get(v)), None)


def behind_transaction_pooler(transaction_pooler: bool | None, database_url: str | None) -> bool:
    """As set, else whether the URL names Supabase's transaction pooler port (6543)."""
    if transaction_pooler is not None:
        return transaction_pooler
    return re.search(r":6543(?:[/?]|$)|\bport=6543\b", database_url or "") is not None


CONNECTION_FIELDS = ("transaction_pooler", "statement_timeout", "tcp_timeout")


def connection_options(*, transaction_pooler: bool | None = None,
                       database_url: str | None = None,
                       statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
                       tcp_timeout: float = DEFAULT_TCP_TIMEOUT) -> dict[str, Any]:
    """What ``storage.connect`` takes of these settings: no prepared statements behind a
    transaction pooler, and the timeouts checked."""
    _timeout_seconds("statement_timeout", statement_timeout)
    _timeout_seconds("tcp_timeout", tcp_timeout, MOST_TCP_SECONDS)
    return {"prepare": not behind_transaction_pooler(transaction_pooler, database_url),
            "statement_timeout": statement_timeout, "tcp_timeout": tcp_timeout}


def environment_connection_options(environ: Mapping[str, str],
                                   database_url: str | None) -> dict[str, Any]:
    """The connection options ``serve`` reads from the environment, for the commands that open
    the database without a Settings: ``status``, ``health`` and the others must not prepare
    statements behind a pooler, nor time out sooner than the servers they look at."""
    return connection_options(database_url=database_url,
                              **environment_values(environ, CONNECTION_FIELDS))


def environment_values(environ: Mapping[str, str],
                       fields: Sequence[str] | None = None) -> dict[str, Any]:
    """The settings the environment sets (of ``fields``, else all), converted."""
    values: dict[str, Any] = {}
    for variable, name in ENVIRONMENT.items():
        raw = environ.get(variable)
        if raw not in (None, "") and name not in values and (fields is None or name in fields):
            values[name] = _convert(name, raw, variable)
    return values


def default_consumer() -> str:
    """A name unique to this server instance: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a server needs to know; validated when built."""

    agent_orch: str = ""
    """The `todolist.agent_orch` value this server claims."""
    workers: int = DEFAULT_WORKERS
    """Worker threads: how many executors run at once (a todo whose executor returned frees
    its worker while its outcome is written)."""
    database_url: str | None = None
    """A libpq URL or conninfo string; wins over Supabase and the embedded server."""
    supabase_url: str | None = None
    """Supabase project URL (used with `supabase_key` when no `database_url` is set)."""
    supabase_key: str | None = field(default=None, repr=False)
    """Supabase service-role key. Never logged."""
    embedded_dir: str | None = None
    """Data directory of the embedded PostgreSQL (default: the user data folder)."""
    tenant_id: str | None = None
    """Claim only this tenant's todos."""
    fair: bool = True
    """Tenants take turns: each tenant's k-th oldest claimable todo has priority (its running
    todos + k), so one tenant's backlog cannot hold up another's first todo. False: oldest
    first across all tenants."""
    max_running: int | None = None
    """At most this many todos of the agent_orch run at once across every server."""
    max_running_per_tenant: int | None = None
    """At most this many todos of one tenant run at once across every server."""
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    """How long a claim stays valid without a heartbeat."""
    max_claims: int = DEFAULT_MAX_CLAIMS
    """A todo claimed this many times without finishing becomes FAILED."""
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    """On stop: how long in-flight todos may finish before they are given back."""
    poll_interval: float = DEFAULT_POLL_INTERVAL
    """Longest wait between polls when idle and no NOTIFY can wake the server (Supabase, a
    transaction pooler, ``listen=False``); with fleet-wide limits also while listening. A
    listening server without them polls every lease/4 (or this, if longer)."""
    timeout: float | None = None
    """Per-todo time limit in seconds, counted from the executor's start; None for no limit."""
    consumer: str = field(default_factory=default_consumer)
    """This server's name in `todolist.consumer`."""
    listen: bool = True
    """Use LISTEN/NOTIFY for instant wake-ups where the backend supports it."""
    transaction_pooler: bool | None = None
    """The database URL goes through a transaction pooler (PgBouncer / Supavisor transaction
    mode, e.g. Supabase port 6543): no LISTEN, no prepared statements. None: detect port 6543."""
    loop: str = "thread"
    """Where async executors run: "thread", an event loop per worker thread (an executor that
    blocks inside ``async def`` stalls only its own todo), or "shared", one loop thread for all
    async todos (async clients kept across todos work; a blocking executor stalls them all)."""
    summarize_feedback: Callable[[list[Any], Any], str] | None = field(default=None, repr=False)
    """``fn(feedback_items, previous_result) -> str`` making ``extras["summarized_feedback"]``
    on a revision (default: the latest feedback's text). Runs on the todo's worker thread."""
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    """Seconds one SQL call may run: ``statement_timeout`` on the server (unless the URL sets
    it); a connection that has not answered a few seconds later is dropped by the client.
    On Supabase, the HTTP read timeout of one call."""
    tcp_timeout: float = DEFAULT_TCP_TIMEOUT
    """Seconds of silence before a database connection counts as dead (TCP keepalives and
    ``tcp_user_timeout``, unless the URL sets them)."""
    gc_threshold: int | None = None
    """The garbage collector's first threshold (``gc.set_threshold``) while the server runs,
    restored at stop; never lowered. None: 10,000 from 16 workers, where the objects of
    running todos and a busy server's allocations make frequent collections costly; 0: the
    interpreter's own."""

    def __post_init__(self) -> None:
        for name in ("agent_orch", "consumer", "loop", "database_url", "supabase_url",
                     "supabase_key", "embedded_dir", "tenant_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    f"{name} must be a string, got {type(value).__name__} {value!r}"
                    if name != "supabase_key" else
                    f"supabase_key must be a string, got {type(value).__name__}")
        if not self.agent_orch or not self.agent_orch.strip():
            raise ConfigurationError(
                "agent_orch is required: pass agent_orch=... or set PROCESSGPT_AGENT_ORCH "
                "(it must match todolist.agent_orch of the todos to serve)"
            )
        for name in ("workers", "lease_seconds", "max_claims"):
            _positive_int(name, getattr(self, name))
        _positive("poll_interval", self.poll_interval)
        _timeout_seconds("statement_timeout", self.statement_timeout)
        _timeout_seconds("tcp_timeout", self.tcp_timeout, MOST_TCP_SECONDS)
        if self.gc_threshold is not None and (
                not _is_int(self.gc_threshold) or self.gc_threshold < 0):
            raise ConfigurationError(
                f"gc_threshold must be a whole number >= 0 (0 keeps the interpreter's), got "
                f"{self.gc_threshold!r}")
        if not _is_number(self.grace_seconds) or self.grace_seconds < 0:
            raise ConfigurationError(
                f"grace_seconds must be a finite number >= 0, got {self.grace_seconds!r}")
        if self.timeout is not None:
            _positive("timeout", self.timeout)
        for name in ("max_running", "max_running_per_tenant"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.summarize_feedback is not None and not callable(self.summarize_feedback):
            raise ConfigurationError(
                "summarize_feedback must be a function (feedback_items, previous_result) -> "
                f"str, got {type(self.summarize_feedback).__name__}")
        for name in ("listen", "fair", "transaction_pooler"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "transaction_pooler"
                                                    and value is None):
                raise ConfigurationError(
                    f"{name} must be True or False, got {type(value).__name__} {value!r}")
        if self.loop not in ("thread", "shared"):
            raise ConfigurationError(f"loop must be 'thread' or 'shared', got {self.loop!r}")
        check_backend(self.database_url, self.supabase_url, self.supabase_key)

    @property
    def behind_transaction_pooler(self) -> bool:
        """True when the database URL goes through a transaction pooler."""
        return behind_transaction_pooler(self.transaction_pooler, self.database_url)

    @property
    def connection_options(self) -> dict[str, Any]:
        """What ``storage.connect`` takes of these settings."""
        return connection_options(transaction_pooler=self.transaction_pooler,
                                  database_url=self.database_url,
                                  statement_timeout=self.statement_timeout,
                                  tcp_timeout=self.tcp_timeout)

    @property
    def backend(self) -> str:
        """Which storage backend these settings select: postgres, supabase or embedded."""
        if self.database_url:
            return "postgres"
        if self.supabase_url and self.supabase_key:
            return "supabase"
        return "embedded"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); non-None overrides win."""
        environ = os.environ if environ is None else environ
        _warn_unknown_variables(environ)
        values = environment_values(environ)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown option(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """A misspelt PROCESSGPT_ variable is ignored like any other: say so, with the likely
    name (PROCESSGPT_DATABASE_URL would otherwise serve the embedded database unnoticed)."""
    known = [*ENVIRONMENT, *OTHER_VARIABLES]
    for variable in sorted(environ):
        if not variable.startswith("PROCESSGPT_") or variable in known:
            continue
        guess = difflib.get_close_matches(variable, known, n=1) or difflib.get_close_matches(
            variable.removeprefix("PROCESSGPT_"), known, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        logger.warning("%s is not a processgpt-sync variable and is ignored%s", variable, hint,
                       extra={"action": "settings"})


def check_backend(database_url: str | None, supabase_url: str | None,
                  supabase_key: str | None) -> None:
    """Refuse a half-configured Supabase backend: silently using the embedded database instead
    would enqueue to, and report on, the wrong database. A database URL wins over Supabase."""
    if bool(supabase_url) != bool(supabase_key) and not database_url:
        missing = "SUPABASE_KEY" if supabase_url else "SUPABASE_URL"
        raise ConfigurationError(
            f"Supabase needs both SUPABASE_URL and SUPABASE_KEY; {missing} is not set "
            "(SUPABASE_SERVICE_ROLE_KEY or SERVICE_ROLE_KEY also serve as the key; unset the other "
            "to use the embedded database, or set DATABASE_URL)"
        )


def _is_number(value: object) -> bool:
    """A finite int or float (inf and nan would break every wait and deadline made of it)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value: float) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}")


# PostgreSQL keeps statement_timeout as whole milliseconds in an int: a longer one fails every
# connection's set-up, a shorter one rounds to 0, no limit at all. The TCP timeout becomes
# keepalives of half as many seconds, which Linux holds up to 32,767.
MOST_STATEMENT_SECONDS = 2_147_483
MOST_TCP_SECONDS = 65_534


def _timeout_seconds(name: str, value: float, most: int = MOST_STATEMENT_SECONDS) -> None:
    _positive(name, value)
    if not 0.001 <= value <= most:
        raise ConfigurationError(
            f"{name} must be between 0.001 and {most:,} s (what PostgreSQL and the network "
            f"settings can hold), got {value!r}")


def _positive_int(name: str, value: int) -> None:
    if not _is_int(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive whole number, got {value!r}")


def _convert(name: str, raw: str, variable: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    try:
        if kind in ("int", "int | None"):
            return int(raw)
        if kind in ("float", "float | None"):
            return float(raw)
        if kind in ("bool", "bool | None"):
            word = raw.strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ConfigurationError(f"{variable}={raw!r} is not true or false (1/0, yes/no, "
                                     "on/off also do)")
    except ValueError:
        raise ConfigurationError(f"{variable}={raw!r} is not a valid {kind}") from None
    return raw
