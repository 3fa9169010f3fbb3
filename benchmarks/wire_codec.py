"""Encode + decode of one attention step plan (N plan entries) with the control plane's msgspec
records, unsigned and signed as they travel (comm/auth: HMAC-SHA256 and its check), against the
two codecs they replaced: the `@message` dataclass records and the `SCHEMAS` messages with
positional entries (both loaded from the `comm/wire.py` of a git revision before the change).
Run: `python -m afd.benchmarks.wire_codec [--rev REV]`; writes
`benchmarks/results/<machine>/wire-codec.json`."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from afd.results import write_result

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REV = "511a7a2"  # main before the msgspec records


def old_wire(rev: str) -> types.ModuleType:
    """comm/wire.py as it was at `rev` (the @message records and SCHEMAS)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:comm/wire.py"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    module = types.ModuleType("old_wire")
    sys.modules["old_wire"] = module  # dataclasses resolve annotations through sys.modules
    exec(compile(source, f"{rev}:comm/wire.py", "exec"), module.__dict__)
    return module


def old_records(old: types.ModuleType):
    """Dataclass mirrors of SampleSpec, PlanEntry and AttnStep, as @message records."""

    @dataclasses.dataclass
    class Spec:
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        min_p: float = 0.0
        seed: int | None = None
        logprobs: int | None = None

    @dataclasses.dataclass
    class Entry:
        seq_id: int
        tokens: list[int]
        start: int
        block_table: list[int]
        sample: bool = False
        params: Spec | None = None
        index: int = 0
        prompt_len: int = 0

    @old.message("bench_attn_step")
    @dataclasses.dataclass
    class Step:
        step: int
        micro_batches: list[list[Entry]]
        num_steps: int = 1
        release: list[int] = dataclasses.field(default_factory=list)
        trace: bool = False

    for cls in (Spec, Entry, Step):
        cls.__module__ = "old_wire"
        setattr(old, cls.__name__, cls)
    return Spec, Entry, Step


def median_us(fn, reps: int) -> float:
    for _ in range(max(1, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(entries: int, blocks: int, reps: int, rev: str) -> dict:
    from afd.comm import auth, wire
    from afd.comm.messages import AttnStep, PlanEntry, SampleSpec

    old = old_wire(rev)
    Spec, Entry, Step = old_records(old)
    table = [list(range(i * blocks, (i + 1) * blocks)) for i in range(entries)]
    start = blocks * 16 - 1
    new_plan = AttnStep(step=1, micro_batches=[[
        PlanEntry(i, [5], start, table[i], True, SampleSpec(temperature=0.7, top_p=0.9),
                  index=0, prompt_len=100)
        for i in range(entries)
    ]])  # fmt: skip
    old_plan = Step(step=1, micro_batches=[[
        Entry(i, [5], start, table[i], True, Spec(temperature=0.7, top_p=0.9), 0, 100)
        for i in range(entries)
    ]])  # fmt: skip
    params = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "seed": None,
              "logprobs": None, "index": 0, "prompt_len": 100}  # fmt: skip
    positional = [[i, [5], start, table[i], True, params] for i in range(entries)]
    schema = dict(step=1, micro_batches=[positional], release=[], imports=[], num_steps=1,
                  trace=False)  # fmt: skip
    key, tag = bytes(32), auth.plan_tag(0)
    sealer, opener = auth.Sealer(key), auth.Opener(tag, key)
    runs = {
        "msgspec_us": lambda: wire.decode_to_worker(wire.encode(new_plan)),
        # as the control plane sends it: signed (HMAC-SHA256, comm/auth) and checked
        "msgspec_signed_us": lambda: wire.decode_to_worker(
            opener.open(sealer.seal(tag, wire.encode(new_plan)))
        ),
        "message_dataclass_us": lambda: old.decode(old.encode(old_plan)),
        "schema_positional_us": lambda: old.decode(old.encode("attn_step", **schema)),
    }
    out: dict = {"entries": entries, "blocks_per_entry": blocks, "reps": reps, "baseline": rev}
    out["plan_bytes"] = len(wire.encode(new_plan))
    for name, fn in runs.items():
        out[name] = round(median_us(fn, reps), 1)
    out["signing_us"] = round(out["msgspec_signed_us"] - out["msgspec_us"], 1)
    out["dataclass_over_msgspec"] = round(out["message_dataclass_us"] / out["msgspec_us"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=32, help="block table length per entry")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rev", default=BASELINE_REV, help="git revision of the old codecs")
    args = ap.parse_args(argv)
    result = measure(args.entries, args.blocks, args.reps, args.rev)
    argv_used = ["python", "-m", "afd.benchmarks.wire_codec", *(argv or sys.argv[1:])]
    path = write_result("wire-codec", result, argv=argv_used[1:])
    print(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
