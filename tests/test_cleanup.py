"""Clean after a crash (issue 22 item 5): a start removes the temp folders of AFD clusters whose
owner process is gone, and only those (comm/cleanup)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import launched

from afd.comm import cleanup


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(parent: Path, name: str, owner: str | None) -> Path:
    path = parent / name
    path.mkdir()
    (path / "segment").write_bytes(b"x" * 64)
    if owner is not None:
        (path / cleanup.MARKER).write_text(owner)
    return path


def test_folders_of_dead_owners_go_and_live_or_foreign_ones_stay(tmp_path):
    me, dead = os.getpid(), _dead_pid()
    started = cleanup.start_time(me)
    stale = [
        _folder(tmp_path, "afd-ipc-abc123", f"{dead} {started}"),
        _folder(tmp_path, "afd-shm-x_y", f"{dead} 1"),
        _folder(tmp_path, "afd-core-q", f"{dead} 77\n"),
        _folder(tmp_path, "afd-profile-ipc-z", f"{dead} 5"),
        _folder(tmp_path, "afd-shm-reused", f"{me} {started + 1}"),  # pid reused by this process
    ]
    kept = [
        _folder(tmp_path, "afd-ipc-live", f"{me} {started}"),  # a live cluster's
        _folder(tmp_path, "afd-ipc-j2nunw0v", None),  # no marker (an older AFD, or being made)
        _folder(tmp_path, "afd-ipc-garbled", "not a pid"),
        _folder(tmp_path, "afd-test-cache-x", f"{dead} 1"),
        _folder(tmp_path, "other-ipc-x", f"{dead} 1"),
    ]
    plain = tmp_path / "afd-shm-file"  # a file, not a folder
    plain.write_text("")
    removed = cleanup.remove_stale([str(tmp_path)])
    assert sorted(removed) == sorted(map(str, stale))
    assert not any(p.exists() for p in stale)
    assert all((p / "segment").exists() for p in kept) and plain.exists()


def test_another_users_folders_stay(tmp_path, monkeypatch):
    path = _folder(tmp_path, "afd-ipc-theirs", f"{_dead_pid()} 1")
    monkeypatch.setattr(cleanup.os, "getuid", lambda: os.stat(path).st_uid + 1)
    assert cleanup.remove_stale([str(tmp_path)]) == []
    assert path.exists()


def test_owned_dir_names_its_owner_and_first_sweeps(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = _folder(tmp_path, "afd-core-old", f"{_dead_pid()} 1")
    made = cleanup.owned_dir("ipc")
    assert Path(made).parent == tmp_path and not stale.exists()
    assert Path(made).name.startswith("afd-ipc-")
    assert cleanup.owner(made) == (os.getpid(), cleanup.start_time(os.getpid()))
    assert cleanup.stale_dirs([str(tmp_path)]) == []


def test_start_time_tells_a_dead_pid():
    assert cleanup.start_time(os.getpid()) is not None
    assert cleanup.start_time(_dead_pid()) is None


def _tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid] + [q for p in out.split() for q in _tree(int(p))]


def _owned_by(pids: list[int], parents: list[Path]) -> list[Path]:
    return [
        path
        for parent in parents
        for path in parent.iterdir()
        if (owner := cleanup.owner(str(path))) is not None and owner[0] in pids
    ]


@pytest.mark.slow
def test_a_start_after_sigkill_removes_what_the_killed_cluster_left(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    parents = [tmp, Path(cleanup.SHM)]
    with launched("--dtype", "float32", "--max-model-len", "256", env=env) as (_, proc):
        pids = _tree(proc.pid)
        left = _owned_by(pids, parents)
        os.killpg(proc.pid, signal.SIGKILL)  # launcher, engine core and workers: nothing unwinds
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(cleanup.start_time(p) is not None for p in pids):
            assert time.monotonic() < deadline, "processes outlived SIGKILL"
            time.sleep(0.2)
    kinds = {p.name.split("-")[1] for p in left}
    assert kinds == {"core", "ipc", "shm"}, left
    assert all(p.exists() for p in left), "nothing to clean: the test would prove nothing"
    args = ("tiny-qwen3-moe", "--num-attention-workers", "0", "--dtype", "float32")
    with launched(*args, env=env) as (_, proc):
        assert not any(p.exists() for p in left), [p for p in left if p.exists()]
        assert _owned_by(_tree(proc.pid), parents), "the new start's own folders are gone"
