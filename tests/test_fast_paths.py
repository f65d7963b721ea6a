"""Fast paths and their slow twins: each generated or hand-inlined hot path equals its reference.

Hypothesis draws the inputs; every pair must agree exactly (values and types), so a
fast path may only be faster, never different.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reactor.engine.keys import compiled_keyfunc, keyfunc
from reactor.rules.paths import compile_path

ATOMS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
JSON = st.recursive(
    ATOMS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
FIELDS = st.sampled_from(["node-name", "device", "id", "a"])
ENVELOPES = st.fixed_dictionaries(
    {"event": st.text(max_size=4) | JSON, "vm": st.sampled_from(["vm1", "vm2"]) | JSON},
    optional={"data": st.dictionaries(FIELDS, JSON, max_size=4) | JSON},
)
PATHS = st.sampled_from(
    ["$.vm", "$.event", "$.data", "$.data.node-name", "$.data.device", "$['data']['id']",
     "$.data.id.a", "$.data.a.a.a", "$", "$.data.*", "$.data[*]"]
)  # fmt: skip


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down (``1``, ``1.0`` and ``True`` apart)."""
    return type(a) is type(b) and repr(a) == repr(b) and (a == b or a != a)


@settings(max_examples=400, deadline=None)
@given(paths=st.lists(PATHS, max_size=4), env=ENVELOPES)
def test_generated_keys_equal_the_reference(paths: list[str], env: dict[str, Any]) -> None:
    compiled = [compile_path(p) for p in paths]
    fast, slow = compiled_keyfunc(compiled)(env), keyfunc(compiled)(env)
    assert same(fast, slow), (paths, env)
    hash(fast)
