"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from afd.sampling.params import SamplingParams

logger = logging.getLogger("afd.sampling")


@dataclass
class SamplerOutput:
    token_ids: list[int]  # -1 where the row failed (see errors)
    logprobs: list[dict[int, float] | None] | None  # per row: sampled id and top-k -> logprob
    errors: dict[int, str] = field(default_factory=dict)  # row -> why its sampling failed


def row_generator(seed: int, index: int, position: int) -> torch.Generator:
    """The generator that samples the token at `position` of sequence `index` of a seeded
    request. It depends on request state only, so any worker (a replacement, or a replica that
    recomputes the sequence) draws the same token."""
    key = f"{seed}:{index}:{position}".encode()
    derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(derived)


class Sampler:
    """Samples one token per row of logits; logprobs come from the raw (unscaled) logits."""

    def __call__(
        self,
        logits: torch.Tensor,  # [B, V] float32
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SamplerOutput:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)  # [B]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = self._filtered_probs(logits[rows], [params[i] for i in random_rows])
            for j, i in enumerate(random_rows):
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
        token_list = tokens.tolist()
        logprobs = None
        if any(p.logprobs is not None for p in params):
            lp = torch.log_softmax(logits, dim=-1)
            logprobs = []
            for i, p in enumerate(params):
                entry = {token_list[i]: float(lp[i, token_list[i]])}
                if p.logprobs:
                    values, ids = lp[i].topk(p.logprobs)
                    entry.update(zip(ids.tolist(), values.tolist(), strict=True))
                logprobs.append(entry)
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=logits.device)
        # the largest logit becomes 0: small temperatures stretch the others towards -inf
        # instead of overflowing to +inf
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temps[:, None]
        vocab = logits.shape[-1]
        for j, p in enumerate(params):
            row = logits[j]
            if p.top_k and p.top_k < vocab:
                kth = row.topk(p.top_k).values[-1]
                row.masked_fill_(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = row.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                # drop tokens once the mass before them already reaches top_p (keep at least one)
                drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
                drop[0] = False  # a top_p below float32's range rounds to 0
                row[order[drop]] = float("-inf")
            if p.min_p > 0.0:
                probs = row.softmax(-1)
                row.masked_fill_(probs < p.min_p * probs.max(), float("-inf"))
        return logits.softmax(dim=-1)

    def sample_isolated(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        names: list[object] | None = None,
    ) -> SamplerOutput:
        """Like __call__, but a row whose sampling raises fails alone: its token is -1 and
        `errors[row]` says why; the other rows are sampled as usual. `names` label the log."""
        states = [g.get_state() if g is not None else None for g in generators]
        try:
            return self(logits, params, generators)
        except Exception:
            pass  # find the rows at fault one by one, each from its generator's first state
        for g, state in zip(generators, states, strict=True):
            if g is not None:
                g.set_state(state)
        tokens: list[int] = []
        logprobs: list[dict[int, float] | None] = []
        errors: dict[int, str] = {}
        for i, p in enumerate(params):
            try:
                out = self(logits[i : i + 1], [p], [generators[i]])
            except Exception as e:
                errors[i] = f"sampling failed: {type(e).__name__}: {e}"
                name = names[i] if names is not None else i
                logger.warning("sampling of %s failed: %r", name, e)
                tokens.append(-1)
                logprobs.append(None)
                continue
            tokens.append(out.token_ids[0])
            logprobs.append(out.logprobs[0] if out.logprobs is not None else None)
        keep = any(p.logprobs is not None for p in params)
        return SamplerOutput(tokens, logprobs if keep else None, errors)
