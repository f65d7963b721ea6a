"""Rule files compiled into the frozen model, with every problem located.

``load_rules(paths)`` reads YAML rule files (see the rule language in the
README), validates them against the event catalog and the registered action
types, and returns a ``RuleSet`` plus a list of ``Diagnostic``s, each pointing
at the offending YAML node as ``FILE:LINE:COL``. Nothing here runs at event
time: the result is pure data and closures. Conditions and rule options are
compiled by ``reactor.rules.options``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from reactor.errors import Diagnostic, Location, RuleError
from reactor.model import ActionSpec, Correlation, CorrelationKind, Rule
from reactor.params.validation import validate_action
from reactor.plugins.api import ActionSettings, ActionType
from reactor.rules import conditions as C
from reactor.rules.catalog import Catalog, load_catalog
from reactor.rules.lint import destination_warnings, unreachable_threshold
from reactor.rules.options import PartsCompiler, RuleScope, did_you_mean
from reactor.rules.ruleset import RuleSet
from reactor.rules.versions import release_problems, targets
from reactor.rules.yamlload import MarkedDict, MarkedList, load_file

RULE_KEYS = (
    "name",
    "description",
    "on",
    "when",
    "actions",
    "throttle",
    "threshold",
    "absent",
    "followed_by",
    "mode",
    "enabled",
)
CORRELATION_KINDS = ("absent", "followed_by")
CORRELATION_KEYS = ("on", "when", "within", "key")
ACTION_KEYS = ("type", "with", "retry", "timeout")
RULE_MODES = ("queued", "single", "restart", "parallel")


class Compiler(PartsCompiler):
    """Compiles rule documents; collects diagnostics instead of stopping at the first."""

    def __init__(
        self,
        *,
        catalog: Catalog | None = None,
        action_types: Mapping[str, ActionType] | None = None,
        settings: ActionSettings | None = None,
        qemu_versions: Sequence[str] = (),
    ) -> None:
        super().__init__(catalog or load_catalog())
        self.action_types = action_types
        self.settings = settings or ActionSettings()
        self.targets = targets(qemu_versions, self.catalog)
        self._names: dict[str, Location] = {}

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
        ctx = RuleScope(name or "?", [], [])
        ctx.events = self._events(node, ctx.event_locations)
        cond = None
        if "when" in node:
            cond = self.condition(node["when"], node.loc("when"), ctx)
        actions = self._actions(node, name or "?")
        throttle = self._throttle(node, ctx) if "throttle" in node else None
        threshold = self._threshold(node, ctx) if "threshold" in node else None
        correlation = self._correlation(node, threshold is not None)
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
        rule = Rule(
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
            correlation=correlation,
            mode=mode,
            enabled=enabled,
            event_locations=tuple(ctx.event_locations),
            fields=tuple(ctx.fields),
        )
        problems = release_problems(rule, self.targets, self.catalog)
        self.diagnostics.extend(problems)
        return None if any(d.severity == "error" for d in problems) else rule

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

    def _correlation(self, node: MarkedDict, has_threshold: bool) -> Correlation | None:
        kinds = [k for k in CORRELATION_KINDS if k in node]
        if not kinds:
            return None
        if len(kinds) > 1:
            self.error(node.key_loc(kinds[1]), "a rule has 'absent' or 'followed_by', not both")
            return None
        kind: CorrelationKind = "absent" if kinds[0] == "absent" else "followed_by"
        if has_threshold:
            self.error(node.key_loc(kind), f"'{kind}' cannot be used with 'threshold'")
        spec = node[kind]
        if not isinstance(spec, MarkedDict):
            self.error(node.loc(kind), f"'{kind}:' is a mapping: {{on, when, within, key}}")
            return None
        self._unknown_keys(spec, CORRELATION_KEYS, kind)
        scope = RuleScope(f"{kind} of {node.get('name')}", [], [])
        scope.events = self._events(spec, scope.event_locations, kind)
        cond = self.condition(spec["when"], spec.loc("when"), scope) if "when" in spec else None
        key = self._keys(spec, scope)
        self._check_fields(scope)
        if "within" not in spec:
            self.error(spec.location, f"'{kind}' needs 'within', a duration like 60s")
            return None
        within = self._duration(spec["within"], spec.loc("within"))
        if within <= 0:
            self.error(spec.loc("within"), "within must be longer than zero")
        return Correlation(
            kind=kind,
            events=tuple(scope.events),
            within=within,
            key=key,
            condition=C.compile_predicate(cond) if cond is not None else None,
            explain=partial(C.explain, cond) if cond is not None else None,
        )

    def _events(
        self, node: MarkedDict, locations: list[Location], what: str = "a rule"
    ) -> list[str]:
        if "on" not in node:
            self.error(node.location, f"{what} needs 'on:' (an event name, a list or a glob)")
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
            locations.append(where)
        return events

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


def rule_files(paths: Sequence[Path]) -> list[Path]:
    """The rule files named: files as given, directories searched for *.yaml / *.yml.

    In a directory, ``*_test.yaml`` files are rule tests (``qmp-reactor test``), not rules.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.suffix in (".yaml", ".yml") and not p.stem.endswith("_test")
                )
            )
        else:
            found.append(path)
    return found


def load_rules(
    paths: Sequence[Path],
    *,
    action_types: Mapping[str, ActionType] | None = None,
    settings: ActionSettings | None = None,
    catalog: Catalog | None = None,
    qemu_versions: Sequence[str] = (),
) -> tuple[RuleSet, list[Diagnostic]]:
    """Compile every rule file under ``paths``; returns the rules and all diagnostics.

    ``qemu_versions``: the QEMU releases the rules must work with (``check --qemu``).
    """
    compiler = Compiler(
        catalog=catalog, action_types=action_types, settings=settings, qemu_versions=qemu_versions
    )
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
    found = [Diagnostic(rule.location, message, "warning")] if message else []
    found += [Diagnostic(loc, text, "warning") for loc, text in destination_warnings(rule)]
    return found


def require_rules(paths: Sequence[Path], **kwargs: Any) -> tuple[RuleSet, list[Diagnostic]]:
    """Like ``load_rules`` but raises RuleError (with all diagnostics) on any error."""
    ruleset, diags = load_rules(paths, **kwargs)
    if any(d.severity == "error" for d in diags):
        raise RuleError("invalid rules", diags)
    return ruleset, diags
