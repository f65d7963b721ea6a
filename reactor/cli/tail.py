"""``qmp-reactor tail``: watch live QMP events of one or more VMs.

One readable line per event (local time, VM, event, compact data), or with
``--json`` JSON lines in the format ``replay`` reads back: QEMU's ``event``,
``data`` and ``timestamp`` plus ``vm``. The synthetic ``REACTOR_CONNECTED`` /
``REACTOR_DISCONNECTED`` events are printed too, so a VM found paused, or one
that died without a SHUTDOWN, shows; so is ``REACTOR_STATE_CHANGED`` from the
``--reconcile`` probes, which makes a replay of the recording see what they saw.
Runs until Ctrl-C or SIGTERM, then exits 0.

``--from-nats URL`` tails a fleet's stream instead (``reactor.fleet.tailing``):
each line names the host too, and ``--json`` keeps ``host`` for ``replay``;
``--from-start --until-caught-up`` exports the stream.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.cli._common import duration_arg
from reactor.errors import ConfigError
from reactor.params.display import escape

if TYPE_CHECKING:
    from reactor.model import Envelope


def register(subparsers: Any) -> None:
    """Add the ``tail`` subcommand."""
    parser = subparsers.add_parser(
        "tail",
        help="print live QMP events",
        description="Print the live QMP events of one or more VMs until Ctrl-C.",
    )
    parser.add_argument("addresses", nargs="*", metavar="ADDR", help="QMP socket path or host:port")
    parser.add_argument(
        "--json", action="store_true", help="JSON lines, as `qmp-reactor replay` reads them"
    )
    parser.add_argument(
        "--qmp-glob",
        action="append",
        default=[],
        metavar="GLOB",
        help="also follow unix sockets matching GLOB (e.g. '/run/qemu/*.qmp'); repeatable",
    )
    parser.add_argument(
        "--listen", metavar="ADDR", help="also accept QEMUs connecting to ADDR (server mode)"
    )
    parser.add_argument(
        "--reconcile",
        type=duration_arg,
        default=30.0,
        metavar="DURATION",
        help="probe each VM's run state this often; what disagrees with the events is printed "
        "as REACTOR_STATE_CHANGED, so a replay of --json sees it (default 30s; 0: off)",
    )
    _register_fleet(parser)
    parser.set_defaults(func=run)


def _register_fleet(parser: argparse.ArgumentParser) -> None:
    fleet = parser.add_argument_group("a fleet's stream (docs/fleet.md)")
    fleet.add_argument(
        "--from-nats", metavar="URL", help="tail every host's events in the NATS stream"
    )
    fleet.add_argument(
        "--durable", metavar="NAME", help="with --from-nats: resume this durable consumer"
    )
    fleet.add_argument(
        "--from-start", action="store_true", help="with --from-nats: from the stream's first event"
    )
    fleet.add_argument(
        "--until-caught-up",
        action="store_true",
        help="with --from-nats: exit once every stored event is printed (an export)",
    )
    fleet.add_argument(
        "--config", type=Path, metavar="FILE", help="with --from-nats: the nats: settings of FILE"
    )


def run(args: argparse.Namespace) -> int:
    """Tail until interrupted; bad addresses raise ``ConfigError`` before anything starts."""
    import asyncio

    from reactor.cli._following import follow
    from reactor.sources.discovery import check_dial_address, parse_address

    if args.from_nats:
        return _run_fleet(args)
    if args.durable or args.from_start or args.until_caught_up or args.config:
        raise ConfigError("tail: --durable, --from-start, --until-caught-up and --config "
                          "go with --from-nats")  # fmt: skip
    if not (args.addresses or args.qmp_glob or args.listen):
        raise ConfigError("tail: give at least one ADDR, --qmp-glob or --listen")
    for address in args.addresses:
        check_dial_address(address)
    if args.listen:
        parse_address(args.listen)
    asyncio.run(follow(args, json_line if args.json else text_line))
    return 0


def _run_fleet(args: argparse.Namespace) -> int:
    if args.addresses or args.qmp_glob or args.listen:
        raise ConfigError("tail: --from-nats tails the stream, not ADDR, --qmp-glob or --listen")
    from reactor.cli._following import follow_stream
    from reactor.cli.run import fleet_module
    from reactor.service.config import load_config

    cfg = load_config(args.config).nats.model_copy(update={"url": args.from_nats})
    fleet_module()
    printer = functools.partial(json_line if args.json else text_line, with_host=True)
    follow_stream(args, cfg, printer)
    return 0


def text_line(env: Envelope, *, with_host: bool = False) -> str:
    """One readable line: local time, VM (``host/vm`` from a fleet), event, and the data."""
    vm = f"{env.get('host', '')}/{env['vm']}" if with_host else env["vm"]
    line = escape(f"{_clock(env.get('timestamp'))} {vm} {env['event']}")
    if env["data"]:
        line += " " + json.dumps(env["data"], separators=(",", ":"))
    return line


def _clock(ts: Any) -> str:
    try:
        seconds, micro = int(ts["seconds"]), int(ts["microseconds"])
    except (TypeError, KeyError, ValueError):
        return "????-??-?? ??:??:??.??????"  # a peer that sent no usable timestamp
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) + f".{micro:06d}"


def json_line(env: Envelope, *, with_host: bool = False) -> str:
    """The event as QEMU sent it, plus ``vm`` (and ``host``): one line ``replay`` accepts."""
    record = {
        "timestamp": env["timestamp"],
        "event": env["event"],
        "data": env["data"],
        "vm": env["vm"],
    }
    if with_host:
        record["host"] = env.get("host", "")
    return json.dumps(record, separators=(",", ":"))
