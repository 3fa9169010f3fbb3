"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afd.sampling.params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per row: sampled id and top-k ids -> logprob


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
        logits = logits / temps[:, None]
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
                row[order[drop]] = float("-inf")
            if p.min_p > 0.0:
                probs = row.softmax(-1)
                row.masked_fill_(probs < p.min_p * probs.max(), float("-inf"))
        return logits.softmax(dim=-1)
