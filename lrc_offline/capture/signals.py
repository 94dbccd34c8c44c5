"""Compact logit signals computed from the teacher's log-probabilities, one sequence at a time.

Legend: R rows (tokens), V vocabulary, K top-k, N draws, T tokens of a sequence.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import CacheConfig
from .positions import position_seed
from .writer import to_host

__all__ = ["logprobs_at", "topk_signal", "sampled_signal", "unique_counts", "entropy", "logit_fields"]


def logprobs_at(logits_RV: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) in fp32: computed once per row and shared by everything below."""
    return torch.log_softmax(logits_RV.float() / temperature, dim=-1)


def topk_signal(logprobs_RV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids (descending probability), their log-probs, and the probability mass outside them."""
    values, ids = torch.topk(logprobs_RV, k, dim=-1, sorted=True)
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    return ids.to(torch.int32), values, tail


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
    logprobs_RV: torch.Tensor, num_draws: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """N independent draws per row from the teacher distribution, as unique ids with counts.

    The empirical distribution count / N is an unbiased estimate of the teacher distribution, so KD
    against it has the full-KL gradient in expectation.
    """
    draws = torch.multinomial(logprobs_RV.exp(), num_draws, replacement=True, generator=generator)
    return unique_counts(draws)


def entropy(logprobs_RV: torch.Tensor) -> torch.Tensor:
    """Per-row entropy in nats."""
    return -(logprobs_RV.exp() * logprobs_RV).sum(-1)


def logit_fields(
    cfg: CacheConfig, logits_rows: Iterable[torch.Tensor], sequence_indices: list[int]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The `topk` or `sampled` cache fields (CPU) and summed stats from each sequence's logits [T, V].

    One sequence at a time keeps the fp32 softmax at [T, V], never [B, T, V]. Every backend that has the
    full logits goes through here, so their caches share the math.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    entropy_sum, tail_sum = 0.0, 0.0
    for logits_TV, sequence_index in zip(logits_rows, sequence_indices, strict=True):
        logprobs = logprobs_at(logits_TV, cfg.temperature)
        if cfg.logit_mode == "topk":
            ids, values, tail = topk_signal(logprobs, cfg.topk)
            parts.setdefault("topk_ids", []).append(ids)
            parts.setdefault("topk_logprobs", []).append(values)
            tail_sum = tail_sum + tail.sum()
        else:
            gen = torch.Generator(device=logits_TV.device).manual_seed(position_seed(cfg.seed + 1, sequence_index))
            ids, counts = sampled_signal(logprobs, cfg.num_draws, gen)
            parts.setdefault("sampled_ids", []).append(ids)
            parts.setdefault("sampled_counts", []).append(counts)
        entropy_sum = entropy_sum + entropy(logprobs).sum()
    out = {name: to_host(torch.stack(values)) for name, values in parts.items()}
    stats = {"teacher_entropy_sum": float(entropy_sum)}
    if cfg.logit_mode == "topk":
        stats["topk_tail_mass_sum"] = float(tail_sum)
    else:
        stats["sampled_unique_sum"] = float((out["sampled_counts"] > 0).sum())
    return out, stats
