"""Principal-component initialisation of the LRC projections: start the student near the teacher.

With U [d_T, d_S] the top principal directions of the teacher's RMS-normalised residual stream, the
student's residual stream is h_S = U^T h_T. The folding below makes every generated weight read and
write that subspace exactly as the teacher does:

    P_q = P_k = P_v = diag(g_in) U        P_gate = P_up = diag(g_post) U      (teacher norm weights folded in)
    P_o = P_down = P_e = U                student norm weights sqrt(d_T / d_S)
    untied head: P_lm = diag(g_final) U   (the teacher's final-norm weight folded in)

sqrt(d_T/d_S) undoes the change of RMS under projection: rms(U^T h) = ||h|| / sqrt(d_S) when h lies in
span(U), against ||h|| / sqrt(d_T) in the teacher. With d_S = d_T, U is a rotation and the student is the
teacher exactly.

A tied head is the embedding E^T U itself, so g_final cannot be folded into it; it has to go into the
student's final norm, whose weight is per channel. With every other student norm weight one constant,
the whole student is unchanged by a rotation R of its basis (U -> U R), and the tied logits then are
x^T R diag(w) R^T U^T E^T^T for the student's normed final state x: any symmetric S = R diag(w) R^T
can stand between x and the head. `tied_head_rotation` takes the S whose head E^T U S is closest, in
logit space (||E_c (U S - diag(g_final) U)||_F, E_c the embedding with its mean row removed, since a
shift common to all logits changes nothing), to the untied head's E^T diag(g_final) U, and returns
R and w: the basis becomes U R, the final norm sqrt(d_T/d_S) w. With d_S = d_T the tied student is the
teacher exactly too. (Keeping U and the diagonal of U^T diag(g_final) U alone, the per-channel weight
that fits without the rotation, started far worse than random on SmolLM2: benchmarks/tied_head.py.)

The part of the residual stream outside span(U) is lost, and the folded head is then over-confident:
`calibrate_head_scale` fits one scalar c on the final-norm weight (logits are linear in it: a logit
temperature 1/c) to the training objective's KD + CE on a few training sequences, for either head. On
SmolLM2-135M this lowers the step-0 held-out CE, while scaling each layer's norms by the energy its basis
captures instead raised it (figures: benchmarks/README.md, "The head's scale").

Legend: D d_T, S d_S.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.distributed.fsdp import FSDPModule

from ..config import ConfigError
from .lrc import READ_TERMS, WRITE_TERMS, LRCStudent, full_tensor, local_tensor, set_rows

__all__ = ["SecondMoment", "pca_basis", "init_pca", "tied_head_rotation", "calibrate_head_scale", "EMBED_BLOCK_ROWS"]

EMBED_BLOCK_ROWS = 16384
"""Rows of the teacher's embedding `tied_head_rotation` sums at a time (blocks read from files use the
same, for the same sums)."""


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
def init_pca(student: LRCStudent, basis_DS: torch.Tensor, embed_blocks: Iterable[torch.Tensor] | None = None) -> None:
    """Set every projection and student norm from the basis U (module docstring); a tied head rotates U
    first (`tied_head_rotation`). A sharded student (FSDP2) sets its own rows of each, gathering only the
    teacher's norm weights; its tied head then needs the teacher's embedding as `embed_blocks` (its rows
    in order, a block at a time, e.g. read from the teacher's files), which it does not hold whole."""
    d_teacher, d_student = basis_DS.shape
    assert (d_teacher, d_student) == (student.d_teacher, student.d_student), "basis shape does not fit the student"
    u = basis_DS.to(student.proj_embed.device, student.proj_embed.dtype)
    scale = math.sqrt(d_teacher / d_student)
    g_final = full_tensor(student.teacher_final_norm).to(u.dtype)
    if student.proj_lm_head is None:
        embed = student.teacher_embed if embed_blocks is None else embed_blocks
        rotation_SS, weight_S = tied_head_rotation(u, g_final, embed)
        u = u @ rotation_SS.to(u)
    for layer, frozen in zip(student.layers, student.teacher_layers):
        g_in, g_post = full_tensor(frozen.input_norm).to(u.dtype), full_tensor(frozen.post_norm).to(u.dtype)
        for m in READ_TERMS:
            g = g_in if m in ("q", "k", "v") else g_post
            set_rows(layer.proj[m], lambda first, end, g=g: g[first:end, None] * u[first:end])
        for m in WRITE_TERMS:
            set_rows(layer.proj[m], u)
        set_rows(layer.input_norm, scale)
        set_rows(layer.post_norm, scale)
    set_rows(student.proj_embed, u)
    if student.proj_lm_head is not None:
        set_rows(student.proj_lm_head, lambda first, end: g_final[first:end, None] * u[first:end])
        set_rows(student.final_norm, scale)
    else:
        set_rows(student.final_norm, scale * weight_S.to(u))


@torch.no_grad()
def tied_head_rotation(basis_DS: torch.Tensor, g_final_D: torch.Tensor, embed_VD: torch.Tensor | Iterable[torch.Tensor],
                       rows_per_chunk: int = EMBED_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The rotation R [S, S] of the basis and the final-norm weight w [S] of a tied PCA head (module
    docstring): the symmetric S minimising ||E_c (U S - diag(g) U)||_F^2, S = R diag(w) R^T.

    With A = U^T E_c^T E_c U and B = U^T E_c^T E_c diag(g) U, S solves the Lyapunov equation
    S A + A S = B + B^T; in A's eigenbasis (A = Q diag(a) Q^T) that is S'_ij = C'_ij / (a_i + a_j) with
    C' = Q^T (B + B^T) Q. E_c^T E_c [D, D] is summed over the vocabulary in chunks of `rows_per_chunk`
    rows on the embedding's device (V x D^2 multiply-adds: 16 GFLOP for SmolLM2, 1.3 TFLOP for
    Qwen2.5-3B); the d_S x d_S algebra runs in float64 on the CPU. Columns of R come by descending w,
    each with its largest-magnitude entry positive, so the result is reproducible. `embed_VD` may also be
    the embedding's rows as blocks, in order (of `rows_per_chunk` rows for the same sums as the tensor's).
    """
    dim = basis_DS.shape[0]
    blocks = embed_VD.split(rows_per_chunk) if isinstance(embed_VD, torch.Tensor) else embed_VD
    gram_DD = sum_D = None
    num_rows = 0
    for chunk in blocks:
        if gram_DD is None:
            gram_DD = torch.zeros(dim, dim, dtype=torch.float32, device=chunk.device)
            sum_D = torch.zeros(dim, dtype=torch.float64, device=chunk.device)
        chunk = chunk.float()
        gram_DD += chunk.t() @ chunk
        sum_D += chunk.double().sum(0)
        num_rows += chunk.shape[0]
    assert num_rows, "the embedding has no rows"
    mean_D = (sum_D / num_rows).cpu()
    gram = gram_DD.cpu().double() - num_rows * torch.outer(mean_D, mean_D)  # E_c^T E_c
    u, g = basis_DS.detach().cpu().double(), g_final_D.detach().cpu().double()
    gram_u = gram @ u
    a_mat = u.t() @ gram_u
    b_mat = gram_u.t() @ (g[:, None] * u)
    a, q = torch.linalg.eigh(a_mat)
    a = a.clamp_min(1e-12 * float(a.max().clamp_min(1e-30)))  # a direction the embedding never reaches
    c = q.t() @ (b_mat + b_mat.t()) @ q
    s = q @ (c / (a[:, None] + a[None, :])) @ q.t()
    w, r = torch.linalg.eigh(0.5 * (s + s.t()))
    order = torch.argsort(w, descending=True)
    w, r = w[order], r[:, order]
    r = r * torch.sign(r.gather(0, r.abs().argmax(0, keepdim=True)))
    return r.float(), w.float()


@torch.no_grad()
def calibrate_head_scale(student: LRCStudent, batches: Iterable, score: Callable[..., torch.Tensor],
                         pass_teacher_head: bool = False, document_mask: bool = False) -> float:  # fmt: skip
    """Multiply the student's final-norm weight by the c in [1/4, 2] that minimises `score`, the mean
    loss of logits [B, T, V] on a batch (the training objective's KD + CE), averaged over `batches`
    weighted by their tokens; return c. With `pass_teacher_head`, `score` also gets the teacher's head
    as the forward returned it (`teacher_head_VD=`): a sharded student holds it whole only there.
    A sharded student is called like a whole one (every process with the same batches) and scales its
    own rows. With `document_mask` each packed document is seen alone (the batches' `position_ids`, 0
    starting a document), as a document-masked student trains.

    Logits are linear in c, so one student forward per batch scores a whole grid of c (log-spaced, 9%
    apart); a parabola through the best grid point and its neighbours (the losses are convex in c)
    refines it. Each batch (`lrc_offline.batch.Batch`) needs `input_ids` [B, T] on the student's device.
    """
    log_grid = torch.linspace(math.log(0.25), math.log(2.0), 25, dtype=torch.float64)
    totals = torch.zeros(len(log_grid), dtype=torch.float64, device=student.final_norm.device)
    for batch in batches:
        positions = batch.position_ids.long() if document_mask else None
        out = student(batch.input_ids.long(), position_ids_BT=positions, document_mask=document_mask)
        logits_BTV = out.logits_BTV.float()
        extra = {"teacher_head_VD": out.teacher_head_VD} if pass_teacher_head else {}
        for i, c in enumerate(log_grid.exp().tolist()):
            totals[i] += score(c * logits_BTV, batch, **extra).double() * batch.input_ids.numel()
    loss = totals.cpu()  # one host sync for the whole search
    best = int(loss.argmin())
    log_c = float(log_grid[best])
    if 0 < best < len(log_grid) - 1:  # vertex of the parabola through three equally spaced points
        left, mid, right = float(loss[best - 1]), float(loss[best]), float(loss[best + 1])
        step = float(log_grid[1] - log_grid[0])
        log_c += 0.5 * step * (left - right) / max(left - 2 * mid + right, 1e-30)
    scale = math.exp(log_c)
    if isinstance(student, FSDPModule):
        # A forward without a backward leaves the root's parameters gathered (FSDP2 keeps them for the
        # backward): the shards, which are what the optimiser and the next forward see, are scaled.
        student.reshard()
    local_tensor(student.final_norm).mul_(scale)
    return scale
