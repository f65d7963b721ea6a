"""Generated routes: one Python function per event name taking an envelope through its rules.

For each event name, the conditions of all its candidate rules (``RuleSet.candidates``)
are compiled into one function that reads each plain path once and inlines the
tests, so the hot path makes no call per rule and no list per path. The same
function first offers the event to correlated rules as a follower, and for an
event QEMU's stage throttles, asks the stage to admit it (the engine's
``--explain`` path, which does each step by itself, is the reference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reactor.model import Envelope, Firing, Rule
from reactor.rules.conditions import SourceBuilder, generated_code

Route = Callable[[Envelope], None]


def compile_route(
    rules: tuple[Rule, ...],
    now: Callable[[], float],
    sink: Callable[[Firing], object],
    gates: Mapping[str, Callable[[Envelope], object]],
    *,
    follow: Sequence[Callable[[Envelope], object]] = (),
    admit: Callable[[Envelope], bool] | None = None,
) -> Route:
    """One generated function taking an envelope through ``rules`` in file order.

    Each rule whose condition holds goes to its gate (``gates[rule.name]``, for
    rules with a threshold or throttle) or straight to ``sink`` as a ``Firing``
    with ``count`` 1 at ``now()``: no list is built, no call made for a rule
    that does not match. Before the rules, the envelope is offered to each of
    ``follow`` (correlated rules' pending firsts); before that, with ``admit``,
    an envelope it holds back goes no further. With nothing to do: ``ignore``.
    """
    if not rules and not follow:
        return ignore
    names: dict[str, Any] = {"SINK": sink, "FIRING": Firing, "NOW": now, "ADMIT": admit}
    names.update((f"GATE{i}", gates[r.name]) for i, r in enumerate(rules) if r.name in gates)
    names.update((f"FOLLOW{i}", f) for i, f in enumerate(follow))
    head = [f"FOLLOW{i}(env)" for i in range(len(follow))]
    if admit is not None:
        head.insert(0, "if not ADMIT(env):\n        return None")

    def action(i: int, rule: Rule) -> str:
        if rule.name in gates:
            return f"GATE{i}(env)"
        return f'SINK(FIRING(RULE{i}, env, NOW(), {{"count": 1}}))'

    fn: Route = _generate(rules, names, "\n    ".join(head), action, "None")
    return fn


def ignore(env: Envelope) -> None:
    """The route of an event that no rule takes."""


def _generate(
    rules: tuple[Rule, ...],
    names: dict[str, Any],
    head: str,
    action: Callable[[int, Rule], str],
    result: str,
) -> Any:
    """Compile ``def f(env)``: each plain path read once, ``head``, a test per rule, ``result``."""
    b = SourceBuilder()
    b.ns.update(names)
    body = [f"    {head}"] if head else []
    for i, rule in enumerate(rules):
        b.ns[f"RULE{i}"] = rule
        if rule.when is None:
            body.append(f"    {action(i, rule)}")
        else:
            body.append(f"    if {b.expr(rule.when)}:\n        {action(i, rule)}")
    src = b.function("def f(env):", [*body, f"    return {result}"])
    exec(generated_code(src, "<rules>"), b.ns)  # our own generated source only
    return b.ns["f"]
