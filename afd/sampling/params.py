"""Sampling settings of one request, with vLLM's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Temperatures below this sample greedily (as in vLLM): dividing logits by a smaller one
# overflows float32 and makes the probabilities NaN, and the distribution is argmax anyway.
MIN_TEMPERATURE = 1e-5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value, lo: int = INT64_MIN, hi: int = INT64_MAX) -> bool:
    # ints travel to workers in msgpack, which holds 64 bits; bool is not a number here
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; invalid values raise ValueError."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables; values at or above the vocabulary size do too
    min_p: float = 0.0
    seed: int | None = None  # any signed 64-bit integer
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's and the top-k

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) for t in ids):
            raise ValueError("stop_token_ids must be 64-bit integers")
        self.stop_token_ids = ids
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (_is_int(self.n, 1), f"n must be at least 1, got {self.n}"),
            (
                _is_real(self.temperature) and self.temperature >= 0,
                f"temperature must be a finite number >= 0, got {self.temperature}",
            ),
            (
                _is_real(self.top_p) and 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], got {self.top_p}",
            ),
            (_is_int(self.top_k, 0), f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (
                _is_real(self.min_p) and 0 <= self.min_p <= 1,
                f"min_p must be in [0, 1], got {self.min_p}",
            ),
            (
                self.seed is None or _is_int(self.seed),
                f"seed must be a signed 64-bit integer, got {self.seed}",
            ),
            (
                self.max_tokens is None or _is_int(self.max_tokens, 1),
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (
                self.logprobs is None or _is_int(self.logprobs, 0, 20),
                f"logprobs must be between 0 and 20, got {self.logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE
