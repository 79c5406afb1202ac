"""`python manage.py processgpt_worker`: serve ProcessGPT todos from a Django project."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from processgpt_sync.contrib.django import django_connections
from processgpt_sync.errors import ProcessGPTSyncError
from processgpt_sync.executor_import import load_executor
from processgpt_sync.metrics import serve_metrics
from processgpt_sync.server import Server
from processgpt_sync.settings import Settings


class Command(BaseCommand):  # type: ignore[misc]
    help = "Serve ProcessGPT todos with an executor from this project until SIGINT/SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--agent-orch", help="todolist.agent_orch to serve "
                            "(default: settings.PROCESSGPT_AGENT_ORCH)")
        parser.add_argument("--workers", type=int, help="worker threads (default: 4)")
        parser.add_argument("--executor", help="module:attribute or dotted.path of the executor "
                            "(default: settings.PROCESSGPT_EXECUTOR)")
        parser.add_argument("--database-url", help="default: settings.PROCESSGPT_DATABASE_URL, "
                            "then $DATABASE_URL, then the embedded database")
        parser.add_argument("--lease-seconds", type=int, help="claim lease (default: 60)")
        parser.add_argument("--max-claims", type=int,
                            help="claims before a todo becomes FAILED (default: 3)")
        parser.add_argument("--grace-seconds", type=float,
                            help="time running todos get on stop (default: 30)")
        parser.add_argument("--timeout", type=float, help="per-todo time limit in seconds")
        parser.add_argument("--tenant", help="serve only this tenant's todos (default: all)")
        parser.add_argument("--metrics-port", type=int,
                            help="serve Prometheus metrics on this port (default: none)")
        parser.add_argument("--metrics-host", default="0.0.0.0",
                            help="address the metrics port binds (default: 0.0.0.0)")

    def handle(self, *args: Any, **options: Any) -> None:
        target = options["executor"] or getattr(settings, "PROCESSGPT_EXECUTOR", None)
        if not target:
            raise CommandError("no executor: pass --executor or set PROCESSGPT_EXECUTOR")
        if ":" not in target:
            module, _, attribute = target.rpartition(".")
            target = f"{module}:{attribute}"
        try:
            executor = load_executor(target)
            server_settings = Settings.from_env(
                agent_orch=options["agent_orch"] or getattr(settings, "PROCESSGPT_AGENT_ORCH",
                                                            None),
                workers=options["workers"],
                database_url=options["database_url"]
                or getattr(settings, "PROCESSGPT_DATABASE_URL", None),
                lease_seconds=options["lease_seconds"],
                max_claims=options["max_claims"],
                grace_seconds=options["grace_seconds"],
                timeout=options["timeout"],
                tenant_id=options["tenant"],
            )
            server = Server(executor, server_settings, around_todo=django_connections)
            if options["metrics_port"] is not None:
                httpd = serve_metrics(server, options["metrics_port"], options["metrics_host"])
                self.stdout.write(f"metrics on http://{options['metrics_host']}:"
                                  f"{httpd.server_address[1]}/metrics")
            tenant = f", tenant {server_settings.tenant_id}" if server_settings.tenant_id else ""
            self.stdout.write(
                f"serving agent_orch={server_settings.agent_orch} with "
                f"{server_settings.workers} workers ({target}, {server_settings.backend} "
                f"database{tenant}); Ctrl+C to stop"
            )
            self.stdout.flush()
            server.run_forever()
        except ProcessGPTSyncError as exc:
            raise CommandError(str(exc)) from exc
        stats = server.stats()
        self.stdout.write(f"stopped: {stats['completed']} completed, {stats['failed']} failed, "
                          f"{stats['asked']} waiting for a person, {stats['released']} given "
                          "back")
