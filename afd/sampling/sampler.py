"""Token sampling: logits processors (logit bias, min_tokens, penalties, structured-output masks),
then greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs with ranks."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afd.sampling.params import SamplingParams
from afd.sampling.structured import GrammarDeadEnd

logger = logging.getLogger("afd.sampling")

# per row: token id -> (logprob, rank); rank 1 is the most likely token
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # -1 where the row failed (see errors)
    logprobs: list[TokenLogprobs] | None  # per row: the sampled id and the top-k
    errors: dict[int, str] = field(default_factory=dict)  # row -> why its sampling failed


def row_generator(seed: int, index: int, position: int) -> torch.Generator:
    """The generator that samples the token at `position` of sequence `index` of a seeded
    request. It depends on request state only, so any worker (a replacement, or a replica that
    recomputes the sequence) draws the same token."""
    key = f"{seed}:{index}:{position}".encode()
    derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(derived)


class SequenceState:
    """What a sampler keeps of one sequence between steps: its tokens by position (prompt then
    output) and its grammar matcher. Rebuilt from the plan when a sequence first appears on a
    worker, so it never holds anything the plan could not give again."""

    def __init__(self, num_prompt_tokens: int, token_ids: list[int] | None = None):
        self.num_prompt_tokens = num_prompt_tokens
        self.token_ids: list[int] = [] if token_ids is None else token_ids
        self.grammar = None  # GrammarState, made on first use

    def write(self, start: int, tokens: list[int]) -> None:
        """The plan's tokens at positions [start, start + len); what followed them is stale."""
        if start > len(self.token_ids):
            raise ValueError(
                f"sampler state has {len(self.token_ids)} tokens, the plan starts at {start}"
            )
        self.token_ids[start:] = tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


class Sampler:
    """Samples one token per row of logits; logprobs come from the raw (unprocessed) logits.
    `eos_token_ids` are what min_tokens suppresses and where a grammar ends; `tokenizer_dir` is
    read on the first structured-output request."""

    def __init__(
        self,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        tokenizer_dir: str | Path | None = None,
    ):
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.tokenizer_dir = None if tokenizer_dir is None else str(tokenizer_dir)

    def grammar_backend(self, vocab_size: int):
        from afd.sampling.structured import grammar_backend

        if self.tokenizer_dir is None:
            raise ValueError("this sampler has no tokenizer for structured outputs")
        return grammar_backend(self.tokenizer_dir, vocab_size, tuple(self.eos_token_ids))

    def __call__(
        self,
        logits: torch.Tensor,  # [B, V] float32
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        states: list[SequenceState | None] | None = None,
        num_output_tokens: list[int] | None = None,
    ) -> SamplerOutput:
        """`states` (rows whose params need_history) and `num_output_tokens` (rows with
        min_tokens) are only read for requests that use those fields."""
        raw = logits.float()
        device = raw.device
        tokens = raw.argmax(dim=-1)  # [B]
        processed = [i for i, p in enumerate(params) if p.processes_logits]
        local = {i: j for j, i in enumerate(processed)}  # batch row -> row of `sub`
        if processed:
            # only these rows change: a copy of them, never of the whole batch
            sub = raw[torch.tensor(processed, device=device)]  # [R, V]
            self._process(
                sub,
                [raw[i] for i in processed],
                [params[i] for i in processed],
                [states[i] for i in processed] if states is not None else [None] * len(local),
                [num_output_tokens[i] for i in processed]
                if num_output_tokens
                else [0] * len(local),
            )
            tokens[torch.tensor(processed, device=device)] = sub.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = raw[torch.tensor(random_rows, device=device)]
            mine = [(k, local[i]) for k, i in enumerate(random_rows) if i in local]
            if mine:
                rows[[k for k, _ in mine]] = sub[[j for _, j in mine]]
            probs = self._filtered_probs(rows, [params[i] for i in random_rows])
            for j, i in enumerate(random_rows):
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
        token_list = tokens.tolist()
        logprobs = None
        if any(p.logprobs is not None for p in params):
            logprobs = self._logprobs(raw, token_list, [p.logprobs for p in params])
        return SamplerOutput(token_list, logprobs)

    # ---- logits processors ----------------------------------------------------------------

    def _process(self, logits, raw_rows, params, states, num_output_tokens) -> None:
        """Bias, min_tokens, penalties and grammar masks on logits [R, V] in place (vLLM's
        order); params, states, num_output_tokens and raw_rows (the unprocessed [V] rows) are
        per row. A row left with no finite logit falls back to its grammar mask alone; a grammar
        that allows no token before it ended raises GrammarDeadEnd (the row fails)."""
        device = logits.device
        vocab = logits.shape[-1]
        rows = range(len(params))
        bias = [
            (i, t, b) for i in rows for t, b in (params[i].logit_bias or {}).items() if t < vocab
        ]
        if bias:
            r, t, b = zip(*bias, strict=True)
            logits.index_put_(
                (torch.tensor(r, device=device), torch.tensor(t, device=device)),
                torch.tensor(b, dtype=logits.dtype, device=device),
                accumulate=True,
            )
        suppress = []
        for i in rows:
            p = params[i]
            if p.min_tokens and num_output_tokens[i] < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                suppress += [(i, t) for t in ids if t < vocab]
        if suppress:
            r, t = zip(*suppress, strict=True)
            logits[torch.tensor(r, device=device), torch.tensor(t, device=device)] = float("-inf")
        penalised = [i for i in rows if params[i].needs_history and _penalised(params[i])]
        if penalised:
            self._penalties(logits, penalised, params, states)
        grammar_rows = [i for i in rows if params[i].structured_outputs is not None]
        mask = None
        if grammar_rows:
            mask = self._grammar_mask(vocab, grammar_rows, params, states)
            backend = self.grammar_backend(vocab)
            sub = logits[grammar_rows]
            backend.apply_bitmask(sub, mask)
            logits[grammar_rows] = sub
        finite = torch.isfinite(logits).any(-1).tolist()
        dead = [i for i in rows if not finite[i]]
        if dead:
            self._fallback(logits, raw_rows, dead, grammar_rows, mask)

    def _penalties(self, logits, rows, params, states) -> None:
        """vLLM's penalties: repetition divides positive (multiplies negative) logits of tokens
        in the prompt or output; frequency and presence subtract per output occurrence / once.
        Only the (row, token) pairs that occurred are touched: O(tokens so far), not O(V)."""
        device, vocab = logits.device, logits.shape[-1]

        def keys(part) -> torch.Tensor:  # row * V + token for every token of each row's part
            flat = [i * vocab + t for i in rows for t in part(states[i]) if 0 <= t < vocab]
            return torch.tensor(flat, dtype=torch.int64, device=device)

        out_keys, counts = torch.unique(keys(lambda st: st.output_ids), return_counts=True)
        seen = torch.unique(torch.cat([keys(lambda st: st.token_ids[: st.num_prompt_tokens]),
                                       out_keys]))  # fmt: skip
        rep = torch.zeros(logits.shape[0], device=device)
        freq, pres = torch.zeros_like(rep), torch.zeros_like(rep)
        index = torch.tensor(rows, device=device)
        rep[index] = torch.tensor([params[i].repetition_penalty for i in rows], device=device)
        freq[index] = torch.tensor([params[i].frequency_penalty for i in rows], device=device)
        pres[index] = torch.tensor([params[i].presence_penalty for i in rows], device=device)
        r, t = seen // vocab, seen % vocab
        x = logits[r, t]
        # a penalty near 0 (5e-324 is 0 in float32) would make a logit inf and the row NaN
        top = torch.finfo(logits.dtype).max
        logits[r, t] = torch.where(x > 0, x / rep[r], x * rep[r]).clamp(max=top)
        r, t = out_keys // vocab, out_keys % vocab
        logits[r, t] -= freq[r] * counts.to(logits.dtype) + pres[r]

    def _grammar_mask(self, vocab, rows, params, states) -> torch.Tensor:
        backend = self.grammar_backend(vocab)
        mask = backend.new_bitmask(len(rows))
        for j, i in enumerate(rows):
            state = states[i]
            if state.grammar is None:
                state.grammar = backend.matcher(params[i].structured_outputs)
            state.grammar.sync(state.output_ids)
            state.grammar.fill(mask, j)
        return mask

    def _fallback(self, logits, raw_rows, dead, grammar_rows, mask) -> None:
        # e.g. min_tokens suppressing the only token a finished grammar allows: the grammar wins,
        # so the output stays valid (a grammar that allows nothing raised GrammarDeadEnd when
        # its mask was filled); a row without a grammar and no finite logit may only end
        backend = self.grammar_backend(logits.shape[-1]) if grammar_rows else None
        for i in dead:
            row = raw_rows[i][None].clone()
            if i in grammar_rows:
                j = grammar_rows.index(i)
                backend.apply_bitmask(row, mask[j : j + 1])
            if not torch.isfinite(row).any():
                row = torch.full_like(row, float("-inf"))
                row[0, self.eos_token_ids or [0]] = 0.0
            logits[i] = row[0]

    # ---- sampling -------------------------------------------------------------------------

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

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list:
        """Per row: {token: (logprob, rank)} for the given token and the top-k (k = ks[row]);
        rows with k None get an empty dict."""
        rows = [i for i, k in enumerate(ks) if k is not None]
        out: list[TokenLogprobs] = [{} for _ in ks]
        if not rows:
            return out
        sub = raw if len(rows) == len(ks) else raw[torch.tensor(rows, device=raw.device)]
        lp = torch.log_softmax(sub, dim=-1)  # [R, V]
        kmax = max(1, max(ks[i] for i in rows))
        top_v, top_i = lp.topk(kmax, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        chosen = [tokens[i] for i in rows]
        chosen_lp = lp.gather(1, torch.tensor(chosen, device=raw.device)[:, None])[:, 0].tolist()
        # a chosen token among the top-k has its rank there (greedy: 1); only the others
        # (sampled further down the distribution) need a count over the vocabulary
        ranks = [top_i[j].index(t) + 1 if t in top_i[j] else 0 for j, t in enumerate(chosen)]
        far = [j for j, r in enumerate(ranks) if r == 0]
        if far:
            idx = torch.tensor(far, device=raw.device)
            worse = lp[idx] > torch.tensor([chosen_lp[j] for j in far], device=raw.device)[:, None]
            for j, n in zip(far, worse.sum(-1).tolist(), strict=True):
                ranks[j] = n + 1
        for j, i in enumerate(rows):
            entry = {tokens[i]: (chosen_lp[j], ranks[j])}
            for r in range(ks[i]):
                entry.setdefault(top_i[j][r], (top_v[j][r], r + 1))
            out[i] = entry
        return out

    def sample_isolated(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        states: list[SequenceState | None] | None = None,
        num_output_tokens: list[int] | None = None,
        names: list[object] | None = None,
    ) -> SamplerOutput:
        """Like __call__, but a row whose sampling raises fails alone: its token is -1 and
        `errors[row]` says why; the other rows are sampled as usual. `names` label the log."""
        seeds = [g.get_state() if g is not None else None for g in generators]
        try:
            return self(logits, params, generators, states, num_output_tokens)
        except Exception:
            pass  # find the rows at fault one by one, each from its generator's first state
        for g, seed in zip(generators, seeds, strict=True):
            if g is not None:
                g.set_state(seed)
        tokens: list[int] = []
        logprobs: list[TokenLogprobs] = []
        errors: dict[int, str] = {}
        for i, p in enumerate(params):
            try:
                out = self(
                    logits[i : i + 1],
                    [p],
                    [generators[i]],
                    None if states is None else [states[i]],
                    None if not num_output_tokens else [num_output_tokens[i]],
                )
            except Exception as e:
                # a grammar dead end says what happened itself
                dead_end = isinstance(e, GrammarDeadEnd)
                errors[i] = str(e) if dead_end else f"sampling failed: {type(e).__name__}: {e}"
                name = names[i] if names is not None else i
                logger.warning("sampling of %s failed: %r", name, e)
                tokens.append(-1)
                logprobs.append({})
                continue
            tokens.append(out.token_ids[0])
            logprobs.append(out.logprobs[0] if out.logprobs is not None else {})
        keep = any(p.logprobs is not None for p in params)
        return SamplerOutput(tokens, logprobs if keep else None, errors)

    def prompt_logprobs(self, logits: torch.Tensor, targets: list[int], k: int) -> list:
        """Rows of logits [P, V] each predicting targets[p]: {target and top-k: (logprob, rank)}."""
        return self._logprobs(logits.float(), targets, [k] * len(targets))


def _penalised(p: SamplingParams) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def sequence_state(
    states: dict[int, SequenceState],
    seq_id: int,
    params: SamplingParams,
    num_prompt_tokens: int,
    start: int,
    tokens: list[int],
    history: list[int] | None = None,
) -> SequenceState | None:
    """The sampler state of a sequence about to sample after computing `tokens` at `start`:
    made from `history` (its tokens before `start`) when the sequence is new here, then brought
    to the plan's position. None for requests that need no history."""
    if not params.needs_history:
        return None
    state = states.get(seq_id)
    if state is None:
        if start and (history is None or len(history) < start):
            raise ValueError(f"sequence {seq_id} is new here but its plan entry has no history")
        state = states[seq_id] = SequenceState(num_prompt_tokens, list(history or [])[:start])
    state.write(start, tokens)
    return state
