"""docs/architecture.md stays a true map: its layers in order, every file it names there."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_the_layer_table_is_the_enforced_order() -> None:
    rows = re.findall(r"^\| (\d+) (\w+) \| `reactor(?:\.(\w+))?", DOC, re.M)
    assert [int(n) for n, _, _ in rows] == list(range(len(LAYERS)))
    assert [name for _, name, _ in rows] == ["foundation", *LAYERS[1:]]
    assert [pkg for _, _, pkg in rows] == ["errors", *LAYERS[1:]]


def test_every_module_named_exists() -> None:
    named = set(re.findall(r"`(\w+/\w+\.py)`", DOC)) - {"tests/test_layers.py"}
    assert len(named) > 15
    missing = sorted(m for m in named if not (ROOT / "reactor" / m).is_file())
    assert not missing
