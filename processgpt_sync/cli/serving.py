"""The commands that run until stopped: ``serve`` (one server, or ``--processes N`` under a
supervisor), ``demo`` and ``console``.

Owns turning options into Settings and the process's exit: ``serve`` leaves with ``os._exit``
when executors that ignore ``todo.cancelled`` still hold threads. Must not run todos itself:
the server, the supervisor and the console do.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal

from .. import demo, embedded
from ..errors import ConfigurationError
from ..executor import check_thread_safety
from ..executor_import import import_target, load_executor
from ..metrics import serve_metrics
from ..server import Server
from ..settings import Settings
from ..storage import open_storage
from ..supervisor import ChildSpec, Supervisor
from .backend import backend_urls
from .logs import configure_logging

logger = logging.getLogger("processgpt_sync.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    executor = load_executor(args.executor) if args.processes == 1 else None
    settings = Settings.from_env(
        agent_orch=args.agent_orch,
        workers=args.workers,
        database_url=args.database_url,
        supabase_url=args.supabase_url,
        lease_seconds=args.lease_seconds,
        max_claims=args.max_claims,
        grace_seconds=args.grace_seconds,
        timeout=args.timeout,
        tenant_id=args.tenant,
        loop=args.loop,
    )
    if args.processes != 1:
        return _serve_processes(args, settings)
    server = Server(executor, settings)
    if args.metrics_port is not None:
        serve_metrics(server, args.metrics_port, args.metrics_host)
    server.run_forever()
    lingering = server.stats()["executor_threads"]
    if lingering:
        # Every write is done; only executors that ignore todo.cancelled still run, and their
        # todos were given back. Do not let them hold the process.
        logger.warning("exiting with %d executor threads still running", lingering)
        embedded.release()  # os._exit skips the exit hook that stops the embedded server
        logging.shutdown()
        os._exit(0)
    return 0


def _serve_processes(args: argparse.Namespace, settings: Settings) -> int:
    """``serve --processes N``: each child imports the executor itself."""
    check_thread_safety(import_target(args.executor), settings.workers)
    if args.metrics_port and args.metrics_port + args.processes - 1 > 65535:
        raise ConfigurationError(
            f"--metrics-port {args.metrics_port} with --processes {args.processes}: child i "
            f"serves on port {args.metrics_port} + i, past 65535; choose a lower port")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # as main() chose
    setup = functools.partial(configure_logging, level, args.log_format)
    spec = ChildSpec(executor=args.executor, settings=settings, setup=setup,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    return Supervisor(spec, args.processes).run()


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo runs on the embedded database unless given --database-url: a DATABASE_URL
    exported for real work is never filled with demo todos."""
    backend_urls(args)  # a half-made Supabase configuration is still an error here
    ignored = [] if args.database_url else [
        name for name in ("DATABASE_URL", "SUPABASE_URL") if os.environ.get(name)]
    return demo.run(database_url=args.database_url, todos=args.todos, workers=args.workers,
                    ignored=ignored, console_port=args.console_port if args.console else None)


def cmd_console(args: argparse.Namespace) -> int:
    # The console's extra (Starlette, uvicorn, Jinja2) is optional: imported only here, where
    # its absence is a one-line ConfigurationError.
    from ..console import ConsoleConfig, ConsoleServer

    agent_orch = args.agent_orch or os.environ.get("PROCESSGPT_AGENT_ORCH")
    database_url, supabase_url, _ = backend_urls(args)
    # The same settings and backend as `serve`; the console serves no agent_orch of its own
    # (the one given only preselects the list's filter).
    settings = Settings.from_env(agent_orch=agent_orch or "processgpt-sync-console",
                                 database_url=database_url, supabase_url=supabase_url)
    config = ConsoleConfig(host=args.host, port=args.port, read_only=args.read_only,
                           token=args.token or os.environ.get("PROCESSGPT_CONSOLE_TOKEN") or None,
                           agent_orch=agent_orch, user_id=args.user_id)
    storage = open_storage(settings, max_connections=6)
    try:
        storage.check_schema()
        server = ConsoleServer(storage, config)
        # a token typed on the command line is shown back; one from the environment is not
        # printed into the service's logs
        url = server.url if args.token else server.url.split("?token=", 1)[0]
        print(f"processgpt-sync console ({storage.backend}{', read-only' if args.read_only else ''}"
              f"): {url}", flush=True)
        # uvicorn stops on SIGTERM, then raises it again to the handler found before it: make
        # that one a no-op, so a stop on SIGTERM exits 0 as `serve` does.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        server.run()
    finally:
        storage.close()
    return 0
