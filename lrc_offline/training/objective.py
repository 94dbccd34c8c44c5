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
optionally with `act_present` [B] (an activation-budget cache: which sequences carry activations).
Attention-sink positions (document starts) are found from `position_ids` (else position 0).

Legend: B batch, T tokens, V vocabulary, D d_T, L clone layers, P positions, W width.
"""

from __future__ import annotations

import torch

from .. import losses
from ..config import CLONE_TERMS, LossConfig
from ..student.lrc import LRCStudent

__all__ = ["lrc_loss", "logit_loss", "teacher_head_weight", "clone_targets", "sink_positions", "clone_weights"]


def teacher_head_weight(student: LRCStudent) -> torch.Tensor:
    """The teacher's output head [V, D] (its embedding when tied)."""
    return student.teacher_embed if student.tied else student.teacher_lm_head


@torch.no_grad()
def clone_targets(student: LRCStudent, batch: dict, layers: list[int]) -> dict[str, torch.Tensor]:
    """Teacher clone targets term -> [L, B, P, W] in teacher space, recomputed from residuals or read."""
    if "act_input" in batch:
        h_LBPD = batch["act_input"].transpose(0, 1)
        a_LBPD = batch["act_attn"].transpose(0, 1)
        per_layer = [student.teacher_targets_from_residual(i, h_LBPD[j], a_LBPD[j]) for j, i in enumerate(layers)]
        return {m: torch.stack([t[m] for t in per_layer]) for m in CLONE_TERMS}
    return {m: batch[f"act_{m}"].transpose(0, 1) for m in CLONE_TERMS}


def _kd(student_logits: torch.Tensor, batch: dict, student: LRCStudent, mask: torch.Tensor, tau: float):
    if "teacher_logits" in batch:
        return losses.kl_full(student_logits, batch["teacher_logits"], mask, tau)
    if "hidden" in batch:
        head = teacher_head_weight(student)
        return losses.kl_from_hidden(student_logits, batch["hidden"].to(head.dtype), head, mask, tau)
    if "topk_ids" in batch:
        return losses.kl_topk(student_logits, batch["topk_ids"], batch["topk_logprobs"], mask, tau)
    if "sampled_ids" in batch:
        return losses.kd_sampled(student_logits, batch["sampled_ids"], batch["sampled_counts"], mask, tau)
    return None


def logit_loss(student: LRCStudent, logits_BTV: torch.Tensor, batch: dict, cfg: LossConfig) -> torch.Tensor:
    """kd_weight * L_KD + beta * L_CE of `logits_BTV` on `batch`: the objective without its clone term."""
    input_ids = batch["input_ids"].long()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    total = logits_BTV.new_zeros((), dtype=torch.float32)
    kd = _kd(logits_BTV, batch, student, mask, cfg.temperature) if cfg.kd_weight > 0 else None
    if kd is not None:
        total = total + cfg.kd_weight * kd
    if cfg.beta > 0:
        total = total + cfg.beta * losses.cross_entropy_next(logits_BTV, input_ids, mask)
    return total


def sink_positions(batch: dict) -> torch.Tensor:
    """bool [B, P]: which activation positions are attention sinks (document starts, position id 0)."""
    positions = batch["act_positions"].long()
    if "position_ids" in batch:
        return batch["position_ids"].gather(1, positions) == 0
    return positions == 0


def clone_weights(batch: dict, cfg: LossConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask [B, P] or None, position weights [B, P] or None) for the clone loss of `batch`."""
    mask = batch.get("act_mask")
    if "act_present" in batch:
        present_BP = batch["act_present"].reshape(-1, 1).bool().expand_as(batch["act_positions"])
        mask = present_BP if mask is None else mask.bool() & present_BP
    weights = None
    if cfg.sink_weight != 1.0:
        sink = sink_positions(batch)
        weights = torch.where(sink, cfg.sink_weight, 1.0).float()
    return mask, weights


def _normalisers(student: LRCStudent, teacher_ms: dict[str, torch.Tensor], layers: list[int], cfg: LossConfig):
    """Fixed clone normalisers per term [L] from teacher-space mean squares. Terms compared in student
    space (P^T t) are scaled by the projection's mean gain ||P||_F^2 / d_S (exact for isotropic targets)."""
    projected = ("down",) if cfg.o_space == "teacher" else ("o", "down")
    out = {}
    for term, ms_L in teacher_ms.items():
        if term in projected:
            with torch.no_grad():
                gain = torch.stack([student.layers[i].proj[term].float().square().sum() for i in layers])
            ms_L = ms_L.to(gain) * gain / student.d_student
        out[term] = ms_L
    return out


def lrc_loss(
    student: LRCStudent,
    batch: dict,
    cfg: LossConfig,
    clone_layers: list[int] | None = None,
    document_mask: bool = False,
    alpha: float | None = None,
    teacher_ms: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its detached parts for logging (kd, ce, clone, clone/<term>).

    Args:
        student: the LRC student.
        batch: tensors on the student's device, as in the module docstring.
        cfg: loss weights and clone-loss options.
        clone_layers: the teacher layers the activations in `batch` belong to (None: all).
        document_mask: forbid attention across packed-document boundaries (needs `position_ids`).
        alpha: the clone weight of this step (None: cfg.alpha); see `LossConfig.alpha_at`.
        teacher_ms: term -> [L] teacher-space mean squares of the targets at `clone_layers`, needed by
            clone_normalize=cache (see `lrc_offline.cache.activation_stats`).
    """
    input_ids = batch["input_ids"].long()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    layers = list(range(student.num_layers)) if clone_layers is None else sorted(clone_layers)
    alpha = cfg.alpha if alpha is None else alpha
    use_clone = alpha > 0 and "act_positions" in batch
    positions = batch["act_positions"] if use_clone else None
    out = student(
        input_ids,
        attention_mask_BT=batch.get("attention_mask"),
        position_ids_BT=batch.get("position_ids") if document_mask else None,
        clone_positions_BP=positions,
        clone_layers=layers if use_clone else None,
        document_mask=document_mask,
        o_space=cfg.o_space,
    )
    parts: dict[str, torch.Tensor] = {}
    total = out.logits_BTV.new_zeros((), dtype=torch.float32)
    kd = _kd(out.logits_BTV, batch, student, mask, cfg.temperature)
    if kd is not None and cfg.kd_weight > 0:
        total = total + cfg.kd_weight * kd
        parts["kd"] = kd.detach()
    if cfg.beta > 0:
        ce = losses.cross_entropy_next(out.logits_BTV, input_ids, mask)
        total = total + cfg.beta * ce
        parts["ce"] = ce.detach()
    if use_clone:
        targets = clone_targets(student, batch, layers)
        if cfg.o_space == "teacher":
            projected = student.targets_to_student_space({"down": targets["down"]}, layers)
            targets["down"] = projected["down"]
        else:
            targets = student.targets_to_student_space(targets, layers)
        acts = {m: out.acts[m] for m in CLONE_TERMS}
        target_ms = None
        if cfg.clone_normalize == "cache":
            if teacher_ms is None:
                raise ValueError("loss.clone_normalize=cache needs the cache's activation statistics (teacher_ms)")
            target_ms = _normalisers(student, teacher_ms, layers, cfg)
        clone_mask, position_weights = clone_weights(batch, cfg)
        clone, per_term = losses.clone_loss(
            acts, targets, clone_mask, weights=cfg.clone_terms, normalize=cfg.clone_normalize != "none",
            reduce=cfg.clone_reduce, position_weights_BP=position_weights, target_ms=target_ms,
            loss_fn=cfg.clone_fn, huber_delta=cfg.huber_delta,
        )  # fmt: skip
        total = total + alpha * clone
        parts["clone"] = clone.detach()
        parts.update({f"clone/{m}": v for m, v in per_term.items()})
    parts["loss"] = total.detach()
    return total, parts
