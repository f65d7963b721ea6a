"""``qmp-reactor demo``: the default rules against a real, throwaway QEMU.

With ``qemu-system-x86_64`` installed, it starts QEMU in a temporary directory
with a quorum disk, connects to it like the sidecar does, drives it (stop/cont,
reset, reads of a corrupted quorum child, a crash) and prints each event, each
rule that fired and what its action did. Without QEMU it says how to install it
and replays the bundled recording of a real QEMU instead. Either way it cleans
up after itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from reactor.clock import AsyncioClock
from reactor.demo.machine import ThrowawayQemu, qemu_binary
from reactor.engine.replay import open_inputs, replay
from reactor.model import Envelope
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.generation import Generation, Options, load_generation
from reactor.service.loader import bundled_rules
from reactor.service.reactor import Reactor
from reactor.sources.manager import ConnectionManager

VM = "demo-vm"


def _short(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":"), default=str)
    return text if len(text) <= 90 else text[:87] + "..."


class Narrator:
    """Prints what happens, one readable line at a time."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.outcomes: list[ActionOutcome] = []
        self.events: list[Envelope] = []

    def say(self, text: str) -> None:
        """A line of narration."""
        print(text, file=self.out, flush=True)

    def event(self, env: Envelope) -> None:
        """An event reached the rules."""
        self.events.append(env)
        cause = f"  (caused by {env['caused_by']['rule']})" if "caused_by" in env else ""
        self.say(f"  event  {env['event']:<22} {_short(env.get('data', {}))}{cause}")

    def outcome(self, o: ActionOutcome) -> None:
        """An action attempt ended."""
        self.outcomes.append(o)
        error = f": {o.error}" if o.error else ""
        self.say(f"  action {o.action:<10} {o.status:<6} rule {o.rule}{error}")


async def _drive(q: ThrowawayQemu, say: Callable[[str], None]) -> None:
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("stop the VM (QMP stop)", lambda: q.qmp.execute("stop")),
        ("resume it (QMP cont)", lambda: q.qmp.execute("cont")),
        ("reset it (QMP system_reset)", lambda: q.qmp.execute("system_reset")),
        ("corrupt quorum child r1", lambda: q.corrupt_child("r1")),
        ("read the quorum disk 5 times", lambda: q.read_quorum(5)),
    ]
    for text, step in steps:
        say(f"> {text}")
        await asyncio.to_thread(step)
        await asyncio.sleep(0.4)
    say("> wait for QEMU's rate limit to deliver the last QUORUM_REPORT_BAD (1 s)")
    await asyncio.sleep(1.3)
    say("> kill QEMU with SIGKILL, as a crash would")
    q.kill()
    await asyncio.sleep(1.0)


def demo_generation() -> Generation:
    """The default rules with the built-in actions only (no plugins of the host)."""
    only_builtins = Options(rules=[str(bundled_rules())], plugin_dirs=[], entry_points=False)
    return load_generation(only_builtins)


async def live_demo(out: TextIO) -> int:
    """The live demo on a throwaway QEMU; returns the exit status."""
    n = Narrator(out)
    gen = demo_generation()
    n.say(f"qmp-reactor demo: {len(gen.rules)} default rules, a throwaway QEMU with a quorum disk")
    with ThrowawayQemu(name=VM, extra_qmp=[VM], quorum=True) as q:
        state = Path(tempfile.mkdtemp(prefix="qmp-reactor-demo-"))
        try:
            await _run(q, gen, state, n)
        finally:
            shutil.rmtree(state, ignore_errors=True)
    fired = sorted({o.rule for o in n.outcomes if o.status == "ok"})
    n.say(f"done: {len(n.events)} events, rules fired: {', '.join(fired) or 'none'}")
    n.say("cleaned up: QEMU stopped, temporary files removed")
    return 0 if fired else 1


async def _run(q: ThrowawayQemu, gen: Generation, state: Path, n: Narrator) -> None:
    reactor: Reactor | None = None

    def feed(env: Envelope) -> None:
        assert reactor is not None
        reactor.feed(env)

    conns = ConnectionManager(feed, backoff_max=0.5)
    reactor = Reactor.for_generation(
        gen,
        clock=AsyncioClock(),
        state_dir=state,
        observe=n.event,
        on_outcome=n.outcome,
        vm_lookup=conns.lookup,
    )
    await reactor.start()
    conns.add(str(q.qmp_socket(VM)), VM)
    try:
        await asyncio.sleep(0.8)
        await _drive(q, n.say)
        await reactor.dispatcher.drain()
    finally:
        await conns.aclose()
        await reactor.stop(5.0)


def recorded_demo(out: TextIO, *, missing_qemu: bool = True) -> int:
    """Replay the bundled recording of a real QEMU through the default rules."""
    if missing_qemu:
        print(
            "qemu-system-x86_64 is not installed, so there is no live VM to drive.\n"
            "Install it for the live demo:  sudo apt-get install qemu-system-x86\n"
            "Meanwhile, the bundled recording of a real QEMU 7.2 through the default rules:",
            file=out,
        )
    else:
        print("The bundled recording of a real QEMU 7.2 through the default rules:", file=out)
    rules = demo_generation().rules
    recording = resources.files("reactor").joinpath("data/events/recording.jsonl")
    with resources.as_file(recording) as path:
        result = replay(open_inputs([str(path)]), rules)
    for f in result.firings:
        env = f.envelope
        actions = ", ".join(a.type for a in f.rule.actions)
        print(
            f"  {env['event']:<22} seq {env['seq']:>2} -> rule {f.rule.name} ({actions})", file=out
        )
    print(f"done: {result.events} recorded events, {len(result.firings)} firings", file=out)
    return 0


def run_demo(out: TextIO = sys.stdout, *, force_recording: bool = False) -> int:
    """The live demo where QEMU is installed, else the recording."""
    if force_recording or qemu_binary() is None:
        return recorded_demo(out, missing_qemu=qemu_binary() is None)
    return asyncio.run(live_demo(out))
