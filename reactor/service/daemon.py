"""``qmp-reactor run``: the sidecar's main loop.

It loads plugins, rules and configuration (any error stops it before it
starts, with every problem located; files other users can write are warned
about first), opens the journal, resumes unfinished actions, serves metrics
and /healthz (``reactor.service.metrics``), connects to every VM, and feeds their
events to the engine. A listener that cannot bind stops it at start. Signal
handlers only set flags (uvicorn's way); the loop acts on them: SIGTERM/SIGINT
stop gracefully (no new actions, in-flight ones get ``shutdown_grace``, the rest
stay in the journal), SIGHUP reloads rules and configuration atomically (an
invalid new set is reported and the old one keeps running).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reactor.clock import AsyncioClock
from reactor.dispatch.journal import default_state_dir
from reactor.errors import ConfigError, UserError
from reactor.model import Envelope
from reactor.plugins.hookspecs import ActionOutcome
from reactor.plugins.manager import Plugins, load_plugins
from reactor.rules.compiler import require_rules
from reactor.rules.ruleset import RuleSet
from reactor.service.config import Config, load_config
from reactor.service.logs import setup_logging
from reactor.service.metrics import (
    Metrics,
    MetricsServer,
    Snapshot,
    snapshot_of,
    start_metrics_server,
)
from reactor.service.permissions import config_paths_warnings
from reactor.service.reactor import Reactor, refrozen, tune_for_serving
from reactor.sources.manager import ConnectionManager
from reactor.sources.session import READ_PACE

log = logging.getLogger("reactor.service.daemon")
events_log = logging.getLogger("reactor.event")
actions_log = logging.getLogger("reactor.action")


@dataclass
class Options:
    """What the command line said; None means: take it from the configuration file."""

    config: Path | None = None
    rules: list[str] | None = None
    qmp: list[str] = field(default_factory=list)
    qmp_glob: list[str] = field(default_factory=list)
    listen: str | None = None
    state_dir: str | None = None
    verbose: bool = False
    log_format: str | None = None
    plugin_dirs: list[str] | None = None


def effective_config(opts: Options) -> Config:
    """The configuration file's settings with the flags laid over them."""
    cfg = load_config(opts.config)
    update: dict[str, Any] = {}
    if opts.rules:
        update["rules"] = opts.rules
    if opts.qmp:
        update["qmp"] = [*cfg.qmp, *opts.qmp]
    if opts.qmp_glob:
        update["qmp_glob"] = [*cfg.qmp_glob, *opts.qmp_glob]
    if opts.listen:
        update["listen"] = opts.listen
    if opts.state_dir:
        update["state_dir"] = opts.state_dir
    if opts.verbose:
        update["verbose"] = True
    if opts.log_format:
        update["log_format"] = opts.log_format
    if opts.plugin_dirs:
        update["plugin_dirs"] = opts.plugin_dirs
    return cfg.model_copy(update=update)


def load_rule_set(cfg: Config, plugins: Plugins) -> RuleSet:
    """The rules the configuration names (default ./rules, else the bundled pack)."""
    from reactor.service.loader import rule_paths

    ruleset, diags = require_rules(
        rule_paths(cfg.rules),
        action_types=plugins.action_types(),
        settings=cfg.actions.settings(),
    )
    for d in diags:
        log.warning("%s", d)
    return ruleset


class Daemon:
    """One sidecar process: connections in, actions out, until told to stop."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cfg = effective_config(opts)
        setup_logging(verbose=self.cfg.verbose, fmt=self.cfg.log_format)
        self.state_dir = Path(self.cfg.state_dir) if self.cfg.state_dir else default_state_dir()
        for warning in config_paths_warnings(self.cfg, opts.config, self.state_dir):
            log.warning("%s", warning)  # before any plugin code runs
        self.plugins = load_plugins(
            plugin_dirs=[Path(d) for d in self.cfg.plugin_dirs], blocked=self.cfg.block_plugins
        )
        self.rules = load_rule_set(self.cfg, self.plugins)
        self.stop_requested = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.conns: ConnectionManager | None = None
        self.reactor: Reactor | None = None
        self.metrics = Metrics(self.snapshot)
        self.metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- wiring ------------------------------------------------------------------------
    def _on_envelope(self, env: Envelope) -> None:
        if self._closing:
            return  # our own closing of the connections is no news about the VMs
        if events_log.isEnabledFor(logging.DEBUG):
            events_log.debug(
                "%s %s seq=%s data=%s",
                env["vm"],
                env["event"],
                env.get("seq"),
                env.get("data"),
                extra={"vm": env["vm"], "event": env["event"], "seq": env.get("seq")},
            )
        self.metrics.event(env["vm"], env["event"])
        assert self.reactor is not None
        self.reactor.feed(env)

    def _emit(self, vm: str, event: str, data: dict[str, Any], source: str | None = None) -> None:
        # On the connection the invocation's event came from; if it is gone, the event keeps
        # that source, so no action it fires reaches a later connection with the same name.
        conn = self.conns.lookup(vm, source) if self.conns is not None else None
        if conn is not None:
            conn.emit(event, data)
        elif self.reactor is not None:
            self.reactor.emit_local(vm, event, data, source)

    def _on_outcome(self, outcome: ActionOutcome) -> None:
        level = logging.WARNING if outcome.status in ("failed", "dead") else logging.DEBUG
        if outcome.status == "ok":
            level = logging.INFO
        if actions_log.isEnabledFor(level):
            actions_log.log(
                level,
                "%s %s rule=%s vm=%s attempt=%d%s",
                outcome.action,
                outcome.status,
                outcome.rule,
                outcome.vm,
                outcome.attempt,
                f" error={outcome.error}" if outcome.error else "",
                extra={"rule": outcome.rule, "action": outcome.action, "vm": outcome.vm,
                       "outcome": outcome.status, "invocation": outcome.invocation_id},
            )  # fmt: skip
        self.metrics.outcome(outcome)
        self.plugins.action_outcome(outcome)

    def _observe(self, env: Envelope) -> None:
        self.plugins.event(env)

    def snapshot(self) -> Snapshot:
        """The state metrics and /healthz report."""
        if self.reactor is None:
            return Snapshot(rules=len(self.rules))
        conns = self.conns.connections() if self.conns is not None else []
        return snapshot_of(self.reactor, conns, len(self.rules))

    # -- life --------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        try:
            await self._start()
            await self._serve()
        finally:
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    async def _start(self) -> None:
        cfg = self.cfg
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"state directory {self.state_dir}: {err.strerror}") from err
        self.conns = ConnectionManager(
            self._on_envelope,
            names=cfg.vm_names(),
            greeting_timeout=cfg.greeting_timeout,
            backoff_max=cfg.reconnect_max,
        )
        self.reactor = Reactor(
            config=cfg,
            rules=self.rules,
            action_types=self.plugins.action_types(),
            clock=AsyncioClock(),
            state_dir=self.state_dir,
            observe=self._observe if self.plugins.pm.hook.reactor_event.get_hookimpls() else None,
            on_outcome=self._on_outcome,
            vm_lookup=self.conns.lookup,
            emit=self._emit,
        )
        await self.plugins.startup(cfg.actions.settings())
        await self.reactor.start()
        READ_PACE.set(
            self.reactor.backpressure
        )  # inherited by every connection task made from here
        self.metrics_server = await start_metrics_server(self.metrics, cfg.metrics)
        names = cfg.vm_names()
        for address in cfg.qmp:
            self.conns.add(address, names.get(address))
        if cfg.qmp_glob:
            self._tasks.append(asyncio.create_task(self.conns.watch_globs(cfg.qmp_glob)))
        if cfg.listen:
            listening = self.conns.listen(cfg.listen, cfg.listener.policy())
            self._tasks.append(asyncio.create_task(listening))
        await asyncio.sleep(0)  # let the listener bind: a bad address stops us before "ready"
        self._check_tasks()
        tune_for_serving()
        log.info(
            "ready: %d rules, %d sockets, %d globs%s, state in %s",
            len(self.rules),
            len(cfg.qmp),
            len(cfg.qmp_glob),
            f", listening on {cfg.listen}" if cfg.listen else "",
            self.state_dir,
        )

    def _check_tasks(self) -> None:
        """Raise the error of a background task (listener, glob watcher) that ended."""
        for task in self._tasks:
            if task.done():
                task.result()
                raise RuntimeError(f"background task {task.get_name()} ended")

    async def _serve(self) -> None:
        while not self.stop_requested.is_set():
            stop = asyncio.create_task(self.stop_requested.wait())
            reload = asyncio.create_task(self.reload_requested.wait())
            await asyncio.wait({stop, reload, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
            for t in (stop, reload):
                t.cancel()
            self._check_tasks()
            if self.reload_requested.is_set() and not self.stop_requested.is_set():
                self.reload_requested.clear()
                self.reload()

    def reload(self) -> bool:
        """Swap in the rules the files hold now, or keep the old ones if they are invalid."""
        with refrozen():
            return self._reload()

    def _reload(self) -> bool:
        try:
            cfg = effective_config(self.opts)
            plugins = load_plugins(
                plugin_dirs=[Path(d) for d in cfg.plugin_dirs], blocked=cfg.block_plugins
            )
            rules = load_rule_set(cfg, plugins)
        except UserError as err:
            for d in err.diagnostics:
                log.error("reload refused: %s", d)
            if not err.diagnostics:
                log.error("reload refused: %s", err)
            log.error("reload refused: the previous %d rules keep running", len(self.rules))
            return False
        self.rules = rules
        assert self.reactor is not None
        self.reactor.swap_rules(rules)
        log.info("reloaded: %d rules", len(rules))
        return True

    async def _shutdown(self) -> None:
        log.info("stopping: no new actions; %.0fs grace for running ones", self.cfg.shutdown_grace)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.conns is not None:
            await self.conns.aclose()
        if self.reactor is not None:
            await self.reactor.stop(self.cfg.shutdown_grace)
        await self.plugins.shutdown()
        log.info("stopped")


def run_daemon(opts: Options) -> int:
    """Build and run the daemon in a fresh event loop."""

    async def main() -> int:
        daemon = Daemon(opts)
        return await daemon.run()

    return asyncio.run(main())


def parse_addresses(values: Sequence[str] | None) -> list[str]:
    """Flag values as a list (each flag may repeat and take several)."""
    return [v for group in (values or []) for v in ([group] if isinstance(group, str) else group)]
