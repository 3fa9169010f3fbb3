"""Per-forward attention metadata shared by the model, the kernels and the runners."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Varlen batch description: sequence b adds q_len_b tokens after seq_len_b - q_len_b cached."""

    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative q_len
    seq_lens: torch.Tensor  # [B] int32, KV length after this forward
    block_tables: torch.Tensor  # [B, M] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # what a kernel derives from the metadata, kept for the other layers of the same forward
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build metadata from python lists (what a runner gets from the scheduler)."""
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        qsl = [0]
        for q_len in query_lens:
            qsl.append(qsl[-1] + q_len)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )
