"""The ``processgpt-sync`` command: init-db, enqueue, status, show, retry, health, serve, asked,
respond, demo, console.

The only part of the package that configures logging or prints. Its modules:

- :mod:`.parser`: the argument parser and ``main``, which turns errors into exit codes;
- :mod:`.logs`: log levels and the text or JSON log format;
- :mod:`.backend`: which database a command uses, opened and checked;
- :mod:`.schema`: ``init-db``;
- :mod:`.todos`: ``enqueue``, ``show``, ``retry``, ``asked``, ``respond`` (one todo or question);
- :mod:`.status`: ``status``, the counts, tenants and server registry;
- :mod:`.health`: ``health``, the container probe and its exit codes;
- :mod:`.serving`: ``serve``, ``demo`` and ``console``, the commands that run until stopped.

The library never imports this package: dependencies point from here into it.
"""

from __future__ import annotations

from .health import HEALTH_LISTEN, HEALTH_SCHEMA, HEALTH_SERVER, HEALTH_UNREACHABLE
from .parser import build_parser, main

__all__ = [
    "HEALTH_LISTEN",
    "HEALTH_SCHEMA",
    "HEALTH_SERVER",
    "HEALTH_UNREACHABLE",
    "build_parser",
    "main",
]
