"""The Django app: it only provides the `processgpt_worker` management command."""

from __future__ import annotations

from django.apps import AppConfig


class ProcessGPTSyncConfig(AppConfig):  # type: ignore[misc]
    name = "processgpt_sync.contrib.django"
    label = "processgpt_sync"
    verbose_name = "processgpt-sync"
