"""Executors run scheduled batches: in this process, or across attention and expert workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from afd.config import ModelConfig
from afd.scheduler.scheduler import ScheduledBatch

# seq_id -> (token, logprobs {token: (logprob, rank)} or None)
Sampled = dict[int, tuple[int, dict[int, tuple[float, int]] | None]]


class StepInterrupted(RuntimeError):
    """A step failed (a worker died, hung or raised) and the executor is whole again: the engine
    fixes up the requests whose KV died (`lost_attention`, `lost_prefill`: replicas whose worker
    was replaced), sends again the prefill plans of earlier steps that were abandoned
    (`dropped_prefill`: replicas whose worker lives) and runs the step again (a replay writes
    the same KV slots). `lost_expert`: expert ranks whose worker was replaced (they hold no
    request state, but the failure was theirs, not the step's). Nothing lost means the step
    itself raised: the engine may bisect it; `failed_prefill`: the prefill replica whose plan
    raised (a plan of an earlier step may fail during a later one)."""

    def __init__(
        self,
        reason: str,
        lost_attention: set[int],
        lost_prefill: set[int],
        dropped_prefill: set[int] | None = None,
        failed_prefill: set[int] | None = None,
        lost_expert: set[int] | None = None,
    ):
        super().__init__(reason)
        self.reason, self.lost_attention, self.lost_prefill = reason, lost_attention, lost_prefill
        self.dropped_prefill = dropped_prefill or set()
        self.failed_prefill = failed_prefill or set()
        self.lost_expert = lost_expert or set()

    @property
    def lost_worker(self) -> bool:
        """A worker was replaced: the failure is not the fault of the requests in the step."""
        return bool(self.lost_attention or self.lost_prefill or self.lost_expert)


class Executor(Protocol):
    """What the engine needs from whatever runs the model."""

    num_replicas: int  # attention replicas, each with its own KV cache and scheduler
    num_kv_blocks: int  # blocks per replica

    def execute(self, batches: list[ScheduledBatch]) -> list[Sampled]:
        """Run one scheduled batch per replica; one Sampled per decode step (see num_steps).
        A sequence whose sampling failed gets token -1, its reason in `sample_errors`."""
        ...

    sample_errors: dict[int, str]  # seq_id -> why its sampling failed, for the last execute

    def stage_times(self) -> dict[str, float]: ...

    def release(self, replica: int, seq_ids: list[int]) -> None:
        """Finished sequences whose sampler state the replica may drop."""
        ...

    def take_prompt_logprobs(self) -> dict[int, list]:
        """prompt_logprobs computed since the last call: seq_id -> [[position, entries]]."""
        ...

    def check_alive(self) -> None: ...

    def health(self) -> tuple[bool, str]:
        """(can serve, why not or what is being recovered)."""
        ...

    def shutdown(self) -> None: ...


def num_kv_blocks_for(config, model_config: ModelConfig, dtype, model_path=None) -> int:
    """KV blocks per cache: num_kv_blocks when given, else what gpu_memory_utilization leaves
    after the weights (see kv_memory_from_utilization), else kv_cache_memory_mb worth."""
    from afd.models import kv_cache_bytes_per_block

    cache = config.cache
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_cache_bytes_per_block(model_config, cache.block_size, dtype)
    if cache.gpu_memory_utilization is not None and model_path is not None:
        kv_bytes = kv_memory_from_utilization(config, model_path, dtype)
        blocks = kv_bytes // per_block
        if blocks < 1:
            raise ValueError(
                f"--gpu-memory-utilization {cache.gpu_memory_utilization} leaves no memory for "
                f"the KV cache after the weights; raise it (or give --num-kv-blocks)"
            )
        return int(blocks)
    return max(1, cache.kv_cache_memory_mb * 2**20 // per_block)


def available_memory_bytes(device: str) -> int:
    """What a fraction of memory is taken of: one GPU's total memory, or on CPU the RAM that
    is available now (MemAvailable), shared by every worker of the node."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_memory_from_utilization(config, model_path, dtype) -> int:
    """Bytes of one KV cache under gpu_memory_utilization: the fraction of memory, less the
    weights that share it, over the caches that share it. On a GPU each worker has its own:
    an attention worker holds the non-expert weights, a prefill worker (and the single
    process) the whole model. On CPU every worker of the node shares the RAM: attention and
    prefill workers each hold the non-expert weights, the expert workers one copy of the
    experts between them, and each prefill worker another."""
    from afd.loader import checkpoint_numel

    util, device = config.cache.gpu_memory_utilization, config.cluster.device
    experts, rest = checkpoint_numel(model_path)
    size = dtype.itemsize if hasattr(dtype, "itemsize") else 4
    budget = util * available_memory_bytes(device)
    a, p = config.cluster.num_attention_workers, config.cluster.num_prefill_workers
    if a <= 0:  # the single process: the whole model and one cache
        return max(0, int(budget - (experts + rest) * size))
    if device == "cuda":
        weights = (experts + rest) if p else rest
        return max(0, int(budget - weights * size))
    weights = ((a + p) * rest + (1 + p) * experts) * size
    return max(0, int((budget - weights) / (a + p)))


class LocalExecutor:
    """The whole model in this process (the single-process engine): the workers' path in-process,
    the driver's plan entries through the attention side's PlanRunner with the MoE computed here."""

    num_replicas = 1

    def __init__(
        self,
        config,
        model_path: Path,
        model_config: ModelConfig,
        eos_token_ids=(),
        tokenizer_dir: Path | None = None,
    ):
        from afd.attention_nodes.plan_runner import PlanRunner
        from afd.kernels.ops import set_kernel_backend
        from afd.loader import load_model
        from afd.models import allocate_kv_cache
        from afd.sampling.sampler import Sampler
        from afd.timing import StageClock

        device, block_size = config.cluster.device, config.cache.block_size
        set_kernel_backend(config.cluster.kernel_backend)
        dtype = config.torch_dtype(model_config)
        model = load_model(
            model_path, dtype=dtype, device=device, quantization=config.source.quantization
        )
        self.num_kv_blocks = num_kv_blocks_for(config, model_config, dtype, model_path)
        kv_caches = allocate_kv_cache(model_config, self.num_kv_blocks, block_size, dtype, device)
        sampler = Sampler(eos_token_ids, tokenizer_dir or model_path)
        self.runner = PlanRunner(model, kv_caches, block_size, device, sampler)
        self.clock = StageClock(False)  # no stage times in one process
        self.sample_errors: dict[int, str] = {}
        self.prompt_logprobs: dict[int, list] = {}  # seq_id -> [[position, entries], ...]

    def execute(self, batches: list[ScheduledBatch]) -> list[Sampled]:
        """Run the batch; a raise in the forward (a kernel, a layer) becomes StepInterrupted,
        so that the engine can find the request that makes it raise and go on without it."""
        self.sample_errors = {}
        try:
            return self._run(batches[0])
        except Exception as e:
            raise StepInterrupted(f"{type(e).__name__}: {e}", set(), set()) from e

    def _run(self, batch: ScheduledBatch) -> list[Sampled]:
        from afd.scheduler.cluster import plan_entry

        # history goes with every entry that needs it: the runner reads it only for a sequence
        # it holds no sampler state for yet (new, or after a failed step)
        entries = [
            plan_entry(seq, n, sample, with_history=True)
            for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True)
        ]
        runner = self.runner
        out = runner.run([entries], batch.num_steps, runner.full_forward, self.clock)
        self.sample_errors.update((e.seq_id, e.message) for e in out.errors)
        for p in out.prompt_logprobs:
            self.prompt_logprobs.setdefault(p.seq_id, []).append([p.position, p.entries])
        return [{s.seq_id: (s.token, s.logprobs) for s in step} for step in out.sampled]

    def release(self, replica: int, seq_ids: list[int]) -> None:
        self.runner.release(seq_ids)

    def take_prompt_logprobs(self) -> dict[int, list]:
        out, self.prompt_logprobs = self.prompt_logprobs, {}
        return out

    def stage_times(self) -> dict[str, float]:
        return {}

    def check_alive(self) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def shutdown(self) -> None:
        pass


def build_executor(
    config,
    model_path: Path,
    model_config: ModelConfig,
    eos_token_ids=(),
    tokenizer_dir: Path | None = None,
) -> Executor:
    """Single process when no attention workers are asked for, else the disaggregated one.
    `eos_token_ids` are where min_tokens and structured outputs need the end of a sequence;
    `tokenizer_dir` is the tokenizer grammar masks are built from (default: the model's)."""
    args = (config, model_path, model_config, eos_token_ids, tokenizer_dir)
    if config.cluster.num_attention_workers <= 0 and config.cluster.num_expert_workers <= 0:
        return LocalExecutor(*args)
    from afd.scheduler.cluster import AFDExecutor

    return AFDExecutor(*args)
