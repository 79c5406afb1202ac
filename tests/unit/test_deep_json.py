"""The JSON reader for what the database holds: json.loads' answers, at any depth."""

from __future__ import annotations

import json

import pytest

from processgpt_sync.deep_json import (
    TOO_DEEP_TO_SHOW,
    NestedDeeply,
    _read_without_recursion,
    read_json,
    shown_json,
    too_deep,
    with_deep_values_noted,
)
from tests.conftest import deeper_than_python_reads

SAMPLES = [
    '{"a": [1, -2.5e3, "x\\u00e9\\n\\"", true, false, null, {}, []], "b": {"c": {"d": [[]]}}}',
    ' [ 1 , { "k" : "v" , "n" : 12345678901234567890 } , [ ] ] ',
    '"just text"', "42", "null", "[]", "{}", '{"dup": 1, "dup": 2}',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_the_reader_without_recursion_gives_json_loads_answer(text):
    assert _read_without_recursion(text) == json.loads(text)


@pytest.mark.parametrize("text", ["[1,]", '{"a" 1}', "[1 2]", "{1: 2}", "[1]x", "", "[", '{"a":'])
def test_what_json_loads_refuses_the_reader_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        _read_without_recursion(text)


def test_a_value_deeper_than_json_loads_reads_is_read_whole_and_said_to_be_deep():
    depth = len(deeper_than_python_reads(20_000, 200_000)) // 2
    text = '[{"row": {"id": 1, "output": ' + "[" * depth + '"end"' + "]" * depth + "}}, 7]"
    with pytest.raises(RecursionError):
        json.loads(text)
    value = read_json(text.encode())
    assert isinstance(value, NestedDeeply) and value[1] == 7
    inner = value[0]["row"]["output"]
    for _ in range(depth):
        inner = inner[0]
    assert inner == "end"
    assert too_deep(value[0]) == ("row", "output")
    assert too_deep({"row": {"id": 1, "output": [[1]]}, "extras": {"resume": {}}}) is None
    assert read_json(memoryview(b'{"a": [1]}')) == {"a": [1]}


def test_bytes_are_decoded_as_json_loads_decodes_them_at_any_depth():
    deep = deeper_than_python_reads(20_000, 200_000)
    for encoding in ("utf-8-sig", "utf-16", "utf-32"):
        assert read_json(('{"k": "é"}').encode(encoding)) == {"k": "é"}
        assert isinstance(read_json(deep.encode(encoding)), NestedDeeply)


def test_what_people_read_shows_a_deep_value_as_one_and_keeps_the_rest():
    deep = read_json(deeper_than_python_reads(20_000, 200_000))
    assert shown_json({"a": 1}) == '{"a": 1}' and shown_json(deep) == TOO_DEEP_TO_SHOW
    shown = with_deep_values_noted({"row": {"id": 7, "output": deep}, "events": [{"data": deep},
                                                                                 {"data": 1}],
                                    "question": {"text": {"text": deep}}})
    assert shown == {"row": {"id": 7, "output": TOO_DEEP_TO_SHOW},
                     "events": [{"data": TOO_DEEP_TO_SHOW}, {"data": 1}],
                     "question": {"text": {"text": TOO_DEEP_TO_SHOW}}}
    plain = {"row": {"id": 7}}
    assert with_deep_values_noted(plain) is plain
