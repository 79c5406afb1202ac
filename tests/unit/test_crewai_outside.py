"""The CrewAI bridge says when it cannot find a todo for a crew's events, instead of dropping
them without a word: once for events outside any todo, and at install for CrewAI releases
that do not carry the crew's context to event listeners. Needs no CrewAI: the bridge reads
events by their class names."""

from __future__ import annotations

import logging

import pytest

from processgpt_sync.contrib import crewai as bridge


class TaskStartedEvent:  # a CrewAI event by its class name, as the bridge reads them
    task_id = "t-1"


@pytest.fixture(autouse=True)
def fresh_bridge(monkeypatch):
    monkeypatch.setattr(bridge, "_said_outside", False)


def test_an_event_outside_any_todo_is_said_once(caplog):
    with caplog.at_level(logging.WARNING, logger="processgpt_sync"):
        bridge.record(TaskStartedEvent(), "action")
        bridge.record(TaskStartedEvent(), "action")
    said = [r.getMessage() for r in caplog.records if "outside any todo" in r.getMessage()]
    assert len(said) == 1 and "TaskStartedEvent" in said[0]


@pytest.mark.parametrize(("installed", "warned"), [("1.4.1", True), ("1.5.0", False),
                                                     ("1.15.30", False), ("2.0", False)])
def test_install_warns_about_crewai_releases_that_lose_the_context(monkeypatch, caplog,
                                                                    installed, warned):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    with caplog.at_level(logging.WARNING, logger="processgpt_sync"):
        bridge._warn_if_context_is_lost()
    assert ("upgrade to crewai>=1.5" in caplog.text) is warned
