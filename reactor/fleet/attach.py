"""What ``run`` attaches for a configuration's ``nats:``: a host's or a central's companion.

``HostFleet`` (``run --nats URL``) publishes every envelope through the outbox
and answers commands; ``CentralFleet`` (``run --from-nats URL``) consumes the
stream and sends ``restart_vm``/``resume_vm``/``qmp`` to the VMs' hosts. Both
share one connection each and register as ``reactor.service.companion.Companion``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine, Mapping
from types import MappingProxyType
from typing import Any

from reactor.fleet.central import Consumer
from reactor.fleet.commands import COMMANDS, CommandService, firing_ids, remote
from reactor.fleet.link import Link, why
from reactor.fleet.publisher import Publisher, fleet_host
from reactor.model import Envelope
from reactor.params.secrets import SecretResolver
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.companion import Companion
from reactor.service.config import Config
from reactor.service.daemon import Daemon
from reactor.service.generation import Generation

log = logging.getLogger("reactor.fleet")


class _Fleet:
    """What both companions share: the link, the background tasks."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.cfg = config.nats
        self.host = fleet_host(config.host)
        self.link: Link | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def adapt(self, gen: Generation) -> Generation:
        return gen

    def _connect(self, daemon: Daemon, role: str) -> Link:
        self.link = Link(
            self.cfg, SecretResolver(daemon.redactor), f"qmp-reactor {role} {self.host}"
        )
        self._spawn(self.link.open())
        return self.link

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        task.add_done_callback(_report)
        self.tasks.append(task)

    def envelope(self, env: Envelope) -> None:
        pass

    def outcome(self, outcome: ActionOutcome) -> None:
        pass

    def problems(self) -> list[str]:
        return []

    def _link_figures(self) -> dict[str, float]:
        return {"nats_connected": 1.0 if self.link is not None and self.link.connected else 0.0}

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.link is not None:
            await self.link.close()


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        err = task.exception()
        assert err is not None
        log.error("nats: %s ended: %s", task.get_name(), why(err), exc_info=err)


class HostFleet(_Fleet):
    """A host's sidecar in the fleet: publish, answer commands."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.publisher: Publisher | None = None
        self.commands = CommandService(self.cfg, self.host) if self.cfg.commands else None

    async def start(self, daemon: Daemon) -> None:
        state_dir = daemon.generation.state_dir
        assert state_dir is not None and daemon.reactor is not None
        link = self._connect(daemon, "host")
        self.publisher = Publisher(self.cfg, self.host, state_dir)
        self._spawn(self.publisher.write())
        self._spawn(self.publisher.send(link))
        if self.commands is not None:
            daemon.reactor.dispatcher.firing_ids = firing_ids
            self._spawn(self.commands.start(link, daemon))
        log.info("nats: publishing as host %r to stream %s", self.host, self.cfg.stream)

    def envelope(self, env: Envelope) -> None:
        if self.publisher is not None:
            self.publisher.envelope(env)

    def outcome(self, outcome: ActionOutcome) -> None:
        if self.commands is not None:
            self.commands.outcome(outcome)

    def figures(self) -> Mapping[str, float]:
        figures = self._link_figures()
        if self.publisher is not None:
            figures.update(self.publisher.figures())
        if self.commands is not None:
            figures["nats_commands_answered"] = float(self.commands.answered)
        return figures

    def problems(self) -> list[str]:
        return self.publisher.problems() if self.publisher is not None else []

    async def stop(self) -> None:
        await super().stop()
        if self.publisher is not None:
            await self.publisher.close()


class CentralFleet(_Fleet):
    """A central instance: rules over the stream, VM actions sent to the hosts."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.consumer = Consumer(self.cfg)

    def adapt(self, gen: Generation) -> Generation:
        types = dict(gen.action_types)
        for name in COMMANDS:
            if name in types:
                types[name] = remote(types[name], lambda: self.link, self.cfg)
        return dataclasses.replace(gen, action_types=MappingProxyType(types))

    async def start(self, daemon: Daemon) -> None:
        assert daemon.reactor is not None
        daemon.reactor.dispatcher.firing_ids = firing_ids
        link = self._connect(daemon, "central")
        self._spawn(self.consumer.run(link, daemon))
        log.info("nats: central, consuming %s as %s", self.cfg.stream, self.cfg.durable)

    def figures(self) -> Mapping[str, float]:
        return {**self._link_figures(), **self.consumer.figures()}


def companions(config: Config) -> list[Companion]:
    """The companions ``config`` asks for (none without ``nats.url``)."""
    if not config.nats.url:
        return []
    if config.nats.central:
        return [CentralFleet(config)]
    return [HostFleet(config)]
