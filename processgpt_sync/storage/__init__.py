"""Storage backends behind one interface; ``open_storage`` picks one from the settings."""

from __future__ import annotations

from ..settings import DEFAULT_STATEMENT_TIMEOUT, DEFAULT_TCP_TIMEOUT, Settings, check_backend
from .base import LeaseReport, Listener, Storage, WriteOutcome

__all__ = ["LeaseReport", "Listener", "Storage", "WriteOutcome", "connect", "open_storage"]


def open_storage(settings: Settings, *, max_connections: int | None = None) -> Storage:
    """The backend the settings select, sized for their worker count."""
    return connect(
        database_url=settings.database_url,
        supabase_url=settings.supabase_url,
        supabase_key=settings.supabase_key,
        embedded_dir=settings.embedded_dir,
        max_connections=max_connections or settings.workers + 4,
        **settings.connection_options,
    )


def connect(
    *,
    database_url: str | None = None,
    supabase_url: str | None = None,
    supabase_key: str | None = None,
    embedded_dir: str | None = None,
    max_connections: int = 8,
    prepare: bool = True,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    tcp_timeout: float = DEFAULT_TCP_TIMEOUT,
) -> Storage:
    """Postgres when a database URL is given, else Supabase with URL and key, else embedded;
    a Supabase URL without a key (or a key without a URL) is a ConfigurationError."""
    check_backend(database_url, supabase_url, supabase_key)
    if not database_url and supabase_url and supabase_key:
        from .supabase import SupabaseStorage

        return SupabaseStorage(supabase_url, supabase_key, timeout=statement_timeout)

    from .postgres import PostgresStorage

    if database_url:
        return PostgresStorage(database_url, max_connections=max_connections, prepare=prepare,
                               statement_timeout=statement_timeout, tcp_timeout=tcp_timeout)
    from .. import embedded

    storage = PostgresStorage(embedded.start(embedded_dir), max_connections=max_connections,
                              statement_timeout=statement_timeout, tcp_timeout=tcp_timeout)
    storage.backend = "embedded"  # what health, the console and the start-up log name
    return storage
