"""What rules read of ``$.labels`` against the labels the configuration defines.

A rule that reads ``$.labels.tier`` while no ``vms:`` entry defines ``tier``
never sees a value there: most likely a typo. ``label_warnings`` says so, with
the rule's location and the closest defined name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Set
from typing import Any

from reactor.errors import Diagnostic
from reactor.model import Rule
from reactor.rules.conditions import Combo, Leaf
from reactor.rules.paths import plain_steps


def _paths(cond: Any) -> Iterator[str]:
    if isinstance(cond, Leaf):
        yield cond.path.text
    elif isinstance(cond, Combo):
        for part in cond.parts:
            yield from _paths(part)


def read_paths(rule: Rule) -> Iterator[str]:
    """The JSONPaths a rule reads in its condition and its keys."""
    yield from _paths(rule.when)
    for keyed in (rule.threshold, rule.throttle, rule.correlation):
        if keyed is not None:
            yield from (p.text for p in keyed.key)


def label_warnings(rules: list[Rule], defined: Set[str]) -> list[Diagnostic]:
    """A warning for each label a rule reads that no VM entry defines."""
    found = []
    for rule in rules:
        for path in dict.fromkeys(read_paths(rule)):
            steps = plain_steps(path)
            if not steps or len(steps) < 2 or steps[0] != "labels" or steps[1] in defined:
                continue
            close = difflib.get_close_matches(steps[1], sorted(defined), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            message = (
                f"rule {rule.name!r} reads {path}, but no VM in the configuration has the "
                f"label {steps[1]!r}{hint}"
            )
            found.append(Diagnostic(rule.location, message, "warning"))
    return found
