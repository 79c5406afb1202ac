"""The console in a real browser: Debian's headless Chromium driven by Playwright.

Watches a running todo's events arrive live, answers its `select` question and sees it
complete, cancels another todo, checks an agent's `<script>` stays text, and measures how
long an event takes from the executor to the page and what an idle console costs the database.
Set CONSOLE_SCREENSHOT to a path to keep the screenshot (the README's picture).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import processgpt_sync as ps
from processgpt_sync.console import ConsoleConfig, ConsoleServer
from processgpt_sync.stats import percentile
from processgpt_sync.storage.postgres import PostgresStorage
from tests.conftest import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
XSS = "<script>alert(1)</script>"
TIMED_EVENTS = 20
IDLE_SECONDS = 16.0  # longer than the list stream's 15 s re-read
SETTLE_SECONDS = 11.0  # idle backends publish their transaction counts within 10 s

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: install Debian's "
                       "chromium package (apt-get install chromium) to run the browser test"),
]

class OneFailedRead(PostgresStorage):
    """The console's storage: its next read of a todo page fails once when asked (the
    database gone for a moment), so that page's stream ends and the browser reconnects."""

    fail_next_read = threading.Event()

    def call(self, query, params):
        if query == "console_todo" and self.fail_next_read.is_set():
            self.fail_next_read.clear()
            raise ps.StorageUnavailable("database unreachable (console_todo): for a moment")
        return super().call(query, params)


# Records when each event row appears in the page (the browser's wall clock, as time.time()).
OBSERVE = """() => {
    window.seenAt = {};
    const body = document.getElementById("event-rows");
    new MutationObserver((changes) => {
        const now = Date.now();
        for (const change of changes) {
            for (const node of change.addedNodes) {
                if (node.id && !(node.id in window.seenAt)) {
                    window.seenAt[node.id] = {ms: now, text: node.textContent};
                }
            }
        }
    }).observe(body, {childList: true});
}"""


def idle_transactions(pg_url: str, dbname: str, seconds: float) -> tuple[int, float]:
    """Transactions one database commits or rolls back over ``seconds``, read from another
    database every half second; returns (count, seconds measured)."""
    query = ("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        first = conn.execute(query, (dbname,)).fetchone()[0]
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            time.sleep(0.5)
            last = conn.execute(query, (dbname,)).fetchone()[0]
        return int(last - first), time.monotonic() - began


GO = threading.Event()


def test_console_in_a_browser(storage, db, database_url, pg_url, tmp_path, capsys):
    go = GO
    go.clear()

    def handle(todo):
        if todo.input == "slow":
            todo.events.progress("working until cancelled")
            while not todo.cancelled:
                time.sleep(0.02)
            return None
        go.wait(60)
        for seq in range(TIMED_EVENTS):
            todo.events.progress({"seq": seq, "emitted": time.time()})
            time.sleep(0.08)
        todo.events.progress(XSS)
        style = todo.ask_human("Which way?", options=["fast", "careful"], kind="select")
        todo.events.progress(f"going the {style} way")
        return {"style": style}

    server = ps.start(handle, agent_orch="browser", storage=storage, workers=2, grace_seconds=2)
    try:
        idle_rate, idle_count, latencies = drive(storage, db, database_url, pg_url, tmp_path,
                                                 server)
    finally:
        GO.set()
        server.stop()
    # A count, not a speed: a console that polled would write several per second, 16 and more
    # in the window. The open page's own are the list stream's re-read and its watch's renewal
    # (2 or 3); autovacuum's visits to the database, which pg_stat_database counts alike, add
    # up to 4 more after the test's writes.
    assert idle_count <= 8, f"{idle_count} transactions while idle"
    with capsys.disabled():
        sys.stdout.write(
            f"\nconsole: event emitted -> visible p50 {statistics.median(latencies):.0f} ms, "
            f"p95 {percentile(latencies, 0.95):.0f} ms ({len(latencies)} events); "
            f"idle database cost {idle_rate:.2f} transactions/s\n")


def drive(storage, db, database_url, pg_url, tmp_path, server):
    """The browser session; returns the idle figures and the event latencies (ms)."""
    from playwright.sync_api import expect, sync_playwright

    dialogs: list[str] = []
    console_storage = OneFailedRead(database_url)
    with ConsoleServer(console_storage, ConsoleConfig(port=0, agent_orch="browser")) as console, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.on("dialog", lambda d: (dialogs.append(f"{d.type}:{d.message}"), d.accept()))
        base = console.url.rstrip("/")

        # The list shows new todos live, filtered on the console's agent_orch.
        page.goto(f"{base}/todos")
        expect(page.locator("#rows")).to_contain_text("no todos")
        stream_id = storage.enqueue("browser", "stream", tenant_id="acme")
        slow_id = storage.enqueue("browser", "slow", tenant_id="acme")
        expect(page.locator(f"#todo-{stream_id}")).to_contain_text("STARTED")
        expect(page.locator(f"#todo-{slow_id}")).to_contain_text("STARTED")

        # The running todo's events appear as they are written.
        page.click(f"a[href='/todos/{stream_id}']")
        page.wait_for_selector("#event-rows", state="attached")
        page.evaluate(OBSERVE)
        GO.set()
        question = page.locator("select[name=choice]")
        expect(question).to_be_visible(timeout=20_000)
        seen = page.evaluate("window.seenAt")
        latencies = []
        for entry in seen.values():
            if '"emitted"' in entry["text"]:
                data = json.loads(entry["text"][entry["text"].index("{"):])
                latencies.append(entry["ms"] - 1000 * data["emitted"])
        assert len(latencies) == TIMED_EVENTS, "every event appeared live"
        seqs = [json.loads(r[r.index("{"):])["seq"] for r in
                page.locator("#event-rows tr").all_text_contents() if '"seq"' in r]
        assert seqs == list(range(TIMED_EVENTS)), "in order, each once"

        # The agent's <script> is shown as text and never runs.
        row = page.locator("#event-rows tr", has_text="alert(1)")
        expect(row).to_have_count(1)
        assert XSS in row.inner_text()
        assert page.locator("#event-rows script").count() == 0
        if path := os.environ.get("CONSOLE_SCREENSHOT"):
            page.screenshot(path=path, full_page=True)
        page.screenshot(path=str(tmp_path / "console.png"))

        # Answer the select question: the executor continues and the todo completes.
        question.select_option(label="careful")
        page.click("#questions button[type=submit]")
        expect(page.locator("#state .state")).to_have_text("COMPLETED", timeout=20_000)
        expect(page.locator("#event-rows")).to_contain_text("going the careful way")
        expect(page.locator("#state .result")).to_contain_text("careful")

        # Feedback being typed survives a live update of the panel it sits in; the update is
        # shown once the box is left empty.
        feedback = page.locator("#state textarea[name=feedback]")
        feedback.fill("shorter, please")
        with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
            conn.execute("UPDATE todolist SET log = 'noted while typing' WHERE id = %s",
                         (stream_id,))
            conn.execute("INSERT INTO events (job_id, todo_id, event_type, data) VALUES "
                         "('note', %s, 'task_working', '{\"note\": \"same update\"}')",
                         (stream_id,))
        expect(page.locator("#event-rows")).to_contain_text("same update")
        assert feedback.input_value() == "shorter, please"
        expect(page.locator("#state")).not_to_contain_text("noted while typing")
        feedback.fill("")
        feedback.blur()
        expect(page.locator("#state")).to_contain_text("noted while typing")

        # The page's stream ends on a database error and reconnects: it asks for both panels
        # afresh (not compared with the page's first render), and the status line clears.
        page.goto(f"{base}/todos/{slow_id}")
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/stream" in r.url else None)
        OneFailedRead.fail_next_read.set()
        db.execute("INSERT INTO events (job_id, todo_id, event_type, data) VALUES "
                   "('note', %s, 'task_working', '{\"note\": \"wakes the stream\"}')",
                   (slow_id,))
        expect(page.locator("#stream-status")).to_contain_text("live updates paused")
        expect(page.locator("#stream-status")).to_be_hidden(timeout=10_000)
        assert streams and "state=" not in streams[-1], streams  # the reconnect

        # An action the server refuses says why (here a forged CSRF token: 403).
        page.goto(f"{base}/todos/{slow_id}")
        page.evaluate("document.querySelector('#state input[name=csrf_token]').value = 'forged'")
        page.click("#state button.danger")
        expect(page.locator("#stream-status")).to_contain_text("CSRF check failed")

        # Cancel the other one (the button asks for confirmation first, then the page
        # follows the answer's HX-Redirect to itself).
        page.goto(f"{base}/todos/{slow_id}")
        with page.expect_navigation(url=f"{base}/todos/{slow_id}"):
            page.click("#state button.danger")
        expect(page.locator("#state .state")).to_have_text("CANCELLED", timeout=20_000)
        row = db.execute("SELECT status::text, draft_status::text FROM todolist WHERE id = %s",
                         (slow_id,)).fetchone()
        assert (row["status"], row["draft_status"]) == ("CANCELLED", "CANCELLED")
        assert dialogs == ["confirm:Cancel this todo?"] * 2, "no alert ever ran"

        # Idle: no server, the list page stays open, nothing happens.
        server.stop()
        page.goto(f"{base}/todos")
        expect(page.locator(f"#todo-{slow_id}")).to_contain_text("CANCELLED")
        dbname = conninfo_to_dict(database_url)["dbname"]
        wait_for(lambda: db.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE "
                                    "datname = current_database() AND state = 'active' AND "
                                    "query NOT LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
                                    ).fetchone()["n"] == 0)
        db.close()
        time.sleep(SETTLE_SECONDS)
        idle_count, idle_window = idle_transactions(pg_url, dbname, IDLE_SECONDS)

        # A todo deleted while its page is open (measured after the idle window: the delete's
        # dead rows bring autovacuum): the page says so and stops following it.
        page.goto(f"{base}/todos/{slow_id}")
        expect(page.locator("#state .state")).to_have_text("CANCELLED")
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/stream" in r.url else None)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM todolist WHERE id = %s", (slow_id,))
        expect(page.locator("#stream-status")).to_have_text("this todo no longer exists",
                                                            timeout=20_000)
        asked = len(streams)
        time.sleep(2.5)  # the browser would reconnect every second
        assert len(streams) == asked, streams
        browser.close()
    console_storage.close()
    return idle_count / idle_window, idle_count, latencies
