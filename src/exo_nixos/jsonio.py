"""JSON documents read from files a person wrote: every way they can be wrong is a ValueError
with one line, never a traceback (a repeated key, nesting deeper than a document needs, an
integer longer than Python converts, invalid JSON)."""

from __future__ import annotations

import json
from typing import Any

# Far deeper than any document this tool reads (a config is 4 levels deep), far below the
# depth at which the json module or pydantic's error formatting would overflow the stack.
MAX_DEPTH = 64


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object (the second would win)")
        seen[key] = value
    return seen


def depth(document: Any) -> int:
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return deepest


def loads(text: str) -> Any:
    """Decode ``text``; ValueError (one line, with the position where JSON says) otherwise."""
    try:
        document = json.loads(text, object_pairs_hook=_unique)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # a repeated key, or an integer past sys.get_int_max_str_digits()
        message = str(exc)
        if "int" in message and "digits" in message:
            message = "an integer has more digits than any value here can have"
        raise ValueError(message) from None
    if depth(document) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return document
