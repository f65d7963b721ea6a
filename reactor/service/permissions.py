"""Who else can change what the sidecar obeys: warnings for files writable by others.

Rules decide which VMs are restarted, the configuration turns on ``exec``,
plugins run code as the sidecar's user and the journal says which actions run
next. If another user can write any of them, that user can act with the
sidecar's rights. ``check`` and ``run`` (at start and on every reload) call
``path_warnings`` and report each finding as ``FILE: warning: writable by
other users (...)``.

"Other users" are anyone but root and the user running us: the world (mode
``o+w``), a group with members besides the owner (``g+w``), the owner of a file
who is neither, and anyone who can write a directory on the way without the
sticky bit (they can replace the file). Nothing is changed; nothing is refused.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from reactor.errors import Diagnostic, Location

RULES = "rules decide which VMs are restarted"
CONFIG = "the configuration decides what actions may do"
PLUGINS = "plugins run code as this user"
STATE = "the journal decides which actions run"


@cache
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@cache
def _group_has_others(gid: int, owner: int) -> tuple[bool, str]:
    """Whether group ``gid`` has members besides ``owner`` (and root); and its name."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return True, str(gid)
    members = set(group.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid}
    return bool(members - {_user(owner), "root"}), group.gr_name


def why_writable(st: os.stat_result, *, directory: bool = False) -> str | None:
    """Why users other than root and us can write a file with this status, or None."""
    mode = st.st_mode
    octal = f"mode {stat.S_IMODE(mode):04o}"
    if directory and mode & stat.S_ISVTX and st.st_uid in (0, os.geteuid()):
        return None  # like /tmp: others may add files there but not replace ours
    if mode & stat.S_IWOTH:
        return f"{octal}: anyone can write it"
    if mode & stat.S_IWGRP:
        others, name = _group_has_others(st.st_gid, st.st_uid)
        if others:
            return f"{octal}: group {name!r} can write it"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by user {_user(st.st_uid)!r}"
    return None


def _files(path: Path, suffixes: Sequence[str]) -> list[Path]:
    if not path.is_dir():
        return [path]
    found = [p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()]
    return [path, *sorted(found)]


def path_warnings(
    paths: Iterable[Path], role: str, suffixes: Sequence[str] = ()
) -> list[Diagnostic]:
    """Warnings for ``paths`` (a directory with its files ending in ``suffixes``) and for
    every directory above them that others can write. Missing paths are skipped."""
    found: dict[str, Diagnostic] = {}
    for given in paths:
        for path in _files(Path(given), suffixes):
            _check(path, role, found)
    return list(found.values())


def _check(path: Path, role: str, found: dict[str, Diagnostic]) -> None:
    try:
        real = path.resolve()
        st = real.stat()
    except (OSError, RuntimeError):
        return  # missing or a symlink loop: the loader reports it
    why = why_writable(st)  # a sticky bit does not help a directory we load every file of
    if why is not None and str(path) not in found:
        found[str(path)] = _warning(str(path), why, role)
    for parent in real.parents:
        key = str(parent)
        if key in found:
            continue
        try:
            pst = parent.stat()
        except OSError:
            continue
        why = why_writable(pst, directory=True)
        if why is not None:
            found[key] = _warning(key, f"{why}, so files in it can be replaced", role)


def _warning(file: str, why: str, role: str) -> Diagnostic:
    return Diagnostic(Location(file), f"writable by other users ({why}); {role}", "warning")


def obeyed_paths_warnings(
    *,
    config_file: Path | None,
    rules: Iterable[Path],
    plugin_dirs: Iterable[Path],
    state_dir: Path | None = None,
) -> list[Diagnostic]:
    """Warnings for everything the sidecar obeys, one per file or directory."""
    found = []
    if config_file is not None:
        found += path_warnings([config_file], CONFIG)
    found += path_warnings(rules, RULES, (".yaml", ".yml"))
    found += path_warnings(plugin_dirs, PLUGINS, (".py",))
    if state_dir is not None:
        found += path_warnings([state_dir], STATE, (".sqlite3",))
    return _unique(found)


def _unique(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """One warning per file (a directory shared by rules and plugins is named once)."""
    seen: dict[str, Diagnostic] = {}
    for d in diags:
        seen.setdefault(d.location.file, d)
    return list(seen.values())
