"""Read the JSON the database holds, however deeply it is nested.

jsonb keeps values thousands of levels deep; ``json.loads`` gives up at about a thousand
(Python's recursion limit). One such value in a claimed row must not stop the server or hold
up the todos claimed with it: the claim's answer is read here without recursion, and the todo
whose row Python cannot handle is failed with a message naming the column (``too_deep``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from json.decoder import scanstring  # type: ignore[attr-defined]  # public, untyped
from typing import Any

TOO_DEEP_TO_SHOW = "(a value nested too deeply to show here; the database holds it unchanged)"
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class NestedDeeply(list[Any]):
    """A JSON array read by ``read_json``'s fallback: some value in it is nested deeper than
    ``json.loads`` reads, so its items are worth checking with ``too_deep``."""


class NestedDeeplyObject(dict[str, Any]):
    """A JSON object read by ``read_json``'s fallback, as ``NestedDeeply`` is an array."""


def read_json(data: bytes | bytearray | memoryview | str) -> Any:
    """``json.loads``, and for a value nested too deeply for it, the same value read without
    recursion (an array comes back as ``NestedDeeply``, an object as ``NestedDeeplyObject``)."""
    if isinstance(data, memoryview):
        data = bytes(data)
    try:
        return json.loads(data)
    except RecursionError:
        if isinstance(data, str):
            text = data
        else:  # as json.loads decodes bytes: UTF-8, -16 or -32, a byte-order mark allowed
            text = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
        value = _read_without_recursion(text)
        if isinstance(value, list):
            return NestedDeeply(value)
        return NestedDeeplyObject(value) if isinstance(value, dict) else value


def shown_json(value: Any, **options: Any) -> str:
    """``json.dumps(value, **options)``, or ``TOO_DEEP_TO_SHOW`` for a value nested too deeply
    to write out: what people read shows such a value as one, rather than failing."""
    try:
        return json.dumps(value, **options)
    except RecursionError:
        return TOO_DEEP_TO_SHOW


def with_deep_values_noted(value: Any, levels: int = 4, **options: Any) -> Any:
    """``value`` with each part nested too deeply to write out (by ``json.dumps(part,
    **options)``: an indented dump has its own limit) replaced by ``TOO_DEEP_TO_SHOW``: a
    document for scripts keeps its shape and its other values. Objects, and arrays of objects
    (records), are looked into, at most ``levels`` deep."""
    try:
        json.dumps(value, **options)
        return value
    except RecursionError:
        if levels > 0 and isinstance(value, Mapping):
            return {key: with_deep_values_noted(item, levels - 1, **options)
                    for key, item in value.items()}
        if levels > 0 and isinstance(value, list) and all(isinstance(item, Mapping)
                                                          for item in value):
            return [with_deep_values_noted(item, levels - 1, **options) for item in value]
        return TOO_DEEP_TO_SHOW


def too_deep(item: Mapping[str, Any]) -> tuple[str, str] | None:
    """Which of a claim's values Python cannot serialise for nesting, as (``"row"``,
    ``"output"``), or None: the values the fallback read that no executor could use."""
    for part in ("row", "extras"):
        values = item.get(part)
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            try:
                json.dumps(value)
            except RecursionError:
                return part, str(key)
    return None


def _read_without_recursion(text: str) -> Any:
    """The JSON value of ``text``; containers are kept on a list rather than the call stack.
    Scalars (strings, numbers, literals) are read by ``json``'s own decoder."""
    open_containers: list[list[Any] | dict[str, Any]] = []
    keys: list[str] = []
    pos = _skip(text, 0)
    while True:
        char = text[pos:pos + 1]
        if char in ("[", "{"):
            pos = _skip(text, pos + 1)
            if text[pos:pos + 1] == ("]" if char == "[" else "}"):
                value: Any = [] if char == "[" else {}
                pos += 1
            else:
                open_containers.append([] if char == "[" else {})
                if char == "{":
                    pos = _key(text, pos, keys)
                continue
        else:
            value, pos = _DECODER.raw_decode(text, pos)
        while True:  # a value is complete: add it to its container, closing those that end
            pos = _skip(text, pos)
            if not open_containers:
                if pos != len(text):
                    raise json.JSONDecodeError("Extra data", text, pos)
                return value
            parent = open_containers[-1]
            if isinstance(parent, list):
                parent.append(value)
            else:
                parent[keys.pop()] = value
            char = text[pos:pos + 1]
            if char == ",":
                pos = _skip(text, pos + 1)
                if isinstance(parent, dict):
                    pos = _key(text, pos, keys)
                break
            if char != ("]" if isinstance(parent, list) else "}"):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            value = open_containers.pop()
            pos += 1


def _key(text: str, pos: int, keys: list[str]) -> int:
    """Read an object's key and its colon; the position of the value after them."""
    if text[pos:pos + 1] != '"':
        raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                   text, pos)
    key, pos = scanstring(text, pos + 1)
    pos = _skip(text, pos)
    if text[pos:pos + 1] != ":":
        raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
    keys.append(key)
    return _skip(text, pos + 1)


def _skip(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()
