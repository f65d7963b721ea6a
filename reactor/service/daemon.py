"""``qmp-reactor run``: the sidecar's main loop.

Signal handlers go in first and only set flags (uvicorn's way); the loop acts
on them. Then it loads one generation (``reactor.service.generation``: any
error stops it before it starts, with every problem located; files other users
can write are warned about first), opens the journal, resumes unfinished
actions, serves metrics and /healthz (``reactor.service.metrics``), connects to
every VM, and feeds their events to the engine. A listener that cannot bind
stops it at start. SIGTERM/SIGINT stop gracefully (no new actions, in-flight
ones get ``shutdown_grace``, the rest stay in the journal). SIGHUP loads a new
generation and swaps it in whole: rules, action types, settings, plugins,
connections (added and removed to match), the metrics listener; or refuses,
saying why (an error, or a setting only a restart applies), and the old one
keeps running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from reactor.clock import AsyncioClock
from reactor.errors import ConfigError, Diagnostic, PluginError, UserError
from reactor.model import Envelope
from reactor.params.secrets import Redactor
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.companion import Attach, Companion
from reactor.service.config import Config
from reactor.service.generation import Generation, Options, effective_config, load_generation
from reactor.service.logs import log_dropped, log_kept, setup_logging
from reactor.service.metrics import (
    Metrics,
    MetricsServer,
    Snapshot,
    snapshot_of,
    start_metrics_server,
)
from reactor.service.reactor import Reactor, refrozen, tune_for_serving
from reactor.sources.discovery import scan_globs
from reactor.sources.domain import LibvirtDomain
from reactor.sources.libvirt import LibvirtSource, load_binding
from reactor.sources.manager import ConnectionManager
from reactor.sources.vm import VmConnection

log = logging.getLogger("reactor.service.daemon")
events_log = logging.getLogger("reactor.event")
actions_log = logging.getLogger("reactor.action")
DISCONNECTED = "REACTOR_DISCONNECTED"

__all__ = ["Daemon", "Options", "run_daemon"]


def _address(env: Envelope) -> object:
    data = env.get("data")
    return data.get("address") if isinstance(data, dict) else None


class Daemon:
    """One sidecar process: connections in, actions out, until told to stop.

    Everything its configuration produces is one ``Generation`` (``self.gen``),
    loaded once signal handlers are in place and replaced whole by a reload.
    """

    def __init__(self, opts: Options, attach: Attach | None = None) -> None:
        self.opts = opts
        self.attach = attach
        self.companions: list[Companion] = []
        self.gen: Generation | None = None
        self.redactor = Redactor()  # the reactor's secrets, masked in every log line
        self.stop_requested = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.conns: ConnectionManager | None = None
        self.libvirt: dict[str, tuple[LibvirtSource, asyncio.Task[None]]] = {}  # by URI
        self.reactor: Reactor | None = None
        self.metrics = Metrics(self.snapshot)
        self.metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._globs: asyncio.Task[None] | None = None
        self._closing = False
        self._leaving: set[str] = set()  # addresses a reload closes: no news about their VMs

    @property
    def generation(self) -> Generation:
        """The generation running now (there is one once ``run`` loaded it)."""
        assert self.gen is not None
        return self.gen

    # -- wiring ------------------------------------------------------------------------
    def feed(self, env: Envelope) -> None:
        """One envelope from an event source other than the QMP connections (a stream)."""
        self._on_envelope(env)

    def _on_envelope(self, env: Envelope) -> None:
        if self._closing:
            return  # our own closing of the connections is no news about the VMs
        if self._leaving and env["event"] == DISCONNECTED and _address(env) in self._leaving:
            return  # nor is a reload closing one
        for companion in self.companions:
            companion.envelope(env)
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
        if env["event"] == "BLOCK_IO_ERROR":
            self.metrics.block_io_error(env["vm"], env["data"])
        assert self.reactor is not None
        self.reactor.feed(env)

    def _vm(self, vm: str, source: str | None = None) -> VmConnection | LibvirtDomain | None:
        """The connection ``source`` (an envelope's) names, if it is still ``vm``'s: a QMP
        socket's, else a libvirt domain's (whose source is its URI). An event the sidecar
        raised itself (``source`` None) goes by name."""
        conn: VmConnection | LibvirtDomain | None = None
        conn = self.conns.lookup(vm, source) if self.conns is not None else None
        for libvirt, _ in self.libvirt.values():
            if conn is None and source in (None, "reactor", libvirt.uri):
                conn = libvirt.get(vm)
        return conn

    def _emit(self, vm: str, event: str, data: dict[str, Any], source: str | None = None) -> None:
        # On the connection the invocation's event came from; if it is gone, the event keeps
        # that source, so no action it fires reaches a later connection with the same name.
        conn = self._vm(vm, source)
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
        for companion in self.companions:
            companion.outcome(outcome)
        self.generation.plugins.action_outcome(outcome)

    def _observer(self, gen: Generation) -> Callable[[Envelope], None] | None:
        """What sees every envelope: ``gen``'s plugins, if any has a ``reactor_event`` hook."""
        return gen.plugins.event if gen.plugins.pm.hook.reactor_event.get_hookimpls() else None

    def snapshot(self) -> Snapshot:
        """The state metrics and /healthz report."""
        rules = len(self.gen.rules) if self.gen is not None else 0
        if self.reactor is None:
            return Snapshot(rules=rules)
        conns: list[VmConnection | LibvirtDomain] = []
        conns += self.conns.connections() if self.conns is not None else []
        for source, _ in self.libvirt.values():
            conns += source.connections()
        snap = snapshot_of(self.reactor, conns, rules)
        if not self.companions:
            return snap
        extra = {k: v for c in self.companions for k, v in c.figures().items()}
        problems = tuple(p for c in self.companions for p in c.problems())
        return dataclasses.replace(snap, extra=extra, extra_problems=problems)

    # -- life --------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        # Before anything is loaded: a signal during start-up is a request, not an exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        try:
            cfg = effective_config(self.opts)
            self.companions = self.attach(cfg) if self.attach is not None else []
            self.gen = self._adapted(self._load(cfg))
            await self._start()
            await self._serve()
        finally:
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    def _load(self, cfg: Config) -> Generation:
        setup_logging(verbose=cfg.verbose, fmt=cfg.log_format, redactor=self.redactor)
        gen = load_generation(
            self.opts, config=cfg, journal=True, report=_warn, redactor=self.redactor
        )
        for d in gen.diagnostics:
            _warn(d)
        if cfg.libvirt:
            load_binding()  # without libvirt-python, say how to install it before starting
        return gen

    def _adapted(self, gen: Generation) -> Generation:
        for companion in self.companions:
            gen = companion.adapt(gen)
        return gen

    async def _start(self) -> None:
        gen = self.generation
        cfg = gen.config
        assert gen.state_dir is not None
        try:
            gen.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"state directory {gen.state_dir}: {err.strerror}") from err
        self.conns = ConnectionManager(
            self._on_envelope,
            names=gen.vm_names(),
            greeting_timeout=cfg.greeting_timeout,
            backoff_max=cfg.reconnect_max,
            reconcile=cfg.reconcile,
            labels=cfg.labels_of if cfg.vms else None,
        )
        self.reactor = Reactor.for_generation(
            gen,
            clock=AsyncioClock(),
            observe=self._observer(gen),
            on_outcome=self._on_outcome,
            vm_lookup=self._vm,
            emit=self._emit,
            redactor=self.redactor,
            keep_state=cfg.engine_state,
        )
        await gen.plugins.startup(gen.settings)
        await self.reactor.start()
        for companion in self.companions:
            await companion.start(self)
        self.conns.pace = self.reactor.backpressure  # overload slows the readers down
        self.metrics_server = await start_metrics_server(self.metrics, cfg.metrics)
        for address in gen.sockets:
            self.conns.add(address, gen.vm_names().get(address))
        self._follow_globs(gen.globs)
        await self._follow_libvirt(cfg.libvirt)
        if cfg.listen:
            listening = self.conns.listen(cfg.listen, cfg.listener.policy())
            self._tasks.append(asyncio.create_task(listening))
        await asyncio.sleep(0)  # let the listener bind: a bad address stops us before "ready"
        self._check_tasks()
        tune_for_serving()
        log.info(
            "ready: %d rules, %d sockets, %d globs, %d libvirt%s, state in %s",
            len(gen.rules),
            len(gen.sockets),
            len(gen.globs),
            len(self.libvirt),
            f", listening on {cfg.listen}" if cfg.listen else "",
            gen.state_dir,
        )

    def _follow_globs(self, globs: Sequence[str]) -> None:
        """(Re)start the glob watcher; it takes over the sockets the last one found."""
        if self._globs is not None:
            self._globs.cancel()
            self._tasks.remove(self._globs)
            self._globs = None
        if globs and self.conns is not None:
            self._globs = asyncio.create_task(self.conns.watch_globs(list(globs)))
            self._tasks.append(self._globs)

    async def _follow_libvirt(self, uris: Sequence[str]) -> None:
        """Follow the domains of each libvirt in ``uris``; quietly stop following the others.

        Every source takes its domains' labels from the current configuration.
        """
        for uri in [u for u in self.libvirt if u not in uris]:
            source, task = self.libvirt.pop(uri)
            self._tasks.remove(task)
            self._leaving.add(uri)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._leaving.discard(uri)
        for uri in uris:
            if uri not in self.libvirt:
                source = LibvirtSource(
                    uri, self._on_envelope, backoff_max=self.generation.config.reconnect_max
                )
                task = asyncio.create_task(source.run(), name=f"libvirt:{uri}")
                self.libvirt[uri] = (source, task)
                self._tasks.append(task)
        config = self.generation.config
        for source, _ in self.libvirt.values():
            source.relabel(config.labels_of if config.vms else None)

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
                await self.reload()

    async def reload(self) -> bool:
        """Swap in the generation the files make now, or keep the old one and say why."""
        with refrozen():
            return await self._reload()

    async def _reload(self) -> bool:
        old = self.generation
        try:
            new = load_generation(self.opts, journal=True, report=_warn, redactor=self.redactor)
            new = self._adapted(new)
            changed = old.restart_needed(new)
            if new.config.libvirt:
                load_binding()
            if changed:
                raise ConfigError(f"{', '.join(changed)}: a change that needs a restart")
            server = await self._metrics_for(old, new)
        except (UserError, PluginError) as err:
            _refused(err, len(old.rules))
            return False
        try:
            await self._restart_plugins(old, new)
        except PluginError as err:
            if server is not self.metrics_server and server is not None:
                await server.close()
            _refused(err, len(old.rules))
            return False
        await self._swap(old, new, server)
        return True

    async def _metrics_for(self, old: Generation, new: Generation) -> MetricsServer | None:
        """The metrics listener ``new`` wants: the running one, or a new one already bound."""
        if new.config.metrics == old.config.metrics:
            return self.metrics_server
        return await start_metrics_server(self.metrics, new.config.metrics)

    async def _restart_plugins(self, old: Generation, new: Generation) -> None:
        """Stop the plugins only the old generation has, give every new one its state
        (``reactor_state``) and start those only the new one has; if one fails to take
        its state or to start, the old ones again.

        A built-in or a plugin installed as a package is the same module in both
        generations: it keeps running, untouched. A file in a plugin directory is
        imported afresh, so its old copy stops before its new one starts.
        """
        kept = [p for p in new.plugins.plugin_objects() if _has(old, p)]
        await old.plugins.shutdown(skip=kept)
        assert self.reactor is not None
        try:
            self.reactor.open_plugins_state(new.plugins)
            await new.plugins.startup(new.settings, skip=kept)
        except PluginError:
            await new.plugins.shutdown(skip=kept)
            await old.plugins.startup(old.settings, skip=kept)
            raise

    async def _swap(self, old: Generation, new: Generation, server: MetricsServer | None) -> None:
        self.gen = new
        cfg = new.config
        if (old.config.verbose, old.config.log_format) != (cfg.verbose, cfg.log_format):
            setup_logging(verbose=cfg.verbose, fmt=cfg.log_format, redactor=self.redactor)
        for d in new.diagnostics:
            _warn(d)
        assert self.reactor is not None
        self.reactor.use(new, self._observer(new))
        if server is not self.metrics_server:
            if self.metrics_server is not None:
                await self.metrics_server.close()
            self.metrics_server = server
        await self._match_connections(old, new)
        log.info(
            "reloaded: %d rules, %d action types, %d sockets, %d globs",
            len(new.rules),
            len(new.action_types),
            len(new.sockets),
            len(new.globs),
        )

    async def _match_connections(self, old: Generation, new: Generation) -> None:
        """Connect to the sockets ``new`` adds, close the ones it drops (or renames), quietly."""
        conns = self.conns
        assert conns is not None
        old_names, new_names = old.vm_names(), new.vm_names()
        conns.rename(new_names)
        conns.relabel(new.config.labels_of if new.config.vms else None)
        dropped = {
            address
            for address in old.sockets
            if address not in new.sockets or old_names.get(address) != new_names.get(address)
        }
        if old.globs != new.globs:
            still = set(new.sockets) | scan_globs(new.globs)
            dropped |= scan_globs(old.globs) - still
        self._leaving |= dropped
        try:
            for address in sorted(dropped):
                await conns.remove(address, reason="removed from the configuration")
            if old.globs != new.globs:
                await conns.scan_globs(new.globs)
                self._follow_globs(new.globs)
        finally:
            self._leaving -= dropped
        for address in new.sockets:
            conns.add(address, new_names.get(address))
        await self._follow_libvirt(new.config.libvirt)

    async def _shutdown(self) -> None:
        if self.gen is None:
            return  # nothing was started
        grace = self.gen.config.shutdown_grace
        log.info("stopping: no new actions; %.0fs grace for running ones", grace)
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.conns is not None:
            await self.conns.aclose()
        for companion in reversed(self.companions):
            await companion.stop()
        if self.reactor is not None:
            held = self.reactor.engine.held()
            if self.reactor.state is not None:
                log_kept(held, "stopping", self.reactor.state.file.path)
            else:
                log_dropped(held, "stopping")
            await self.reactor.stop(grace)
        await self.gen.plugins.shutdown()
        log.info("stopped")


def _has(gen: Generation, plugin: object) -> bool:
    return any(p is plugin for p in gen.plugins.plugin_objects())


def _warn(diagnostic: Diagnostic) -> None:
    log.warning("%s", diagnostic)


def _refused(err: Exception, rules: int) -> None:
    diagnostics = getattr(err, "diagnostics", None) or []
    for d in diagnostics:
        log.error("reload refused: %s", d)
    if not diagnostics:
        log.error("reload refused: %s", err)
    log.error("reload refused: the previous generation (%d rules) keeps running", rules)


def run_daemon(opts: Options, attach: Attach | None = None) -> int:
    """Build and run the daemon in a fresh event loop (``attach``: its companions)."""

    async def main() -> int:
        daemon = Daemon(opts, attach)
        return await daemon.run()

    return asyncio.run(main())
