"""Integrations with frameworks (each imported only when used)."""
