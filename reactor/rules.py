"""Rule files compiled into the frozen model, with every problem located.

``load_rules(paths)`` reads YAML rule files (see the rule language in the
README), validates them against the event catalog and the registered action
types, and returns a ``RuleSet`` plus a list of ``Diagnostic``s, each pointing
at the offending YAML node as ``FILE:LINE:COL``. Nothing here runs at event
time: the result is pure data and closures.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from reactor import conditions as C
from reactor.actions.base import ActionSettings, ActionType
from reactor.catalog import Catalog, load_catalog
from reactor.durations import parse_duration
from reactor.errors import Diagnostic, Location, RuleError
from reactor.matcher import RuleSet
from reactor.model import ActionSpec, CompiledPath, RetryPolicy, Rule, Threshold, Throttle
from reactor.paths import PathSyntaxError, compile_path, data_field
from reactor.validation import validate_action
from reactor.windows import unreachable_threshold
from reactor.yamlload import MarkedDict, MarkedList, load_file, plain

RULE_KEYS = (
    "name",
    "description",
    "on",
    "when",
    "actions",
    "throttle",
    "threshold",
    "mode",
    "enabled",
)
ACTION_KEYS = ("type", "with", "retry", "timeout")
RETRY_KEYS = ("attempts", "initial", "max", "multiplier", "jitter")
THROTTLE_KEYS = ("mode", "window", "key")
THRESHOLD_KEYS = ("count", "window", "key")
THROTTLE_MODES = ("once_within", "once_after", "qemu")
RULE_MODES = ("queued", "single", "restart", "parallel")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` when a choice is close to ``word``, else ``""``."""
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


@dataclass
class _Ctx:
    """Per-rule state while compiling: its events and the data fields it reads."""

    name: str
    events: list[str]
    fields: list[tuple[str, Location]]


class Compiler:
    """Compiles rule documents; collects diagnostics instead of stopping at the first."""

    def __init__(
        self,
        *,
        catalog: Catalog | None = None,
        action_types: Mapping[str, ActionType] | None = None,
        settings: ActionSettings | None = None,
    ) -> None:
        self.catalog = catalog or load_catalog()
        self.action_types = action_types
        self.settings = settings or ActionSettings()
        self.diagnostics: list[Diagnostic] = []
        self._names: dict[str, Location] = {}

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

    # -- files -----------------------------------------------------------
    def compile_file(self, path: Path, display: str | None = None) -> list[Rule]:
        """Compile one rule file; problems go to ``diagnostics``."""
        try:
            doc = load_file(path, display)
        except RuleError as err:
            self.diagnostics.extend(err.diagnostics)
            return []
        name = display or str(path)
        if doc is None:
            self.warn(Location(name, 1, 1), "empty rule file")
            return []
        if not isinstance(doc, MarkedDict):
            self.error(
                getattr(doc, "location", Location(name, 1, 1)),
                "a rule file is a mapping with a top-level 'rules:' list",
            )
            return []
        self._unknown_keys(doc, ("rules",), "the rule file")
        items = doc.get("rules")
        if not isinstance(items, MarkedList):
            where = doc.loc("rules") if "rules" in doc else doc.location
            self.error(where, "'rules:' must be a list of rules")
            return []
        rules = []
        for i, item in enumerate(items):
            rule = self.compile_rule(item, items.loc(i))
            if rule is not None:
                rules.append(rule)
        return rules

    # -- one rule --------------------------------------------------------
    def compile_rule(self, node: Any, loc: Location) -> Rule | None:
        """Compile one rule mapping, or None when it has errors."""
        if not isinstance(node, MarkedDict):
            self.error(loc, "a rule is a mapping with name, on and actions")
            return None
        before = len([d for d in self.diagnostics if d.severity == "error"])
        self._unknown_keys(node, RULE_KEYS, "a rule")
        name = self._rule_name(node)
        ctx = _Ctx(name or "?", self._events(node), [])
        cond = None
        if "when" in node:
            cond = self.condition(node["when"], node.loc("when"), ctx)
        actions = self._actions(node, name or "?")
        throttle = self._throttle(node, ctx) if "throttle" in node else None
        threshold = self._threshold(node, ctx) if "threshold" in node else None
        mode = node.get("mode", "queued")
        if mode not in RULE_MODES:
            self.error(node.loc("mode"), f"mode must be one of {', '.join(RULE_MODES)}")
        enabled = node.get("enabled", True)
        if not isinstance(enabled, bool):
            self.error(node.loc("enabled"), "enabled must be true or false")
        description = node.get("description", "")
        if not isinstance(description, str):
            self.error(node.loc("description"), "description must be text")
        self._check_fields(ctx)
        errors = len([d for d in self.diagnostics if d.severity == "error"])
        if errors > before or name is None:
            return None
        return Rule(
            name=name,
            events=tuple(ctx.events),
            actions=tuple(actions),
            location=loc,
            description=description,
            condition=C.compile_predicate(cond) if cond is not None else None,
            explain=partial(C.explain, cond) if cond is not None else None,
            when=cond,
            throttle=throttle,
            threshold=threshold,
            mode=mode,
            enabled=enabled,
        )

    def _rule_name(self, node: MarkedDict) -> str | None:
        name = node.get("name")
        if name is None:
            self.error(node.location, "a rule needs a 'name'")
            return None
        if not isinstance(name, str) or not name.strip():
            self.error(node.loc("name"), "a rule's name must be non-empty text")
            return None
        if name in self._names:
            self.error(
                node.loc("name"),
                f"duplicate rule name '{name}' (first defined at {self._names[name]})",
            )
            return None
        self._names[name] = node.loc("name")
        return name

    def _events(self, node: MarkedDict) -> list[str]:
        if "on" not in node:
            self.error(node.location, "a rule needs 'on:' (an event name, a list or a glob)")
            return []
        raw = node["on"]
        items: list[tuple[Any, Location]]
        if isinstance(raw, MarkedList):
            items = [(v, raw.loc(i)) for i, v in enumerate(raw)]
            if not items:
                self.error(node.loc("on"), "'on:' lists no event")
        else:
            items = [(raw, node.loc("on"))]
        events = []
        for value, where in items:
            if not isinstance(value, str) or not value:
                self.error(where, "an event name must be text, e.g. GUEST_PANICKED")
                continue
            if any(c in value for c in "*?["):
                if not self.catalog.expand(value):
                    self.warn(where, f"'{value}' matches no known event")
            elif value not in self.catalog:
                hint = self.catalog.suggest(value)
                more = f" (did you mean {hint}?)" if hint else ""
                self.error(where, f"unknown event '{value}'{more}")
                continue
            events.append(value)
        return events

    # -- conditions ------------------------------------------------------
    def condition(self, node: Any, loc: Location, ctx: _Ctx) -> C.Cond:
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

    def _combinator(self, node: MarkedDict, combos: list[Any], ctx: _Ctx) -> C.Cond:
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

    def _leaf(self, node: MarkedDict, ctx: _Ctx) -> C.Cond:
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
        import re

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
                try:
                    re.compile(value)
                except re.error as err:
                    problem = f"invalid regular expression {value!r}: {err}"
        elif op == "contains" and isinstance(value, dict | list):
            problem = "'contains' takes a single value (text, number, true/false or null)"
        if problem:
            self.error(loc, problem)
            return False
        return True

    def path(self, text: Any, loc: Location, ctx: _Ctx | None) -> CompiledPath | None:
        """Compile a JSONPath at ``loc``; remembers ``$.data.X`` fields for the catalog check."""
        if not isinstance(text, str):
            self.error(loc, "a path is a JSONPath text like $.data.id")
            return None
        try:
            compiled = compile_path(text)
        except PathSyntaxError as err:
            self.error(loc, str(err))
            return None
        field = data_field(text)
        if ctx is not None and field is not None:
            ctx.fields.append((field, loc))
        return compiled

    def _check_fields(self, ctx: _Ctx) -> None:
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
        for field, loc in ctx.fields:
            if field in known:
                continue
            self.error(loc, self._field_message(field, sorted(names), known))

    def _field_message(self, field: str, events: list[str], known: set[str]) -> str:
        shown = ", ".join(events[:4]) + (", ..." if len(events) > 4 else "")
        for ev in events:
            wire = self.catalog.rename_for(ev, field)
            if wire:
                return (
                    f"'{field}' is not a field of {ev}: QEMU's old documentation said "
                    f"'{field}', but every released QEMU sends '{wire}'"
                )
        hint = did_you_mean(field, known)
        return f"no event of this rule ({shown}) has the data field '{field}'{hint}"

    # -- actions ---------------------------------------------------------
    def _actions(self, node: MarkedDict, rule: str) -> list[ActionSpec]:
        raw = node.get("actions")
        if not isinstance(raw, MarkedList) or not raw:
            self.error(
                node.loc("actions") if "actions" in node else node.location,
                "a rule needs 'actions:', a non-empty list",
            )
            return []
        specs = []
        for i, item in enumerate(raw):
            spec = self._action(item, raw.loc(i), i, rule)
            if spec is not None:
                specs.append(spec)
        return specs

    def _action(self, node: Any, loc: Location, index: int, rule: str) -> ActionSpec | None:
        if not isinstance(node, MarkedDict):
            self.error(loc, "an action is a mapping with 'type' and 'with'")
            return None
        self._unknown_keys(node, ACTION_KEYS, "an action")
        kind = node.get("type")
        if not isinstance(kind, str):
            self.error(node.loc("type") if "type" in node else loc, "an action needs a 'type'")
            return None
        params = node.get("with", MarkedDict())
        if not isinstance(params, MarkedDict):
            self.error(node.loc("with"), "'with:' must be a mapping of parameters")
            return None
        if not hasattr(params, "location"):
            params.location, params.key_locations, params.value_locations = loc, {}, {}
        retry = self._retry(node["retry"], node.loc("retry")) if "retry" in node else None
        timeout = None
        if "timeout" in node:
            timeout = self._duration(node["timeout"], node.loc("timeout"))
        spec = ActionSpec(
            type=kind,
            params=params,
            location=loc,
            index=index,
            retry=retry,
            timeout=timeout,
            param_locations=dict(params.value_locations),
        )
        if self.action_types is not None:
            self._validate_action(spec, node, rule)
        return spec

    def _validate_action(self, spec: ActionSpec, node: MarkedDict, rule: str) -> None:
        assert self.action_types is not None
        if spec.type not in self.action_types:
            hint = did_you_mean(spec.type, self.action_types)
            known = ", ".join(sorted(self.action_types))
            self.error(node.loc("type"), f"unknown action type '{spec.type}'{hint}; known: {known}")
            return
        self.diagnostics.extend(
            validate_action(self.action_types[spec.type], spec, rule, self.settings)
        )

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
    def _keys(self, node: MarkedDict, ctx: _Ctx) -> tuple[CompiledPath, ...]:
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

    def _throttle(self, rule: MarkedDict, ctx: _Ctx) -> Throttle | None:
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

    def _threshold(self, rule: MarkedDict, ctx: _Ctx) -> Threshold | None:
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


def rule_files(paths: Sequence[Path]) -> list[Path]:
    """The rule files named: files as given, directories searched for *.yaml / *.yml."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")))
        else:
            found.append(path)
    return found


def load_rules(
    paths: Sequence[Path],
    *,
    action_types: Mapping[str, ActionType] | None = None,
    settings: ActionSettings | None = None,
    catalog: Catalog | None = None,
) -> tuple[RuleSet, list[Diagnostic]]:
    """Compile every rule file under ``paths``; returns the rules and all diagnostics."""
    compiler = Compiler(catalog=catalog, action_types=action_types, settings=settings)
    rules: list[Rule] = []
    files = rule_files(paths)
    for path in files:
        if not path.exists():
            compiler.error(Location(str(path)), "no such file or directory")
            continue
        rules.extend(compiler.compile_file(path))
    if not files:
        for path in paths:
            compiler.warn(Location(str(path)), "no rule files (*.yaml, *.yml) found")
    for rule in rules:
        compiler.diagnostics.extend(rule_warnings(rule, compiler.catalog))
    return RuleSet(tuple(rules)), compiler.diagnostics


def rule_warnings(rule: Rule, catalog: Catalog) -> list[Diagnostic]:
    """Warnings about a compiled rule that are not errors (e.g. unreachable thresholds)."""
    message = unreachable_threshold(rule, catalog)
    return [Diagnostic(rule.location, message, "warning")] if message else []


def require_rules(paths: Sequence[Path], **kwargs: Any) -> tuple[RuleSet, list[Diagnostic]]:
    """Like ``load_rules`` but raises RuleError (with all diagnostics) on any error."""
    ruleset, diags = load_rules(paths, **kwargs)
    if any(d.severity == "error" for d in diags):
        raise RuleError("invalid rules", diags)
    return ruleset, diags
