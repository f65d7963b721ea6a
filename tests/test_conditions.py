"""Every operator and combinator of the rule language, through the compiler."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reactor.rules.compiler import load_rules
from reactor.rules.conditions import COMBINATORS, OPERATORS, json_equal
from reactor.rules.paths import compile_path

ENV: dict[str, Any] = {
    "event": "QUORUM_REPORT_BAD",
    "vm": "web-1",
    "host": "h",
    "seq": 1,
    "data": {
        "node-name": "r1",
        "sector-num": 0,
        "sectors-count": 1,
        "type": "read",
        "ratio": 1.5,
        "flag": True,
        "tags": ["a", "b", 1],
        "nested": {"x": None},
    },
}


def holds(tmp_path: Path, when: str, env: dict[str, Any] | None = None) -> bool:
    text = textwrap.dedent(
        """\
        rules:
          - name: r
            on: "*"
            when: {when}
            actions: [{{type: log, with: {{message: x}}}}]
        """
    ).format(when=when)
    f = tmp_path / "r.yaml"
    f.write_text(text)
    rules, diags = load_rules([f])
    assert [d for d in diags if d.severity == "error"] == []
    rule = rules.rules[0]
    assert rule.condition is not None
    return rule.condition(env or ENV)


CASES = [
    # equals, with JSON types and no coercion
    ("{path: $.data.node-name, equals: r1}", True),
    ("{path: $.data.node-name, equals: r2}", False),
    ("{path: $.data.sector-num, equals: 0.0}", True),  # 1 == 1.0
    ("{path: $.data.sector-num, equals: '0'}", False),  # "1" != 1
    ("{path: $.data.sectors-count, equals: true}", False),  # true is not 1
    ("{path: $.data.flag, equals: 1}", False),
    ("{path: $.data.flag, equals: true}", True),
    ("{path: $.data.nested, equals: {x: null}}", True),
    ("{path: $.data.tags, equals: [a, b, 1.0]}", True),
    # not_equals
    ("{path: $.data.type, not_equals: write}", True),
    ("{path: $.data.type, not_equals: read}", False),
    ("{path: $.data.missing, not_equals: read}", False),  # nothing selected
    # in / not_in
    ("{path: $.data.type, in: [read, write]}", True),
    ("{path: $.data.type, in: [flush]}", False),
    ("{path: $.data.sector-num, in: ['0']}", False),
    ("{path: $.data.type, not_in: [flush]}", True),
    ("{path: $.data.type, not_in: [read]}", False),
    ("{path: $.data.missing, not_in: [read]}", False),
    # ordering: numbers with numbers, strings with strings, otherwise false
    ("{path: $.data.ratio, lt: 2}", True),
    ("{path: $.data.ratio, lt: 1.5}", False),
    ("{path: $.data.ratio, le: 1.5}", True),
    ("{path: $.data.ratio, gt: 1}", True),
    ("{path: $.data.ratio, ge: 1.6}", False),
    ("{path: $.data.type, gt: a}", True),
    ("{path: $.data.type, lt: 5}", False),  # string vs number
    ("{path: $.data.flag, gt: 0}", False),  # bool is not a number
    ("{path: $.data.missing, lt: 5}", False),
    # matches: regex search on strings
    ("{path: $.vm, matches: '^web-'}", True),
    ("{path: $.vm, matches: 'eb'}", True),
    ("{path: $.vm, matches: '^db-'}", False),
    ("{path: $.data.sector-num, matches: '0'}", False),
    # contains: substring, or list element
    ("{path: $.vm, contains: web}", True),
    ("{path: $.vm, contains: db}", False),
    ("{path: $.data.tags, contains: b}", True),
    ("{path: $.data.tags, contains: 1.0}", True),
    ("{path: $.data.tags, contains: c}", False),
    ("{path: $.data.sector-num, contains: 0}", False),
    # exists
    ("{path: $.data.node-name, exists: true}", True),
    ("{path: $.data.missing, exists: true}", False),
    ("{path: $.data.missing, exists: false}", True),
    ("{path: $.data.nested.x, exists: true}", True),  # present, even if null
    # several values: any value satisfies
    ("{path: '$.data.tags[*]', equals: b}", True),
    ("{path: '$.data.tags[*]', not_equals: a}", True),
    ("{path: '$.data.tags[*]', gt: 0}", True),
    # combinators
    ("{all: [{path: $.vm, equals: web-1}, {path: $.data.type, equals: read}]}", True),
    ("{all: [{path: $.vm, equals: web-1}, {path: $.data.type, equals: write}]}", False),
    ("{any: [{path: $.vm, equals: db}, {path: $.data.type, equals: read}]}", True),
    ("{any: [{path: $.vm, equals: db}, {path: $.data.type, equals: write}]}", False),
    ("{not: {path: $.vm, equals: db}}", True),
    ("{not: {path: $.vm, equals: web-1}}", False),
    ("{any: [{not: {path: $.data.error, exists: true}}, {path: $.vm, equals: x}]}", True),
    ("[{path: $.vm, equals: web-1}, {path: $.data.flag, equals: true}]", True),
    ("[{path: $.vm, equals: web-1}, {path: $.data.flag, equals: false}]", False),
    ("{all: []}", True),
    ("{any: []}", False),
]


@pytest.mark.parametrize(("when", "expected"), CASES)
def test_condition(tmp_path: Path, when: str, expected: bool) -> None:
    assert holds(tmp_path, when) is expected


def test_every_operator_and_combinator_is_tested_and_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    tested = " ".join(w for w, _ in CASES)
    for name in (*OPERATORS, *COMBINATORS):
        assert f"{name}:" in tested, f"operator {name} has no test case"
        assert f"`{name}`" in readme, f"operator {name} is not documented in README.md"


def test_json_equal_is_strict_about_types() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal("1", 1)
    assert not json_equal(True, 1)
    assert not json_equal(0, False)
    assert json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal([1], [1, 1])
    assert json_equal(None, None)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_PATHS = ["$.data[0]", "$.data[*].x", "$.data.a[1:]", "$.data..b", "$.data[?(@.x > 1)]", "$[0]"]


@given(doc=_JSON, text=st.sampled_from(_PATHS))
def test_a_path_that_does_not_fit_the_document_selects_nothing(doc: Any, text: str) -> None:
    """Guests and peers choose the data's shape: no path raises on it (``[0]`` on an object)."""
    found = compile_path(text).find({"event": "STOP", "data": doc})
    assert isinstance(found, list)
