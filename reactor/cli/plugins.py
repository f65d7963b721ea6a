"""``qmp-reactor plugins``: which plugins are loaded and which action types they bring."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from reactor.cli._common import add_plugin_args

if TYPE_CHECKING:
    from pydantic import BaseModel

    from reactor.plugins.manager import Plugins


def register(subparsers: Any) -> None:
    """Add the ``plugins`` subcommand."""
    parser = subparsers.add_parser(
        "plugins", help="list plugins and action types with their parameters"
    )
    add_plugin_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the plugins and action types; 0 on success (a broken plugin raises PluginError)."""
    from reactor.plugins.manager import load_plugins

    dirs = [Path(d) for d in (args.plugin_dir or ["plugins"])]
    plugins = load_plugins(plugin_dirs=dirs, blocked=args.block_plugin or ())
    report = describe(plugins)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(as_text(report))
    return 0


def describe(plugins: Plugins) -> dict[str, Any]:
    """Plugins (name, origin, source) and action types (plugin, description, parameters)."""
    return {
        "plugins": [
            {
                "name": name,
                "origin": plugins.origin(name).kind,
                "source": plugins.origin(name).source,
            }
            for name in plugins.plugin_names()
        ],
        "actions": {
            name: {
                "plugin": kind.plugin,
                "description": kind.description,
                "parameters": parameters(kind.params),
            }
            for name, kind in sorted(plugins.action_types().items())
        },
    }


def parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """Each field of a parameter model: name, type, required, default, description."""
    from pydantic_core import PydanticUndefined

    rows = []
    for name, field in model.model_fields.items():
        default = None
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
        rows.append(
            {
                "name": name,
                "type": type_name(field.annotation),
                "required": field.is_required(),
                "default": None if default is PydanticUndefined else default,
                "description": field.description or "",
            }
        )
    return rows


def type_name(annotation: Any) -> str:
    """A short readable name for a type annotation (``list[str]``, ``str | None``)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(type_name, args))}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def as_text(report: dict[str, Any]) -> str:
    """The report as aligned plain text."""
    lines = ["Plugins:"]
    lines += [f"  {p['name']:32} {p['origin']:12} {p['source']}" for p in report["plugins"]]
    for name, action in report["actions"].items():
        lines += ["", f"{name}  ({action['plugin']}): {action['description']}"]
        for param in action["parameters"]:
            need = "required" if param["required"] else f"default {param['default']!r}"
            lines.append(f"  {param['name']:18} {param['type']:24} {need}")
            if param["description"]:
                lines.append(f"      {param['description']}")
    return "\n".join(lines) + "\n"
