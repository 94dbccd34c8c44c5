"""Architecture adapters: one small table per supported family, and the frozen weights read through it.

An adapter names where the modules live and which family-specific pieces exist (q/k/v biases,
per-head q/k norms). Every family supported here shares the Llama decoder layout
(DESIGN section 1); families that differ only in these table entries need no code of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ArchAdapter",
    "ADAPTERS",
    "UnsupportedArchitectureError",
    "adapter_for",
    "LayerWeights",
    "TeacherWeights",
    "teacher_weights",
]


class UnsupportedArchitectureError(ValueError):
    """The teacher's architecture has no adapter."""


@dataclass(frozen=True)
class ArchAdapter:
    """Where a family keeps its modules, and which optional pieces it has."""

    family: str
    model_types: tuple[str, ...]
    qk_norm: bool = False
    """Per-head RMSNorm on q and k after the projection (Qwen3)."""
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_norm: str = "post_attention_layernorm"


ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", ("llama",)),
    "mistral": ArchAdapter("mistral", ("mistral",)),
    # Qwen2's q/k/v biases are read from the modules themselves (any family may carry biases).
    "qwen2": ArchAdapter("qwen2", ("qwen2",)),
    "qwen3": ArchAdapter("qwen3", ("qwen3",), qk_norm=True),
}


def adapter_for(config) -> ArchAdapter:
    """The adapter for a `transformers` config, or a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
                raise UnsupportedArchitectureError(
                    f"teacher activation {config.hidden_act!r} is not supported; LRC here assumes SiLU-gated MLPs"
                )
            return adapter
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise UnsupportedArchitectureError(
        f"teacher architecture model_type={model_type!r} is not supported; supported: {supported}"
    )


@dataclass
class LayerWeights:
    """One teacher decoder layer's frozen tensors (weights are [out, in], as in nn.Linear)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    biases: dict[str, torch.Tensor]
    """Biases that exist, keyed by projection name (q, k, v for Qwen2; any for attention_bias/mlp_bias)."""
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class TeacherWeights:
    """Every frozen teacher tensor LRC reads, plus the geometry it needs."""

    embed: torch.Tensor
    lm_head: torch.Tensor | None
    """None when the head is tied to the embedding."""
    final_norm: torch.Tensor
    layers: list[LayerWeights]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    sliding_window: int | None

    @property
    def hidden_size(self) -> int:
        return self.embed.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    @property
    def tied(self) -> bool:
        return self.lm_head is None


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def teacher_weights(model: nn.Module) -> TeacherWeights:
    """Read a `transformers` causal LM's weights through its adapter (the tensors are shared, not copied)."""
    config = model.config
    adapter = adapter_for(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layers = []
    for layer in _get(model, adapter.layers):
        attn, mlp = _get(layer, adapter.attn), _get(layer, adapter.mlp)
        linears = {
            "q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj,
        }  # fmt: skip
        biases = {n: m.bias.detach() for n, m in linears.items() if m.bias is not None}
        layers.append(
            LayerWeights(
                **{n: m.weight.detach() for n, m in linears.items()},
                input_norm=_get(layer, adapter.input_norm).weight.detach(),
                post_norm=_get(layer, adapter.post_norm).weight.detach(),
                biases=biases,
                q_norm=attn.q_norm.weight.detach() if adapter.qk_norm else None,
                k_norm=attn.k_norm.weight.detach() if adapter.qk_norm else None,
            )
        )
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return TeacherWeights(
        embed=_get(model, adapter.embed).weight.detach(),
        lm_head=None if tied else _get(model, adapter.lm_head).weight.detach(),
        final_norm=_get(model, adapter.final_norm).weight.detach(),
        layers=layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        sliding_window=getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None,
    )
