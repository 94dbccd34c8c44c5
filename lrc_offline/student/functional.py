"""The decoder-layer math shared by the LRC student and the teacher-target recomputation.

Written to match `transformers`' Llama-family forward exactly (fp32 RMSNorm, rotate-half RoPE,
grouped-query attention through `scaled_dot_product_attention`).

Legend: B batch, T tokens, H query heads, G key/value heads, K head_dim, D hidden size.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "apply_rope", "attention_bias", "attention", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as `transformers` computes it: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTK: torch.Tensor, cos_BTK: torch.Tensor, sin_BTK: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTK.unsqueeze(1), sin_BTK.unsqueeze(1)
    return x_BHTK * cos + _rotate_half(x_BHTK) * sin


def attention_bias(
    attention_mask_BT: torch.Tensor | None,
    position_ids_BT: torch.Tensor | None,
    num_tokens: int,
    device: torch.device,
    document_mask: bool = False,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """A boolean [B|1, 1, T, T] mask (True = may attend): causal, minus padded keys, optionally minus keys
    in earlier documents (position id 0 starts a document) and keys beyond a sliding window. None when
    plain causal attention is all that is needed, so `attention` can take the fused causal kernels.

    Every query may always attend to itself, so rows of padded queries stay finite.
    """
    windowed = sliding_window is not None and num_tokens > sliding_window
    if attention_mask_BT is None and not document_mask and not windowed:
        return None
    idx = torch.arange(num_tokens, device=device)
    allowed = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
    if windowed:
        allowed = allowed & (idx[:, None] - idx[None, :] < sliding_window)
    allowed = allowed[None, None]
    if attention_mask_BT is not None:
        allowed = allowed & attention_mask_BT.bool()[:, None, None, :]
    if document_mask:
        assert position_ids_BT is not None, "document masking needs position ids"
        doc_BT = torch.cumsum((position_ids_BT == 0).long(), dim=1)
        allowed = allowed & (doc_BT[:, None, :, None] == doc_BT[:, None, None, :])
    return allowed | torch.eye(num_tokens, dtype=torch.bool, device=device)[None, None]


@functools.cache
def _cpu_dispatch_below_hardware() -> bool:
    """The CPU has AVX-512 but ATen dispatches to a lower instruction set (ATEN_CPU_CAPABILITY)."""
    return torch.cpu._is_avx512_supported() and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _cpu_flash_fails(q: torch.Tensor) -> bool:
    """Whether torch's CPU flash attention would fail on `q`: its reduced-precision backward packs with
    AVX-512 VNNI chosen from the hardware, but is built for the instruction set ATen dispatches to, so
    under ATEN_CPU_CAPABILITY=default or avx2 on a CPU that has AVX-512 it raises (`pack_vnni2 is only
    supported when avx512 is supported`). The math kernel computes the same attention there."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and _cpu_dispatch_below_hardware()


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def attention(
    q_BHTK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Grouped-query attention (causal when `mask` is None); returns the context [B, T, H*K]."""
    num_heads, num_kv = q_BHTK.shape[1], k_BGTK.shape[1]
    kernel = _math_sdpa() if _cpu_flash_fails(q_BHTK) else contextlib.nullcontext()
    with kernel:
        ctx = F.scaled_dot_product_attention(q_BHTK, k_BGTK, v_BGTK, attn_mask=mask, is_causal=mask is None,
                                             scale=scale, enable_gqa=num_kv != num_heads)  # fmt: skip
    batch, _, tokens, head_dim = ctx.shape
    return ctx.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
