"""Compact logit signals computed from the teacher's log-probabilities, one sequence at a time.

Legend: R rows (tokens), V vocabulary, K top-k, N draws, T tokens of a sequence, C rows of a chunk.

`logprobs_at`, `topk_signal` and `entropy` are the plain definitions (and the reference the tests hold
`topk_entropy` to); the build takes the top-k fields through `topk_entropy`, which never materialises the
[R, V] log-probs: on a CPU that math was most of the gap between a build and a bare teacher forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import CacheConfig
from .positions import position_seed
from .writer import to_host

__all__ = ["logprobs_at", "topk_signal", "sampled_signal", "unique_counts", "entropy", "topk_entropy", "logit_fields"]

# Rows per chunk of `topk_entropy` on a CPU: its two [C, V] fp32 scratch buffers (4 MiB each at this size)
# stay in the last-level cache, where fresh [R, V] temporaries cost a page fault per 4 KiB.
CPU_CHUNK_ELEMENTS = 1 << 20


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
    return _draw(logprobs_RV.exp(), num_draws, generator)


def _draw(probs_RV: torch.Tensor, num_draws: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    draws = torch.multinomial(probs_RV, num_draws, replacement=True, generator=generator)
    return unique_counts(draws)


def entropy(logprobs_RV: torch.Tensor) -> torch.Tensor:
    """Per-row entropy in nats."""
    return -(logprobs_RV.exp() * logprobs_RV).sum(-1)


@torch.no_grad()
def topk_entropy(
    logits_RV: torch.Tensor, temperature: float, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_signal(logprobs_at(logits, temperature), k)` and the per-row `entropy`, in fewer passes.

    log softmax only shifts each row, so the top-k ids of x = logits / temperature are those of the
    log-probs; their log-probs are (x - max) - log S with S = sum exp(x - max), and the entropy is
    log S - sum(exp(x - max) * (x - max)) / S. Per chunk of rows: one max, one subtraction and one exp
    into two reused buffers, two sums and the top-k. Ids equal the plain path's wherever the rounded
    log-probs do not tie values that differ in x (there the order by x is kept); log-probs and entropy
    agree to fp32 rounding (the log-probs are closer to a float64 reference than `torch.log_softmax`'s
    CPU kernel, whose sum rounds more).

    Returns ids [R, K] int32 (descending probability), log-probs [R, K] fp32, tail mass [R], entropy [R].
    """
    rows, vocab = logits_RV.shape
    chunk = max(1, CPU_CHUNK_ELEMENTS // vocab) if logits_RV.device.type == "cpu" else rows
    chunk = min(chunk, rows)
    device = logits_RV.device
    scaled = logits_RV.dtype != torch.float32 or temperature != 1.0  # else x is the logits themselves
    x_CV = torch.empty(chunk, vocab, device=device) if scaled else None
    shift_CV = torch.empty(chunk, vocab, device=device)
    exp_CV = torch.empty(chunk, vocab, device=device)
    ids_RK = torch.empty(rows, k, dtype=torch.int64, device=device)
    logprobs_RK = torch.empty(rows, k, device=device)
    entropy_R = torch.empty(rows, device=device)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        x = logits_RV[lo : lo + n]
        if scaled:  # the plain path's `logits.float() / temperature`, bit for bit
            x = x_CV[:n].copy_(x).div_(temperature)
        max_C1 = x.amax(-1, keepdim=True)
        shift, e = shift_CV[:n], exp_CV[:n]
        torch.sub(x, max_C1, out=shift)
        torch.exp(shift, out=e)
        sum_C1 = e.sum(-1, keepdim=True)
        log_sum_C1 = sum_C1.log()
        mean_shift_C1 = shift.mul_(e).sum(-1, keepdim=True) / sum_C1  # sum p * (x - max), in place
        entropy_R[lo : lo + n] = (log_sum_C1 - mean_shift_C1).squeeze(-1)
        values, ids = torch.topk(x, k, dim=-1, sorted=True)
        logprobs_RK[lo : lo + n] = (values - max_C1) - log_sum_C1
        ids_RK[lo : lo + n] = ids
    tail = (1.0 - logprobs_RK.exp().sum(-1)).clamp_min(0.0)
    return ids_RK.to(torch.int32), logprobs_RK, tail, entropy_R


def logit_fields(
    cfg: CacheConfig, logits_rows: Iterable[torch.Tensor], sequence_indices: list[int]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The `topk` or `sampled` cache fields (CPU) and summed stats from each sequence's logits [T, V].

    One sequence at a time keeps the fp32 math at [T, V] at most, never [B, T, V]. Every backend that has the
    full logits goes through here, so their caches share the math.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    entropy_sum, tail_sum = 0.0, 0.0
    for logits_TV, sequence_index in zip(logits_rows, sequence_indices, strict=True):
        if cfg.logit_mode == "topk":
            ids, values, tail, entropy_T = topk_entropy(logits_TV, cfg.temperature, cfg.topk)
            parts.setdefault("topk_ids", []).append(ids)
            parts.setdefault("topk_logprobs", []).append(values)
            tail_sum = tail_sum + tail.sum()
        else:  # the draws need the probabilities themselves: the plain path, so a seed keeps its draws
            logprobs = logprobs_at(logits_TV, cfg.temperature)
            probs = logprobs.exp()
            gen = torch.Generator(device=logits_TV.device).manual_seed(position_seed(cfg.seed + 1, sequence_index))
            ids, counts = _draw(probs, cfg.num_draws, gen)
            parts.setdefault("sampled_ids", []).append(ids)
            parts.setdefault("sampled_counts", []).append(counts)
            entropy_T = -(probs * logprobs).sum(-1)  # = entropy(logprobs), reusing the probabilities
        entropy_sum = entropy_sum + entropy_T.sum()
    out = {name: to_host(torch.stack(values)) for name, values in parts.items()}
    stats = {"teacher_entropy_sum": float(entropy_sum)}
    if cfg.logit_mode == "topk":
        stats["topk_tail_mass_sum"] = float(tail_sum)
    else:
        stats["sampled_unique_sum"] = float((out["sampled_counts"] > 0).sum())
    return out, stats
