"""What a cache holds: the teacher geometry it was built for and the list of per-sequence fields.

The field list is a pure function of the cache config and the teacher geometry, so a reader can
rebuild it from a manifest and a writer can check that a capture produced exactly these arrays.

Legend for the shapes below: L = cache.seq_len, k = cache.topk, N = cache.num_draws, d = hidden size,
nl = number of activation layers, P = activation positions per sequence, q_w = num_heads * head_dim,
kv_w = num_kv_heads * head_dim, f = intermediate (FFN) size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lrc_offline.config import CacheConfig

__all__ = [
    "SCHEMA_VERSION",
    "LOGICAL_DTYPES",
    "ROW_CODED_DTYPES",
    "schema_for",
    "CODECS",
    "CacheFormatError",
    "TeacherGeometry",
    "FieldSpec",
    "cache_fields",
    "num_act_positions",
    "act_layers",
]

SCHEMA_VERSION = 4
"""Newest version of the on-disk layout this code reads and writes; readers refuse caches written with a
newer one. 2: the build's run options (batch size, device, dtype, backend, engine options) moved from the
manifest's ``config`` to ``build``; the shard data and records are as in 1, which stays readable (see
`manifest._legacy_digest`). 3: the int4 and log8 encodings (`quantize.py`). 4: the int4g encoding
(int4 with a scale per 64 rotated elements). A manifest records the lowest
version that describes it (2, or `schema_for` its fields), so a cache using neither stays at 2, readable
by older code, and older code refuses one that uses them by its version."""

LOGICAL_DTYPES = ("int32", "uint16", "uint8", "float32", "float16", "bfloat16", "float8", "int4", "int4g", "log8")
"""Dtypes a field may declare; bfloat16 is stored as integer bits, float8, int4, int4g and log8 as integer
codes with a companion array of scales (per row; int4g per 64 elements) or row maxima (see `dtypes.py`)."""

ROW_CODED_DTYPES = ("float8", "int4", "int4g", "log8")
"""Lossy dtypes coded per row (the last axis) with a companion array of scales or maxima; they decode to
float32."""

_SINCE_SCHEMA = {"int4": 3, "log8": 3, "int4g": 4}
"""Dtypes newer than schema 2, with the schema that introduced them."""

CODECS = (
    "blosc-zstd-shuffle",
    "blosc-zstd-bitshuffle",
    "blosc-zstd-noshuffle",
    "blosc-lz4-shuffle",
    "blosc-lz4-bitshuffle",
    "zstd",
    "none",
)
"""Compression codecs a field may declare (see `compression.py`)."""

# Default codec per field: blosc(zstd, clevel 3) with byte shuffle, and bit shuffle for sampled_ids, the
# one field where it compresses better. Higher clevels save little on activations, which dominate a
# cache's bytes, and encode much slower. Ratios per field and codec: benchmarks/README.md, "Codec choice".
_DEFAULT_CODEC = "blosc-zstd-shuffle"
_CODEC_OVERRIDES = {"sampled_ids": "blosc-zstd-bitshuffle"}


class CacheFormatError(ValueError):
    """A cache on disk (or a dict describing one) does not follow the format; the message says where."""


@dataclass(frozen=True)
class TeacherGeometry:
    """The teacher shapes a cache depends on (not the weights)."""

    hidden_size: int
    """d_T, width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int
    """Key/value heads (equal to num_heads without grouped-query attention)."""
    head_dim: int
    """Width of one head."""
    intermediate_size: int
    """FFN width (gate/up output)."""
    vocab_size: int
    """Rows of the teacher's output head."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CacheFormatError(f"TeacherGeometry.{f.name}={value!r} must be a positive integer")

    def to_dict(self) -> dict[str, int]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherGeometry:
        """Inverse of `to_dict`; unknown or missing keys raise `CacheFormatError`."""
        return cls(**_checked_keys(cls, data, "geometry"))


@dataclass(frozen=True)
class FieldSpec:
    """One array of the cache, described per sequence (a shard stores it as [num_seqs, *shape])."""

    name: str
    """Field name, e.g. "topk_ids"; letters, digits and underscores only."""
    shape: tuple[int, ...]
    """Shape of one sequence's slice."""
    dtype: str
    """Logical dtype, one of LOGICAL_DTYPES (what a reader gets back; the ROW_CODED_DTYPES decode to float32)."""
    codec: str
    """Compression codec, one of CODECS."""

    def __post_init__(self) -> None:
        # The name ends up in file and tar member names: keep it to a safe alphabet, and "__" is
        # reserved for companion arrays such as "<name>__scale".
        if not self.name or not self.name.replace("_", "a").isalnum() or not self.name.isascii():
            raise CacheFormatError(f"field name {self.name!r} must be letters, digits and underscores")
        if "__" in self.name:
            raise CacheFormatError(f"field name {self.name!r} must not contain '__' (reserved)")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s <= 0 for s in self.shape):
            raise CacheFormatError(f"field {self.name}: shape {self.shape} must have positive sizes")
        if self.dtype not in LOGICAL_DTYPES:
            raise CacheFormatError(f"field {self.name}: dtype {self.dtype!r} is not one of {list(LOGICAL_DTYPES)}")
        if self.codec not in CODECS:
            raise CacheFormatError(f"field {self.name}: codec {self.codec!r} is not one of {list(CODECS)}")
        if self.dtype in ROW_CODED_DTYPES and not self.shape:
            raise CacheFormatError(f"field {self.name}: {self.dtype} needs at least one axis (it is coded per row)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shape as a list)."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "codec": self.codec}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldSpec:
        """Inverse of `to_dict`; unknown or missing keys raise `CacheFormatError`."""
        kwargs = _checked_keys(cls, data, "field")
        return cls(**{**kwargs, "shape": tuple(kwargs["shape"])})


def _checked_keys(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CacheFormatError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:
        raise CacheFormatError(
            f"{where} {data!r}: missing keys {sorted(names - set(data))}, unknown keys {sorted(set(data) - names)}"
        )
    return dict(data)


def schema_for(fields: list[FieldSpec] | tuple[FieldSpec, ...]) -> int:
    """The oldest schema version that knows every field's dtype: 1, 3 with an int4 or log8 field, 4 with
    an int4g field."""
    return max([1, *(_SINCE_SCHEMA.get(spec.dtype, 1) for spec in fields)])


def num_act_positions(cfg: CacheConfig, seq_len: int) -> int:
    """P, the activation positions stored per sequence: cache.act_positions (auto resolved by
    `CacheConfig.num_act_positions`) capped at the sequence length."""
    return min(cfg.num_act_positions, seq_len)


def act_layers(cfg: CacheConfig, geometry: TeacherGeometry) -> list[int]:
    """Teacher layers whose activations are stored: cache.act_layers, or every layer when it is None.

    Raises:
        CacheFormatError: a layer is out of range or repeated, or the list is empty.
    """
    if cfg.act_layers is None:
        return list(range(geometry.num_layers))
    layers = list(cfg.act_layers)
    if not layers:
        raise CacheFormatError("cache.act_layers=[] stores no layer; use cache.activation_mode=none instead")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < geometry.num_layers:
            raise CacheFormatError(
                f"cache.act_layers contains {layer!r} but the teacher has {geometry.num_layers} layers; "
                f"use indices in 0..{geometry.num_layers - 1}"
            )
    if len(set(layers)) != len(layers):
        raise CacheFormatError(f"cache.act_layers={layers} repeats a layer; list each layer once")
    # Activations are stored, and compared with the student's, in ascending layer order.
    return sorted(layers)


def _field(name: str, shape: tuple[int, ...], dtype: str) -> FieldSpec:
    return FieldSpec(name, shape, dtype, _CODEC_OVERRIDES.get(name, _DEFAULT_CODEC))


def cache_fields(cfg: CacheConfig, geometry: TeacherGeometry) -> list[FieldSpec]:
    """The fields a cache built with `cfg` for a teacher of `geometry` holds, in a fixed order.

    Args:
        cfg: The cache config (modes, sizes, storage dtypes).
        geometry: The teacher's shapes.

    Returns:
        Field specs; every shard stores exactly these arrays.
    """
    L, d = cfg.seq_len, geometry.hidden_size
    fields = [_field("input_ids", (L,), "int32"), _field("position_ids", (L,), "int32")]
    if cfg.logit_mode == "topk":
        if cfg.topk > geometry.vocab_size:
            raise CacheFormatError(
                f"cache.topk={cfg.topk} exceeds the teacher's vocabulary ({geometry.vocab_size}); lower cache.topk"
            )
        fields += [
            _field("topk_ids", (L, cfg.topk), "int32"),
            _field("topk_logprobs", (L, cfg.topk), cfg.logprob_dtype),
        ]
    elif cfg.logit_mode == "sampled":
        N = cfg.num_draws
        if N > 65535:
            raise CacheFormatError(f"cache.num_draws={N} cannot be counted in uint16; use at most 65535")
        fields += [_field("sampled_ids", (L, N), "int32"), _field("sampled_counts", (L, N), "uint16")]
    elif cfg.logit_mode == "hidden":
        fields.append(_field("hidden", (L, d), cfg.act_dtype))
    if cfg.activation_mode == "none":
        return fields
    nl, P = len(act_layers(cfg, geometry)), num_act_positions(cfg, L)
    fields.append(_field("act_positions", (P,), "int32"))
    if cfg.activation_mode == "residual":
        widths = {"act_input": d, "act_attn": d}
    else:
        q_w = geometry.num_heads * geometry.head_dim
        kv_w = geometry.num_kv_heads * geometry.head_dim
        f = geometry.intermediate_size
        widths = {"act_q": q_w, "act_k": kv_w, "act_v": kv_w, "act_o": d, "act_gate": f, "act_up": f, "act_down": d}
    fields += [_field(name, (nl, P, width), cfg.act_dtype) for name, width in widths.items()]
    if cfg.act_fraction < 1:
        fields.append(_field("act_present", (1,), "uint8"))
    if cfg.act_layer_fraction < 1:
        fields.append(_field("act_layer_mask", (nl, P), "uint8"))
    return fields
