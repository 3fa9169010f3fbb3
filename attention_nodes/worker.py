"""Attention worker: KV cache, attention, gate, shared experts, dense layers, lm_head, sampling,
and the ping-pong loop that overlaps attention of micro-batch i+1 with experts on micro-batch i."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass, field

import msgspec
import torch

from afd.attention_nodes.kv_transfer import recv_kv
from afd.comm import liveness
from afd.comm.control import RoleWorker, serve, transport_for
from afd.comm.dispatch import exchange_tag
from afd.comm.messages import (
    AttnResult,
    AttnStep,
    PlanEntry,
    PromptLogprobs,
    Sampled,
    SampleError,
    SampleSpec,
    WireBytes,
    WorkerSpec,
)
from afd.kernels.metadata import AttentionMetadata
from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.sampling.params import SamplingParams
from afd.sampling.sampler import Sampler, SequenceState, row_generator, sequence_state
from afd.timing import StageClock


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata | None  # None for an empty micro-batch
    sample_rows: torch.Tensor  # [S]
    sample_entries: list[PlanEntry]  # of sampled sequences, in row order
    # prompt_logprobs: the rows of the entries that compute them
    prompt_rows: list[int] = field(default_factory=list)
    prompt_entries: list[PlanEntry] = field(default_factory=list)


def build_micro_batch(entries: list[PlanEntry], block_size: int, device) -> MicroBatch:
    """The model inputs of one micro-batch of plan entries."""
    ids, pos, q_lens, seq_lens, tables, rows, sampled = [], [], [], [], [], [], []
    prompt_rows, prompt_entries = [], []
    for e in entries:
        tokens, start = e.tokens, e.start
        if e.prompt_targets:
            prompt_rows += range(len(ids), len(ids) + len(e.prompt_targets))
            prompt_entries.append(e)
        ids += tokens
        pos += range(start, start + len(tokens))
        q_lens.append(len(tokens))
        seq_lens.append(start + len(tokens))
        tables.append(e.block_table)
        if e.sample:
            rows.append(len(ids) - 1)
            sampled.append(e)
    meta = (
        AttentionMetadata.build(q_lens, seq_lens, tables, block_size, device) if entries else None
    )
    return MicroBatch(
        torch.tensor(ids, dtype=torch.int64, device=device),
        torch.tensor(pos, dtype=torch.int64, device=device),
        meta,
        torch.tensor(rows, dtype=torch.int64, device=device),
        sampled,
        prompt_rows,
        prompt_entries,
    )


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
        self.sampler = sampler or Sampler()
        self.states: dict[int, SequenceState] = {}

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
        errors = [] if errors is None else errors
        start = clock.now()
        for seq_id in plan.release:
            self.states.pop(seq_id, None)
        t0 = clock.now()
        for t in plan.imports:
            recv_kv(self.kv_caches, t.blocks, t.peer, t.seq_id)
        if plan.imports:
            clock.record("kv_import", "comm", t0, clock.now(), "kv import")
        num_steps = plan.num_steps
        if not plan.micro_batches:
            clock.total("attention_plan", start, clock.now())
            return [[] for _ in range(num_steps)], [], clock
        entries = plan.micro_batches
        mbs = [build_micro_batch(e, self.block_size, self.device) for e in entries]
        sampled: list[list[Sampled]] = [[] for _ in range(num_steps)]
        prompt_logprobs: list[PromptLogprobs] = []

        def sample(i: int, step: int, hidden: torch.Tensor) -> MicroBatch | None:
            # runs as soon as micro-batch i leaves its last layer, while the experts still work
            # on the micro-batches after it; in a multi-step plan its tokens are the next input
            mb = mbs[i]
            if mb.prompt_entries:
                prompt_logprobs.extend(entry_prompt_logprobs(self.model, self.sampler, mb, hidden))
            if not mb.sample_entries:  # prefill chunks that do not reach their prompt's end
                return None
            t0 = clock.now()
            got = sample_entries(
                self.model, self.sampler, mb.sample_entries, hidden[mb.sample_rows], self.states,
                errors,
            )  # fmt: skip
            sampled[step].extend(got)
            nxt = None
            if step + 1 < num_steps:
                # a multi-step plan is pure decode: one token per entry, every entry samples
                # (a sequence whose sampling failed has finished; any valid id keeps it going)
                entries[i] = [
                    msgspec.structs.replace(e, tokens=[max(s.token, 0)], start=e.start + 1)
                    for e, s in zip(entries[i], got, strict=True)
                ]
                nxt = mbs[i] = build_micro_batch(entries[i], self.block_size, self.device)
            clock.record("attention", "attention", t0, clock.now(), f"sample mb{i}")
            return nxt

        self.ping_pong(mbs, num_steps, clock, sample)
        clock.total("attention_plan", start, clock.now())
        return sampled, prompt_logprobs, clock

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


@functools.lru_cache(maxsize=1024)
def _sampling_params(spec: SampleSpec) -> SamplingParams:
    # most requests share a handful of settings: build (and validate) each one once
    return spec.to_params()


def _params_of(e: PlanEntry) -> SampleSpec:
    if e.params is None:
        raise ValueError(f"plan entry of seq {e.seq_id} samples but has no params")
    return e.params


def sample_entries(
    model,
    sampler: Sampler,
    entries: list[PlanEntry],
    hidden,
    states: dict,
    errors: list[SampleError] | None = None,
) -> list[Sampled]:
    """Sample one token per plan entry from its final hidden row. Seeded sequences draw from
    a generator derived from (seed, index, position), never from worker state; requests that
    need their history keep a SequenceState per seq_id in `states` (rebuilt from the plan's
    history on a new worker). A sequence whose sampling fails gets token -1 and its reason in
    `errors`."""
    logits = model.compute_logits(hidden)
    params, gens, seq_states, num_out = [], [], [], []
    for e in entries:
        sp = _sampling_params(_params_of(e))
        params.append(sp)
        position = e.start + len(e.tokens)  # of the token being sampled
        gens.append(row_generator(sp.seed, e.index, position) if sp.seed is not None else None)
        num_out.append(position - e.prompt_len)
        seq_states.append(
            sequence_state(states, e.seq_id, sp, e.prompt_len, e.start, e.tokens, e.history)
        )
    out = sampler.sample_isolated(
        logits, params, gens, seq_states, num_out, [f"seq {e.seq_id}" for e in entries]
    )
    if errors is not None:
        errors.extend(SampleError(entries[j].seq_id, msg) for j, msg in out.errors.items())
    return [
        Sampled(e.seq_id, tok, out.logprobs[j] if out.logprobs is not None else None)
        for j, (e, tok) in enumerate(zip(entries, out.token_ids, strict=True))
    ]


def entry_prompt_logprobs(model, sampler: Sampler, mb: MicroBatch, hidden) -> list:
    """The prompt logprobs of the entries of a micro-batch that compute them."""
    logits = model.compute_logits(hidden[mb.prompt_rows])  # [P, V]
    out, offset = [], 0
    for e in mb.prompt_entries:
        targets = e.prompt_targets
        rows = logits[offset : offset + len(targets)]
        offset += len(targets)
        k = _params_of(e).prompt_logprobs
        out.append(PromptLogprobs(e.seq_id, e.start + 1, sampler.prompt_logprobs(rows, targets, k)))
    return out
