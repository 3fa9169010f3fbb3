from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# Must be set before any @triton.jit is defined (Triton reads it at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Built-in models are generated once per test session, never into the user's cache. xdist workers
# inherit the controller's folder (builds into it are atomic renames under a file lock); whoever
# made the folder removes it when its session ends.
_OWN_CACHE = "AFD_CACHE_DIR" not in os.environ
os.environ.setdefault("AFD_CACHE_DIR", tempfile.mkdtemp(prefix="afd-test-cache-"))
# Benchmarks run by tests never write into the checkout's benchmarks/results/.
os.environ.setdefault("AFD_RESULTS_DIR", os.path.join(os.environ["AFD_CACHE_DIR"], "results"))

import pytest  # noqa: E402
import torch  # noqa: E402

import afd  # noqa: E402, F401  (takes the checkout off sys.path: its kernels/ hides a pip package)
from afd.comm.net import free_port  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Under `pytest -n N --dist loadgroup` every module runs whole on one xdist worker, in file
    order (README blocks build on earlier ones; module-scoped servers start once), and all
    modules with a slow multi-process test share one worker, so clusters never start side by
    side on a small machine."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    for item in items:
        name = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("multi-process" if name in slow else name))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE:
        shutil.rmtree(os.environ["AFD_CACHE_DIR"], ignore_errors=True)


def hf_greedy(model_dir, prompts: list[list[int]], new_tokens: int):
    """transformers' greedy tokens and raw log-softmax rows, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for p in prompts:
        with torch.no_grad():
            r = hf.generate(
                torch.tensor([p]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens.append(r.sequences[0, len(p) :].tolist())
        logprobs.append([torch.log_softmax(s[0].float(), -1) for s in r.logits])
    return tokens, logprobs


def mixed_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (3 + (7 * i) % 23,), generator=g).tolist() for i in range(n)]


def greedy_and_seeded(prompts: list[list[int]], lengths: int, min_len: int, seed: int) -> list:
    """(prompt, SamplingParams) pairs: even ones greedy, odd ones sampled with a seed of their
    own (both reproducible from request state alone), max_tokens from min_len up."""
    from afd import SamplingParams

    out = []
    for i, p in enumerate(prompts):
        n = min_len + i % lengths
        if i % 2:
            sp = SamplingParams(temperature=0.8, top_p=0.95, seed=seed + i, max_tokens=n,
                                ignore_eos=True)  # fmt: skip
        else:
            sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        out.append((p, sp))
    return out


def assert_cleaned_up(executor) -> None:
    """After a cluster's shutdown: no worker process (replaced ones too) is alive, and its
    /dev/shm segments and IPC sockets are gone."""
    sup = executor.supervisor
    for w in sup.workers + sup.retired:
        assert not w.process.is_alive(), f"{w.label} outlived the cluster"
    assert not os.path.exists(executor.layout.shm), "shm segments left behind"
    assert not os.path.exists(executor.layout.ipc), "IPC sockets left behind"


@pytest.fixture(scope="session")
def builtin_path():
    from afd.builtin import resolve_model

    return resolve_model


@contextlib.contextmanager
def launched(*args: str, timeout_s: float = 180.0, serve: bool = False, env: dict | None = None):
    """`afd launch --port PORT ARGS` (`afd serve` with serve=True) in its own process group:
    yields (base URL, process) once /health answers; Ctrl-C on exit, then SIGKILL to the group
    if it does not stop."""

    port = free_port()
    command = "serve" if serve else "launch"
    proc = subprocess.Popen(
        [sys.executable, "-m", "afd", command, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    proc.lines = []  # the launcher's output, read all along so its pipe never fills
    threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_healthy(base, proc, timeout_s, lambda: "".join(proc.lines))
        yield base, proc
    finally:
        stop(proc)


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float, output=lambda: "") -> None:
    """Until GET base/health answers 200; fails, with output(), if proc exits first or timeout_s
    pass."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"exited with code {proc.returncode}\n{output()}"
        assert time.monotonic() < deadline, f"not healthy within {timeout_s:.0f} s\n{output()}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C a launched cluster; SIGKILL its process group after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


KILL_SEED = 20261207  # the default: every run draws the same kill points unless told otherwise
CALIBRATION_IDLE_S = 0.03  # calibration_s() on the idle 2-core CI machine (AMD EPYC)


@pytest.fixture
def kill_rng() -> random.Random:
    """Where tests draw kill points from: seeded by $AFD_TEST_KILL_SEED (else KILL_SEED), and
    the seed printed, so a failure shows how to replay it."""
    seed = int(os.environ.get("AFD_TEST_KILL_SEED", KILL_SEED))
    print(f"kill points drawn with AFD_TEST_KILL_SEED={seed}")
    return random.Random(seed)


def calibration_s() -> float:
    """Median wall time of a fixed piece of single-thread work (matmuls and a Python loop), now:
    how fast this machine runs this test under whatever else runs on it."""

    def once() -> float:
        a = torch.ones(192, 192)
        t0 = time.perf_counter()
        for _ in range(100):
            a = (a @ a).clamp_(-1, 1)
        sum(i * i for i in range(300_000))
        return time.perf_counter() - t0

    return statistics.median(once() for _ in range(3))


@pytest.fixture
def bound():
    """bound(idle_s): a duration limit of idle_s on an idle machine, stretched by how much
    slower the calibration ran at this test's start (never tighter than idle_s)."""
    slowdown = max(1.0, calibration_s() / CALIBRATION_IDLE_S)
    print(f"duration bounds x{slowdown:.2f} (calibration)")
    return lambda idle_s: idle_s * slowdown


def hf_rows(model_dir, sequences: list[list[int]], dtype=torch.float32, device="cpu"):
    """transformers' log-softmax rows over each whole sequence (teacher forcing), float32:
    row j is the distribution of token j + 1 given tokens 0..j."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    rows = []
    for seq in sequences:
        with torch.no_grad():
            logits = hf(torch.tensor([seq], device=device)).logits[0]
        rows.append(torch.log_softmax(logits.float(), -1).cpu())
    return rows


def logprob_errors(prompts, outs, rows) -> tuple[list[float], list[float]]:
    """Per generated token of `outs` (one completion per prompt, logprobs on): |its logprob -
    the reference's| and the reference's margin of its best token over this one. `rows` are the
    reference's log-softmax rows over prompt + completion (hf_rows)."""
    deltas, margins = [], []
    for prompt, out, row in zip(prompts, outs, rows, strict=True):
        got = out.outputs[0]
        for j, tok in enumerate(got.token_ids):
            ref = row[len(prompt) - 1 + j]
            deltas.append(abs(got.logprobs[j][tok].logprob - float(ref[tok])))
            margins.append(float(ref.max() - ref[tok]))
    return deltas, margins


def check_bf16_logprobs(prompts, outs, ref_rows, yardstick_rows) -> dict:
    """The bf16 bounds: against the fp32 reference rows, the engine's logprob errors may be at
    most 1.5x as large on average (at least 0.002) and 2x at worst (at least 0.02) as those of
    transformers run in bf16 on the same tokens (yardstick_rows), and every chosen token must be
    the reference's best or within that worst-case bound of it (a near-tie)."""
    deltas, margins = logprob_errors(prompts, outs, ref_rows)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs, strict=True)]
    yard = []
    for seq, p, ref, y in zip(seqs, prompts, ref_rows, yardstick_rows, strict=True):
        yard += [
            abs(float(y[i, seq[i + 1]] - ref[i, seq[i + 1]]))
            for i in range(len(p) - 1, len(seq) - 1)
        ]
    missing = [d for d in deltas + yard if not math.isfinite(d)]
    assert not missing, "a chosen token is missing from the reference rows"
    mean_bound = max(1.5 * sum(yard) / len(yard), 0.002)
    max_bound = max(2 * max(yard), 0.02)
    stats = {
        "mean": sum(deltas) / len(deltas),
        "max": max(deltas),
        "mean_bound": mean_bound,
        "max_bound": max_bound,
        "worst_margin": max(margins),
    }
    assert stats["mean"] <= mean_bound and stats["max"] <= max_bound, stats
    assert stats["worst_margin"] <= max_bound, stats
    return stats
