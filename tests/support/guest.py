"""Build (once) and cache the tiny Linux guest used by the real-QEMU tests.

The guest is Debian's cloud kernel plus a gzip'd newc initramfs holding a static busybox, a few
virtio/pvpanic modules and an ``/init`` script. It prints ``GUEST-READY`` on ttyS0 and then runs
a shell there, so tests drive it through the serial console of :class:`ThrowawayQemu`.

The result is cached in ``${QMP_REACTOR_CACHE:-~/.cache/qmp-reactor}/guest/`` as ``vmlinuz`` and
``initrd.img`` and only rebuilt when one of them is missing or lacks a module of ``MODULES``.
Building needs ``apt-get`` and ``dpkg`` (Debian packages ``linux-image-*-cloud-amd64`` and
``busybox-static``).

Run ``python -m tests.support.guest`` to build it ahead of time (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from reactor.demo.machine import ThrowawayQemu

READY_MARKER = "GUEST-READY"
PROMPT = "guest# "

# Modules the guest loads at boot (their dependencies are added and ordered automatically).
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_balloon",
    "virtio_blk",
    "pvpanic",
    "pvpanic-pci",
    "pvpanic-mmio",
)

DEFAULT_APPEND = "console=ttyS0 quiet loglevel=3 panic=0"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || echo "insmod $m failed"
done
mdev -s 2>/dev/null
hostname guest
export PS1='{PROMPT}'
echo {READY_MARKER}
while true; do
    setsid cttyhack sh
done
"""


def cache_dir() -> Path:
    """Directory holding the cached guest (``$QMP_REACTOR_CACHE/guest``)."""
    base = os.environ.get("QMP_REACTOR_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "qmp-reactor"
    return root / "guest"


# -- cpio ----------------------------------------------------------------------------------


class CpioWriter:
    """Minimal writer for the ``newc`` cpio format read by the kernel's initramfs unpacker."""

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 1
        self._mtime = int(time.time())

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            2 if mode & 0o170000 == 0o040000 else 1,  # nlink
            self._mtime,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        """Add a directory."""
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer."""
        self._entry("TRAILER!!!", 0)


# -- modules -------------------------------------------------------------------------------


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        raise RuntimeError(f"zstd-compressed module not supported: {path}")
    return data


def _module_depends(data: bytes) -> list[str]:
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if match is None or not match.group(1):
        return []
    return [d.decode() for d in match.group(1).split(b",") if d]


def _find_modules(moddir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        name = path.name.split(".ko")[0]
        found[name] = path
        found.setdefault(name.replace("-", "_"), path)
    return found


def resolve_modules(moddir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """Return ``(name, uncompressed .ko)`` for ``wanted`` and their dependencies, deps first."""
    available = _find_modules(moddir)
    builtin_text = ""
    builtin = moddir / "modules.builtin"
    if builtin.exists():
        builtin_text = builtin.read_text()
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        path = available.get(name) or available.get(key)
        if path is None:
            if re.search(rf"/{re.escape(name)}\.ko", builtin_text):
                return
            raise RuntimeError(f"kernel module {name} not found under {moddir}")
        data = _module_bytes(path)
        for dep in _module_depends(data):
            visit(dep)
        ordered.append((path.name.split(".ko")[0], data))

    for name in wanted:
        visit(name)
    return ordered


# -- packages ------------------------------------------------------------------------------


def _run(args: Sequence[str], cwd: Path | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def kernel_package() -> str:
    """Name of the versioned cloud kernel package behind ``linux-image-cloud-amd64``."""
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
        except RuntimeError:
            out = ""
        match = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-cloud-amd64)\b", out)
        if match:
            return match.group(1)
        if attempt == 0:
            _run(["apt-get", "update"])
    raise RuntimeError("cannot find the cloud kernel package (apt-cache depends)")


def _download(packages: Sequence[str], workdir: Path) -> list[Path]:
    # apt-get download falls back to running unsandboxed (with a warning) when the _apt
    # user cannot write here; let it write
    os.chmod(workdir, 0o777)
    try:
        _run(["apt-get", "download", *packages], cwd=workdir)
    except RuntimeError:
        # stale package lists name versions the mirror no longer has
        _run(["apt-get", "update"])
        _run(["apt-get", "download", *packages], cwd=workdir)
    debs = sorted(workdir.glob("*.deb"))
    if len(debs) < len(packages):
        raise RuntimeError(f"apt-get download gave {debs}, wanted {packages}")
    return debs


def build_guest(dest: Path | None = None) -> tuple[Path, Path]:
    """Download and unpack the packages and write ``vmlinuz`` and ``initrd.img`` into ``dest``."""
    dest = cache_dir() if dest is None else dest
    dest.mkdir(parents=True, exist_ok=True)
    kpkg = kernel_package()
    with tempfile.TemporaryDirectory(prefix="qmp-reactor-guest-") as tmp:
        work = Path(tmp)
        debs = _download([kpkg, "busybox-static"], work)
        root = work / "root"
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(root)])
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        moddir = next((root / "lib" / "modules").iterdir())
        busybox = (root / "bin" / "busybox").read_bytes()
        modules = resolve_modules(moddir, MODULES)

        raw = io.BytesIO()
        cpio = CpioWriter(raw)
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp"):
            cpio.directory(d)
        for d in ("etc", "lib", "lib/modules", "root", "run"):
            cpio.directory(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", busybox, 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("etc/modules.order", "".join(f"{n}\n" for n, _ in modules).encode())
        for name, data in modules:
            cpio.file(f"lib/modules/{name}.ko", data)
        cpio.finish()

        initrd_tmp = dest / "initrd.img.tmp"
        initrd_tmp.write_bytes(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))
        kernel_tmp = dest / "vmlinuz.tmp"
        shutil.copyfile(vmlinuz, kernel_tmp)
        (dest / "kernel-package.txt").write_text(
            f"{kpkg}\n{moddir.name}\nmodules: {' '.join(n for n, _ in modules)}\n"
        )
        os.replace(kernel_tmp, dest / "vmlinuz")
        os.replace(initrd_tmp, dest / "initrd.img")
    return dest / "vmlinuz", dest / "initrd.img"


def guest_image(force: bool = False) -> tuple[Path, Path]:
    """Return ``(vmlinuz, initrd.img)`` of the cached guest, building it first if missing."""
    dest = cache_dir()
    kernel, initrd = dest / "vmlinuz", dest / "initrd.img"
    if force or not (kernel.exists() and initrd.exists()) or _missing_modules(dest):
        return build_guest(dest)
    return kernel, initrd


def _missing_modules(dest: Path) -> bool:
    """Whether the cached initrd lacks a module of ``MODULES`` (it was built by an older list)."""
    manifest = dest / "kernel-package.txt"
    if not manifest.exists():
        return True
    built = {
        name.replace("-", "_")
        for line in manifest.read_text().splitlines()
        if line.startswith("modules:")
        for name in line.split()[1:]
    }
    return any(m.replace("-", "_") not in built for m in MODULES)


@contextmanager
def booted_guest(
    *,
    name: str | None = "guest",
    extra_qmp: Sequence[str] = (),
    devices: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    panic_pause: bool = False,
    quorum: bool = False,
    append: str = DEFAULT_APPEND,
    ready_timeout: float = 60.0,
) -> Iterator[ThrowawayQemu]:
    """Start QEMU with the tiny guest, wait for ``GUEST-READY`` and a shell prompt; yield it."""
    kernel, initrd = guest_image()
    qemu = ThrowawayQemu(
        name=name,
        extra_qmp=extra_qmp,
        kernel=kernel,
        initrd=initrd,
        append=append,
        devices=devices,
        extra_args=extra_args,
        panic_pause=panic_pause,
        quorum=quorum,
    )
    try:
        qemu.expect(READY_MARKER, ready_timeout)
        qemu.expect(re.escape(PROMPT), ready_timeout)
        yield qemu
    finally:
        qemu.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Build the guest (``--force`` to rebuild) and optionally boot it once (``--boot``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--boot", action="store_true", help="boot it once and time it")
    args = parser.parse_args(argv)
    start = time.monotonic()
    kernel, initrd = guest_image(force=args.force)
    print(f"kernel: {kernel} ({kernel.stat().st_size} bytes)")
    print(f"initrd: {initrd} ({initrd.stat().st_size} bytes)")
    print(f"ready in {time.monotonic() - start:.1f} s")
    if args.boot:
        start = time.monotonic()
        with booted_guest() as qemu:
            print(f"booted to a shell in {time.monotonic() - start:.1f} s")
            print(qemu.run_in_guest("uname -r; lsmod | wc -l"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
