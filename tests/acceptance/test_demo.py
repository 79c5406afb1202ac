"""What `processgpt-sync demo` prints adds up and reads as a user expects."""

from __future__ import annotations

import io
import re

from processgpt_sync import demo


def test_demo_output_counts_match_the_table_and_results_print_as_json(database_url):
    out = io.StringIO()
    assert demo.run(database_url=database_url, todos=4, workers=2, out=out) == 0
    text = out.getvalue()
    progress = [line for line in text.splitlines() if "events stored" in line]
    last_count = int(re.search(r"(\d+) events stored", progress[-1]).group(1))
    rows = [line.split() for line in text.splitlines()
            if re.match(r"\s+[0-9a-f]{8}\s+(COMPLETE|DRAFT)\s", line)]
    assert len(rows) == 4
    assert last_count == sum(int(row[4]) for row in rows), text
    assert all(row[5].startswith('{"words":') for row in rows), "results print as JSON"
    assert "DRAFT todos keep status IN_PROGRESS" in text
    assert any(row[1] == "DRAFT" and row[2] == "IN_PROGRESS" for row in rows)
    assert f"processgpt-sync show {rows[0][0]}" in text
