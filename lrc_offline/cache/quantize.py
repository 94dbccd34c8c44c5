"""Lossy per-row encodings behind the ``int4`` (activations) and ``log8`` (top-k log-probs) dtypes.

Both are specified exactly, so plain numpy can decode a cache (docs/cache_format.md has the recipe); a
row is the last axis, of width R.

``int4``: the row is rotated by a fixed random block Hadamard transform, ``y = H (s * x)``, where ``s``
is a ±1 vector of width R (`rotation_signs`) and ``H`` is block-diagonal with normalised Sylvester
Hadamard blocks of width B, the largest power of two dividing R (576 = 9 x 64, 2048 = 1 x 2048, 3072 = 3
x 1024). The rotation is orthogonal and ``H`` is symmetric, so its inverse is ``x = s * (H y)``. It
spreads a massive activation over its block, so the row's other values keep more of the 15 levels.
``y`` is then quantised per row: ``scale = max|y| / 7``, ``code = round(y / scale)`` in -7..7, stored as
``code + 8`` in a nibble, two per byte (element 2j in the low nibble, 2j+1 in the high one; an odd R
pads a zero code). Decoding returns float32 ``s * (H (code * scale))``.

  Error bound: each rotated element is off by at most ``scale / 2``, so per row
  ``|decode(x) - x|_2 <= sqrt(R) * scale / 2`` in the rotated basis and, the rotation being orthogonal,
  in the original one too; per element ``|decode(x) - x| <= sqrt(B) * scale / 2``. Since
  ``max|y| <= |x|_2``, the relative row error is at most ``sqrt(R) / 14``; for Gaussian-like rows it is
  about ``sqrt(2 ln R) / (7 sqrt(12))`` (12% at R = 576). Up to float32 rounding (~1e-6 of the row
  norm), for rows whose scale is a normal float32.

``int4g``: ``int4`` with one scale per group of ``INT4G_GROUP`` = 64 consecutive rotated elements instead
of one per row (the last group of a width that is not a multiple of 64 is shorter), so a group's 15
levels span its own range, not the row's largest block's: ``scale_g = max|y_g| / 7`` rounded up to the
next bfloat16 (stored as its 16 bits, so a group costs 2 bytes on top of its 32 bytes of codes),
``code = round(y / scale_g)`` in -7..7, packed as in int4. Decoding returns float32
``s * (H (code * scale_g))``.

  Error bound: each rotated element is off by at most ``scale_g / 2``, so per row
  ``|decode(x) - x|_2 <= sqrt(sum_g n_g scale_g^2) / 2`` (n_g the group's width), at most the int4 bound
  of the same row up to the bfloat16 rounding of the scales (a factor <= 1 + 2^-7).

``log8``: a row of log-probs keeps its maximum exactly (a float32 companion) and stores
``code = round((max - x) / LOG8_STEP)`` clipped to 0..255 as uint8; decoding returns float32
``max - code * LOG8_STEP``.

  Error bound: ``|decode(x) - x| <= LOG8_STEP / 2`` (1/32 nat: each probability within a factor
  ``e^(1/32)``, 3.2%) for every x within ``255 * LOG8_STEP`` (15.94 nats) of the row max, up to float32
  rounding (~2e-6 for |x| < 32). Values further below (-inf included) decode to ``max - 15.94``: a
  probability of at most ``e^-15.94 = 1.2e-7`` times the row's largest, always above the true one.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

__all__ = [
    "INT4_MAX",
    "LOG8_STEP",
    "LOG8_MAX_CODE",
    "rotation_signs",
    "rotation_block",
    "rotate",
    "unrotate",
    "quantize_int4",
    "dequantize_int4",
    "INT4G_GROUP",
    "quantize_int4g",
    "dequantize_int4g",
    "quantize_log8",
    "dequantize_log8",
]

INT4_MAX = 7
"""Largest int4 code magnitude: a rotated row's max magnitude maps to it (codes are symmetric, -7..7)."""

INT4G_GROUP = 64
"""Rotated elements per int4g scale."""

LOG8_STEP = 1 / 16
"""Spacing of log8 codes, in nats below the row max."""

LOG8_MAX_CODE = 255
"""Largest log8 code: values more than ``255 * LOG8_STEP`` below the row max are clipped to it."""

_SIGNS_KEY = "lrc_offline int4 signs"


def rotation_signs(width: int) -> torch.Tensor:
    """The ±1 vector [width] of the int4 rotation: bit i of the concatenated sha256 digests of
    ``f"lrc_offline int4 signs {width} {j}"`` for j = 0, 1, ... (little-endian bits within each byte);
    a set bit gives -1. Fixed forever: caches depend on it."""
    blocks = -(-width // 256)  # one sha256 digest gives 256 sign bits
    stream = b"".join(hashlib.sha256(f"{_SIGNS_KEY} {width} {i}".encode()).digest() for i in range(blocks))
    bits = np.unpackbits(np.frombuffer(stream, np.uint8), bitorder="little")[:width]
    return torch.from_numpy(1 - 2 * bits.astype(np.float32))


def rotation_block(width: int) -> int:
    """B, the Hadamard block of the int4 rotation: the largest power of two dividing `width`."""
    return width & -width


def _hadamard(x_NB: torch.Tensor) -> torch.Tensor:
    """Normalised Sylvester Hadamard transform over the last axis (a power of two), by butterflies."""
    block = x_NB.shape[-1]
    out, half = x_NB, 1
    while half < block:
        pairs = out.reshape(*x_NB.shape[:-1], block // (2 * half), 2, half)
        a, b = pairs.unbind(-2)
        out = torch.stack((a + b, a - b), dim=-2)
        half *= 2
    return out.reshape(x_NB.shape) / math.sqrt(block)


def _blockwise_hadamard(x_NR: torch.Tensor) -> torch.Tensor:
    width = x_NR.shape[-1]
    block = rotation_block(width)
    return _hadamard(x_NR.reshape(*x_NR.shape[:-1], width // block, block)).reshape(x_NR.shape)


def rotate(x_NR: torch.Tensor) -> torch.Tensor:
    """The int4 rotation ``H (s * x)`` of each row of `x_NR` [..., R], in float32."""
    return _blockwise_hadamard(x_NR.float() * rotation_signs(x_NR.shape[-1]))


def unrotate(y_NR: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`: ``s * (H y)``, in float32."""
    return _blockwise_hadamard(y_NR.float()) * rotation_signs(y_NR.shape[-1])


def quantize_int4(x_NR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes packed two per byte (uint8 [..., ceil(R/2)]) and float32 scales [...] of `x_NR` [..., R];
    see the module docstring for the layout and the error bound."""
    y = rotate(x_NR)
    scale = y.abs().amax(dim=-1, keepdim=True) / INT4_MAX
    # An all-zero row (or one so tiny its scale underflows) gets scale 1: its codes are all zero anyway.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (torch.round(y / scale).clamp(-INT4_MAX, INT4_MAX) + 8).to(torch.uint8)
    return _pack_nibbles(codes), scale.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `quantize_int4`: float32 rows [..., width] from packed codes [..., ceil(width/2)] and
    scales [...]."""
    return unrotate(_unpack_codes(packed, width) * scale.unsqueeze(-1))


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., R] -> bytes [..., ceil(R/2)], element 2j in the low nibble (odd R padded with 8)."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.full_like(codes[..., :1], 8)], dim=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def _unpack_codes(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `_pack_nibbles`: float32 codes -7..7 [..., width]."""
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :width]
    return nibbles.to(torch.float32) - 8


def _grouped(y_NR: torch.Tensor) -> torch.Tensor:
    """[..., R] -> [..., G, INT4G_GROUP], zero-padded to G = ceil(R / INT4G_GROUP) whole groups."""
    width = y_NR.shape[-1]
    groups = -(-width // INT4G_GROUP)
    padded = torch.nn.functional.pad(y_NR, (0, groups * INT4G_GROUP - width))
    return padded.reshape(*y_NR.shape[:-1], groups, INT4G_GROUP)


def _bfloat16_up(x: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 `x` rounded up to the next bfloat16 value, returned as bfloat16 (exact)."""
    bits = x.float().contiguous().view(torch.int32)
    up = (bits + 0xFFFF) & ~0xFFFF  # clear the 16 low bits after carrying any of them into bit 16
    return up.view(torch.float32).to(torch.bfloat16)


def quantize_int4g(x_NR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4g codes packed two per byte (uint8 [..., ceil(R/2)]) and bfloat16 scales [..., ceil(R/64)] of
    `x_NR` [..., R]; see the module docstring for the layout and the error bound."""
    width = x_NR.shape[-1]
    y_NGK = _grouped(rotate(x_NR))
    scale = _bfloat16_up(y_NGK.abs().amax(dim=-1) / INT4_MAX)
    # An all-zero group (or one so tiny its scale underflows) gets scale 1: its codes are all zero anyway.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(y_NGK / scale.float().unsqueeze(-1)).clamp(-INT4_MAX, INT4_MAX) + 8
    codes = codes.reshape(*x_NR.shape[:-1], -1)[..., :width].to(torch.uint8)
    return _pack_nibbles(codes), scale


def dequantize_int4g(packed: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `quantize_int4g`: float32 rows [..., width] from packed codes [..., ceil(width/2)] and
    bfloat16 scales [..., ceil(width/64)]."""
    y_NGK = _grouped(_unpack_codes(packed, width)) * scale.float().unsqueeze(-1)
    return unrotate(y_NGK.reshape(*packed.shape[:-1], -1)[..., :width])


def quantize_log8(x_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log8 codes (uint8 [..., K]) and float32 row maxima [...] of log-probs `x_NK` [..., K]; see the module
    docstring for the error bound. Every row needs a finite max; -inf below it is allowed (clipped)."""
    x = x_NK.float()
    top = x.amax(dim=-1, keepdim=True)
    codes = torch.round((top - x) / LOG8_STEP).clamp(0, LOG8_MAX_CODE).to(torch.uint8)
    return codes, top.squeeze(-1)


def dequantize_log8(codes: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_log8`: float32 log-probs [..., K] from codes [..., K] and row maxima [...]."""
    return top.unsqueeze(-1) - codes.to(torch.float32) * LOG8_STEP
