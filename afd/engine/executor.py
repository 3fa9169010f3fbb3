"""The single-process executor (the disaggregated one is scheduler/cluster/executor.py's
AFDExecutor; both follow afd.scheduler.core.step's Executor)."""

from __future__ import annotations

from pathlib import Path

from afd.config import ModelConfig
from afd.scheduler.core.kv_capacity import num_kv_blocks_for
from afd.scheduler.core.step import RecoveryStats, StepInterrupted, StepPlan, StepResult


class LocalExecutor:
    """The whole model in this process (the single-process engine): the workers' path in-process,
    the driver's plan entries through the attention side's PlanRunner with the MoE computed here."""

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
        from afd.attention_nodes.plan_runner import PlanRunner
        from afd.kernels import native
        from afd.kernels.ops import set_kernel_backend
        from afd.loader import load_model
        from afd.models import allocate_kv_cache
        from afd.sampling.sampler import Sampler
        from afd.timing import StageClock

        device, block_size = config.cluster.device, config.cache.block_size
        set_kernel_backend(config.cluster.kernel_backend)
        native.set_enabled(config.cluster.native_kernels)
        dtype = config.torch_dtype(model_config)
        model = load_model(
            model_path, dtype=dtype, device=device, quantization=config.source.quantization
        )
        self.num_kv_blocks = num_kv_blocks_for(config, model_config, dtype, model_path)
        kv_caches = allocate_kv_cache(model_config, self.num_kv_blocks, block_size, dtype, device)
        sampler = Sampler(eos_token_ids, tokenizer_dir or model_path)
        self.runner = PlanRunner(model, kv_caches, block_size, device, sampler)
        self.clock = StageClock(False)  # no stage times in one process
        self.recovery = RecoveryStats()  # stays empty: no worker to replace

    def execute(self, plan: StepPlan) -> StepResult:
        """Run the batch; a raise in the forward (a kernel, a layer) becomes StepInterrupted,
        so that the engine can find the request that makes it raise and go on without it."""
        from afd.scheduler.cluster.executor import plan_entry

        batch = plan.batches[0]
        # history goes with every entry that needs it: the runner reads it only for a sequence
        # it holds no sampler state for yet (new, or after a failed step)
        entries = [
            plan_entry(seq, n, sample, with_history=True)
            for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True)
        ]
        try:
            out = self.runner.run([entries], batch.num_steps, self.runner.full_forward, self.clock)
        except Exception as e:
            raise StepInterrupted(f"{type(e).__name__}: {e}", set(), set()) from e
        prompt_logprobs: dict[int, list] = {}
        for p in out.prompt_logprobs:
            prompt_logprobs.setdefault(p.seq_id, []).append([p.position, p.entries])
        return StepResult(
            [{s.seq_id: (s.token, s.logprobs) for s in step} for step in out.sampled],
            sample_errors={e.seq_id: e.message for e in out.errors},
            prompt_logprobs=prompt_logprobs,
        )

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
