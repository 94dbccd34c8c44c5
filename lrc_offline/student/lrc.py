"""The Low-Rank Clone student (DESIGN section 1).

Only the hidden size shrinks, d_T -> d_S. Per layer seven trainable projections P_m (d_T x d_S),
trainable RMSNorm weights of size d_S, one embedding projection P_e (and P_lm for an untied head).
Student weights are generated from the frozen teacher weights in every forward:

    W^S_m = W^T_m P_m  (q, k, v, gate, up)      W^S_o = P_o^T W^T_o,  W^S_down = P_down^T W^T_down
    E^S   = E^T P_e                              lm_head^S = E^S (tied) or W^T_lm P_lm

The teacher's tensors are registered as non-persistent buffers that share the teacher's storage: they
move with the module, receive no gradient and stay out of the state dict (checkpoints hold only
what trains). Each decoder layer is one module holding its teacher tensors and its parameters, and
does all its work in its own forward, so FSDP2 can shard the student per layer (`training/fsdp.py`,
which turns the buffers into frozen parameters: FSDP2 shards only parameters).

Legend: B batch, T tokens, P clone positions, D d_T, S d_S, V vocabulary, H/G heads, K head_dim.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from ..config import CLONE_TERMS, ConfigError
from ..teacher.adapters import LayerWeights, TeacherWeights, teacher_weights
from .functional import apply_rope, attention, attention_bias, rms_norm, swiglu
from .hf_config import check_exportable

__all__ = ["LRCStudent", "build_student", "StudentOutput", "StudentWeights", "CLONE_TERMS", "READ_TERMS", "WRITE_TERMS",
           "local_rows", "local_tensor", "set_rows", "full_tensor"]

READ_TERMS = ("q", "k", "v", "gate", "up")
"""Projections that read the residual stream: W^S = W^T P."""
WRITE_TERMS = ("o", "down")
"""Projections that write it: W^S = P^T W^T; their clone targets are compared in student space."""
_TEACHER_TENSORS = ("q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_norm")


@dataclass
class StudentWeights:
    """Everything trainable a forward reads, generated from the parameters: per layer the student's
    weights W^S (`layer_weights`) plus its two norm weights and, for the clone targets in student space,
    P_o and P_down; the embedding projection, the final norm and the head [V, S].

    Generated once per optimizer step (`LRCStudent.generate_weights`), the step's micro-batches run on a
    `detached` copy whose gradients accumulate; `backward` then sends them into the parameters through
    one backward pass of the generation (one matmul per weight per step, not per micro-batch).
    """

    layers: list[dict[str, torch.Tensor]]
    proj_embed: torch.Tensor
    final_norm: torch.Tensor
    head: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.values()] + [self.proj_embed, self.final_norm, self.head]

    def _rebuilt(self, tensors: list[torch.Tensor]) -> "StudentWeights":
        it = iter(tensors)
        layers = [{k: next(it) for k in layer} for layer in self.layers]
        return StudentWeights(layers, next(it), next(it), next(it))

    def detached(self) -> "StudentWeights":
        """Leaf copies sharing storage, whose gradients accumulate over micro-batches (in fp32 when a
        weight is in lower precision, e.g. generated under bf16 autocast, so grad_accum 16 loses nothing)."""
        leaves = []
        for t in self.tensors():
            leaf = t.detach().requires_grad_(t.requires_grad)
            if leaf.requires_grad and leaf.dtype not in (torch.float32, torch.float64):
                leaf.register_post_accumulate_grad_hook(_accumulate_fp32)
            leaves.append(leaf)
        return self._rebuilt(leaves)

    def backward(self, leaves: "StudentWeights") -> None:
        """Backpropagate the gradients accumulated on `leaves` (from `detached`) into the parameters."""
        pairs = [(t, _leaf_grad(leaf)) for t, leaf in zip(self.tensors(), leaves.tensors()) if t.requires_grad]
        pairs = [(t, g.to(t.dtype)) for t, g in pairs if g is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _accumulate_fp32(leaf: torch.Tensor) -> None:
    """Move a low-precision leaf's fresh gradient into its fp32 sum (`leaf.grad_fp32`)."""
    grad = leaf.grad
    leaf.grad = None
    total = getattr(leaf, "grad_fp32", None)
    if total is None:
        leaf.grad_fp32 = grad.float()
    else:
        total.add_(grad)


def _leaf_grad(leaf: torch.Tensor) -> torch.Tensor | None:
    return getattr(leaf, "grad_fp32", None) if leaf.grad is None else leaf.grad


@dataclass
class StudentOutput:
    """What one forward gives the objective (everything it needs from the student, so a wrapped
    student, DDP-wrapped or FSDP2-sharded, is only ever called, never reached into)."""

    logits_BTV: torch.Tensor | None
    """None when the forward was asked for `hidden_BTS` and `head_weight_VS` instead (fused head + loss)."""
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    """For the clone layers asked for: term -> [L, B, P, W] student activations."""
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    """With `teacher_acts`: term -> [L, B, P, W] teacher targets in the space each term is compared in."""
    target_ms: dict[str, torch.Tensor] | None = None
    """With `teacher_ms`: those teacher-space mean squares [L] carried into the space each term is
    compared in (detached)."""
    teacher_head_VD: torch.Tensor | None = None
    """The teacher's output head (its embedding when tied), for KD from cached final hidden states."""
    hidden_BTS: torch.Tensor | None = None
    """With `logits=False`: the final normed hidden state; the logits are hidden_BTS @ head_weight_VS.T."""
    head_weight_VS: torch.Tensor | None = None
    """With `logits=False`: the student's output head."""


class _FrozenLayer(nn.Module):
    """One teacher layer's tensors as non-persistent buffers (shared storage, no gradient)."""

    def __init__(self, weights: LayerWeights):
        super().__init__()
        for name in _TEACHER_TENSORS:
            self.register_buffer(name, getattr(weights, name), persistent=False)
        for name, bias in weights.biases.items():
            self.register_buffer(f"{name}_bias", bias, persistent=False)
        self.bias_names = tuple(sorted(weights.biases))
        self.has_qk_norm = weights.q_norm is not None
        if self.has_qk_norm:
            self.register_buffer("q_norm", weights.q_norm, persistent=False)
            self.register_buffer("k_norm", weights.k_norm, persistent=False)

    def bias(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_bias") if name in self.bias_names else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors `decoder_layer` reads beyond the generated weights."""
        out = {"o": self.o}
        if self.bias("o") is not None:
            out["o_bias"] = self.bias("o")
        if self.has_qk_norm:
            out.update(q_norm=self.q_norm, k_norm=self.k_norm)
        return out


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """The rows [a, b) of dim 0 this process holds of `tensor`: all of a plain tensor; of an FSDP2-sharded
    one (a DTensor placed Shard(0)), FSDP2's chunk: ceil(n / N) rows a rank, the last ranks fewer or none."""
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0]
    assert [p.is_shard(0) for p in tensor.placements] == [True], f"unexpected placement {tensor.placements}"
    num, world = tensor.shape[0], tensor.device_mesh.size()
    chunk = -(-num // world)
    first = min(tensor.device_mesh.get_local_rank() * chunk, num)
    end = min(first + chunk, num)
    assert tensor.to_local().shape[0] == end - first, "FSDP2 split dim 0 otherwise than torch.chunk"
    return first, end


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor`: its local shard when sharded, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def set_rows(tensor: torch.Tensor, rows) -> None:
    """Write this process's rows of `tensor` (`local_rows`): `rows` is the full value (a tensor or a
    number) or a function (a, b) -> rows [a, b) of it, called once, so a sharded tensor is filled without
    ever making the whole."""
    local = local_tensor(tensor)
    if callable(rows):
        rows = rows(*local_rows(tensor))
    elif isinstance(rows, torch.Tensor) and rows.dim() and isinstance(tensor, DTensor):
        rows = rows[slice(*local_rows(tensor))]
    if isinstance(rows, torch.Tensor):
        local.copy_(rows)
    else:
        local.fill_(rows)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor` (gathered when sharded: collective, every process calls it in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def frozen_buffers_to_parameters(module: nn.Module) -> None:
    """Re-register `module`'s own buffers as parameters with requires_grad=False (same tensors), for a
    sharded student: FSDP2 shards parameters, never buffers."""
    for name in list(module._buffers):
        tensor = module._buffers.pop(name)
        module._non_persistent_buffers_set.discard(name)
        module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


@dataclass(frozen=True)
class _Geometry:
    """What one decoder layer needs to know about the shapes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    d_student: int


@dataclass
class _CloneRequest:
    """What a clone layer's forward is asked for beyond the residual stream: the activations at
    `positions_BP` (o in `o_space`), and with `teacher_acts` ([B, P, *] of this layer, as cached) the
    targets, with `teacher_ms` (term -> scalar, teacher space) their normalisers."""

    positions_BP: torch.Tensor
    o_space: str
    teacher_acts: dict[str, torch.Tensor] | None = None
    teacher_ms: dict[str, torch.Tensor] | None = None


class _StudentLayer(nn.Module):
    """One decoder layer of the student: its trainable parameters (seven projections, two norm weights)
    and the frozen teacher layer its weights are generated from (`teacher`).

    Everything the layer does, generating its weights, running on the residual stream, its clone
    activations, targets and normalisers, happens inside `forward`: a sharded student (FSDP2, one group
    per layer) gathers the layer's tensors for that call only.
    """

    def __init__(self, weights: LayerWeights, d_student: int, geometry: _Geometry, device=None):
        super().__init__()
        d_teacher = weights.q.shape[1]
        self.teacher = _FrozenLayer(weights)
        self.proj = nn.ParameterDict({m: nn.Parameter(torch.empty(d_teacher, d_student, device=device))
                                      for m in CLONE_TERMS})  # fmt: skip
        self.input_norm = nn.Parameter(torch.ones(d_student, device=device))
        self.post_norm = nn.Parameter(torch.ones(d_student, device=device))
        self.geometry = geometry
        self.decoder = decoder_layer
        """The layer's computation (`LRCStudent.compile_layers` swaps in a compiled one)."""
        self.checkpointing = False
        """Keep only the layer's input for the backward and recompute the rest there, its generated
        weights included (`train.activation_checkpointing`)."""

    def layer_weights(self) -> dict[str, torch.Tensor]:
        """Student weights ([out, in] like nn.Linear), biases under `<name>_bias`."""
        frozen, proj = self.teacher, self.proj
        dtype = proj["q"].dtype
        out = {}
        for m in READ_TERMS:
            out[m] = _mm(getattr(frozen, m), proj[m])
            bias = frozen.bias(m)
            if bias is not None:
                out[f"{m}_bias"] = bias.to(dtype)
        for m in WRITE_TERMS:
            out[m] = _mm(getattr(frozen, m).t(), proj[m]).t()
            bias = frozen.bias(m)
            if bias is not None:
                out[f"{m}_bias"] = bias.to(dtype) @ proj[m]
        return out

    def generate(self) -> dict[str, torch.Tensor]:
        """Everything trainable this layer's forward reads (`StudentWeights.layers[i]`)."""
        w = self.layer_weights()
        w.update(input_norm=self.input_norm, post_norm=self.post_norm, proj_o=self.proj["o"],
                 proj_down=self.proj["down"])  # fmt: skip
        return w

    def forward(self, h_BTS: torch.Tensor, rope: tuple, mask, w: dict | None = None,
                clone: _CloneRequest | None = None) -> tuple[torch.Tensor, dict]:  # fmt: skip
        """The new residual stream and, for a clone layer (`clone`), a dict of its clone activations
        (`acts`: term -> [B, P, W]) and, when asked for, `targets` and `target_ms` (plain containers, so
        a sharded layer sees every tensor it returns). `w`: the weights to run on (generated once per
        step); None generates them here."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run, h_BTS, rope, mask, w, clone, use_reentrant=False)
        return self._run(h_BTS, rope, mask, w, clone)

    def _run(self, h_BTS: torch.Tensor, rope: tuple, mask, w: dict | None, clone: _CloneRequest | None):
        w = self.generate() if w is None else w
        h_BTS, acts = self.decoder(self.geometry, w, self.teacher.tensors(), h_BTS, rope, mask,
                                   clone.o_space if clone is not None else None)  # fmt: skip
        if clone is None:
            return h_BTS, {}
        result = {"acts": {term: _gather(value, clone.positions_BP) for term, value in acts.items()}}
        if clone.teacher_acts is not None:
            result["targets"] = self.clone_targets(clone.teacher_acts, clone.o_space, w)
            if clone.teacher_ms is not None:
                result["target_ms"] = self.target_mean_squares(clone.teacher_ms, clone.o_space)
        return h_BTS, result

    @torch.no_grad()
    def teacher_targets_from_residual(self, h_BPD: torch.Tensor, a_BPD: torch.Tensor) -> dict:
        """All seven teacher clone targets, recomputed from the layer input h_i and the attention output
        a_T at the cached positions (teacher space; q/k/v before RoPE)."""
        frozen, eps = self.teacher, self.geometry.eps
        dtype = frozen.q.dtype
        h, a = h_BPD.to(dtype), a_BPD.to(dtype)
        x = rms_norm(h, frozen.input_norm, eps)
        out = {m: _linear(x, getattr(frozen, m), frozen.bias(m)) for m in ("q", "k", "v")}
        x2 = rms_norm(h + a, frozen.post_norm, eps)
        out["gate"] = _linear(x2, frozen.gate, frozen.bias("gate"))
        out["up"] = _linear(x2, frozen.up, frozen.bias("up"))
        out["down"] = _linear(swiglu(out["gate"], out["up"]), frozen.down, frozen.bias("down"))
        out["o"] = a
        return out

    def teacher_targets(self, teacher_acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher-space targets term -> [B, P, W] from this layer's cached activations [B, P, *]:
        recomputed from residuals (`input`, `attn`) or read (the seven terms)."""
        if "input" in teacher_acts:
            return self.teacher_targets_from_residual(teacher_acts["input"], teacher_acts["attn"])
        return {m: teacher_acts[m] for m in CLONE_TERMS}

    def clone_targets(self, teacher_acts: dict[str, torch.Tensor], o_space: str, w: dict | None = None) -> dict:
        """`teacher_targets` in the space each term is compared in: down always in student space (P^T t,
        i.e. t @ P, with the gradient into P as in the paper's loss), o too unless `o_space` is teacher.
        `w` supplies P_o and P_down (default: the parameters)."""
        targets = dict(self.teacher_targets(teacher_acts))
        for m in ("down",) if o_space == "teacher" else WRITE_TERMS:
            proj = self.proj[m] if w is None else w[f"proj_{m}"]
            targets[m] = targets[m].to(proj.dtype) @ proj
        return targets

    @torch.no_grad()
    def target_mean_squares(self, teacher_ms: dict[str, torch.Tensor], o_space: str) -> dict:
        """Teacher-space target mean squares term -> scalar in the space each term is compared in: terms
        compared in student space (P^T t) scale by the projection's mean gain ||P||_F^2 / d_S (exact for
        isotropic targets)."""
        projected = ("down",) if o_space == "teacher" else WRITE_TERMS
        out = {}
        for term, ms in teacher_ms.items():
            if term in projected:
                gain = self.proj[term].float().square().sum()
                ms = ms.to(gain) * gain / self.geometry.d_student
            out[term] = ms
        return out


def _mm(frozen: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """frozen @ trainable. Under autocast the frozen (bf16) teacher tensor goes in as it is, so autograd
    saves the buffer itself rather than a new full-precision copy of it for the backward pass."""
    if torch.is_autocast_enabled(trainable.device.type):
        return frozen @ trainable
    return frozen.to(trainable.dtype) @ trainable


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _gather(x_BTW: torch.Tensor, positions_BP: torch.Tensor) -> torch.Tensor:
    return torch.gather(x_BTW, 1, positions_BP.long().unsqueeze(-1).expand(-1, -1, x_BTW.shape[-1]))


class LRCStudent(nn.Module):
    """An LRC student over a frozen `transformers` teacher of a supported family.

    Args:
        teacher_model: the teacher (its parameters are shared, never copied or trained).
        hidden_size: d_S.
        init_std: standard deviation of the N(0, init_std) projection init (the paper's 0.02).
        seed: seed of the projection init.
        untie_head: give the student its own head W^T_lm P_lm even when the teacher ties its head to the
            embedding (costs vocab x d_S parameters; lets PCA init fold the teacher's final-norm weight into
            the head, where a tied head gets it through its final norm and a rotated basis).
        device: where the trainable parameters are made; on `meta` they are left uninitialised (a student
            sharded before its tensors exist: `training.fsdp.build_sharded_student`).
    """

    def __init__(self, teacher_model: nn.Module, hidden_size: int, init_std: float = 0.02, seed: int = 0,
                 untie_head: bool = False, device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        weights: TeacherWeights = teacher_weights(teacher_model)
        self.teacher_config = copy.deepcopy(teacher_model.config)
        self.d_teacher, self.d_student = weights.hidden_size, hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
        self.eps, self.sliding_window = weights.rms_norm_eps, weights.sliding_window
        self.tied = weights.tied and not untie_head
        self.num_layers = len(weights.layers)
        geometry = _Geometry(self.num_heads, self.num_kv_heads, self.head_dim, self.eps, hidden_size)
        self.register_buffer("teacher_embed", weights.embed, persistent=False)
        self.register_buffer("teacher_final_norm", weights.final_norm, persistent=False)
        if not self.tied:
            head = weights.embed if weights.tied else weights.lm_head
            self.register_buffer("teacher_lm_head", head, persistent=False)
        # RoPE depends only on head_dim and the rope parameters, which the student keeps.
        self.rotary = copy.deepcopy(teacher_model.model.rotary_emb)
        self.teacher_head_shared = weights.tied and not self.tied
        """The teacher's embedding serves as `teacher_lm_head` too (an untied student of a tied teacher)."""
        self.layers = nn.ModuleList(_StudentLayer(lw, hidden_size, geometry, device) for lw in weights.layers)
        self.proj_embed = nn.Parameter(torch.empty(self.d_teacher, hidden_size, device=device))
        self.proj_lm_head = None if self.tied else nn.Parameter(torch.empty(self.d_teacher, hidden_size, device=device))
        self.final_norm = nn.Parameter(torch.ones(hidden_size, device=device))
        if torch.device(device or "cpu").type != "meta":
            self.init_random(init_std, seed)

    @property
    def teacher_layers(self) -> list[_FrozenLayer]:
        """Each layer's frozen teacher tensors (`layers[i].teacher`)."""
        return [layer.teacher for layer in self.layers]

    # ------------------------------------------------------------------------------------------------
    # init
    # ------------------------------------------------------------------------------------------------

    def projections(self) -> list[nn.Parameter]:
        """Every projection matrix, in a fixed order."""
        out = [layer.proj[m] for layer in self.layers for m in CLONE_TERMS] + [self.proj_embed]
        return out + ([self.proj_lm_head] if self.proj_lm_head is not None else [])

    @torch.no_grad()
    def init_random(self, std: float, seed: int) -> None:
        """The paper's init: every projection N(0, std), norms 1; deterministic in `seed`. A sharded
        student draws the same numbers, one projection at a time, and keeps its rows."""
        gen = torch.Generator().manual_seed(seed)
        for p in self.projections():
            set_rows(p, torch.randn(p.shape, generator=gen) * std)
        for norm in self.norm_weights():
            set_rows(norm, 1.0)

    def teacher_tensor_names(self, adapter) -> dict[str, str]:
        """Each frozen teacher tensor of the student (its name in `named_buffers`, or in `named_parameters`
        once sharded) -> the teacher parameter it is, by the family's module names (`adapter`)."""
        names = {"teacher_embed": f"{adapter.embed}.weight", "teacher_final_norm": f"{adapter.final_norm}.weight"}
        if not self.tied:
            names["teacher_lm_head"] = names["teacher_embed"] if self.teacher_head_shared else f"{adapter.lm_head}.weight"
        modules = {"q": adapter.attn + ".q_proj", "k": adapter.attn + ".k_proj", "v": adapter.attn + ".v_proj",
                   "o": adapter.attn + ".o_proj", "gate": adapter.mlp + ".gate_proj", "up": adapter.mlp + ".up_proj",
                   "down": adapter.mlp + ".down_proj", "input_norm": adapter.input_norm,
                   "post_norm": adapter.post_norm, "q_norm": adapter.attn + ".q_norm",
                   "k_norm": adapter.attn + ".k_norm"}  # fmt: skip
        for index, frozen in enumerate(self.teacher_layers):
            prefix = f"{adapter.layers}.{index}."
            owned = [n for n in _TEACHER_TENSORS] + (["q_norm", "k_norm"] if frozen.has_qk_norm else [])
            for name in owned:
                names[f"layers.{index}.teacher.{name}"] = prefix + modules[name] + ".weight"
            for name in frozen.bias_names:
                names[f"layers.{index}.teacher.{name}_bias"] = prefix + modules[name] + ".bias"
        return names

    def norm_weights(self) -> list[nn.Parameter]:
        return [w for layer in self.layers for w in (layer.input_norm, layer.post_norm)] + [self.final_norm]

    @torch.no_grad()
    def set_identity(self) -> None:
        """P = I and student norms = teacher norms (needs d_S = d_T): the student then is the teacher."""
        assert self.d_student == self.d_teacher, "identity projections need hidden_size == teacher hidden size"
        eye = torch.eye(self.d_teacher)
        for p in self.projections():
            p.copy_(eye)
        for layer, frozen in zip(self.layers, self.teacher_layers):
            layer.input_norm.copy_(frozen.input_norm)
            layer.post_norm.copy_(frozen.post_norm)
        self.final_norm.copy_(self.teacher_final_norm)

    # ------------------------------------------------------------------------------------------------
    # weight generation
    # ------------------------------------------------------------------------------------------------

    def layer_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Student weights of layer `index` ([out, in] like nn.Linear), biases under `<name>_bias`."""
        return self.layers[index].layer_weights()

    def embedding_weight(self) -> torch.Tensor:
        """E^S = E^T P_e  [V, S]."""
        return _mm(self.teacher_embed, self.proj_embed)

    def head_weight(self) -> torch.Tensor:
        """The student's output head [V, S]: E^S when tied, else W^T_lm P_lm."""
        if self.tied:
            return self.embedding_weight()
        return _mm(self.teacher_lm_head, self.proj_lm_head)

    def generate_weights(self) -> StudentWeights:
        """Every weight a forward reads (see `StudentWeights`), with the graph back to the parameters."""
        layers = [layer.generate() for layer in self.layers]
        return StudentWeights(layers, self.proj_embed, self.final_norm, self.head_weight())

    # ------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids_BT: torch.Tensor | None = None,
        attention_mask_BT: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
        clone_positions_BP: torch.Tensor | None = None,
        clone_layers: list[int] | None = None,
        document_mask: bool = False,
        o_space: str = "student",
        teacher_acts: dict[str, torch.Tensor] | None = None,
        teacher_ms: dict[str, torch.Tensor] | None = None,
        weights: StudentWeights | None = None,
        logits: bool = True,
        generate_weights: bool = False,
    ) -> StudentOutput | StudentWeights:
        """Student logits and, at `clone_positions_BP` of `clone_layers`, the seven clone activations.

        Args:
            input_ids_BT: token ids.
            attention_mask_BT: 1 for real tokens, 0 for padding.
            position_ids_BT: RoPE positions (default 0..T-1); with `document_mask`, a 0 starts a document.
            clone_positions_BP: positions at which activations are returned (None: no activations).
            clone_layers: layers whose activations are returned (None: all, when positions are given).
            document_mask: forbid attention across packed-document boundaries.
            o_space: `student` returns a_S for the o term; `teacher` returns W^T_o applied to the student's
                attention context (the official code's variant), compared with a_T in teacher space.
            teacher_acts: the batch's cached teacher activations at the same positions and layers:
                `input`, `attn` [B, L, P, D] (residuals; targets recomputed with the teacher's weights)
                or the seven terms [B, L, P, W] (the targets). Returned in `targets`.
            teacher_ms: term -> [L] teacher-space mean squares of the targets (fixed clone normalisers);
                returned in `target_ms` in the space each term is compared in.
            weights: the weights to run on (`generate_weights`, or its `detached` copy); None generates them.
            logits: return the logits; False returns the final normed hidden state and the head instead,
                for the fused head + loss (no [B, T, V] tensor).
            generate_weights: return `generate_weights()` and nothing else (the call that generates the
                weights once per optimizer step goes through the wrapped student, so DDP syncs its backward).
        """
        if generate_weights:
            return self.generate_weights()
        batch, tokens = input_ids_BT.shape
        device = input_ids_BT.device
        rope_positions = position_ids_BT
        if rope_positions is None:
            assert not document_mask, "document masking needs position ids (0 starts a document)"
            rope_positions = torch.arange(tokens, device=device).expand(batch, -1)
        mask = attention_bias(
            attention_mask_BT, position_ids_BT, tokens, device, document_mask=document_mask,
            sliding_window=self.sliding_window,
        )  # fmt: skip
        want = set()
        if clone_positions_BP is not None:
            want = set(range(self.num_layers) if clone_layers is None else clone_layers)
        slot = {index: j for j, index in enumerate(sorted(want))}  # layer -> its row in the cached [B, L, ...]
        results: list[dict] = []

        h = _mm(self.teacher_embed[input_ids_BT], weights.proj_embed if weights is not None else self.proj_embed)
        rope = self.rotary(h, rope_positions)
        for index, layer in enumerate(self.layers):
            clone = None
            if index in want:
                clone = _CloneRequest(clone_positions_BP, o_space)
                if teacher_acts is not None:
                    clone.teacher_acts = {k: v[:, slot[index]] for k, v in teacher_acts.items()}
                    if teacher_ms is not None:
                        clone.teacher_ms = {k: v[slot[index]] for k, v in teacher_ms.items()}
            h, result = layer(h, rope, mask, None if weights is None else weights.layers[index], clone)
            if result:
                results.append(result)
        final_norm, head = (self.final_norm, self.head_weight()) if weights is None else (weights.final_norm, weights.head)
        h = rms_norm(h, final_norm, self.eps)
        out = StudentOutput(h @ head.t() if logits else None, teacher_head_VD=self.teacher_head())
        if not logits:
            out.hidden_BTS, out.head_weight_VS = h, head
        if results:
            out.acts = {m: torch.stack([r["acts"][m] for r in results]) for m in CLONE_TERMS}
            if teacher_acts is not None:
                out.targets = {m: torch.stack([r["targets"][m] for r in results]) for m in CLONE_TERMS}
                if teacher_ms is not None:
                    out.target_ms = {k: torch.stack([r["target_ms"][k] for r in results]) for k in teacher_ms}
        return out

    def checkpoint_layers(self, enabled: bool = True) -> None:
        """`train.activation_checkpointing`: every decoder layer keeps only its input for the backward and
        recomputes the rest, its generated weights included, there (one layer's activations and weights
        at a time instead of all of them, for about one more forward of compute)."""
        for layer in self.layers:
            layer.checkpointing = enabled

    def compile_layers(self, **options) -> None:
        """`train.compile`: run the decoder layer through `torch.compile`, one graph for all layers (they
        take tensors of the same shapes, so one compilation serves them all). Not the whole forward:
        torch 2.13's CPU inductor drops the gradients of the clone activations there (zero gradients
        for P_o when only the o term is trained), which the per-layer graph does not."""
        compiled = torch.compile(decoder_layer, **options)
        for layer in self.layers:
            layer.decoder = compiled

    # ------------------------------------------------------------------------------------------------
    # clone targets
    # ------------------------------------------------------------------------------------------------

    def teacher_head(self) -> torch.Tensor:
        """The teacher's output head [V, D] (its embedding when tied)."""
        return self.teacher_embed if self.tied else self.teacher_lm_head

    def teacher_targets_from_residual(self, index: int, h_BPD: torch.Tensor, a_BPD: torch.Tensor) -> dict:
        """All seven teacher clone targets of layer `index` from its input h_i and attention output a_T."""
        return self.layers[index].teacher_targets_from_residual(h_BPD, a_BPD)


def decoder_layer(geometry: _Geometry, w: dict, frozen: dict, h_BTS: torch.Tensor, rope: tuple, mask,
                  o_space: str | None):  # fmt: skip
    """One decoder layer with weights `w` (`StudentWeights.layers[i]`) and teacher tensors `frozen`
    (`_FrozenLayer.tensors`) on the residual stream; returns the new stream and, when `o_space` is
    given (a clone layer), its seven clone activations at every token (term -> [B, T, W])."""
    batch, tokens, _ = h_BTS.shape
    g = geometry
    (cos, sin), scale = rope, g.head_dim**-0.5
    x = rms_norm(h_BTS, w["input_norm"], g.eps)
    q = _linear(x, w["q"], w.get("q_bias"))
    k = _linear(x, w["k"], w.get("k_bias"))
    v = _linear(x, w["v"], w.get("v_bias"))
    q_h = q.view(batch, tokens, g.num_heads, g.head_dim)
    k_h = k.view(batch, tokens, g.num_kv_heads, g.head_dim)
    if "q_norm" in frozen:
        q_h = rms_norm(q_h, frozen["q_norm"].to(q.dtype), g.eps)
        k_h = rms_norm(k_h, frozen["k_norm"].to(k.dtype), g.eps)
    q_h = apply_rope(q_h.transpose(1, 2), cos, sin)
    k_h = apply_rope(k_h.transpose(1, 2), cos, sin)
    v_h = v.view(batch, tokens, g.num_kv_heads, g.head_dim).transpose(1, 2)
    ctx = attention(q_h, k_h, v_h, mask, scale)
    a = _linear(ctx, w["o"], w.get("o_bias"))
    h = h_BTS + a
    x2 = rms_norm(h, w["post_norm"], g.eps)
    gate = _linear(x2, w["gate"], w.get("gate_bias"))
    up = _linear(x2, w["up"], w.get("up_bias"))
    f = _linear(swiglu(gate, up), w["down"], w.get("down_bias"))
    h = h + f
    if o_space is None:
        return h, {}
    a_out = _linear(ctx, frozen["o"].to(ctx.dtype), frozen.get("o_bias")) if o_space == "teacher" else a
    return h, dict(zip(CLONE_TERMS, (q, k, v, a_out, gate, up, f)))


def build_student(teacher_model: nn.Module, cfg, device: torch.device | str | None = None) -> LRCStudent:
    """An LRC student from a `StudentConfig` (random init; PCA init is applied on top by the caller,
    which has the data: see `student.init.init_pca`). Refuses a size that could not be exported, and a tied
    head over a teacher whose head is not tied (its head is not its embedding, so E^S could not stand in).
    `device`: see `LRCStudent`."""
    check_exportable(teacher_model.config, cfg.hidden_size)
    student = LRCStudent(teacher_model, cfg.hidden_size, cfg.init_std, cfg.seed, untie_head=cfg.head == "untied",
                         device=device)  # fmt: skip
    if cfg.head == "tied" and not student.tied:
        raise ConfigError(
            "student.head=tied needs a teacher whose output head is tied to its embedding "
            f"(tie_word_embeddings); this {student.teacher_config.model_type} teacher's is not: "
            "use student.head=auto or untied"
        )
    return student
