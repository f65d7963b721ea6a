"""Rule lints: warnings about rules that load but cannot do what they say.

These read compiled rules and the catalog only; ``check`` prints them and
``run`` logs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from reactor.model import Rule
from reactor.rules.catalog import Catalog

QEMU_RATE = 1.0
"""QEMU emits at most one event of a throttled kind per key per second (monitor/monitor.c)."""


def _secs(window: float) -> str:
    return f"{window:g}s"


def _normal_path(text: str) -> str:
    """``$['data']["node-name"]`` and ``$.data."node-name"`` spelled as ``$.data.node-name``."""
    text = re.sub(r"\[\s*(['\"])(.*?)\1\s*\]", r".\2", text.replace(" ", ""))
    return re.sub(r"\.\"(.*?)\"", r".\1", text)


def unreachable_threshold(rule: Rule, catalog: Catalog) -> str | None:
    """A warning if QEMU's rate limit keeps the rule's threshold from ever being reached.

    Only claimed when every event type the rule can match is rate-limited by QEMU
    and each threshold key holds events of one QEMU throttle state at most: the
    key includes ``$.vm`` and, for types QEMU keys by a ``data`` field, that field
    (``$.data.<field>``). A key of ``$.vm`` alone does not qualify for such types,
    since one VM with several devices can send one event per second per device.
    Event types add up unless the key includes ``$.event``.
    """
    threshold = rule.threshold
    if threshold is None:
        return None
    types = sorted({name for pattern in rule.events for name in catalog.expand(pattern)})
    keys = catalog.throttle_keys()
    if not types or any(t not in keys for t in types):
        return None
    paths = {_normal_path(p.text) for p in threshold.key}
    if "$.vm" not in paths:
        return None
    if any(keys[t] is not None and f"$.data.{keys[t]}" not in paths for t in types):
        return None
    # Emissions of one key are >= 1s apart, but a held event keeps its creation
    # timestamp, so replayed timestamps can be closer: ceil, not floor, + 1 bounds both.
    limit = math.ceil(threshold.window / QEMU_RATE) + 1
    if len(types) > 1 and "$.event" not in paths:
        limit *= len(types)
    if threshold.count <= limit:
        return None
    return _unreachable_message(threshold.count, threshold.window, limit, types, keys)


def _unreachable_message(
    count: int, window: float, limit: int, types: list[str], keys: Mapping[str, str | None]
) -> str:
    head = f"threshold count {count} can never be reached within {_secs(window)}"
    tail = f"(at most {limit} in {_secs(window)})"
    if len(types) == 1:
        per = keys[types[0]] or "VM"
        return f"{head}: QEMU rate-limits {types[0]} to one event per second per {per} {tail}"
    each = ", ".join(f"{t} (per {keys[t] or 'VM'})" for t in types)
    return f"{head}: QEMU rate-limits each of {each} to one event per second {tail}"
