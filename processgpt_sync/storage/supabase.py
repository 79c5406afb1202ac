"""Supabase backend: the same SQL functions, called through supabase-py's ``rpc()``.

PostgREST matches functions by argument names, so the parameters are exactly those of
``sql/queries.sql``. Each thread gets its own client: supabase-py's sync client keeps per-client
session state, and one per thread avoids sharing it. REST has no LISTEN: an idle server waits
for work in long calls that wait server-side (``wait_for_work``); users who can reach the
database directly may set DATABASE_URL instead.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
from postgrest.exceptions import APIError

from ..deep_json import read_json
from ..errors import (
    AccessDenied,
    ConfigurationError,
    SchemaMissing,
    StorageError,
    StorageUnavailable,
)
from ..queries import function_name
from ..retrying import STATEMENT_TIMEOUT
from .base import (
    FOREIGN_KEY_VIOLATION,
    INSTALL_HINT,
    MISSING_SCHEMA_STATES,
    Storage,
    transient_sqlstate,
)

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # seconds one RPC may take on the server
READ_MARGIN = 3.0  # seconds past REQUEST_TIMEOUT before a silent connection is given up
CONNECT_TIMEOUT = 10.0  # seconds to open one HTTP connection (TCP + TLS)
POOL_TIMEOUT = 5.0  # seconds to wait for a free connection of the thread's client
KEEPALIVE_EXPIRY = 5.0  # seconds an idle keep-alive connection is reused before it is dropped
WAIT_SECONDS = 8.0  # seconds one wait-for-work call may wait server-side; 0 polls instead
_UNAVAILABLE_CODES = {"PGRST000", "PGRST001", "PGRST002", "PGRST003"}
NO_JWT_SECRET = "PGRST300"  # a self-hosted PostgREST started without its JWT secret
_GATEWAY_STATUSES = {408, 429}  # and every 5xx that carries no PostgreSQL error
_REDIRECTS = {301, 302, 303, 307, 308}


def unavailable(code: str | None, status: int | None) -> bool:
    """Whether an error answer means "try again later" rather than a refusal. ``code`` is
    PostgREST's (a SQLSTATE, a PGRST code, or the HTTP status when the body was not JSON);
    ``status`` the HTTP status: a gateway's own 502/503/504/429 often has a JSON body with no
    code at all."""
    if code in _UNAVAILABLE_CODES:
        return True
    if code == NO_JWT_SECRET:  # a 500, but a setting of the server: no retry changes it
        return False
    if code is not None and len(code) == 5 and not code.startswith("PGRST"):  # a SQLSTATE
        return transient_sqlstate(code)  # as on PostgreSQL directly
    if code is not None and code.isdigit():  # the HTTP status, given as the code
        status = int(code)
    return status is not None and (status in _GATEWAY_STATUSES or status >= 500)


_SERVICE_KEY_NAMES = "SUPABASE_KEY, SUPABASE_SERVICE_ROLE_KEY or SERVICE_ROLE_KEY"


def _key_refused(code: str | None, status: int | None, message: str) -> str | None:
    """What to do about an answer that refuses the key itself, whatever the call (every call
    is refused alike); None for any other answer."""
    if code == NO_JWT_SECRET:
        return ("the REST API was started without its JWT secret, so it accepts no key: set "
                "it where the API runs (JWT_SECRET in a self-hosted Supabase's .env, "
                "PGRST_JWT_SECRET for PostgREST itself) and restart it")
    # the words of a refusal are read only where no SQLSTATE says what it is: a site's trigger
    # raising "tenant missing from JWT claims" refuses that one write, not the key
    by_words = code is None or code.startswith("PGRST") or (code.isdigit() and len(code) == 3)
    if code == "PGRST301" or (by_words and "JWT" in message):
        return (f"the key is not a valid JWT of this project, or it expired: set the project's "
                f"service-role key ({_SERVICE_KEY_NAMES})")
    if code == "PGRST302":
        return f"the request carried no key: set the service-role key ({_SERVICE_KEY_NAMES})"
    if (code in ("401", None) and status == 401) or (by_words and "API key" in message):
        return (f"the key is not this project's, or it was revoked: set the project's "
                f"service-role key ({_SERVICE_KEY_NAMES}), not the anon key")
    if code in ("403", None) and status == 403:  # the API gateway's own: PostgREST's has a code
        return (f"the API gateway forbids this server's requests: check the project's network "
                f"restrictions and its service-role key ({_SERVICE_KEY_NAMES})")
    return None


def _role_refused(code: str | None, message: str) -> str | None:
    """What to do about the database refusing what the key's role may do (the anon key, a
    grant missing); None for any other answer. A refusal of this call only: a site's
    row-level security or trigger may refuse one write and not the next."""
    if code == "42501" or "permission denied" in message:
        return ("the key's role may not do this: use the service-role key "
                f"({_SERVICE_KEY_NAMES}), not the anon key; with it, run `processgpt-sync "
                "init-db` again, which grants this library's functions")
    return None


@contextmanager
def wrap_exceptions(target: str, status: Callable[[], int | None] = lambda: None,
                    answered_meanwhile: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Turn supabase-py / PostgREST / HTTP errors into the library's own; ``status()`` is the
    HTTP status of the failed answer, when known; ``answered_meanwhile()`` whether the
    database answered another call while this one waited."""
    try:
        yield
    except APIError as exc:
        code = str(exc.code) if exc.code is not None else None
        message = exc.message or str(exc)
        if code == "PGRST202":
            raise SchemaMissing(
                f"function {target} not found by Supabase: {message}; {INSTALL_HINT}. Installed "
                "already? Then the REST API's schema cache is older than the install: run "
                "NOTIFY pgrst, 'reload schema'; in the SQL editor (init-db sends it)",
                code=code, hint=exc.hint,
            ) from exc
        if code in MISSING_SCHEMA_STATES:  # a function, table or type the call reaches
            raise SchemaMissing(f"Supabase {target} failed ({code}): {message}; {INSTALL_HINT}",
                                code=code, hint=exc.hint) from exc
        if unavailable(code, status()):
            raise StorageUnavailable(f"Supabase unavailable ({target}): {message}",
                                     code=code, hint=exc.hint) from exc
        shown = code or f"HTTP {status()}"
        advice = _key_refused(code, status(), message)
        if advice is not None:
            raise AccessDenied(f"Supabase refused {target} ({shown}): {message}; {advice}",
                               code=code, hint=exc.hint) from exc
        advice = _role_refused(code, message)
        if advice is not None:
            raise StorageError(f"Supabase refused {target} ({shown}): {message}; {advice}",
                               code=code, hint=exc.hint) from exc
        if status() in _REDIRECTS:  # httpx follows none: a URL the project does not serve
            raise StorageError(
                f"Supabase answered {target} with HTTP {status()}, a redirect ({message}): set "
                "SUPABASE_URL to the project's API URL as it is redirected to (https://, not "
                "http://, and nothing after the host)", code=code) from exc
        if (code is None or code == "404") and status() == 404:
            # PostgREST names every error it sends (PGRST202 for a missing function): a 404
            # without a code is the API gateway's own, a route missing while it restarts or
            # reloads. Retried, so no todo's result is refused for it; at start it stops the
            # server with this message. (A 413 or a 403 stays a refusal: no retry changes it.)
            raise StorageUnavailable(
                f"Supabase answered {target} with HTTP 404 and no PostgREST error ({message}): "
                "the API gateway's own answer (is SUPABASE_URL the project's API URL? is the "
                "gateway restarting?)", code=code) from exc
        if code == FOREIGN_KEY_VIOLATION and exc.details:
            message = f"{message}: {exc.details}"
        hint = f" ({exc.hint})" if exc.hint else ""
        raise StorageError(f"Supabase {target} failed ({code}): {message}{hint}",
                           code=code, hint=exc.hint) from exc
    except httpx.ReadTimeout as exc:
        if answered_meanwhile():
            # The database answers other calls: this one is too heavy for the read timeout
            # (the key's role has a statement_timeout above it, so no 57014 came first).
            # Taken for a statement timeout: a batch is written in halves, not sent whole
            # again for ever (given up after more tries than a refused one: the database may
            # have run it all the same); through a partition nothing is answered, and it
            # stays an outage.
            timed_out = StorageUnavailable(
                f"Supabase {target} got no answer within the read timeout while other calls "
                f"were answered: taken for a statement timeout ({exc!r})",
                code=STATEMENT_TIMEOUT)
            timed_out.unanswered = True
            raise timed_out from exc
        raise StorageUnavailable(f"Supabase unreachable ({target}): {exc!r}") from exc
    except httpx.HTTPError as exc:
        raise StorageUnavailable(f"Supabase unreachable ({target}): {exc!r}") from exc
    except UnicodeDecodeError as exc:  # a 2xx body postgrest-py could not even read as text
        raise StorageUnavailable(f"Supabase answered {target} with a body that is not text, "
                                 f"not PostgREST's answer: is a proxy in the way? ({exc})"
                                 ) from exc
    except RuntimeError as exc:  # httpx: this thread's client was closed by close() meanwhile
        if "has been closed" not in str(exc):
            raise
        raise StorageUnavailable(f"Supabase client closed ({target}): {exc}") from exc


def _retry_after(response: httpx.Response | None) -> float | None:
    """The seconds an answer's ``Retry-After`` asks for (a number, or an HTTP date)."""
    value = None if response is None else response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _check_answer(target: str, data: Any, response: httpx.Response | None) -> None:
    """Raise StorageUnavailable unless ``response`` is PostgREST's answer: a JSON body (204 No
    Content is for void functions alone). postgrest-py gives ``[]`` for an empty body and the
    text for one it could not parse, so those are told from a real answer by the body itself;
    a body another server sent (a proxy's or a firewall's page) is not JSON-typed."""
    status = None if response is None else response.status_code
    content_type = "" if response is None else response.headers.get("content-type", "")
    if data and "json" not in content_type:
        raise StorageUnavailable(
            f"Supabase answered {target} with HTTP {status} and a {content_type or 'untyped'} "
            f"body, not JSON: is a proxy in the way? ({str(data)[:120]!r})")
    if not (isinstance(data, str) or data == []) or status == 204:
        return
    body = b"" if response is None else response.content
    if not body.strip():
        raise StorageUnavailable(f"Supabase answered {target} with HTTP {status} and an empty "
                                 "body, not PostgREST's answer: is a proxy in the way?")
    try:
        json.loads(body)
    except ValueError as exc:
        raise StorageUnavailable(f"Supabase answered {target} with HTTP {status} and a body "
                                 f"that is not JSON: is a proxy in the way? ({exc}; "
                                 f"{body[:120]!r})") from exc


def checked_url(url: str) -> str:
    """``SUPABASE_URL`` without the whitespace a secret file adds, or a ConfigurationError
    saying what is wrong with it (at start, rather than as an outage on every call)."""
    url = url.strip()
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"SUPABASE_URL must start with https:// (or http:// for a "
                                 f"local Supabase; got {url!r})")
    try:
        parts = urllib.parse.urlsplit(url)
        host, _port = parts.hostname, parts.port  # reading the port checks its range
    except ValueError as exc:
        raise ConfigurationError(f"SUPABASE_URL is not a valid URL ({exc}): {url!r}") from exc
    if not host:
        raise ConfigurationError(f"SUPABASE_URL names no host: {url!r}")
    return url


def checked_key(key: str) -> str:
    """The service-role key without surrounding whitespace (a secret made from a file ends
    in a line break); one an HTTP header cannot carry is a ConfigurationError that never shows
    the key (httpx's own error would, in every log line)."""
    key = key.strip()
    if not key or not all("!" <= c <= "~" for c in key):
        raise ConfigurationError(
            "the Supabase service-role key (SUPABASE_KEY, SUPABASE_SERVICE_ROLE_KEY or "
            "SERVICE_ROLE_KEY) holds a space, a line break or another character an HTTP header "
            "cannot carry: set it to the key alone")
    return key


class SupabaseStorage(Storage):
    """Calls the processgpt-sync functions through Supabase's REST API."""

    backend = "supabase"

    def __init__(self, url: str, key: str, *, timeout: float = REQUEST_TIMEOUT,
                 wait_seconds: float = WAIT_SECONDS) -> None:
        """:param wait_seconds: how long one call of an idle server waits for work on the
            database (holding one PostgREST connection meanwhile); 0 polls with back-off."""
        self._url = checked_url(url)
        self._key = checked_key(key)
        self._timeout = timeout
        self.wait_seconds = min(wait_seconds, timeout)  # inside the HTTP read timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._http: dict[httpx.Client, threading.Thread] = {}  # each client's thread
        self._busy: dict[httpx.Client, int] = {}  # calls in flight per client
        self._closed = False

    def __repr__(self) -> str:
        return f"SupabaseStorage({self._url!r})"  # never the key

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            try:
                client = self._new_client()
            except OSError as exc:  # no descriptor for the CA bundle: the host's limit
                raise StorageUnavailable(f"Supabase client could not be created: {exc}") from exc
            except Exception as exc:  # supabase-py refused the URL or the key (no I/O yet)
                raise ConfigurationError(
                    f"Supabase client could not be created: {type(exc).__name__}: {exc}"
                ) from exc
        return client

    def _new_client(self) -> Any:
        """This thread's client; the clients of threads that have ended are closed first, so
        short-lived threads (a web framework's thread pool) do not leave sockets behind."""
        from supabase import create_client
        from supabase.lib.client_options import SyncClientOptions

        # Timeouts live on the HTTP client (supabase-py deprecates its own option): a stalled
        # gateway fails the call after the read timeout instead of hanging the worker, and the
        # connection it stalled on is closed, so the retry opens a new one.
        timeout = httpx.Timeout(self._timeout + READ_MARGIN, connect=CONNECT_TIMEOUT,
                                pool=POOL_TIMEOUT)
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=2,
                              keepalive_expiry=KEEPALIVE_EXPIRY)
        local = self._local

        def keep_response(response: httpx.Response) -> None:
            local.response = response

        http = httpx.Client(timeout=timeout, limits=limits,
                            event_hooks={"response": [keep_response]})
        with self._lock:
            ended = [c for c, thread in self._http.items()
                     if not thread.is_alive() and not self._busy.get(c)]
            for ended_client in ended:
                del self._http[ended_client]
                self._busy.pop(ended_client, None)
            self._http[http] = threading.current_thread()
        for ended_client in ended:
            try:
                ended_client.close()
            except Exception:  # the new client stands; the old one's sockets are the OS's now
                logger.warning("closing the HTTP client of an ended thread failed",
                               exc_info=True)
        options = SyncClientOptions(
            httpx_client=http,
            postgrest_client_timeout=None,  # type: ignore[arg-type]
            auto_refresh_token=False,
            persist_session=False,
        )
        try:
            client = create_client(self._url, self._key, options=options)
        except BaseException:  # no client for this thread: its HTTP connections go too
            with self._lock:
                self._http.pop(http, None)
            http.close()
            raise
        self._local.client = client
        self._local.http = http
        return client

    def close(self) -> None:
        """Close every thread's HTTP connections; a client with a call in flight (a wait for
        work left behind by stop) is closed when that call returns, never under it: closing a
        socket another thread reads from could hand that thread a reused descriptor."""
        with self._lock:
            self._closed = True
            clients = [c for c in self._http if not self._busy.get(c)]
            self._http = {c: t for c, t in self._http.items() if self._busy.get(c)}
        for client in clients:
            client.close()

    def call(self, query: str, params: Mapping[str, Any]) -> Any:
        name = function_name(query)
        client = self._client()
        http: httpx.Client = self._local.http
        with self._lock:
            self._busy[http] = self._busy.get(http, 0) + 1
        local = self._local
        local.response = None

        def status() -> int | None:
            return None if local.response is None else int(local.response.status_code)

        started = time.monotonic()
        try:
            try:
                with wrap_exceptions(name, status, lambda: self.last_success > started):
                    data = client.rpc(name, dict(params)).execute().data
            except StorageUnavailable as exc:  # a rate limit or a busy gateway may say when
                exc.retry_after = _retry_after(local.response)
                raise
            except RecursionError:  # an answer nested deeper than json.loads reads
                if local.response is None:
                    raise
                data = read_json(local.response.content)
            _check_answer(name, data, local.response)
        finally:
            local.response = None
            with self._lock:
                self._busy[http] -= 1
                last = self._closed and not self._busy[http]
                if last:
                    del self._busy[http]
                    if http in self._http:
                        del self._http[http]
            if last:
                self._local.client = None
                http.close()
        self.last_success = time.monotonic()
        return data

    def wait_for_work(self, *, agent_orch: str, consumer: str, seconds: float,
                      tenant_id: str | None = None) -> bool:
        """Wait on the database, up to ``seconds``, until a claim would find work; True if it
        would. The call also refreshes this server's registry row (``last_seen``)."""
        return bool(self.call("wait_for_work", {
            "p_agent_orch": agent_orch, "p_consumer": consumer,
            "p_seconds": min(seconds, self.wait_seconds), "p_tenant_id": tenant_id}))
