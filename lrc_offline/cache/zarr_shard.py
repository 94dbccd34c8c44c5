"""One shard as a Zarr v3 group: one array per stored field, chunked along the sequence axis.

Layout of ``shard-00000.zarr/``::

    zarr.json                      group; attributes lrc_offline_schema, first_sequence, num_sequences
    <field>/zarr.json              array [num_seqs, *shape]; attributes field, logical_dtype, codec, role
    <field>/c/<i>/0/...            chunks: a few whole sequences each
    <field>__scale/...             float8 fields only: float32 per-row scales [num_seqs, *shape[:-1]]

Shards are written whole and once (no appends), every chunk is written even when it equals the fill
value, and nothing time- or host-dependent goes into the files, so a rebuild is byte-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from lrc_offline.cache.compression import zarr_compressors
from lrc_offline.cache.dtypes import SCALE_SUFFIX, decode_fields, encode, stored_arrays
from lrc_offline.cache.schema import SCHEMA_VERSION, CacheFormatError, FieldSpec

__all__ = ["write_to_dir", "read", "chunk_sequences"]

_ALLOWED_CODECS = {"bytes", "blosc", "zstd"}
"""Codecs this format writes; anything else in a shard's metadata is refused before decoding."""

_CHUNK_TARGET_BYTES = 4 << 20
"""Uncompressed bytes aimed at per chunk: large enough for good compression and few files, small
enough that reading one sequence does not decode a whole shard."""


def chunk_sequences(per_sequence_shape: Sequence[int], itemsize: int, num_sequences: int) -> int:
    """Sequences per chunk for an array: about 4 MiB uncompressed, at least 1, at most the shard."""
    per_sequence = math.prod(per_sequence_shape) * itemsize
    return max(1, min(num_sequences, _CHUNK_TARGET_BYTES // max(per_sequence, 1)))


def _chunk_bytes(path: Path) -> int:
    """Bytes of an array's chunk files (its small zarr.json is left out, so ratios describe the data)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


def write_to_dir(
    path: str | Path, arrays: dict[str, torch.Tensor], specs: Sequence[FieldSpec], first_sequence: int
) -> dict[str, int]:
    """Write one shard as a new Zarr v3 group at `path`.

    Args:
        path: Directory to create; it must not exist.
        arrays: Field name -> tensor [n, *spec.shape], already checked by `dtypes.check_input`.
        specs: The cache's fields, in manifest order.
        first_sequence: Global index of the shard's first sequence (recorded in the group attributes).

    Returns:
        Stored bytes per field: the chunks of its value array and of any scale array.
    """
    path = Path(path)
    num_sequences = int(next(iter(arrays.values())).shape[0])
    group = zarr.open_group(
        store=str(path),
        mode="w-",
        zarr_format=3,
        attributes={
            "lrc_offline_schema": SCHEMA_VERSION,
            "first_sequence": first_sequence,
            "num_sequences": num_sequences,
        },
    )
    field_bytes = {}
    for spec in specs:
        stored = encode(spec, arrays[spec.name])
        for name, array in stored.items():
            role = "scale" if name.endswith(SCALE_SUFFIX) else "values"
            group.create_array(
                name,
                data=array,
                chunks=(chunk_sequences(array.shape[1:], array.dtype.itemsize, num_sequences), *array.shape[1:]),
                compressors=zarr_compressors(spec.codec),
                fill_value=0,
                attributes={"field": spec.name, "logical_dtype": spec.dtype, "codec": spec.codec, "role": role},
                # A chunk equal to the fill value would otherwise be skipped; its absence would then be
                # indistinguishable from a lost file, which verification must catch.
                config={"write_empty_chunks": True},
            )
        field_bytes[spec.name] = sum(_chunk_bytes(path / name) for name in stored)
    return field_bytes


def read(
    path: str | Path, specs: Sequence[FieldSpec], fields: Sequence[str] | None = None, first_sequence: int | None = None
) -> dict[str, torch.Tensor]:
    """Read a whole shard, decoded to logical dtypes (float8 -> float32).

    Args:
        path: The shard's ``.zarr`` directory.
        specs: The cache's fields.
        fields: Names to read (default: all).
        first_sequence: When given, the group's recorded first sequence must equal it.

    Raises:
        CacheFormatError: the group is missing, was written for other sequences, or an array does not
            match its spec; the message names the shard and the array.
    """
    path = Path(path)
    try:
        group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.BaseZarrError) as err:
        raise CacheFormatError(f"{path}: not a Zarr v3 group ({err})") from err
    attrs = dict(group.attrs)
    if first_sequence is not None and attrs.get("first_sequence") != first_sequence:
        raise CacheFormatError(
            f"{path}: holds sequences from {attrs.get('first_sequence')}, expected {first_sequence}; "
            "the shard was moved or renamed"
        )
    out = decode_fields(
        specs, fields, load=lambda spec: _load_arrays(group, spec, path), where=lambda spec: f"{path}/{spec.name}"
    )
    expected_n = attrs.get("num_sequences")
    for name, tensor in out.items():
        if tensor.shape[0] != expected_n:
            raise CacheFormatError(f"{path}/{name}: {tensor.shape[0]} sequences, group says {expected_n}")
    return out


def _load_arrays(group: zarr.Group, spec: FieldSpec, path: Path) -> dict[str, np.ndarray]:
    """The arrays storing `spec`, each checked (dtype, shape, only allowed codecs) before it is read."""
    stored = {}
    for name, dtype, shape in stored_arrays(spec):
        where = f"{path}/{name}"
        try:
            node = group[name]
        except KeyError as err:
            raise CacheFormatError(f"{where}: array missing from the shard") from err
        if not isinstance(node, zarr.Array) or np.dtype(node.dtype) != dtype or node.shape[1:] != shape:
            raise CacheFormatError(f"{where}: expected a {dtype} array [n, {', '.join(map(str, shape))}]")
        # Checked before touching the data, so a hand-edited shard cannot make us run an
        # arbitrary codec (numcodecs has pickle-based ones) on what it holds.
        codecs = {codec.to_dict()["name"] for codec in node.metadata.codecs}
        if not codecs <= _ALLOWED_CODECS:
            raise CacheFormatError(f"{where}: refusing codecs {sorted(codecs - _ALLOWED_CODECS)}")
        try:
            stored[name] = node[...]
        except Exception as err:  # codec errors surface as RuntimeError/ValueError variants
            raise CacheFormatError(f"{where}: cannot decode ({err}); run verify_cache") from err
    return stored
