"""`afd profile`: measure this machine on a model's own layers and fit compact cost models.

Measured (seconds, median of a few runs each, after a warm-up call; the fastest of a few more
where every core runs the op, see `layer_timing`):
* attention side of one MoE layer and one dense layer against decode batch and context
  (one thread, as a worker runs; and with every core, as the single-process engine runs),
* expert shard of one MoE layer against routed rows and experts held (both thread counts),
* sampling (final norm, lm_head, sampler) and micro-batch preparation against batch,
* dispatch and combine of the chosen transport against bytes, between two processes,
* how much each side slows while the other runs at the same time (two processes),
* host time of a scheduling step against batch (the real engine; plus plan messages),
* prefill forward against prompt tokens.
Each quantity is fitted as a non-negative linear combination of a few features (1, batch,
batch x context, ...), weighted for relative error; the raw points are kept beside the fits.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from afd.scheduler.planner.step_model import ModelShape, dispatch_row_bytes

PROFILE_VERSION = 1
FEATURES = {
    # "context": paged attention walks the block columns once per micro-batch, whatever its size
    "attention": ("1", "batch", "context", "batch*context"),
    "expert": ("1", "active", "pairs"),
    "sample": ("1", "batch"),
    "prep": ("1", "batch", "batch*context"),
    "transfer": ("1", "bytes"),
    "host": ("1", "batch"),
    "plan": ("1", "batch", "batch*context"),
    "prefill": ("1", "tokens", "tokens^2"),
}


def features(kind: str, **x: float) -> list[float]:
    """The feature row of one point of fit `kind`."""
    out = []
    for name in FEATURES[kind]:
        if name == "1":
            out.append(1.0)
        elif "*" in name:
            a, b = name.split("*")
            out.append(float(x[a]) * float(x[b]))
        elif name.endswith("^2"):
            out.append(float(x[name[:-2]]) ** 2)
        else:
            out.append(float(x[name]))
    return out


def fit(kind: str, points: list[dict]) -> dict:
    """Non-negative least squares of the points' `seconds` on the kind's features, relative
    error (every row divided by its time): small and large points count alike."""
    from scipy.optimize import nnls

    rows = np.array([features(kind, **p) for p in points], dtype=float)
    y = np.array([p["seconds"] for p in points], dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    coef, _ = nnls(rows * w[:, None], y * w)
    pred = rows @ coef
    return {
        "features": list(FEATURES[kind]),
        "coef": coef.tolist(),
        "max_rel_error": float(np.max(np.abs(pred - y) / np.maximum(y, 1e-9))),
        "points": points,
    }


def evaluate(f: dict, kind: str, **x: float) -> float:
    return float(np.dot(f["coef"], features(kind, **x)))


_FLUSH: list = []


def _flush_caches() -> None:
    """Read 64 MB so the next op finds its weights and KV in memory, not in the CPU caches:
    a worker runs every layer in turn, so each layer's data is cold when it comes round. Read,
    not written: the layer before leaves clean lines, while a written flush leaves the caches
    dirty and the op pays their write-back, which overstated the memory-bound points."""
    import torch

    if not _FLUSH:
        _FLUSH.append(torch.zeros(16 * 2**20))
    _FLUSH[0].sum()


def _timeit(
    fn: Callable[[], Any],
    reps: int,
    reduce: Callable[[list[float]], float] = statistics.median,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """`fn`'s time over `reps` cold-cache runs after a warm-up call, reduced by `reduce`."""
    fn()  # warm-up: allocations, lazy init
    samples = []
    for _ in range(reps):
        _flush_caches()
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return reduce(samples)


def layer_timing(threads: int, reps: int) -> tuple[int, Callable[[list[float]], float], int]:
    """Repetitions, their reduction and passes over the grid for layer points timed with
    `threads` threads. With every core busy, another process on the machine stretches runs
    (10-35x on the shared 2-core machine), often for seconds on end: the fastest of the runs of
    three passes, seconds apart, is the op's own time; a one-thread op keeps a core to itself,
    so the median of a few runs in one pass serves."""
    if threads > 1:
        return reps, min, 3
    return reps, statistics.median, 1


def fastest(passes: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Point by point, the fastest of several passes over the same points."""
    seconds = lambda p: p["seconds"]  # noqa: E731
    return {
        kind: [min(ps, key=seconds) for ps in zip(*(r[kind] for r in passes), strict=True)]
        for kind in passes[0]
    }


def decode_meta(batch: int, context: int, block_size: int):
    """Decode metadata: `batch` sequences at `context` tokens, each in its own run of blocks
    (as a fresh engine allocates them)."""
    from afd.kernels.metadata import AttentionMetadata

    per_seq = -(-context // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    return AttentionMetadata.build([1] * batch, [context] * batch, tables, block_size)


def grid(max_tokens: int, max_context: int) -> list[tuple[int, int]]:
    """(batch, context) points: batches 8..512 at short context, long contexts at small
    batches, every point within max_tokens cached tokens."""
    pts = [(8, 64), (32, 64), (128, 64), (512, 64), (32, 512), (128, 256), (256, 256)]
    pts += [(64, 1024), (16, 2048), (512, 256)]
    return [(b, c) for b, c in pts if b * c <= max_tokens and c <= max_context]


class _LayerBench:
    """One decoder layer of the model with a one-layer KV cache, timed in this process."""

    def __init__(self, path: Path, dtype, max_tokens: int, block_size: int = 16):
        import torch

        from afd.config import ModelConfig
        from afd.loader import load_model
        from afd.models import allocate_kv_cache

        self.cfg = ModelConfig.from_pretrained(path)
        self.model = load_model(path, dtype=dtype, device="cpu")
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = block_size
        self.num_blocks = max_tokens // block_size + 1024
        one = allocate_kv_cache(self.cfg, self.num_blocks, block_size, self.dtype, "cpu")
        self.kv = one[0]  # layer 0's shapes serve every layer
        self.gen = torch.Generator().manual_seed(0)
        self.reduce: Callable[[list[float]], float] = statistics.median  # layer_timing
        layers = list(self.model.layers)
        self.moe_layer = next((layer for layer in layers if layer.is_moe), None)
        self.dense_layer = next((layer for layer in layers if not layer.is_moe), None)

    def attention(self, moe: bool, batch: int, context: int, reps: int) -> float:
        import torch

        layer = self.moe_layer if moe else self.dense_layer
        meta = decode_meta(batch, context, self.block_size)
        h = torch.randn(batch, self.cfg.hidden_size, generator=self.gen).to(self.dtype)
        pos = torch.full((batch,), context - 1, dtype=torch.int64)

        @torch.inference_mode()
        def run():
            x, _ = layer.attention_part(h, h, pos, meta, self.kv)
            if moe:
                layer.mlp.gate(x)
                layer.mlp.shared(x)
            else:
                layer.ffn_part(x)

        return _timeit(run, reps, self.reduce)

    def expert(self, tokens: int, held: int, reps: int) -> dict:
        import torch

        from afd.kernels import ops

        cfg, shard = self.cfg, self.moe_layer.mlp.experts
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        x = torch.randn(tokens, cfg.hidden_size, generator=self.gen).to(self.dtype)
        ids = torch.rand(tokens, e, generator=self.gen).topk(k, dim=-1).indices
        weights = torch.full((tokens, k), 1.0 / k)
        local = torch.where(ids < held, ids, -1)  # this shard holds experts [0, held)
        w13, w2 = shard.w13[:held], shard.w2[:held]
        seconds = _timeit(
            torch.inference_mode()(lambda: ops.fused_moe(x, w13, w2, weights, local)),
            reps,
            self.reduce,
        )
        pairs = int((local >= 0).sum())
        active = int(torch.unique(local[local >= 0]).numel())
        return {
            "tokens": tokens,
            "held": held,
            "pairs": pairs,
            "active": active,
            "seconds": seconds,
        }

    def sample(self, batch: int, reps: int) -> float:
        import torch

        from afd.sampling.params import SamplingParams
        from afd.sampling.sampler import Sampler

        h = torch.randn(batch, self.cfg.hidden_size, generator=self.gen).to(self.dtype)
        params, gens, sampler = [SamplingParams(temperature=0)] * batch, [None] * batch, Sampler()

        @torch.inference_mode()
        def run():
            sampler(self.model.compute_logits(self.model.final_norm(h, h)), params, gens)

        return _timeit(run, reps, self.reduce)

    def prep(self, batch: int, context: int, reps: int) -> float:
        from afd.attention_nodes.plan_runner import build_micro_batch

        entries = decode_entries(decode_sequences(batch, context, self.block_size))

        def run():
            mb = build_micro_batch(entries, self.block_size, "cpu")
            self.model.embed(mb.input_ids)

        return _timeit(run, reps)

    def prefill(self, tokens: int, reps: int) -> float:
        import torch

        from afd.kernels.metadata import AttentionMetadata
        from afd.models import allocate_kv_cache

        blocks = -(-tokens // self.block_size)
        kv = allocate_kv_cache(self.cfg, blocks + 1, self.block_size, self.dtype, "cpu")
        meta = AttentionMetadata.build([tokens], [tokens], [list(range(blocks))], self.block_size)
        ids = torch.randint(3, self.cfg.vocab_size, (tokens,), generator=self.gen)
        pos = torch.arange(tokens)
        return _timeit(torch.inference_mode()(lambda: self.model(ids, pos, meta, kv)), reps)


def decode_sequences(batch: int, context: int, block_size: int) -> list:
    """`batch` greedy sequences about to decode their token at position `context`, each with
    its own run of blocks, as the driver's scheduler holds them."""
    from afd.sampling.params import SamplingParams
    from afd.scheduler.core.sequence import Sequence

    params = SamplingParams(temperature=0)
    per_seq = -(-(context + 1) // block_size)
    seqs = []
    for i in range(batch):
        seq = Sequence(f"profile-{i}", 0, [5] * context, params)
        seq.append_token(5, None)
        seq.num_computed_tokens = context
        seq.block_table = list(range(i * per_seq, (i + 1) * per_seq))
        seqs.append(seq)
    return seqs


def decode_entries(seqs: list) -> list:
    """The driver's plan entries of one decode token per sequence."""
    from afd.scheduler.cluster.executor import plan_entry

    return [plan_entry(seq, 1, sample=True) for seq in seqs]


def _canned_attention_worker():
    """The attention worker's own result building (AttentionWorker.run) over a step that
    samples token 7 for every entry instead of running a model."""
    from types import SimpleNamespace

    from afd.attention_nodes.worker import AttentionWorker
    from afd.comm.messages import AttnStep, Sampled
    from afd.timing import StageClock

    class Canned(AttentionWorker):
        def __init__(self):
            self.transport = SimpleNamespace(stats={"bytes_sent": 0, "bytes_received": 0})

        def step(self, plan: AttnStep, errors: list | None = None):
            clock = StageClock(plan.trace, "cpu")
            start = clock.now()
            seq_ids = [e.seq_id for mb in plan.micro_batches for e in mb]
            sampled = [[Sampled(s, 7) for s in seq_ids] for _ in range(plan.num_steps)]
            clock.total("attention_plan", start, clock.now())
            return sampled, [], clock

    return Canned()


class _ControlPair:
    """The driver's channel to one attention worker and that worker's own channel
    (comm/control.WorkerChannel), over IPC as the disaggregated executor binds them."""

    def __init__(self):
        from types import SimpleNamespace

        from afd.comm import cleanup
        from afd.comm.control import WorkerChannel
        from afd.scheduler.cluster.executor import DriverChannel

        self.folder = cleanup.owned_dir("profile-ipc")
        inbox, driver = f"ipc://{self.folder}/w0", f"ipc://{self.folder}/driver"
        # the layout fields a driver channel reads, the WorkerSpec fields a worker channel reads
        layout = SimpleNamespace(
            world_size=1, driver_addr=lambda: driver, inbox_addr=lambda rank: inbox,
            role=lambda rank: "attention",
        )  # fmt: skip
        self.driver = DriverChannel(layout)
        self.driver.bind_outboxes()
        spec = SimpleNamespace(rank=0, inbox_addrs={0: inbox}, driver_addr=driver)
        self.channel = WorkerChannel(spec, "attention")
        self.channel.gen = 0

    def send(self, msg) -> None:
        self.driver.send(0, msg)

    def recv(self):
        from afd.comm import wire

        return wire.decode_from_worker(self.driver.recv())

    def close(self) -> None:
        import shutil

        self.channel.close()
        self.driver.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def plan_message_seconds(batch: int, context: int, block_size: int, reps: int) -> float:
    """What the disaggregated driver adds per scheduling step for `batch` sequences: its plan
    entries and `attn_step`, through IPC to the worker's channel, the worker's `attn_result`
    and its way back, each message encoded and checked as driver and worker do."""
    from afd.comm.messages import AttnStep

    seqs = decode_sequences(batch, context, block_size)
    worker, pair = _canned_attention_worker(), _ControlPair()

    def run():
        pair.send(AttnStep(step=1, micro_batches=[decode_entries(seqs)]))
        plan = pair.channel.recv()
        kind, fields = worker.run(plan)
        pair.channel.send(kind, step=plan.step, **fields)  # as comm/control.serve does
        pair.recv()

    try:
        return _timeit(run, reps)
    finally:
        pair.close()


def host_points(path: Path, dtype: str, batches: list[int], threads: int) -> list[dict]:
    """Scheduler-side time of a decode step of the single-process engine (wall time of
    `engine.step()` minus its model execution), at each batch."""
    import torch

    from afd.entrypoints.llm import LLM
    from afd.sampling.params import SamplingParams

    torch.set_num_threads(threads)
    top = max(batches)
    llm = LLM(
        str(path),
        dtype=dtype,
        max_num_seqs=top,
        num_kv_blocks=top * 4 + 8,
        max_num_batched_tokens=max(512, top * 4),
    )
    eng = llm.engine
    executor = eng.executor
    inner, spent = executor.execute, [0.0]

    def timed(*args):
        t0 = time.perf_counter()
        out = inner(*args)
        spent[0] += time.perf_counter() - t0
        return out

    executor.execute = timed
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    points, added = [], 0
    try:
        for b in sorted(batches):
            for _ in range(b - added):
                eng.add_request([5, 6, 7, 8], params, stream=False)
            added = b
            while any(s.num_waiting for s in eng.schedulers) or any(
                seq.num_output_tokens == 0 for s in eng.schedulers for seq in s.running
            ):
                eng.step()
            samples = []
            for _ in range(6):
                spent[0] = 0.0
                t0 = time.perf_counter()
                eng.step()
                samples.append(time.perf_counter() - t0 - spent[0])
            points.append({"batch": b, "seconds": statistics.median(samples[1:])})
    finally:
        llm.shutdown()
    return points


# ---- two processes: transfers and interference ----------------------------------------------


def _interference_rounds(role: str, bench: _LayerBench, job: dict, barrier) -> list[list[float]]:
    """[solo, both] median op times of this side per round: each round runs each side alone,
    then both at once, on the same work. Short alternating rounds put a moment of outside load
    into one round's pair, not into every `both` sample at once."""
    b, c = job["interference_point"]
    experts = bench.cfg.n_routed_experts
    rounds = []
    for _ in range(job["interference_rounds"]):
        solo: list[float] = []
        both: list[float] = []
        for phase in ("attention", "expert", "both"):
            barrier.wait()
            if phase not in (role, "both"):
                continue
            samples = both if phase == "both" else solo
            t_end = time.perf_counter() + job["interference_s"]
            while time.perf_counter() < t_end:
                if role == "attention":
                    samples.append(bench.attention(True, b, c, 1))
                else:
                    samples.append(bench.expert(b * 4, experts, 1)["seconds"])
        rounds.append([statistics.median(solo), statistics.median(both)])
    return rounds


def interference_ratio(rounds: list[list[float]]) -> float:
    """A side's slowdown with the other running: the median over rounds of both / solo (at
    least 1), so one round that outside load hit moves it by one rank, not its size."""
    return max(1.0, statistics.median(both / solo for solo, both in rounds))


def _pair_worker(role: str, spec: bytes, bench_spec: dict, barrier, queue) -> None:
    """One of the two processes of the transfer and interference measurements: a worker of
    a 1A1F cluster (its spec from scheduler/cluster.worker_spec), joined to generation 0 with
    the world and transport a real worker builds."""
    import torch

    torch.set_num_threads(1)
    import msgspec

    from afd.comm import dist as afd_dist
    from afd.comm import wire
    from afd.comm.control import init_world, transport_for
    from afd.comm.dispatch import exchange_tag
    from afd.config import ModelConfig

    spec = msgspec.structs.replace(wire.decode_spec(spec), rank=0 if role == "attention" else 1)
    cfg = ModelConfig.from_pretrained(spec.model_path)
    init_world(spec, 0)
    transport = transport_for(spec, cfg, "cpu", 0)
    job = bench_spec
    bench = _LayerBench(Path(job["path"]), job["dtype"], job["max_tokens"])
    dtype, k, gen = bench.dtype, cfg.num_experts_per_tok, torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"transfer": []}
    reps = job["reps"]
    with torch.inference_mode():
        for rows in job["rows"]:
            x = torch.randn(rows, cfg.hidden_size, generator=gen).to(dtype)
            ids = torch.rand(rows, cfg.n_routed_experts, generator=gen).topk(k, -1).indices
            w = torch.full((rows, k), 1.0 / k)
            calls, trips = [], []
            for rep in range(reps + 1):
                tag = exchange_tag(0, rep % 2)
                barrier.wait()
                if role == "attention":
                    t0 = time.perf_counter()
                    h = transport.dispatch(x, ids, w, tag)
                    t1 = time.perf_counter()
                    transport.combine(h)
                    t2 = time.perf_counter()
                    calls.append(t1 - t0)
                    trips.append(t2 - t0)
                else:
                    b = transport.receive([0], tag)
                    t0 = time.perf_counter()
                    transport.send_back(b, b.x.clone(), tag)
                    calls.append(time.perf_counter() - t0)
                    transport.flush()
            nbytes = rows * dispatch_row_bytes(cfg.hidden_size, dtype.itemsize, k)
            trip = statistics.median(trips[1:]) if trips else None
            out["transfer"].append(
                {"rows": rows, "bytes": nbytes, "call": statistics.median(calls[1:]), "trip": trip}
            )
        out["rounds"] = _interference_rounds(role, bench, job, barrier)
    barrier.wait()
    transport.close()
    afd_dist.destroy_world()
    queue.put((role, out))


def pair_measurements(path: Path, dtype: str, backend: str, max_tokens: int, quick: bool) -> dict:
    """Transfers between two processes over `backend` and the interference of both sides."""
    import shutil
    from datetime import timedelta

    import torch.distributed as dist

    from afd.comm import wire
    from afd.comm.control import generation_dir
    from afd.config import EngineConfig, ModelConfig
    from afd.scheduler.cluster.executor import layout_for, worker_spec

    model_config = ModelConfig.from_pretrained(path)
    config = EngineConfig.from_flat(model=str(path), dtype=dtype, comm_backend=backend,
                                    num_attention_workers=1, num_expert_workers=1,
                                    num_kv_blocks=1)  # fmt: skip
    layout = layout_for(config, model_config)
    spec = worker_spec(config, path, model_config, layout)
    raw_spec = wire.encode(spec)  # as workers get theirs: bytes, decoded in the child
    bench_spec = {
        "path": str(path),
        "dtype": dtype,
        "max_tokens": 128 * 256,
        "reps": 5 if quick else 15,
        "rows": [8, 64, 512, 2048],
        "interference_point": (128, 256),
        "interference_rounds": 3 if quick else 5,
        "interference_s": 0.3 if quick else 0.4,
    }
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_pair_worker, args=(r, raw_spec, bench_spec, barrier, queue), daemon=True
        )  # fmt: skip
        for r in ("attention", "expert")
    ]
    store = None  # the driver's part: the rendezvous store and generation 0's folder
    try:
        store = dist.TCPStore(layout.host, layout.port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=60))  # fmt: skip
        folder = generation_dir(layout.shm, 0)
        if folder:
            os.makedirs(folder, exist_ok=True)
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for d in (layout.shm, layout.ipc):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        del store
    a, f = got["attention"], got["expert"]
    transfers = []
    for ra, rf in zip(a["transfer"], f["transfer"], strict=True):
        # the link part: what the round trip spends beyond both sides' copies, each way
        one_way = max(0.0, (ra["trip"] - ra["call"] - rf["call"]) / 2)
        transfers.append(
            {"bytes": ra["bytes"], "dispatch": ra["call"], "combine": rf["call"], "link": one_way}
        )
    return {
        "backend": spec.comm_backend,
        "transfers": transfers,
        "interference": {
            "attention": interference_ratio(a["rounds"]),
            "expert": interference_ratio(f["rounds"]),
            "raw": {  # medians over rounds of [solo, both]
                side: [statistics.median(r[i] for r in got[side]["rounds"]) for i in (0, 1)]
                for side in ("attention", "expert")
            },
            "rounds": {"attention": a["rounds"], "expert": f["rounds"]},
        },
    }


# ---- the whole profile ----------------------------------------------------------------------


def _layer_points(
    bench: _LayerBench, pts: list[tuple[int, int]], reps: int, dense: bool, prep: bool, quick: bool
) -> dict[str, list]:
    """One pass over the layer grid: attention sides, sampling, (prep,) expert shards."""
    cfg = bench.cfg
    raw: dict[str, list] = {"attention_moe": [], "attention_dense": [], "sample": [], "prep": [],
                            "expert": []}  # fmt: skip
    for b, c in pts:
        for moe in (True, False) if dense else (True,):
            seconds = bench.attention(moe, b, c, reps)
            kind = "attention_moe" if moe else "attention_dense"
            raw[kind].append({"batch": b, "context": c, "seconds": seconds})
    for b in sorted({b for b, _ in pts}):
        raw["sample"].append({"batch": b, "seconds": bench.sample(b, reps)})
        if prep:
            for c in (64, 1024):
                raw["prep"].append({"batch": b, "context": c, "seconds": bench.prep(b, c, reps)})
    e = cfg.n_routed_experts
    for held in sorted({e, max(1, e // 2), max(1, e // 4)}):
        for t in (4, 16, 64, 256, 1024, 2048):
            if not (quick and t > 512):
                raw["expert"].append(bench.expert(t, held, reps))
    return raw


def _fit_layers(
    fits: dict, bench: Any, pts: list, reps: int, has_dense: bool, cores: int, quick: bool, bar: Any
) -> None:
    """Fit attention, sample, expert (and prep) times at 1 thread and at `cores` threads."""
    import torch

    for suffix, threads in (("", 1), ("_mt", cores)):
        torch.set_num_threads(threads)
        layer_reps, bench.reduce, passes = layer_timing(threads, reps)
        bar.set_postfix_str(f"layers, {threads} thread(s)")
        raw = fastest(
            [
                _layer_points(bench, pts, layer_reps, has_dense, not suffix, quick)
                for _ in range(passes)
            ]
        )
        fits[f"attention_moe{suffix}"] = fit("attention", raw["attention_moe"])
        if has_dense:
            fits[f"attention_dense{suffix}"] = fit("attention", raw["attention_dense"])
        fits[f"sample{suffix}"] = fit("sample", raw["sample"])
        fits[f"expert{suffix}"] = fit("expert", raw["expert"])
        if not suffix:
            fits["prep"] = fit("prep", raw["prep"])
        bar.update(1)


def _fit_transfers(fits: dict, pair: dict) -> None:
    """Fit dispatch, combine and link times per byte from the two-process measurements."""
    for part in ("dispatch", "combine", "link"):
        points = [{"bytes": t["bytes"], "seconds": t[part]} for t in pair["transfers"]]
        fits[f"transfer_{part}"] = fit("transfer", points)


def _fit_host(fits: dict, path: Path, dtype: str, cores: int, reps: int, quick: bool) -> None:
    """Fit the engine's host time and the plan message's cost per batch and context."""
    batches = [8, 64, 256] if quick else [8, 64, 256, 512]
    fits["host"] = fit("host", host_points(path, dtype, batches, cores))
    plan = [
        {"batch": b, "context": c, "seconds": plan_message_seconds(b, c, 16, reps)}
        for b in batches
        for c in (64, 1024)
    ]
    fits["plan"] = fit("plan", plan)


def run_profile(
    model: str,
    device: str = "cpu",
    comm_backend: str = "auto",
    dtype: str = "float32",
    quick: bool = False,
    progress: bool = True,
) -> dict:
    """Measure this machine for `model` and return the profile (fits + raw points)."""
    import torch
    from tqdm import tqdm

    from afd.builtin import resolve_model

    if device != "cpu":
        raise ValueError("afd profile measures CPU workers today; use --hardware presets for GPUs")
    path = resolve_model(model)
    from afd.config import ModelConfig

    cfg = ModelConfig.from_pretrained(path)
    cores = os.cpu_count() or 1
    reps = 2 if quick else 3
    max_tokens = 32 * 1024 if quick else 128 * 1024
    pts = grid(max_tokens, cfg.max_position_embeddings - 1)
    if quick:
        pts = [p for p in pts if p[0] <= 128 and p[1] <= 512]
    shape = ModelShape.from_config(cfg, name=model)
    has_dense = shape.dense_layers > 0
    start = time.perf_counter()
    threads0 = torch.get_num_threads()
    tasks = [
        "layers x1 thread",
        f"layers x{cores} threads",
        "transfers + interference",
        "host",
        "prefill",
    ]
    bar = tqdm(total=len(tasks), desc="afd profile", disable=not progress, unit="part")
    fits: dict[str, dict] = {}
    try:
        bench = _LayerBench(path, dtype, max_tokens)
        _fit_layers(fits, bench, pts, reps, has_dense, cores, quick, bar)
        torch.set_num_threads(1)
        bar.set_postfix_str("transfers + interference (2 processes)")
        pair = pair_measurements(path, dtype, comm_backend, max_tokens, quick)
        _fit_transfers(fits, pair)
        bar.update(1)
        bar.set_postfix_str("host time (engine)")
        _fit_host(fits, path, dtype, cores, reps, quick)
        bar.update(1)
        torch.set_num_threads(1)
        bar.set_postfix_str("prefill")
        prefill = [
            {"tokens": t, "seconds": bench.prefill(t, reps)}
            for t in ((32, 128, 512) if quick else (32, 128, 512, 1024))
            if t < cfg.max_position_embeddings
        ]
        fits["prefill"] = fit("prefill", prefill)
        bar.update(1)
    finally:
        torch.set_num_threads(threads0)
        bar.close()
    return _profile_record(model, shape, device, cores, dtype, bench, pair, fits, start)


def _profile_record(
    model: str,
    shape: ModelShape,
    device: str,
    cores: int,
    dtype: str,
    bench: Any,
    pair: dict,
    fits: dict,
    start: float,
) -> dict:
    """The profile file's record from the fits and the two-process measurements."""
    from dataclasses import asdict

    from afd.results import machine_info

    return {
        "profile_version": PROFILE_VERSION,
        "model": model,
        "shape": asdict(shape),
        "device": device,
        "cores": cores,
        "dtype": dtype,
        "act_bytes": bench.dtype.itemsize,
        "comm_backend": pair["backend"],
        "memory_bytes": _machine_memory(),
        "interference": pair["interference"],
        "fits": fits,
        "profile_seconds": time.perf_counter() - start,
        "machine_profiled": machine_info(device),
    }


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


# ---- costs from a profile -------------------------------------------------------------------


class MeasuredCosts:
    """scheduler/planner/step_model.Costs evaluated from a profile's fits."""

    device = "cpu"

    def __init__(self, profile: dict):
        if profile.get("profile_version") != PROFILE_VERSION:
            raise ValueError("not an afd profile (or from another version): run afd profile again")
        try:
            self.shape = ModelShape(**profile["shape"])
            self.fits = profile["fits"]
            self.cores = int(profile["cores"])
            inter = profile["interference"]
            self.interference = (float(inter["attention"]), float(inter["expert"]))
            self.act_bytes = int(profile["act_bytes"])
            self.memory_per_worker = 0.8 * float(profile["memory_bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed profile: {e}") from e
        self.weight_bytes = self.kv_bytes = float(self.act_bytes)
        self.model = profile.get("model")

    @classmethod
    def load(cls, path: str | Path) -> MeasuredCosts:
        import json

        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise FileNotFoundError(f"cannot read profile {path}: {e.strerror}") from e
        except ValueError as e:
            raise ValueError(f"profile {path} is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"profile {path} is not an afd profile")
        return cls(data)

    def _f(self, name: str, kind: str, **x: float) -> float:
        return evaluate(self.fits[name], kind, **x)

    def attention_layer(self, moe: bool, batch: int, context: float, threads: str = "") -> float:
        name = f"attention_{'moe' if moe else 'dense'}{threads}"
        if name not in self.fits:  # a model without dense layers never asks for them
            return 0.0
        return self._f(name, "attention", batch=batch, context=context)

    def expert_layer(self, pairs: float, active: float, held: int, threads: str = "") -> float:
        return self._f(f"expert{threads}", "expert", pairs=pairs, active=active)

    def sample(self, batch: int, threads: str = "") -> float:
        return self._f(f"sample{threads}", "sample", batch=batch)

    def prep(self, batch: int, context: float = 64) -> float:
        return self._f("prep", "prep", batch=batch, context=context)

    def transfer(self, nbytes: float, direction: str = "dispatch") -> tuple[float, float, float]:
        sender = self._f(f"transfer_{direction}", "transfer", bytes=nbytes)
        return sender, self._f("transfer_link", "transfer", bytes=nbytes), 0.0

    def host(self, batch: int, disaggregated: bool, context: float = 256) -> float:
        t = self._f("host", "host", batch=batch)
        if disaggregated:
            t += self._f("plan", "plan", batch=batch, context=context)
        return t

    def colocated_step(self, batch: int, context: float) -> float:
        """The engine in one process with every core: each layer's attention side and its
        experts one after the other, then sampling."""
        from afd.scheduler.planner.step_model import active_experts, layer_kinds

        s = self.shape
        act = active_experts(s.experts, s.experts, s.top_k, batch)
        t = 0.0
        for moe in layer_kinds(s):
            t += self.attention_layer(moe, batch, context, "_mt")
            if moe:
                t += self.expert_layer(batch * s.top_k, act, s.experts, "_mt")
        return t + self.sample(batch, "_mt") + self.prep(batch, context)

    def prefill(self, tokens: int) -> float:
        return self._f("prefill", "prefill", tokens=tokens)
