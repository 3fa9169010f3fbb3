"""The one input builder: plan entries -> micro-batches -> forward -> sampled tokens and prompt
logprobs, with multi-step feedback and the sampler state of sequences between plans. The
attention worker runs it with its ping-pong forward (MoE dispatched to expert workers), the
prefill worker and the single-process engine with the whole model in-process (`full_forward`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import torch

from afd.attention_nodes.verify import accept, check_draft, forked_state
from afd.comm.messages import PlanEntry, PromptLogprobs, Sampled, SampleError, SampleSpec
from afd.kernels.metadata import AttentionMetadata
from afd.sampling.params import SamplingParams
from afd.sampling.sampler import Sampler, SequenceState, row_generator, sequence_state
from afd.timing import StageClock


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata | None  # None for an empty micro-batch
    sample_rows: torch.Tensor  # [S]: one per sampled entry, 1 + len(draft) for a drafted one
    sample_entries: list[PlanEntry]  # of sampled sequences, in row order
    # prompt_logprobs: the rows of the entries that compute them
    prompt_rows: list[int] = field(default_factory=list)
    prompt_entries: list[PlanEntry] = field(default_factory=list)


def build_micro_batch(entries: list[PlanEntry], block_size: int, device) -> MicroBatch:
    """The model inputs of one micro-batch of plan entries."""
    ids, pos, q_lens, seq_lens, tables, rows, sampled = [], [], [], [], [], [], []
    prompt_rows, prompt_entries = [], []
    for e in entries:
        tokens, start = e.tokens + e.draft if e.draft else e.tokens, e.start
        if e.prompt_targets:
            prompt_rows += range(len(ids), len(ids) + len(e.prompt_targets))
            prompt_entries.append(e)
        ids += tokens
        pos += range(start, start + len(tokens))
        q_lens.append(len(tokens))
        seq_lens.append(start + len(tokens))
        tables.append(e.block_table)
        if e.sample:
            rows += range(len(ids) - 1 - len(e.draft), len(ids))
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
    """Sample one token per sampled row (an entry's last, and each draft position of a drafted
    one: afd.attention_nodes.verify), from its final hidden rows. Seeded sequences draw from
    a generator derived from (seed, index, position), never from worker state; requests that
    need their history keep a SequenceState per seq_id in `states` (rebuilt from the plan's
    history on a new worker). A sequence whose sampling fails gets token -1 and its reason in
    `errors`."""
    logits = model.compute_logits(hidden)
    params, gens, seq_states, num_out, row_entries = [], [], [], [], []
    for e in entries:
        sp = _sampling_params(_params_of(e))
        state = sequence_state(states, e.seq_id, sp, e.prompt_len, e.start, e.tokens, e.history)
        # a greedy row never draws: its generator (a hash and a seeding each) is not made
        seeded = sp.seed is not None and not sp.greedy
        for j in range(len(e.draft) + 1):
            position = e.start + len(e.tokens) + j  # of the token being sampled
            params.append(sp)
            gens.append(row_generator(sp.seed, e.index, position) if seeded else None)
            num_out.append(position - e.prompt_len)
            seq_states.append(forked_state(state, e.draft[:j]))
            row_entries.append(e)
    out = sampler.sample_isolated(
        logits, params, gens, seq_states, num_out, [f"seq {e.seq_id}" for e in row_entries]
    )
    if errors is not None:
        errors.extend(SampleError(row_entries[j].seq_id, msg) for j, msg in out.errors.items())
    return [
        Sampled(e.seq_id, tok, out.logprobs[j] if out.logprobs is not None else None)
        for j, (e, tok) in enumerate(zip(row_entries, out.token_ids, strict=True))
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


# on_done(i, step, final hidden [T, H]): micro-batch i's input for step + 1 (None after the last)
OnDone = Callable[[int, int, torch.Tensor], "MicroBatch | None"]
# forward(micro-batches, num_steps, clock, on_done): every layer for every micro-batch, num_steps
# times, calling on_done as each micro-batch leaves its last layer
Forward = Callable[[list[MicroBatch], int, StageClock, OnDone], None]


@dataclass
class PlanOutput:
    """What a plan made: sampled tokens per decode step (a drafted sequence's k-th token in
    step k: its accepted drafts, then its sampled token), prompt logprobs, sampling errors."""

    sampled: list[list[Sampled]]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    errors: list[SampleError] = field(default_factory=list)


class PlanRunner:
    """Runs the micro-batches of a step plan through a forward and samples them. Keeps the
    sampler state of the sequences that need their history until `release` (unless
    `keep_states` is off: each entry then brings its history). `after_forward(mb)` runs after
    each in-process forward, before its micro-batch is sampled."""

    def __init__(
        self,
        model,
        kv_caches: list,
        block_size: int,
        device,
        sampler: Sampler | None = None,
        keep_states: bool = True,
        after_forward: Callable[[MicroBatch], None] | None = None,
    ):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.device = torch.device(device)
        self.sampler = sampler or Sampler()
        self.keep_states, self.after_forward = keep_states, after_forward
        self.states: dict[int, SequenceState] = {}

    def release(self, seq_ids: list[int]) -> None:
        """Drop the sampler state of finished sequences."""
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)

    def full_forward(
        self, mbs: list[MicroBatch], num_steps: int, clock: StageClock, on_done: OnDone
    ) -> None:
        """The whole model in this process (part='full'), one micro-batch after another."""
        for step in range(num_steps):
            for i, mb in enumerate(mbs):
                if mb.meta is None:
                    continue
                hidden = self.model(mb.input_ids, mb.positions, mb.meta, self.kv_caches)
                if self.after_forward is not None:
                    self.after_forward(mb)
                on_done(i, step, hidden)

    @torch.inference_mode()
    def run(
        self,
        micro_batches: list[list[PlanEntry]],
        num_steps: int,
        forward: Forward,
        clock: StageClock,
    ) -> PlanOutput:
        """Run a plan's decode steps; in a multi-step plan (pure decode: one token per entry,
        every entry samples) each step's tokens are the next step's input."""
        out = PlanOutput([[] for _ in range(num_steps)])
        if not micro_batches:
            return out
        drafted = self._check_drafts(micro_batches, num_steps)
        entries = list(micro_batches)  # replaced per step, the plan's own lists untouched
        mbs = [build_micro_batch(e, self.block_size, self.device) for e in entries]
        states = self.states if self.keep_states else {}

        def on_done(i: int, step: int, hidden: torch.Tensor) -> MicroBatch | None:
            # in the ping-pong this runs as soon as micro-batch i leaves its last layer, while
            # the experts still work on the micro-batches after it
            mb = mbs[i]
            if mb.prompt_entries:
                out.prompt_logprobs += entry_prompt_logprobs(self.model, self.sampler, mb, hidden)
            if not mb.sample_entries:  # prefill chunks that do not reach their prompt's end
                return None
            t0 = clock.now()
            got = sample_entries(
                self.model, self.sampler, mb.sample_entries, hidden[mb.sample_rows], states,
                out.errors,
            )  # fmt: skip
            if drafted:  # one token per step for each token emitted (num_steps is 1)
                for run in accept(mb.sample_entries, got, states):
                    for k, s in enumerate(run):
                        out.sampled += [[] for _ in range(k + 1 - len(out.sampled))]
                        out.sampled[k].append(s)
            else:
                out.sampled[step] += got
            nxt = None
            if step + 1 < num_steps:
                # a sequence whose sampling failed has finished: any valid id keeps it going
                entries[i] = [
                    msgspec.structs.replace(e, tokens=[max(s.token, 0)], start=e.start + 1)
                    for e, s in zip(entries[i], got, strict=True)
                ]
                nxt = mbs[i] = build_micro_batch(entries[i], self.block_size, self.device)
            clock.record("attention", "attention", t0, clock.now(), f"sample mb{i}")
            return nxt

        forward(mbs, num_steps, clock, on_done)
        return out

    def _check_drafts(self, micro_batches: list[list[PlanEntry]], num_steps: int) -> bool:
        """Whether the plan verifies drafts; ValueError for a draft that cannot be verified."""
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        drafted = False
        for e in (e for mb in micro_batches for e in mb if e.draft):
            check_draft(e, vocab)
            drafted = True
        if drafted and num_steps > 1:
            raise ValueError("drafts in a multi-step plan: speculation runs one step per plan")
        return drafted
