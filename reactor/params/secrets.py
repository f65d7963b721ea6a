"""Secret references in action parameters, and keeping their values out of logs.

A rule author writes ``${env:NAME}`` or ``${file:PATH}`` inside a string
parameter. ``check`` only validates the syntax (and may warn that a variable is
unset, never printing a value); the value is read at run time, when the
parameter is rendered. References are found in the rule's own text only:
``reactor.params.templates`` rewrites each into a call before compiling, so a guest
that writes ``${env:SECRET}`` into an event field gets it back literally.

Every value read is remembered by the resolver's ``Redactor``; logs and error
messages go through it, so the value shows as ``***``. A redactor belongs to
whoever renders and logs (a ``Reactor`` makes one and passes it to its
renderer, its dispatcher, the actions and the log filter); there is no
process-wide one, so a fresh reactor starts with nothing to mask.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from reactor.errors import PermanentActionError

REFERENCE = re.compile(r"\$\{(?P<kind>[A-Za-z_][A-Za-z0-9_]*):(?P<ref>[^}]*)\}")
KINDS = ("env", "file")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MASK = "***"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """One ``${kind:ref}`` reference and where it sits in its string."""

    kind: str
    ref: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"${{{self.kind}:{self.ref}}}"


def find_references(text: str) -> list[SecretRef]:
    """Every ``${kind:ref}`` in ``text``, well-formed or not, in order."""
    return [SecretRef(m["kind"], m["ref"], m.start(), m.end()) for m in REFERENCE.finditer(text)]


def reference_problem(ref: SecretRef) -> str | None:
    """Why ``ref`` is malformed, or None when it is a valid reference."""
    if ref.kind not in KINDS:
        return f"unknown secret reference {ref}: use ${{env:NAME}} or ${{file:PATH}}"
    if ref.kind == "env" and not ENV_NAME.fullmatch(ref.ref):
        return f"secret reference {ref}: {ref.ref!r} is not an environment variable name"
    if ref.kind == "file" and not ref.ref.strip():
        return f"secret reference {ref} names no file"
    return None


def reference_warning(ref: SecretRef, environ: Mapping[str, str] | None = None) -> str | None:
    """A warning for a valid reference that would fail now (unset variable); never a value."""
    env = os.environ if environ is None else environ
    if ref.kind == "env" and ref.ref not in env:
        return f"environment variable {ref.ref} of {ref} is not set"
    return None


def secret_warnings(
    params: Any, environ: Mapping[str, str] | None = None, path: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], str]]:
    """``(path, warning)`` for each reference in a nested ``with:`` that would fail now."""
    if isinstance(params, str):
        found = (reference_warning(ref, environ) for ref in find_references(params))
        return [(path, warning) for warning in found if warning]
    if isinstance(params, Mapping):
        items: Any = params.items()
    elif isinstance(params, list | tuple):
        items = enumerate(params)
    else:
        return []
    return [w for key, item in items for w in secret_warnings(item, environ, (*path, key))]


class Redactor:
    """Remembers secret values and masks them in any text; safe across threads."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._ordered: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        """Remember ``value`` and the forms it takes escaped (empty strings would mask everything).

        A receiver that echoes a secret back in a JSON error body, a URL or a
        ``repr`` escapes its quotes and backslashes: those forms are masked too.
        """
        if not value or value in self._values:
            return
        with self._lock:
            self._values.update(escaped_forms(value))
            # Longest first, so a secret that contains another is masked whole.
            self._ordered = tuple(sorted(self._values, key=len, reverse=True))

    def redact(self, text: str) -> str:
        """``text`` with every remembered value replaced by ``***``."""
        for value in self._ordered:
            if value in text:
                text = text.replace(value, MASK)
        return text


def escaped_forms(value: str) -> set[str]:
    """``value`` as it is and as JSON, a URL (path or form) and Python's ``repr`` write it."""
    forms = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote(value),
        quote(value, safe="!$&'()*+,;=:@/?"),  # a query's form: reserved characters kept
        quote_plus(value),
        repr(value)[1:-1],
    }
    forms.discard("")
    return forms


class SecretResolver:
    """Reads referenced secrets at run time and hands each value to its redactor.

    Without ``redactor`` the resolver makes one of its own (``self.redactor``).
    """

    def __init__(
        self, redactor: Redactor | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.redactor = Redactor() if redactor is None else redactor
        self.environ = environ

    def resolve(self, kind: str, ref: str) -> str:
        """The value of ``${kind:ref}``; PermanentActionError names the reference, never a value."""
        text = f"${{{kind}:{ref}}}"
        if kind == "env":
            env = os.environ if self.environ is None else self.environ
            if ref not in env:
                raise PermanentActionError(f"secret {text}: environment variable is not set")
            value = env[ref]
        elif kind == "file":
            value = self._read_file(text, Path(ref).expanduser())
        else:
            raise PermanentActionError(f"secret {text}: unknown kind {kind!r}")
        self.redactor.add(value)
        return value

    @staticmethod
    def _read_file(text: str, path: Path) -> str:
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = (
                err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            )
            raise PermanentActionError(f"secret {text}: cannot read file: {reason}") from err
        return value.removesuffix("\n")


class RedactingFilter(logging.Filter):
    """A logging filter that masks ``redactor``'s secrets in each record's final message."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message, mask it, and keep the record."""
        message = record.getMessage()
        masked = self.redactor.redact(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        return True
