"""Model runner: turns a scheduled batch into model inputs, runs the forward, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afd.kernels.metadata import AttentionMetadata
from afd.sampling.sampler import (
    Sampler,
    SamplerOutput,
    SequenceState,
    row_generator,
    sequence_state,
)
from afd.scheduler.core.scheduler import ScheduledBatch


@dataclass
class ModelInputs:
    """Flattened inputs of one forward; `sample_rows` index the rows of `hidden` to sample from."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] int64, last token of every sequence that samples
    sample_seq_index: list[int]  # batch index of each sampled row
    # prompt_logprobs: rows of `hidden` and the prompt tokens they predict, per sequence
    prompt_rows: list[int] = field(default_factory=list)
    prompt_seqs: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (i, pos, ids)


def prepare_inputs(
    batch: ScheduledBatch,
    block_size: int,
    device: torch.device | str,
    step: int = 0,
    fed_back: dict[int, int] | None = None,
) -> ModelInputs:
    """Gather the tokens each sequence computes this step, their positions and cache slots.
    Decode step `step` > 0 of a multi-step batch computes the token the step before sampled
    (`fed_back[seq_id]`), one position further on."""
    input_ids: list[int] = []
    positions: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    sample_rows: list[int] = []
    sample_seq_index: list[int] = []
    prompt_rows: list[int] = []
    prompt_seqs: list[tuple[int, int, list[int]]] = []
    for i, (seq, n, sample) in enumerate(
        zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True)
    ):
        start = seq.num_computed_tokens + step
        targets = seq.prompt_logprob_targets(start, n) if step == 0 else []
        if targets:
            prompt_rows.extend(range(len(input_ids), len(input_ids) + len(targets)))
            prompt_seqs.append((i, start + 1, targets))
        input_ids.extend(seq.token_ids[start : start + n] if step == 0 else [fed_back[seq.seq_id]])
        positions.extend(range(start, start + n))
        query_lens.append(n)
        seq_lens.append(start + n)
        tables.append(seq.block_table)
        if sample:
            sample_rows.append(len(input_ids) - 1)
            sample_seq_index.append(i)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device)
    return ModelInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        meta=meta,
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=device),
        sample_seq_index=sample_seq_index,
        prompt_rows=prompt_rows,
        prompt_seqs=prompt_seqs,
    )


def sample_batch(
    sampler: Sampler,
    logits: torch.Tensor,
    batch: ScheduledBatch,
    inputs: ModelInputs,
    states: dict[int, SequenceState],
    step: int = 0,
    fed_back: dict[int, int] | None = None,
    errors: dict[int, str] | None = None,
) -> dict[int, tuple[int, dict | None]]:
    """Sample one token for every sequence whose chunk reached its end; keyed by seq_id.
    `states` keeps the sampler state of sequences whose requests need their history. A
    sequence whose sampling fails gets token -1 and its reason in `errors` (by seq_id)."""
    if not inputs.sample_seq_index:
        return {}
    seqs = [batch.seqs[i] for i in inputs.sample_seq_index]
    params = [s.sampling_params for s in seqs]
    seq_states: list[SequenceState | None] = [None] * len(seqs)
    num_out: list[int] = [0] * len(seqs)
    for j, (s, p) in enumerate(zip(seqs, params, strict=True)):
        if not p.processes_logits:
            continue
        n = batch.num_new_tokens[inputs.sample_seq_index[j]]
        start = s.num_computed_tokens + step
        tokens = s.token_ids[start : start + n] if step == 0 else [fed_back[s.seq_id]]
        num_out[j] = start + n - s.num_prompt_tokens
        seq_states[j] = sequence_state(
            states, s.seq_id, p, s.num_prompt_tokens, start, tokens, s.token_ids[:start]
        )
    # the new token's position: one past the last computed row
    positions = (inputs.positions[inputs.sample_rows] + 1).tolist()
    gens = [
        row_generator(p.seed, s.index, pos) if p.seed is not None else None
        for s, p, pos in zip(seqs, params, positions, strict=True)
    ]
    out: SamplerOutput = sampler.sample_isolated(
        logits, params, gens, seq_states, num_out, [s.request_id for s in seqs]
    )
    if errors is not None:
        errors.update((seqs[j].seq_id, msg) for j, msg in out.errors.items())
    return {
        s.seq_id: (tok, out.logprobs[j] if out.logprobs is not None else None)
        for j, (s, tok) in enumerate(zip(seqs, out.token_ids, strict=True))
    }


class ModelRunner:
    """Single-process runner: the whole model and its paged KV cache in this process."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list,
        block_size: int,
        device: str,
        sampler: Sampler | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.sampler = sampler or Sampler()
        self.states: dict[int, SequenceState] = {}
        self.prompt_logprobs: dict[int, list] = {}  # seq_id -> [[position, entries], ...]
        self.sample_errors: dict[int, str] = {}  # seq_id -> why its sampling failed

    def release(self, seq_ids: list[int]) -> None:
        """Drop the sampler state of finished sequences."""
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch
    ) -> list[dict[int, tuple[int, dict[int, float] | None]]]:
        """One sampled dict per decode step of the batch."""
        steps: list[dict] = []
        fed_back: dict[int, int] = {}
        for step in range(batch.num_steps):
            inputs = prepare_inputs(batch, self.block_size, self.device, step, fed_back)
            hidden = self.model(
                inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches
            )  # [T, H]
            logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [S, V]
            steps.append(
                sample_batch(
                    self.sampler, logits, batch, inputs, self.states, step, fed_back,
                    self.sample_errors,
                )
            )  # fmt: skip
            if inputs.prompt_rows:
                self._prompt_logprobs(hidden, batch, inputs)
            # a sequence whose sampling failed (-1) has finished: any valid id keeps it going
            fed_back = {seq_id: max(tok, 0) for seq_id, (tok, _) in steps[-1].items()}
        return steps

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: ScheduledBatch, inputs) -> None:
        logits = self.model.compute_logits(hidden[inputs.prompt_rows])  # [P, V]
        offset = 0
        for i, pos, targets in inputs.prompt_seqs:
            seq = batch.seqs[i]
            rows = logits[offset : offset + len(targets)]
            offset += len(targets)
            entries = self.sampler.prompt_logprobs(
                rows, targets, seq.sampling_params.prompt_logprobs
            )
            self.prompt_logprobs.setdefault(seq.seq_id, []).append([pos, entries])
