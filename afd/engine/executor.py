"""The single-process executor (the disaggregated one is scheduler/cluster/executor.py's
AFDExecutor; both follow afd.scheduler.core.step's Executor)."""

from __future__ import annotations

from pathlib import Path

from afd.config import ModelConfig
from afd.scheduler.core.kv_capacity import num_kv_blocks_for
from afd.scheduler.core.step import RecoveryStats, StepInterrupted, StepPlan, StepResult


class LocalExecutor:
    """The whole model in this process (the single-process engine)."""

    num_replicas = 1
    num_prefill_replicas = 0

    def __init__(
        self,
        config,
        model_path: Path,
        model_config: ModelConfig,
        eos_token_ids=(),
        tokenizer_dir: Path | None = None,
    ):
        from afd.engine.model_runner import ModelRunner
        from afd.kernels.ops import set_kernel_backend
        from afd.loader import load_model
        from afd.models import allocate_kv_cache
        from afd.sampling.sampler import Sampler

        device, block_size = config.cluster.device, config.cache.block_size
        set_kernel_backend(config.cluster.kernel_backend)
        dtype = config.torch_dtype(model_config)
        model = load_model(
            model_path, dtype=dtype, device=device, quantization=config.source.quantization
        )
        self.num_kv_blocks = num_kv_blocks_for(config, model_config, dtype, model_path)
        kv_caches = allocate_kv_cache(model_config, self.num_kv_blocks, block_size, dtype, device)
        sampler = Sampler(eos_token_ids, tokenizer_dir or model_path)
        self.runner = ModelRunner(model, kv_caches, block_size, device, sampler)
        self.recovery = RecoveryStats()  # stays empty: no worker to replace

    def execute(self, plan: StepPlan) -> StepResult:
        """Run the batch; a raise in the forward (a kernel, a layer) becomes StepInterrupted,
        so that the engine can find the request that makes it raise and go on without it."""
        self.runner.sample_errors.clear()
        try:
            steps = self.runner.execute(plan.batches[0])
        except Exception as e:
            raise StepInterrupted(f"{type(e).__name__}: {e}", set(), set()) from e
        lps, self.runner.prompt_logprobs = self.runner.prompt_logprobs, {}
        return StepResult(steps, sample_errors=dict(self.runner.sample_errors), prompt_logprobs=lps)

    def release(self, replica: int, seq_ids: list[int]) -> None:
        self.runner.release(seq_ids)

    def poll_failures(self) -> StepInterrupted | None:
        return None  # nothing fails between steps in this process

    def stage_times(self) -> dict[str, float]:
        return {}

    def check_alive(self) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def shutdown(self) -> None:
        pass
