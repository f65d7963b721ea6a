"""The parts of a rule that have a language of their own: conditions and options.

``PartsCompiler`` turns ``when:`` into condition data (``reactor.rules.conditions``),
and ``retry:``, ``throttle:`` and ``threshold:`` into the frozen model, each
problem reported at its YAML node. ``reactor.rules.compiler.Compiler`` builds on it for
whole rule files.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reactor.durations import parse_duration
from reactor.errors import Diagnostic, Location
from reactor.model import CompiledPath, RetryPolicy, Threshold, Throttle
from reactor.rules import conditions as C
from reactor.rules.catalog import Catalog
from reactor.rules.paths import PathSyntaxError, compile_path, data_field
from reactor.rules.regex import RegexError, compile_search, nested_quantifier
from reactor.rules.yamlload import MarkedDict, MarkedList, plain

RETRY_KEYS = ("attempts", "initial", "max", "multiplier", "jitter")
THROTTLE_KEYS = ("mode", "window", "key")
THRESHOLD_KEYS = ("count", "window", "key")
THROTTLE_MODES = ("once_within", "once_after", "qemu")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` when a choice is close to ``word``, else ``""``."""
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


_FLAT_IN_OLD_DOCS = {"ACPI_DEVICE_OST": "device, slot, slot-type, source and status"}
"""Events whose members docs/qmp/qmp-events.txt (QEMU < 2.5) drew one level too high."""


@dataclass
class RuleScope:
    """Per-rule state while compiling: its events and the data fields it reads."""

    name: str
    events: list[str]
    fields: list[tuple[str, Location]]
    event_locations: list[Location] = field(default_factory=list)


class PartsCompiler:
    """Compiles conditions and rule options; collects diagnostics instead of stopping."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.diagnostics: list[Diagnostic] = []

    # -- reporting -------------------------------------------------------
    def error(self, loc: Location, message: str) -> None:
        """Record an error at ``loc``."""
        self.diagnostics.append(Diagnostic(loc, message))

    def warn(self, loc: Location, message: str) -> None:
        """Record a warning at ``loc``."""
        self.diagnostics.append(Diagnostic(loc, message, "warning"))

    def _unknown_keys(self, node: MarkedDict, allowed: Sequence[str], what: str) -> None:
        for key in node:
            if key not in allowed:
                hint = did_you_mean(str(key), allowed)
                self.error(node.key_loc(key), f"unknown key {key!r} in {what}{hint}")

    # -- conditions ------------------------------------------------------
    def condition(self, node: Any, loc: Location, ctx: RuleScope) -> C.Cond:
        """Compile a condition, a list of them (all of), or a combinator."""
        if isinstance(node, MarkedList):
            parts = [self.condition(v, node.loc(i), ctx) for i, v in enumerate(node)]
            return C.Combo("all", tuple(parts))
        if not isinstance(node, MarkedDict):
            self.error(loc, "a condition is a mapping like {path: $.data.id, equals: x}")
            return _never()
        combos = [k for k in node if k in C.COMBINATORS]
        if combos:
            return self._combinator(node, combos, ctx)
        return self._leaf(node, ctx)

    def _combinator(self, node: MarkedDict, combos: list[Any], ctx: RuleScope) -> C.Cond:
        if len(node) > 1:
            extra = next(k for k in node if k != combos[0])
            self.error(
                node.key_loc(extra),
                f"'{combos[0]}' stands alone in its mapping; '{extra}' cannot be beside it",
            )
            return _never()
        kind = combos[0]
        inner = node[kind]
        if kind == "not":
            return C.Combo("not", (self.condition(inner, node.loc(kind), ctx),))
        if not isinstance(inner, MarkedList):
            self.error(node.loc(kind), f"'{kind}' takes a list of conditions")
            return _never()
        parts = [self.condition(v, inner.loc(i), ctx) for i, v in enumerate(inner)]
        return C.Combo(kind, tuple(parts))

    def _leaf(self, node: MarkedDict, ctx: RuleScope) -> C.Cond:
        ops = [k for k in node if k in C.OPERATORS]
        for key in node:
            if key != "path" and key not in C.OPERATORS:
                hint = did_you_mean(str(key), (*C.OPERATORS, *C.COMBINATORS))
                self.error(node.key_loc(key), f"unknown operator {key!r}{hint}")
                return _never()
        if not ops:
            self.error(node.location, f"missing operator: one of {', '.join(C.OPERATORS)}")
            return _never()
        if len(ops) > 1:
            self.error(
                node.key_loc(ops[1]),
                f"two operators in one condition ('{ops[0]}' and '{ops[1]}'); "
                "use 'all:' to combine them",
            )
            return _never()
        if "path" not in node:
            self.error(node.location, "a condition needs a 'path' (a JSONPath like $.data.id)")
            return _never()
        path = self.path(node["path"], node.loc("path"), ctx)
        op = ops[0]
        if path is None or not self._operand_ok(op, node[op], node.loc(op)):
            return _never()
        return C.make_leaf(path, op, plain(node[op]))

    def _operand_ok(self, op: str, value: Any, loc: Location) -> bool:
        problem = None
        if op in ("in", "not_in") and not isinstance(value, list):
            problem = f"'{op}' takes a list of values"
        elif op in ("lt", "le", "gt", "ge") and type(value) not in (int, float, str):
            problem = f"'{op}' compares with a number or a string"
        elif op == "exists" and not isinstance(value, bool):
            problem = "'exists' takes true or false"
        elif op == "matches":
            if not isinstance(value, str):
                problem = "'matches' takes a regular expression (text)"
            else:
                problem = self._regex_problem(value, loc)
        elif op == "contains" and isinstance(value, dict | list):
            problem = "'contains' takes a single value (text, number, true/false or null)"
        if problem:
            self.error(loc, problem)
            return False
        return True

    def _regex_problem(self, pattern: str, loc: Location) -> str | None:
        """Why RE2 cannot take ``pattern``, or None; warns about nested quantifiers."""
        try:
            compile_search(pattern)
        except RegexError as err:
            return f"invalid regular expression {pattern!r}: {err}"
        if nested_quantifier(pattern):
            self.warn(
                loc,
                f"regular expression {pattern!r} nests a repeat inside a repeat: RE2 matches it"
                " in linear time, but a backtracking engine (Python re, PCRE) would take"
                " exponential time; simplify it (e.g. '(a+)+' to 'a+')",
            )
        return None

    def path(self, text: Any, loc: Location, ctx: RuleScope | None) -> CompiledPath | None:
        """Compile a JSONPath at ``loc``; remembers ``$.data.X`` fields for the catalog check."""
        if not isinstance(text, str):
            self.error(loc, "a path is a JSONPath text like $.data.id")
            return None
        try:
            compiled = compile_path(text)
        except PathSyntaxError as err:
            self.error(loc, str(err))
            return None
        name = data_field(text)
        if ctx is not None and name is not None:
            ctx.fields.append((name, loc))
        return compiled

    def _check_fields(self, ctx: RuleScope) -> None:
        if not ctx.fields or not ctx.events or "*" in ctx.events:
            return  # "*" stands for any event, also ones no catalog knows
        names: set[str] = set()
        for pattern in ctx.events:
            names.update(self.catalog.expand(pattern))
        if not names:
            return
        known: set[str] = set()
        for n in names:
            known.update(self.catalog.events[n].fields)
        for name, loc in ctx.fields:
            if name in known:
                continue
            self.error(loc, self._field_message(name, sorted(names), known))

    def _field_message(self, name: str, events: list[str], known: set[str]) -> str:
        shown = ", ".join(events[:4]) + (", ..." if len(events) > 4 else "")
        for ev in events:
            wire = self._wire_name(ev, name)
            if wire:
                return wire
        hint = did_you_mean(name, known)
        return f"no event of this rule ({shown}) has the data field '{name}'{hint}"

    def _wire_name(self, event: str, name: str) -> str | None:
        """Where QEMU's documentation or history and its wire format differ: what QEMU sends."""
        rename = self.catalog.rename_of(event, name)
        if rename is not None and rename.get("kind") == "member replaced":
            return (
                f"'{name}' is not a field of {event}: QEMU replaced it with "
                f"'{rename['new']}' before any release sent it"
            )
        if rename is not None:
            return (
                f"'{name}' is not a field of {event}: QEMU's old documentation said "
                f"'{name}', but every released QEMU sends '{rename['new']}'"
            )
        member = self.catalog.nested_in(event, name)
        if member is None:
            return None
        doc = _FLAT_IN_OLD_DOCS.get(event)
        said = f" (QEMU's old text documentation showed {doc} at the top of data)" if doc else ""
        return (
            f"'{name}' is not a top-level field of {event}: QEMU sends it under "
            f"'{member}', as $.data.{member}.{name}{said}"
        )

    # -- options ---------------------------------------------------------
    def _retry(self, node: Any, loc: Location) -> RetryPolicy | None:
        if not isinstance(node, MarkedDict):
            self.error(loc, "'retry:' is a mapping: {attempts, initial, max, multiplier, jitter}")
            return None
        self._unknown_keys(node, RETRY_KEYS, "retry")
        base = RetryPolicy()
        attempts = node.get("attempts", base.attempts)
        if type(attempts) is not int or attempts < 1:
            self.error(node.loc("attempts"), "attempts must be a whole number, at least 1")
            attempts = base.attempts
        mult = node.get("multiplier", base.multiplier)
        if type(mult) not in (int, float) or mult < 1:
            self.error(node.loc("multiplier"), "multiplier must be a number, at least 1")
            mult = base.multiplier
        durations = {}
        for key in ("initial", "max", "jitter"):
            if key in node:
                durations[key] = self._duration(node[key], node.loc(key))
        return RetryPolicy(
            attempts=attempts,
            initial=durations.get("initial") or base.initial,
            max=durations.get("max") or base.max,
            multiplier=float(mult),
            jitter=durations.get("jitter", base.jitter) or 0.0,
        )

    def _duration(self, value: Any, loc: Location) -> float:
        try:
            return parse_duration(value)
        except ValueError as err:
            self.error(loc, str(err))
            return 0.0

    # -- windows ---------------------------------------------------------
    def _keys(self, node: MarkedDict, ctx: RuleScope) -> tuple[CompiledPath, ...]:
        raw = node.get("key", "$.vm")
        loc = node.loc("key")
        texts = list(raw) if isinstance(raw, MarkedList) else [raw]
        paths = []
        for i, text in enumerate(texts):
            where = raw.loc(i) if isinstance(raw, MarkedList) else loc
            path = self.path(text, where, ctx)
            if path is not None:
                paths.append(path)
        return tuple(paths)

    def _window(self, node: MarkedDict) -> float:
        if "window" not in node:
            self.error(node.location, "a 'window' duration is needed, e.g. window: 10s")
            return 0.0
        try:
            window = parse_duration(node["window"])
        except ValueError as err:
            self.error(node.loc("window"), str(err))
            return 0.0
        if window <= 0:
            self.error(node.loc("window"), "window must be longer than zero")
        return window

    def _throttle(self, rule: MarkedDict, ctx: RuleScope) -> Throttle | None:
        node = rule["throttle"]
        if not isinstance(node, MarkedDict):
            self.error(rule.loc("throttle"), "'throttle:' is a mapping: {mode, window, key}")
            return None
        self._unknown_keys(node, THROTTLE_KEYS, "throttle")
        mode = node.get("mode", "once_within")
        if mode not in THROTTLE_MODES:
            hint = did_you_mean(str(mode), THROTTLE_MODES)
            self.error(
                node.loc("mode"), f"throttle mode must be one of {', '.join(THROTTLE_MODES)}{hint}"
            )
            return None
        return Throttle(mode=mode, window=self._window(node), key=self._keys(node, ctx))

    def _threshold(self, rule: MarkedDict, ctx: RuleScope) -> Threshold | None:
        node = rule["threshold"]
        if not isinstance(node, MarkedDict):
            self.error(rule.loc("threshold"), "'threshold:' is a mapping: {count, window, key}")
            return None
        self._unknown_keys(node, THRESHOLD_KEYS, "threshold")
        count = node.get("count")
        if type(count) is not int or count < 1:
            where = node.loc("count") if "count" in node else node.location
            self.error(where, "threshold needs 'count', a whole number, at least 1")
            return None
        return Threshold(count=count, window=self._window(node), key=self._keys(node, ctx))


def _never() -> C.Cond:
    return C.Combo("any", ())
