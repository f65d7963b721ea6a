"""What a layer above the service runs alongside ``run``: the fleet's publisher, command
service and central consumer (``reactor.fleet``) plug in here without the service
importing them.

The command line builds the companions from the effective configuration and
hands them to the daemon, which calls each at the points below; a companion
sees every envelope and outcome the sidecar sees, may adapt each generation it
loads (a central instance sends VM actions to their hosts), and reports figures
for ``/metrics`` and ``/healthz``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from reactor.model import Envelope
from reactor.plugins.hookspecs import ActionOutcome

if TYPE_CHECKING:
    from reactor.service.config import Config
    from reactor.service.daemon import Daemon
    from reactor.service.generation import Generation


class Companion(Protocol):
    """Runs beside the sidecar from ``start`` (the reactor is running) to ``stop``."""

    def adapt(self, gen: Generation) -> Generation:
        """The generation to run instead of ``gen`` (``gen`` itself when nothing changes)."""
        ...

    async def start(self, daemon: Daemon) -> None:
        """Start; an error stops the sidecar before it is ready."""
        ...

    def envelope(self, env: Envelope) -> None:
        """One envelope the sidecar received (cheap: called on the hot path)."""
        ...

    def outcome(self, outcome: ActionOutcome) -> None:
        """One action outcome."""
        ...

    def figures(self) -> Mapping[str, float]:
        """Gauges for ``/metrics`` (named without the ``qmp_reactor_`` prefix) and ``/healthz``."""
        ...

    def problems(self) -> list[str]:
        """Why the companion is unhealthy; empty when it is healthy."""
        ...

    async def stop(self) -> None:
        """Stop; called before the reactor stops."""
        ...


Attach = Callable[["Config"], list[Companion]]
"""Builds the companions a configuration asks for."""
