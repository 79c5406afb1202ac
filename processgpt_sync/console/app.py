"""The console's web app: its routes, pages and actions on one Storage.

Server-rendered (Jinja2, autoescaped) with two small scripts: vendored htmx for the filter form,
the confirm dialogs and the servers panel, and ``console.js`` for the Server-Sent Events
streams (:mod:`.streams`). Every read and write goes through the SQL functions all backends
share. Owns what each page reads and shows and what each action may change; access (token,
CSRF) is :mod:`.security`'s, the wake-ups :mod:`.feed`'s. Must not block the event loop: storage
calls run in the thread pool.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..deep_json import TOO_DEEP_TO_SHOW, shown_json
from ..errors import (
    AccessDenied,
    ConfigurationError,
    SchemaMissing,
    StorageError,
    StorageUnavailable,
)
from ..storage import Storage
from .charts import (
    CHART_BUCKET,
    CHART_MINUTES,
    parse_time,
    pickup_chart,
    throughput_chart,
    turnaround_chart,
)
from .feed import ChangeFeed
from .security import CSRF_FIELD, CSRF_HEADER, Guard, csrf_ok, csrf_token, is_loopback
from .streams import (
    EVENT_PAGE,
    PANELS,
    cursor,
    digest,
    event_stream,
    floor_of,
    list_updates,
    todo_updates,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATES = ("QUEUED", "STARTED", "HUMAN_ASKED", "FB_REQUESTED", "WAITING_FOR_STEP", "COMPLETED",
          "FAILED", "CANCELLED", "IN_PROGRESS")  # the last: a person's, or a drafted step
LIST_LIMIT = 200  # todos on the list page
PANEL_INTERVAL = 5.0  # seconds between servers panel refreshes
SAMPLES_KEPT = 120  # servers panel samples kept for the pickup latency chart
PRETTY_WIDTH = 80  # JSON up to this many characters stays on one line
TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # URL-safe and base64 alphabets


@dataclass(frozen=True, kw_only=True)
class ConsoleConfig:
    """How the console is served and what it may do."""

    host: str = "127.0.0.1"
    port: int = 8710
    token: str | None = None
    """Access token every request must carry; required to bind a non-loopback host."""
    read_only: bool = False
    """Hide and refuse every action (cancel, enqueue, answer, revision)."""
    agent_orch: str | None = None
    """The agent_orch the list opens filtered on."""
    user_id: str | None = None
    """Written as the user of answers and revision feedback."""

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ConfigurationError(
                f"refusing to serve the console on {self.host!r} without an access token: "
                "set --token (or PROCESSGPT_CONSOLE_TOKEN), or keep the default 127.0.0.1")
        if self.token is not None and len(self.token) < 16:
            raise ConfigurationError("the console access token must be at least 16 characters")
        if self.token is not None and not TOKEN_CHARACTERS.fullmatch(self.token):
            raise ConfigurationError(
                "the console access token may hold letters, digits and - . _ ~ + / = only "
                "(it travels in a URL and a cookie): `openssl rand -hex 24` makes one")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["pretty"] = pretty
    env.filters["clock"] = clock
    env.filters["short"] = lambda value: str(value or "")[:8]
    env.globals["STATES"] = STATES
    return env


def pretty(value: Any) -> str:
    """A JSON value as readable text (strings as themselves); escaped later by the template."""
    if isinstance(value, str):
        return value
    compact = shown_json(value, ensure_ascii=False, default=str)
    if len(compact) <= PRETTY_WIDTH or compact == TOO_DEEP_TO_SHOW:
        return compact
    return shown_json(value, indent=2, ensure_ascii=False, default=str)


def clock(value: Any) -> str:
    """The time of day of an ISO timestamp, to the millisecond."""
    text = str(value or "")
    return text[11:23] if len(text) >= 19 else text


class Console:
    """The app's state: storage, feed, templates and the servers panel's samples."""

    def __init__(self, storage: Storage, config: ConsoleConfig) -> None:
        self.storage = storage
        self.config = config
        self.feed = ChangeFeed(storage, listen=not config.read_only)
        self.env = _environment()
        self.samples: deque[dict[str, Any]] = deque(maxlen=SAMPLES_KEPT)

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        return HTMLResponse(self.fragment(request, name, **context), status_code=status)

    def fragment(self, request: Request, name: str, **context: Any) -> str:
        context.update(csrf=csrf_token(request.scope), read_only=self.config.read_only,
                       csrf_field=CSRF_FIELD)
        return self.env.get_template(name).render(**context)

    async def call(self, query: str, **params: Any) -> Any:
        return await run_in_threadpool(self.storage.call, query, params)

    # Reads ------------------------------------------------------------------------------

    def filters(self, request: Request) -> dict[str, str | None]:
        q = request.query_params
        agent_orch = q.get("agent_orch", self.config.agent_orch or "")
        state = q.get("state") or None
        return {"agent_orch": agent_orch or None, "tenant": q.get("tenant") or None,
                "state": state if state in STATES else None}

    async def todos(self, filters: Mapping[str, str | None]) -> dict[str, Any]:
        return dict(await self.call("console_todos", p_agent_orch=filters["agent_orch"],
                                    p_tenant_id=filters["tenant"], p_state=filters["state"],
                                    p_limit=LIST_LIMIT))

    async def todo(self, todo_id: str, since: str | None = None,
                   after_id: str | None = None) -> dict[str, Any] | None:
        detail = await self.call("console_todo", p_todo_id=todo_id, p_since=since,
                                 p_after_id=after_id, p_limit=EVENT_PAGE)
        return None if detail is None else dict(detail)

    # Pages ------------------------------------------------------------------------------

    async def list_page(self, request: Request) -> Response:
        filters = self.filters(request)
        data = await self.todos(filters)
        name = "_rows.html" if _fragment_wanted(request) else "todos.html"
        return self.render(request, name, filters=filters, **data,
                           stream_query=_query(filters))

    async def list_stream(self, request: Request) -> Response:
        filters = self.filters(request)

        async def read() -> Mapping[str, Any]:
            return await self.todos(filters)

        def render(data: Mapping[str, Any]) -> str:
            return self.fragment(request, "_rows.html", filters=filters, **data)

        return event_stream(self.feed, None, list_updates(read, render))

    async def todo_page(self, request: Request) -> Response:
        todo_id = _uuid(request.path_params["todo_id"])
        detail = None if todo_id is None else await self.todo(todo_id)
        if detail is None:
            return self.render(request, "error.html", 404, message="no such todo")
        last = detail["events"][-1] if detail["events"] else {}
        # the stream goes on from the page's last event; after a full page (only the newest
        # shown) it sends none before it, which would land below the newest
        position = {"since": last.get("timestamp") or ""}
        if len(detail["events"]) >= EVENT_PAGE:
            position["after"] = last["id"]
        shown = {part: digest(self.fragment(request, template, **detail))
                 for part, template in PANELS}
        return self.render(request, "todo.html", **detail,
                           stream_query=urlencode({**position, **shown}))

    async def todo_stream(self, request: Request) -> Response:
        todo_id = _uuid(request.path_params["todo_id"])
        if todo_id is None:
            return Response("no such todo", status_code=404)
        query = request.query_params
        since = cursor(query.get("since"))
        floor = floor_of(query.get("since"), query.get("after"))
        read = functools.partial(self.todo, todo_id)
        render = functools.partial(self.fragment, request)
        shown = {part: query.get(part, "") for part, _ in PANELS}
        return event_stream(self.feed, todo_id,
                            todo_updates(read, render, since, shown, floor))

    async def questions_page(self, request: Request) -> Response:
        agent_orch = request.query_params.get("agent_orch") or self.config.agent_orch
        questions = await self.call("open_questions", p_agent_orch=agent_orch)
        return self.render(request, "questions.html", questions=questions or [],
                           agent_orch=agent_orch or "")

    async def servers_page(self, request: Request) -> Response:
        panel = await self.servers_panel_data()
        name = "_servers.html" if _fragment_wanted(request) else "servers.html"
        return self.render(request, name, **panel, interval=PANEL_INTERVAL)

    async def servers_panel_data(self) -> dict[str, Any]:
        servers: list[Mapping[str, Any]] | None
        try:
            servers = list(await self.call("servers", p_agent_orch=None, p_consumer=None) or [])
        except (KeyError, SchemaMissing):
            servers = None  # a database without the server registry
        activity = await self.call("console_activity", p_agent_orch=None,
                                   p_minutes=CHART_MINUTES, p_bucket_seconds=CHART_BUCKET)
        now = parse_time(activity["now"])
        if servers:
            self._sample(now, servers)
        return {"servers": servers, "throughput": throughput_chart(activity),
                "pickup": pickup_chart(list(self.samples), now),
                "turnaround": turnaround_chart(activity)}

    def _sample(self, now: datetime, servers: list[Mapping[str, Any]]) -> None:
        live = [s for s in servers if s.get("alive")]
        p50s = [float(v) for s in live
                if (v := (s.get("stats") or {}).get("pickup_seconds_p50")) is not None]
        if self.samples and (now - self.samples[-1]["time"]).total_seconds() < PANEL_INTERVAL / 2:
            return
        self.samples.append({"time": now, "pickup_p50": max(p50s) if p50s else None})

    # Actions ----------------------------------------------------------------------------

    async def enqueue(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        agent_orch, text = form.get("agent_orch", "").strip(), form.get("input", "").strip()
        mode = form.get("mode", "COMPLETE").upper()
        if not agent_orch or not text or mode not in ("COMPLETE", "DRAFT"):
            return self.render(request, "error.html", 400, message="enqueue needs an agent_orch,"
                               " an input and a mode of COMPLETE or DRAFT")
        todo_id = await run_in_threadpool(
            lambda: self.storage.enqueue(agent_orch, text, agent_mode=mode,
                                         tenant_id=form.get("tenant", "").strip() or None,
                                         user_id=self.config.user_id))
        return _done(request, f"/todos/{todo_id}")

    async def cancel(self, request: Request) -> Response:
        return await self._todo_action(request, "cancel")

    async def revision(self, request: Request) -> Response:
        return await self._todo_action(request, "request_revision")

    async def _todo_action(self, request: Request, query: str) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        todo_id = _uuid(request.path_params["todo_id"])
        if todo_id is None:
            return self.render(request, "error.html", 404, message="no such todo")
        params: dict[str, Any] = {"p_todo_id": todo_id}
        if query == "request_revision":
            params.update(p_feedback=form.get("feedback", ""), p_user_id=self.config.user_id)
        outcome = await run_in_threadpool(self.storage.call, query, params)
        if not outcome.get("applied"):
            message = {"not_found": "no such todo",
                       "finished": f"the todo is already {outcome.get('state')}",
                       "not_finished": "a revision can be asked only of a COMPLETED or FAILED "
                                       f"todo (it is {outcome.get('state')})",
                       "empty_feedback": "say what to revise: the feedback is empty",
                       "process_moved_on": "its process took the result and moved on (status "
                                           "DONE): a revision would rewrite history",
                       "process_taking": "its process is taking the submitted result (held "
                                         f"by {outcome.get('consumer')}): a revision would "
                                         "race it",
                       "not_agent_work": "only an agent's work in progress can be cancelled "
                                         f"here (this todo is {outcome.get('state')})",
                       }.get(str(outcome.get("reason")), str(outcome.get("reason")))
            return self.render(request, "error.html", 409, message=message)
        return _done(request, f"/todos/{todo_id}")

    async def answer(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        # in the query: a job id is any text, "/" and ".." included, which no path keeps
        job_id = request.query_params.get("job") or request.path_params.get("job_id", "")
        todo = request.query_params.get("todo")  # job ids may repeat across todos
        questions = await self.call("open_questions", p_agent_orch=None)
        matching = [q for q in questions or [] if q["job_id"] == job_id
                    and (todo is None or q["todo_id"] == todo)]
        if not matching:
            return self.render(request, "error.html", 409,
                               message="this question is no longer open")
        if len(matching) > 1:  # a form without the todo (an older page, a script)
            return self.render(request, "error.html", 409, message=(
                f"question {job_id} is open in {len(matching)} todos: answer it from its "
                "todo's page"))
        question = matching[0]
        value, problem = answer_from_form(question["question"], form)
        if problem:
            return self.render(request, "error.html", 400, message=problem)
        todo_id = await run_in_threadpool(
            lambda: self.storage.respond(job_id, value, user_id=self.config.user_id,
                                         todo_id=question["todo_id"]))
        return _done(request, f"/todos/{todo_id}" if todo_id else "/questions")

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The posted form, after the read-only and CSRF checks."""
        if self.config.read_only:
            return self.render(request, "error.html", 403,
                               message="this console is read-only")
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        supplied = fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not csrf_ok(request.scope, supplied):
            return self.render(request, "error.html", 403, message="CSRF check failed: reload "
                               "the page and try again")
        return fields


def select_options(data: Mapping[str, Any]) -> list[Any]:
    """A select question's options; none when another writer gave them in another shape (the
    question is then answered as text)."""
    options = data.get("options")
    return list(options) if isinstance(options, list) else []


def answer_from_form(question: Any, form: Mapping[str, str]) -> tuple[Any, str | None]:
    """The answer value for a question's kind: the chosen option itself (select), a boolean
    (confirm) or the text; or a message saying what is wrong."""
    data = question if isinstance(question, Mapping) else {"question": question}
    kind = data.get("type") or data.get("kind") or "text"
    options = select_options(data)
    if kind == "select" and options:
        raw = form.get("choice", "")
        if not (raw.isascii() and raw.isdigit()) or int(raw) >= len(options):
            return None, "choose one of the options"
        return options[int(raw)], None
    if kind == "confirm":
        raw = form.get("answer", "").lower()
        if raw not in ("yes", "no"):
            return None, "answer yes or no"
        return raw == "yes", None
    text = form.get("answer", "")
    if not text.strip():
        return None, "the answer is empty"
    return text, None


def _fragment_wanted(request: Request) -> bool:
    """htmx asks for the part it swaps; but restoring a page from history wants all of it."""
    headers = request.headers
    return bool(headers.get("hx-request")) and not headers.get("hx-history-restore-request")


def _done(request: Request, url: str) -> Response:
    """After an action: htmx follows HX-Redirect; a plain form gets 303 See Other."""
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"hx-redirect": url})
    return RedirectResponse(url, status_code=303)


def _query(filters: Mapping[str, str | None]) -> str:
    return urlencode({k: v for k, v in filters.items() if v})


def _uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def create_app(storage: Storage, config: ConsoleConfig | None = None) -> Starlette:
    """The console as an ASGI app on ``storage`` (which the caller closes)."""
    config = config or ConsoleConfig()
    console = Console(storage, config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        console.feed.start()
        try:
            yield
        finally:
            await run_in_threadpool(console.feed.close)

    routes = [
        Route("/", lambda request: RedirectResponse("/todos", 303)),
        Route("/todos", console.list_page),
        Route("/todos", console.enqueue, methods=["POST"]),
        Route("/todos/stream", console.list_stream),
        Route("/todos/{todo_id}", console.todo_page),
        Route("/todos/{todo_id}/stream", console.todo_stream),
        Route("/todos/{todo_id}/cancel", console.cancel, methods=["POST"]),
        Route("/todos/{todo_id}/revision", console.revision, methods=["POST"]),
        Route("/questions", console.questions_page),
        Route("/questions/answer", console.answer, methods=["POST"]),
        Route("/questions/{job_id}/answer", console.answer, methods=["POST"]),  # the first form
        Route("/servers", console.servers_page),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    async def database_error(request: Request, exc: Exception) -> Response:
        """A database error under a page or an action: said on a page with the right status,
        never a bare 500 (an outage is 503, try again; a refusal 409, with the reason)."""
        if isinstance(exc, StorageUnavailable) and not isinstance(exc, AccessDenied):
            logger.warning("console: %s %s: %s", request.method, request.url.path, exc,
                           extra={"action": "console"})
            return console.render(request, "error.html", 503, message="the database did not "
                                  f"answer; try again in a moment ({exc})")
        logger.warning("console: %s %s refused: %s", request.method, request.url.path, exc,
                       extra={"action": "console"})
        return console.render(request, "error.html", 409, message=str(exc))

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={StorageError: database_error})
    app.state.console = console
    app.add_middleware(Guard, token=config.token)
    return app
