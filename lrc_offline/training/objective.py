"""The LRC objective on one batch: L = kd_weight * L_KD + beta * L_CE + alpha * L_clone.

One function serves the online reference trainer (teacher signal computed in the step) and offline
training from a cache (teacher signal read from shards), so both compute the same losses by
construction. The batch says which teacher signal it carries:

    teacher_logits [B,T,V]                      full logits (online, or tests)
    hidden [B,T,D]                              cached final normed hidden state: exact logits via the head
    topk_ids, topk_logprobs [B,T,K]             cached top-k with tail bucket
    sampled_ids, sampled_counts [B,T,N]         cached sampled-KD counts
and, for the clone loss, `act_positions` [B,P] with either
    act_input, act_attn [B,L,P,D]               cached residuals: targets recomputed with the teacher's weights
    act_<term> [B,L,P,W] for the seven terms    the targets themselves
optionally with `act_present` [B] (an activation-budget cache: which sequences carry activations) and
`act_layer_mask` [B,L,P] (a layer-subset cache: which layers each position carries).
Attention-sink positions (document starts) are found from `position_ids` (else position 0).

The objective only ever calls the student (`student(input_ids, ..., teacher_acts=...)`, see
`StudentOutput`): everything it needs, the clone targets in the space they are compared in, the
normalisers and the teacher's head, comes back from that one forward. A wrapped student (DDP) is
therefore used as it is, and a sharded one (FSDP2) gathers its weights for that call only.

Legend: B batch, T tokens, V vocabulary, D d_T, L clone layers, P positions, W width.
"""

from __future__ import annotations

import torch

from .. import losses
from ..config import CLONE_TERMS, LossConfig

__all__ = ["lrc_loss", "logit_loss", "sink_positions", "clone_weights"]

_ACT_FIELDS = ("act_input", "act_attn") + tuple(f"act_{m}" for m in CLONE_TERMS)


def _kd(logits_BTV: torch.Tensor, batch: dict, teacher_head_VD: torch.Tensor | None, mask: torch.Tensor, tau: float):
    if "teacher_logits" in batch:
        return losses.kl_full(logits_BTV, batch["teacher_logits"], mask, tau)
    if "hidden" in batch:
        return losses.kl_from_hidden(logits_BTV, batch["hidden"].to(teacher_head_VD.dtype), teacher_head_VD, mask, tau)
    if "topk_ids" in batch:
        return losses.kl_topk(logits_BTV, batch["topk_ids"], batch["topk_logprobs"], mask, tau)
    if "sampled_ids" in batch:
        return losses.kd_sampled(logits_BTV, batch["sampled_ids"], batch["sampled_counts"], mask, tau)
    return None


def _logit_parts(logits_BTV: torch.Tensor, batch: dict, cfg: LossConfig, teacher_head_VD: torch.Tensor | None):
    """(kd_weight * L_KD + beta * L_CE, {"kd": ..., "ce": ...}) of `logits_BTV` on `batch`."""
    input_ids = batch["input_ids"].long()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    total = logits_BTV.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    kd = _kd(logits_BTV, batch, teacher_head_VD, mask, cfg.temperature) if cfg.kd_weight > 0 else None
    if kd is not None:
        total = total + cfg.kd_weight * kd
        parts["kd"] = kd
    if cfg.beta > 0:
        ce = losses.cross_entropy_next(logits_BTV, input_ids, mask)
        total = total + cfg.beta * ce
        parts["ce"] = ce
    return total, parts


def _fused_logit_parts(out, batch: dict, cfg: LossConfig, chunk_tokens: int):
    """`_logit_parts` through `losses.fused_head_loss`: from the final hidden state and the head, chunk
    by chunk, never the [B, T, V] logits."""
    input_ids = batch["input_ids"].long()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    signal = {}
    if cfg.kd_weight > 0:
        if "teacher_logits" in batch:
            signal = {"teacher_logits_BTV": batch["teacher_logits"]}
        elif "hidden" in batch:
            signal = {"teacher_hidden_BTD": batch["hidden"].to(out.teacher_head_VD.dtype),
                      "teacher_head_VD": out.teacher_head_VD}  # fmt: skip
        elif "topk_ids" in batch:
            signal = {"topk_ids_BTK": batch["topk_ids"], "topk_logprobs_BTK": batch["topk_logprobs"]}
        elif "sampled_ids" in batch:
            signal = {"sampled_ids_BTN": batch["sampled_ids"], "sampled_counts_BTN": batch["sampled_counts"]}
    total, kd, ce = losses.fused_head_loss(out.hidden_BTS, out.head_weight_VS, input_ids, mask, cfg.kd_weight,
                                           cfg.beta, cfg.temperature, chunk_tokens, **signal)  # fmt: skip
    parts = ({"kd": kd} if signal else {}) | ({"ce": ce} if cfg.beta > 0 else {})
    return total, parts


def logit_loss(logits_BTV: torch.Tensor, batch: dict, cfg: LossConfig, teacher_head_VD: torch.Tensor | None = None):
    """kd_weight * L_KD + beta * L_CE of `logits_BTV` on `batch`: the objective without its clone term
    (`teacher_head_VD`, the teacher's output head, is needed for a `hidden` batch only)."""
    return _logit_parts(logits_BTV, batch, cfg, teacher_head_VD)[0]


def sink_positions(batch: dict) -> torch.Tensor:
    """bool [B, P]: which activation positions are attention sinks (document starts, position id 0)."""
    positions = batch["act_positions"].long()
    if "position_ids" in batch:
        return batch["position_ids"].gather(1, positions) == 0
    return positions == 0


def clone_weights(batch: dict, cfg: LossConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask [B, P], [L, B, P] or None, position weights [B, P] or None) for the clone loss of `batch`."""
    mask = batch.get("act_mask")
    if "act_present" in batch:
        present_BP = batch["act_present"].reshape(-1, 1).bool().expand_as(batch["act_positions"])
        mask = present_BP if mask is None else mask.bool() & present_BP
    if "act_layer_mask" in batch:  # each position carries a subset of the layers
        layers_LBP = batch["act_layer_mask"].bool().transpose(0, 1)
        mask = layers_LBP if mask is None else layers_LBP & mask.bool()
    weights = None
    if cfg.sink_weight != 1.0:
        sink = sink_positions(batch)
        weights = torch.where(sink, cfg.sink_weight, 1.0).float()
    return mask, weights


def lrc_loss(
    student,
    batch: dict,
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
        batch: tensors on the student's device, as in the module docstring.
        cfg: loss weights and clone-loss options.
        clone_layers: the teacher layers the activations in `batch` belong to (None: all).
        document_mask: forbid attention across packed-document boundaries (needs `position_ids`).
        alpha: the clone weight of this step (None: cfg.alpha); see `LossConfig.alpha_at`.
        teacher_ms: term -> [L] teacher-space mean squares of the targets at `clone_layers`, needed by
            clone_normalize=cache (see `lrc_offline.cache.activation_stats`).
        weights: the student's weights generated once for this optimizer step (`StudentWeights`, see
            `training.loop.step`); None: the student generates them in its forward.
        chunk_tokens: compute KD and CE fused with the head, this many tokens at a time, never holding
            the [B, T, V] logits (`losses.fused_head_loss`); None or 0: from the full logits.
    """
    alpha = cfg.alpha if alpha is None else alpha
    use_clone = alpha > 0 and "act_positions" in batch
    if use_clone and cfg.clone_normalize == "cache" and teacher_ms is None:
        raise ValueError("loss.clone_normalize=cache needs the cache's activation statistics (teacher_ms)")
    out = student(
        batch["input_ids"].long(),
        attention_mask_BT=batch.get("attention_mask"),
        position_ids_BT=batch.get("position_ids") if document_mask else None,
        clone_positions_BP=batch["act_positions"] if use_clone else None,
        clone_layers=clone_layers if use_clone else None,
        document_mask=document_mask,
        o_space=cfg.o_space,
        teacher_acts={k: batch[k] for k in _ACT_FIELDS if k in batch} if use_clone else None,
        teacher_ms=teacher_ms if use_clone and cfg.clone_normalize == "cache" else None,
        weights=weights,
        logits=not chunk_tokens,
    )
    if chunk_tokens:
        total, parts = _fused_logit_parts(out, batch, cfg, chunk_tokens)
    else:
        total, parts = _logit_parts(out.logits_BTV, batch, cfg, out.teacher_head_VD)
    parts = {k: v.detach() for k, v in parts.items()}
    if use_clone:
        clone_mask, position_weights = clone_weights(batch, cfg)
        clone, per_term = losses.clone_loss(
            {m: out.acts[m] for m in CLONE_TERMS}, out.targets, clone_mask, weights=cfg.clone_terms,
            normalize=cfg.clone_normalize != "none", reduce=cfg.clone_reduce, position_weights_BP=position_weights,
            target_ms=out.target_ms, loss_fn=cfg.clone_fn, huber_delta=cfg.huber_delta,
        )  # fmt: skip
        total = total + alpha * clone
        parts["clone"] = clone.detach()
        parts.update({f"clone/{m}": v for m, v in per_term.items()})
    parts["loss"] = total.detach()
    return total, parts
