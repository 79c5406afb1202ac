"""README.md as a new user follows it: every Python snippet runs, against the embedded database,
and the install instructions work without a package index entry."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

# Snippets not run, by heading, each with its reason.
EXCLUDED: dict[str, str] = {}

A2A_EXECUTOR = """
from a2a.server.agent_execution import AgentExecutor
from tests.a2a_events import artifact

class MyExecutor(AgentExecutor):
    async def execute(self, context, event_queue):
        row = context.get_context_data()["row"]
        await event_queue.enqueue_event(
            artifact({"echo": context.get_user_input()}, row["id"], row["id"]))

    async def cancel(self, context, event_queue):
        pass
"""


def snippets() -> list[tuple[str, str]]:
    """(heading, code) of every ```python block, under its nearest heading."""
    found, heading, code = [], "", None
    for line in README.splitlines(keepends=True):
        if code is not None:
            if line.startswith("```"):
                found.append((heading, "".join(code)))
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            code = []
        elif re.match(r"#{2,3} ", line):
            heading = line.lstrip("#").strip()
    return found


def serve_until_done(code, database_url, tmp_path, agent_orch, extra_files=None):
    """Run a snippet that serves forever: enqueue a todo, wait for its result, then SIGTERM."""
    (tmp_path / "snippet.py").write_text(code)
    for name, text in (extra_files or {}).items():
        (tmp_path / name).write_text(text)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT processgpt_sync_enqueue_v1(%s, 'hello')", (agent_orch,))
        proc = subprocess.Popen([sys.executable, "snippet.py"], cwd=tmp_path,
                                env={**os.environ, "DATABASE_URL": database_url,
                                     "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: proc.poll() is not None or conn.execute(
                "SELECT draft_status IS NOT NULL AND draft_status::text <> 'STARTED' "
                "FROM todolist").fetchone()[0], timeout=60)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, stderr
        return conn.execute("SELECT draft_status::text, output FROM todolist").fetchone()


def run_quickstart(code, database_url, tmp_path, monkeypatch):
    state, output = serve_until_done(code, database_url, tmp_path, "my-agent")
    assert (state, output) == ("COMPLETED", {"answer": "HELLO"})


def run_a2a(code, database_url, tmp_path, monkeypatch):
    pytest.importorskip("a2a")
    state, output = serve_until_done(code, database_url, tmp_path, "my-agent",
                                     {"my_executor.py": A2A_EXECUTOR})
    assert (state, output) == ("COMPLETED", {"echo": "hello"})


def run_jupyter(code, database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database_url)
    namespace: dict = {}
    exec(compile(code, "README Jupyter", "exec"), namespace)
    server = namespace["server"]
    assert server.join(0), "the snippet stopped its server"
    assert server.settings.database_url == database_url


def run_django_settings(code, database_url, tmp_path, monkeypatch):
    namespace: dict = {}
    exec(compile(code, "README Django", "exec"), namespace)
    assert "processgpt_sync.contrib.django" in namespace["INSTALLED_APPS"]
    assert namespace["DATABASES"]["default"]["CONN_HEALTH_CHECKS"] is True
    assert "CONN_HEALTH_CHECKS" not in namespace, "a per-database setting, not a top-level one"


def run_hitl(code, database_url, tmp_path, monkeypatch):
    """Answer every question as the UI does; the suspended todo resumes and finishes."""
    import processgpt_sync as ps
    from processgpt_sync.storage.postgres import PostgresStorage

    namespace: dict = {}
    exec(compile(code, "README Human in the loop", "exec"), namespace)
    answers = {"How should I process this?": "careful", "Budget approved?": False,
               "Approve anyway?": True}
    store = PostgresStorage(database_url)
    try:
        todo_id = store.enqueue("readme-hitl", "order laptops")
        with ps.start(namespace["handle"], agent_orch="readme-hitl", storage=store) as server:
            def answer_open_questions():
                for question in store.open_questions("readme-hitl"):
                    store.respond(question["job_id"], answers[question["question"]["question"]])
                return server.stats()["completed"] == 1

            wait_for(answer_open_questions, timeout=30)
    finally:
        store.close()
    with psycopg.connect(database_url) as conn:
        output, asked = conn.execute(
            "SELECT output, (SELECT count(*) FROM events WHERE todo_id = %s AND event_type = "
            "'human_asked') FROM todolist", (todo_id,)).fetchone()
    assert output == {"style": "careful", "approved": True}
    assert asked == 3, "every question asked once, none again on the resumed run"


HARNESSES = {
    "Human in the loop": run_hitl,
    "Fair claims across tenants, and fleet-wide limits": run_quickstart,
    "Quickstart": run_quickstart,
    "A2A `AgentExecutor`": run_a2a,
    "Jupyter": run_jupyter,
    "Django": run_django_settings,
}


def test_every_python_snippet_has_a_harness_or_a_named_exclusion():
    headings = [heading for heading, _ in snippets()]
    assert len(headings) >= 4
    unknown = [h for h in headings if h not in HARNESSES and h not in EXCLUDED]
    assert not unknown, f"README snippets nobody runs: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("heading, code",
                         [pytest.param(h, c, id=h) for h, c in snippets() if h in HARNESSES])
def test_readme_python_snippet_runs(heading, code, database_url, tmp_path, monkeypatch):
    HARNESSES[heading](code, database_url, tmp_path, monkeypatch)


def test_install_instructions_need_no_package_index_entry():
    """processgpt-sync is not on PyPI: README installs from a checkout or a built wheel."""
    from_index = re.findall(r"pip install [\"']?processgpt-sync\b", README)
    assert not from_index, from_index
    assert "python -m build --wheel" in README


def test_missing_prometheus_client_error_says_how_to_install_it():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from processgpt_sync import ConfigurationError\n"
            "from processgpt_sync.metrics import serve_metrics\n"
            "try:\n    serve_metrics(None, 0)\n"
            "except ConfigurationError as exc:\n    print(exc)\n")
    message = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert "pip install prometheus-client" in message and "'.[prometheus]'" in message
    assert "processgpt-sync[prometheus]" not in message
