"""The garbage collector's first threshold: raised only from 16 workers or when asked, never
lowered, restored when the last server holding it stops, unless changed by someone else."""

from __future__ import annotations

import gc
import logging

import pytest

from processgpt_sync import gc_tuning
from processgpt_sync.errors import ConfigurationError
from processgpt_sync.gc_tuning import GcThreshold
from processgpt_sync.settings import Settings

LOG = logging.getLogger("test.gc")


@pytest.fixture(autouse=True)
def interpreter_threshold():
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    yield
    gc.set_threshold(*before)


def test_automatic_only_from_16_workers_and_0_leaves_it():
    assert gc_tuning.wanted(15, None) is None
    assert gc_tuning.wanted(16, None) == gc_tuning.AUTO_THRESHOLD == 10_000
    assert gc_tuning.wanted(1024, None) == 10_000
    assert gc_tuning.wanted(1024, 0) is None
    assert gc_tuning.wanted(4, 20_000) == 20_000


def test_raised_while_held_then_restored_with_the_older_generations_untouched(caplog):
    older = gc.get_threshold()[1:]
    hold = GcThreshold(50_000)
    with caplog.at_level(logging.INFO, logger="test.gc"):
        hold.hold(LOG, {})
    assert gc.get_threshold() == (50_000, *older)
    assert "from 700 to 50000" in caplog.text
    hold.release()
    assert gc.get_threshold() == (700, *older)


def test_never_lowered():
    gc.set_threshold(100_000)
    hold = GcThreshold(50_000)
    hold.hold(LOG, {})
    assert gc.get_threshold()[0] == 100_000
    hold.release()
    assert gc.get_threshold()[0] == 100_000


def test_the_last_of_two_servers_restores_it():
    first, second = GcThreshold(50_000), GcThreshold(50_000)
    first.hold(LOG, {})
    second.hold(LOG, {})
    first.release()
    assert gc.get_threshold()[0] == 50_000, "the second server still runs"
    second.release()
    assert gc.get_threshold()[0] == 700


def test_a_threshold_changed_meanwhile_by_the_application_is_left_alone():
    hold = GcThreshold(50_000)
    hold.hold(LOG, {})
    gc.set_threshold(9_000)
    hold.release()
    assert gc.get_threshold()[0] == 9_000


def test_a_negative_setting_is_refused_with_the_meaning_of_0():
    with pytest.raises(ConfigurationError,
                       match=r"gc_threshold must be a whole number >= 0 \(0 keeps"):
        Settings(agent_orch="a", gc_threshold=-1)
    assert Settings.from_env({"PROCESSGPT_AGENT_ORCH": "a",
                              "PROCESSGPT_GC_THRESHOLD": "0"}).gc_threshold == 0


def test_a_value_the_application_set_between_two_servers_is_the_one_restored():
    first, second = GcThreshold(50_000), GcThreshold(100_000)
    first.hold(LOG, {})
    gc.set_threshold(60_000)
    second.hold(LOG, {})
    first.release()
    second.release()
    assert gc.get_threshold()[0] == 60_000
