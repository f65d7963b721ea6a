"""``qmp-reactor run``: the sidecar, watching every VM on the host."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.cli._common import add_rules_arg, duration_arg
from reactor.errors import ConfigError

if TYPE_CHECKING:
    from reactor.service.companion import Companion
    from reactor.service.config import Config


FLEET_FLAGS = (
    ("--nats", "URL", "publish every event to NATS JetStream and answer commands"),
    ("--from-nats", "URL", "central: run the rules over every host's events in the NATS stream"),
    ("--durable", "NAME", "with --from-nats: the durable consumer's name"),
    ("--host", "NAME", "this host's name in the fleet (default: the hostname)"),
)


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
    for flag, metavar, text in FLEET_FLAGS:
        p.add_argument(flag, metavar=metavar, help=text)
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
        nats=args.nats,
        from_nats=args.from_nats,
        durable=args.durable,
        host=args.host,
    )
    if opts.nats and opts.from_nats:
        raise ConfigError("run: --nats and --from-nats exclude each other")
    return run_daemon(opts, attach=fleet)


def fleet(config: Config) -> list[Companion]:
    """The fleet's companions ``config`` asks for; ConfigError when the extra is missing."""
    if not config.nats.url:
        return []
    fleet_module()
    from reactor.fleet.attach import companions

    return companions(config)


def fleet_module() -> None:
    """Import the fleet; ConfigError saying how to install the extra when it is missing."""
    try:
        import reactor.fleet.attach  # noqa: F401
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("nats"):
            raise
        raise ConfigError("nats: needs the nats extra: pip install 'qmp-reactor[nats]'") from None
