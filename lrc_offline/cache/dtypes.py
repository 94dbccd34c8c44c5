"""Logical dtypes and the plain arrays that store them.

Zarr and .npy know no bfloat16 or float8, so:

- ``bfloat16`` is stored as its raw 16 bits in a ``uint16`` array (``view``, no rounding): bit-exact.
- ``float8`` (lossy, opt-in) is stored as ``torch.float8_e4m3fn`` bits in a ``uint8`` array plus a
  companion ``<name>__scale`` float32 array with one scale per row (row = last axis), shape
  ``[n, *shape[:-1]]``. ``scale = max|row| / 448`` so the row's largest magnitude maps to 448, the
  largest e4m3fn value; decoding returns ``codes * scale`` in float32.

  Error bound (e4m3fn has 3 mantissa bits and subnormal spacing 2**-9), for an element x of a row whose
  largest magnitude is m, up to float32 rounding (~1e-7 relative):

  - relative to the row max: ``|decode(x) - x| <= m / 28`` (half the spacing 32 of the top binade
    [256, 448], over 448);
  - per element: ``|decode(x) - x| <= 2**-4 * |x| + 2**-10 * m / 448`` (half an ulp of a normal
    number is at most 2**-4 of it; below the normal range the absolute error is half the subnormal
    spacing, scaled back).

- ``int4`` (lossy, opt-in) is stored as uint8 bytes holding two 4-bit codes of the Hadamard-rotated row,
  ``[n, *shape[:-1], ceil(shape[-1] / 2)]``, plus a ``<name>__scale`` float32 array like float8's; it
  decodes to float32 within ``|decode(x) - x|_2 <= sqrt(R) * scale / 2`` per row (`quantize.py`).
- ``int4g`` (lossy, opt-in) is int4 with one scale per 64 rotated elements: the same packed codes plus a
  ``<name>__scale`` array of bfloat16 bits (uint16), shape ``[n, *shape[:-1], ceil(shape[-1] / 64)]``
  (`quantize.py`).
- ``log8`` (lossy, opt-in, for log-probs) is stored as uint8 codes of ``(row max - x) / (1/16)`` plus a
  ``<name>__max`` float32 array holding each row's max exactly, shape ``[n, *shape[:-1]]``; it decodes
  to float32 within 1/32 for values within 15.94 of the row max (`quantize.py`).

Every other logical dtype is stored as the same numpy dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from lrc_offline.cache.quantize import (
    INT4G_GROUP,
    dequantize_int4,
    dequantize_int4g,
    dequantize_log8,
    quantize_int4,
    quantize_int4g,
    quantize_log8,
)
from lrc_offline.cache.schema import ROW_CODED_DTYPES, CacheFormatError, FieldSpec

__all__ = [
    "FLOAT8_MAX",
    "SCALE_SUFFIX",
    "ROW_MAX_SUFFIX",
    "stored_arrays",
    "array_role",
    "logical_itemsize",
    "check_input",
    "encode",
    "decode",
    "decode_fields",
    "quantize_float8",
    "dequantize_float8",
]

FLOAT8_MAX = 448.0
"""Largest finite torch.float8_e4m3fn value; a row's max magnitude maps to it."""

SCALE_SUFFIX = "__scale"
"""Name suffix of the per-row scale array stored next to a float8 or int4 field."""

ROW_MAX_SUFFIX = "__max"
"""Name suffix of the per-row max array stored next to a log8 field."""

_COMPANION = {"float8": SCALE_SUFFIX, "int4": SCALE_SUFFIX, "int4g": SCALE_SUFFIX, "log8": ROW_MAX_SUFFIX}

_STORAGE = {
    "int32": np.dtype("int32"),
    "uint16": np.dtype("uint16"),
    "uint8": np.dtype("uint8"),
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype("uint16"),
    "float8": np.dtype("uint8"),
    "int4": np.dtype("uint8"),
    "int4g": np.dtype("uint8"),
    "log8": np.dtype("uint8"),
}
_TORCH = {
    "int32": torch.int32,
    "uint16": torch.uint16,
    "uint8": torch.uint8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8": torch.float32,
    "int4": torch.float32,
    "int4g": torch.float32,
    "log8": torch.float32,
}
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "uint16": (0, 2**16 - 1), "uint8": (0, 2**8 - 1)}
_ROW_CODED_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def stored_arrays(spec: FieldSpec) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, numpy dtype, per-sequence shape) of each array that stores `spec`, value array first."""
    shape = spec.shape
    if spec.dtype in ("int4", "int4g"):
        shape = (*shape[:-1], -(-shape[-1] // 2))  # two codes per byte
    arrays = [(spec.name, _STORAGE[spec.dtype], shape)]
    if spec.dtype == "int4g":  # bfloat16 bits, one per group of INT4G_GROUP
        arrays.append((spec.name + SCALE_SUFFIX, np.dtype("uint16"), (*spec.shape[:-1], -(-spec.shape[-1] // INT4G_GROUP))))
    elif spec.dtype in _COMPANION:
        arrays.append((spec.name + _COMPANION[spec.dtype], np.dtype("float32"), spec.shape[:-1]))
    return arrays


def array_role(name: str) -> str:
    """What a stored array holds, by its name: values, scale (float8, int4, int4g) or row_max (log8)."""
    if name.endswith(SCALE_SUFFIX):
        return "scale"
    return "row_max" if name.endswith(ROW_MAX_SUFFIX) else "values"


def logical_itemsize(dtype: str) -> float:
    """Bytes per element of a logical dtype before compression (float8 and log8: 1, int4 and int4g: 0.5;
    their scale companions not counted)."""
    return 0.5 if dtype in ("int4", "int4g") else _STORAGE[dtype].itemsize


def check_input(spec: FieldSpec, tensor: object, num_sequences: int, where: str) -> torch.Tensor:
    """Validate a writer's input array for `spec`; return it contiguous in its logical torch dtype.

    Integer fields accept any integer tensor whose values fit the logical dtype (capture code gets
    int64 ids from ``topk``); float fields must already be in their logical dtype, because a silent
    cast would change what was captured; float8, int4 and log8 fields take float32, bfloat16 or float16
    values, all finite (log8: a finite max per row, -inf allowed below it).

    Raises:
        TypeError: not a CPU tensor, or a dtype the field does not accept.
        ValueError: wrong shape, integers out of range, or values a row-coded field cannot represent.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where}: field {spec.name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise TypeError(f"{where}: field {spec.name} is on {tensor.device}; move it to the CPU (.cpu()) first")
    expected = (num_sequences, *spec.shape)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{where}: field {spec.name} has shape {tuple(tensor.shape)}, expected {expected}")
    if spec.dtype in _INT_RANGE:
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{where}: field {spec.name} must hold integers ({spec.dtype}), got {tensor.dtype}")
        if tensor.dtype != _TORCH[spec.dtype] and tensor.numel():
            low, high = _INT_RANGE[spec.dtype]
            wide = tensor.to(torch.int64)  # min/max are not implemented for every small integer dtype
            lo, hi = int(wide.min()), int(wide.max())
            if lo < low or hi > high:
                raise ValueError(
                    f"{where}: field {spec.name} has values in [{lo}, {hi}], outside {spec.dtype} [{low}, {high}]"
                )
            tensor = wide.to(_TORCH[spec.dtype])
    elif spec.dtype in ROW_CODED_DTYPES:
        if tensor.dtype not in _ROW_CODED_INPUTS:
            raise TypeError(
                f"{where}: {spec.dtype} field {spec.name} takes float32/bfloat16/float16, got {tensor.dtype}"
            )
        if spec.dtype == "log8":
            if bool(torch.isnan(tensor).any() | (tensor == float("inf")).any()):
                raise ValueError(f"{where}: log8 field {spec.name} holds nan or +inf, which are not log-probs")
            if tensor.numel() and not bool(torch.isfinite(tensor.amax(dim=-1)).all()):
                raise ValueError(f"{where}: log8 field {spec.name} has a row of -inf only; its max must be finite")
        elif not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{where}: {spec.dtype} field {spec.name} holds inf or nan, which a scale cannot represent"
            )
    elif tensor.dtype != _TORCH[spec.dtype]:
        raise TypeError(
            f"{where}: field {spec.name} must be {_TORCH[spec.dtype]} (cache dtype {spec.dtype}), got "
            f"{tensor.dtype}; cast it in the capture code so the precision loss is explicit"
        )
    return tensor.contiguous()


def quantize_float8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8_e4m3fn codes (as uint8) and float32 scales of `x` [..., R]; see the module bound."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / FLOAT8_MAX
    # An all-zero row (or one so tiny its scale underflows) gets scale 1: its codes are all zero anyway.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # The clamp guards x/scale landing a float32 ulp above 448, which e4m3fn would turn into NaN.
    codes = (x / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8), scale.squeeze(-1)


def dequantize_float8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_float8`: float32 values from uint8 codes [..., R] and scales [...]."""
    return codes.view(torch.float8_e4m3fn).float() * scale.unsqueeze(-1)


def encode(spec: FieldSpec, tensor: torch.Tensor) -> dict[str, np.ndarray]:
    """The arrays that store `tensor` (already checked by `check_input`), keyed by stored name."""
    if spec.dtype == "int4g":
        codes, scale = quantize_int4g(tensor)
        return {spec.name: codes.numpy(), spec.name + SCALE_SUFFIX: scale.view(torch.int16).numpy().view(np.uint16)}
    if spec.dtype in _COMPANION:
        quantize = {"float8": quantize_float8, "int4": quantize_int4, "log8": quantize_log8}[spec.dtype]
        codes, companion = quantize(tensor)
        return {spec.name: codes.numpy(), spec.name + _COMPANION[spec.dtype]: companion.numpy()}
    if spec.dtype == "bfloat16":
        return {spec.name: tensor.view(torch.int16).numpy().view(np.uint16)}
    if spec.dtype == "uint16":
        return {spec.name: tensor.view(torch.int16).numpy().view(np.uint16)}
    return {spec.name: tensor.numpy()}


def decode(spec: FieldSpec, stored: dict[str, np.ndarray], where: str) -> torch.Tensor:
    """The logical tensor [n, *spec.shape] from its stored arrays (float8, int4, int4g and log8 decode to float32).

    Raises:
        CacheFormatError: a stored array is missing or has the wrong dtype or shape; names `where`.
    """
    arrays = {}
    num = None
    for name, dtype, shape in stored_arrays(spec):
        if name not in stored:
            raise CacheFormatError(f"{where}: array {name} is missing")
        array = np.ascontiguousarray(stored[name])
        if array.dtype != dtype or tuple(array.shape[1:]) != shape or array.ndim != len(shape) + 1:
            raise CacheFormatError(
                f"{where}: array {name} is {array.dtype}{list(array.shape)}, "
                f"expected {dtype}[n, {', '.join(map(str, shape))}]"
            )
        if num is not None and array.shape[0] != num:
            raise CacheFormatError(f"{where}: array {name} has {array.shape[0]} sequences, expected {num}")
        num = array.shape[0]
        arrays[name] = array
    values = arrays[spec.name]
    if spec.dtype == "int4g":
        scale = torch.from_numpy(arrays[spec.name + SCALE_SUFFIX].view(np.int16)).view(torch.bfloat16)
        return dequantize_int4g(torch.from_numpy(values), scale, spec.shape[-1])
    if spec.dtype in _COMPANION:
        codes, companion = torch.from_numpy(values), torch.from_numpy(arrays[spec.name + _COMPANION[spec.dtype]])
        if spec.dtype == "int4":
            return dequantize_int4(codes, companion, spec.shape[-1])
        return (dequantize_float8 if spec.dtype == "float8" else dequantize_log8)(codes, companion)
    if spec.dtype in ("bfloat16", "uint16"):
        # torch.from_numpy has no uint16 path on every supported version; go through int16 bits.
        return torch.from_numpy(values.view(np.int16)).view(_TORCH[spec.dtype])
    return torch.from_numpy(values)


def decode_fields(
    specs: Sequence[FieldSpec],
    fields: Sequence[str] | None,
    load: Callable[[FieldSpec], dict[str, np.ndarray]],
    where: Callable[[FieldSpec], str],
) -> dict[str, torch.Tensor]:
    """The logical tensors of the fields a shard read asks for, the last stage of both shard formats' `read`.

    Args:
        specs: The cache's fields; the result keeps their order.
        fields: Names to decode (None: all).
        load: A field's stored arrays by name (how they are read is the shard format's business);
            called once per requested field, in order.
        where: The field's place in the shard, for error messages.
    """
    out = {}
    for spec in specs:
        if fields is None or spec.name in fields:
            out[spec.name] = decode(spec, load(spec), where=where(spec))
    return out
