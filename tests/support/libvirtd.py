"""A private libvirtd (and virtlogd) for the tests, with the tiny guest as a libvirt domain.

``Libvirtd`` starts both daemons as children of the test process (never through
systemd), with libvirtd's sockets in a temporary directory, and stops them by
PID; ``restart`` stops libvirtd alone and starts it again (its domains keep
running). ``domain_xml`` describes the tiny guest as a TCG domain libvirt runs
without tainting it: direct kernel boot, the serial console and a virtio-serial
channel on unix sockets, ``<panic model='isa'/>`` (the guest loads
``pvpanic-mmio``; libvirt 9.0 has no ``pvpanic-pci`` model) and
``<on_crash>preserve</on_crash>``, so a panic leaves the domain paused.

``virsh`` runs the ``virsh`` client against the private daemon. Only one such
libvirtd runs on a machine at a time: its drivers keep their state (and pid
files) in ``/run/libvirt`` whatever the socket directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape, quoteattr

from tests.support.guest import guest_image

START_TIMEOUT = 120.0
"""The first start probes QEMU's capabilities (~8 s idle); a busy machine takes longer."""


def available() -> bool:
    """Whether libvirtd, virtlogd and virsh are installed, and libvirt-python in this
    interpreter (a fresh virtual environment on a machine that has libvirtd lacks it)."""
    importlib.invalidate_caches()  # .ci/libvirt may have installed it since the start
    tools = all(shutil.which(tool) for tool in ("libvirtd", "virtlogd", "virsh"))
    return tools and importlib.util.find_spec("libvirt") is not None


def install() -> None:
    """Run ``.ci/libvirt`` (root only): libvirtd and its tools, and libvirt-python into
    this interpreter's environment."""
    script = Path(__file__).resolve().parents[2] / ".ci" / "libvirt"
    subprocess.run([str(script)], check=True, env={**os.environ, "PYTHON": sys.executable})


class Libvirtd:
    """libvirtd and virtlogd, children of this process, with sockets under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.run_dir = workdir / "run"
        self.log_dir = workdir / "log"
        for d in (self.run_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "libvirtd.conf"
        self.conf.write_text(
            f'unix_sock_dir = "{self.run_dir}"\n'
            'unix_sock_ro_perms = "0777"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_ro = "none"\n'
            'auth_unix_rw = "none"\n'
            f'log_outputs = "3:file:{self.log_dir}/libvirtd.log"\n'
        )
        self.uri = f"qemu:///system?socket={self.run_dir}/libvirt-sock"
        self.ro_uri = f"qemu:///system?socket={self.run_dir}/libvirt-sock-ro"
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start virtlogd (unless one serves its fixed socket), then libvirtd."""
        if self.virtlogd is None and not _answers("/run/libvirt/virtlogd-sock"):
            Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
            self.virtlogd = self._spawn(["virtlogd", "-p", str(self.run_dir / "virtlogd.pid")])
        self.start_libvirtd()

    def start_libvirtd(self) -> None:
        """Start libvirtd and wait until ``virsh version`` answers."""
        argv = ["libvirtd", "-f", str(self.conf), "-p", str(self.run_dir / "libvirtd.pid")]
        self.libvirtd = self._spawn(argv)
        deadline = time.monotonic() + START_TIMEOUT
        while self.virsh("version", check=False).returncode != 0:
            if self.libvirtd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop_libvirtd(self) -> None:
        """Stop libvirtd by PID (its QEMU domains keep running)."""
        _stop(self.libvirtd)
        self.libvirtd = None

    def restart(self) -> None:
        """Stop libvirtd and start it again."""
        self.stop_libvirtd()
        self.start_libvirtd()

    def close(self) -> None:
        """Destroy every running domain, then stop libvirtd and virtlogd."""
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            for name in self.virsh("list", "--name", check=False).stdout.split():
                self.virsh("destroy", name, check=False)
        self.stop_libvirtd()
        _stop(self.virtlogd)
        self.virtlogd = None

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c URI ARGS``; raise with its output when ``check`` and it fails."""
        result = subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
        return result

    def log_tail(self, lines: int = 30) -> str:
        """The end of libvirtd's log."""
        path = self.log_dir / "libvirtd.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def domain_log(self, name: str) -> str:
        """The QEMU log libvirt keeps for domain ``name`` (where it records taints)."""
        path = Path("/var/log/libvirt/qemu") / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{argv[0]}.out").open("ab")
        with log:
            return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class GuestFiles:
    """Copies of the tiny guest's kernel and initrd (libvirt chowns them while a domain runs)
    in a temporary directory QEMU (as ``libvirt-qemu``) can reach and create its sockets in
    (pytest's own are private to root); ``close`` removes it."""

    def __init__(self) -> None:
        kernel, initrd = guest_image()
        self.dir = Path(tempfile.mkdtemp(prefix="libvirt-guest-"))
        os.chmod(self.dir, 0o1777)
        self.kernel = self.dir / "vmlinuz"
        self.initrd = self.dir / "initrd.img"
        shutil.copyfile(kernel, self.kernel)
        shutil.copyfile(initrd, self.initrd)
        for path in (self.kernel, self.initrd):
            os.chmod(path, 0o644)

    def close(self) -> None:
        """Remove the directory."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def serial(self, name: str) -> Path:
        """Where domain ``name``'s serial console listens."""
        return self.dir / f"{name}.serial"

    def channel(self, name: str) -> Path:
        """Where domain ``name``'s virtio-serial channel (``org.test.portA``) listens."""
        return self.dir / f"{name}.portA"

    def qmp(self, name: str) -> Path:
        """Where a second, direct QMP monitor of ``name`` listens (``direct_qmp`` only)."""
        return self.dir / f"{name}.qmp"


def domain_xml(name: str, files: GuestFiles, *, direct_qmp: bool = False) -> str:
    """A transient TCG domain running the tiny guest.

    ``direct_qmp`` adds a second QMP monitor on ``files.qmp(name)`` through
    ``<qemu:commandline>`` (which taints the domain): only the benchmark
    comparing libvirt's delivery with a direct socket wants it.
    """
    extra = ""
    ns = ""
    if direct_qmp:
        ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
        chardev = f"socket,id=direct,path={files.qmp(name)},server=on,wait=off"
        extra = (
            "<qemu:commandline>"
            f"<qemu:arg value='-chardev'/><qemu:arg value={quoteattr(chardev)}/>"
            "<qemu:arg value='-mon'/><qemu:arg value='chardev=direct,mode=control'/>"
            "</qemu:commandline>"
        )
    return f"""<domain type='qemu'{ns}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(files.kernel))}</kernel>
    <initrd>{escape(str(files.initrd))}</initrd>
    <cmdline>console=ttyS0 quiet loglevel=3 panic=0</cmdline>
  </os>
  <on_crash>preserve</on_crash>
  <devices>
    <serial type='unix'>
      <source mode='bind' path={quoteattr(str(files.serial(name)))}/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path={quoteattr(str(files.channel(name)))}/>
      <target type='virtio' name='org.test.portA'/>
    </channel>
    <panic model='isa'/>
    <memballoon model='none'/>
  </devices>
  {extra}
</domain>
"""
