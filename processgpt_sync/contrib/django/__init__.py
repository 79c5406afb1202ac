"""Django integration: add ``"processgpt_sync.contrib.django"`` to INSTALLED_APPS, then

    python manage.py migrate
    python manage.py processgpt_worker --agent-orch NAME --workers 8 --executor myapp.agents:handle

Every worker thread closes stale Django database connections before and after each todo, so ORM
code in executors neither leaks connections nor meets "connection already closed".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def django_connections() -> Iterator[None]:
    """Around one todo on a worker thread: drop connections that are stale or broken."""
    from django.db import close_old_connections

    close_old_connections()
    try:
        yield
    finally:
        close_old_connections()
