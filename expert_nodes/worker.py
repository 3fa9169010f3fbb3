"""Expert worker: holds a shard of routed experts, no KV cache and no request state. Each step
it receives every (MoE layer, micro-batch) from the participating attention ranks in order,
computes them grouped by expert, and returns weighted partial sums."""

from __future__ import annotations

import itertools
import time

import torch
from afd.comm.control import WorkerChannel, init_world, transport_for
from afd.comm.dispatch import exchange_tag

from afd.loader import count_parameter_bytes, load_model
from afd.models import expert_split


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
