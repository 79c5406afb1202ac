"""The argument parser and ``main``: global options, one subcommand per ``cmd_*`` function, and
errors turned into one line on stderr with an exit code (2 for a usage or configuration error,
1 when ``serve`` failed, 130 on Ctrl+C).

Owns the command line's shape (every option and its help text, which the docs' reference page
is generated from). Must not do a command's work: each subcommand calls its ``cmd_*`` function.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any, NoReturn

from dotenv import load_dotenv

from .. import __version__
from ..errors import ProcessGPTSyncError, ServerFailed
from .backend import backend_urls
from .health import cmd_health
from .logs import configure_logging, log_level
from .schema import cmd_init_db
from .serving import cmd_console, cmd_demo, cmd_serve
from .status import cmd_status
from .todos import cmd_asked, cmd_enqueue, cmd_respond, cmd_retry, cmd_show

DESCRIPTION = """\
Serve ProcessGPT todos (the todolist rows of an agent_orch) with ordinary Python code, and
manage them: install the schema, enqueue, watch, inspect, retry, answer questions.

Global options (--log-level, --log-format, --env-file) go before or after the command.
Database: --database-url, else $DATABASE_URL, else Supabase ($SUPABASE_URL and the key in
$SUPABASE_KEY, $SUPABASE_SERVICE_ROLE_KEY or $SERVICE_ROLE_KEY), else the embedded PostgreSQL
(data in $PROCESSGPT_EMBEDDED_DIR or the user data folder). The demo uses the embedded
database unless given --database-url."""

EPILOG = """\
examples:
  processgpt-sync demo
  processgpt-sync serve mymodule:handle --agent-orch my-agent --workers 8
  processgpt-sync serve ./agents.py:handle --agent-orch my-agent --log-format json
  processgpt-sync enqueue --agent-orch my-agent --input "hello"
  processgpt-sync status
  processgpt-sync show 3f2a9c1e

errors: one line on stderr. exit codes: 0 success; 1 serve failed or a second signal ended it
(demo: not every todo completed); 2 usage, configuration, database or schema error (serve
--processes: a server process failed on its configuration); 3-6 health (see health --help);
130 interrupted."""


def positive_int(value: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return number


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `processgpt-sync: error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(2)


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after its name. Only the top level sets
    defaults, so a value given before the command is not reset by the subcommand."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--log-level", type=log_level, default=default(None), metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: $PROCESSGPT_LOG_LEVEL, "
                        "else INFO for serve and WARNING for the other commands)")
    parser.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                        help="text, or one JSON object per line (default: text)")
    parser.add_argument("--env-file", default=default(None), metavar="PATH",
                        help="load environment variables from this .env file first (default: "
                        "none; nothing is read from .env unless asked)")


def _version() -> str:
    try:
        return version("processgpt-sync")
    except PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="processgpt-sync", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str,
                database_help: str = "PostgreSQL URL (default: $DATABASE_URL, else Supabase "
                "from $SUPABASE_URL and its key, else the embedded database)",
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, defaults=False)
        sub.add_argument("--database-url", metavar="URL", help=database_help)
        return sub

    init_db = command("init-db", "install or upgrade the schema and functions (idempotent; adds "
                      "only what is missing to an existing ProcessGPT database and prints it; "
                      "with the platform's trash, also cancels the todos left under process "
                      "instances deleted for good)")
    init_db.add_argument("--dry-run", action="store_true",
                         help="print the SQL and what it would add, change nothing")
    init_db.set_defaults(func=cmd_init_db)

    enqueue = command("enqueue", "insert a claimable todo (status IN_PROGRESS, draft_status "
                      "empty) and print its id")
    enqueue.add_argument("--agent-orch", required=True, help="the todolist.agent_orch to serve it")
    enqueue.add_argument("--input", required=True, help="the todo's query (and description)")
    enqueue.add_argument("--mode", choices=("COMPLETE", "DRAFT"), default="COMPLETE",
                         help="agent_mode: COMPLETE writes output, DRAFT writes draft "
                         "(default: COMPLETE)")
    enqueue.add_argument("--tenant", metavar="TENANT_ID", help="tenant_id (default: none)")
    enqueue.add_argument("--count", type=positive_int, default=1, help="how many (default: 1)")
    enqueue.set_defaults(func=cmd_enqueue)

    status = command("status", "todo counts by agent_orch and draft_status")
    status.add_argument("--agent-orch", help="only this agent_orch (default: all)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    status.add_argument("--interval", type=positive_float, default=2.0,
                        help="seconds between refreshes (default: 2)")
    status.add_argument("--json", action="store_true",
                        help="print JSON (with --watch: one JSON document per line)")
    status.set_defaults(func=cmd_status)

    show = command("show", "one todo: input, state, lease, output or draft, log and events")
    show.add_argument("todo_id", help="the todo's id, or a unique prefix of at least 4 characters")
    show.add_argument("--json", action="store_true", help="print it as one JSON document")
    show.set_defaults(func=cmd_show)

    retry = command("retry", "make a FAILED or CANCELLED todo claimable again (running and "
                    "completed todos are refused)")
    retry.add_argument("todo_id", help="the todo's id, or a unique prefix of at least 4 characters")
    retry.set_defaults(func=cmd_retry)

    health = command("health", "check the database, the schema and LISTEN, or running servers; "
                     "exit 0 when healthy, 3 unreachable, 4 schema missing, 5 LISTEN not "
                     "working, 6 server not registered or stale")
    health.add_argument("--json", action="store_true", help="print the checks as JSON")
    health.add_argument("--consumer", help="check this running server (its registry heartbeat) "
                        "instead of LISTEN")
    health.add_argument("--agent-orch", help="check every server of this agent_orch instead of "
                        "LISTEN")
    health.set_defaults(func=cmd_health)

    serve = command("serve", "serve an executor until SIGINT/SIGTERM (a second signal exits "
                    "at once)")
    serve.add_argument("executor", help="module:attribute or path/to/file.py:attribute of a "
                       "function fn(todo), an object with execute(todo, events), or a class "
                       "(instantiated without arguments)")
    serve.add_argument("--agent-orch", help="the todolist.agent_orch to serve "
                       "(default: $PROCESSGPT_AGENT_ORCH; required)")
    serve.add_argument("--workers", type=int, help="worker threads (default: "
                       "$PROCESSGPT_WORKERS, else 4)")
    serve.add_argument("--supabase-url", metavar="URL",
                       help="Supabase URL (default: $SUPABASE_URL; the key comes from "
                       "$SUPABASE_KEY, $SUPABASE_SERVICE_ROLE_KEY or $SERVICE_ROLE_KEY, the "
                       "first one set)")
    serve.add_argument("--lease-seconds", type=int, help="claim lease (default: "
                       "$PROCESSGPT_LEASE_SECONDS, else 60)")
    serve.add_argument("--max-claims", type=int, help="claims before a todo becomes FAILED "
                       "(default: $PROCESSGPT_MAX_CLAIMS, else 3)")
    serve.add_argument("--grace-seconds", type=float, help="time running todos get on stop "
                       "(default: $PROCESSGPT_GRACE_SECONDS, else 30)")
    serve.add_argument("--timeout", type=float, help="per-todo time limit in seconds "
                       "(default: $PROCESSGPT_TIMEOUT, else none)")
    serve.add_argument("--tenant", help="serve only this tenant's todos (default: "
                       "$PROCESSGPT_TENANT_ID, else all)")
    serve.add_argument("--loop", choices=("thread", "shared"),
                       help="where async executors run: thread, an event loop per worker "
                       "thread (a blocking executor stalls only its todo), or shared, one loop "
                       "for all (async clients kept across todos work) (default: "
                       "$PROCESSGPT_LOOP, else thread)")
    serve.add_argument("--metrics-port", type=port, metavar="PORT",
                       help="serve Prometheus metrics on this port (default: none)")
    serve.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                       help="address the metrics port binds (default: 0.0.0.0, every "
                       "interface; 127.0.0.1 for this host only)")
    serve.add_argument("--processes", type=int, default=1,
                       help="server processes under one supervisor, for executors that are "
                       "not thread-safe: --processes 8 --workers 1 (default: 1)")
    serve.set_defaults(func=cmd_serve)

    asked = command("asked", "questions to people that wait for an answer")
    asked.add_argument("--agent-orch", help="only this agent_orch (default: all)")
    asked.add_argument("--json", action="store_true", help="print the questions as JSON")
    asked.set_defaults(func=cmd_asked)

    respond = command("respond", "answer a question as the ProcessGPT UI does (once)")
    respond.add_argument("job_id", help="the question's job_id, from `processgpt-sync asked`")
    respond.add_argument("answer", help="the answer (JSON if it parses as JSON, else text)")
    respond.add_argument("--user-id", help="who answered (default: none)")
    respond.add_argument("--todo", help="the todo whose question it is, when the job_id is "
                         "open in several (executors may reuse job ids)")
    respond.set_defaults(func=cmd_respond)

    demo = command("demo", "enqueue and serve a few todos on the embedded database, or on "
                   "--database-url when given",
                   database_help="PostgreSQL URL to run the demo on (default: the embedded "
                   "database)")
    demo.add_argument("--todos", type=positive_int, default=8, help="how many todos (default: 8)")
    demo.add_argument("--workers", type=positive_int, default=4,
                      help="worker threads (default: 4)")
    demo.add_argument("--console", action="store_true", help="serve the console meanwhile")
    demo.add_argument("--console-port", type=port, default=8710,
                      help="the console's port (default: 8710)")
    demo.set_defaults(func=cmd_demo)

    console = command("console", "watch, answer, cancel and enqueue todos in a browser "
                      "(needs the [console] extra)")
    console.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default: 127.0.0.1); one that is not a "
                              "loopback address needs --token")
    console.add_argument("--port", type=port, default=8710, help="port (default: 8710)")
    console.add_argument("--token", help="access token every request must carry "
                         "(default: $PROCESSGPT_CONSOLE_TOKEN)")
    console.add_argument("--read-only", action="store_true", help="hide and refuse every action")
    console.add_argument("--agent-orch", help="the agent_orch the todo list opens on")
    console.add_argument("--supabase-url", metavar="URL",
                         help="Supabase URL (default: $SUPABASE_URL; the key comes from "
                         "$SUPABASE_KEY, $SUPABASE_SERVICE_ROLE_KEY or $SERVICE_ROLE_KEY, the "
                         "first one set)")
    console.add_argument("--user-id", help="user id written with answers and feedback")
    console.set_defaults(func=cmd_console)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def port(value: str) -> int:
    """An argparse type: a TCP port number, 0 (any free one) to 65535."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range (0-65535)")
    return number


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or SIGHUP outside ``serve``'s own handling: exit through the interpreter's
    exit hooks (which stop the embedded PostgreSQL this process started), not at once."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, _exit_on_signal)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.env_file:
        if not os.path.isfile(args.env_file):
            parser.error(f"--env-file {args.env_file!r}: no such file")
        try:
            load_dotenv(args.env_file)
        except UnicodeDecodeError as exc:
            parser.error(f"--env-file {args.env_file!r} is not UTF-8 text: {exc}")
    level = args.log_level
    if level is None and os.environ.get("PROCESSGPT_LOG_LEVEL"):
        try:
            level = log_level(os.environ["PROCESSGPT_LOG_LEVEL"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"PROCESSGPT_LOG_LEVEL: {exc}")
    if level is None:
        level = "INFO" if args.command == "serve" else "WARNING"
    configure_logging(level, args.log_format)
    try:
        backend_urls(args)  # a half-configured backend fails every command, before any work
        return int(args.func(args))
    except ServerFailed as exc:
        print(f"processgpt-sync: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ProcessGPTSyncError as exc:
        print(f"processgpt-sync: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except UnicodeError as exc:  # an argument or variable that is not UTF-8 text
        print(f"processgpt-sync: error: not UTF-8 text: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... --json | head`: the reader left, as every CLI treats it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130
