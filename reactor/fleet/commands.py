"""Commands over NATS: a host's sidecar answers them, a central instance sends them.

A request on ``<prefix>.<host>.cmd`` (the ``nats.micro`` service ``qmp-reactor``,
endpoint ``cmd``) is JSON: ``{"command": "restart_vm" | "resume_vm" | "qmp",
"vm": NAME, "with": {...}, "key": IDEMPOTENCY_KEY}``. The sidecar runs it as
one invocation of that action through its own dispatcher and journal (its
allowlist, restart guard and retries apply) with an invocation id derived from
the key, so a repeated request (a central's retry, a redelivery) waits for or
reports the first one's outcome instead of running again, across restarts
too. The reply: ``{"status": "ok" | "failed" | "dead" | "suppressed" |
"cancelled" | "refused", "error": ..., "duplicate": bool}``. Parameters were
rendered by the sender: a template or secret reference in them is refused,
since it could only come from text a guest wrote.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro import add_service
from nats.micro.request import Request
from pydantic import BaseModel

from reactor import __version__
from reactor.errors import Location, PermanentActionError, TransientActionError
from reactor.fleet.link import Link, why
from reactor.fleet.subjects import command_subject, derived_id
from reactor.model import ActionSpec, Envelope, Firing, Rule
from reactor.params.templates import is_template
from reactor.plugins.api import ActionContext, ActionType
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.config import NatsConfig

if TYPE_CHECKING:
    from reactor.service.daemon import Daemon

COMMANDS = ("restart_vm", "resume_vm", "qmp")
FINAL = frozenset({"ok", "failed", "dead", "suppressed", "cancelled"})
_JOURNALED = {"done": "ok", "failed": "failed", "dead": "dead", "skipped": "suppressed",
              "cancelled": "cancelled"}  # fmt: skip
MAX_NAME = 256
COMMAND_RULE = "nats-command:"
"""The prefix of the rule name a command's invocation runs under (then the command)."""
log = logging.getLogger("reactor.fleet")
# Outcomes kept in memory for repeats: the journal row of a finished invocation is
# updated by the group commit a moment after the outcome, so a repeat that came in
# between would otherwise read it as still running and wait for an outcome already given.
RECENT = 4096
WHERE = Location("<nats command>", 1, 1)


def firing_ids(firing: Firing) -> list[str] | None:
    """Invocation ids for the fleet's firings: a command's from its key, a stream event's
    from its message; None (random ids) for everything else."""
    command_id = firing.context.get("command_id")
    if isinstance(command_id, str):
        return [command_id]
    origin = firing.envelope.get("nats")
    if isinstance(origin, dict) and isinstance(origin.get("id"), str):
        rule = firing.rule
        return [
            derived_id("firing", origin["id"], rule.name, str(i)) for i in range(len(rule.actions))
        ]
    return None


def _templated(value: Any) -> bool:
    if isinstance(value, str):
        return is_template(value)
    if isinstance(value, Mapping):
        return any(_templated(k) or _templated(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_templated(v) for v in value)
    return False


def parse_request(data: bytes) -> tuple[str, str, dict[str, Any], str] | str:
    """``(command, vm, with, key)``, or what is wrong with the request."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(doc, dict):
        return "not a JSON object"
    command, vm, params, key = (
        doc.get("command"),
        doc.get("vm"),
        doc.get("with", {}),
        doc.get("key"),
    )
    if command not in COMMANDS:
        return f"command must be one of {', '.join(COMMANDS)}"
    for name, value in (("vm", vm), ("key", key)):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
            return f"{name} must be a string of 1 to {MAX_NAME} characters"
    if not isinstance(params, dict):
        return "with must be an object"
    if _templated(params):
        return "parameters may not hold templates or secret references"
    return str(command), str(vm), params, str(key)


class CommandService:
    """Answers commands for this host's VMs through the daemon's dispatcher."""

    def __init__(self, cfg: NatsConfig, host: str) -> None:
        self.cfg = cfg
        self.host = host
        self.answered = 0
        self._waiting: dict[str, asyncio.Future[ActionOutcome]] = {}
        self._finished: OrderedDict[str, ActionOutcome] = OrderedDict()
        self._daemon: Daemon | None = None

    async def start(self, link: Link, daemon: Daemon) -> None:
        """Serve once the link is up (call as a task)."""
        self._daemon = daemon
        await link.up.wait()
        assert link.nc is not None
        service = await add_service(
            link.nc, name="qmp-reactor", version=__version__,
            description="restart_vm, resume_vm and allowlisted qmp on this host's VMs",
        )  # fmt: skip
        subject = command_subject(self.cfg.subject_prefix, self.host)
        await service.add_endpoint(name="cmd", subject=subject, handler=self._handle)
        await link.nc.flush()
        log.info("nats: answering commands on %s", subject)

    async def _handle(self, request: Request) -> None:
        reply = await self.answer(request.data)
        self.answered += 1
        await request.respond(orjson.dumps(reply))

    async def answer(self, data: bytes) -> dict[str, Any]:
        """The reply to one request."""
        parsed = parse_request(data)
        if isinstance(parsed, str):
            return {"status": "refused", "error": parsed, "duplicate": False}
        command, vm, params, key = parsed
        daemon = self._daemon
        assert daemon is not None and daemon.reactor is not None and daemon.conns is not None
        inv_id = derived_id("command", self.host, key)
        repeat = await self._repeat(inv_id)
        if repeat is not None:
            return repeat
        journal = daemon.reactor.journal
        known = await asyncio.to_thread(journal.get, inv_id) if journal is not None else None
        # Asked again after the journal, with no await before the future is set (``_repeat``
        # suspends only when it has a reply): an outcome given while the journal was read
        # is either seen here or wakes the future.
        repeat = await self._repeat(inv_id)
        if repeat is not None:
            return repeat
        if known is not None and known.status in _JOURNALED:
            return {"status": _JOURNALED[known.status], "error": known.last_error,
                    "duplicate": True}  # fmt: skip
        if known is None and daemon.conns.get(vm) is None:
            return {"status": "refused", "error": f"no VM {vm!r} on this host", "duplicate": False}
        future = self._waiting[inv_id] = asyncio.get_running_loop().create_future()
        try:
            if known is None and not self._submit(daemon, command, vm, params, key, inv_id):
                return {"status": "refused", "error": "not accepted (stopping or overloaded)",
                        "duplicate": False}  # fmt: skip
            async with asyncio.timeout(self.cfg.command_timeout):
                return _reply(await future, duplicate=known is not None)
        except TimeoutError:
            return {"status": "pending", "error": "still running", "duplicate": False}
        finally:
            del self._waiting[inv_id]

    async def _repeat(self, inv_id: str) -> dict[str, Any] | None:
        """The reply to a repeat of a command this process finished or still runs; else None
        (returned without suspending)."""
        finished = self._finished.get(inv_id)
        if finished is not None:
            return _reply(finished, duplicate=True)
        pending = self._waiting.get(inv_id)
        if pending is not None:
            return _reply(await asyncio.shield(pending), duplicate=True)
        return None

    def _submit(
        self, daemon: Daemon, command: str, vm: str, params: dict[str, Any], key: str, inv_id: str
    ) -> bool:
        rule = Rule(
            name=f"{COMMAND_RULE}{command}", events=(), location=WHERE, mode="parallel",
            actions=(ActionSpec(type=command, params=params, location=WHERE),),
        )  # fmt: skip
        now = time.time()
        # The command names a VM of this host: it goes to whichever connection holds that
        # name when it runs, as the sidecar's own events do (source "reactor").
        env: Envelope = {
            "event": "REACTOR_COMMAND", "data": {"command": command, "key": key, "via": "nats"},
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
            "vm": vm, "host": self.host, "source": "reactor", "seq": None, "received_at": now,
        }  # fmt: skip
        assert daemon.reactor is not None
        firing = Firing(rule, env, now, {"command_id": inv_id})
        return bool(daemon.reactor.dispatcher.submit(firing))

    def outcome(self, outcome: ActionOutcome) -> None:
        """Wake the request waiting for this invocation, once it ended; remember the outcome
        of a command for the repeats that follow."""
        if outcome.status not in FINAL:
            return
        future = self._waiting.get(outcome.invocation_id)
        if future is not None and not future.done():
            future.set_result(outcome)
        if outcome.rule.startswith(COMMAND_RULE):  # a waiting future's is one too
            self._finished[outcome.invocation_id] = outcome
            while len(self._finished) > RECENT:
                self._finished.popitem(last=False)


def _reply(outcome: ActionOutcome, *, duplicate: bool) -> dict[str, Any]:
    return {"status": outcome.status, "error": outcome.error, "duplicate": duplicate}


def remote(kind: ActionType, current: Callable[[], Link | None], cfg: NatsConfig) -> ActionType:
    """``kind`` as a central instance runs it: a command to the host that owns the VM
    (over the link ``current()`` gives when it runs)."""

    async def run(params: BaseModel, ctx: ActionContext) -> Any:
        env = ctx.envelope
        host, vm = env.get("host"), env.get("vm")
        if not isinstance(host, str) or not isinstance(vm, str):
            raise PermanentActionError(f"{kind.name}: the event names no host and VM")
        request = {"command": kind.name, "vm": vm, "key": ctx.idempotency_key,
                   "with": params.model_dump(mode="json", exclude_unset=True)}  # fmt: skip
        link = current()
        if link is None or link.nc is None or not link.connected:
            raise TransientActionError(f"{kind.name} on {host}/{vm}: NATS not connected")
        try:
            msg = await link.nc.request(
                command_subject(cfg.subject_prefix, host), orjson.dumps(request),
                timeout=cfg.command_timeout,
            )  # fmt: skip
        except (NoRespondersError, NatsTimeout) as err:
            raise TransientActionError(f"{kind.name} on {host}/{vm}: {why(err)}") from err
        return _outcome(kind.name, host, vm, msg.data)

    return dataclasses.replace(
        kind, run=run, description=f"{kind.description} (sent to the VM's host over NATS)"
    )


def _outcome(action: str, host: str, vm: str, data: bytes) -> Any:
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise TransientActionError(f"{action} on {host}/{vm}: an unreadable reply")
    status = reply.get("status")
    if status in ("ok", "suppressed"):
        return {"host": host, "status": status, "duplicate": bool(reply.get("duplicate"))}
    if status == "pending":
        raise TransientActionError(f"{action} on {host}/{vm}: still running on the host")
    raise PermanentActionError(f"{action} on {host}/{vm}: {status}: {reply.get('error')}")
