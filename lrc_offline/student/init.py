"""Principal-component initialisation of the LRC projections: start the student near the teacher.

With U [d_T, d_S] the top principal directions of the teacher's RMS-normalised residual stream, the
student's residual stream is h_S = U^T h_T. The folding below makes every generated weight read and
write that subspace exactly as the teacher does:

    P_q = P_k = P_v = diag(g_in) U        P_gate = P_up = diag(g_post) U      (teacher norm weights folded in)
    P_o = P_down = P_e = U                student norm weights sqrt(d_T / d_S)
    untied head: P_lm = diag(g_final) U   (the teacher's final-norm weight folded in)
    tied head:   final norm per channel   w_j = sqrt(d_T/d_S) * sum_i U_ij^2 g_final_i  (an approximation)

sqrt(d_T/d_S) undoes the change of RMS under projection: rms(U^T h) = ||h|| / sqrt(d_S) when h lies in
span(U), against ||h|| / sqrt(d_T) in the teacher. With d_S = d_T, U is a rotation and the student is the
teacher exactly (untied head).

The part of the residual stream outside span(U) is lost, and the folded head is then over-confident:
`calibrate_head_scale` fits one scalar c on the final-norm weight (logits are linear in it: a logit
temperature 1/c) to the training objective's KD + CE on a few training sequences. On SmolLM2-135M this
lowers the step-0 held-out CE, while scaling each layer's norms by the energy its basis captures instead
raised it (figures: benchmarks/README.md, "The head's scale").

Legend: D d_T, S d_S.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from ..config import ConfigError
from .lrc import READ_TERMS, WRITE_TERMS, LRCStudent

__all__ = ["SecondMoment", "pca_basis", "init_pca", "calibrate_head_scale"]


class SecondMoment:
    """Streaming uncentred second moment of vectors normalised to unit RMS (each token counts once,
    however large its activations: the attention-sink tokens would otherwise own the top directions).

    Accumulates in float64; `update` takes any [..., D] tensor.
    """

    def __init__(self, dim: int):
        self.matrix_DD = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        # float64 on the CPU; float32 on an accelerator (a d x d sum over many rows; ~1e-6 relative).
        x = x.reshape(-1, x.shape[-1])
        x = x.to(torch.float64 if x.device.type == "cpu" else torch.float32)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        self.matrix_DD += (x.t() @ x).to("cpu", torch.float64)
        self.count += x.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.matrix_DD, "count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "SecondMoment":
        moment = cls(state["matrix"].shape[0])
        moment.matrix_DD = state["matrix"].to(torch.float64)
        moment.count = int(state["count"])
        return moment


def pca_basis(moment: SecondMoment, dim: int) -> torch.Tensor:
    """The top `dim` eigenvectors [D, dim] of the second moment, by descending eigenvalue, each with a
    fixed sign (largest-magnitude entry positive) so the basis is reproducible."""
    if moment.count == 0:
        raise ConfigError("the PCA second moment saw no vectors; the cache holds no residual activations")
    if not 0 < dim <= moment.matrix_DD.shape[0]:
        raise ConfigError(f"student hidden size {dim} must be in [1, {moment.matrix_DD.shape[0]}] for a PCA basis")
    eigenvalues, vectors = torch.linalg.eigh(moment.matrix_DD / moment.count)
    order = torch.argsort(eigenvalues, descending=True)[:dim]
    basis = vectors[:, order]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return (basis * signs).to(torch.float32)


@torch.no_grad()
def init_pca(student: LRCStudent, basis_DS: torch.Tensor) -> None:
    """Set every projection and student norm from the basis U (module docstring)."""
    d_teacher, d_student = basis_DS.shape
    assert (d_teacher, d_student) == (student.d_teacher, student.d_student), "basis shape does not fit the student"
    u = basis_DS.to(student.proj_embed.device, student.proj_embed.dtype)
    scale = math.sqrt(d_teacher / d_student)
    for layer, frozen in zip(student.layers, student.teacher_layers):
        for m in READ_TERMS:
            g = frozen.input_norm if m in ("q", "k", "v") else frozen.post_norm
            layer.proj[m].copy_(g.to(u.dtype)[:, None] * u)
        for m in WRITE_TERMS:
            layer.proj[m].copy_(u)
        layer.input_norm.fill_(scale)
        layer.post_norm.fill_(scale)
    student.proj_embed.copy_(u)
    g_final = student.teacher_final_norm.to(u.dtype)
    if student.proj_lm_head is not None:
        student.proj_lm_head.copy_(g_final[:, None] * u)
        student.final_norm.fill_(scale)
    else:
        student.final_norm.copy_(scale * (u.pow(2) * g_final[:, None]).sum(0))


@torch.no_grad()
def calibrate_head_scale(student: LRCStudent, batches: Iterable,
                         score: Callable[[torch.Tensor, Any], torch.Tensor]) -> float:  # fmt: skip
    """Multiply the student's final-norm weight by the c in [1/4, 2] that minimises `score`, the mean
    loss of logits [B, T, V] on a batch (the training objective's KD + CE), averaged over `batches`
    weighted by their tokens; return c.

    Logits are linear in c, so one student forward per batch scores a whole grid of c (log-spaced, 9%
    apart); a parabola through the best grid point and its neighbours (the losses are convex in c)
    refines it. Each batch (`lrc_offline.batch.Batch`) needs `input_ids` [B, T] on the student's device.
    """
    log_grid = torch.linspace(math.log(0.25), math.log(2.0), 25, dtype=torch.float64)
    totals = torch.zeros(len(log_grid), dtype=torch.float64, device=student.final_norm.device)
    for batch in batches:
        logits_BTV = student(batch.input_ids.long()).logits_BTV.float()
        for i, c in enumerate(log_grid.exp().tolist()):
            totals[i] += score(c * logits_BTV, batch).double() * batch.input_ids.numel()
    loss = totals.cpu()  # one host sync for the whole search
    best = int(loss.argmin())
    log_c = float(log_grid[best])
    if 0 < best < len(log_grid) - 1:  # vertex of the parabola through three equally spaced points
        left, mid, right = float(loss[best - 1]), float(loss[best]), float(loss[best + 1])
        step = float(log_grid[1] - log_grid[0])
        log_c += 0.5 * step * (left - right) / max(left - 2 * mid + right, 1e-30)
    scale = math.exp(log_c)
    student.final_norm.mul_(scale)
    return scale
