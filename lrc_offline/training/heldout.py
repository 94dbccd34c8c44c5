"""Held-out metrics of any logits function: next-token CE and perplexity, and, against a teacher's
logits function, KL(teacher || student) and top-1 agreement. The one evaluation loop of the package:
the trainer's held-out CE, `lrc-train eval` and the demo all run it.

Legend: N sequences, B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import losses

__all__ = ["heldout_metrics"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def heldout_metrics(
    logits_fn: LogitsFn,
    input_ids_NT: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    teacher_fn: LogitsFn | None = None,
) -> dict[str, float]:
    """Token-weighted metrics of `logits_fn` over held-out sequences.

    Args:
        logits_fn: maps input ids [B, T] on `device` to logits [B, T, V].
        input_ids_NT: held-out sequences.
        batch_size: sequences per forward.
        device: where the forwards run.
        teacher_fn: the teacher's logits function, to compare with (None: the model alone).

    Returns:
        ce (nats per predicted token), ppl = exp(ce), tokens (predicted tokens); with `teacher_fn` also
        teacher_ce, teacher_ppl, kl (mean per token of KL(teacher || model) at temperature 1) and
        top1_agreement (fraction of positions where the argmaxes agree).
    """
    sums = {"ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "top1_agreement": 0.0}
    num_pred, num_pos = 0, 0
    for lo in range(0, input_ids_NT.shape[0], batch_size):
        ids = input_ids_NT[lo : lo + batch_size].to(device).long()
        mask = torch.ones_like(ids, dtype=torch.bool)
        pred, pos = ids.shape[0] * (ids.shape[1] - 1), ids.numel()
        logits = logits_fn(ids).float()
        sums["ce"] += losses.cross_entropy_next(logits, ids, mask).item() * pred
        if teacher_fn is not None:
            t_logits = teacher_fn(ids).float()
            sums["teacher_ce"] += losses.cross_entropy_next(t_logits, ids, mask).item() * pred
            sums["kl"] += losses.kl_full(logits, t_logits, mask).item() * pos
            sums["top1_agreement"] += (logits.argmax(-1) == t_logits.argmax(-1)).float().sum().item()
        num_pred, num_pos = num_pred + pred, num_pos + pos
    ce = sums["ce"] / max(num_pred, 1)
    out = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": num_pred}
    if teacher_fn is not None:
        teacher_ce = sums["teacher_ce"] / max(num_pred, 1)
        out.update(teacher_ce=teacher_ce, teacher_ppl=math.exp(min(teacher_ce, 50.0)),
                   kl=sums["kl"] / max(num_pos, 1), top1_agreement=sums["top1_agreement"] / max(num_pos, 1))  # fmt: skip
    return out
