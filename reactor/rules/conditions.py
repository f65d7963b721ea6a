"""Conditions: the ``when:`` language compiled into plain predicates.

A condition is ``{path: JSONPATH, OPERATOR: VALUE}`` with exactly one operator,
or a combinator ``all`` / ``any`` (lists) / ``not`` (one condition), nestable.
``matches`` searches with RE2 (``reactor.rules.regex``): linear time, whatever the text.
A path may select several values: the operator holds if it holds for any of
them; a path that selects nothing makes every operator false but
``exists: false``. Values compare as JSON types: ``1 == 1.0``, ``"1" != 1``,
``true`` is not ``1``; ordering is defined between numbers and between strings.

Each compiled condition is a pair (predicate, explain): the predicate is the hot
path; ``explain`` says, for ``--explain``, which part failed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import CodeType
from typing import Any

from reactor.model import CompiledPath, Envelope
from reactor.rules.paths import plain_steps
from reactor.rules.regex import compile_search

Test = Callable[[Any], bool]
Predicate = Callable[[Envelope], bool]
Explain = Callable[[Envelope], str | None]


@dataclass(frozen=True, slots=True)
class Leaf:
    """``{path, op: value}`` compiled: its closure predicate and its text for explain."""

    path: CompiledPath
    op: str
    value: Any
    pred: Predicate


@dataclass(frozen=True, slots=True)
class Combo:
    """``all`` / ``any`` of parts, or ``not`` of one part."""

    kind: str
    parts: tuple[Cond, ...]


Cond = Leaf | Combo


OPERATORS = (
    "equals",
    "not_equals",
    "in",
    "not_in",
    "lt",
    "le",
    "gt",
    "ge",
    "matches",
    "contains",
    "exists",
)
COMBINATORS = ("all", "any", "not")


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values without coercion: numbers by value, bools apart."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float) and tb in (int, float):
        return bool(a == b)
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ta is dict:
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _is_number(x: Any) -> bool:
    return type(x) in (int, float)


def _eq_test(value: Any) -> Test:
    # Specialised closures: the common literal types need no recursive compare.
    t = type(value)
    if t is str:
        return lambda x: type(x) is str and x == value
    if t is bool or value is None:
        return lambda x: x is value
    if t in (int, float):
        return lambda x: type(x) in (int, float) and x == value
    return lambda x: json_equal(x, value)


def _order_test(op: str, value: Any) -> Test:
    import operator

    fn = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}[op]
    if _is_number(value):
        return lambda x: type(x) in (int, float) and fn(x, value)
    if type(value) is str:
        return lambda x: type(x) is str and fn(x, value)
    return lambda x: False


def _contains_test(value: Any) -> Test:
    def test(x: Any) -> bool:
        if type(x) is str:
            return type(value) is str and value in x
        if type(x) is list:
            return any(json_equal(item, value) for item in x)
        return False

    return test


def value_test(op: str, value: Any) -> Test:
    """The per-value test of an operator (not ``exists``); ``value`` is already validated."""
    if op == "equals":
        return _eq_test(value)
    if op == "not_equals":
        eq = _eq_test(value)
        return lambda x: not eq(x)
    if op in ("in", "not_in"):
        tests = [_eq_test(v) for v in value]
        if op == "in":
            return lambda x: any(t(x) for t in tests)
        return lambda x: not any(t(x) for t in tests)
    if op in ("lt", "le", "gt", "ge"):
        return _order_test(op, value)
    if op == "matches":
        search = compile_search(value)
        return lambda x: type(x) is str and search(x) is not None
    if op == "contains":
        return _contains_test(value)
    raise ValueError(f"unknown operator {op}")


_MISSING = object()
NUMBER_TYPES = (int, float)


def _inline_test(op: str, value: Any, x: str, ns: dict[str, Any], n: int) -> str | None:
    """Python source testing the single value in variable ``x``, or None if not inlinable.

    ``x`` holds ``MISSING`` when the path selected nothing. Names the source needs
    are put into ``ns`` with the suffix ``n`` so several tests share a namespace.
    """
    t = type(value)
    if op == "exists":
        return f"({x} is not MISSING)" if value else f"({x} is MISSING)"
    if op in ("equals", "not_equals") and t is str:
        ns[f"V{n}"] = value
        # a str literal equals only a str; MISSING differs from everything
        return f"({x} == V{n})" if op == "equals" else f"({x} is not MISSING and {x} != V{n})"
    if op == "equals" and (t is bool or value is None):
        ns[f"V{n}"] = value
        return f"({x} is V{n})"
    if op == "equals" and t in NUMBER_TYPES:
        ns[f"V{n}"] = value
        return f"(type({x}) in NUMBER_TYPES and {x} == V{n})"
    if op in ("in", "not_in") and value and all(type(v) is str for v in value):
        ns[f"S{n}"] = frozenset(value)
        inside = f"(type({x}) is str and {x} in S{n})"
        return inside if op == "in" else f"({x} is not MISSING and not {inside})"
    if op == "contains" and t is str:
        ns[f"V{n}"] = value
        ns[f"C{n}"] = _contains_test(value)
        return f"((V{n} in {x}) if type({x}) is str else (type({x}) is list and C{n}({x})))"
    if op == "matches":
        ns[f"R{n}"] = compile_search(value)
        return f"(type({x}) is str and R{n}({x}) is not None)"
    if op in ("lt", "le", "gt", "ge"):
        sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}[op]
        ns[f"V{n}"] = value
        if t in NUMBER_TYPES:
            return f"(type({x}) in NUMBER_TYPES and {x} {sym} V{n})"
        if t is str:
            return f"(type({x}) is str and {x} {sym} V{n})"
        return "False"
    return None


_TOKEN = re.compile("\x00([0-9]+)\x00")
_WORTH_SHARING = frozenset({"in", "not_in", "matches", "contains"})


class SourceBuilder:
    """Turns conditions into Python expressions over shared, once-read path values.

    Plain paths (``$.data.id``) become local variables read once per event at the
    top of the generated function; everything else calls the leaf's predicate.
    A test that several conditions share (the same path, operator and value) is
    computed at most once per event, when first needed, and remembered in a local.
    """

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"MISSING": _MISSING, "NUMBER_TYPES": NUMBER_TYPES}
        self.reads: dict[tuple[str, ...], str] = {}
        self._n = 0
        self._tests: dict[tuple[Any, ...], int] = {}
        self._test_src: list[str] = []
        self._uses: list[int] = []

    def _var(self, steps: tuple[str, ...]) -> str:
        if steps not in self.reads:
            if len(steps) > 1:
                self._var(steps[:-1])
            self.reads[steps] = f"p{len(self.reads)}"
        return self.reads[steps]

    def prologue(self) -> list[str]:
        """Lines reading every plain path used, parents first; then the shared tests' memos."""
        lines = []
        for steps, var in self.reads.items():
            parent = "env" if len(steps) == 1 else self.reads[steps[:-1]]
            self._n += 1
            key = f"K{self._n}"
            self.ns[key] = steps[-1]
            lines.append(
                f"    {var} = {parent}.get({key}, MISSING) if type({parent}) is dict else MISSING"
            )
        shared = [f"m{i}" for i, uses in enumerate(self._uses) if uses > 1]
        if shared:
            lines.append(f"    {' = '.join(shared)} = None")
        return lines

    def function(self, header: str, body: list[str]) -> str:
        """The source of a function: ``header``, the prologue, then ``body`` (from ``expr``)."""
        text = "\n".join([header, *self.prologue(), *body, ""])
        return _TOKEN.sub(self._resolve, text)

    def _resolve(self, m: re.Match[str]) -> str:
        i = int(m.group(1))
        src = self._test_src[i]
        if self._uses[i] == 1:
            return src
        return f"(m{i} if m{i} is not None else (m{i} := {src}))"

    def expr(self, cond: Cond) -> str:
        """A Python expression that is true when ``cond`` holds for ``env``.

        Only valid inside ``function``, which resolves the shared tests.
        """
        self._n += 1
        n = self._n
        if isinstance(cond, Combo):
            parts = [self.expr(p) for p in cond.parts]
            if cond.kind == "not":
                return f"(not {parts[0]})"
            if not parts:
                return "True" if cond.kind == "all" else "False"
            return "(" + (" and " if cond.kind == "all" else " or ").join(parts) + ")"
        steps = plain_steps(cond.path.text)
        if steps:
            if cond.op in _WORTH_SHARING:
                return self._shared(steps, cond, n)
            test = _inline_test(cond.op, cond.value, self._var(steps), self.ns, n)
            if test is not None:
                return test
        self.ns[f"P{n}"] = cond.pred
        return f"P{n}(env)"

    def _shared(self, steps: tuple[str, ...], cond: Leaf, n: int) -> str:
        """A token for a test costlier than a memo check, so that it runs once per event."""
        key = (steps, cond.op, type(cond.value).__name__, _value_key(cond.value))
        found = self._tests.get(key)
        if found is None:
            test = _inline_test(cond.op, cond.value, self._var(steps), self.ns, n)
            if test is None:
                self.ns[f"P{n}"] = cond.pred
                test = f"P{n}(env)"
            found = self._tests[key] = len(self._test_src)
            self._test_src.append(test)
            self._uses.append(0)
        self._uses[found] += 1
        return f"\x00{found}\x00"


def _value_key(value: Any) -> str:
    """The value of a test as a key: JSON keeps ``1``, ``1.0`` and ``true`` apart."""
    return json.dumps(value, sort_keys=True, default=repr)


def make_leaf(path: CompiledPath, op: str, value: Any) -> Leaf:
    """Compile one ``{path, op: value}`` condition (``value`` already validated)."""
    find = path.find
    pred: Predicate
    if op == "exists":
        want = bool(value)

        def pred(env: Envelope) -> bool:
            return bool(find(env)) is want

    else:
        test = value_test(op, value)

        def pred(env: Envelope) -> bool:
            for x in find(env):
                if test(x):
                    return True
            return False

    general = Leaf(path, op, value, pred)
    if plain_steps(path.text):
        return Leaf(path, op, value, compile_predicate(general))
    return general


def _never(env: Envelope) -> bool:
    return False


@lru_cache(maxsize=4096)
def generated_code(src: str, filename: str) -> CodeType:
    """``src`` compiled once: conditions of one shape share their source, only names differ."""
    code: CodeType = compile(src, filename, "exec")
    return code


def compile_predicate(cond: Cond) -> Predicate:
    """One generated function for ``cond``: plain paths read once, tests inlined."""
    b = SourceBuilder()
    src = b.function("def pred(env):", [f"    return {b.expr(cond)}"])
    exec(generated_code(src, "<condition>"), b.ns)  # our own generated source only
    fn: Predicate = b.ns["pred"]
    return fn


def explain(cond: Cond, env: Envelope) -> str | None:
    """Why ``cond`` is false for ``env`` (the first failing part), or None if it holds."""
    if isinstance(cond, Leaf):
        if cond.pred(env):
            return None
        got = cond.path.find(env)
        seen = json.dumps(got, default=str)[:200] if got else "nothing"
        shown = json.dumps(cond.value, default=str)
        return f"{cond.path.text} {cond.op} {shown} is false (selected {seen})"
    results = [explain(p, env) for p in cond.parts]
    if cond.kind == "all":
        return next((r for r in results if r is not None), None)
    if cond.kind == "any":
        if any(r is None for r in results):
            return None
        return "none of any: " + "; ".join(r or "" for r in results)
    return "a 'not' condition's inner condition holds" if results[0] is None else None
