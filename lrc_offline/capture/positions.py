"""Token positions at which activations are stored: seeded per sequence, so any shard rebuilds identically.

The draw for sequence j depends only on `(seed, j)` and the sequence's document starts, never on batch
size, shard layout or worker order.
"""

from __future__ import annotations

import torch

from ..seeding import stable_seed

__all__ = ["position_seed", "sample_positions", "sample_positions_batch"]


def position_seed(seed: int, sequence_index: int) -> int:
    """A 63-bit generator seed from `(seed, sequence_index)`, stable across processes and platforms."""
    return stable_seed("lrc-positions", seed, sequence_index)


def sample_positions(
    sequence_index: int,
    seq_len: int,
    num_positions: int,
    seed: int,
    include_sink: bool = True,
    doc_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted, unique positions of one sequence.

    Args:
        sequence_index: Global index of the sequence in the packed corpus.
        seq_len: Tokens per sequence.
        num_positions: P, positions to draw; P >= seq_len gives every position.
        seed: Sampling seed (cache.seed).
        include_sink: Always include position 0, the attention sink. With `doc_starts`, the other
            document starts (also sinks for the teacher) come next, earliest first, up to P.
        doc_starts: Optional bool [seq_len], True where a document starts; used only with
            `include_sink`.

    Returns:
        int32 [min(P, seq_len)] positions in [0, seq_len), ascending.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if num_positions < 1:
        raise ValueError(f"num_positions={num_positions} must be positive (cache.act_positions)")
    if num_positions >= seq_len:
        return torch.arange(seq_len, dtype=torch.int32)

    forced = torch.zeros(seq_len, dtype=torch.bool)
    if include_sink:
        forced[0] = True
        if doc_starts is not None:
            if doc_starts.shape != (seq_len,):
                raise ValueError(f"doc_starts has shape {tuple(doc_starts.shape)}, expected ({seq_len},)")
            starts = torch.nonzero(doc_starts.to(torch.bool).cpu()).flatten()
            starts = starts[starts != 0][: num_positions - 1]
            forced[starts] = True
    num_forced = int(forced.sum())
    pool = torch.nonzero(~forced).flatten()
    gen = torch.Generator().manual_seed(position_seed(seed, sequence_index))
    drawn = pool[torch.randperm(pool.numel(), generator=gen)[: num_positions - num_forced]]
    chosen = torch.cat([torch.nonzero(forced).flatten(), drawn])
    return chosen.sort().values.to(torch.int32)


def sample_positions_batch(
    sequence_indices: list[int],
    seq_len: int,
    num_positions: int,
    seed: int,
    include_sink: bool = True,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sample_positions` for a batch of sequences.

    Args:
        sequence_indices: Global index of each sequence, [B].
        seq_len: Tokens per sequence.
        num_positions: P, positions per sequence.
        seed: Sampling seed.
        include_sink: As in `sample_positions`.
        position_ids: Optional [B, seq_len] position ids from packing; document starts are where they
            are 0.

    Returns:
        int32 [B, min(P, seq_len)] positions, each row ascending.
    """
    if position_ids is not None and tuple(position_ids.shape) != (len(sequence_indices), seq_len):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}, expected ({len(sequence_indices)}, {seq_len})"
        )
    rows = [
        sample_positions(
            int(j),
            seq_len,
            num_positions,
            seed,
            include_sink=include_sink,
            doc_starts=None if position_ids is None else position_ids[b] == 0,
        )
        for b, j in enumerate(sequence_indices)
    ]
    if not rows:
        return torch.empty(0, min(num_positions, seq_len), dtype=torch.int32)
    return torch.stack(rows)
