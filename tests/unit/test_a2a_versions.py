"""Which a2a-sdk lines the bridge runs AgentExecutors on: 0.3 and 1.x, nothing else."""

from __future__ import annotations

import pytest

from processgpt_sync import ConfigurationError
from processgpt_sync.executor import check_a2a_version


@pytest.mark.parametrize("version", ["0.3.0", "0.3.26", "1.0.3", "1.3.0", "1.10.0rc1"])
def test_supported_lines_are_accepted(version):
    check_a2a_version(version)


@pytest.mark.parametrize("version", ["0.2.4", "0.2.16", "0.1.0", "2.0.0", "garbage"])
def test_other_lines_are_refused_in_one_line_naming_the_range(version):
    with pytest.raises(ConfigurationError) as caught:
        check_a2a_version(version)
    message = str(caught.value)
    assert "\n" not in message and f"a2a-sdk {version} is installed" in message
    assert "a2a-sdk >=0.3,<2" in message


def test_the_installed_a2a_sdk_is_checked_when_an_executor_is_adapted():
    """Under a2a-sdk 0.2.x (CI runs this file there too) the executor is refused at start."""
    pytest.importorskip("a2a")
    from importlib.metadata import version

    from a2a.server.agent_execution import AgentExecutor

    from processgpt_sync.executor import adapt

    class Executor(AgentExecutor):
        async def execute(self, context, event_queue):
            pass

        async def cancel(self, context, event_queue):
            pass

    installed = version("a2a-sdk")
    if installed.startswith("0.2."):
        with pytest.raises(ConfigurationError, match=f"a2a-sdk {installed} is installed"):
            adapt(Executor())
    else:
        assert type(adapt(Executor())).__name__ == "A2AAdapter"
