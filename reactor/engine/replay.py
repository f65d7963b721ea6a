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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from reactor.clock import VirtualClock
from reactor.engine.core import Engine, Explain
from reactor.errors import Diagnostic, Location
from reactor.model import Envelope, Firing
from reactor.rules.ruleset import RuleSet


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
    if ts.__class__ is not dict:
        return None
    s, us = ts.get("seconds"), ts.get("microseconds")
    if s.__class__ is not int or us.__class__ is not int or s < 0 or not 0 <= us < 1_000_000:
        return None
    return s + us / 1e6


_NONE: Any = object()


def parse_event(line: str | bytes, default_vm: str) -> Envelope:
    """One JSON line into a partial envelope; raises ValueError with what is wrong."""
    return envelope_of(_loads(line), default_vm)


def _loads(line: str | bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"invalid JSON at column {err.colno}: {err.msg}") from err


def envelope_of(obj: Any, default_vm: str) -> Envelope:
    """A parsed line (``obj``) into a partial envelope; raises ValueError with what is wrong."""
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
    """What a replay saw: events read, firings (unless not collected), and the bad lines."""

    events: int = 0
    firings: list[Firing] = field(default_factory=list)
    problems: list[Diagnostic] = field(default_factory=list)


def _parsed(
    inp: ReplayInput, order: int, problems: list[Diagnostic]
) -> Iterator[tuple[float, int, int, Envelope]]:
    """(time, input order, line number, envelope) of each good line; bad ones are problems."""
    name, vm = inp.name, inp.vm
    for lineno, line in enumerate(inp.lines, 1):
        try:
            env = parse_event(line, vm)
        except ValueError as err:
            _problem(problems, inp, lineno, line, err)
            continue
        env["source"] = name
        yield env["received_at"], order, lineno, env


def _problem(
    problems: list[Diagnostic], inp: ReplayInput, lineno: int, line: str, err: ValueError
) -> None:
    # Blank lines are skipped: they are told apart only once they failed to parse.
    if line.strip():
        problems.append(Diagnostic(Location(inp.name, lineno), str(err)))


def _merged(inputs: list[ReplayInput], problems: list[Diagnostic]) -> Iterator[Envelope]:
    """Envelopes of several inputs by time, then input order, then line order."""
    streams = [_parsed(inp, order, problems) for order, inp in enumerate(inputs)]
    for _, _, _, env in heapq.merge(*streams, key=lambda i: i[:3]):
        yield env


def replay(
    inputs: list[ReplayInput],
    rules: RuleSet,
    *,
    sink: Callable[[Firing], None] | None = None,
    qemu_stage: bool = True,
    qemu_version: str | None = None,
    explain: Explain | None = None,
    observe: Callable[[Envelope], None] | None = None,
    collect: bool = True,
    labels: Callable[[str], Mapping[str, Any]] | None = None,
) -> ReplayResult:
    """Run ``inputs`` through ``rules`` on a virtual clock; firings go to ``sink``.

    The QEMU stage follows ``qemu_version`` for every VM when given; else each
    VM's REACTOR_CONNECTED in the input (as ``tail --json`` records it); else
    the catalog's newest release.

    With ``collect`` the result also keeps every firing; without it a replay's
    memory does not grow with its input (the firings only reach ``sink``).
    With ``labels`` each envelope carries its VM's labels, as a sidecar's do.
    """
    result = ReplayResult()
    clock = VirtualClock()
    engine = Engine(
        rules,
        clock,
        _firing_sink(result.firings, sink, collect),
        qemu_stage=qemu_stage,
        qemu_version=qemu_version,
        explain=explain,
        observe=observe,
    )
    feed = engine.feed if labels is None else _labelled(engine.feed, labels)
    if len(inputs) == 1:
        result.events = _feed_one(inputs[0], feed, clock, result.problems)
    else:
        result.events = _feed_merged(inputs, feed, clock, result.problems)
    clock.drain()
    return result


def _labelled(
    feed: Callable[[Envelope], None], labels: Callable[[str], Mapping[str, Any]]
) -> Callable[[Envelope], None]:
    """``feed`` with each envelope's ``labels`` set: its VM's, asked once per VM."""
    known: dict[str, Mapping[str, Any]] = {}

    def labelled(env: Envelope) -> None:
        vm = env["vm"]
        found = known.get(vm)
        if found is None:
            if len(known) >= _LABELLED_VMS:
                known.clear()
            found = known[vm] = labels(vm)
        env["labels"] = found
        feed(env)

    return labelled


_LABELLED_VMS = 65536
"""VMs whose labels a replay remembers at once (VM names come from the input)."""


def _feed_one(
    inp: ReplayInput,
    feed: Callable[[Envelope], None],
    clock: VirtualClock,
    problems: list[Diagnostic],
) -> int:
    """One input in file order: the common case, as one loop with no call per line to parse it.

    A line of exactly ``event``, ``data``, ``timestamp`` and ``vm`` (as a recording
    of many VMs has them) becomes its envelope here, checked as ``envelope_of`` checks
    it; any other line goes through ``envelope_of``, which is the reference
    (``tests/test_fast_paths.py`` holds both equal).
    """
    name, default_vm, advance, loads = inp.name, inp.vm, clock.advance, orjson.loads
    seq = 0
    for lineno, line in enumerate(inp.lines, 1):
        try:
            obj = loads(line)
        except orjson.JSONDecodeError:
            obj = _NONE
        event = None
        if obj.__class__ is dict and len(obj) == 4:
            try:
                event, data, ts, vm = obj["event"], obj["data"], obj["timestamp"], obj["vm"]
                s, us = ts["seconds"], ts["microseconds"]
            except (KeyError, TypeError):
                event = None
        if (
            event.__class__ is str
            and event
            and data.__class__ is dict
            and vm.__class__ is str
            and vm
            and ts.__class__ is dict
            and s.__class__ is int
            and us.__class__ is int
            and s >= 0
            and 0 <= us < 1_000_000
        ):
            seq += 1
            env: Envelope = {
                "event": event,
                "data": data,
                "timestamp": ts,
                "vm": vm,
                "host": "replay",
                "received_at": s + us / 1e6,
                "source": name,
                "seq": seq,
            }
        else:
            try:  # the JSON of a bad line is parsed again, for the message
                env = envelope_of(obj, default_vm) if obj is not _NONE else parse_event(line, "")
            except ValueError as err:
                _problem(problems, inp, lineno, line, err)
                continue
            seq += 1
            env["source"] = name
            env["seq"] = seq
        advance(env["received_at"])
        feed(env)
    return seq


def _feed_merged(
    inputs: list[ReplayInput],
    feed: Callable[[Envelope], None],
    clock: VirtualClock,
    problems: list[Diagnostic],
) -> int:
    seq = 0
    for env in _merged(inputs, problems):
        seq += 1
        env["seq"] = seq
        clock.advance(env["received_at"])
        feed(env)
    return seq


def _firing_sink(
    firings: list[Firing], sink: Callable[[Firing], None] | None, collect: bool
) -> Callable[[Firing], None]:
    if not collect:
        return sink if sink is not None else _discard
    if sink is None:
        return firings.append

    def both(firing: Firing) -> None:
        firings.append(firing)
        sink(firing)

    return both


def _discard(firing: Firing) -> None:
    pass


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


_TEXT_CACHE_LIMIT = 4096


def time_text(t: float) -> str:
    """``repr(round(t, 6))``, the dry run's time, by one fixed-point format when that is exact.

    ``f"{t:.6f}"`` rounds the exact value of ``t`` to 6 decimals as ``round`` does (half
    to even). For ``1 <= t < 2**32`` doubles are less than 1e-6 apart, so the double
    nearest that decimal has it, trailing zeros dropped, as its shortest repr.
    """
    if 1.0 <= t < 4294967296.0:
        text = f"{t:.6f}".rstrip("0")
        return text if text[-1] != "." else text + "0"
    return repr(round(t, 6))


class DryRunWriter:
    """Writes ``firing_lines`` as JSON text, fast: each rule's part is encoded once.

    VM and event names are encoded once too (a bounded cache: names come from peers),
    and so is the time that several firings of one event share.
    """

    def __init__(self, out: IO[str]) -> None:
        self.write = out.write
        self._parts: dict[int, tuple[str, ...]] = {}
        self._text: dict[str, str] = {}
        self._time = -1.0
        self._head = ""

    def _rule_parts(self, firing: Firing) -> tuple[str, ...]:
        rule = firing.rule
        name = _json_text(rule.name)
        parts = tuple(
            f', "rule": {name}, "action": {_json_text(a.type)}, "vm": ' for a in rule.actions
        )
        self._parts[id(rule)] = parts
        return parts

    def _encoded(self, name: str) -> str:
        text = self._text
        if len(text) >= _TEXT_CACHE_LIMIT:
            text.clear()
        found = text[name] = _json_text(name)
        return found

    def __call__(self, firing: Firing) -> None:
        env = firing.envelope
        text = self._text
        vm, event = env["vm"], env["event"]
        vm_text = text.get(vm) or self._encoded(vm)
        event_text = text.get(event) or self._encoded(event)
        if firing.time != self._time:
            self._time = firing.time
            self._head = f'{{"time": {time_text(firing.time)}'
        head = self._head
        tail = f'{vm_text}, "event": {event_text}, "seq": {env["seq"]}}}\n'
        for part in self._parts.get(id(firing.rule)) or self._rule_parts(firing):
            self.write(f"{head}{part}{tail}")
