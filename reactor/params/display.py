"""Text for people: guest-controlled strings shown without their control characters.

A guest reaches many strings we show (``data.id``, a ``reason``, a device
path, an event name from a hostile peer). Written raw, a newline forges a log
line and an escape sequence drives the reader's terminal. ``escape`` writes
every character that could do either as a visible escape: C0 controls and DEL
as ``\\n``, ``\\r``, ``\\t`` or ``\\xNN``, C1 controls as ``\\xNN``, and the
Unicode line and paragraph separators and bidirectional overrides as ``\\uNNNN``.
Backslashes are left alone, so a shown ``\\n`` may also be one the guest typed;
the JSON log format is the unambiguous record.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Characters a terminal or a line-based log reader acts on instead of showing."""


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control, line-separator and bidi character written as an escape."""
    if UNSAFE.search(text) is None:
        return text
    return UNSAFE.sub(_escaped, text)


def escape_json(text: str) -> str:
    """JSON text with the unsafe characters a JSON encoder leaves raw (DEL, C1, U+2028...)
    written as ``\\uNNNN``; they can only occur inside JSON strings, so the JSON is unchanged.
    """
    if UNSAFE.search(text) is None:
        return text
    return UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
