"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix caching."""

from __future__ import annotations

from collections import OrderedDict

from afd.scheduler.core.sequence import Sequence


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """Chained hash: a block's identity includes every token before it."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Hands out KV blocks; full computed blocks are published by hash and reused by later
    sequences with the same prefix; unreferenced cached blocks are evicted LRU when needed."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached or evicted
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0, LRU first
        self.hash_to_block: dict[int, int] = {}
        self.block_to_hash: dict[int, int] = {}
        self._seq_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its published blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding a cached prefix; never the whole sequence (one token must be computed).
        None for prompt_logprobs requests: every prompt position must be computed."""
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        blocks, parent = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = block_hash(parent, seq.block(i, self.block_size))
            b = self.hash_to_block.get(h)
            if b is None:
                break
            blocks.append(b)
            parent = h
        return blocks

    def cached_prefix_blocks(self, seq: Sequence) -> int:
        """How many of the sequence's leading blocks this cache already holds."""
        return len(self._cached_prefix(seq))

    def can_allocate(self, seq: Sequence) -> bool:
        hit = self._cached_prefix(seq)
        reusable_free = sum(1 for b in hit if self.ref_count[b] == 0)
        need = self._blocks_needed(seq.num_tokens) - len(hit)
        return need <= self.num_free_blocks - reusable_free

    def _take_free(self) -> int:
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            h = self.block_to_hash.pop(b)
            del self.hash_to_block[h]
        self.ref_count[b] = 1
        return b

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq.token_ids, reusing the cached prefix."""
        assert not seq.block_table, "sequence already has blocks"
        hit = self._cached_prefix(seq)
        for b in hit:
            if self.ref_count[b] == 0:
                self.evictable.pop(b, None)
            self.ref_count[b] += 1
        seq.block_table = list(hit)
        self._seq_hashes[seq.seq_id] = [self.block_to_hash[b] for b in hit]
        for _ in range(self._blocks_needed(seq.num_tokens) - len(hit)):
            seq.block_table.append(self._take_free())
        seq.num_cached_tokens = len(hit) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens

    def blocks_to_append(self, seq: Sequence, num_new_tokens: int = 1) -> int:
        """New blocks the sequence needs to compute `num_new_tokens` more tokens."""
        need = self._blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(0, need)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self.blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        for _ in range(self.blocks_to_append(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's computed tokens (the KV of rejected drafts)."""
        keep = self._blocks_needed(seq.num_computed_tokens)
        self.free_table(seq.block_table[keep:])
        del seq.block_table[keep:]

    def mark_computed(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        for i in range(len(hashes), full):
            parent = hashes[-1] if hashes else None
            h = block_hash(parent, seq.block(i, self.block_size))
            hashes.append(h)
            b = seq.block_table[i]
            if h not in self.hash_to_block and b not in self.block_to_hash:
                self.hash_to_block[h] = b
                self.block_to_hash[b] = h

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; cached blocks stay reusable until evicted."""
        self.free_table(seq.block_table)
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def free_table(self, table: list[int]) -> None:
        """Drop one reference to each block of a table (e.g. one detached from its sequence)."""
        for b in reversed(table):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if b in self.block_to_hash:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def forget_hashes(self, seq: Sequence) -> None:
        self._seq_hashes.pop(seq.seq_id, None)
