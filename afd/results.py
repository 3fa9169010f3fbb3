"""Results as data: a benchmark or profile run writes one JSON file,
`benchmarks/results/<machine>/<name>.json`, with the command, commit, machine and date inside,
so that every published figure can name the file it comes from."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

# afd/ sits in the checkout root (pyproject package-dir); in a wheel its parent is no checkout
_CHECKOUT = Path(__file__).resolve().parent.parent
PROVENANCE = frozenset({"name", "command", "commit", "machine", "date", "allow_dirty"})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str = "cpu") -> str:
    """A folder name for this machine: the GPU's name on CUDA (`nvidia-h100-80gb-hbm3`), else
    `cpu-<cores>core-<model>` (`cpu-2core-amd-epyc-7b13`)."""
    if device.startswith("cuda"):
        import torch

        return _slug(torch.cuda.get_device_name(torch.device(device)))
    model = re.sub(r"\b\d+-core processor\b|\bprocessor\b|\(r\)|\(tm\)", "", cpu_model().lower())
    return f"cpu-{os.cpu_count()}core-{_slug(model)}"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What a reader needs to place a number: CPU, cores, memory, GPU, library versions."""
    import torch

    info: dict[str, Any] = {
        "name": machine_name(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError, AttributeError):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the checkout this code runs from, with `-dirty` when it has local changes to
    anything but result files (`benchmarks/results/`: data, so that one run's new result does
    not make the next run's code look changed)."""
    try:
        git = ["git", "-C", str(repo or _CHECKOUT)]
        sha = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":/",
                ":!/benchmarks/results",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return None


def results_dir(device: str = "cpu") -> Path:
    """`benchmarks/results/<machine>/` of the checkout (or `./results/<machine>/` when AFD is
    installed from a wheel, where the package folder is no checkout); `$AFD_RESULTS_DIR`
    replaces the root (the tests point it at a temporary folder)."""
    override = os.environ.get("AFD_RESULTS_DIR")
    if override:
        return Path(override) / machine_name(device)
    root = _CHECKOUT / "benchmarks" / "results" if (_CHECKOUT / ".git").exists() else None
    return (root or Path.cwd() / "results") / machine_name(device)


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: `afd bench pipeline ...`."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["afd", *args])


ALLOW_DIRTY = "--allow-dirty"


def add_allow_dirty(parser) -> None:
    """`--allow-dirty` on a command that writes a result (`afd bench ...`, `afd profile`)."""
    parser.add_argument(
        ALLOW_DIRTY,
        action="store_true",
        help="write the result into the checkout although it has uncommitted changes "
        "(the file records it)",
    )


def _inside_checkout(path: Path) -> bool:
    """Whether `path` lies in the git checkout AFD runs from, where a result could be committed."""
    root = _CHECKOUT
    return (root / ".git").exists() and path.resolve().is_relative_to(root.resolve())


def check_clean(path: str | Path, allow_dirty: bool = False) -> str | None:
    """The commit a result written to `path` records; a ValueError when that result would land
    in the checkout from code with uncommitted changes and `allow_dirty` is not given (a bench
    calls it before measuring too, so that a long run does not fail at its end)."""
    commit = git_commit()
    dirty = commit is not None and commit.endswith("-dirty")
    if dirty and not allow_dirty and _inside_checkout(Path(path)):
        raise ValueError(
            f"{path}: the checkout has uncommitted changes, so the result would not match its "
            f"commit; commit first, or pass {ALLOW_DIRTY}"
        )
    return commit


def write_result(
    name: str,
    payload: dict[str, Any],
    *,
    device: str = "cpu",
    path: str | Path | None = None,
    argv: list[str] | None = None,
    allow_dirty: bool | None = None,
) -> Path:
    """Write `payload` with its provenance (command, commit, machine, date) to `path`, default
    `results_dir(device)/<name>.json`; returns the path written. `check_clean` decides on a
    checkout with uncommitted changes; `allow_dirty` defaults to whether the recorded command
    says `--allow-dirty`, and a dirty result written with it records `"allow_dirty": true`."""
    clash = PROVENANCE & payload.keys()
    if clash:
        raise ValueError(f"result payload keys {sorted(clash)} would hide the provenance")
    out = Path(path) if path is not None else results_dir(device) / f"{name}.json"
    command = command_line(argv)
    if allow_dirty is None:
        allow_dirty = ALLOW_DIRTY in command.split()
    commit = check_clean(out, allow_dirty)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "command": command,
        "commit": commit,
        "machine": machine_info(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **({"allow_dirty": True} if allow_dirty and str(commit).endswith("-dirty") else {}),
        **payload,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), for the benchmark and planner plots; matplotlib
    is the `bench` extra, so without it this is a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'afd[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
