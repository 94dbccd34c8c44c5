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
    "quantize_log8",
    "dequantize_log8",
]

INT4_MAX = 7
"""Largest int4 code magnitude: a rotated row's max magnitude maps to it (codes are symmetric, -7..7)."""

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
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.full_like(codes[..., :1], 8)], dim=-1)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `quantize_int4`: float32 rows [..., width] from packed codes [..., ceil(width/2)] and
    scales [...]."""
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :width]
    codes = nibbles.to(torch.float32) - 8
    return unrotate(codes * scale.unsqueeze(-1))


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
