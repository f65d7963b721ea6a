"""``qmp-reactor run``: the sidecar, watching every VM on the host."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reactor.cli._common import add_rules_arg, duration_arg


def register(sub: Any) -> None:
    """Add the ``run`` subcommand."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run the sidecar",
        description="Hold a QMP connection to every VM and run the rules on their events.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="configuration file (YAML)")
    add_rules_arg(p, default="the configuration's, else ./rules, else the bundled pack")
    p.add_argument(
        "--qmp",
        action="append",
        default=[],
        metavar="ADDR",
        help="a QMP socket: unix path or host:port (repeatable)",
    )
    p.add_argument(
        "--qmp-glob",
        action="append",
        default=[],
        metavar="GLOB",
        help="watch sockets matching GLOB, e.g. '/run/qemu/*.qmp' (repeatable)",
    )
    p.add_argument(
        "--listen", metavar="ADDR", help="server mode: QEMUs connect to this unix path or host:port"
    )
    p.add_argument(
        "--libvirt",
        action="append",
        default=[],
        metavar="URI",
        help="every domain of this libvirt is a VM, e.g. qemu:///system (repeatable)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="journal directory (default /var/lib/qmp-reactor, else ./.qmp-reactor)",
    )
    p.add_argument("--plugin-dir", action="append", metavar="DIR", help="plugin directory")
    p.add_argument(
        "--reconcile",
        type=duration_arg,
        metavar="DURATION",
        help="probe every VM's run state this often (default 30s; 0: off)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="one line per event and action")
    p.add_argument("--log-format", choices=("text", "json"), help="log format (default text)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM or SIGINT."""
    from reactor.service.daemon import Options, run_daemon

    opts = Options(
        config=args.config,
        rules=args.rules,
        qmp=args.qmp,
        qmp_glob=args.qmp_glob,
        listen=args.listen,
        libvirt=args.libvirt,
        state_dir=args.state_dir,
        verbose=args.verbose,
        log_format=args.log_format,
        plugin_dirs=args.plugin_dir,
        reconcile=args.reconcile,
    )
    return run_daemon(opts)
