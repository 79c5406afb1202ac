"""The compatibility suite: agent code written with CrewAI, LangChain, LangGraph and a2a-sdk the
way ProcessGPT's services and their users write it, served end to end. Each module skips when
its library is not installed; .ci/run installs them in a virtualenv of their own."""

from __future__ import annotations

import os

import pytest

# CrewAI: no telemetry, no trace upload prompt (both would try the network).
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/compat/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.compat)
            # The agent libraries warn about their own deprecations; not ours to fail on.
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"))
