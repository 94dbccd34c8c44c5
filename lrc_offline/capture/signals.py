"""Compact logit signals computed from the teacher's logits, row chunk by row chunk.

Legend: R rows (tokens), V vocabulary, K top-k, N draws.
"""

from __future__ import annotations

import torch

__all__ = ["topk_signal", "sampled_signal", "unique_counts", "entropy_and_tail"]


def topk_signal(logits_RV: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids (descending probability) and their log-probs at `temperature`, computed in fp32."""
    logprobs = torch.log_softmax(logits_RV.float() / temperature, dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1, sorted=True)
    return ids.to(torch.int32), values


def unique_counts(draws_RN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the unique values of `draws_RN` (ascending, padded with -1) and their counts (0 in padding)."""
    sorted_RN, _ = torch.sort(draws_RN, dim=-1)
    starts = torch.ones_like(sorted_RN, dtype=torch.bool)
    starts[:, 1:] = sorted_RN[:, 1:] != sorted_RN[:, :-1]
    slot = torch.cumsum(starts.long(), dim=-1) - 1  # which unique value each draw belongs to
    counts = torch.zeros_like(sorted_RN, dtype=torch.int64).scatter_add_(1, slot, torch.ones_like(slot))
    ids = torch.full_like(sorted_RN, -1, dtype=torch.int64).scatter_(1, slot, sorted_RN.long())
    return ids.to(torch.int32), counts.to(torch.int32)


def sampled_signal(
    logits_RV: torch.Tensor, num_draws: int, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """N independent draws per row from softmax(logits / temperature), as unique ids with counts.

    The empirical distribution count / N is an unbiased estimate of the teacher distribution, so KD
    against it has the full-KL gradient in expectation.
    """
    probs = torch.softmax(logits_RV.float() / temperature, dim=-1)
    draws = torch.multinomial(probs, num_draws, replacement=True, generator=generator)
    return unique_counts(draws)


def entropy_and_tail(logits_RV: torch.Tensor, temperature: float, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row teacher entropy (nats) and, when `k` is given, the probability mass outside the top-k."""
    logprobs = torch.log_softmax(logits_RV.float() / temperature, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    if k is None:
        return entropy, torch.zeros_like(entropy)
    tail = (1.0 - torch.topk(logprobs, k, dim=-1).values.exp().sum(-1)).clamp_min(0.0)
    return entropy, tail
