"""The LRC objective on one batch: L = kd_weight * L_KD + beta * L_CE + alpha * L_clone.

One function serves the online reference trainer (teacher signal computed in the step) and offline
training from a cache (teacher signal read from shards), so both compute the same losses by
construction. The batch (`lrc_offline.batch.Batch`) carries one teacher logit signal (full logits,
the cached final hidden state, top-k or sampled counts) and, for the clone loss, the teacher's
activations at sampled positions with their keep mask and sink flags, computed where the batch was made.

The objective only ever calls the student (`student(input_ids, ..., teacher_acts=...)`, see
`StudentOutput`): everything it needs, the clone targets in the space they are compared in, the
normalisers and the teacher's head, comes back from that one forward. A wrapped student (DDP) is
therefore used as it is, and a sharded one (FSDP2) gathers its weights for that call only.

Legend: B batch, T tokens, V vocabulary, D d_T, L clone layers, P positions, W width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import losses
from ..batch import Batch, FullLogits, HiddenSignal, LogitSignal, SampledSignal, TopKSignal
from ..config import CLONE_TERMS, LossConfig

__all__ = ["lrc_loss", "logit_loss", "sink_positions", "clone_weights"]


def _kd_inputs(signal: LogitSignal, teacher_head_VD: torch.Tensor | None) -> tuple[Callable, dict[str, torch.Tensor]]:
    """The KD loss of `signal` and its teacher tensors, named as `losses.fused_head_loss` takes them and
    in the order the loss takes them after the student's logits."""
    match signal:
        case FullLogits():
            return losses.kl_full, {"teacher_logits_BTV": signal.logits}
        case HiddenSignal():
            return losses.kl_from_hidden, {"teacher_hidden_BTD": signal.hidden.to(teacher_head_VD.dtype),
                                           "teacher_head_VD": teacher_head_VD}  # fmt: skip
        case TopKSignal():
            return losses.kl_topk, {"topk_ids_BTK": signal.ids, "topk_logprobs_BTK": signal.logprobs}
        case SampledSignal():
            return losses.kd_sampled, {"sampled_ids_BTN": signal.ids, "sampled_counts_BTN": signal.counts}
    raise TypeError(f"unknown teacher signal {type(signal).__name__}")


def _token_mask(batch: Batch) -> torch.Tensor:
    """bool [B, T]: the tokens that count."""
    if batch.attention_mask is None:
        return torch.ones_like(batch.input_ids, dtype=torch.bool)
    return batch.attention_mask.bool()


def _logit_parts(logits_BTV: torch.Tensor, batch: Batch, cfg: LossConfig, teacher_head_VD: torch.Tensor | None):
    """(kd_weight * L_KD + beta * L_CE, {"kd": ..., "ce": ...}) of `logits_BTV` on `batch`."""
    input_ids, mask = batch.input_ids.long(), _token_mask(batch)
    total = logits_BTV.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    if cfg.kd_weight > 0 and batch.signal is not None:
        kd_loss, teacher = _kd_inputs(batch.signal, teacher_head_VD)
        kd = kd_loss(logits_BTV, *teacher.values(), mask, cfg.temperature)
        total = total + cfg.kd_weight * kd
        parts["kd"] = kd
    if cfg.beta > 0:
        ce = losses.cross_entropy_next(logits_BTV, input_ids, mask)
        total = total + cfg.beta * ce
        parts["ce"] = ce
    return total, parts


def _fused_logit_parts(out, batch: Batch, cfg: LossConfig, chunk_tokens: int):
    """`_logit_parts` through `losses.fused_head_loss`: from the final hidden state and the head, chunk
    by chunk, never the [B, T, V] logits."""
    input_ids, mask = batch.input_ids.long(), _token_mask(batch)
    teacher = {}
    if cfg.kd_weight > 0 and batch.signal is not None:
        teacher = _kd_inputs(batch.signal, out.teacher_head_VD)[1]
    total, kd, ce = losses.fused_head_loss(out.hidden_BTS, out.head_weight_VS, input_ids, mask, cfg.kd_weight,
                                           cfg.beta, cfg.temperature, chunk_tokens, **teacher)  # fmt: skip
    parts = ({"kd": kd} if teacher else {}) | ({"ce": ce} if cfg.beta > 0 else {})
    return total, parts


def logit_loss(logits_BTV: torch.Tensor, batch: Batch, cfg: LossConfig, teacher_head_VD: torch.Tensor | None = None):
    """kd_weight * L_KD + beta * L_CE of `logits_BTV` on `batch`: the objective without its clone term
    (`teacher_head_VD`, the teacher's output head, is needed for a `hidden` batch only)."""
    return _logit_parts(logits_BTV, batch, cfg, teacher_head_VD)[0]


def sink_positions(batch: Batch) -> torch.Tensor:
    """bool [B, P]: which activation positions are attention sinks (document starts, position id 0)."""
    return batch.clone.sink_BP


def clone_weights(batch: Batch, cfg: LossConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(keep mask [L, B, P] or None, position weights [B, P] or None) for the clone loss of `batch`."""
    weights = None
    if cfg.sink_weight != 1.0:
        weights = torch.where(batch.clone.sink_BP, cfg.sink_weight, 1.0).float()
    return batch.clone.keep_LBP, weights


def lrc_loss(
    student,
    batch: Batch,
    cfg: LossConfig,
    clone_layers: list[int] | None = None,
    document_mask: bool = False,
    alpha: float | None = None,
    teacher_ms: dict[str, torch.Tensor] | None = None,
    weights=None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its detached parts for logging (kd, ce, clone, clone/<term>).

    Args:
        student: the LRC student, or the student wrapped for distributed training: only called.
        batch: the batch, on the student's device.
        cfg: loss weights and clone-loss options.
        clone_layers: the teacher layers the activations in `batch` belong to (None: all).
        document_mask: forbid attention across packed-document boundaries (needs `position_ids`).
        alpha: the clone weight of this step (None: cfg.alpha); see `LossConfig.alpha_at`.
        teacher_ms: term -> [L, 2] teacher-space mean squares of the targets at `clone_layers`, at sink
            positions and at the others (`cache.act_stats.teacher_ms`): needed by clone_normalize=cache,
            used by auto when given.
        weights: the student's weights generated once for this optimizer step (`StudentWeights`, see
            `training.loop.step`); None: the student generates them in its forward.
        chunk_tokens: compute KD and CE fused with the head, this many tokens at a time, never holding
            the [B, T, V] logits (`losses.fused_head_loss`); None or 0: from the full logits.
    """
    alpha = cfg.alpha if alpha is None else alpha
    clone = batch.clone if alpha > 0 else None
    if clone is not None and cfg.clone_normalize == "cache" and teacher_ms is None:
        raise ValueError("loss.clone_normalize=cache needs the cache's activation statistics (teacher_ms)")
    # auto: the recorded statistics when the run has them, else the batch's pooled mean squares.
    fixed_ms = cfg.clone_normalize == "cache" or (cfg.clone_normalize == "auto" and teacher_ms is not None)
    out = student(
        batch.input_ids.long(),
        attention_mask_BT=batch.attention_mask,
        position_ids_BT=batch.position_ids if document_mask else None,
        clone_positions_BP=None if clone is None else clone.positions_BP,
        clone_layers=None if clone is None else clone_layers,
        document_mask=document_mask,
        o_space=cfg.o_space,
        teacher_acts=None if clone is None else clone.acts,
        teacher_ms=teacher_ms if clone is not None and fixed_ms else None,
        weights=weights,
        logits=not chunk_tokens,
    )
    if chunk_tokens:
        total, parts = _fused_logit_parts(out, batch, cfg, chunk_tokens)
    else:
        total, parts = _logit_parts(out.logits_BTV, batch, cfg, out.teacher_head_VD)
    parts = {k: v.detach() for k, v in parts.items()}
    if clone is not None:
        clone_mask, position_weights = clone_weights(batch, cfg)
        clone_total, per_term = losses.clone_loss(
            {m: out.acts[m] for m in CLONE_TERMS}, out.targets, clone_mask, weights=cfg.clone_terms,
            normalize=cfg.clone_normalize != "none", reduce=cfg.clone_reduce, position_weights_BP=position_weights,
            target_ms=out.target_ms, loss_fn=cfg.clone_fn, huber_delta=cfg.huber_delta,
            sink_BP=clone.sink_BP if fixed_ms else None,
        )  # fmt: skip
        total = total + alpha * clone_total
        parts["clone"] = clone_total.detach()
        parts.update({f"clone/{m}": v for m, v in per_term.items()})
    parts["loss"] = total.detach()
    return total, parts
