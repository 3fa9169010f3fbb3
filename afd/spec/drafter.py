"""The driver's side of speculation: which draft each decoding sequence verifies this step, how
acceptance went (vLLM's spec-decode counters), and when a sequence stops drafting because its
drafts keep failing (each rejected draft token is a wasted query row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from afd.spec.config import SpeculativeConfig
from afd.spec.ngram import propose_ngram

# a sequence whose recent acceptance rate (accepted / drafted tokens, an exponential average)
# falls below LOW_ACCEPTANCE pauses drafting for PAUSE_STEPS decode steps, doubling each time;
# it starts at START_RATE (two drafts wholly rejected pause it) and comes back from a pause just
# above the line (one more wholly rejected draft pauses it again, for twice as long)
LOW_ACCEPTANCE = 0.3
START_RATE = 0.5
EMA_WEIGHT = 0.3
PAUSE_STEPS = 8
MAX_PAUSE_STEPS = 256


@dataclass
class DraftState:
    """One sequence's drafting history."""

    rate: float = START_RATE
    pause: int = 0  # decode steps left without drafting
    next_pause: int = PAUSE_STEPS


@dataclass
class SpecCounts:
    """Cumulative, as vLLM's spec_decode_* counters: verifications with a draft, draft tokens,
    accepted draft tokens, and accepted tokens per draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def add(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.accepted_per_pos += [0] * (drafted - len(self.accepted_per_pos))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    def stats(self) -> dict[str, float]:
        """engine.stats() keys (counters end in _total; /metrics labels the per-position ones)."""
        out = {
            "spec_decode_num_drafts_total": float(self.num_drafts),
            "spec_decode_num_draft_tokens_total": float(self.num_draft_tokens),
            "spec_decode_num_accepted_tokens_total": float(self.num_accepted_tokens),
        }
        for i, n in enumerate(self.accepted_per_pos):
            out[f"spec_decode_num_accepted_tokens_per_pos_{i}_total"] = float(n)
        return out

    def summary(self) -> dict[str, Any]:
        """What `vllm bench serve` prints: acceptance rate (accepted / draft tokens), mean
        acceptance length (1 + accepted / drafts: tokens per verification), per position."""
        d, t, a = self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        return {
            "num_drafts": d,
            "num_draft_tokens": t,
            "num_accepted_tokens": a,
            "acceptance_rate": a / t if t else None,
            "mean_acceptance_length": 1 + a / d if d else None,
            "acceptance_rate_per_position": [n / d for n in self.accepted_per_pos] if d else [],
        }

    @classmethod
    def from_stats(cls, stats: dict[str, float]) -> SpecCounts:
        """Back from stats() keys (or /metrics samples renamed to them)."""
        per_pos = sorted(
            (int(k.split("_")[-2]), int(v))
            for k, v in stats.items()
            if k.startswith("spec_decode_num_accepted_tokens_per_pos_")
        )
        return cls(
            int(stats.get("spec_decode_num_drafts_total", 0)),
            int(stats.get("spec_decode_num_draft_tokens_total", 0)),
            int(stats.get("spec_decode_num_accepted_tokens_total", 0)),
            [n for _, n in per_pos],
        )


class Sequence(Protocol):
    """What drafting reads of a scheduler sequence (afd.scheduler.core.sequence.Sequence)."""

    token_ids: list[int]
    sampling_params: Any
    num_output_tokens: int
    draft_state: DraftState | None


class NgramDrafter:
    """Proposes n-gram drafts for decoding sequences and learns from their acceptance."""

    def __init__(self, spec: SpeculativeConfig):
        self.k = spec.num_speculative_tokens
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max
        self.counts = SpecCounts()

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """At most min(K, room) draft tokens for a decoding sequence; none for a grammar
        request, past max_tokens, or while its drafting is paused."""
        p = seq.sampling_params
        if p.structured_outputs is not None:
            return []  # the grammar matcher follows one position per step (documented)
        if p.max_tokens is not None:  # the last token of a request is never a draft
            room = min(room, p.max_tokens - seq.num_output_tokens - 1)
        if room <= 0:
            return []
        state = seq.draft_state = seq.draft_state or DraftState()
        if state.pause > 0:
            state.pause -= 1
            return []
        return propose_ngram(seq.token_ids, min(self.k, room), self.min_n, self.max_n)

    def observe(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """A verified draft: count it, and pause a sequence whose drafts keep failing."""
        self.counts.add(drafted, accepted)
        state = seq.draft_state
        state.rate = (1 - EMA_WEIGHT) * state.rate + EMA_WEIGHT * accepted / drafted
        if state.rate < LOW_ACCEPTANCE:
            state.pause, state.rate = state.next_pause, LOW_ACCEPTANCE + 0.05
            state.next_pause = min(2 * state.next_pause, MAX_PAUSE_STEPS)
        elif accepted:
            state.next_pause = PAUSE_STEPS
