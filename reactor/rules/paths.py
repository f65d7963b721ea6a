"""JSONPath, compiled once: a direct fast path for plain paths, jsonpath-ng for the rest.

``$.data.node-name`` or ``$['data']['id']`` walk dicts by key, which gives the
same answer as jsonpath-ng (a missing key or a non-dict selects nothing) at a
fraction of the cost; anything else (wildcards, slices, filters) is parsed by
``jsonpath_ng.ext`` once per distinct text and cached for the process.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from jsonpath_ng.ext.parser import parse as _jsonpath_parse

from reactor.model import CompiledPath

_STEP = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_-]*)|\[(?:'([^'\\]*)'|"([^"\\]*)")\]""")
_MISSING = object()


class PathSyntaxError(ValueError):
    """A JSONPath that does not parse; the message says what is wrong."""


def plain_steps(text: str) -> tuple[str, ...] | None:
    """The keys of a plain ``$.a.b`` / ``$['a']`` path, or None if it is not plain."""
    if not text.startswith("$"):
        return None
    steps: list[str] = []
    pos = 1
    while pos < len(text):
        m = _STEP.match(text, pos)
        if m is None:
            return None
        steps.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return tuple(steps)


def _walker(steps: tuple[str, ...]) -> Callable[[Any], list[Any]]:
    if len(steps) == 1:
        (a,) = steps

        def find1(doc: Any) -> list[Any]:
            v = doc.get(a, _MISSING) if type(doc) is dict else _MISSING
            return [] if v is _MISSING else [v]

        return find1
    if len(steps) == 2:
        a, b = steps

        def find2(doc: Any) -> list[Any]:
            v = doc.get(a, _MISSING) if type(doc) is dict else _MISSING
            v = v.get(b, _MISSING) if type(v) is dict else _MISSING
            return [] if v is _MISSING else [v]

        return find2

    def find_n(doc: Any) -> list[Any]:
        for step in steps:
            if type(doc) is not dict:
                return []
            doc = doc.get(step, _MISSING)
            if doc is _MISSING:
                return []
        return [doc]

    return find_n


def _general(text: str) -> Callable[[Any], list[Any]]:
    try:
        expr = _jsonpath_parse(text)
    except Exception as err:  # jsonpath-ng raises JSONPathError and, from its lexer, plain errors
        raise PathSyntaxError(f"invalid JSONPath {text!r}: {err}") from err

    def find(doc: Any) -> list[Any]:
        # Whatever the document's shape (it comes from a guest or a peer), a path that does
        # not fit it selects nothing: jsonpath-ng raises, e.g. KeyError for ``[0]`` on an object.
        try:
            return [m.value for m in expr.find(doc)]
        except Exception:
            return []

    return find


@lru_cache(maxsize=4096)
def compile_path(text: str) -> CompiledPath:
    """Compile a JSONPath into the envelope; raises PathSyntaxError when it is invalid."""
    if not isinstance(text, str) or not text.startswith("$"):
        raise PathSyntaxError(f"a JSONPath starts with '$' (e.g. $.data.id), not {text!r}")
    steps = plain_steps(text)
    if steps is not None:
        return CompiledPath(text, _walker(steps) if steps else (lambda doc: [doc]))
    return CompiledPath(text, _general(text))


def data_field(text: str) -> str | None:
    """For a path that starts ``$.data.FIELD``, that FIELD; else None."""
    steps = plain_steps(text)
    if steps and len(steps) >= 2 and steps[0] == "data":
        return steps[1]
    m = re.match(r"^\$\.data\.([A-Za-z_][A-Za-z0-9_-]*)", text)
    return m.group(1) if m else None
