"""Conditions: the ``when:`` language compiled into plain predicates.

A condition is ``{path: JSONPATH, OPERATOR: VALUE}`` with exactly one operator,
or a combinator ``all`` / ``any`` (lists) / ``not`` (one condition), nestable.
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
from typing import Any

from reactor.model import CompiledPath, Envelope

Test = Callable[[Any], bool]
Predicate = Callable[[Envelope], bool]
Explain = Callable[[Envelope], str | None]

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
        search = re.compile(value).search
        return lambda x: type(x) is str and search(x) is not None
    if op == "contains":
        return _contains_test(value)
    raise ValueError(f"unknown operator {op}")


def leaf(path: CompiledPath, op: str, value: Any) -> tuple[Predicate, Explain]:
    """Compile one ``{path, op: value}`` condition."""
    find = path.find
    if op == "exists":
        want = bool(value)

        def exists(env: Envelope) -> bool:
            return bool(find(env)) is want

        pred: Predicate = exists
    else:
        test = value_test(op, value)

        def pred(env: Envelope) -> bool:
            for x in find(env):
                if test(x):
                    return True
            return False

    shown = f"{path.text} {op} {json.dumps(value, default=str)}"

    def explain(env: Envelope) -> str | None:
        if pred(env):
            return None
        got = find(env)
        seen = json.dumps(got, default=str) if got else "nothing"
        return f"{shown} is false (selected {seen[:200]})"

    return pred, explain


def all_of(parts: list[tuple[Predicate, Explain]]) -> tuple[Predicate, Explain]:
    """All parts hold (an empty list holds)."""
    preds = tuple(p for p, _ in parts)
    if len(preds) == 1:
        return parts[0]

    def pred(env: Envelope) -> bool:
        for p in preds:
            if not p(env):
                return False
        return True

    def explain(env: Envelope) -> str | None:
        for _, e in parts:
            why = e(env)
            if why is not None:
                return why
        return None

    return pred, explain


def any_of(parts: list[tuple[Predicate, Explain]]) -> tuple[Predicate, Explain]:
    """At least one part holds (an empty list does not)."""
    preds = tuple(p for p, _ in parts)

    def pred(env: Envelope) -> bool:
        for p in preds:
            if p(env):
                return True
        return False

    def explain(env: Envelope) -> str | None:
        if pred(env):
            return None
        reasons = [e(env) or "" for _, e in parts]
        return "none of any: " + "; ".join(reasons)

    return pred, explain


def not_(part: tuple[Predicate, Explain]) -> tuple[Predicate, Explain]:
    """The part does not hold."""
    inner, _ = part

    def pred(env: Envelope) -> bool:
        return not inner(env)

    def explain(env: Envelope) -> str | None:
        return None if pred(env) else "a 'not' condition's inner condition holds"

    return pred, explain
