"""``run --libvirt``: a real libvirtd of the tests' own, running the tiny guest as TCG domains.

One libvirtd and virtlogd serve the module (``tests.support.libvirtd``). The
sidecar is a real subprocess; every event it hears is logged by the ``lv-audit``
rule with the envelope's ``uuid`` and ``source``, next to the default pack.

* a domain created after the sidecar is announced with its state, and its
  suspend/resume reach rules as STOP/RESUME with the domain's name;
* the guest opens its virtio-serial channel: VSERPORT_CHANGE (libvirt names it
  channel0);
* the guest panics: the default pack resets and resumes it through libvirt, the
  guest boots again, and libvirt's log of the domain records no taint;
* libvirtd restarts mid-run: the domain is disconnected, announced again with
  its state, and its events reach rules again;
* a destroy through libvirt (about a second) leaves the event loop free: it
  ticks all along;
* a read-only URI is refused in one clear line; without libvirt-python,
  ``--libvirt`` says how to install it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

from reactor.demo.machine import SerialConsole
from reactor.errors import ConfigError, PermanentActionError
from reactor.model import Envelope
from reactor.service.config import load_config
from reactor.service.generation import Options, effective_config
from reactor.sources.domain import CRASHED, PAUSED, RUNNING, event_data, qemu_version, qmp_status
from reactor.sources.libvirt import LibvirtSource
from reactor.sources.metadata import LABELS_MAX, NAMESPACE, parse_labels
from tests.support.guest import PROMPT, READY_MARKER
from tests.support.libvirtd import GuestFiles, Libvirtd, available, domain_xml, install
from tests.support.sidecar import DEFAULT_RULES, Sidecar

AUDIT = """\
rules:
  - name: lv-audit
    on: [REACTOR_CONNECTED, REACTOR_DISCONNECTED, STOP, RESUME, RESET, GUEST_PANICKED,
         VSERPORT_CHANGE]
    actions:
      - type: log
        with:
          message: >-
            {{ event }} {{ uuid }} {{ source }}
            {%- if data.status is defined %} status={{ data.status }}{% endif %}
            {%- if data.id is defined %} port={{ data.id }}:{{ data.open }}{% endif %}
            {%- if data.shutdown_seen is defined %} seen={{ data.shutdown_seen }}{% endif %}
            {%- if caused_by is defined %} caused={{ caused_by.rule }}{% endif %}
"""

BOOT = 180.0
"""Seconds a TCG guest may take to boot on a busy shared machine."""

pytestmark = [pytest.mark.qemu, pytest.mark.guest]


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    if not available() and os.geteuid() == 0:
        install()
    assert available(), "the libvirt tests need libvirtd and libvirt-python: run .ci/libvirt"
    with Libvirtd(tmp_path_factory.mktemp("libvirtd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def files() -> Iterator[GuestFiles]:
    guest = GuestFiles()
    yield guest
    guest.close()


@dataclass
class Domain:
    """A running domain of the tiny guest, with its serial console."""

    name: str
    uuid: str
    console: SerialConsole


def create(libvirtd: Libvirtd, files: GuestFiles, name: str) -> Domain:
    """Create transient domain ``name`` (after removing an old run's QEMU log of it)."""
    Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)
    xml = files.dir / f"{name}.xml"
    xml.write_text(domain_xml(name, files))
    libvirtd.virsh("create", str(xml))
    console = SerialConsole(files.serial(name))
    console.connect(timeout=30)
    uuid = libvirtd.virsh("domuuid", name).stdout.strip()
    return Domain(name, uuid, console)


def booted(domain: Domain) -> Domain:
    domain.console.expect(READY_MARKER, BOOT)
    domain.console.expect(re.escape(PROMPT), BOOT)
    return domain


def sidecar(workdir: Path, uri: str, *, default_pack: bool = False) -> Sidecar:
    rules = workdir / "audit.yaml"
    rules.write_text(AUDIT)
    paths = [DEFAULT_RULES, rules] if default_pack else [rules]
    return Sidecar(workdir, [], paths, extra_args=["--libvirt", uri])


def lines(side: Sidecar, vm: str, event: str) -> list[str]:
    """The lv-audit messages of ``event`` on ``vm``."""
    return [
        line["message"]
        for line in side.audit("lv-audit")
        if line["vm"] == vm and line["event"] == event
    ]


def wait_line(side: Sidecar, vm: str, event: str, count: int = 1, timeout: float = 60) -> list[str]:
    side.wait_for(lambda _: len(lines(side, vm, event)) >= count, timeout, f"{count} x {event}")
    return lines(side, vm, event)


# -- pure parts -------------------------------------------------------------------------


def test_domain_states_read_as_query_status() -> None:
    assert qmp_status(RUNNING, 1) == {"status": "running", "running": True}
    assert qmp_status(PAUSED, 1) == {"status": "paused", "running": False}
    assert qmp_status(PAUSED, 10) == {"status": "guest-panicked", "running": False}
    assert qmp_status(CRASHED, 1) == {"status": "guest-panicked", "running": False}
    assert qmp_status(99, 0) == {"status": "unknown", "running": False}
    assert qemu_version(7_002_022)["qemu"] == {"major": 7, "minor": 2, "micro": 22}


def test_event_data_takes_only_a_json_object() -> None:
    assert event_data('{"id": "channel0", "open": true}') == {"id": "channel0", "open": True}
    for details in (None, "", "[1]", '"x"', "{bad", 5):
        assert event_data(details) == {}


def test_labels_in_metadata_read_as_vms_labels_would() -> None:
    xml = (
        f'<qmp-reactor:labels xmlns:qmp-reactor="{NAMESPACE}">'
        '<qmp-reactor:label name="tier">prod</qmp-reactor:label>'
        '<qmp-reactor:label name="auto_restart">true</qmp-reactor:label>'
        '<qmp-reactor:label name="weight"> 2.5 </qmp-reactor:label>'
        '<qmp-reactor:label name="list">[1]</qmp-reactor:label>'
        '<qmp-reactor:label name="">nameless</qmp-reactor:label>'
        '<qmp-reactor:other name="x">not a label</qmp-reactor:other>'
        "</qmp-reactor:labels>"
    )
    assert parse_labels(xml, "d") == {
        "tier": "prod", "auto_restart": True, "weight": 2.5, "list": "[1]"
    }  # fmt: skip
    many = "".join(f'<label name="l{i}">{i}</label>' for i in range(LABELS_MAX + 3))
    assert len(parse_labels(f"<labels>{many}</labels>", "d")) == LABELS_MAX
    assert parse_labels("<labels><label", "d") == {}


def test_without_libvirt_python_run_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['libvirt'] = None\n"
        "from reactor.cli import main\n"
        f"sys.exit(main(['run', '--libvirt', 'qemu:///system', '--rules', {str(DEFAULT_RULES)!r},"
        f" '--state-dir', {str(tmp_path / 'state')!r}, '--plugin-dir', {str(tmp_path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "pip install 'qmp-reactor[libvirt]'" in result.stderr
    assert "libvirt-dev" in result.stderr


def test_libvirt_uris_from_the_configuration_and_the_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("libvirt: [qemu:///system]\n")
    opts = Options(config=config, libvirt=["qemu+unix:///system?socket=/x"])
    assert effective_config(opts).libvirt == ["qemu:///system", "qemu+unix:///system?socket=/x"]
    config.write_text("qmp: [/run/a.qmp]\nlibvirt: qemu:///system\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert [str(d) for d in refused.value.diagnostics] == [
        f"{config}:2:10: error: 'libvirt': Input should be a valid list"
    ]


# -- against libvirtd ------------------------------------------------------------------


def test_a_read_only_connection_is_refused_in_one_line(libvirtd: Libvirtd, tmp_path: Path) -> None:
    with sidecar(tmp_path, libvirtd.ro_uri) as side:
        side.wait_message("read-only connection", timeout=60)
        side.wait_message("ready:", timeout=60)
        assert side.proc.poll() is None  # the sidecar keeps running (and retrying)
    refusals = [r for r in side.records() if "read-only" in r.get("message", "")]
    assert len(refusals) == 1
    assert "read-write access" in refusals[0]["message"]
    assert "Traceback" not in side.log_text()


def test_a_domain_started_later_is_picked_up_and_its_stop_resume_reach_rules(
    libvirtd: Libvirtd, files: GuestFiles, tmp_path: Path
) -> None:
    with sidecar(tmp_path, libvirtd.uri) as side:
        side.wait_message("connected to libvirt", timeout=60)
        domain = create(libvirtd, files, "lv-late")
        try:
            connected = wait_line(side, "lv-late", "REACTOR_CONNECTED")
            assert connected[0].startswith(f"REACTOR_CONNECTED {domain.uuid} {libvirtd.uri}")
            libvirtd.virsh("suspend", "lv-late")
            stop = wait_line(side, "lv-late", "STOP")
            libvirtd.virsh("resume", "lv-late")
            wait_line(side, "lv-late", "RESUME", 2)  # libvirt starts QEMU paused, then resumes
            assert stop == [f"STOP {domain.uuid} {libvirtd.uri}"]
            libvirtd.virsh("destroy", "lv-late")  # QEMU gets SIGTERM: SHUTDOWN host-signal
            gone = wait_line(side, "lv-late", "REACTOR_DISCONNECTED")
            assert gone == [f"REACTOR_DISCONNECTED {domain.uuid} {libvirtd.uri} seen=True"]
            domain.console.close()

            domain = create(libvirtd, files, "lv-late")  # started again, then killed
            wait_line(side, "lv-late", "REACTOR_CONNECTED", 2)
            pid = int(Path("/run/libvirt/qemu/lv-late.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            gone = wait_line(side, "lv-late", "REACTOR_DISCONNECTED", 2)
            prefix = f"REACTOR_DISCONNECTED {domain.uuid} {libvirtd.uri}"
            assert gone[1] == f"{prefix} seen=False"
        finally:
            domain.console.close()
            libvirtd.virsh("destroy", "lv-late", check=False)
        assert side.stop() == 0
    seqs = [int(line["seq"]) for line in side.audit("lv-audit") if line["vm"] == "lv-late"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # one seq across both runs
    assert "Traceback" not in side.log_text()


def test_a_libvirt_uri_added_by_a_reload_is_followed(libvirtd: Libvirtd, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("libvirt: []\n")
    rules = tmp_path / "audit.yaml"
    rules.write_text(AUDIT)
    with Sidecar(tmp_path, [], [rules], extra_args=["--config", str(config)]) as side:
        side.wait_message("ready:", timeout=60)
        config.write_text(f"libvirt: [{json.dumps(libvirtd.uri)}]\n")
        side.proc.send_signal(signal.SIGHUP)
        side.wait_message("connected to libvirt", timeout=60)
        side.wait_message("reloaded:", timeout=60)
        assert side.stop() == 0
    assert "Traceback" not in side.log_text()


LABELLED = """\
rules:
  - name: lv-labels
    on: [REACTOR_CONNECTED, STOP]
    actions:
      - type: log
        with: {message: "{{ event }} tier={{ labels.tier }} rack={{ labels.rack }}"}
"""


def set_labels(libvirtd: Libvirtd, name: str, **labels: str) -> None:
    """Write qmp-reactor's element of ``name``'s ``<metadata>`` (of the running domain)."""
    inner = "".join(f"<label name={quoteattr(k)}>{escape(v)}</label>" for k, v in labels.items())
    xml = f"<labels>{inner}</labels>"
    libvirtd.virsh("metadata", name, NAMESPACE, "--key", "qmp-reactor", "--set", xml, "--live")


def test_a_domain_takes_labels_from_its_metadata_and_the_configuration_wins(
    libvirtd: Libvirtd, files: GuestFiles, tmp_path: Path
) -> None:
    rules = tmp_path / "labels.yaml"
    rules.write_text(LABELLED)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"libvirt: [{json.dumps(libvirtd.uri)}]\n"
        'vms:\n  - {name: "lv-lab*", labels: {tier: staging}}\n'
    )
    domain = create(libvirtd, files, "lv-labelled")
    try:
        set_labels(libvirtd, "lv-labelled", tier="prod", rack="r1")
        args = ["--config", str(config)]
        with Sidecar(tmp_path, [], [rules], extra_args=args) as side:

            def said(event: str, count: int = 1) -> list[str]:
                def found() -> list[str]:
                    return [
                        line["message"]
                        for line in side.audit("lv-labels")
                        if line["vm"] == "lv-labelled" and line["event"] == event
                    ]

                side.wait_for(lambda _: len(found()) >= count, 60, f"{count} x {event}")
                return found()

            assert said("REACTOR_CONNECTED") == ["REACTOR_CONNECTED tier=staging rack=r1"]
            set_labels(libvirtd, "lv-labelled", tier="prod", rack="r2")
            side.wait_message("labels from <metadata> read again", timeout=60)
            libvirtd.virsh("suspend", "lv-labelled")
            assert said("STOP") == ["STOP tier=staging rack=r2"]
            config.write_text(config.read_text().replace("{tier: staging}", "{zone: a}"))
            side.proc.send_signal(signal.SIGHUP)
            side.wait_message("reloaded:", timeout=60)
            libvirtd.virsh("resume", "lv-labelled")
            libvirtd.virsh("suspend", "lv-labelled")
            assert said("STOP", 2)[1] == "STOP tier=prod rack=r2"
            assert side.stop() == 0
        assert "Traceback" not in side.log_text()
    finally:
        domain.console.close()
        libvirtd.virsh("destroy", "lv-labelled", check=False)


def test_a_destroy_through_libvirt_leaves_the_event_loop_free(
    libvirtd: Libvirtd, files: GuestFiles
) -> None:
    """A destroy takes about a second; the loop ticks all along (libvirt's API in this
    process, on its own loop)."""
    seen: list[Envelope] = []

    async def main() -> tuple[list[float], float, float]:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.01)

        source = LibvirtSource(libvirtd.uri, seen.append)
        task = asyncio.create_task(source.run())
        ticker = asyncio.create_task(tick())
        try:
            async with asyncio.timeout(60):
                while (domain := source.get("lv-quit")) is None or not domain.connected:
                    await asyncio.sleep(0.05)
            start = loop.time()
            await domain.execute("quit")
            end = loop.time()
            async with asyncio.timeout(60):
                while domain.connected:
                    await asyncio.sleep(0.05)
            return ticks, start, end
        finally:
            for t in (ticker, task):
                t.cancel()
            await asyncio.gather(ticker, task, return_exceptions=True)

    domain = create(libvirtd, files, "lv-quit")
    try:
        ticks, start, end = asyncio.run(main())
    finally:
        domain.console.close()
        libvirtd.virsh("destroy", "lv-quit", check=False)
    took = end - start
    during = [t for t in ticks if start < t < end]
    assert during, f"the loop did not tick during the {took:.3f} s destroy"
    edges = [start, *during, end]
    widest = max(b - a for a, b in itertools.pairwise(edges))
    assert widest < took / 2, f"the loop stood still {widest:.3f} s of the {took:.3f} s destroy"
    gone = [e for e in seen if e["event"] == "REACTOR_DISCONNECTED"]
    assert [e["data"]["reason"] for e in gone] == ["domain destroyed"]
    assert libvirtd.virsh("domstate", "lv-quit", check=False).returncode != 0  # destroyed


@dataclass
class GuestRig:
    """A booted domain found at start-up, watched by a sidecar with the default pack."""

    libvirtd: Libvirtd
    domain: Domain
    sidecar: Sidecar


@pytest.fixture(scope="module")
def rig(
    libvirtd: Libvirtd, files: GuestFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuestRig]:
    domain = booted(create(libvirtd, files, "lv-guest"))
    try:
        with sidecar(tmp_path_factory.mktemp("rig"), libvirtd.uri, default_pack=True) as side:
            connected = wait_line(side, "lv-guest", "REACTOR_CONNECTED")
            assert connected == [f"REACTOR_CONNECTED {domain.uuid} {libvirtd.uri} status=running"]
            yield GuestRig(libvirtd, domain, side)
            assert side.stop() == 0
            assert "Traceback" not in side.log_text()
    finally:
        domain.console.close()
        libvirtd.virsh("destroy", "lv-guest", check=False)


def test_the_guest_opening_its_channel_is_a_vserport_change(rig: GuestRig) -> None:
    names = rig.domain.console.run_in_guest("cat /sys/class/virtio-ports/vport*/name").split()
    assert names == ["org.test.portA"]
    rig.domain.console.run_in_guest("exec 3>/dev/$(ls /sys/class/virtio-ports/); exec 3>&-")
    changes = wait_line(rig.sidecar, "lv-guest", "VSERPORT_CHANGE", 2)
    prefix = f"VSERPORT_CHANGE {rig.domain.uuid} {rig.libvirtd.uri}"
    assert changes == [f"{prefix} port=channel0:True", f"{prefix} port=channel0:False"]


def test_a_guest_panic_is_restarted_through_libvirt_without_taint(rig: GuestRig) -> None:
    side, vm = rig.sidecar, "lv-guest"
    rig.domain.console.send_line("echo c > /proc/sysrq-trigger")
    wait_line(side, vm, "GUEST_PANICKED")
    side.wait_for(lambda _: side.outcomes("restart_vm", "ok"), 120, "restart_vm ok")
    booted(rig.domain)  # the guest boots again
    restarts = side.outcomes("restart_vm", "ok")
    assert [(r["rule"], r["vm"]) for r in restarts] == [("guest-panic-restart", vm)]
    caused = [m for m in lines(side, vm, "RESET") + lines(side, vm, "RESUME") if "caused=" in m]
    assert sorted(m.split()[0] for m in caused) == ["RESET", "RESUME"]
    assert all(m.endswith("caused=guest-panic-restart") for m in caused)
    state = rig.libvirtd.virsh("domstate", vm).stdout.strip()
    assert state == "running"
    log = rig.libvirtd.domain_log(vm)
    assert "-name guest=lv-guest" in log  # the log is the domain's, and libvirt writes it
    assert "taint" not in log.lower()


def test_a_libvirtd_restart_reconnects_and_rereads_the_state(rig: GuestRig) -> None:
    side, vm = rig.sidecar, "lv-guest"
    before = len(lines(side, vm, "REACTOR_CONNECTED"))
    rig.libvirtd.restart()
    gone = wait_line(side, vm, "REACTOR_DISCONNECTED")
    assert gone == [f"REACTOR_DISCONNECTED {rig.domain.uuid} {rig.libvirtd.uri} seen=False"]
    again = wait_line(side, vm, "REACTOR_CONNECTED", before + 1, timeout=120)
    assert again[-1] == f"REACTOR_CONNECTED {rig.domain.uuid} {rig.libvirtd.uri} status=running"
    stops = len(lines(side, vm, "STOP"))
    rig.libvirtd.virsh("suspend", vm)
    wait_line(side, vm, "STOP", stops + 1)
    rig.libvirtd.virsh("resume", vm)
    assert rig.domain.console.run_in_guest("echo alive").strip() == "alive"


def test_other_commands_go_through_the_passthrough_which_taints(rig: GuestRig) -> None:
    """Last: it taints the domain. libvirt's API in this process, on its own loop."""
    seen: list[Envelope] = []

    async def main() -> tuple[object, str]:
        source = LibvirtSource(rig.libvirtd.uri, seen.append)
        task = asyncio.create_task(source.run())
        try:
            async with asyncio.timeout(60):
                while (domain := source.get("lv-guest")) is None:
                    await asyncio.sleep(0.05)
            reply = await domain.execute("query-name")
            with pytest.raises(PermanentActionError) as refused:
                await domain.execute("no-such-command")
            return reply, str(refused.value)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    reply, refused = asyncio.run(main())
    assert reply == {"name": "lv-guest"}
    assert "CommandNotFound" in refused
    assert "custom-monitor" in rig.libvirtd.domain_log("lv-guest")
    first, last = seen[0], seen[-1]
    assert (first["event"], first["vm"], first["uuid"]) == (
        "REACTOR_CONNECTED",
        "lv-guest",
        rig.domain.uuid,
    )
    assert first["source"] == rig.libvirtd.uri
    assert first["data"]["status"] == "running"
    assert (last["event"], last["data"]["reason"]) == (
        "REACTOR_DISCONNECTED",
        "closed by qmp-reactor",
    )
