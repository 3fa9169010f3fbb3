"""Attention worker: KV cache, attention, gate, shared experts, dense layers, lm_head, sampling,
and the ping-pong loop that overlaps attention of micro-batch i+1 with experts on micro-batch i."""

from __future__ import annotations

import itertools
import os

import torch

from afd.attention_nodes.kv_transfer import recv_kv
from afd.attention_nodes.plan_runner import MicroBatch, PlanRunner
from afd.comm import liveness
from afd.comm.control import RoleWorker, serve, transport_for
from afd.comm.dispatch import exchange_tag
from afd.comm.messages import (
    AttnResult,
    AttnStep,
    PromptLogprobs,
    Sampled,
    SampleError,
    WireBytes,
    WorkerSpec,
)
from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.sampling.sampler import Sampler
from afd.timing import StageClock

# test-only: a worker of a process started with this variable raises in its forward when a
# micro-batch computes this token id (how the tests make one request fail on a worker; no
# client can set it). Read at each check, from the environment the worker was spawned with.
FAULT_TOKEN_ENV = "AFD_TEST_RAISE_ON_TOKEN"


def injected_fault(input_ids: torch.Tensor) -> None:
    """Raise if this process was started with AFD_TEST_RAISE_ON_TOKEN and the batch has it."""
    token = os.environ.get(FAULT_TOKEN_ENV)
    if token is not None and bool((input_ids == int(token)).any()):
        raise RuntimeError(f"injected fault: token {token} ({FAULT_TOKEN_ENV}, tests only)")


def run_attention_worker(raw_spec: bytes) -> None:
    serve(raw_spec, "attention", AttentionWorker.build)


class AttentionWorker(RoleWorker):
    """Runs one step plan: m micro-batches through every layer, MoE layers via the transport.
    The KV cache lives as long as the process; the transport is rebuilt per data-plane
    generation."""

    role = "attention"

    def __init__(self, model, kv_caches, transport, block_size: int, device, sampler=None):
        self.model, self.kv_caches, self.transport = model, kv_caches, transport
        self.block_size, self.device = block_size, device
        self.runner = PlanRunner(model, kv_caches, block_size, device, sampler)

    @classmethod
    def build(cls, spec: WorkerSpec) -> AttentionWorker:
        device = torch.device(spec.device)
        model = load_model(spec.model_path, dtype=spec.dtype, device=device,
                           part="attention", quantization=spec.quantization)  # fmt: skip
        dtype = getattr(torch, spec.dtype)  # (FP8 layers hold other dtypes)
        kv_caches = allocate_kv_cache(
            model.config, spec.num_kv_blocks, spec.block_size, dtype, device
        )
        sampler = Sampler(spec.eos_token_ids, spec.tokenizer_dir)
        worker = cls(model, kv_caches, None, spec.block_size, device, sampler)
        worker.param_bytes = count_parameter_bytes(model)
        return worker

    def join(self, spec: WorkerSpec, generation: int) -> None:
        self.transport = transport_for(spec, self.model.config, self.device, generation)

    def leave(self) -> None:
        if self.transport is not None:
            self.transport.abandon()
            self.transport = None

    def run(self, plan: AttnStep) -> tuple[type[AttnResult], dict]:
        errors: list[SampleError] = []
        stats = self.transport.stats
        sent, got = stats["bytes_sent"], stats["bytes_received"]
        sampled, prompt_logprobs, clock = self.step(plan, errors)
        wire = WireBytes(stats["bytes_sent"] - sent, stats["bytes_received"] - got)
        fields = dict(sampled=sampled, prompt_logprobs=prompt_logprobs, errors=errors,
                      times=clock.times, events=clock.events, wire=wire)  # fmt: skip
        return AttnResult, fields

    @torch.inference_mode()
    def step(
        self, plan: AttnStep, errors: list[SampleError] | None = None
    ) -> tuple[list[list[Sampled]], list[PromptLogprobs], StageClock]:
        """Run the plan's decode steps: the sampled tokens of each step, and the prompt
        logprobs of prompt chunks. Sequences whose sampling failed get token -1 and their
        reason in `errors`."""
        clock = StageClock(plan.trace, self.device)
        start = clock.now()
        self.runner.release(plan.release)
        t0 = clock.now()
        for t in plan.imports:
            recv_kv(self.kv_caches, t.blocks, t.peer, t.seq_id)
        if plan.imports:
            clock.record("kv_import", "comm", t0, clock.now(), "kv import")
        out = self.runner.run(plan.micro_batches, plan.num_steps, self.ping_pong, clock)
        if errors is not None:
            errors += out.errors
        clock.total("attention_plan", start, clock.now())
        return out.sampled, out.prompt_logprobs, clock

    def ping_pong(self, mbs: list[MicroBatch], num_steps: int, clock: StageClock, on_done) -> None:
        """Every layer for every micro-batch, num_steps times. on_done(i, step, final hidden
        [T, H]) returns micro-batch i's input for the next step, which starts at once, so the
        pipeline does not drain between the steps of a plan."""
        model = self.model
        m = len(mbs)
        hs: list = [None] * m
        res: list = [None] * m
        pending: list = [None] * m  # (dispatch handle, shared-expert output) per micro-batch
        last = len(model.layers) - 1
        for i, mb in enumerate(mbs):
            if mb.meta is not None:
                hs[i] = model.embed(mb.input_ids)
        layers = list(zip(model.layers, self.kv_caches, strict=True))
        for step, (layer, kv), i in itertools.product(range(num_steps), layers, range(m)):
            liveness.beat()
            if pending[i] is not None:
                # the layer before; layer 0's is the last layer of the step before
                hs[i] = self._finish_moe(pending[i], clock, (layer.idx - 1) % len(layers), i)
                pending[i] = None
            mb = mbs[i]
            if layer.idx == 0 and step > 0 and mb.meta is not None:
                mb = mbs[i] = on_done(i, step - 1, model.final_norm(hs[i], res[i]))
                hs[i], res[i] = model.embed(mb.input_ids), None
            if layer.idx == last and mb.meta is not None:
                injected_fault(mb.input_ids)  # mid-step: the other micro-batches are in flight
            t0 = clock.now()
            if mb.meta is None:
                x = torch.empty(0, model.config.hidden_size, device=self.device)
            else:
                x, res[i] = layer.attention_part(hs[i], res[i], mb.positions, mb.meta, kv)
            if not layer.is_moe:
                hs[i] = layer.ffn_part(x) if mb.meta is not None else None
                clock.record("attention", "attention", t0, clock.now(), f"attn L{layer.idx} mb{i}")
                continue
            weights, ids = layer.mlp.gate(x)
            t1 = clock.now()
            clock.record("attention", "attention", t0, t1, f"attn L{layer.idx} mb{i}")
            handle = self.transport.dispatch(x, ids, weights, exchange_tag(layer.idx, i))
            t2 = clock.now()
            clock.record("dispatch", "comm", t1, t2, f"dispatch L{layer.idx} mb{i}")
            # shared experts run here, while the routed experts work on the other side
            shared = layer.mlp.shared(x) if mb.meta is not None else None
            clock.record("attention", "attention", t2, clock.now(), f"shared L{layer.idx} mb{i}")
            pending[i] = (handle, shared)
        for i, mb in enumerate(mbs):
            if pending[i] is not None:
                hs[i] = self._finish_moe(pending[i], clock, last, i)
            if mb.meta is not None:
                on_done(i, num_steps - 1, model.final_norm(hs[i], res[i]))

    def _finish_moe(self, pending, clock: StageClock, layer: int, i: int) -> torch.Tensor:
        handle, shared = pending
        t0, waited = clock.now(), self.transport.wait_ns
        routed = self.transport.combine(handle)
        t1, waited = clock.now(), self.transport.wait_ns - waited
        # blocked until the experts answered vs. summing their rows (exposed transfer work)
        clock.split("combine_wait", "combine_copy", t0, t1, waited, f"combine L{layer} mb{i}")
        return routed if shared is None else routed + shared
