"""Per-cluster temp folders (IPC sockets, shared-memory segments, the engine core's sockets)
that say which process owns them: `afd-<kind>-<random>/.afd-owner` holds its pid and start time.
A process killed with SIGKILL cannot remove its folders, so every start removes those whose
owner no longer runs. The start time (field 22 of /proc/<pid>/stat) tells a reused pid from the
owner; folders of live owners, of other users and without a marker are never touched. (The
marker, not the name: ZMQ's IPC socket paths must stay under 108 bytes.)"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile

SHM = "/dev/shm"
KINDS = ("ipc", "shm", "core", "profile-ipc")
_NAME = re.compile(r"^afd-(?:ipc|shm|core|profile-ipc)-[a-z0-9_]+$")
MARKER = ".afd-owner"

log = logging.getLogger("afd.cleanup")


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot); None if it does not run (a zombie
    does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state) of proc(5); starttime is field 22
    return None if fields[0] == "Z" else int(fields[19])


def owned_dir(kind: str, folder: str | None = None) -> str:
    """A new folder owned by this process (in `folder`, else the temp folder); first removes
    the folders of dead owners, so a start cleans up after a crashed cluster."""
    assert kind in KINDS, kind
    remove_stale()
    path = tempfile.mkdtemp(prefix=f"afd-{kind}-", dir=folder)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write(f"{os.getpid()} {start_time(os.getpid())}\n")
    return path


def owner(path: str) -> tuple[int, int] | None:
    """(pid, start time) from a folder's marker; None without a readable one."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            pid, started = f.read().split()
        return int(pid), int(started)
    except (OSError, ValueError):
        return None


def shm_parent() -> str | None:
    """Where shared-memory segments go: /dev/shm (RAM) where there is one, else the temp
    folder (None)."""
    return SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None


def stale_dirs(parents: list[str] | None = None) -> list[str]:
    """This user's AFD folders in `parents` (default: the temp folder and /dev/shm) whose owner
    process no longer runs."""
    uid, found = os.getuid(), []
    for parent in parents or [tempfile.gettempdir(), SHM]:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if _NAME.match(name) is None:
                continue
            path = os.path.join(parent, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            owned = owner(path)
            if owned is not None and start_time(owned[0]) != owned[1]:
                found.append(path)
    return found


def remove_stale(parents: list[str] | None = None) -> list[str]:
    """Remove the folders stale_dirs finds; returns them."""
    removed = stale_dirs(parents)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        log.info("removed %d folder(s) of AFD clusters that no longer run: %s",
                 len(removed), ", ".join(removed))  # fmt: skip
    return removed
