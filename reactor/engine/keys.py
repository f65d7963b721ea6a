"""Window keys: what a rule's key paths select in an envelope, as one dict key.

A throttle, a threshold or a correlation keeps one state per key. ``keyfunc`` is
the reference: for each path its selected values, ``freeze``-d. ``compiled_keyfunc``
is the same function generated for plain paths (``$.vm``, ``$.data.node-name``),
the common case on the hot path: each key read once, no list built, and a value
that is a hashable atom used as it is (``tests/test_fast_paths.py`` holds both equal).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from reactor.model import CompiledPath, Envelope
from reactor.rules.conditions import generated_code
from reactor.rules.paths import plain_steps

KeyFunc = Callable[[Envelope], Hashable]

_ATOMS = frozenset({str, int, float, bool, type(None)})
"""Types whose values, alone in a tuple, always hash."""
_MISSING = object()


def freeze(values: list[Any]) -> Hashable:
    """The values a key path found, as a dict key; unhashable values by canonical JSON."""
    key = tuple(values)
    try:
        hash(key)
    except TypeError:
        return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return key


def keyfunc(paths: Sequence[CompiledPath]) -> KeyFunc:
    """The reference: one path's key is ``freeze(values)``, several paths' a tuple of those."""
    if not paths:
        return lambda env: ()
    if len(paths) == 1:
        find = paths[0].find
        return lambda env: freeze(find(env))
    finds = tuple(p.find for p in paths)
    return lambda env: tuple([freeze(f(env)) for f in finds])


def compiled_keyfunc(paths: Sequence[CompiledPath]) -> KeyFunc:
    """``keyfunc(paths)`` as one generated function when every path is plain."""
    steps = [plain_steps(p.text) for p in paths]
    if not paths or not all(steps):
        return keyfunc(paths)
    ns: dict[str, Any] = {"MISSING": _MISSING, "ATOMS": _ATOMS, "FREEZE": freeze}
    reads: dict[tuple[str, ...], str] = {}
    lines = ["def key(env):"]

    def read(path: tuple[str, ...]) -> str:
        """The variable holding ``path``'s value (or MISSING), read once, parents first."""
        if path not in reads:
            doc = "env" if len(path) == 1 else read(path[:-1])
            v = reads[path] = f"v{len(reads)}"
            ns[f"K{v}"] = path[-1]
            lines.append(f"    {v} = {doc}.get(K{v}, MISSING) if type({doc}) is dict else MISSING")
        return reads[path]

    parts = []
    for path in steps:
        assert path is not None
        v = read(path)
        parts.append(f"(() if {v} is MISSING else ({v},) if type({v}) in ATOMS else FREEZE([{v}]))")
    key = parts[0] if len(parts) == 1 else f"({', '.join(parts)},)"
    lines.append(f"    return {key}")
    exec(generated_code("\n".join(lines) + "\n", "<keys>"), ns)  # our own generated source only
    fn: KeyFunc = ns["key"]
    return fn
