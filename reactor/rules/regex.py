"""The ``matches`` operator's regular expressions: RE2, linear in the text's length.

A guest writes the strings ``matches`` reads, so a backtracking engine would
let it stall the event loop for everyone (``^(a+)+$`` against 28 characters
took 4.4 s in Python's ``re``, doubling with each more). Patterns are compiled
by RE2 (``google-re2``), whose matching time grows linearly with the text,
whatever the pattern. A pattern RE2 cannot express (backreferences,
lookaround, possessive or atomic groups) is an error located at the pattern;
there is no backtracking fallback. Matching keeps ``search`` semantics: the
pattern may match anywhere unless anchored.

RE2's classes are ASCII (``\\d``, ``\\w``, ``\\s``, ``\\b``; use ``\\p{L}``,
``\\p{Nd}`` for Unicode) and ``$`` matches only at the very end (Python's also
before a final newline).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import re2

Search = Callable[[str], Any]

MAX_MEMORY = 8 << 20
"""RE2's memory budget for one compiled pattern; a larger one is an error at load."""


class RegexError(ValueError):
    """A pattern RE2 cannot compile; the message says why."""


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # the error is ours to report, located, not RE2's on stderr
    options.max_mem = MAX_MEMORY
    return options


def compile_search(pattern: str) -> Search:
    """The ``search`` of ``pattern``: a match object or None, in linear time.

    RE2 compiles every pattern (its syntax is the contract). A pattern without
    any repeat, flag, class escape or ``$`` (``^web-``, ``error|fail``) is then
    matched by Python's ``re``, which means the same thing for it, costs at
    most the pattern's length per position of the text, and is many times
    faster per call than the RE2 binding; ``re2_search`` is its slow twin.
    """
    search = re2_search(pattern)
    if _plain_pattern(pattern):
        fast: Search = re.compile(pattern).search
        return fast
    return search


def re2_search(pattern: str) -> Search:
    """The ``search`` of ``pattern`` compiled by RE2; RegexError if RE2 cannot take it."""
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as err:
        raise RegexError(_reason(err)) from None
    search: Search = compiled.search
    return search


def _plain_pattern(pattern: str) -> bool:
    """Whether ``pattern`` is literals, ``.``, plain sets, groups, ``|`` and ``^``/``\\A`` only."""
    try:
        parsed = _parser.parse(pattern)
    except (re.error, OverflowError, RecursionError):
        return False
    return parsed.state.flags == re.UNICODE and _plain(parsed)


def _plain(items: Any) -> bool:
    for op, arg in items:
        if op in _PLAIN_OPS:
            continue
        if op is _parser.AT and arg in _PLAIN_ANCHORS:
            continue
        if op is _parser.IN and all(o in _PLAIN_SET_OPS for o, _ in arg):
            continue
        if op is _parser.SUBPATTERN and arg[1] == arg[2] == 0 and _plain(arg[3]):
            continue
        if op is _parser.BRANCH and all(_plain(branch) for branch in arg[1]):
            continue
        return False
    return True


def _reason(err: Exception) -> str:
    text = err.args[0] if err.args else str(err)
    reason = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    if reason.startswith(("invalid perl operator: (?=", "invalid perl operator: (?!")):
        reason += " (RE2 has no lookahead)"
    elif reason.startswith(("invalid perl operator: (?<", "invalid perl operator: (?>")):
        reason += " (RE2 has no lookbehind or atomic groups)"
    elif re.match(r"invalid escape sequence: \\[1-9]", reason):
        reason += " (RE2 has no backreferences)"
    return reason


def nested_quantifier(pattern: str) -> bool:
    """Whether an unbounded repeat holds nothing but repeats, one unbounded (``(a+)+``).

    Harmless to RE2, but exponential in backtracking engines (one text splits
    into the iterations in exponentially many ways): worth simplifying, and no
    pattern to hand to another tool. ``(\\d+\\.)+`` is not flagged (the dot
    separates the iterations). Patterns Python's parser does not read (RE2-only
    syntax) are not examined.
    """
    try:
        parsed = _parser.parse(pattern)
    except (re.error, OverflowError, RecursionError):
        return False
    return _has_nested(parsed)


_parser: Any = re._parser  # type: ignore[attr-defined]
_REPEATS = {_parser.MAX_REPEAT, _parser.MIN_REPEAT, _parser.POSSESSIVE_REPEAT}
_PLAIN_OPS = {_parser.LITERAL, _parser.NOT_LITERAL, _parser.ANY}
_PLAIN_ANCHORS = {_parser.AT_BEGINNING, _parser.AT_BEGINNING_STRING}
_PLAIN_SET_OPS = {_parser.LITERAL, _parser.RANGE, _parser.NEGATE}


def _unbounded(arg: Any) -> bool:
    return arg[1] is _parser.MAXREPEAT


def _children(op: Any, arg: Any) -> list[Any]:
    if op in _REPEATS:
        return [arg[2]]
    if op is _parser.SUBPATTERN:
        return [arg[-1]]
    if op is _parser.BRANCH:
        return list(arg[1])
    return []


def _only_repeats(items: Any) -> tuple[bool, bool]:
    """(every part of ``items`` is a repeat or a group of them, one of them is unbounded).

    An alternation counts as such a part when one of its alternatives does.
    """
    unbounded = False
    for op, arg in items:
        if op in _REPEATS:
            unbounded = unbounded or _unbounded(arg)
            continue
        if op is _parser.SUBPATTERN:
            only, inner = _only_repeats(arg[-1])
        elif op is _parser.BRANCH:  # one ambiguous alternative is enough: (a|b+)+
            only = inner = any(all(_only_repeats(branch)) for branch in arg[1])
        else:
            return False, False
        if not only:
            return False, False
        unbounded = unbounded or inner
    return True, unbounded


def _has_nested(items: Any) -> bool:
    for op, arg in items:
        if op in _REPEATS and _unbounded(arg) and all(_only_repeats(arg[2])):
            return True
        if any(_has_nested(child) for child in _children(op, arg)):
            return True
    return False
