"""`python manage.py processgpt_worker`: serve ProcessGPT todos from a Django project."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from processgpt_sync.cli import load_executor
from processgpt_sync.contrib.django import django_connections
from processgpt_sync.errors import ProcessGPTSyncError
from processgpt_sync.server import Server
from processgpt_sync.settings import Settings


class Command(BaseCommand):  # type: ignore[misc]
    help = "Serve ProcessGPT todos with an executor from this project until SIGINT/SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--agent-orch", help="todolist.agent_orch to serve "
                            "(default: settings.PROCESSGPT_AGENT_ORCH)")
        parser.add_argument("--workers", type=int)
        parser.add_argument("--executor", help="module:attribute or dotted.path of the executor "
                            "(default: settings.PROCESSGPT_EXECUTOR)")
        parser.add_argument("--database-url", help="default: settings.PROCESSGPT_DATABASE_URL, "
                            "then $DATABASE_URL, then the embedded database")
        parser.add_argument("--lease-seconds", type=int)
        parser.add_argument("--grace-seconds", type=float)
        parser.add_argument("--timeout", type=float)

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
                grace_seconds=options["grace_seconds"],
                timeout=options["timeout"],
            )
            Server(executor, server_settings, around_todo=django_connections).run_forever()
        except ProcessGPTSyncError as exc:
            raise CommandError(str(exc)) from exc
