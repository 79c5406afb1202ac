"""A test-only HTTP gateway that speaks PostgREST's RPC protocol, over the embedded PostgreSQL.

PostgREST itself cannot be installed here, so the Supabase backend is tested through the real
supabase-py client against this: ``POST /rest/v1/rpc/<function>`` with a JSON object of named
arguments calls the function and answers with its JSON value; errors use PostgREST's body
``{code, message, details, hint}`` and status codes, including PGRST202 for an unknown function.
Requests must carry the service key as ``apikey`` and ``Authorization: Bearer``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.types.json import Jsonb

SERVICE_KEY = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.dGVzdC1zaWduYXR1cmU"
RPC_PREFIX = "/rest/v1/rpc/"


def status_for(sqlstate: str | None) -> int:
    """PostgREST's mapping of SQLSTATE classes to HTTP status codes."""
    code = sqlstate or ""
    exact = {"23503": 409, "23505": 409, "25006": 405, "42883": 404, "42P01": 404,
             "42501": 403, "P0001": 400, "57014": 500}
    if code in exact:
        return exact[code]
    by_class = {"08": 503, "09": 500, "0L": 403, "0P": 403, "23": 400, "25": 500, "28": 403,
                "2D": 500, "38": 500, "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500,
                "55": 500, "57": 503, "58": 500, "F0": 500, "HV": 500, "XX": 500}
    return by_class.get(code[:2], 400)



@dataclass(frozen=True)
class RawBody:
    """An answer body sent as it is: a proxy's or a firewall's page (bytes: not even text),
    or the database's JSON text."""

    text: str | bytes
    content_type: str = "text/html"
    headers: tuple[tuple[str, str], ...] = ()  # sent too (a rate limit's Retry-After)

class Gateway:
    """Serves RPC calls for one database on 127.0.0.1 until ``close()``."""

    def __init__(self, database_url: str, key: str = SERVICE_KEY) -> None:
        self.key = key
        self.pool = psycopg_pool.ConnectionPool(database_url, min_size=1, max_size=24,
                                                kwargs={"autocommit": True}, open=True)
        self.requests = 0
        self.calls: Counter[str] = Counter()  # requests by function name
        self.called_at: dict[str, list[float]] = {}  # each request's time, by function name
        self._count_lock = threading.Lock()
        self.down = False  # when True every call answers 503, like an unreachable database
        self.failing: set[str] = set()  # functions that answer 503 (a partial outage)
        self.lose_answer: set[str] = set()  # run and commit the next call, answer 503 instead
        # (the link died after the database did the work); each name once
        # the API gateway's own answers (Kong's 502/503/504, a rate limit's 429), given to the
        # next calls of a function instead of calling it: (status, body) in order
        self.gateway_answers: dict[str, list[tuple[int, Any]]] = {}
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with gateway._count_lock:
                    gateway.requests += 1
                    name = self.path[len(RPC_PREFIX):].split("?")[0]
                    gateway.calls[name] += 1
                    gateway.called_at.setdefault(name, []).append(time.monotonic())
                status, body = gateway.handle(self.path, dict(self.headers.items()),
                                              self.rfile.read(int(self.headers["Content-Length"]
                                                                  or 0)))
                raw = isinstance(body, RawBody)
                if raw:
                    payload = body.text if isinstance(body.text, bytes) else body.text.encode()
                else:
                    payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", body.content_type if raw else "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for header, value in body.headers if raw else ():
                    self.send_header(header, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for the loop's next look at its flag: every 0.5 s by default,
        # which every test on the Supabase backend would spend closing its gateway
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.pool.close()

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        lower = {k.lower(): v for k, v in headers.items()}
        if lower.get("apikey") != self.key or lower.get("authorization") != f"Bearer {self.key}":
            return 401, {"message": "Invalid API key",
                         "hint": "Double check your Supabase `anon` or `service_role` API key."}
        if not path.startswith(RPC_PREFIX):
            return 404, {"code": "PGRST125", "message": "Invalid path specified in request URL",
                         "details": None, "hint": None}
        answers = self.gateway_answers.get(path[len(RPC_PREFIX):].split("?")[0])
        if answers:
            return answers.pop(0)
        if self.down:
            return 503, {"code": "PGRST001", "message": "Database client error. Retrying the "
                         "connection.", "details": None, "hint": None}
        name = path[len(RPC_PREFIX):].split("?")[0]
        if name in self.failing:
            return 503, {"code": "PGRST001", "message": "Database client error. Retrying the "
                         "connection.", "details": None, "hint": None}
        try:
            params = json.loads(raw or b"{}")
        except ValueError as exc:
            return 400, {"code": "PGRST102", "message": "Empty or invalid json",
                         "details": str(exc), "hint": None}
        try:
            with self.pool.connection() as conn:
                signature = self.signature(conn, name, set(params))
                if signature is None:
                    arguments = ", ".join(sorted(params))
                    return 404, {
                        "code": "PGRST202",
                        "message": f"Could not find the function public.{name}({arguments}) "
                                   "in the schema cache",
                        "details": f"Searched for the function public.{name} with parameters "
                                   f"{arguments} or with a single unnamed json/jsonb parameter, "
                                   "but no matches were found in the schema cache.",
                        "hint": None,
                    }
                query = sql.SQL("SELECT to_jsonb({}({}))::text").format(
                    sql.Identifier(name),
                    sql.SQL(", ").join(
                        sql.SQL("{} => {}::{}").format(sql.Identifier(arg), sql.Placeholder(arg),
                                                       sql.SQL(kind))
                        for arg, kind in signature if arg in params))
                values = {arg: Jsonb(params[arg]) if kind == "jsonb" else params[arg]
                          for arg, kind in signature if arg in params}
                row = conn.execute(query, values).fetchone()
            if name in self.lose_answer:
                self.lose_answer.discard(name)
                return 503, {"code": "PGRST000", "message": "connection lost", "details": None,
                             "hint": None}
        except psycopg_pool.PoolTimeout as exc:
            return 503, {"code": "PGRST000", "message": str(exc), "details": None, "hint": None}
        except psycopg.OperationalError as exc:
            if exc.sqlstate is None or exc.sqlstate.startswith("08"):  # the connection itself
                return 503, {"code": "PGRST000", "message": str(exc), "details": None,
                             "hint": None}
            diag = exc.diag  # the database answered (a deadlock, a program limit): its code
            return status_for(exc.sqlstate), {"code": exc.sqlstate,
                                              "message": diag.message_primary or str(exc),
                                              "details": diag.message_detail,
                                              "hint": diag.message_hint}
        except psycopg.Error as exc:
            diag = exc.diag
            return status_for(exc.sqlstate), {"code": exc.sqlstate,
                                              "message": diag.message_primary or str(exc),
                                              "details": diag.message_detail,
                                              "hint": diag.message_hint}
        # the database's own JSON text, as PostgREST sends it (values of any depth)
        return HTTPStatus.OK, RawBody("null" if row is None or row[0] is None else row[0],
                                      "application/json; charset=utf-8")

    @staticmethod
    def signature(conn: psycopg.Connection[Any], name: str,
                  given: set[str]) -> list[tuple[str, str]] | None:
        """(argument, type) of the function ``name`` that accepts exactly these named
        arguments (the others having defaults), as PostgREST resolves overloads."""
        rows = conn.execute(
            "SELECT p.proargnames, p.pronargdefaults, "
            "array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t) "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' AND p.proname = %s", (name,)).fetchall()
        for names, defaults, types in rows:
            names = names or []
            required = set(names[: len(names) - defaults])
            if required <= given <= set(names):
                return list(zip(names, types, strict=True))
        return None
