"""Executors run scheduled batches: in this process, or across attention and expert workers."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from afd.config import ModelConfig
from afd.scheduler.scheduler import ScheduledBatch

# seq_id -> (token, logprobs {token: (logprob, rank)} or None)
Sampled = dict[int, tuple[int, dict[int, tuple[float, int]] | None]]


class StepInterrupted(RuntimeError):
    """A worker failed during a step and the cluster has been healed: the engine fixes up the
    requests whose KV died (`lost_attention`, `lost_prefill`: replicas whose worker was
    replaced) and runs the step again (a replay writes the same KV slots)."""

    def __init__(self, reason: str, lost_attention: set[int], lost_prefill: set[int]):
        super().__init__(reason)
        self.reason, self.lost_attention, self.lost_prefill = reason, lost_attention, lost_prefill


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


def num_kv_blocks_for(config, model_config: ModelConfig, dtype) -> int:
    """Blocks that fit in kv_cache_memory_mb unless num_kv_blocks is given."""
    from afd.models import kv_cache_bytes_per_block

    if config.num_kv_blocks is not None:
        if config.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        return config.num_kv_blocks
    per_block = kv_cache_bytes_per_block(model_config, config.block_size, dtype)
    return max(1, config.kv_cache_memory_mb * 2**20 // per_block)


class LocalExecutor:
    """The whole model in this process (the single-process engine)."""

    num_replicas = 1

    def __init__(self, config, model_path: Path, model_config: ModelConfig, eos_token_ids=()):
        from afd.engine.model_runner import ModelRunner
        from afd.kernels.ops import set_kernel_backend
        from afd.loader import load_model
        from afd.models import allocate_kv_cache
        from afd.sampling.sampler import Sampler

        set_kernel_backend(config.kernel_backend)
        dtype = config.torch_dtype(model_config)
        model = load_model(
            model_path, dtype=dtype, device=config.device, quantization=config.quantization
        )
        self.num_kv_blocks = num_kv_blocks_for(config, model_config, dtype)
        kv_caches = allocate_kv_cache(
            model_config, self.num_kv_blocks, config.block_size, dtype, config.device
        )
        sampler = Sampler(eos_token_ids, tokenizer_dir=model_path)
        self.runner = ModelRunner(model, kv_caches, config.block_size, config.device, sampler)

    def execute(self, batches: list[ScheduledBatch]) -> list[Sampled]:
        self.runner.sample_errors.clear()
        return self.runner.execute(batches[0])

    @property
    def sample_errors(self) -> dict[int, str]:
        return self.runner.sample_errors

    def release(self, replica: int, seq_ids: list[int]) -> None:
        self.runner.release(seq_ids)

    def take_prompt_logprobs(self) -> dict[int, list]:
        out, self.runner.prompt_logprobs = self.runner.prompt_logprobs, {}
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
    config, model_path: Path, model_config: ModelConfig, eos_token_ids=()
) -> Executor:
    """Single process when no attention workers are asked for, else the disaggregated one.
    `eos_token_ids` are where min_tokens and structured outputs need the end of a sequence."""
    if config.num_attention_workers <= 0 and config.num_expert_workers <= 0:
        return LocalExecutor(config, model_path, model_config, eos_token_ids)
    from afd.scheduler.cluster import AFDExecutor

    return AFDExecutor(config, model_path, model_config, eos_token_ids)
