"""Replay: recorded QMP events through the rules on a virtual clock.

Input is JSON lines, one QMP event each as QEMU sends it (``event``, ``data``,
``timestamp``), optionally with ``vm`` (default: the file's stem). The virtual
clock moves to each event's own timestamp and never goes back, so a replay is
instant and deterministic, and windows behave as they would have live.
Several inputs are interleaved by timestamp, each keeping its own order.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from reactor.clock import VirtualClock
from reactor.engine import Engine, Explain
from reactor.errors import Diagnostic, Location
from reactor.matcher import RuleSet
from reactor.model import Envelope, Firing


@dataclass
class ReplayInput:
    """One source of recorded events: a file, or ``-`` for standard input."""

    name: str
    lines: Iterable[str]
    vm: str


def open_inputs(names: Iterable[str], stdin: IO[str] | None = None) -> list[ReplayInput]:
    """The named inputs; ``-`` is standard input (VM name ``stdin``)."""
    inputs = []
    for name in names:
        if name == "-":
            inputs.append(ReplayInput("-", stdin or sys.stdin, "stdin"))
        else:
            path = Path(name)
            inputs.append(ReplayInput(name, _read_lines(path), path.stem))
    return inputs


def _read_lines(path: Path) -> Iterator[str]:
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        yield from fh


def event_time(ts: Any) -> float | None:
    """Seconds as a float from QEMU's ``{seconds, microseconds}``, or None if malformed."""
    if not isinstance(ts, dict):
        return None
    s, us = ts.get("seconds"), ts.get("microseconds")
    if type(s) is not int or type(us) is not int or s < 0 or not 0 <= us < 1_000_000:
        return None
    return s + us / 1e6


def parse_event(line: str, default_vm: str) -> Envelope:
    """One JSON line into a partial envelope; raises ValueError with what is wrong."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"invalid JSON at column {err.colno}: {err.msg}") from err
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object (one QMP event)")
    event = obj.get("event")
    if not isinstance(event, str) or not event:
        raise ValueError("missing 'event' (the QMP event name)")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise ValueError("'data' must be an object")
    when = event_time(obj.get("timestamp"))
    if when is None:
        raise ValueError("missing or invalid 'timestamp' {seconds, microseconds}")
    vm = obj.get("vm", default_vm)
    if not isinstance(vm, str) or not vm:
        raise ValueError("'vm' must be a non-empty string")
    env: Envelope = {
        "event": event,
        "data": data,
        "timestamp": obj["timestamp"],
        "vm": vm,
        "host": obj.get("host", "replay"),
        "received_at": when,
    }
    if isinstance(obj.get("caused_by"), dict):
        env["caused_by"] = obj["caused_by"]
    return env


@dataclass
class ReplayResult:
    """What a replay saw: events read, firings, and the bad lines."""

    events: int = 0
    firings: list[Firing] = field(default_factory=list)
    problems: list[Diagnostic] = field(default_factory=list)


def _events(
    inp: ReplayInput, order: int, problems: list[Diagnostic]
) -> Iterator[tuple[float, int, int, Envelope]]:
    for lineno, line in enumerate(inp.lines, 1):
        if not line.strip():
            continue
        try:
            env = parse_event(line, inp.vm)
        except ValueError as err:
            problems.append(Diagnostic(Location(inp.name, lineno), str(err)))
            continue
        env["source"] = inp.name
        yield env["received_at"], order, lineno, env


def replay(
    inputs: list[ReplayInput],
    rules: RuleSet,
    *,
    sink: Callable[[Firing], None] | None = None,
    qemu_stage: bool = True,
    explain: Explain | None = None,
    observe: Callable[[Envelope], None] | None = None,
) -> ReplayResult:
    """Run ``inputs`` through ``rules`` on a virtual clock; firings go to ``sink``."""
    result = ReplayResult()
    clock = VirtualClock()

    def collect(firing: Firing) -> None:
        result.firings.append(firing)
        if sink is not None:
            sink(firing)

    engine = Engine(rules, clock, collect, qemu_stage=qemu_stage, explain=explain, observe=observe)
    streams = [_events(inp, i, result.problems) for i, inp in enumerate(inputs)]
    merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=lambda i: i[:3])
    for _, _, _, env in merged:
        result.events += 1
        env["seq"] = result.events
        clock.advance(env["received_at"])
        engine.feed(env)
    clock.drain()
    return result


def firing_lines(firing: Firing) -> list[dict[str, Any]]:
    """The dry-run output of a firing: one object per action that would run."""
    env = firing.envelope
    base = {
        "time": round(firing.time, 6),
        "rule": firing.rule.name,
    }
    return [
        {**base, "action": a.type, "vm": env["vm"], "event": env["event"], "seq": env["seq"]}
        for a in firing.rule.actions
    ]


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


class DryRunWriter:
    """Writes ``firing_lines`` as JSON text, fast: each rule's part is encoded once."""

    def __init__(self, out: IO[str]) -> None:
        self.write = out.write
        self._parts: dict[int, tuple[str, ...]] = {}

    def _rule_parts(self, firing: Firing) -> tuple[str, ...]:
        rule = firing.rule
        parts = self._parts.get(id(rule))
        if parts is None:
            name = _json_text(rule.name)
            parts = tuple(
                f', "rule": {name}, "action": {_json_text(a.type)}, "vm": ' for a in rule.actions
            )
            self._parts[id(rule)] = parts
        return parts

    def __call__(self, firing: Firing) -> None:
        env = firing.envelope
        tail = (
            f'{_json_text(env["vm"])}, "event": {_json_text(env["event"])}, "seq": {env["seq"]}}}\n'
        )
        head = '{"time": ' + repr(round(firing.time, 6))
        for part in self._rule_parts(firing):
            self.write(head + part + tail)
