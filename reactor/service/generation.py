"""One generation: everything a configuration produces, built by one loader.

A ``Generation`` is immutable: the effective configuration, the plugins and the
action types they register, the action settings, the compiled rules and the
renderer of their parameters, and what files others could change. ``run``,
``check``, ``replay`` and ``demo`` all build theirs with ``load_generation``;
``run`` builds a new one on SIGHUP and swaps it in whole, or keeps the old one
(``restart_needed`` names the settings a running sidecar cannot change).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from reactor.errors import Diagnostic, RuleError
from reactor.params.secrets import Redactor, SecretResolver
from reactor.plugins.api import ActionSettings, ActionType
from reactor.plugins.manager import Plugins, load_plugins
from reactor.rules.compiler import load_rules
from reactor.rules.ruleset import RuleSet
from reactor.service.config import Config, load_config
from reactor.service.labels import label_warnings
from reactor.service.loader import rule_paths
from reactor.service.permissions import obeyed_paths_warnings
from reactor.service.render import Renderer

RESTART_SETTINGS = (
    "state_dir",
    "listen",
    "qemu_stage",
    "greeting_timeout",
    "reconnect_max",
    "reconcile",
    "engine_state",
    "host",
    "nats",
)
"""Settings a running sidecar keeps until it restarts: a reload that changes one is refused."""


@dataclass
class Options:
    """What the command line said; None means: take it from the configuration file."""

    config: Path | None = None
    rules: list[str] | None = None
    qmp: list[str] = field(default_factory=list)
    qmp_glob: list[str] = field(default_factory=list)
    listen: str | None = None
    libvirt: list[str] = field(default_factory=list)
    state_dir: str | None = None
    verbose: bool = False
    log_format: str | None = None
    plugin_dirs: list[str] | None = None
    block_plugins: list[str] = field(default_factory=list)
    entry_points: bool = True
    qemu_versions: list[str] = field(default_factory=list)
    """QEMU releases to judge rules against (default: the configuration's)."""
    reconcile: float | None = None
    nats: str | None = None
    """``--nats URL``: publish to NATS JetStream and answer commands."""
    from_nats: str | None = None
    """``--from-nats URL``: run the rules over the stream (a central instance)."""
    durable: str | None = None
    host: str | None = None


def effective_config(opts: Options) -> Config:
    """The configuration file's settings with the flags laid over them."""
    cfg = load_config(opts.config)
    update: dict[str, Any] = {}
    if opts.rules:
        update["rules"] = [str(p) for p in opts.rules]
    if opts.qmp:
        update["qmp"] = [*cfg.qmp, *opts.qmp]
    if opts.qmp_glob:
        update["qmp_glob"] = [*cfg.qmp_glob, *opts.qmp_glob]
    if opts.listen:
        update["listen"] = opts.listen
    if opts.libvirt:
        update["libvirt"] = [*cfg.libvirt, *opts.libvirt]
    if opts.state_dir:
        update["state_dir"] = opts.state_dir
    if opts.verbose:
        update["verbose"] = True
    if opts.log_format:
        update["log_format"] = opts.log_format
    if opts.plugin_dirs is not None:
        update["plugin_dirs"] = [str(d) for d in opts.plugin_dirs]
    if opts.reconcile is not None:
        update["reconcile"] = opts.reconcile
    if opts.block_plugins:
        update["block_plugins"] = [*cfg.block_plugins, *opts.block_plugins]
    if opts.host:
        update["host"] = opts.host
    nats = _nats_flags(opts)
    if nats:
        update["nats"] = cfg.nats.model_copy(update=nats)
    return cfg.model_copy(update=update)


def _nats_flags(opts: Options) -> dict[str, Any]:
    """What ``--nats``, ``--from-nats`` and ``--durable`` lay over ``nats:``."""
    update: dict[str, Any] = {}
    if opts.nats:
        update["url"] = opts.nats
    if opts.from_nats:
        update["url"], update["central"] = opts.from_nats, True
    if opts.durable:
        update["durable"] = opts.durable
    return update


@dataclass(frozen=True, eq=False)
class Generation:
    """What one configuration produces; replaced whole, never changed."""

    config: Config
    config_file: Path | None
    state_dir: Path | None
    plugins: Plugins
    action_types: Mapping[str, ActionType]
    settings: ActionSettings
    rules: RuleSet
    renderer: Renderer
    warnings: tuple[Diagnostic, ...] = ()
    """Files other users can write."""
    diagnostics: tuple[Diagnostic, ...] = ()
    """The rules' warnings (errors stop the loader)."""

    @property
    def sockets(self) -> tuple[str, ...]:
        """The QMP addresses to connect to."""
        return tuple(self.config.qmp)

    @property
    def globs(self) -> tuple[str, ...]:
        """The globs of unix sockets to follow."""
        return tuple(self.config.qmp_glob)

    def vm_names(self) -> dict[str, str]:
        """Address → VM name, where the configuration names one."""
        return self.config.vm_names()

    def restart_needed(self, new: Generation) -> list[str]:
        """The settings ``new`` changes that only a restart applies (empty: swap it in)."""
        changed = [
            f"{name} ({getattr(self.config, name)!r} -> {getattr(new.config, name)!r})"
            for name in RESTART_SETTINGS
            if name != "state_dir" and getattr(self.config, name) != getattr(new.config, name)
        ]
        if self.state_dir != new.state_dir:
            changed.insert(0, f"state_dir ({str(self.state_dir)!r} -> {str(new.state_dir)!r})")
        return changed


Report = Callable[[Diagnostic], None]


def load_generation(
    opts: Options,
    *,
    config: Config | None = None,
    journal: bool = False,
    report: Report | None = None,
    redactor: Redactor | None = None,
) -> Generation:
    """Load everything ``opts`` names, or raise the ``UserError`` that says what is wrong.

    ``config``: the effective configuration if the caller read it already.
    ``journal``: the command keeps a journal, so its state directory is resolved
    and checked. Warnings about files others can write go to ``report`` before
    any plugin code runs; a ``RuleError`` carries every diagnostic of the rules.
    ``redactor``: who masks the secrets the renderer resolves (the log's, live).
    """
    cfg = config if config is not None else effective_config(opts)
    state_dir: Path | None = None
    if journal:
        from reactor.dispatch.journal import default_state_dir  # sqlite3: only with a journal

        state_dir = Path(cfg.state_dir) if cfg.state_dir else default_state_dir()
    paths = rule_paths(cfg.rules)
    warnings = tuple(
        obeyed_paths_warnings(
            config_file=opts.config,
            rules=paths,
            plugin_dirs=[Path(d) for d in cfg.plugin_dirs],
            state_dir=state_dir,
        )
    )
    for warning in warnings:
        if report is not None:
            report(warning)
    plugins = load_plugins(
        plugin_dirs=[Path(d) for d in cfg.plugin_dirs],
        blocked=cfg.block_plugins,
        load_entry_points=opts.entry_points,
    )
    action_types = MappingProxyType(plugins.action_types())
    settings = cfg.actions.settings()
    versions = opts.qemu_versions or cfg.qemu_versions
    rules, diags = load_rules(
        paths, action_types=action_types, settings=settings, qemu_versions=versions
    )
    if any(d.severity == "error" for d in diags):
        raise RuleError("invalid rules", diags)
    if opts.config is not None:  # the site's configuration: its labels are all there are
        diags = [*diags, *label_warnings(list(rules.rules), cfg.label_names())]
    return Generation(
        config=cfg,
        config_file=opts.config,
        state_dir=state_dir,
        plugins=plugins,
        action_types=action_types,
        settings=settings,
        rules=rules,
        renderer=Renderer(SecretResolver(redactor)),
        warnings=warnings,
        diagnostics=tuple(diags),
    )
