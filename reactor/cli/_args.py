"""Argument parsing shared by the commands: path options that give back what they swallow.

An option that takes several paths (``--rules A B``) runs to the next option, so
``replay --rules r.yaml events.jsonl`` would leave ``replay`` without its
EVENTS. ``PathsOption`` is repeatable (``--rules A --rules B``) and remembers
its last use; a ``Positionals`` argument that came out empty takes the values
after the first of that last use, so both spellings mean what people type.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


class _Listing(argparse.Action):
    """Values that add to a list; ``last_use`` is how many the last use gave."""

    last_use: int = 0

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        given = list(values or ())
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *given])
        self.last_use = len(given)


class PathsOption(_Listing):
    """A repeatable option of one or more paths; every use adds to the list."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)

    def give_back(self, namespace: argparse.Namespace) -> list[str]:
        """The values after the first of the last use, taken off this option."""
        if self.last_use < 2:
            return []
        values: list[str] = getattr(namespace, self.dest)
        keep = len(values) - self.last_use + 1
        taken = values[keep:]
        del values[keep:]
        self.last_use = 1
        return taken


class Positionals(_Listing):
    """One or more positionals that a ``PathsOption`` before them may have swallowed."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, *, lender: str, **kwargs: Any
    ) -> None:
        super().__init__(option_strings, dest, nargs="*", **kwargs)
        self.lender = lender


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that settles ``Positionals`` after parsing."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        for action in self._actions:
            if isinstance(action, _Listing):
                action.last_use = 0
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if isinstance(action, Positionals):
                self._settle(action, parsed)
        return parsed, extras

    def _settle(self, wanted: Positionals, namespace: argparse.Namespace) -> None:
        if getattr(namespace, wanted.dest, None):
            return
        for action in self._actions:
            if isinstance(action, PathsOption) and action.dest == wanted.lender:
                setattr(namespace, wanted.dest, action.give_back(namespace))
        if not getattr(namespace, wanted.dest, None):
            self.error(f"the following arguments are required: {wanted.metavar or wanted.dest}")
