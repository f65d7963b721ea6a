"""Unit tests for rule files (``qmp-reactor test``), run on the replay's virtual clock.

A test file (``*_test.yaml``) names rule files and, optionally, a configuration
(paths relative to the test file), then a list of tests. Each test feeds events
(inline, with ``at`` offsets from the first event, or an ``events_file`` of QMP
JSON lines) through a replay and compares the firings, one per action as
``replay`` prints them, with ``expect``: as multisets, every expected item must
match a distinct firing and no firing may be left over. An expected item gives
``rule`` and optionally ``action``, ``vm``, ``event``, ``seq``, ``at`` (matched
within 1 ms) and ``with`` (a subset of the rendered parameters; secrets render
as ``MASK``). A test may list ``silences`` (``vm``, ``rule``, ``event`` globs,
``at`` and ``for`` relative to the first event), applied as a sidecar would.

Mistakes in a test file are a ``RuleError`` with located diagnostics, like a
rule file's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reactor.dispatch.silences import Silence, SilenceFilter
from reactor.durations import parse_duration
from reactor.engine.replay import ReplayInput, parse_event, replay
from reactor.errors import Diagnostic, Location, RuleError
from reactor.model import Firing
from reactor.params.secrets import SecretResolver
from reactor.params.templates import compile_params, template_variables
from reactor.plugins.api import ActionType
from reactor.rules.compiler import load_rules
from reactor.rules.yamlload import MarkedDict, MarkedList, load_file, plain
from reactor.service.config import Config, load_config

MASK = "********"
"""What a secret reference renders as in a test."""

BASE_TIME = 1_700_000_000.0
"""The time of an inline test's first event (``at: 0s``)."""

TOLERANCE = 0.001
FILE_KEYS = ("rule_files", "config", "tests")
TEST_KEYS = ("name", "vm", "events", "events_file", "silences", "expect")
SILENCE_KEYS = ("vm", "rule", "event", "at", "for", "comment")
EVENT_KEYS = ("at", "event", "data", "vm")
EXPECT_KEYS = ("rule", "action", "vm", "event", "seq", "at", "with")


@dataclass(frozen=True)
class Fired:
    """One action of one firing, as ``replay`` prints it, with its rendered parameters."""

    rule: str
    action: str
    vm: str
    event: str
    seq: int
    at: float
    params: Mapping[str, Any]

    def show(self) -> str:
        """One readable line."""
        return (
            f"{{rule: {self.rule}, action: {self.action}, vm: {self.vm}, event: {self.event}, "
            f"seq: {self.seq}, at: {self.at:g}s}}"
        )


@dataclass(frozen=True)
class Expected:
    """One expected item, as written, with its place in the test file."""

    fields: Mapping[str, Any]
    location: Location

    def matches(self, fired: Fired) -> bool:
        """Whether ``fired`` has every field this item gives."""
        for key, want in self.fields.items():
            if key == "at":
                if abs(fired.at - want) > TOLERANCE:
                    return False
            elif key == "with":
                if not _subset(want, fired.params):
                    return False
            elif getattr(fired, key) != want:
                return False
        return True

    def show(self) -> str:
        """One readable line."""
        parts = [
            f"{k}: {json.dumps(v) if k == 'with' else _plain(k, v)}" for k, v in self.fields.items()
        ]
        return "{" + ", ".join(parts) + "}"


@dataclass
class RuleTest:
    """One test of a test file."""

    name: str
    location: Location
    inputs: list[ReplayInput]
    start: float | None
    expected: list[Expected]
    silences: list[tuple[Silence, float, float]] = field(default_factory=list)
    """Silences with their start and length relative to the first event."""


@dataclass
class Outcome:
    """How one test went: the expected items not found and the firings not expected."""

    test: RuleTest
    missing: list[Expected] = field(default_factory=list)
    unexpected: list[Fired] = field(default_factory=list)
    problems: list[Diagnostic] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No difference and no malformed event."""
        return not (self.missing or self.unexpected or self.problems)


@dataclass
class RuleTestFile:
    """A parsed test file: its rules, settings and tests."""

    path: Path
    rule_paths: list[Path]
    config: Path | None
    tests: list[RuleTest]


def find_test_files(paths: Iterable[Path]) -> list[Path]:
    """The test files named: files as given, directories searched for ``*_test.yaml``."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*_test.y*ml") if p.is_file()))
        else:
            found.append(path)
    return found


def parse_test_file(path: Path) -> RuleTestFile:
    """Read a test file; RuleError lists every problem, located."""
    problems: list[Diagnostic] = []
    try:
        doc = load_file(path)
    except RuleError as err:
        raise RuleError("invalid test file", err.diagnostics) from None
    where = Location(str(path), 1, 1)
    if not isinstance(doc, MarkedDict):
        raise RuleError("invalid test file", [Diagnostic(where, "a test file is a mapping")])
    parser = _Parser(path, problems)
    parser.unknown(doc, FILE_KEYS, "a test file")
    rule_paths = parser.paths(doc, "rule_files")
    config = parser.paths(doc, "config")
    tests = parser.tests(doc)
    if problems:
        raise RuleError("invalid test file", problems)
    return RuleTestFile(path, rule_paths, config[0] if config else None, tests)


class _Parser:
    def __init__(self, path: Path, problems: list[Diagnostic]) -> None:
        self.path = path
        self.problems = problems

    def error(self, loc: Location, message: str) -> None:
        self.problems.append(Diagnostic(loc, message))

    def unknown(self, node: MarkedDict, allowed: Sequence[str], what: str) -> None:
        for key in node:
            if key not in allowed:
                self.error(node.key_loc(key), f"unknown key {key!r} in {what}")

    def paths(self, doc: MarkedDict, key: str) -> list[Path]:
        raw = doc.get(key)
        if raw is None:
            if key == "rule_files":
                self.error(doc.location, "a test file needs 'rule_files:', a list of paths")
            return []
        items = list(raw) if isinstance(raw, MarkedList) else [raw]
        if not items or not all(isinstance(i, str) for i in items):
            self.error(doc.loc(key), f"'{key}:' is a path or a list of paths")
            return []
        return [self.path.parent / i for i in items]

    def tests(self, doc: MarkedDict) -> list[RuleTest]:
        raw = doc.get("tests")
        if not isinstance(raw, MarkedList):
            self.error(doc.loc("tests") if "tests" in doc else doc.location, "'tests:' is a list")
            return []
        found = [self.test(item, raw.loc(i)) for i, item in enumerate(raw)]
        return [t for t in found if t is not None]

    def test(self, node: Any, loc: Location) -> RuleTest | None:
        if not isinstance(node, MarkedDict):
            self.error(loc, "a test is a mapping with name, events and expect")
            return None
        self.unknown(node, TEST_KEYS, "a test")
        name = node.get("name")
        if not isinstance(name, str) or not name:
            self.error(node.loc("name") if "name" in node else loc, "a test needs a 'name'")
            name = "?"
        vm = node.get("vm", "vm1")
        if not isinstance(vm, str) or not vm:
            self.error(node.loc("vm"), "'vm' is a VM name")
            vm = "vm1"
        inputs, start = self.events(node, name, vm, loc)
        if "expect" not in node or not isinstance(node["expect"], MarkedList):
            where = node.loc("expect") if "expect" in node else loc
            self.error(where, "a test needs 'expect:', a list ([] when nothing fires)")
            return None
        expect = node["expect"]
        expected = [self.expected(e, expect.loc(i)) for i, e in enumerate(expect)]
        silences = self.silences(node) if "silences" in node else []
        found = [e for e in expected if e is not None]
        return RuleTest(name, loc, inputs, start, found, silences)

    def silences(self, node: MarkedDict) -> list[tuple[Silence, float, float]]:
        raw = node["silences"]
        if not isinstance(raw, MarkedList):
            self.error(node.loc("silences"), "'silences:' is a list of {vm, rule, event, at, for}")
            return []
        found = []
        for i, item in enumerate(raw):
            if not isinstance(item, MarkedDict):
                self.error(raw.loc(i), "a silence is a mapping: {vm, rule, event, at, for}")
                continue
            self.unknown(item, SILENCE_KEYS, "a silence")
            globs = {k: item.get(k, "*") for k in ("vm", "rule", "event")}
            if not all(isinstance(v, str) for v in globs.values()):
                self.error(raw.loc(i), "a silence's vm, rule and event are names or globs")
                continue
            at = self.duration(item, "at", raw.loc(i)) if "at" in item else 0.0
            length = self.duration(item, "for", raw.loc(i)) if "for" in item else float("inf")
            silence = Silence(f"test-{i + 1}", globs["vm"], globs["rule"], globs["event"])
            found.append((silence, at, length))
        return found

    def events(
        self, node: MarkedDict, name: str, vm: str, loc: Location
    ) -> tuple[list[ReplayInput], float | None]:
        if ("events" in node) == ("events_file" in node):
            self.error(loc, "a test has either 'events:' or 'events_file:'")
            return [], None
        if "events_file" in node:
            file = node["events_file"]
            if not isinstance(file, str):
                self.error(node.loc("events_file"), "'events_file' is a path")
                return [], None
            target = self.path.parent / file
            try:
                lines = target.read_text("utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                self.error(node.loc("events_file"), f"cannot read {target}: {err}")
                return [], None
            return [ReplayInput(str(target), lines, vm)], None
        raw = node["events"]
        if not isinstance(raw, MarkedList):
            self.error(node.loc("events"), "'events:' is a list of {at, event, data}")
            return [], None
        lines = [self.event(e, raw.loc(i), vm) for i, e in enumerate(raw)]
        return [ReplayInput(f"{name} (inline)", [x for x in lines if x], vm)], BASE_TIME

    def event(self, node: Any, loc: Location, vm: str) -> str:
        if not isinstance(node, MarkedDict):
            self.error(loc, "an event is a mapping: {at, event, data}")
            return ""
        self.unknown(node, EVENT_KEYS, "an event")
        name = node.get("event")
        if not isinstance(name, str) or not name:
            self.error(node.loc("event") if "event" in node else loc, "an event needs 'event'")
            return ""
        at = self.duration(node, "at", loc) if "at" in node else 0.0
        data = plain(node.get("data", {}))
        if not isinstance(data, dict):
            self.error(node.loc("data"), "'data' is a mapping")
            return ""
        when = BASE_TIME + at
        seconds = int(when)
        stamp = {"seconds": seconds, "microseconds": round((when - seconds) * 1e6)}
        doc = {"timestamp": stamp, "event": name, "data": data, "vm": node.get("vm", vm)}
        return json.dumps(doc)

    def duration(self, node: MarkedDict, key: str, loc: Location) -> float:
        try:
            value = parse_duration(node[key])
        except ValueError as err:
            self.error(node.loc(key), str(err))
            return 0.0
        if value < 0:
            self.error(node.loc(key), f"'{key}' cannot be negative")
        return value

    def expected(self, node: Any, loc: Location) -> Expected | None:
        if not isinstance(node, MarkedDict):
            self.error(loc, "an expected firing is a mapping: {rule, action, at, with, ...}")
            return None
        self.unknown(node, EXPECT_KEYS, "an expected firing")
        if not isinstance(node.get("rule"), str):
            self.error(
                node.loc("rule") if "rule" in node else loc, "an expected firing needs 'rule'"
            )
            return None
        fields: dict[str, Any] = {}
        for key in EXPECT_KEYS:
            if key not in node:
                continue
            value = plain(node[key])
            if key == "at":
                value = self.duration(node, key, loc)
            elif key == "seq" and type(value) is not int:
                self.error(node.loc(key), "'seq' is a whole number")
            elif key == "with" and not isinstance(value, dict):
                self.error(node.loc(key), "'with' is a mapping of parameters")
            elif key not in ("seq", "with") and not isinstance(value, str):
                self.error(node.loc(key), f"'{key}' is text")
            fields[key] = value
        return Expected(fields, loc)


class _Masked(SecretResolver):
    """Secrets in a test render as ``MASK``: tests never read real secrets."""

    def resolve(self, kind: str, ref: str) -> str:
        return MASK


def run_file(test_file: RuleTestFile, action_types: Mapping[str, ActionType]) -> list[Outcome]:
    """Run every test of a parsed file; RuleError/ConfigError when its rules do not load."""
    config = load_config(test_file.config)
    ruleset, diags = load_rules(
        test_file.rule_paths, action_types=action_types, settings=config.actions.settings()
    )
    if any(d.severity == "error" for d in diags):
        raise RuleError("invalid rules", diags)
    return [_run(test, ruleset, config) for test in test_file.tests]


def _run(test: RuleTest, ruleset: Any, config: Config) -> Outcome:
    start = test.start if test.start is not None else _first_time(test.inputs)
    silences = [
        replace(s, starts=start + at, ends=start + at + length) for s, at, length in test.silences
    ]
    firings: list[Firing] = []
    sink = SilenceFilter(silences, now=lambda firing: firing.time).wrap(firings.append)
    result = replay(
        test.inputs,
        ruleset,
        sink=sink,
        qemu_stage=config.qemu_stage,
        collect=False,
        labels=config.labels_of,
    )
    fired = [one for f in firings for one in _per_action(f, start)]
    missing, unexpected = _compare(test.expected, fired)
    return Outcome(test, missing, unexpected, list(result.problems))


def _first_time(inputs: list[ReplayInput]) -> float:
    """The time of the first event the replay reads (``at`` counts from it)."""
    for inp in inputs:
        for line in inp.lines:
            try:
                return float(parse_event(line, inp.vm)["received_at"])
            except ValueError:
                continue
    return 0.0


def _per_action(firing: Firing, start: float) -> list[Fired]:
    env = firing.envelope
    out = []
    for spec in firing.rule.actions:
        variables = template_variables(
            env, rule=firing.rule.name, context=firing.context, now=firing.time
        )
        try:
            params = compile_params(spec.params).render(variables, secrets=_Masked())
        except Exception as err:  # a template that fails to render is shown, not raised
            params = {"error": str(err)}
        out.append(
            Fired(
                firing.rule.name,
                spec.type,
                str(env.get("vm")),
                str(env.get("event")),
                int(env.get("seq", 0)),
                round(firing.time - start, 6),
                params,
            )
        )
    return out


def _compare(expected: list[Expected], fired: list[Fired]) -> tuple[list[Expected], list[Fired]]:
    """A maximum matching of expected items to distinct firings (augmenting paths)."""
    owner: dict[int, int] = {}  # firing index -> expected index

    def place(e: int, seen: set[int]) -> bool:
        for f, one in enumerate(fired):
            if f in seen or not expected[e].matches(one):
                continue
            seen.add(f)
            if f not in owner or place(owner[f], seen):
                owner[f] = e
                return True
        return False

    placed = {e for e in range(len(expected)) if place(e, set())}
    missing = [x for i, x in enumerate(expected) if i not in placed]
    unexpected = [x for i, x in enumerate(fired) if i not in owner]
    return missing, unexpected


def _subset(want: Any, have: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, Mapping) and all(
            k in have and _subset(v, have[k]) for k, v in want.items()
        )
    return bool(want == have)


def _plain(key: str, value: Any) -> str:
    return f"{value:g}s" if key == "at" else str(value)
