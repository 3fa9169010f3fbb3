"""N-gram prompt lookup (vLLM's `ngram` method): the tokens that followed the most recent earlier
occurrence of the sequence's last n tokens (one with k tokens after it, when there is), for the
longest n in [min_n, max_n] that occurs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` draft tokens continuing `tokens` (prompt + output so far); [] when no suffix of
    min_n..max_n tokens occurred before. Vectorised over candidate match ends: O(len * n)."""
    size = len(tokens)
    if k <= 0 or size < min_n + 1:
        return []
    a = np.asarray(tokens, dtype=np.int64)
    # a match "ending at e" means a[e - n:e] == a[size - n:]; e < size so a token follows it
    ends = np.flatnonzero(a[: size - 1] == a[-1]) + 1
    best, n = None, 1
    while ends.size and n <= max_n:
        if n >= min_n:
            best = ends
        if n == max_n or n >= size - 1:
            break
        ends = ends[ends - n - 1 >= 0]  # room for one more token before the match
        ends = ends[a[ends - n - 1] == a[size - n - 1]]
        n += 1
    if best is None or not best.size:
        return []
    # the most recent occurrence with k tokens after it (a loop's last lap has fewer), else the
    # one with the longest continuation
    full = best[best + k <= size]
    e = int(full[-1] if full.size else best[0])
    return a[e : e + k].tolist()
