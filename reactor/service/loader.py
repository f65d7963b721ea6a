"""Where a sidecar's rules come from when nobody says: ./rules, else the bundled pack."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DEFAULT_RULES = Path("rules")


def bundled_rules() -> Path:
    """The default rule pack shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "rules"


def rule_paths(given: Sequence[str | Path] | None) -> list[Path]:
    """The rule paths to load: as given, else ./rules, else the bundled default pack."""
    if given:
        return [Path(p) for p in given]
    return [DEFAULT_RULES if DEFAULT_RULES.is_dir() else bundled_rules()]
