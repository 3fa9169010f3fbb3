"""Prefill worker: the full model and its own KV cache; runs prompts (chunked, prefix-cached by
the scheduler), samples the first token, and ships the prompt's KV to an attention worker."""

from __future__ import annotations

import torch
from afd.attention_nodes.kv_transfer import send_kv
from afd.attention_nodes.worker import build_micro_batch, sample_entries
from afd.comm import liveness
from afd.comm.control import RoleWorker, serve

from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.sampling.sampler import Sampler
from afd.timing import StageClock


def run_prefill_worker(spec: dict) -> None:
    serve(spec, "prefill", PrefillWorker.build)


class PrefillWorker(RoleWorker):
    """One prefill batch per plan, and the KV exports the plan names (torch.distributed)."""

    role = "prefill"

    def __init__(self, model, caches, block_size: int, device):
        self.model, self.caches, self.block_size, self.device = model, caches, block_size, device
        self.sampler = Sampler()

    @classmethod
    def build(cls, spec: dict) -> PrefillWorker:
        device = torch.device(spec["device"])
        model = load_model(spec["model_path"], dtype=spec["dtype"], device=device, part="full")
        dtype = next(model.parameters()).dtype
        caches = allocate_kv_cache(
            model.config, spec["num_kv_blocks"], spec["block_size"], dtype, device
        )
        worker = cls(model, caches, spec["block_size"], device)
        worker.param_bytes = count_parameter_bytes(model)
        return worker

    def run(self, msg: dict) -> tuple[str, dict]:
        clock = StageClock(msg["trace"], self.device)
        t0 = clock.now()
        sends = [
            send_kv(self.caches, blocks, dst, seq_id) for seq_id, dst, blocks in msg["exports"]
        ]
        sampled: list = []
        errors: list = []
        if msg["micro_batches"]:
            mb = build_micro_batch(msg["micro_batches"][0], self.block_size, self.device)
            with torch.inference_mode():
                hidden = self.model(mb.input_ids, mb.positions, mb.meta, self.caches)
                liveness.beat()
                if mb.sample_entries:
                    sampled = sample_entries(
                        self.model, self.sampler, mb.sample_entries, hidden[mb.sample_rows], errors
                    )
        for work, buf in sends:
            liveness.wait_work(work, buf.device)
        clock.record("prefill", "prefill", t0, clock.now())
        fields = dict(sampled=sampled, times=clock.times, events=clock.events, errors=errors)
        return "prefill_result", fields
