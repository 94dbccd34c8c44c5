"""Held-out evaluation: next-token cross-entropy (and perplexity) of any logits function."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import losses

__all__ = ["heldout_ce"]


@torch.no_grad()
def heldout_ce(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids_NT: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Token-weighted next-token CE of `logits_fn` over held-out sequences.

    Args:
        logits_fn: maps input ids [B, T] on `device` to logits [B, T, V].
        input_ids_NT: held-out sequences.
        batch_size: sequences per forward.
        device: where the forward runs.

    Returns:
        {"ce": nats per token, "ppl": exp(ce), "tokens": predicted tokens}.
    """
    total, count = 0.0, 0
    for lo in range(0, input_ids_NT.shape[0], batch_size):
        ids = input_ids_NT[lo : lo + batch_size].to(device).long()
        mask = torch.ones_like(ids, dtype=torch.bool)
        num = ids.shape[0] * (ids.shape[1] - 1)
        total += losses.cross_entropy_next(logits_fn(ids).float(), ids, mask).item() * num
        count += num
    ce = total / max(count, 1)
    return {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": count}
