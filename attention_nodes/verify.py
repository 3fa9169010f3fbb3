"""Draft verification on the worker (whatever holds the KV): a plan entry with a draft of d
tokens runs d + 1 query positions; each position is sampled as if no draft existed (its own
seeded generator, its own logits processors); the drafts equal to the token sampled before them
are accepted, plus that one sampled token after the last accepted draft.

For a point-mass draft x (n-gram), "sample t ~ p, accept iff t == x" accepts x with probability
p(x) and otherwise gives t ~ p restricted to t != x, renormalised: exactly rejection sampling,
so every emitted token follows the target distribution. Seeded rows draw from (seed, index,
position), so a seeded request gets the same tokens with and without speculation."""

from __future__ import annotations

from afd.comm.messages import PlanEntry, Sampled
from afd.sampling.sampler import SequenceState


def check_draft(e: PlanEntry, vocab_size: int | None) -> None:
    """A draft goes only with an entry that samples, a request without a grammar (whose
    matcher cannot follow several positions here), ids within the vocabulary."""
    if not e.draft:
        return
    if not e.sample or e.params is None:
        raise ValueError(f"plan entry of seq {e.seq_id} has a draft but does not sample")
    if e.params.structured_outputs is not None:
        raise ValueError(f"plan entry of seq {e.seq_id}: no drafts for structured outputs")
    if vocab_size is not None and max(e.draft) >= vocab_size:
        raise ValueError(f"plan entry of seq {e.seq_id}: draft id >= vocabulary {vocab_size}")


def forked_state(state: SequenceState | None, extra: list[int]) -> SequenceState | None:
    """The sampler state of a draft position: the entry's state plus the drafts before it (a
    copy: the real state only learns the drafts that are accepted)."""
    if state is None or not extra:
        return state
    return SequenceState(state.num_prompt_tokens, state.token_ids + extra)


def accept(entries: list[PlanEntry], rows: list[Sampled], states: dict) -> list[list[Sampled]]:
    """Per entry (rows in entry order, 1 + len(draft) each): the tokens it emits, the accepted
    drafts then one sampled token; a failed row (-1) ends the run with it. The sampler state of
    a sequence that accepted drafts learns them."""
    out, i = [], 0
    for e in entries:
        run = rows[i : i + 1 + len(e.draft)]
        i += len(run)
        n = 0
        while n < len(e.draft) and run[n].token == e.draft[n]:
            n += 1
        out.append(run[: n + 1])
        state = states.get(e.seq_id)
        if n and state is not None:
            state.write(e.start + len(e.tokens), e.draft[:n])
    return out
