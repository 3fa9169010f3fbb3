"""`afd bench offline`: offline `LLM.generate` (the single-process engine, greedy, EOS ignored)
on the built-in models, this checkout against the code of a git revision (`--baseline`), in
alternating rounds of fresh processes, so that outside load and warm caches fall on both sides.
Each run is `peer_offline.py afd` (the offline round of `afd bench peer`); the baseline's code is
unpacked from git into a temporary folder and imported first (PYTHONPATH)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from io import BytesIO
from pathlib import Path
from statistics import mean, median
from typing import Any

from afd.builtin import BUILTIN_MODELS, VOCAB_SIZE

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(BUILTIN_MODELS), help="comma-separated")
    p.add_argument("--baseline", default=None, help="git revision to compare against")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every side")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per process")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts per generate call")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (EOS ignored)")
    p.add_argument("--dtype", default="float32", help="of the weights and the KV cache")
    p.add_argument("--seed", type=int, default=0, help="of the prompts")
    p.add_argument("--name", default="offline", help="result name (NAME.json)")
    p.add_argument("--output", default=None, help="result JSON path (default: benchmarks/results)")


def prompts(num: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids of the built-in vocabulary, past its special tokens."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(16, VOCAB_SIZE) for _ in range(length)] for _ in range(num)]


def unpack_revision(rev: str, dest: Path) -> Path:
    """The code of `rev` as an importable `afd` package under dest (folders mapped as the
    revision's pyproject `package-dir` says); returns the folder to put on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev],
                             capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    src = dest / "src"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    package_dir = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg = dest / "pkg"
    for name, folder in sorted(package_dir["package-dir"].items()):
        target = pkg / Path(*name.split("."))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src / folder, target)
    return pkg


def one_run(side: str, pythonpath: Path | None, job_path: Path, out: Path) -> dict[str, Any]:
    """One fresh process of `peer_offline.py afd` on the job; its result."""
    script = Path(__file__).with_name("peer_offline.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # -P: the script's folder holds kernels.py, which would hide the package transformers imports
    cmd = [sys.executable, "-P", str(script), "afd", str(job_path), str(out)]
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["process_s"] = time.monotonic() - t0
    result["side"] = side
    return result


def summarise(runs: list[dict], models: list[str], sides: list[str]) -> list[dict]:
    """Median (a moment of outside load hits one call, not the figure) and mean output tok/s per
    model and side over every timed call; whether every call's greedy tokens equal the first's."""
    rows = []
    for model in models:
        mine = [w for r in runs if r["model"] == model for w in r["workloads"].values()]
        same = all(w["tokens"] == mine[0]["tokens"] for w in mine)
        for side in sides:
            ws = [w for r in runs if r["model"] == model and r["side"] == side
                  for w in r["workloads"].values()]  # fmt: skip
            rows.append({
                "model": model, "side": side, "calls": len(ws),
                "median_output_tok_s": median(w["output_tok_s"] for w in ws),
                "mean_output_tok_s": mean(w["output_tok_s"] for w in ws),
                "median_generate_s": median(w["generate_s"] for w in ws),
                "tokens_equal_across_runs": same,
            })  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> int:
    """Entry point of `afd bench offline`."""
    from afd.benchmarks.results import check_clean, results_dir, write_result

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in BUILTIN_MODELS]
    if unknown or not models or args.rounds < 1 or args.repeats < 1:
        names = ", ".join(BUILTIN_MODELS)
        raise ValueError(
            f"--models: built-in models only ({names}); --rounds, --repeats: at least 1"
        )
    out_path = Path(args.output) if args.output else results_dir() / f"{args.name}.json"
    check_clean(out_path, args.allow_dirty)  # before measuring: a long run must not fail at its end
    workload = {"prompts": prompts(args.num_prompts, args.input_len, args.seed),
                "max_tokens": args.output_len}  # fmt: skip
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="afd-bench-offline-") as tmp:
        sides: dict[str, Path | None] = {"current": None}
        if args.baseline:
            sides = {"baseline": unpack_revision(args.baseline, Path(tmp)), "current": None}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))  # who goes first
            for model, side in ((m, s) for m in models for s in order):
                job = Path(tmp) / "job.json"
                job.write_text(json.dumps({"model": model, "dtype": args.dtype, "seed": 0,
                    "max_model_len": args.input_len + args.output_len + 16,
                    "workloads": {f"call{i}": workload for i in range(args.repeats)}}))  # fmt: skip
                got = one_run(side, sides[side], job, Path(tmp) / "out.json")
                got.update(model=model, round=r)
                runs.append(got)
                tok_s = " ".join(f"{w['output_tok_s']:7.1f}" for w in got["workloads"].values())
                print(f"round {r} {model:18s} {side:8s} out tok/s {tok_s}", flush=True)
    summary = summarise(runs, models, list(sides))
    for row in summary:
        print(f"{row['model']:18s} {row['side']:8s} {row['median_output_tok_s']:8.1f} out tok/s  "
              f"tokens equal: {row['tokens_equal_across_runs']}")  # fmt: skip
    for run_ in runs:  # the tokens were compared above; the file keeps the figures
        for w in run_["workloads"].values():
            w.pop("tokens")
    payload = {"baseline": args.baseline, "models": models, "num_prompts": args.num_prompts,
               "input_len": args.input_len, "output_len": args.output_len, "dtype": args.dtype,
               "rounds": args.rounds, "repeats": args.repeats, "runs": runs,
               "summary": summary}  # fmt: skip
    print(f"wrote {write_result(args.name, payload, path=out_path)}")
    return 0
