"""YAML loading that remembers where every value came from.

Rule and configuration files are read into ``MarkedDict`` / ``MarkedList``,
plain containers that also hold the 1-based line and column of each key and
value, so every later error can say ``FILE:LINE:COL``. Two YAML 1.1 quirks are
handled here: an unquoted ``on:`` key (read by PyYAML as the boolean True) is
the string ``"on"``, and a duplicate key is an error instead of a silent overwrite.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reactor.errors import Diagnostic, Location, RuleError
from reactor.rules.yamllimits import MAX_FILE_BYTES, check_shape, check_size

_BOOL_WORDS = {"on", "off", "yes", "no", "y", "n", "true", "false"}


class MarkedDict(dict[Any, Any]):
    """A mapping that knows where it, each key and each value start."""

    location: Location
    key_locations: dict[Any, Location]
    value_locations: dict[Any, Location]

    def loc(self, key: Any | None = None) -> Location:
        """Where the value of ``key`` starts, or the mapping itself."""
        if key is None:
            return self.location
        return self.value_locations.get(key, self.location)

    def key_loc(self, key: Any) -> Location:
        """Where ``key`` itself is written."""
        return self.key_locations.get(key, self.location)


class MarkedList(list[Any]):
    """A sequence that knows where it and each item start."""

    location: Location
    item_locations: list[Location]

    def loc(self, index: int | None = None) -> Location:
        """Where item ``index`` starts, or the sequence itself."""
        if index is None or index >= len(self.item_locations):
            return self.location
        return self.item_locations[index]


class _Unsure(Exception):
    """The fast parser met something whose location it may place differently."""


class _Marking(yaml.constructor.SafeConstructor):
    """Constructors of marked containers, for either loader below."""

    filename = "<string>"
    fast = False

    def _check(self, node: Node) -> None:
        # libyaml places some empty values (an implicit null) a column apart from PyYAML.
        if self.fast and isinstance(node, ScalarNode) and node.value == "" and not node.style:
            raise _Unsure

    def _loc(self, node: Node) -> Location:
        return Location(self.filename, node.start_mark.line + 1, node.start_mark.column + 1)

    def construct_marked_mapping(self, node: MappingNode) -> MarkedDict:
        self.flatten_mapping(node)
        result = MarkedDict()
        result.location = self._loc(node)
        result.key_locations = {}
        result.value_locations = {}
        for key_node, value_node in node.value:
            self._check(key_node)
            self._check(value_node)
            key = self.construct_object(key_node, deep=True)
            scalar = isinstance(key_node, ScalarNode)
            if isinstance(key, bool) and scalar and key_node.value.lower() in _BOOL_WORDS:
                key = key_node.value.lower()  # `on:` is a key, not True
            if not isinstance(key, str | int | float | bool | None):
                raise RuleError(
                    "bad key",
                    [Diagnostic(self._loc(key_node), "a mapping key must be a plain value")],
                )
            if key in result:
                raise RuleError(
                    "duplicate key",
                    [Diagnostic(self._loc(key_node), f"duplicate key '{key}'")],
                )
            result[key] = self.construct_object(value_node, deep=True)
            result.key_locations[key] = self._loc(key_node)
            result.value_locations[key] = self._loc(value_node)
        return result

    def construct_marked_sequence(self, node: SequenceNode) -> MarkedList:
        for child in node.value:
            self._check(child)
        result = MarkedList(self.construct_object(child, deep=True) for child in node.value)
        result.location = self._loc(node)
        result.item_locations = [self._loc(child) for child in node.value]
        return result


class _MarkedLoader(_Marking, yaml.SafeLoader):
    """PyYAML's own SafeLoader, building marked containers: its errors are the ones we show."""


_FastLoader: Any = None
if getattr(yaml, "__with_libyaml__", False):

    class _CMarkedLoader(_Marking, yaml.CSafeLoader):
        """The same on libyaml's parser, several times faster; used when the text is valid."""

        fast = True

    _FastLoader = _CMarkedLoader


def _register(loader: Any) -> None:
    loader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Marking.construct_marked_mapping
    )
    loader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _Marking.construct_marked_sequence
    )


for _loader in (_MarkedLoader, _FastLoader):
    if _loader is not None:
        _register(_loader)

# Text libyaml reads exactly as PyYAML does, locations included (found by comparing the two
# on mutated rule files): ASCII without control characters, tabs or question marks.
_FAST_TEXT = re.compile(r"[\n\r\x20-\x3e\x40-\x7e]*\Z")


def _decode(data: bytes, filename: str) -> str:
    """UTF-8 text, or a RuleError pointing at the first byte that is not."""
    nul = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start
    else:
        if nul < 0:
            return text.removeprefix("\ufeff")
        bad = nul
    head = data[:bad]
    line = head.count(b"\n") + 1
    col = bad - (head.rfind(b"\n") + 1) + 1
    loc = Location(filename, line, col)
    raise RuleError("not text", [Diagnostic(loc, "not a text file (binary data or not UTF-8)")])


def load_text(text: str, filename: str) -> Any:
    """Parse YAML text into marked containers; syntax errors become a RuleError.

    libyaml parses when it is available; if it finds anything wrong, PyYAML's
    own parser reads the text again, so that every message and location are
    PyYAML's, whichever parser is installed. Text that nests too deep or whose
    aliases expand to too much is refused first (``reactor.rules.yamllimits``).
    """
    check_shape(text, filename)
    if _FastLoader is not None and _FAST_TEXT.match(text) is not None:
        fast = _FastLoader(text)
        fast.filename = filename
        try:
            return fast.get_single_data()
        except (yaml.YAMLError, RuleError, _Unsure):
            pass  # PyYAML reads it again below and says what is wrong, and where
        finally:
            fast.dispose()
    return _load_slowly(text, filename)


def _load_slowly(text: str, filename: str) -> Any:
    loader: _MarkedLoader | None = None
    try:
        # The reader checks the text as the loader is built: keep it inside the handler.
        loader = _MarkedLoader(text)
        loader.filename = filename
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        loc = Location(filename, mark.line + 1, mark.column + 1) if mark else Location(filename)
        problem = err.problem or err.context or "invalid YAML"
        raise RuleError("YAML syntax", [Diagnostic(loc, f"YAML syntax: {problem}")]) from err
    except yaml.YAMLError as err:
        diag = Diagnostic(Location(filename, 1, 1), f"YAML: {err}")
        raise RuleError("YAML", [diag]) from err
    finally:
        if loader is not None:
            loader.dispose()


def load_file(path: Path, display: str | None = None) -> Any:
    """Read and parse a YAML file; unreadable, binary, too big or invalid files raise RuleError."""
    name = display or str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
            size = os.fstat(f.fileno()).st_size if len(data) > MAX_FILE_BYTES else len(data)
    except OSError as err:
        diag = Diagnostic(Location(name), f"cannot read: {err.strerror or err}")
        raise RuleError("unreadable", [diag]) from err
    check_size(max(size, len(data)), data, name)
    return load_text(_decode(data, name), name)


def plain(value: Any) -> Any:
    """The same value with marked containers turned into plain dicts and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
