"""Where a colocated engine step spends its time, per component: py-spy samples of offline
`LLM.generate` (this process, single-process engine; the engine thread's samples only) folded by
profile_serve's FOLD_RULES, for decode at 16 and 64 running streams and for a prefill-only step
mix, per model; the host side also in ms per engine step.

    afd bench steps [--models tiny-qwen3-moe peer-qwen3-moe] [--phases ...] [--name N]

Writes benchmarks/results/<machine>/<name>.json through write_result (run it on a clean tree,
under the CPU lock)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from afd.benchmarks.profile_serve import Recorder, Sample, fold, format_profile, parse_raw

# phase -> (prompts, prompt tokens, new tokens): decode phases run short prompts long, so the
# prefill steps are a few percent of the samples; prefill asks one token of 128-token prompts.
PHASES = {
    "decode-16": (16, 16, 128),
    "decode-64": (64, 16, 64),
    "prefill-64x128": (64, 128, 1),
}


# the README's columns: a component's own share, the host side (everything but the model's
# layers) summed
MODEL_PARTS = {"attention": "attention", "MoE": "moe", "dense layers": "dense"}


def summary_row(model: str, phase: str, run: dict) -> dict:
    """One flat row of a run: tok/s and the shares of attention, MoE, dense layers, sampling and
    the rest of the host side (scheduling, input building, engine loop, waits, ...)."""
    shares = {c["component"]: c["share"] for c in run["components"]}
    row = {"model": model, "phase": phase, "tokens_per_s": run["tokens_per_s"]}
    row.update({key: shares.get(name, 0.0) for name, key in MODEL_PARTS.items()})
    row["sampling"] = shares.get("sampling", 0.0)
    row["host"] = 1.0 - sum(row[k] for k in (*MODEL_PARTS.values(), "sampling"))
    if run.get("steps"):  # the host side in time: its share of the mean step
        row["step_ms"] = run["generate_s"] / run["steps"] * 1000
        row["host_ms_per_step"] = row["host"] * row["step_ms"]
    return row


def _model_path(name: str) -> str:
    from afd.benchmarks.peer_models import PEER_MODELS, peer_model_path

    return str(peer_model_path(name)) if name in PEER_MODELS else name


def profile_phase(llm, phase: str, rate_hz: int, seed: int) -> dict:
    """One timed, sampled `generate` of the phase's prompts (greedy, EOS ignored)."""
    from afd import SamplingParams

    n, plen, new = PHASES[phase]
    g = torch.Generator().manual_seed(seed)
    vocab = llm.get_tokenizer().vocab_size
    prompts = [
        {"prompt_token_ids": torch.randint(10, vocab, (plen,), generator=g).tolist()}
        for _ in range(n)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # lazy inits stay out of the samples
    steps = _count_steps(llm.engine)
    with tempfile.TemporaryDirectory(prefix="afd-profile-") as tmp:
        rec = Recorder(shutil.which("py-spy") or "py-spy", os.getpid(), Path(tmp) / "raw.txt")
        rec.rate_hz = rate_hz
        rec.start()
        time.sleep(1.0)  # py-spy attaches in the background
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        rec.stop()
        text = (Path(tmp) / "raw.txt").read_text()
    del llm.engine.step  # the class's step again
    # only the thread that runs the engine: another thread's samples (tqdm's monitor, which
    # py-spy catches in its timed waits) are not part of a step
    folded = fold(thread_samples(parse_raw(text), threading.get_native_id()))
    folded.pop("rules")
    folded.pop("processes")
    return {
        "prompts": n,
        "prompt_tokens": plen,
        "new_tokens": new,
        "generate_s": seconds,
        "steps": steps[0],
        "tokens_per_s": n * (new if new > 1 else plen) / seconds,
        "py_spy": rec.command(),
        **folded,
    }


def thread_samples(samples: list[Sample], native_id: int) -> list[Sample]:
    """The samples of one thread (py-spy labels threads `thread (NATIVE_ID): NAME`); all of
    them where no label names it (a py-spy that labels threads otherwise)."""
    label = f"thread ({native_id})"
    mine = [s for s in samples if s.thread == label or s.thread.startswith(label + ":")]
    return mine or samples


def _count_steps(engine) -> list[int]:
    """Count the engine's steps from now on (the count is the returned list's one item)."""
    count, step = [0], engine.step

    def counted():
        out = step()
        count[0] += 1
        return out

    engine.step = counted
    return count


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `afd bench steps`."""
    p.add_argument(
        "--models",
        nargs="+",
        default=["tiny-qwen3-moe", "peer-qwen3-moe"],
        help="models to profile (built-in or peer names)",
    )
    p.add_argument(
        "--phases", nargs="+", default=list(PHASES), choices=list(PHASES), help="step kinds"
    )
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--name", default="profile-steps", help="result name")


def run(args: argparse.Namespace) -> int:
    """Profile each model's phases in this process, print the folds, write the result."""
    from afd import LLM
    from afd.results import check_clean, results_dir, write_result

    out = results_dir("cpu") / f"{args.name}.json"
    check_clean(out, args.allow_dirty)  # before minutes of profiling, not after
    runs, rows = {}, []
    for model in args.models:
        llm = LLM(model=_model_path(model), dtype="float32", seed=0, max_num_seqs=64)
        for phase in args.phases:
            r = profile_phase(llm, phase, args.rate, seed=1)
            runs[f"{model}/{phase}"] = r
            rows.append(row := summary_row(model, phase, r))
            print(
                f"== {model} {phase}: {r['generate_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, "
                f"{r['steps']} steps; host {row['host']:.1%} of the samples, "
                f"{row['host_ms_per_step']:.2f} ms of a {row['step_ms']:.1f} ms step"
            )
            print(format_profile(r, top=8))
        del llm
    payload = {"threads": torch.get_num_threads(), "phases": PHASES, "rows": rows, "runs": runs}
    print(f"wrote {write_result(args.name, payload, path=out)}")
    return 0
