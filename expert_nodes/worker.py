"""Expert worker: holds a shard of routed experts, no KV cache and no request state. Each step
it receives every (MoE layer, micro-batch) from the participating attention ranks in order,
computes them grouped by expert, and returns weighted partial sums."""

from __future__ import annotations

import itertools
import time

import torch
from afd.comm.control import RoleWorker, serve, transport_for
from afd.comm.dispatch import exchange_tag

from afd.loader import count_parameter_bytes, load_model
from afd.models import expert_split


def run_expert_worker(spec: dict) -> None:
    serve(spec, "expert", ExpertWorker.build)


class ExpertWorker(RoleWorker):
    """A shard of the routed experts (loaded once) and this generation's transport."""

    role = "expert"

    def __init__(self, shard, cfg, start: int, end: int, device):
        self.shard, self.cfg, self.start, self.end, self.device = shard, cfg, start, end, device
        self.transport = None

    @classmethod
    def build(cls, spec: dict) -> ExpertWorker:
        from afd.config import ModelConfig

        device = torch.device(spec["device"])
        index = spec["rank"] - spec["num_attention_workers"]
        cfg = ModelConfig.from_pretrained(spec["model_path"])
        start, end = expert_split(cfg.n_routed_experts, spec["num_expert_workers"])[index]
        shard = load_model(
            spec["model_path"],
            dtype=spec["dtype"],
            device=device,
            part="experts",
            expert_range=(start, end),
        )
        worker = cls(shard, cfg, start, end, device)
        worker.param_bytes = count_parameter_bytes(shard)
        return worker

    def join(self, spec: dict, generation: int) -> None:
        self.transport = transport_for(spec, self.cfg, self.device, generation)

    def leave(self) -> None:
        if self.transport is not None:
            self.transport.abandon()
            self.transport = None

    def run(self, plan: dict) -> tuple[str, dict]:
        times, events, load = serve_plan(self.shard, self.transport, plan, self.start, self.end)
        return "expert_result", dict(times=times, events=events, load=load.tolist())


@torch.inference_mode()
def serve_plan(
    shard, transport, plan: dict, start: int, end: int
) -> tuple[dict, list, torch.Tensor]:
    """Every (decode step, MoE layer, micro-batch) exchange of one plan, in the order the
    attention workers send them; returns stage times, trace events and tokens per expert."""
    times: dict[str, float] = {"expert_recv_wait": 0.0, "expert": 0.0, "expert_send": 0.0}
    events: list[list] = []
    load = torch.zeros(end - start, dtype=torch.int64)
    exchanges = itertools.product(
        range(plan["num_steps"]), shard.moe_layers, range(plan["num_micro_batches"])
    )
    for _step, layer, mb in exchanges:
        t0 = time.monotonic_ns()
        tag = exchange_tag(layer, mb)
        batch = transport.receive(plan["sources"], tag)
        t1 = time.monotonic_ns()
        # the wire carries shard-local ids; ExpertShard takes global ones
        out = shard.forward_layer(layer, batch.x, batch.topk_weights, batch.global_ids(start))
        t2 = time.monotonic_ns()
        transport.send_back(batch, out, tag)
        t3 = time.monotonic_ns()
        ids = batch.topk_ids[batch.topk_ids >= 0]
        load += torch.bincount(ids, minlength=end - start)
        times["expert_recv_wait"] += (t1 - t0) / 1e9
        times["expert"] += (t2 - t1) / 1e9
        times["expert_send"] += (t3 - t2) / 1e9
        if plan["trace"]:
            events.append(["expert", f"experts L{layer} mb{mb}", t1, t2])
    transport.flush()
    return times, events, load
