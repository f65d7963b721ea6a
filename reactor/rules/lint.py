"""Rule lints: warnings about rules that load but cannot do what they say.

These read compiled rules and the catalog only; ``check`` prints them and
``run`` logs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from reactor.durations import secs
from reactor.errors import Location
from reactor.model import Rule
from reactor.rules.catalog import Catalog

QEMU_RATE = 1.0
"""QEMU emits at most one event of a throttled kind per key per second (monitor/monitor.c)."""


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
    head = f"threshold count {count} can never be reached within {secs(window)}"
    tail = f"(at most {limit} in {secs(window)})"
    if len(types) == 1:
        per = keys[types[0]] or "VM"
        return f"{head}: QEMU rate-limits {types[0]} to one event per second per {per} {tail}"
    each = ", ".join(f"{t} (per {keys[t] or 'VM'})" for t in types)
    return f"{head}: QEMU rate-limits each of {each} to one event per second {tail}"


_MARKUP = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
_GUEST_VARIABLES = re.compile(r"\b(data|envelope)\b")
URL_PARAMS = ("url", "urls")
"""Action parameters that name where a request goes (webhook ``url``, notify ``urls``)."""


def guest_chosen_destination(url: str) -> str | None:
    """The template in ``url``'s scheme or host that reads event data, or None.

    Such a URL lets a guest (who writes the data) send our request anywhere: to
    a metadata service, a loopback admin port, a host on the management network.
    """
    parts: list[str] = []

    def mask(m: re.Match[str]) -> str:
        parts.append(m.group())
        return f"\x00{len(parts) - 1}\x00"

    masked = _MARKUP.sub(mask, url)
    scheme_end = masked.find("://")
    if scheme_end < 0:
        head = masked  # no literal scheme: a template may supply it, host and all
    else:
        rest = masked[scheme_end + 3 :]
        cut = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
        head = masked[: scheme_end + 3 + cut]
    for index in re.findall("\x00([0-9]+)\x00", head):
        if _GUEST_VARIABLES.search(parts[int(index)]):
            return parts[int(index)]
    return None


def destination_warnings(rule: Rule) -> list[tuple[Location, str]]:
    """Warnings for URL parameters whose scheme or host come from event data (SSRF)."""
    found = []
    for action in rule.actions:
        for key in URL_PARAMS:
            value = action.params.get(key)
            urls = value if isinstance(value, list) else [value]
            for url in urls:
                markup = guest_chosen_destination(url) if isinstance(url, str) else None
                if markup is None:
                    continue
                where = action.param_locations.get(key, action.location)
                found.append((where, _ssrf_message(action.type, key, markup)))
    return found


def _ssrf_message(kind: str, key: str, markup: str) -> str:
    return (
        f"{kind}: {key}: the scheme or host comes from event data ({markup}): a guest"
        " chooses where the request goes (SSRF); write the scheme and host out and"
        " template only the path or query"
    )
