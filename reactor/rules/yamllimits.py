"""Limits on what a YAML file may make us build: size, nesting, and aliases expanded.

Rule and configuration files are read before anything else checks them, so
their shape alone must not exhaust the process: a 100 MB file, 50,000 nested
``[``, or a "billion laughs" (nine lines of anchors and aliases that expand to
10⁹ values) would cost minutes, gigabytes or a RecursionError. ``check_shape``
reads the file's parser events once, without building anything, and stops at
the first limit crossed with an error located there. Limits:

- ``MAX_FILE_BYTES``: the file's size;
- ``MAX_DEPTH``: nested mappings and sequences, aliases expanded in place;
- ``MAX_VALUES``: values (scalars, mappings, sequences) with every alias
  counted as the values it stands for; an alias inside its own anchor
  (a recursive structure) is an error too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
)

from reactor.errors import Diagnostic, Location, RuleError

MAX_FILE_BYTES = 2 << 20
MAX_DEPTH = 100
MAX_VALUES = 250_000


@dataclass
class _Frame:
    """An open collection: its anchor, its values so far (itself included), its height."""

    anchor: str | None
    values: int = 1
    height: int = 1


class _Shape:
    """The running totals of one scan: open collections, finished anchors, values so far."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, height)
        self.open_anchors: set[str] = set()
        self.total = 0

    def fail(self, event: Any, message: str) -> None:
        mark = event.start_mark
        loc = Location(self.filename, mark.line + 1, mark.column + 1)
        raise RuleError("YAML limit", [Diagnostic(loc, message)])

    def add(self, event: Any, values: int, height: int) -> None:
        """Count a value of ``values`` (aliases expanded) ``height`` levels high, open or not."""
        self.total += values
        if len(self.stack) + height > MAX_DEPTH:
            self.fail(event, f"nested deeper than {MAX_DEPTH} levels (the limit, aliases expanded)")
        if self.total > MAX_VALUES:
            self.fail(
                event,
                f"more than {MAX_VALUES} values with aliases expanded (the limit:"
                " a 'billion laughs' of aliases is refused)",
            )
        if self.stack:
            parent = self.stack[-1]
            parent.values += values
            parent.height = max(parent.height, height + 1)

    def event(self, event: Any) -> None:
        """Account for one parser event."""
        if isinstance(event, CollectionStartEvent):
            self.add(event, 1, 1)
            self.stack.append(_Frame(event.anchor))
            if event.anchor is not None:
                self.open_anchors.add(event.anchor)
        elif isinstance(event, SequenceEndEvent | MappingEndEvent):
            frame = self.stack.pop()
            if self.stack:  # its values were counted as they came; its height is known now
                parent = self.stack[-1]
                parent.values += frame.values - 1
                parent.height = max(parent.height, frame.height + 1)
            if frame.anchor is not None:
                self.open_anchors.discard(frame.anchor)
                self.anchors[frame.anchor] = (frame.values, frame.height)
        elif isinstance(event, ScalarEvent):
            if event.anchor is not None:
                self.anchors[event.anchor] = (1, 0)
            self.add(event, 1, 0)
        elif isinstance(event, AliasEvent):
            if event.anchor in self.open_anchors:
                self.fail(event, f"alias *{event.anchor} is inside its own anchor (recursive)")
            values, height = self.anchors.get(event.anchor or "", (1, 0))
            self.add(event, values, height)


def check_size(size: int, head: bytes, filename: str) -> None:
    """A RuleError at the byte where a file of ``size`` bytes passes ``MAX_FILE_BYTES``."""
    if size <= MAX_FILE_BYTES:
        return
    head = head[:MAX_FILE_BYTES]
    line = head.count(b"\n") + 1
    col = len(head) - (head.rfind(b"\n") + 1) + 1
    message = f"file of {size} bytes is larger than the limit of {MAX_FILE_BYTES >> 20} MiB"
    raise RuleError("too large", [Diagnostic(Location(filename, line, col), message)])


def check_shape(text: str, filename: str) -> None:
    """A located RuleError if ``text`` nests too deep or expands to too many values.

    Syntax errors are left to the loader, which reports them in its own words.
    """
    loaders: list[Any] = [yaml.SafeLoader]
    if getattr(yaml, "__with_libyaml__", False):
        loaders.insert(0, yaml.CSafeLoader)
    for loader in loaders:
        shape = _Shape(filename)
        try:
            for event in yaml.parse(text, Loader=loader):
                shape.event(event)
        except yaml.YAMLError:
            continue  # libyaml and PyYAML may disagree: the next one reads it too
        return
