"""Turn executor output into values PostgreSQL's jsonb accepts, or say precisely why not."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import PayloadError
from .infra import inner_errors, is_group

MAX_ERROR_CHARS = 8000


def check_json(value: Any, *, what: str) -> Any:
    """Return ``value`` as jsonb can store it; raise PayloadError naming the problem.

    Read-only mappings (``todo.row``, ``todo.extras`` are ``MappingProxyType``) become plain
    dicts, so an executor may return or emit them; anything else comes back unchanged.
    """
    text, converted = _dump(value, what=what)
    stored = _load(text, what=what)
    return stored if converted else value


def snapshot_json(value: Any, *, what: str) -> Any:
    """A copy of ``value`` as jsonb will store it, taken now: later changes to ``value`` (a dict
    the executor keeps filling) do not reach what is written, and a value jsonb cannot hold is
    refused here, at the caller, with PayloadError. Read-only mappings become plain dicts."""
    text, _ = _dump(value, what=what)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return _load(text, what=what)


def _load(text: str, *, what: str) -> Any:
    """Read back the JSON text of a value; keys that became the same text (``1`` and
    ``"1"``, ``True`` and ``"true"``) are refused: jsonb would keep one and drop the other."""
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping = dict(pairs)
        if len(mapping) != len(pairs):
            keys = [key for key, _ in pairs]
            twice = next(key for index, key in enumerate(keys) if key in keys[:index])
            raise PayloadError(
                f"{what} has two keys that both become {twice!r} in JSON (such as 1 and "
                "'1'): only one would be stored; give them different names")
        return mapping

    return json.loads(text, object_pairs_hook=unique)


def _first_unstorable(value: Any, path: str, on_path: tuple[int, ...] = (),
                      seen: set[int] | None = None) -> str | None:
    """Where in ``value`` the first item JSON cannot hold is (``['messages'][3]``), or the
    first that refers to a container it is inside of, so a refused result names it; only
    walked once a value was refused. Each container is looked into once (a value full of
    back-references has exponentially many paths), at most 100 deep."""
    seen = set() if seen is None else seen
    if len(on_path) > 100:
        return None
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in on_path:
            return path  # it refers to itself here
        if id(value) in seen:
            return None  # looked into already, by another path
        seen.add(id(value))
        on_path = (*on_path, id(value))
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"{path}[{key!r}]"
            found = _first_unstorable(item, f"{path}[{key!r}]", on_path, seen)
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_unstorable(item, f"{path}[{index}]", on_path, seen)
            if found is not None:
                return found
        return None
    if value is None or isinstance(value, (str, int, bool)):
        return None
    if isinstance(value, float):
        return None if value == value and value not in (float("inf"), float("-inf")) else path
    return path


def _dump(value: Any, *, what: str) -> tuple[str, bool]:
    """The JSON text of ``value``, and whether a read-only mapping was turned into a dict."""
    converted = False

    def plain(item: Any) -> Any:
        nonlocal converted
        if isinstance(item, Mapping):
            converted = True
            return dict(item)
        raise TypeError(f"Object of type {type(item).__name__} is not JSON serializable")

    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=plain)
    except (TypeError, ValueError) as exc:
        where = _first_unstorable(value, "")
        at = f" (at {what}{where})" if where else ""
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}{at}") from exc
    except RecursionError as exc:
        raise PayloadError(f"{what} is nested too deeply (or refers to itself)") from exc
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError(f"{what} contains text that is not valid UTF-8: {exc}") from exc
    if "\\u0000" in text and _NUL.search(text):  # not a text's own backslash before u0000
        raise PayloadError(f"{what} contains a NUL character (\\u0000), which jsonb cannot store")
    return text, converted


# The escape of a NUL in JSON text: "\u0000" after an even number of backslashes (a text that
# holds a backslash and then "u0000" is written "\\u0000", which jsonb stores)
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def unwrap_text(text: str) -> Any:
    """Return the JSON value a text holds when it is a JSON object or array, else the text.

    Executors send ``json.dumps(payload)`` as message text; ProcessGPT stores the payload itself.
    Python's own extensions (NaN, Infinity, 1e999) are not JSON a database column can hold:
    such a text stays text, as any other that does not parse.
    """
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return strict_json(stripped)
        except (ValueError, RecursionError):  # nested deeper than Python reads: text it stays
            return text
    return text


def strict_json(text: str) -> Any:
    """``json.loads`` without Python's extensions (NaN, Infinity, 1e999): ValueError for
    them, as for any text that is not JSON a database column can hold."""
    return json.loads(text, parse_constant=_not_json, parse_float=_finite)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"{number} does not fit a JSON number")
    return value


def error_text(exc: BaseException) -> str:
    """A one-line, bounded description of an exception for ``todolist.log`` and error events;
    an exception group's names the exceptions it holds (its own message only counts them).
    An exception whose ``__str__`` raises (a client error reading a body it did not get) is
    still described: the todo's failure must be recorded whatever its message does."""
    try:
        message = str(exc) or exc.__class__.__doc__ or ""
    except Exception as broken:
        message = f"(its message could not be read: {type(broken).__name__})"
    text = f"{type(exc).__name__}: {message.strip()}"
    if is_group(exc):
        text += ": " + "; ".join(error_text(inner) for inner in inner_errors(exc))
    return safe_text(text)[:MAX_ERROR_CHARS]


def safe_text(text: str) -> str:
    """Replace what PostgreSQL text cannot hold (NUL, lone surrogates) instead of failing."""
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
