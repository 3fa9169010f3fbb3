"""Prefill worker: the full model and its own KV cache; runs prompts (chunked, prefix-cached by
the scheduler), samples the first token, and ships the prompt's KV to an attention worker."""

from __future__ import annotations

import torch

from afd.attention_nodes.kv_transfer import send_kv
from afd.attention_nodes.plan_runner import MicroBatch, PlanRunner
from afd.attention_nodes.worker import injected_fault
from afd.comm import liveness
from afd.comm.control import RoleWorker, serve
from afd.comm.messages import PrefillResult, PrefillStep, WorkerSpec
from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.sampling.sampler import Sampler
from afd.timing import StageClock


def run_prefill_worker(raw_spec: bytes) -> None:
    serve(raw_spec, "prefill", PrefillWorker.build)


def _after_forward(mb: MicroBatch) -> None:
    injected_fault(mb.input_ids)
    liveness.beat()


class PrefillWorker(RoleWorker):
    """One prefill batch per plan, and the KV exports the plan names (torch.distributed)."""

    role = "prefill"

    def __init__(self, model, caches, block_size: int, device, sampler: Sampler):
        self.model, self.caches, self.block_size, self.device = model, caches, block_size, device
        # no sampler state is kept here: each sampled entry brings its history
        self.runner = PlanRunner(model, caches, block_size, device, sampler, keep_states=False,
                                 after_forward=_after_forward)  # fmt: skip

    @classmethod
    def build(cls, spec: WorkerSpec) -> PrefillWorker:
        device = torch.device(spec.device)
        model = load_model(spec.model_path, dtype=spec.dtype, device=device, part="full",
                           quantization=spec.quantization)  # fmt: skip
        dtype = getattr(torch, spec.dtype)  # (FP8 layers hold other dtypes)
        caches = allocate_kv_cache(model.config, spec.num_kv_blocks, spec.block_size, dtype, device)
        sampler = Sampler(spec.eos_token_ids, spec.tokenizer_dir)
        worker = cls(model, caches, spec.block_size, device, sampler)
        worker.param_bytes = count_parameter_bytes(model)
        return worker

    def run(self, plan: PrefillStep) -> tuple[type[PrefillResult], dict]:
        clock = StageClock(plan.trace, self.device)
        t0 = clock.now()
        sends = [send_kv(self.caches, t.blocks, t.peer, t.seq_id) for t in plan.exports]
        runner = self.runner
        batches = [plan.entries] if plan.entries else []
        # (its sampling is part of the prefill stage, not timed apart)
        out = runner.run(batches, 1, runner.full_forward, StageClock(False))
        for work, _ in sends:
            liveness.wait_work(work)
        clock.record("prefill", "prefill", t0, clock.now())
        fields = dict(sampled=out.sampled[0], prompt_logprobs=out.prompt_logprobs,
                      errors=out.errors, times=clock.times, events=clock.events)  # fmt: skip
        return PrefillResult, fields
