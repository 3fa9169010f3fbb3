"""Where a serving run's time goes: py-spy samples of the server's processes under load, folded
into components (HTTP and streaming, tokenization, scheduling, input building, attention, MoE,
sampling, detokenization, transport, waits, ...) by the table FOLD_RULES. `afd bench peer
--profile` records and folds; the folding is here, in one place, so that a change of the engine
only needs a change of the table."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPONENTS = (
    "HTTP and streaming",
    "tokenization",
    "scheduling",
    "input building",
    "attention",
    "MoE",
    "dense layers",
    "sampling",
    "detokenization",
    "transport",
    "waits",
    "engine loop",
    "other",
)

# (component, file regex, function regex): a sample belongs to the component of the innermost
# frame that some rule matches (rules tried in this order for each frame, leaf to root), so a
# kernel called from the engine's step counts as that kernel, not as the step. Files are matched
# on py-spy's shortened paths (`kernels/torch_ops.py`, `uvicorn/protocols/http/h11_impl.py`).
FOLD_RULES: tuple[tuple[str, str, str], ...] = (
    # blocked in a wait (busy or, with --profile-idle, sleeping)
    ("waits", r"(^|/)threading\.py$", r"wait|join|acquire"),
    ("waits", r"(^|/)(queue|selectors)\.py$", r"get|select"),
    ("waits", r"multiprocessing/(connection|synchronize|queues)\.py$", r"wait|poll|recv|get"),
    ("waits", r"zmq/", r"poll|recv"),
    ("waits", r"(^|/)comm/", r"(?i)wait|poll|_read_record"),
    # the model's compute, by kind of layer
    ("attention", r"(^|/)kernels/", r"attention|store_kv|rotary|rope|_gather_pages"),
    ("attention", r"(^|/)afd/models/attention\.py$", r""),
    ("attention", r"(^|/)afd/models/layers\.py$", r"RotaryEmbedding"),
    ("attention", r"(^|/)afd/models/model\.py$", r"attention_part"),
    ("MoE", r"(^|/)kernels/", r"moe|silu_and_mul|fp8"),
    ("MoE", r"(^|/)afd/models/layers\.py$", r"Router|ExpertShard|MoE"),
    ("MoE", r"(^|/)afd/models/model\.py$", r"ExpertShardModel|ffn_part"),
    ("MoE", r"(^|/)expert_nodes/", r""),
    ("dense layers", r"(^|/)kernels/", r"rms_norm|linear"),
    ("dense layers", r"(^|/)afd/models/", r""),
    ("dense layers", r"torch/nn/modules/(linear|normalization|sparse|activation)\.py$", r""),
    ("dense layers", r"torch/nn/functional\.py$", r""),
    # the host side of a step
    ("sampling", r"(^|/)afd/sampling/", r""),
    ("sampling", r"(^|/)attention_nodes/plan_runner\.py$", r"sample"),
    ("input building", r"(^|/)attention_nodes/plan_runner\.py$", r"build_micro_batch"),
    ("input building", r"(^|/)scheduler/cluster(/executor)?\.py$", r"plan_entry"),
    # profiles of code before the one input builder (afd/engine/model_runner.py)
    ("sampling", r"(^|/)afd/engine/model_runner\.py$", r"sample"),
    ("sampling", r"(^|/)attention_nodes/worker\.py$", r"sample"),
    ("input building", r"(^|/)afd/engine/model_runner\.py$", r"prepare|ModelInputs"),
    ("input building", r"(^|/)attention_nodes/worker\.py$", r"build_micro_batch"),
    ("input building", r"(^|/)kernels/metadata\.py$", r""),
    ("detokenization", r"(^|/)afd/tokenizer\.py$", r"Detokenizer|decode|Stop|id_to_token|stop"),
    ("detokenization", r"(^|/)afd/engine/llm_engine\.py$", r"_token_text|output"),
    ("detokenization", r"(^|/)afd/outputs\.py$", r""),
    ("tokenization", r"(^|/)afd/tokenizer\.py$", r""),
    ("tokenization", r"(^|/)(tokenizers|transformers)/", r""),
    ("scheduling", r"(^|/)scheduler/(core/)?(scheduler|block_manager|sequence)\.py$", r""),
    ("scheduling", r"(^|/)scheduler/(planner/)?step_model\.py$", r""),
    ("scheduling", r"(^|/)afd/engine/(engine_scheduler|prefill_router)\.py$", r""),
    ("scheduling", r"(^|/)afd/engine/llm_engine\.py$", r"add_request|abort|_plan|_place|_pick"),
    ("transport", r"(^|/)comm/", r""),
    ("transport", r"(^|/)(msgpack|numpy)/", r""),
    # serving HTTP: the app, the server and its event loop
    ("HTTP and streaming", r"(^|/)afd/entrypoints/", r""),
    ("HTTP and streaming", r"(^|/)(uvicorn|starlette|fastapi|h11|httptools|anyio|pydantic)", r""),
    ("HTTP and streaming", r"(^|/)(asyncio|json|prometheus_client)/", r""),
    ("engine loop", r"(^|/)(afd/engine|attention_nodes|scheduler)/", r""),
)
_COMPILED = [(c, re.compile(f), re.compile(fn)) for c, f, fn in FOLD_RULES]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# which process a sample comes from, by the frames it passes through
_ROLES = (
    ("prefill worker", r"(^|/)attention_nodes/prefill_worker\.py$"),
    ("attention worker", r"(^|/)attention_nodes/"),
    ("expert worker", r"(^|/)expert_nodes/"),
    ("server (HTTP + engine)", r"(^|/)(afd/entrypoints|afd/engine|uvicorn)/"),
)


@dataclass
class Sample:
    """One line of py-spy's raw output: a stack (root first), its count, process and thread."""

    frames: list[tuple[str, str]]  # (function, file)
    count: int
    process: str = ""
    thread: str = ""


def parse_raw(text: str) -> list[Sample]:
    """py-spy `--format raw` (collapsed stacks, `frame;frame;... COUNT`, with the `process ...`
    and `thread (...)` roots of --subprocesses and --threads) into samples."""
    samples = []
    for line in text.splitlines():
        stack, sep, count = line.rstrip().rpartition(" ")
        if not sep or not count.isdigit():
            continue
        s = Sample([], int(count))
        for part in stack.split(";"):
            if part.startswith("process ") and not s.frames and not s.thread:
                s.process = part[len("process ") :]
            elif part.startswith("thread (") and not s.frames:
                s.thread = part
            else:
                m = _FRAME.match(part)
                s.frames.append((m["func"], m["file"]) if m else (part, ""))
        samples.append(s)
    return samples


def classify(frames: list[tuple[str, str]]) -> tuple[str, str]:
    """(component, the frame that decided it) of one stack, by FOLD_RULES."""
    for func, file in reversed(frames):
        for component, file_re, func_re in _COMPILED:
            if file_re.search(file) and func_re.search(func):
                return component, f"{func} ({file})"
    leaf = frames[-1] if frames else ("<no python frame>", "")
    return "other", f"{leaf[0]} ({leaf[1]})"


def _role(samples: list[Sample]) -> str:
    files = {f for s in samples for _, f in s.frames}
    for role, pattern in _ROLES:
        if any(re.search(pattern, f) for f in files):
            return role
    return "other"


def fold(samples: list[Sample], top: int = 25) -> dict[str, Any]:
    """Samples per component (and per process, thread and deciding frame) as shares of all."""
    total = sum(s.count for s in samples) or 1
    by_comp: Counter[str] = Counter()
    by_frame: Counter[tuple[str, str]] = Counter()
    by_thread: Counter[str] = Counter()
    procs: dict[str, list[Sample]] = {}
    for s in samples:
        component, frame = classify(s.frames)
        by_comp[component] += s.count
        by_frame[(component, frame)] += s.count
        by_thread[f"{s.process} {s.thread}".strip()] += s.count
        procs.setdefault(s.process, []).append(s)

    def shares(counter: Counter[str], n: int) -> list[dict]:
        return [
            {"component": c, "samples": by, "share": by / n}
            for c, by in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    processes = []
    for proc, group in procs.items():
        n = sum(s.count for s in group)
        comp = Counter()
        for s in group:
            comp[classify(s.frames)[0]] += s.count
        processes.append(
            {
                "process": proc,
                "role": _role(group),
                "samples": n,
                "share": n / total,
                "components": shares(comp, n),
            }
        )
    processes.sort(key=lambda p: -p["samples"])
    return {
        "samples": sum(s.count for s in samples),
        "components": shares(by_comp, total),
        "processes": processes,
        "threads": [
            {"thread": t, "samples": n, "share": n / total} for t, n in by_thread.most_common(top)
        ],
        "top_frames": [
            {"component": c, "frame": f, "samples": n, "share": n / total}
            for (c, f), n in by_frame.most_common(top)
        ],
        "rules": [list(r) for r in FOLD_RULES],
    }


def format_profile(folded: dict[str, Any], top: int = 10) -> str:
    """A short table: share of samples per component, then the frames that took the most."""
    lines = [f"{'component':<22}{'samples':>9}{'share':>8}"]
    for c in folded["components"]:
        lines.append(f"{c['component']:<22}{c['samples']:>9}{c['share']:>8.1%}")
    lines.append(f"top frames of {folded['samples']} samples:")
    for f in folded["top_frames"][:top]:
        lines.append(f"  {f['share']:6.1%}  {f['component']:<20} {f['frame'][:90]}")
    return "\n".join(lines)


@dataclass
class Recorder:
    """`py-spy record` attached to a running process (and its children) until stop()."""

    py_spy: str
    pid: int
    out: Path
    rate_hz: int = 50
    idle: bool = False
    log: Path | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)
    started: float = field(default=0.0, init=False)

    def start(self) -> None:
        """Start sampling (returns at once; py-spy attaches in the background)."""
        cmd = [self.py_spy, "record", "--pid", str(self.pid), "--rate", str(self.rate_hz)]
        cmd += ["--format", "raw", "--output", str(self.out), "--subprocesses", "--threads"]
        cmd += ["--idle"] if self.idle else []
        log = open(self.log or os.devnull, "w")  # noqa: SIM115 -- closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.started = time.monotonic()

    def command(self) -> list[str]:
        """The py-spy command line (for the result file)."""
        return list(self.proc.args) if self.proc else []

    def stop(self, timeout_s: float = 60.0) -> float:
        """Stop sampling (SIGINT makes py-spy write its file); returns seconds sampled."""
        if self.proc is None:
            return 0.0
        elapsed = time.monotonic() - self.started
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return elapsed
