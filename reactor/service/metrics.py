"""Prometheus metrics and ``/healthz`` for ``qmp-reactor run``.

``Metrics`` holds one ``prometheus_client`` registry per instance (never the
process-wide default, so tests can build several). Two kinds of figures:

* counted as things happen: events by VM and type (``event``, on the hot path:
  a plain integer per (vm, event) with no lock and no string formatting), and
  action outcomes, retries, dead-letterings and latency (``outcome``);
* read when scraped, from a ``Snapshot`` the owner provides: rules loaded,
  connection state per VM, journal health, backlog, in-flight attempts, dead
  letters, refused firings, and the counters of QEMU's rate-limit stage.

``serve`` answers ``GET /metrics`` (the text exposition format) and
``GET /healthz`` (JSON; 200 when healthy, 503 when the journal cannot be
written or no rules are loaded) on the event loop itself, so a scrape reads
the sidecar's state without any locking. Loopback unless configured otherwise.

Labels carry only VM names, event names, action types and outcomes, never
parameters, so a secret cannot reach them. A peer inventing event names cannot
grow the series without bound: past ``MAX_EVENTS_PER_VM`` names per VM, new
ones count as ``_other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from reactor import __version__
from reactor.dispatch.schema import encodable
from reactor.errors import ConfigError
from reactor.plugins.hookspecs import ActionOutcome
from reactor.sources.discovery import is_loopback
from reactor.sources.reconcile import RUN_STATES

if TYPE_CHECKING:
    from reactor.service.config import MetricsConfig
    from reactor.service.reactor import Reactor
    from reactor.sources.domain import LibvirtDomain
    from reactor.sources.vm import VmConnection

log = logging.getLogger(__name__)

PREFIX = "qmp_reactor_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
MAX_EVENTS_PER_VM = 256
"""Distinct event names counted per VM; QEMU has about 100 event types."""
MAX_VMS = 4096
"""VMs whose event counts are kept after their connection went away."""
OTHER = "_other"
FINAL = frozenset({"ok", "failed", "suppressed", "cancelled"})
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
MAX_CLIENTS = 32


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The sidecar's state at one moment, as a scrape or a health check sees it."""

    rules: int = 0
    vms: Mapping[str, bool] = field(default_factory=dict)
    journal_healthy: bool = True
    backlog: int = 0
    in_flight: int = 0
    dead_letters: int = 0
    refused: int = 0
    stage_holds: int = 0
    stage_replaced: int = 0
    silenced: int = 0
    run_states: Mapping[str, str] = field(default_factory=dict)
    suppressed: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, float] = field(default_factory=dict)
    """Companions' gauges (``reactor.service.companion``), e.g. the NATS outbox."""
    extra_problems: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        """Why the sidecar is unhealthy; empty when it is healthy."""
        found = []
        if not self.journal_healthy:
            found.append("the journal cannot be written; new work waits in memory")
        if self.rules <= 0:
            found.append("no rules are loaded")
        found.extend(self.extra_problems)
        return found

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` document."""
        problems = self.problems()
        extra = {"fleet": dict(self.extra)} if self.extra else {}
        return {
            **extra,
            "status": "unhealthy" if problems else "ok",
            "rules_loaded": self.rules > 0,
            "rules": self.rules,
            "vms": len(self.vms),
            "vms_connected": sum(1 for up in self.vms.values() if up),
            "journal_healthy": self.journal_healthy,
            "backlog": self.backlog,
            "in_flight": self.in_flight,
            "dead_letters": self.dead_letters,
            "problems": problems,
        }


def snapshot_of(
    reactor: Reactor, connections: Iterable[VmConnection | LibvirtDomain], rules: int
) -> Snapshot:
    """The ``Snapshot`` of an assembled reactor and its VM connections."""
    vms: dict[str, bool] = {}
    run_states: dict[str, str] = {}
    for conn in connections:
        vms[conn.name] = vms.get(conn.name, False) or conn.connected
        run_states[conn.name] = conn.run_state.status
    dispatcher, stage = reactor.dispatcher, reactor.engine.stage
    return Snapshot(
        rules=rules,
        vms=vms,
        journal_healthy=dispatcher.healthy,
        backlog=dispatcher.backlog,
        in_flight=dispatcher.in_flight,
        dead_letters=dispatcher.dead_letters,
        refused=dispatcher.rejected,
        stage_holds=stage.holds if stage is not None else 0,
        stage_replaced=stage.replaced if stage is not None else 0,
        silenced=reactor.silences.silenced if reactor.silences is not None else 0,
        run_states=run_states,
        suppressed=reactor.engine.suppressed(),
    )


class Metrics:
    """The sidecar's metrics: counted on events and outcomes, the rest read at scrape time.

    ``source`` returns the current ``Snapshot``; it is called once per scrape or
    health check, in the thread that calls ``exposition``/``health``.
    """

    def __init__(self, source: Callable[[], Snapshot] = Snapshot) -> None:
        self.source = source
        self.registry = CollectorRegistry()
        self._events: dict[str, dict[str, list[int]]] = {}
        reg = self.registry
        self._actions = Counter(
            PREFIX + "actions", "Action invocations ended, by type and outcome "
            "(ok, failed, suppressed, cancelled)", ["action", "outcome"], registry=reg,
        )  # fmt: skip
        self._retries = Counter(
            PREFIX + "action_retries", "Failed attempts followed by another", ["action"],
            registry=reg,
        )  # fmt: skip
        self._dead = Counter(
            PREFIX + "dead_lettered", "Invocations moved to the dead letters", ["action"],
            registry=reg,
        )  # fmt: skip
        self._latency = Histogram(
            PREFIX + "action_latency_seconds",
            "From an invocation's first attempt to its end (ok or failed), retries included",
            ["action"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self._io_errors = Counter(
            PREFIX + "block_io_errors", "BLOCK_IO_ERROR events by VM, device (else node-name) "
            "and QEMU's reason", ["vm", "device", "reason"], registry=reg,
        )  # fmt: skip
        self._io_error_keys: dict[str, set[tuple[str, str]]] = {}
        self._children: dict[tuple[str, str], Any] = {}
        reg.register(_StateCollector(self))

    # -- counted as it happens ----------------------------------------------------------

    def event(self, vm: str, event: str) -> None:
        """Count one event of ``vm`` (the hot path: two dict lookups and an addition)."""
        per_vm = self._events.get(vm)
        if per_vm is not None:
            cell = per_vm.get(event)
            if cell is not None:
                cell[0] += 1
                return
        self._cell(vm, event)[0] += 1

    def _cell(self, vm: str, event: str) -> list[int]:
        per_vm = self._events.setdefault(vm, {})
        cell = per_vm.get(event)
        if cell is None:
            if len(per_vm) >= MAX_EVENTS_PER_VM:
                event = OTHER
            cell = per_vm.setdefault(event, [0])
        return cell

    def block_io_error(self, vm: str, data: Mapping[str, Any]) -> None:
        """Count one BLOCK_IO_ERROR; past ``MAX_EVENTS_PER_VM`` pairs a VM's new ones are other."""
        device = str(data.get("device") or data.get("node-name") or "")[:128]
        key = (device, str(data.get("reason", ""))[:128])
        seen = self._io_error_keys.setdefault(vm, set())
        if key not in seen:
            if len(seen) >= MAX_EVENTS_PER_VM:
                key = (OTHER, OTHER)
            seen.add(key)
        self._io_errors.labels(encodable(vm), *(encodable(k) for k in key)).inc()

    def outcome(self, outcome: ActionOutcome) -> None:
        """Count one reported outcome (``hookspecs.ActionOutcome``) of an action."""
        action, status = outcome.action, outcome.status
        if status == "retry":
            self._child("retry", action).inc()
        elif status == "dead":
            self._child("dead", action).inc()
        elif status in FINAL:
            self._child(status, action).inc()
            if status in ("ok", "failed"):
                self._child("latency", action).observe(outcome.duration)

    def _child(self, kind: str, action: str) -> Any:
        child = self._children.get((kind, action))
        if child is None:
            if kind == "retry":
                child = self._retries.labels(action)
            elif kind == "dead":
                child = self._dead.labels(action)
            elif kind == "latency":
                child = self._latency.labels(action)
            else:
                child = self._actions.labels(action, kind)
            self._children[(kind, action)] = child
        return child

    # -- read when asked ----------------------------------------------------------------

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return bytes(generate_latest(self.registry))

    def health(self) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, document)`` of ``/healthz``: 200 when healthy, else 503."""
        doc = self.source().health()
        return (200 if doc["status"] == "ok" else 503), doc

    def event_counts(self) -> dict[tuple[str, str], int]:
        """Events counted so far, by (vm, event)."""
        return {(vm, ev): c[0] for vm, per in self._events.items() for ev, c in per.items()}

    def forget_gone_vms(self, present: Mapping[str, bool]) -> None:
        """Drop the event counts of VMs not in ``present`` once more than ``MAX_VMS`` are kept."""
        if len(self._events) > MAX_VMS:
            for vm in [vm for vm in self._events if vm not in present]:
                del self._events[vm]


class _StateCollector:
    """Yields the event counts and the snapshot's figures at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(_families(None, {}))

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.source()
        self.metrics.forget_gone_vms(snap.vms)
        return iter(_families(snap, self.metrics._events))


def _families(snap: Snapshot | None, events: Mapping[str, Mapping[str, list[int]]]) -> list[Metric]:
    counted = CounterMetricFamily(PREFIX + "events", "QMP events received", labels=["vm", "event"])
    for vm, per_vm in events.items():
        for name, cell in per_vm.items():
            counted.add_metric([encodable(vm), encodable(name)], cell[0])
    connected = GaugeMetricFamily(
        PREFIX + "vm_connected", "1 while the VM's QMP connection is up", labels=["vm"]
    )
    info = GaugeMetricFamily(PREFIX + "info", "The running version", labels=["version"])
    info.add_metric([__version__], 1)
    families: list[Metric] = [counted, connected, info]
    figures = (
        (GaugeMetricFamily, "rules", "Rules loaded", "rules"),
        (GaugeMetricFamily, "journal_healthy", "0 while the journal cannot be written",
         "journal_healthy"),
        (GaugeMetricFamily, "journal_backlog", "Invocations accepted and not finished", "backlog"),
        (GaugeMetricFamily, "actions_in_flight", "Attempts running now", "in_flight"),
        (GaugeMetricFamily, "dead_letters", "Invocations in the dead letters", "dead_letters"),
        (CounterMetricFamily, "firings_refused", "Firings not accepted (shutting down, or "
         "too much unwritten work while the journal fails)", "refused"),
        (CounterMetricFamily, "qemu_stage_holds", "Events held by QEMU's rate-limit stage",
         "stage_holds"),
        (CounterMetricFamily, "qemu_stage_replaced", "Held events replaced by a newer one of "
         "the same key", "stage_replaced"),
        (CounterMetricFamily, "firings_silenced", "Firings a silence kept from running",
         "silenced"),
    )  # fmt: skip
    for kind, name, text, attr in figures:
        value = None if snap is None else float(getattr(snap, attr))
        families.append(kind(PREFIX + name, text, value=value))
    if snap is not None:
        for name, number in sorted(snap.extra.items()):
            families.append(GaugeMetricFamily(PREFIX + name, f"fleet: {name}", value=number))
        for vm, up in sorted(snap.vms.items()):
            connected.add_metric([encodable(vm)], 1.0 if up else 0.0)
    families.extend(_remediation(snap, events))
    return families


def _remediation(
    snap: Snapshot | None, events: Mapping[str, Mapping[str, list[int]]]
) -> list[Metric]:
    """Run states, guest panics and suppressed firings: what people alert on."""
    states = GaugeMetricFamily(
        PREFIX + "vm_run_state", "1 for the VM's run state (QEMU's RunState), as the events "
        "and the reconcile probes found it; all 0 while unknown", labels=["vm", "state"],
    )  # fmt: skip
    panics = CounterMetricFamily(
        PREFIX + "guest_panics", "GUEST_PANICKED events, whatever QEMU did next (pause, "
        "reset, shutdown)", labels=["vm"],
    )  # fmt: skip
    for vm, st in sorted(snap.run_states.items()) if snap is not None else ():
        for state in RUN_STATES:
            states.add_metric([encodable(vm), state], 1.0 if state == st else 0.0)
    suppressed = CounterMetricFamily(
        PREFIX + "firings_suppressed", "Matching events that did not fire when they came: held "
        "by a rule's threshold or throttle, restarts refused by the guard, or firings a silence "
        "kept from running", labels=["reason"],
    )  # fmt: skip
    guard = 0
    for vm, per_vm in events.items():
        cell = per_vm.get("GUEST_PANICKED")
        if cell is not None:
            panics.add_metric([encodable(vm)], cell[0])
        guard += per_vm.get("REACTOR_RESTART_SUPPRESSED", [0])[0]
    if snap is not None:
        for reason in ("threshold", "throttle"):
            suppressed.add_metric([reason], snap.suppressed.get(reason, 0))
        suppressed.add_metric(["guard"], guard)
        suppressed.add_metric(["silence"], snap.silenced)
    return [states, panics, suppressed]


# -- the HTTP listener ------------------------------------------------------------------


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; port 0 picks a free one) as ``(host, port)``.

    An empty host means every interface. Raises ``ConfigError`` otherwise.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or "/" in address:
        raise ConfigError(f"metrics.listen: {address!r} is not host:port (e.g. 127.0.0.1:9105)")
    return host.removeprefix("[").removesuffix("]"), int(port)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP on the running event loop."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, listen: str) -> None:
        """Bind ``listen`` and serve; ``ConfigError`` if it cannot be bound."""
        host, port = parse_listen(listen)
        if not is_loopback(host):
            log.warning("metrics on %s: not loopback, anyone who reaches it can read them", listen)
        try:
            self._server = await asyncio.start_server(
                self._accept, host or None, port, limit=MAX_REQUEST
            )
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise ConfigError(f"metrics.listen {listen}: cannot listen: {reason}") from err
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        shown = f"[{sockname[0]}]" if ":" in str(sockname[0]) else sockname[0]
        log.info("metrics on http://%s:%d/metrics, health on /healthz", shown, sockname[1])

    async def close(self) -> None:
        """Stop listening and hang up on every client."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            await self._answer(reader, writer)
        except (
            TimeoutError, ValueError, ConnectionError,
            asyncio.IncompleteReadError, asyncio.LimitOverrunError,
        ):  # fmt: skip
            pass  # a client that is slow, rude or gone gets nothing
        except asyncio.CancelledError:
            pass  # close() hung up on it
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        status, ctype, body = self.respond(method, target.split("?", 1)[0])
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "Error")
        headers = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(headers.encode("latin-1") + (b"" if method == "HEAD" else body))
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await writer.drain()

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for a request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if path == "/healthz":
            status, doc = self.metrics.health()
            return status, "application/json", orjson.dumps(doc) + b"\n"
        return 404, "text/plain", b"try /metrics or /healthz\n"


async def start_metrics_server(metrics: Metrics, config: MetricsConfig) -> MetricsServer | None:
    """Serve ``metrics`` on ``config.listen``; None when it is off.

    An address the operator chose must work (``ConfigError`` otherwise); the
    default one may be taken (a second sidecar on the host): then a warning.
    """
    if not config.listen:
        return None
    server = MetricsServer(metrics)
    try:
        await server.start(config.listen)
    except ConfigError as err:
        if "listen" in config.model_fields_set:
            raise
        log.warning("%s; running without metrics (choose another metrics.listen)", err)
        return None
    return server
