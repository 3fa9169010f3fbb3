"""Expert worker: holds a shard of routed experts, no KV cache and no request state. Each step
it receives every (MoE layer, micro-batch) from the participating attention ranks in order,
computes them grouped by expert, and returns weighted partial sums."""

from __future__ import annotations

import itertools

import torch

from afd.comm.control import RoleWorker, serve, transport_for
from afd.comm.dispatch import exchange_tag, expert_split
from afd.comm.messages import ExpertResult, ExpertStep, WorkerSpec
from afd.loader import count_parameter_bytes, load_model
from afd.timing import StageClock


def run_expert_worker(raw_spec: bytes) -> None:
    serve(raw_spec, "expert", ExpertWorker.build)


class ExpertWorker(RoleWorker):
    """A shard of the routed experts (loaded once) and this generation's transport."""

    role = "expert"

    def __init__(self, shard, cfg, start: int, end: int, device):
        self.shard, self.cfg, self.start, self.end, self.device = shard, cfg, start, end, device
        self.transport = None

    @classmethod
    def build(cls, spec: WorkerSpec) -> ExpertWorker:
        from afd.config import ModelConfig

        device = torch.device(spec.device)
        index = spec.rank - spec.num_attention_workers
        cfg = ModelConfig.from_pretrained(spec.model_path)
        start, end = expert_split(cfg.n_routed_experts, spec.num_expert_workers)[index]
        shard = load_model(
            spec.model_path,
            dtype=spec.dtype,
            device=device,
            part="experts",
            expert_range=(start, end),
            quantization=spec.quantization,
        )
        worker = cls(shard, cfg, start, end, device)
        worker.param_bytes = count_parameter_bytes(shard)
        return worker

    def join(self, spec: WorkerSpec, generation: int) -> None:
        self.transport = transport_for(spec, self.cfg, self.device, generation)

    def leave(self) -> None:
        if self.transport is not None:
            self.transport.abandon()
            self.transport = None

    def run(self, plan: ExpertStep) -> tuple[type[ExpertResult], dict]:
        times, events, load = serve_plan(self.shard, self.transport, plan, self.start, self.end)
        return ExpertResult, dict(times=times, events=events, load=load.tolist())


@torch.inference_mode()
def serve_plan(
    shard, transport, plan: ExpertStep, start: int, end: int
) -> tuple[dict, list, torch.Tensor]:
    """Every (decode step, MoE layer, micro-batch) exchange of one plan, in the order the
    attention workers send them; returns stage times, trace events and tokens per expert.
    Stages: expert_recv_wait (blocked until the rows arrived), expert_recv_copy (unpacking them),
    expert (compute), expert_send (returning the partial sums), expert_plan (the whole plan)."""
    clock = StageClock(plan.trace, transport.device)
    for stage in ("expert_recv_wait", "expert_recv_copy", "expert", "expert_send"):
        clock.times[stage] = 0.0
    load = torch.zeros(end - start, dtype=torch.int64)
    exchanges = itertools.product(
        range(plan.num_steps), shard.moe_layers, range(plan.num_micro_batches)
    )
    plan_start = clock.now()
    for _step, layer, mb in exchanges:
        t0, waited = clock.now(), transport.wait_ns
        tag = exchange_tag(layer, mb)
        batch = transport.receive(plan.sources, tag)
        t1 = clock.now()
        label = f"L{layer} mb{mb}"
        clock.split("expert_recv_wait", "expert_recv_copy", t0, t1, transport.wait_ns - waited,
                    f"receive {label}")  # fmt: skip
        # the wire carries shard-local ids; ExpertShard takes global ones
        out = shard.forward_layer(layer, batch.x, batch.topk_weights, batch.global_ids(start))
        t2 = clock.now()
        clock.record("expert", "expert", t1, t2, f"experts {label}")
        transport.send_back(batch, out, tag)
        clock.record("expert_send", "comm", t2, clock.now(), f"send {label}")
        ids = batch.topk_ids[batch.topk_ids >= 0]
        load += torch.bincount(ids, minlength=end - start)
    transport.flush()
    clock.total("expert_plan", plan_start, clock.now())
    return clock.times, clock.events, load
