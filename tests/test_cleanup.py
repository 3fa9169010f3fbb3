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


def _folder(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    (path / "segment").write_bytes(b"x" * 64)
    return path


def test_folders_of_dead_owners_go_and_live_or_foreign_ones_stay(tmp_path):
    me, dead = os.getpid(), _dead_pid()
    started = cleanup.start_time(me)
    stale = [
        _folder(tmp_path, f"afd-ipc-{dead}-{started}-abc123"),
        _folder(tmp_path, f"afd-shm-{dead}-1-x_y"),
        _folder(tmp_path, f"afd-core-{dead}-77-q"),
        _folder(tmp_path, f"afd-profile-ipc-{dead}-5-z"),
        _folder(tmp_path, f"afd-shm-{me}-{started + 1}-reused"),  # pid reused by this process
    ]
    kept = [
        _folder(tmp_path, f"afd-ipc-{me}-{started}-live"),  # a live cluster's
        _folder(tmp_path, "afd-ipc-j2nunw0v"),  # no owner in the name (an older AFD)
        _folder(tmp_path, f"afd-test-cache-{dead}-1-x"),
        _folder(tmp_path, f"other-ipc-{dead}-1-x"),
    ]
    plain = tmp_path / f"afd-shm-{dead}-1-file"  # a file, not a folder
    plain.write_text("")
    removed = cleanup.remove_stale([str(tmp_path)])
    assert sorted(removed) == sorted(map(str, stale))
    assert not any(p.exists() for p in stale)
    assert all((p / "segment").exists() for p in kept) and plain.exists()


def test_another_users_folders_stay(tmp_path, monkeypatch):
    path = _folder(tmp_path, f"afd-ipc-{_dead_pid()}-1-theirs")
    monkeypatch.setattr(cleanup.os, "getuid", lambda: os.stat(path).st_uid + 1)
    assert cleanup.remove_stale([str(tmp_path)]) == []
    assert path.exists()


def test_owned_dir_names_its_owner_and_first_sweeps(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = _folder(tmp_path, f"afd-core-{_dead_pid()}-1-old")
    made = Path(cleanup.owned_dir("ipc"))
    assert made.parent == tmp_path and not stale.exists()
    assert made.name.startswith(f"afd-ipc-{os.getpid()}-{cleanup.start_time(os.getpid())}-")
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
        if (m := cleanup._NAME.match(path.name)) and int(m[1]) in pids
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
    kinds = {cleanup._NAME.match(p.name)[0].split("-")[1] for p in left}
    assert kinds == {"core", "ipc", "shm"}, left
    assert all(p.exists() for p in left), "nothing to clean: the test would prove nothing"
    args = ("tiny-qwen3-moe", "--num-attention-workers", "0", "--dtype", "float32")
    with launched(*args, env=env) as (_, proc):
        assert not any(p.exists() for p in left), [p for p in left if p.exists()]
        assert _owned_by(_tree(proc.pid), parents), "the new start's own folders are gone"
