"""Distillation losses: pure functions over tensors.

Every loss upcasts its inputs to at least fp32, ignores masked tokens (their values may be anything
finite) and divides by the number of valid tokens. When no token is valid the loss is exactly 0.0 and
still carries a graph, so a step over an all-padding batch backpropagates zeros instead of NaN. No
function reads a value back to the host (no `.item()`, no boolean indexing), so none of them stalls a
CUDA stream.

Shape suffixes: B batch, T tokens, V vocab, K teacher top-k, N sampled ids per token, L layers,
P sampled positions, W activation width, D teacher hidden size, C tokens in one chunk.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "huber",
    "kl_full",
    "kl_from_hidden",
    "kl_topk",
    "kd_sampled",
    "cross_entropy_next",
    "clone_loss",
    "fused_head_loss",
]

_TAIL_FLOOR = 1e-6
"""Smallest student tail mass kl_topk trusts. The tail is 1 - (sum of top-k probs), which fp32 resolves
only to about 1e-7 absolute (worse with large logits); below the floor the value, and a gradient scaled
by 1/tail, would be rounding noise."""


def _upcast(x: Tensor) -> Tensor:
    """`x` in fp32, or fp64 when it already is: fp64 inputs keep their precision (tests use it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_mask(mask_BT: Tensor, shape: torch.Size, name: str) -> Tensor:
    if tuple(mask_BT.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask_BT.shape)}; expected {tuple(shape)} to match the inputs")
    return mask_BT.to(torch.bool)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; set loss.temperature to a positive value")


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    logits = _upcast(logits)
    return logits if temperature == 1.0 else logits / temperature


def _masked_mean(values_BT: Tensor, valid_BT: Tensor) -> Tensor:
    """Mean of `values_BT` over valid entries; exactly 0.0 (with a graph) when none is valid."""
    num_valid = valid_BT.sum()
    total = torch.where(valid_BT, values_BT, torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)).sum()
    return total / num_valid.clamp(min=1) * (num_valid > 0)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_v p (log p - log q) over the last dim, with 0 log 0 = 0 where the teacher has no mass."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def kl_full(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL(p_teacher || p_student) over the full vocabulary, mean over valid tokens.

    Args:
        student_logits_BTV: Student logits [B, T, V].
        teacher_logits_BTV: Teacher logits [B, T, V]; no gradient is wanted through them.
        mask_BT: Valid tokens [B, T], bool or 0/1.
        temperature: Both distributions are softmax(logits / temperature). No T^2 factor.

    Returns:
        Scalar fp32 loss (fp64 for fp64 inputs).
    """
    _check_temperature(temperature)
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BTV.shape)} and teacher logits "
            f"{tuple(teacher_logits_BTV.shape)} must have the same shape"
        )
    valid_BT = _check_mask(mask_BT, student_logits_BTV.shape[:-1], "mask_BT")
    log_q_BTV = torch.log_softmax(_scaled(student_logits_BTV, temperature), dim=-1)
    log_p_BTV = torch.log_softmax(_scaled(teacher_logits_BTV.detach(), temperature), dim=-1)
    return _masked_mean(_kl_rows(log_p_BTV, log_q_BTV), valid_BT)


class _ChunkedHiddenKL(torch.autograd.Function):
    """KL from teacher hidden states, one chunk of teacher logits alive at a time.

    The gradient (q - p) / temperature is computed in the forward pass, chunk by chunk, into one buffer
    the size of the student logits (the gradient needs that much memory anyway). Letting autograd
    record each chunk instead would keep every chunk's teacher probabilities alive for the backward
    pass, which is the full teacher logits again.
    """

    @staticmethod
    def forward(ctx, student_logits_BTV, teacher_hidden_BTD, head_weight_VD, valid_BT, temperature, chunk_tokens):
        vocab = student_logits_BTV.shape[-1]
        student_NV = student_logits_BTV.reshape(-1, vocab)
        hidden_ND = teacher_hidden_BTD.reshape(-1, teacher_hidden_BTD.shape[-1])
        valid_N = valid_BT.reshape(-1)
        num_tokens = student_NV.shape[0]

        acc_dtype = torch.promote_types(student_NV.dtype, torch.float32)
        num_valid = valid_N.sum()
        # 1 / count, or 0 when nothing is valid: the all-masked loss and gradient are exact zeros.
        scale = (num_valid > 0) / num_valid.clamp(min=1).to(acc_dtype)
        # The matmul runs in the inputs' common dtype, as the teacher's own head does; upcasting a
        # bf16 head to fp32 would cost a V x D fp32 copy per call.
        mm_dtype = torch.promote_types(hidden_ND.dtype, head_weight_VD.dtype)
        weight_VD = head_weight_VD.to(mm_dtype)

        need_grad = ctx.needs_input_grad[0]
        grad_NV = torch.empty_like(student_NV) if need_grad else None
        total = torch.zeros((), dtype=acc_dtype, device=student_NV.device)
        # Chunks cover all B*T rows, masked ones included: picking the valid rows out first would need
        # their count on the host (a sync). Packed caches have little padding, so little is wasted.
        for start in range(0, num_tokens, chunk_tokens):
            stop = min(start + chunk_tokens, num_tokens)
            log_q_CV = torch.log_softmax(_scaled(student_NV[start:stop], temperature), dim=-1)
            teacher_CV = (hidden_ND[start:stop].to(mm_dtype) @ weight_VD.T).to(acc_dtype)
            log_p_CV = torch.log_softmax(_scaled(teacher_CV, temperature), dim=-1)
            del teacher_CV
            valid_C = valid_N[start:stop]
            total += torch.where(valid_C, _kl_rows(log_p_CV, log_q_CV), 0.0).sum()
            if need_grad:
                row_scale_C1 = (valid_C * scale / temperature)[:, None]
                grad_NV[start:stop] = (log_q_CV.exp_() - log_p_CV.exp_()) * row_scale_C1
        ctx.save_for_backward(grad_NV)
        ctx.student_shape = student_logits_BTV.shape
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        (grad_NV,) = ctx.saved_tensors
        grad_BTV = None
        if grad_NV is not None:
            grad_BTV = (grad_NV * grad_out.to(grad_NV.dtype)).reshape(ctx.student_shape)
        return grad_BTV, None, None, None, None, None


def kl_from_hidden(
    student_logits_BTV: Tensor,
    teacher_hidden_BTD: Tensor,
    head_weight_VD: Tensor,
    mask_BT: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
) -> Tensor:
    """Exact forward KL with teacher logits rebuilt as ``teacher_hidden @ head_weight.T``, chunk by chunk.

    Equals ``kl_full(student, teacher_hidden @ head_weight.T, mask)`` to fp32 precision while holding
    only `chunk_tokens` rows of teacher logits at a time. Gradients flow to the student logits only.
    Double backward is not supported.

    Args:
        student_logits_BTV: Student logits [B, T, V].
        teacher_hidden_BTD: Teacher final hidden states (after the final norm) [B, T, D].
        head_weight_VD: Teacher lm_head weight [V, D].
        mask_BT: Valid tokens [B, T], bool or 0/1.
        temperature: Both distributions are softmax(logits / temperature). No T^2 factor.
        chunk_tokens: Rows of B*T processed at once; peak extra memory is about 6 * chunk_tokens * V fp32.

    Returns:
        Scalar fp32 loss (fp64 for fp64 student logits).
    """
    _check_temperature(temperature)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    batch_shape = student_logits_BTV.shape[:-1]
    if teacher_hidden_BTD.shape[:-1] != batch_shape:
        raise ValueError(
            f"teacher hidden {tuple(teacher_hidden_BTD.shape)} does not match student logits "
            f"{tuple(student_logits_BTV.shape)} in the leading dims"
        )
    if tuple(head_weight_VD.shape) != (student_logits_BTV.shape[-1], teacher_hidden_BTD.shape[-1]):
        raise ValueError(
            f"head weight {tuple(head_weight_VD.shape)} must be [V, D] = "
            f"[{student_logits_BTV.shape[-1]}, {teacher_hidden_BTD.shape[-1]}]"
        )
    valid_BT = _check_mask(mask_BT, batch_shape, "mask_BT")
    return _ChunkedHiddenKL.apply(
        student_logits_BTV, teacher_hidden_BTD.detach(), head_weight_VD.detach(), valid_BT, temperature, chunk_tokens
    )


def _student_log_probs_at(
    student_logits_BTV: Tensor,
    ids_BTK: Tensor,
    teacher_BTK: Tensor,
    mask_BT: Tensor,
    temperature: float,
    names: tuple[str, str, str],
) -> tuple[Tensor, Tensor]:
    """Checks the inputs of a loss over a few teacher ids per token; returns (valid_BT, log_q_BTK).

    `ids_BTK` and `teacher_BTK` (the teacher's value at each id) must both be [B, T, K];
    `names` = (ids name, values name, name of K) for the error message. log_q_BTK is the student's
    log-softmax(logits / temperature) at those ids.
    """
    _check_temperature(temperature)
    batch_shape = student_logits_BTV.shape[:-1]
    if ids_BTK.shape != teacher_BTK.shape or ids_BTK.shape[:-1] != batch_shape:
        ids_name, values_name, k_name = names
        raise ValueError(
            f"{ids_name} {tuple(ids_BTK.shape)} and {values_name} {tuple(teacher_BTK.shape)} must both be "
            f"[B, T, {k_name}] with B, T = {tuple(batch_shape)}"
        )
    valid_BT = _check_mask(mask_BT, batch_shape, "mask_BT")
    vocab = student_logits_BTV.shape[-1]
    log_q_BTV = torch.log_softmax(_scaled(student_logits_BTV, temperature), dim=-1)
    # Garbage ids at masked tokens (and padding ids) must not trip an out-of-range gather (a device
    # assert on CUDA).
    return valid_BT, log_q_BTV.gather(-1, ids_BTK.long().clamp(0, vocab - 1))


def kl_topk(
    student_logits_BTV: Tensor,
    topk_ids_BTK: Tensor,
    topk_logprobs_BTK: Tensor,
    mask_BT: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL against a teacher stored as its top-k log-probs plus one tail bucket.

    The teacher's tail is p_tail = max(1 - sum exp(logprobs), 0); the student's is q_tail = 1 - sum of
    its probs at the same ids. KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail),
    with 0 log 0 = 0. With K = V this equals `kl_full` (both tails are zero). The student tail is
    floored at 1e-6, below which fp32 cannot resolve it.

    Args:
        student_logits_BTV: Student logits [B, T, V].
        topk_ids_BTK: Teacher top-k token ids [B, T, K], unique per token; ids at masked tokens are ignored.
        topk_logprobs_BTK: Teacher log-probs at those ids [B, T, K], taken at `temperature`.
        mask_BT: Valid tokens [B, T], bool or 0/1.
        temperature: Student distribution is softmax(logits / temperature). No T^2 factor.

    Returns:
        Scalar fp32 loss (fp64 for fp64 student logits).
    """
    valid_BT, log_q_BTK = _student_log_probs_at(
        student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, temperature, ("top-k ids", "log-probs", "K")
    )
    log_p_BTK = topk_logprobs_BTK.detach().to(log_q_BTK.dtype)

    p_BTK = log_p_BTK.exp()
    head_BT = torch.where(p_BTK > 0, p_BTK * (log_p_BTK - log_q_BTK), 0.0).sum(-1)

    p_tail_BT = (1.0 - p_BTK.sum(-1)).clamp(min=0.0)
    # log(1 - sum_k q_k) via log1p(-exp(lse)); the clamp keeps log and its gradient finite when the
    # student puts (numerically) all its mass on the top-k ids.
    log_mass_BT = torch.logsumexp(log_q_BTK, dim=-1)
    q_tail_BT = (-torch.expm1(log_mass_BT)).clamp(min=_TAIL_FLOOR)
    tail_BT = torch.xlogy(p_tail_BT, p_tail_BT) - p_tail_BT * torch.log(q_tail_BT)
    return _masked_mean(head_BT + tail_BT, valid_BT)


def kd_sampled(
    student_logits_BTV: Tensor,
    sampled_ids_BTN: Tensor,
    sampled_counts_BTN: Tensor,
    mask_BT: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Random-sampling KD (Anshumann et al., ACL 2025): KL(t || q) against the empirical draw distribution.

    t_i = count_i / sum(counts) over the unique sampled ids. The gradient w.r.t. the student logits is
    (q - t) / temperature, whose expectation over draws is the full-KL gradient (q - p) / temperature,
    so the gradient is unbiased (the loss value is not: it estimates KL(t || q), not KL(p || q)).

    Args:
        student_logits_BTV: Student logits [B, T, V].
        sampled_ids_BTN: Unique sampled ids per token [B, T, N], padded with -1.
        sampled_counts_BTN: Draw counts [B, T, N], 0 in padding.
        mask_BT: Valid tokens [B, T], bool or 0/1.
        temperature: Student distribution is softmax(logits / temperature); the teacher was sampled at
            the same temperature. No T^2 factor.

    Returns:
        Scalar fp32 loss (fp64 for fp64 student logits).
    """
    valid_BT, log_q_BTN = _student_log_probs_at(
        student_logits_BTV, sampled_ids_BTN, sampled_counts_BTN, mask_BT, temperature, ("sampled ids", "counts", "N")
    )
    counts_BTN = sampled_counts_BTN.detach().to(log_q_BTN.dtype)
    # Padding has count 0, so its (clamped) id contributes 0 to both terms.
    t_BTN = counts_BTN / counts_BTN.sum(-1, keepdim=True).clamp(min=1.0)
    kl_BT = (torch.xlogy(t_BTN, t_BTN) - t_BTN * log_q_BTN).sum(-1)
    return _masked_mean(kl_BT, valid_BT)


def cross_entropy_next(logits_BTV: Tensor, input_ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Next-token cross-entropy: position t predicts input_ids[t + 1]; mean over valid pairs.

    A pair is valid where mask[t] and mask[t + 1] both hold, so predictions across padding or the end
    of a sequence are ignored.

    Args:
        logits_BTV: Logits [B, T, V].
        input_ids_BT: Token ids [B, T]; ids at masked tokens are ignored.
        mask_BT: Valid tokens [B, T], bool or 0/1.

    Returns:
        Scalar fp32 loss (fp64 for fp64 logits).
    """
    batch_shape = logits_BTV.shape[:-1]
    if input_ids_BT.shape != batch_shape:
        raise ValueError(f"input ids {tuple(input_ids_BT.shape)} must match logits {tuple(logits_BTV.shape)}[:-1]")
    valid_BT = _check_mask(mask_BT, batch_shape, "mask_BT")
    vocab = logits_BTV.shape[-1]
    pair_valid_BT = valid_BT[:, :-1] & valid_BT[:, 1:]
    targets_BT = torch.where(pair_valid_BT, input_ids_BT[:, 1:].long(), 0).clamp(0, vocab - 1)
    logits_BTV = _upcast(logits_BTV[:, :-1])
    nll_BT = F.cross_entropy(logits_BTV.reshape(-1, vocab), targets_BT.reshape(-1), reduction="none")
    return _masked_mean(nll_BT.reshape(targets_BT.shape), pair_valid_BT)


def huber(x: Tensor, delta: float) -> Tensor:
    """Elementwise robust square: x^2 where |x| <= delta, else 2 delta |x| - delta^2 (the same value
    and slope at |x| = delta, linear beyond, so a few huge errors cannot dominate the gradient)."""
    a = x.abs()
    return torch.where(a <= delta, x.square(), 2 * delta * a - delta * delta)


def clone_loss(
    student_acts: Mapping[str, Tensor],
    teacher_targets: Mapping[str, Tensor],
    mask_BP: Tensor | None = None,
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
    reduce: str = "mean",
    eps: float = 1e-6,
    position_weights_BP: Tensor | None = None,
    target_ms: Mapping[str, Tensor] | None = None,
    loss_fn: str = "mse",
    huber_delta: float = 1.0,
    sink_BP: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """LRC clone loss: per-layer, per-term (weighted) mean error between student activations and teacher targets.

    With position weights w[l, b, p] (the mask times `position_weights_BP`; a [B, P] mask is the same for
    every layer), for each layer l and term:
    ``err[l] = sum_bpw w * rho(s - t) / (W * sum_bp w)`` with rho the square ("mse") or `huber`, and 0 for a
    layer no position carries. With `normalize`, the error is measured in units of the target's root mean
    square ``ms[l] = sum_bpw w * t^2 / (W * sum_bp w)`` (detached, clamped to >= eps): mse gives err / ms, huber
    gives the mean of huber((s - t) / sqrt(ms)), so `huber_delta` is in target RMS units. `target_ms`
    replaces the batch's ms by fixed values (e.g. statistics recorded when the cache was built). Terms are
    then combined as ``sum w_term * err / (L * sum w_term)`` ("mean") or ``sum w_term * err`` ("sum", the
    paper's raw recipe with normalize=False).

    With `sink_BP` the attention-sink rows and the other rows are normalised apart: the other rows in
    units of their own mean square ms_other[l], the sink rows in units of theirs, ms_sink[l], or of
    ms_other[l] when that is larger (each the formula above over that class's rows only, or `target_ms`
    [L, 2]); err[l] is still the weighted mean over all rows. A sink's target can be 10^5 times another
    row's (a teacher's massive activations), so a pooled ms is set by whether the batch holds a sink row
    for that layer, and a batch without one weighs every other row's error that much more. Apart, the
    other rows' weight does not depend on the sinks, and a sink row never weighs more than another row:
    some sinks are not massive at all (a later document's start, to a teacher attending across
    documents), and a batch whose sinks are all small must not blow up their weight instead.

    Args:
        student_acts: term -> [L, B, P, W_term] student activations (terms among q, k, v, o, gate, up,
            down; widths may differ between terms).
        teacher_targets: Same keys and shapes; o and down already projected to the student space (their
            graph is kept, so P_o and P_down also learn from the target side, as in the paper).
        mask_BP: Valid positions [B, P], or per layer [L, B, P] (a cache whose positions carry a subset
            of the layers, `cache.act_layer_fraction`), bool or 0/1; None means all valid.
        weights: term -> weight; a missing term weighs 1.0, a zero weight drops the term entirely
            (it is neither computed nor logged).
        normalize: Measure each term in units of its target's RMS.
        reduce: "mean" or "sum", as above.
        eps: Floor on the normaliser.
        position_weights_BP: Optional float weights [B, P], >= 0 (not checked: that would sync with the
            device), e.g. a separate weight for attention-sink positions; 0 leaves a position out.
        target_ms: Optional term -> normalisers used instead of the batch's (with `normalize`): [L], or
            [L, 2] (sink rows, other rows) with `sink_BP`.
        loss_fn: "mse" or "huber".
        huber_delta: Where huber turns linear (in target RMS units when normalised).
        sink_BP: Optional bool [B, P], the attention-sink positions: with `normalize`, their rows are
            normalised apart from the others (see above); None pools every row.

    Returns:
        (total, per_term): the scalar fp32 loss, and term -> mean over layers of its (normalised) error,
        detached, for logging. With every position masked (or weighted 0) the total is exactly 0.0 and
        per_term is zeros.
    """
    weights, terms = _clone_terms(student_acts, teacher_targets, weights, reduce, loss_fn, huber_delta)
    num_layers = None
    weighted_terms = []
    per_term: dict[str, Tensor] = {}
    for term in terms:
        num_layers = _check_clone_shapes(term, student_acts[term], teacher_targets[term], num_layers)
        # The target keeps its graph: the o and down targets are P^T t, and P_o / P_down learn from
        # both sides of the MSE, as in the paper's loss. Only the normaliser is detached.
        s_LBPW, t_LBPW = _upcast(student_acts[term]), _upcast(teacher_targets[term])
        w_LBP = _position_weights(mask_BP, position_weights_BP, s_LBPW)
        inv_count_L = _inverse_count(w_LBP, s_LBPW.shape[-1])
        fixed_ms = target_ms[term] if normalize and target_ms is not None and term in target_ms else None
        if normalize and sink_BP is not None:
            ms_LBP = _sink_apart_normaliser(term, t_LBPW, w_LBP, sink_BP, fixed_ms, eps)
            err_L = _clone_error_per_row(s_LBPW - t_LBPW, w_LBP, inv_count_L, ms_LBP, loss_fn, huber_delta)
        else:
            ms_L = _clone_normaliser(term, s_LBPW, t_LBPW, w_LBP, inv_count_L, fixed_ms, eps) if normalize else None
            err_L = _clone_error(s_LBPW - t_LBPW, w_LBP, inv_count_L, ms_L, loss_fn, huber_delta)
        per_term[term] = err_L.detach().mean()
        weighted_terms.append(weights.get(term, 1.0) * err_L.sum())

    total = torch.stack(weighted_terms).sum()
    if reduce == "mean":
        total = total / (num_layers * sum(weights.get(term, 1.0) for term in terms))
    return total, per_term


def _clone_terms(
    student_acts: Mapping[str, Tensor],
    teacher_targets: Mapping[str, Tensor],
    weights: Mapping[str, float] | None,
    reduce: str,
    loss_fn: str,
    huber_delta: float,
) -> tuple[dict[str, float], list[str]]:
    """Checks `clone_loss`'s options; returns (the term weights as a dict, the terms with a positive weight)."""
    if set(student_acts) != set(teacher_targets):
        raise ValueError(
            f"clone_loss: student terms {sorted(student_acts)} and teacher terms {sorted(teacher_targets)} differ; "
            "pass the same terms in both"
        )
    if reduce not in ("mean", "sum"):
        raise ValueError(f"clone_loss: reduce must be 'mean' or 'sum', got {reduce!r}")
    if loss_fn not in ("mse", "huber"):
        raise ValueError(f"clone_loss: loss_fn must be 'mse' or 'huber', got {loss_fn!r}")
    if not huber_delta > 0:
        raise ValueError(f"clone_loss: huber_delta must be > 0, got {huber_delta}")
    weights = dict(weights or {})
    negative = {term: w for term, w in weights.items() if w < 0}
    if negative:
        raise ValueError(f"clone_loss: weights must be >= 0, got {negative}")
    terms = [term for term in student_acts if weights.get(term, 1.0) > 0]
    if not terms:
        raise ValueError("clone_loss: no term with a positive weight; enable at least one of the clone terms")
    return weights, terms


def _check_clone_shapes(term: str, s_LBPW: Tensor, t_LBPW: Tensor, num_layers: int | None) -> int:
    """Checks one term's student and target are both [L, B, P, W] with the other terms' L; returns L."""
    if s_LBPW.shape != t_LBPW.shape or s_LBPW.dim() != 4:
        raise ValueError(
            f"clone_loss[{term!r}]: student {tuple(s_LBPW.shape)} and target {tuple(t_LBPW.shape)} must both "
            "be [L, B, P, W]"
        )
    if num_layers is not None and s_LBPW.shape[0] != num_layers:
        raise ValueError(f"clone_loss[{term!r}]: {s_LBPW.shape[0]} layers, other terms have {num_layers}")
    return s_LBPW.shape[0]


def _inverse_count(w_LBP: Tensor, width: int) -> Tensor:
    """1 / (W * sum_bp w) per layer [L] (or [1] for weights shared by every layer), 0 where no position
    carries weight."""
    total_weight_L = w_LBP.sum(dim=(1, 2)) * width
    return (total_weight_L > 0) / total_weight_L.clamp(min=torch.finfo(w_LBP.dtype).tiny)


def _weighted_mean_L(x_LBPW: Tensor, w_LBP: Tensor, inv_count_L: Tensor) -> Tensor:
    """Per-layer position-weighted mean of `x_LBPW` [L, B, P, W] -> [L]."""
    return (w_LBP[..., None] * x_LBPW).sum(dim=(1, 2, 3)) * inv_count_L


def _clone_normaliser(
    term: str,
    s_LBPW: Tensor,
    t_LBPW: Tensor,
    w_LBP: Tensor,
    inv_count_L: Tensor,
    fixed_ms_L: Tensor | None,
    eps: float,
) -> Tensor:
    """ms[l] per layer [L]: `fixed_ms_L` when given, else the target's detached mean square; >= eps."""
    num_layers = s_LBPW.shape[0]
    if fixed_ms_L is not None:
        ms_L = fixed_ms_L.to(s_LBPW)
        if ms_L.shape != (num_layers,):
            raise ValueError(f"clone_loss: target_ms[{term!r}] has shape {tuple(ms_L.shape)}, expected ({num_layers},)")
    else:
        ms_L = _weighted_mean_L(t_LBPW.detach().square(), w_LBP, inv_count_L)
    return ms_L.clamp(min=eps)


def _clone_error(
    diff_LBPW: Tensor, w_LBP: Tensor, inv_count_L: Tensor, ms_L: Tensor | None, loss_fn: str, huber_delta: float
) -> Tensor:
    """Per-layer error [L] of student - target: mse (divided by ms_L) or huber (of diff / sqrt(ms_L))."""
    if loss_fn == "mse":
        err_L = _weighted_mean_L(diff_LBPW.square(), w_LBP, inv_count_L)
        return err_L if ms_L is None else err_L / ms_L
    if ms_L is not None:
        diff_LBPW = diff_LBPW * ms_L.rsqrt()[:, None, None, None]
    return _weighted_mean_L(huber(diff_LBPW, huber_delta), w_LBP, inv_count_L)


def _sink_apart_normaliser(
    term: str, t_LBPW: Tensor, w_LBP: Tensor, sink_BP: Tensor, fixed_ms_L2: Tensor | None, eps: float
) -> Tensor:
    """ms per row [L, B, P]: ms_other[l] at the other rows, max(ms_sink[l], ms_other[l]) at sink rows, from
    `fixed_ms_L2` [L, 2] (sink, other) when given, else the mean squares of each class's detached targets
    in the batch; >= eps. A class with no row in the batch has ms eps."""
    num_layers = t_LBPW.shape[0]
    sink_LBP = _check_mask(sink_BP, t_LBPW.shape[1:3], "sink_BP")[None]
    if fixed_ms_L2 is not None:
        ms_L2 = fixed_ms_L2.to(t_LBPW)
        if ms_L2.shape != (num_layers, 2):
            raise ValueError(f"clone_loss: target_ms[{term!r}] has shape {tuple(ms_L2.shape)}; with sink_BP it must be "
                             f"({num_layers}, 2), the mean squares at sink rows and at the other rows")  # fmt: skip
    else:
        row_ms_LBP = t_LBPW.detach().square().mean(dim=-1)
        class_w_2LBP = torch.stack([w_LBP * sink_LBP, w_LBP * ~sink_LBP])
        total_2L = class_w_2LBP.sum(dim=(2, 3))
        inv_2L = (total_2L > 0) / total_2L.clamp(min=torch.finfo(w_LBP.dtype).tiny)
        ms_L2 = ((class_w_2LBP * row_ms_LBP).sum(dim=(2, 3)) * inv_2L).T
    ms_L2 = ms_L2.clamp(min=eps)
    other_L = ms_L2[:, 1]
    sink_L = torch.maximum(ms_L2[:, 0], other_L)
    return torch.where(sink_LBP, sink_L[:, None, None], other_L[:, None, None])


def _clone_error_per_row(
    diff_LBPW: Tensor, w_LBP: Tensor, inv_count_L: Tensor, ms_LBP: Tensor, loss_fn: str, huber_delta: float
) -> Tensor:
    """Per-layer error [L] of student - target with each row measured in units of its own ms_LBP: mse
    (folded into the row weights) or huber (of diff / sqrt(ms))."""
    if loss_fn == "mse":
        return _weighted_mean_L(diff_LBPW.square(), w_LBP / ms_LBP, inv_count_L)
    return _weighted_mean_L(huber(diff_LBPW * ms_LBP.rsqrt()[..., None], huber_delta), w_LBP, inv_count_L)


def _position_weights(mask_BP: Tensor | None, position_weights_BP: Tensor | None, like_LBPW: Tensor) -> Tensor:
    """[L, B, P] (or [1, B, P] for a mask shared by every layer) weights in the activations' dtype: the mask
    (0/1) times the optional position weights."""
    shape, dtype = like_LBPW.shape[1:3], like_LBPW.dtype
    if mask_BP is None:
        w_LBP = torch.ones((1, *shape), dtype=dtype, device=like_LBPW.device)
    elif mask_BP.dim() == 3:
        w_LBP = _check_mask(mask_BP, like_LBPW.shape[:3], "mask_BP").to(dtype)
    else:
        w_LBP = _check_mask(mask_BP, shape, "mask_BP").to(dtype)[None]
    if position_weights_BP is not None:
        if tuple(position_weights_BP.shape) != tuple(shape):
            raise ValueError(f"position_weights_BP has shape {tuple(position_weights_BP.shape)}; expected {tuple(shape)}")
        w_LBP = w_LBP * position_weights_BP.to(dtype)
    return w_LBP


# ---------------------------------------------------------------------------------------------------
# the fused, chunked head + loss
# ---------------------------------------------------------------------------------------------------


def _kd_chunk(kind: str, log_q_CV: Tensor, teacher: tuple, rows: slice, temperature: float):
    """One chunk's KD: (row_C, coef_C, target) with the row's loss [C] and its gradient w.r.t. the
    scaled logits u = logits / temperature written as ``q * coef_C[:, None] - target``, where target is
    ("dense", [C, V]) or ("ids", ids [C, K], values [C, K]). Teacher tensors are [N, *] (sliced by `rows`).

      full, hidden:  q - p                             (coef 1, dense target p)
      sampled:       q sum(t) - t at the sampled ids
      topk:          q (P_K - r Q_K) - (p - r q) at the top-k ids,  r = p_tail / q_tail (0 below the floor)

    with P_K, Q_K the teacher's and student's mass on the top-k ids.
    """
    if kind in ("logits", "hidden"):
        if kind == "logits":
            teacher_CV = _upcast(teacher[0][rows])
        else:
            hidden_ND, head_VD = teacher
            teacher_CV = (hidden_ND[rows] @ head_VD.T).to(log_q_CV.dtype)
        log_p_CV = torch.log_softmax(_scaled(teacher_CV, temperature), dim=-1)
        del teacher_CV
        row_C = _kl_rows(log_p_CV, log_q_CV)
        return row_C, torch.ones_like(row_C), ("dense", log_p_CV.exp_())
    ids_NK, values_NK = teacher
    ids_CK = ids_NK[rows].long().clamp(0, log_q_CV.shape[-1] - 1)
    log_q_CK = log_q_CV.gather(-1, ids_CK)
    if kind == "sampled":
        counts_CK = values_NK[rows].to(log_q_CK.dtype)
        t_CK = counts_CK / counts_CK.sum(-1, keepdim=True).clamp(min=1.0)
        row_C = (torch.xlogy(t_CK, t_CK) - t_CK * log_q_CK).sum(-1)
        return row_C, t_CK.sum(-1), ("ids", ids_CK, t_CK)
    log_p_CK = values_NK[rows].to(log_q_CK.dtype)
    p_CK = log_p_CK.exp()
    head_C = torch.where(p_CK > 0, p_CK * (log_p_CK - log_q_CK), 0.0).sum(-1)
    mass_p_C = p_CK.sum(-1)
    p_tail_C = (1.0 - mass_p_C).clamp(min=0.0)
    log_mass_q_C = torch.logsumexp(log_q_CK, dim=-1)
    q_tail_raw_C = -torch.expm1(log_mass_q_C)
    q_tail_C = q_tail_raw_C.clamp(min=_TAIL_FLOOR)
    row_C = head_C + torch.xlogy(p_tail_C, p_tail_C) - p_tail_C * torch.log(q_tail_C)
    r_C = torch.where(q_tail_raw_C >= _TAIL_FLOOR, p_tail_C / q_tail_C, 0.0)
    coef_C = mass_p_C - r_C * log_mass_q_C.exp()
    return row_C, coef_C, ("ids", ids_CK, torch.where(p_CK > 0, p_CK, 0.0) - r_C[:, None] * log_q_CK.exp())


class _FusedHeadLoss(torch.autograd.Function):
    """kd_weight * KD + beta * CE straight from the final hidden state and the head weight, chunk by chunk.

    Each chunk of C tokens makes its logits, their log-softmax, both losses and the gradient of their
    weighted sum w.r.t. those logits, then folds that gradient into the gradients of the hidden state
    [N, S] and of the head weight [V, S] (two matmuls) and drops the chunk. The gradients are complete
    at the end of the forward pass, so the backward pass only scales them: nothing of size
    [tokens, vocab] outlives a chunk, in the forward or the backward, and the logits are never
    recomputed. At temperature 1 KD and CE share one log-softmax and one exponential.

    `forward` is one function of ~70 lines on purpose: every per-chunk tensor stays local to one loop
    iteration, so it is freed before the next chunk is made (a helper returning them would hold two).
    """

    @staticmethod
    def forward(ctx, hidden_NS, weight_VS, ce_targets_N, kd_valid_N, ce_valid_N, kind, teacher, kd_weight, beta,
                temperature, chunk_tokens):  # fmt: skip
        num_tokens, vocab = hidden_NS.shape[0], weight_VS.shape[0]
        device = hidden_NS.device
        autocast = torch.is_autocast_enabled(device.type)
        mm_dtype = torch.get_autocast_dtype(device.type) if autocast else torch.promote_types(hidden_NS.dtype, weight_VS.dtype)
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        use_kd, use_ce = kind is not None and kd_weight > 0, beta > 0

        def inverse(valid_N):  # (count, 1 / count or 0 when nothing is valid: all-masked gives exact zeros)
            count = valid_N.sum()
            return count, (count > 0) / count.clamp(min=1).to(acc_dtype)

        kd_count, kd_scale = inverse(kd_valid_N)
        ce_count, ce_scale = inverse(ce_valid_N)
        with torch.autocast(device.type, enabled=False):
            h_NS, w_VS = hidden_NS.detach().to(mm_dtype), weight_VS.detach().to(mm_dtype)
            grad_h_NS = torch.empty(h_NS.shape, dtype=acc_dtype, device=device) if need_grad else None
            grad_w_VS = torch.empty((vocab, h_NS.shape[1]), dtype=acc_dtype, device=device) if need_grad else None
            kd_sum = torch.zeros((), dtype=acc_dtype, device=device)
            ce_sum = torch.zeros((), dtype=acc_dtype, device=device)
            for start in range(0, num_tokens, chunk_tokens):
                rows = slice(start, min(start + chunk_tokens, num_tokens))
                logits_CV = (h_NS[rows] @ w_VS.T).to(acc_dtype)
                kd_a_C = kd_valid_N[rows] * (kd_weight * kd_scale / temperature)
                ce_b_C = ce_valid_N[rows] * (beta * ce_scale)
                grad_CV = None
                if use_ce:
                    log_q1_CV = torch.log_softmax(logits_CV, dim=-1)
                    targets_C1 = ce_targets_N[rows, None]
                    nll_C = -log_q1_CV.gather(-1, targets_C1).squeeze(-1)
                    ce_sum += torch.where(ce_valid_N[rows], nll_C, 0.0).sum()
                if use_kd:
                    shared = use_ce and temperature == 1.0
                    log_q_CV = log_q1_CV if shared else torch.log_softmax(_scaled(logits_CV, temperature), dim=-1)
                    row_C, coef_C, target = _kd_chunk(kind, log_q_CV, teacher, rows, temperature)
                    kd_sum += torch.where(kd_valid_N[rows], row_C, 0.0).sum()
                    if need_grad:
                        q_coef_C = kd_a_C * coef_C + (ce_b_C if shared else 0.0)
                        grad_CV = log_q_CV.exp_().mul_(q_coef_C[:, None])
                        if target[0] == "dense":
                            grad_CV.addcmul_(target[1], kd_a_C[:, None], value=-1.0)
                        else:
                            grad_CV.scatter_add_(-1, target[1], target[2] * -kd_a_C[:, None])
                        if shared:
                            grad_CV.scatter_add_(-1, targets_C1, -ce_b_C[:, None])
                    del target
                if use_ce and need_grad and not (use_kd and temperature == 1.0):
                    ce_grad_CV = log_q1_CV.exp_().mul_(ce_b_C[:, None]).scatter_add_(-1, targets_C1, -ce_b_C[:, None])
                    grad_CV = ce_grad_CV if grad_CV is None else grad_CV.add_(ce_grad_CV)
                del logits_CV
                if not need_grad:
                    continue
                if grad_CV is None:  # neither loss is on: zero gradients
                    grad_CV = torch.zeros((rows.stop - rows.start, vocab), dtype=acc_dtype, device=device)
                grad_mm_CV = grad_CV.to(mm_dtype)
                del grad_CV
                grad_h_NS[rows] = grad_mm_CV @ w_VS
                if mm_dtype == acc_dtype:
                    if start == 0:
                        torch.mm(grad_mm_CV.T, h_NS[rows], out=grad_w_VS)
                    else:
                        grad_w_VS.addmm_(grad_mm_CV.T, h_NS[rows])
                elif start == 0:
                    grad_w_VS.copy_(grad_mm_CV.T @ h_NS[rows])
                else:
                    grad_w_VS += grad_mm_CV.T @ h_NS[rows]
        kd = kd_sum / kd_count.clamp(min=1) * (kd_count > 0)
        ce = ce_sum / ce_count.clamp(min=1) * (ce_count > 0)
        total = (kd_weight * kd if use_kd else torch.zeros_like(kd)) + (beta * ce if use_ce else 0.0)
        ctx.save_for_backward(grad_h_NS, grad_w_VS)
        ctx.dtypes = (hidden_NS.dtype, weight_VS.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_h_NS, grad_w_VS = ctx.saved_tensors
        grad_h = grad_w = None
        if grad_h_NS is not None:
            scale = grad_total.to(grad_h_NS.dtype)
            grad_h = (grad_h_NS * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
            grad_w = (grad_w_VS * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return (grad_h, grad_w) + (None,) * 9


def fused_head_loss(
    hidden_BTS: Tensor,
    head_weight_VS: Tensor,
    input_ids_BT: Tensor,
    mask_BT: Tensor,
    kd_weight: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    teacher_logits_BTV: Tensor | None = None,
    teacher_hidden_BTD: Tensor | None = None,
    teacher_head_VD: Tensor | None = None,
    topk_ids_BTK: Tensor | None = None,
    topk_logprobs_BTK: Tensor | None = None,
    sampled_ids_BTN: Tensor | None = None,
    sampled_counts_BTN: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """kd_weight * KD + beta * CE of the logits ``hidden @ head_weight.T``, never holding them whole.

    Equals ``kd_weight * <the KD of the teacher signal given> + beta * cross_entropy_next`` on the full
    logits (the same functions as `kl_full`, `kl_from_hidden`, `kl_topk`, `kd_sampled`) to fp32
    rounding, with the same masking and normalisation, but makes the logits `chunk_tokens` tokens at a
    time (see `_FusedHeadLoss`): peak extra memory is a few chunk_tokens x V fp32 buffers plus the
    gradients of the inputs, instead of several B x T x V tensors. Gradients flow to `hidden_BTS` and
    `head_weight_VS` only; double backward is not supported. Give at most one teacher signal (none: CE
    only, and kd is 0).

    Args:
        hidden_BTS: The student's final normed hidden state [B, T, S].
        head_weight_VS: The student's output head [V, S].
        input_ids_BT: Token ids [B, T] (CE targets are the next ids).
        mask_BT: Valid tokens [B, T], bool or 0/1.
        kd_weight, beta: Weights of KD and CE in the returned total.
        temperature: KD temperature (CE is always at 1). No T^2 factor.
        chunk_tokens: Tokens per chunk.
        teacher_logits_BTV: Full teacher logits [B, T, V].
        teacher_hidden_BTD, teacher_head_VD: Teacher final hidden states and head (logits = h @ head.T).
        topk_ids_BTK, topk_logprobs_BTK: Teacher top-k with tail bucket (see `kl_topk`).
        sampled_ids_BTN, sampled_counts_BTN: Sampled-KD counts (see `kd_sampled`).

    Returns:
        (total, kd, ce): the differentiable total and its two parts (detached), fp32 scalars.
    """
    _check_temperature(temperature)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    batch_shape = hidden_BTS.shape[:-1]
    if input_ids_BT.shape != batch_shape or head_weight_VS.shape[-1] != hidden_BTS.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden_BTS.shape)}, head {tuple(head_weight_VS.shape)} and input ids "
                         f"{tuple(input_ids_BT.shape)} must be [B, T, S], [V, S] and [B, T]")  # fmt: skip
    signals = {
        "logits": (teacher_logits_BTV,),
        "hidden": (teacher_hidden_BTD, teacher_head_VD),
        "topk": (topk_ids_BTK, topk_logprobs_BTK),
        "sampled": (sampled_ids_BTN, sampled_counts_BTN),
    }
    given = [k for k, tensors in signals.items() if tensors[0] is not None]
    if len(given) > 1:
        raise ValueError(f"fused_head_loss: give one teacher signal, got {given}")
    kind = given[0] if given else None
    teacher = tuple(t.detach() for t in signals[kind]) if kind else ()
    if kind and any(t is None for t in teacher):
        raise ValueError(f"fused_head_loss: the {kind} signal needs all of its tensors")
    if kind and tuple(teacher[0].shape[:-1]) != tuple(batch_shape):
        raise ValueError(f"the {kind} teacher signal {tuple(teacher[0].shape)} does not match B, T = {tuple(batch_shape)}")
    if kind == "hidden":  # the teacher's head runs in the common dtype of its inputs, as in kl_from_hidden
        dtype = torch.promote_types(teacher[0].dtype, teacher[1].dtype)
        teacher = (teacher[0].reshape(-1, teacher[0].shape[-1]).to(dtype), teacher[1].to(dtype))
    else:
        teacher = tuple(t.reshape(-1, t.shape[-1]) for t in teacher)
    valid_BT = _check_mask(mask_BT, batch_shape, "mask_BT")
    vocab = head_weight_VS.shape[0]
    # Position t predicts input_ids[t + 1]; the last position of a row predicts nothing.
    pair_valid_BT = torch.zeros_like(valid_BT)
    pair_valid_BT[:, :-1] = valid_BT[:, :-1] & valid_BT[:, 1:]
    targets_BT = torch.zeros_like(input_ids_BT, dtype=torch.long)
    targets_BT[:, :-1] = input_ids_BT[:, 1:].long()
    targets_BT = torch.where(pair_valid_BT, targets_BT, 0).clamp(0, vocab - 1)
    return _FusedHeadLoss.apply(
        hidden_BTS.reshape(-1, hidden_BTS.shape[-1]), head_weight_VS, targets_BT.reshape(-1), valid_BT.reshape(-1),
        pair_valid_BT.reshape(-1), kind, teacher, float(kd_weight), float(beta), float(temperature), chunk_tokens,
    )  # fmt: skip
