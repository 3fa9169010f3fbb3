"""Prefill worker: the full model and its own KV cache; runs prompts (chunked, prefix-cached by
the scheduler), samples the first token, and ships the prompt's KV to an attention worker."""

from __future__ import annotations

import torch

from afd.attention_nodes.kv_transfer import send_kv
from afd.attention_nodes.worker import (
    build_micro_batch,
    entry_prompt_logprobs,
    injected_fault,
    sample_entries,
)
from afd.comm import liveness
from afd.comm.control import RoleWorker, serve
from afd.comm.messages import PrefillResult, PrefillStep, WorkerSpec
from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.sampling.sampler import Sampler
from afd.timing import StageClock


def run_prefill_worker(raw_spec: bytes) -> None:
    serve(raw_spec, "prefill", PrefillWorker.build)


class PrefillWorker(RoleWorker):
    """One prefill batch per plan, and the KV exports the plan names (torch.distributed)."""

    role = "prefill"

    def __init__(self, model, caches, block_size: int, device, sampler: Sampler):
        self.model, self.caches, self.block_size, self.device = model, caches, block_size, device
        self.sampler = sampler

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
        sampled, prompt_logprobs, errors = [], [], []
        if plan.entries:
            mb = build_micro_batch(plan.entries, self.block_size, self.device)
            with torch.inference_mode():
                hidden = self.model(mb.input_ids, mb.positions, mb.meta, self.caches)
                injected_fault(mb.input_ids)
                liveness.beat()
                if mb.prompt_entries:
                    prompt_logprobs = entry_prompt_logprobs(self.model, self.sampler, mb, hidden)
                if mb.sample_entries:
                    # no sampler state is kept here: each entry brings its history
                    sampled = sample_entries(
                        self.model, self.sampler, mb.sample_entries, hidden[mb.sample_rows], {},
                        errors,
                    )  # fmt: skip
        for work, _ in sends:
            liveness.wait_work(work)
        clock.record("prefill", "prefill", t0, clock.now())
        fields = dict(sampled=sampled, prompt_logprobs=prompt_logprobs, errors=errors,
                      times=clock.times, events=clock.events)  # fmt: skip
        return PrefillResult, fields
