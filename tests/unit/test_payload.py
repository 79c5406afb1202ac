from __future__ import annotations

import datetime
import math

import pytest

from processgpt_sync import PayloadError
from processgpt_sync.events import make_event
from processgpt_sync.payload import check_json, error_text, snapshot_json, unwrap_text


def test_json_values_pass_unchanged():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": "한글"}}
    assert check_json(value, what="result") is value


@pytest.mark.parametrize(("value", "message"), [
    ({"when": datetime.date(2024, 1, 1)}, "result is not JSON-serialisable: Object of type date"),
    (object(), "not JSON-serialisable: Object of type object"),
    ({"x": math.nan}, "not JSON-serialisable"),
    ("bad \udcff surrogate", "not valid UTF-8"),
    ("nul \x00 char", "NUL character"),
])
def test_values_jsonb_cannot_store_are_refused_with_the_reason(value, message):
    with pytest.raises(PayloadError, match=message):
        check_json(value, what="result")


def test_a_refused_value_names_where_in_it_the_unstorable_item_is():
    """A LangGraph state holding message objects deep inside: the error says which."""
    class Message:
        pass

    state = {"summary": "ok", "messages": [{"role": "user"}, Message()], "n": 1}
    with pytest.raises(PayloadError) as refused:
        check_json(state, what="result")
    assert str(refused.value).endswith("(at result['messages'][1])")
    with pytest.raises(PayloadError, match=r"\(at result\['scores'\]\[0\]\)$"):
        check_json({"scores": [math.inf]}, what="result")


def test_unwrap_text_parses_json_objects_and_arrays_only():
    assert unwrap_text('{"a": 1}') == {"a": 1}
    assert unwrap_text(" [1, 2] ") == [1, 2]
    assert unwrap_text("plain text") == "plain text"
    assert unwrap_text("{not json") == "{not json"
    assert unwrap_text("42") == "42"


@pytest.mark.parametrize("text", ['{"score": NaN}', '[Infinity]', '{"x": -Infinity}',
                                  '{"big": 1e999}'])
def test_text_that_only_python_reads_as_json_stays_text(text):
    assert unwrap_text(text) == text  # NaN and infinities have no JSON form to store


def test_make_event_rejects_unknown_types_at_the_call_site():
    with pytest.raises(ValueError, match="unknown event_type 'notice'"):
        make_event("t", "k", "notice", "hi")
    with pytest.raises(ValueError, match="unknown event status"):
        make_event("t", "k", "human_asked", "hi", status="MAYBE")


def test_error_text_is_bounded_and_storable():
    text = error_text(RuntimeError("x" * 20000 + "\x00"))
    assert text.startswith("RuntimeError: x") and len(text) <= 8000 and "\x00" not in text


def test_an_exception_whose_message_raises_is_still_described():
    class ClientError(Exception):
        def __str__(self) -> str:
            raise KeyError("error")

    assert error_text(ClientError()) == (
        "ClientError: (its message could not be read: KeyError)")


@pytest.mark.parametrize("value", [{1: "a", "1": "b"}, {"outer": [{True: 1, "true": 2}]}])
def test_keys_that_become_the_same_json_text_are_refused_not_one_dropped(value):
    with pytest.raises(PayloadError, match=r"result has two keys that both become '(1|true)'"):
        snapshot_json(value, what="result")
    with pytest.raises(PayloadError, match="two keys"):
        check_json(value, what="question")


def test_a_value_that_refers_to_itself_is_refused_at_once_naming_where():
    """A tree whose children point back at their parent: refused, naming the first
    back-reference, at once. Before, naming where walked every path through the cycles, a
    number that grows exponentially with the depth: a worker thread spun for hours and the
    todo was never recorded."""
    root: dict = {"children": []}
    for _ in range(3):
        root["children"].append({"parent": root, "siblings": root["children"]})
    with pytest.raises(PayloadError, match=r"Circular reference detected \(at "
                                           r"result\['children'\]\[0\]\['parent'\]\)"):
        snapshot_json(root, what="result")


def test_a_text_holding_a_backslash_then_u0000_is_stored_a_nul_is_refused():
    """Code an agent writes (``'\\u0000'`` in C) is text like any other: stored. Only a NUL
    character itself, which jsonb cannot hold, is refused."""
    code = {"code": "char c = '\\u0000';", "escaped": "\\\\u0000"}
    assert snapshot_json(code, what="result") == code
    for nul in ("a\x00b", "\\\x00", "\\\\\x00"):
        with pytest.raises(PayloadError, match="NUL character"):
            snapshot_json({"text": nul}, what="result")


def test_a_json_text_nested_deeper_than_python_reads_stays_text():
    deep = "[" * 100_000 + "]" * 100_000
    assert unwrap_text(deep) == deep
