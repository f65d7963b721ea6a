"""Labels a libvirt domain carries in its ``<metadata>``, under qmp-reactor's namespace.

::

    <metadata>
      <qmp-reactor:labels xmlns:qmp-reactor="https://qmp-reactor.invalid/labels">
        <qmp-reactor:label name="tier">prod</qmp-reactor:label>
        <qmp-reactor:label name="auto_restart">true</qmp-reactor:label>
      </qmp-reactor:labels>
    </metadata>

libvirt keeps one element per namespace (``virsh metadata DOMAIN
https://qmp-reactor.invalid/labels --key qmp-reactor --set XML``). A value reads
as JSON when it is ``true``, ``false`` or a number, else as the text it is, as
the same value written in ``vms:`` would. The configuration's labels for the
domain win over these (``reactor.sources.libvirt``). Labels with no name, past
``LABELS_MAX`` or with values longer than ``VALUE_MAX`` are left out, with a
warning.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "https://qmp-reactor.invalid/labels"
"""The namespace URI of qmp-reactor's element in a domain's ``<metadata>``."""
LABELS_MAX = 64
VALUE_MAX = 1024


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _value(text: str) -> str | bool | int | float:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, bool | int | float) else text


def parse_labels(xml: str, domain: str) -> dict[str, Any]:
    """The labels of ``xml``, qmp-reactor's metadata element of ``domain``."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        log.warning("%s: labels in <metadata> are not XML (%s): ignored", domain, err)
        return {}
    labels: dict[str, Any] = {}
    skipped = 0
    for node in root:
        name = node.get("name", "")
        text = (node.text or "").strip()
        if _local(node.tag) != "label" or not name or len(text) > VALUE_MAX:
            skipped += 1
        elif name in labels or len(labels) < LABELS_MAX:
            labels[name] = _value(text)
        else:
            skipped += 1
    if skipped:
        log.warning(
            "%s: %d entries of the labels in <metadata> left out (a <label name=...> "
            "each, at most %d, values up to %d characters)",
            domain, skipped, LABELS_MAX, VALUE_MAX,
        )  # fmt: skip
    return labels


def domain_labels(dom: Any, api: Any) -> dict[str, Any]:
    """The labels in the ``<metadata>`` of ``dom`` (a ``virDomain``), {} if it has none."""
    try:
        xml = dom.metadata(api.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
    except api.libvirtError as err:
        if err.get_error_code() != api.VIR_ERR_NO_DOMAIN_METADATA:
            log.warning("%s: labels in <metadata> not read: %s", dom.name(), err)
        return {}
    return parse_labels(xml, dom.name())
