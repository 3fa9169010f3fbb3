"""Expert worker: holds a shard of routed experts, no KV cache and no request state. Each step
it receives every (MoE layer, micro-batch) from the participating attention ranks in order,
computes them grouped by expert, and returns weighted partial sums."""

from __future__ import annotations

import itertools

import torch
from afd.comm.control import WorkerChannel, init_world, transport_for
from afd.comm.dispatch import exchange_tag

from afd.loader import count_parameter_bytes, load_model
from afd.models import expert_split
from afd.timing import StageClock


def run_expert_worker(spec: dict) -> None:
    rank = spec["rank"]
    index = rank - spec["num_attention_workers"]
    channel = WorkerChannel(spec, "expert")
    try:
        torch.set_num_threads(spec.get("threads", 1))
        device = torch.device(spec["device"])
        init_world(spec)
        from afd.config import ModelConfig

        cfg = ModelConfig.from_pretrained(spec["model_path"])
        ranges = expert_split(cfg.n_routed_experts, spec["num_expert_workers"])
        shard = load_model(
            spec["model_path"],
            dtype=spec["dtype"],
            device=device,
            part="experts",
            expert_range=ranges[index],
            quantization=spec["quantization"],
        )
        transport = transport_for(spec, cfg, device)
        channel.send("ready", role="expert", param_bytes=count_parameter_bytes(shard))
        start, end = ranges[index]
        while True:
            msg = channel.recv()
            if msg["type"] == "shutdown":
                break
            times, events, load = serve_plan(shard, transport, msg, start, end)
            channel.send(
                "expert_result", step=msg["step"], times=times, events=events, load=load.tolist()
            )
    except BaseException as e:
        channel.report_error(e)
        raise SystemExit(1) from None
    finally:
        channel.close()


@torch.inference_mode()
def serve_plan(
    shard, transport, plan: dict, start: int, end: int
) -> tuple[dict, list, torch.Tensor]:
    """Every (decode step, MoE layer, micro-batch) exchange of one plan, in the order the
    attention workers send them; returns stage times, trace events and tokens per expert.
    Stages: expert_recv_wait (blocked until the rows arrived), expert_recv_copy (unpacking them),
    expert (compute), expert_send (returning the partial sums), expert_plan (the whole plan)."""
    clock = StageClock(plan["trace"], transport.device)
    for stage in ("expert_recv_wait", "expert_recv_copy", "expert", "expert_send"):
        clock.times[stage] = 0.0
    load = torch.zeros(end - start, dtype=torch.int64)
    exchanges = itertools.product(
        range(plan["num_steps"]), shard.moe_layers, range(plan["num_micro_batches"])
    )
    plan_start = clock.now()
    for _step, layer, mb in exchanges:
        t0, waited = clock.now(), transport.wait_ns
        tag = exchange_tag(layer, mb)
        batch = transport.receive(plan["sources"], tag)
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
