"""Security of the whole sidecar: secrets, signatures, the template sandbox, exec, permissions.

* Secrets: with a webhook signing secret, a token in a URL and a header, and a
  password in a notify URL, every output is searched for every secret (and
  for any 8-character piece of one): ``check``, ``replay --explain``,
  ``replay --execute``, ``run -v`` with failing actions, ``/metrics``,
  ``/healthz``, ``dlq list`` (table and JSON) and the journal's files.
* Signatures of the real sidecar's requests are checked by the receiver's own
  implementation of the documented recipe; a captured request replayed after
  the window, or with its body changed, is refused.
* Templates: event data a guest controls is never evaluated; a rule that tries
  to reach Python internals is dead-lettered by the sandbox.
* ``exec`` is off unless configured, also for work resumed from the journal;
  ``qmp`` commands off the allowlist are refused at start.
* ``check`` and ``run`` warn about files other users can write.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reactor.demo.machine import ThrowawayQemu
from reactor.service.permissions import PLUGINS, RULES, path_warnings, why_writable
from tests import fakeqmp
from tests.support.ops import Receiver, Sidecar, signature_ok
from tests.test_faults import PeerThread

SECRETS = {
    "HOOK_SECRET": "hook-Kq8Zr2Vt5Wx1",
    "URL_TOKEN": "tok-Hj3Nb7Lp9Qs4",
    "NOTIFY_SECRET": "ntf-Yc6Md0Fg2Ru8",
}
REPO = Path(__file__).resolve().parents[1]


def pieces(secret: str, size: int = 8) -> set[str]:
    """Every ``size``-character piece of ``secret``: a truncated secret is a leak too."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def leaks(text: str) -> list[str]:
    return sorted({p for s in SECRETS.values() for p in pieces(s) if p in text})


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reactor", *argv],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=REPO,
    )  # fmt: skip


SECRET_RULES = """\
rules:
  - name: hooked
    on: STOP
    actions:
      - type: webhook
        with:
          url: "{url}/fail?token=${{env:URL_TOKEN}}"
          secret: "${{env:HOOK_SECRET}}"
          headers: {{Authorization: "Bearer ${{env:URL_TOKEN}}"}}
        retry: {{attempts: 2, initial: 0.05}}
      - type: webhook
        with:
          url: "{url}/echo"
          secret: "${{env:HOOK_SECRET}}"
          headers: {{Authorization: "Bearer ${{env:URL_TOKEN}}"}}
        retry: {{attempts: 1}}
      - type: notify
        with: {{urls: ["json://user:${{env:NOTIFY_SECRET}}@127.0.0.1:9/"]}}
        retry: {{attempts: 1}}
"""


def echo(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes] | None:
    """/fail...: 500; anything else: 400 repeating the credentials it got. For a path
    ending in ``-cut`` the credentials start where the sidecar cuts a body it quotes
    (200 characters), so the cut falls inside the token."""
    if path.startswith("/fail"):
        return 500, b"try later"
    padding = b"." * (175 if path.endswith("-cut") else 0)
    return 400, b"refused: " + padding + f"{headers.get('Authorization')} {path}".encode()


@pytest.mark.qemu
def test_secrets_appear_in_no_output(tmp_path: Path) -> None:
    receiver = Receiver(secret=SECRETS["HOOK_SECRET"], answer=echo)
    rules = tmp_path / "rules.yaml"
    rules.write_text(SECRET_RULES.format(url=f"http://127.0.0.1:{receiver.port}"))
    events = tmp_path / "vm1.jsonl"
    events.write_text(json.dumps({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}))
    outputs: dict[str, str] = {}
    try:
        with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
            cfg = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))]}
            with Sidecar(tmp_path, cfg, env=SECRETS) as sidecar:
                sidecar.start().wait_log("vm1: connected")
                q.qmp.execute("stop")
                sidecar.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 3)
                outputs["/metrics"] = sidecar.get("/metrics")[1].decode()
                outputs["/healthz"] = sidecar.get("/healthz")[1].decode()
                assert sidecar.stop() == 0
            outputs["run -v"] = sidecar.log_text()
        state = str(tmp_path / "state")
        for name, argv in {
            "check": ["check", str(rules), "--config", str(sidecar.config_path)],
            "replay --explain": ["replay", str(events), "--rules", str(rules), "--explain"],
            "replay --execute": ["replay", str(events), "--rules", str(rules), "--execute"],
            "dlq list": ["dlq", "list", "--state-dir", state],
            "dlq list --json": ["dlq", "list", "--json", "--state-dir", state],
        }.items():
            if name.startswith(("check", "replay")):
                argv += ["--plugin-dir", str(tmp_path / "none")]
            result = cli(*argv, env=SECRETS)
            outputs[name] = result.stdout + result.stderr
        for f in (tmp_path / "state").iterdir():
            outputs[f.name] = f.read_bytes().decode("latin-1")
    finally:
        receiver.close()

    assert {name: leaks(text) for name, text in outputs.items()} == {name: [] for name in outputs}
    # ... and the outputs are the real thing, not empty:
    assert "webhook dead rule=hooked" in outputs["run -v"]
    assert "HTTP 400: refused: Bearer ***" in outputs["run -v"]  # the echo was logged, masked
    assert "***" in outputs["run -v"] and "***" in outputs["dlq list --json"]
    assert outputs["dlq list --json"].count('"action": "') == 3
    assert "qmp_reactor_dead_letters 3.0" in outputs["/metrics"]
    assert "seq 1 STOP vm=vm1: rule hooked: fired" in outputs["replay --explain"]
    assert "webhook failed rule=hooked" in outputs["replay --execute"]
    assert outputs["check"].startswith("ok: 1 rules")
    # Every request the sidecar signed verifies with the receiver's own recipe.
    assert receiver.bad_signatures == 0 and len(receiver.requests) >= 4


def test_a_secret_cut_short_in_an_error_is_still_masked(tmp_path: Path) -> None:
    receiver = Receiver(answer=echo)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: cut\n    on: STOP\n    actions:\n      - type: webhook\n"
        f"        with: {{url: '{receiver.url}-cut', headers: {{Authorization: "
        "'Bearer ${env:URL_TOKEN}'}}\n        retry: {attempts: 1}\n"
    )
    events = tmp_path / "vm1.jsonl"
    events.write_text(json.dumps({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}))
    try:
        result = cli("replay", str(events), "--rules", str(rules), "--execute",
                     "--plugin-dir", str(tmp_path / "none"), env=SECRETS)  # fmt: skip
    finally:
        receiver.close()
    assert "HTTP 400: refused: ....." in result.stderr
    assert leaks(result.stderr) == []


@pytest.mark.qemu
def test_signatures_verify_independently_and_an_old_one_is_refused(tmp_path: Path) -> None:
    secret = SECRETS["HOOK_SECRET"]
    receiver = Receiver(secret=secret)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: signed\n    on: STOP\n    actions:\n      - type: webhook\n"
        f"        with: {{url: '{receiver.url}', secret: '${{env:HOOK_SECRET}}'}}\n"
    )
    try:
        with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
            cfg = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))]}
            with Sidecar(tmp_path, cfg, env=SECRETS) as sidecar:
                sidecar.start().wait_log("vm1: connected")
                q.qmp.execute("stop")
                receiver.wait(lambda r: len(r.delivered) == 1, 20, "a signed delivery")
                assert sidecar.stop() == 0
    finally:
        receiver.close()
    headers, body = receiver.requests[0]
    stamp = int(headers["X-Reactor-Timestamp"])
    assert receiver.bad_signatures == 0 and abs(stamp - time.time()) < 60
    assert signature_ok(secret, headers, body, now=stamp + 300)
    assert not signature_ok(secret, headers, body, now=stamp + 301)  # a replay, later
    assert not signature_ok(secret, headers, body.replace(b"vm1", b"vm2"), now=stamp)
    assert not signature_ok("another-secret", headers, body, now=stamp)
    assert json.loads(body)["event"]["event"] == "STOP"


# -- the template sandbox ---------------------------------------------------------------

SANDBOX_RULES = """\
rules:
  - name: echo
    on: VSERPORT_CHANGE
    actions:
      - type: webhook
        with: {{url: "{url}", body: {{port: "{{{{ data.id }}}}", vm: "{{{{ vm }}}}"}}}}
  - name: escape
    on: VSERPORT_CHANGE
    actions:
      - type: webhook
        with: {{url: "{url}", body: "{{{{ data.__class__.__mro__[1].__subclasses__() }}}}"}}
        retry: {{attempts: 1}}
"""
HOSTILE_ID = "{{ 7*7 }}{% for x in range(3) %}x{% endfor %}${env:HOOK_SECRET}{{ ''.__class__ }}"


async def hostile_guest(peer: fakeqmp.Peer) -> None:
    """A guest names its virtio-serial port with template syntax and a secret reference."""
    await peer.handshake()
    await peer.answer_intro()
    await peer.send_event("VSERPORT_CHANGE", {"id": HOSTILE_ID, "open": False})
    await peer.serve_commands()


def test_guest_data_is_never_evaluated_and_rules_cannot_leave_the_sandbox(tmp_path: Path) -> None:
    receiver = Receiver()
    rules = tmp_path / "rules.yaml"
    rules.write_text(SANDBOX_RULES.format(url=receiver.url))
    sock = tmp_path / "guest1.qmp"
    try:
        with (
            PeerThread(sock, hostile_guest),
            Sidecar(tmp_path, {"rules": [str(rules)], "qmp": [str(sock)]}, env=SECRETS) as car,
        ):
            car.start()
            receiver.wait(lambda r: len(r.delivered) == 1, 20, "the echo")
            car.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 1)
            assert car.stop() == 0
        dlq = cli("dlq", "list", "--json", "--state-dir", str(tmp_path / "state"))
    finally:
        receiver.close()
    assert [json.loads(body) for _, body in receiver.requests] == [
        {"port": HOSTILE_ID, "vm": "guest1"}  # the characters, as the guest sent them
    ]
    (dead,) = json.loads(dlq.stdout)
    assert dead["rule"] == "escape" and "unsafe" in dead["last_error"]
    assert leaks(car.log_text() + dlq.stdout) == []


# -- exec and qmp -----------------------------------------------------------------------


def test_run_refuses_exec_and_off_allowlist_qmp_unless_configured(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: x\n    on: STOP\n    actions:\n"
        "      - {type: exec, with: {argv: [touch, /tmp/never]}}\n"
        "      - {type: qmp, with: {command: quit}}\n"
    )
    result = cli("run", "--rules", str(rules), "--state-dir", str(tmp_path / "state"),
                 "--plugin-dir", str(tmp_path / "none"))  # fmt: skip
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.match(rf"{re.escape(str(rules))}:5:\d+: error: exec: exec is disabled", errors[0])
    assert re.match(rf"{re.escape(str(rules))}:6:\d+: error: qmp: .*'quit'", errors[1])


@pytest.mark.qemu
def test_exec_stays_off_for_work_resumed_from_the_journal(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    script = f"if [ -e {first} ]; then touch {second}; else touch {first}; sleep 30; fi"
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: x\n    on: STOP\n    actions:\n"
        f"      - {{type: exec, with: {{argv: [sh, -c, {json.dumps(script)}]}}}}\n"
    )
    idle = tmp_path / "idle.yaml"
    idle.write_text("rules:\n  - {name: y, on: RESET, actions: [{type: log}]}\n")
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        cfg = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))],
               "actions": {"exec": {"enabled": True}}, "shutdown_grace": 0.2}  # fmt: skip
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            q.qmp.execute("stop")
            deadline = time.monotonic() + 20
            while not first.exists():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert sidecar.stop() == 0  # the exec is cut off and stays in the journal
        later = Sidecar(tmp_path, {"rules": [str(idle)]})  # exec off again
        with later:
            later.start().wait_log("resuming 1 unfinished invocations")
            later.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 1)
            assert later.stop() == 0
    dlq = json.loads(cli("dlq", "list", "--json", "--state-dir", str(tmp_path / "state")).stdout)
    assert not second.exists()
    assert [d["action"] for d in dlq] == ["exec"]
    assert "exec is disabled" in dlq[0]["last_error"]


# -- files other users can write --------------------------------------------------------


def fake_stat(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


def test_why_writable() -> None:
    me = os.geteuid()
    assert why_writable(fake_stat(0o100644, me)) is None
    assert why_writable(fake_stat(0o100666, me)) == "mode 0666: anyone can write it"
    assert why_writable(fake_stat(0o100644, 4242)) == "owned by user '4242'"
    assert why_writable(fake_stat(0o41777), directory=True) is None  # like /tmp
    assert why_writable(fake_stat(0o41777)) == "mode 1777: anyone can write it"
    assert why_writable(fake_stat(0o40777), directory=True) == "mode 0777: anyone can write it"


def test_check_warns_about_files_others_can_write(tmp_path: Path) -> None:
    rules_dir, plugins = tmp_path / "rules", tmp_path / "plugins"
    rules_dir.mkdir()
    plugins.mkdir()
    rule = rules_dir / "a.yaml"
    rule.write_text("rules:\n  - {name: a, on: STOP, actions: [{type: log}]}\n")
    plugin = plugins / "mine.py"
    plugin.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text("actions: {exec: {enabled: false}}\n")
    clean = cli("check", str(rules_dir), "--config", str(config), "--plugin-dir", str(plugins))
    assert (clean.returncode, clean.stderr) == (0, "")

    rule.chmod(0o666)
    plugin.chmod(0o646)
    os.chown(config, 4242, -1)
    rules_dir.chmod(0o777)
    warned = cli("check", str(rules_dir), "--config", str(config), "--plugin-dir", str(plugins))
    strict = cli("check", str(rules_dir), "--config", str(config), "--plugin-dir", str(plugins),
                 "--strict")  # fmt: skip
    assert warned.returncode == 0 and strict.returncode == 1
    assert sorted(warned.stderr.splitlines()) == sorted([
        f"{config}: warning: writable by other users (owned by user '4242'); "
        "the configuration decides what actions may do",
        f"{rules_dir}: warning: writable by other users (mode 0777: anyone can write it); {RULES}",
        f"{rule}: warning: writable by other users (mode 0666: anyone can write it); {RULES}",
        f"{plugin}: warning: writable by other users (mode 0646: anyone can write it); {PLUGINS}",
    ])  # fmt: skip
    assert strict.stderr.count(": error: writable by other users") == 4


def test_a_directory_above_that_others_can_write_is_named(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    rule = shared / "sub" / "a.yaml"
    rule.write_text("")
    shared.chmod(0o777)
    (found,) = path_warnings([rule], RULES)
    assert str(found) == (
        f"{shared}: warning: writable by other users (mode 0777: anyone can write it, "
        f"so files in it can be replaced); {RULES}"
    )
    shared.chmod(0o1777)  # sticky: others cannot replace what is ours
    assert path_warnings([rule], RULES) == []
    assert stat.S_IMODE(tmp_path.stat().st_mode) & stat.S_IWOTH == 0


def test_run_warns_before_it_loads_plugins(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "loud.py").write_text("import logging\nlogging.getLogger('x').error('PLUGIN RAN')\n")
    (plugins / "loud.py").chmod(0o666)
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: a, on: STOP, actions: [{type: log}]}\n")
    with Sidecar(tmp_path, {"rules": [str(rules)], "plugin_dirs": [str(plugins)],
                            "state_dir": str(state)}) as sidecar:  # fmt: skip
        sidecar.start().wait_log("ready: 1 rules")
        assert sidecar.stop() == 0
    log = sidecar.log_text()
    plugin_warning = log.index(f"{plugins / 'loud.py'}: warning: writable by other users")
    assert f"{state}: warning: writable by other users (mode 0777" in log
    assert "the journal decides which actions run" in log
    assert plugin_warning < log.index("PLUGIN RAN") < log.index("ready: 1 rules")


# -- the example systemd unit -----------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_example_unit_is_unprivileged_and_sandboxed(tmp_path: Path) -> None:
    from reactor.cli import build_parser
    from reactor.durations import parse_duration
    from reactor.service.config import load_config

    examples = REPO / "examples" / "systemd"
    unit = unit_settings(examples / "qmp-reactor.service")
    for key, value in {
        "User": "qmp-reactor", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "StateDirectory": "qmp-reactor",
        "StateDirectoryMode": "0700", "ReadWritePaths": "/run/qemu-qmp", "UMask": "0077",
    }.items():  # fmt: skip
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    # ExecStart is a command line this version understands, with the example configuration.
    argv = unit["ExecStart"][0].split()
    assert argv[0].endswith("/qmp-reactor")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.state_dir == "${STATE_DIRECTORY}"
    config = load_config(examples / "config.yaml")
    assert parse_duration(unit["TimeoutStopSec"][0]) > config.shutdown_grace + 5
    assert not config.actions.settings().exec_enabled
    assert config.metrics.listen == "127.0.0.1:9105" and config.listen is None
    result = cli("check", str(REPO / "reactor" / "data" / "rules"), "--config",
                 str(examples / "config.yaml"), "--plugin-dir", str(tmp_path / "none"))  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    tmpfiles = (examples / "qmp-reactor.tmpfiles.conf").read_text()
    assert "d /run/qemu-qmp 2750 root qmp-reactor -" in tmpfiles
