"""One shard as a Zarr v3 group: one array per stored field, chunked along the sequence axis.

Layout of ``shard-00000.zarr/``::

    zarr.json                      group; attributes lrc_offline_schema, first_sequence, num_sequences
    <field>/zarr.json              array [num_seqs, *shape]; attributes field, logical_dtype, codec, role
    <field>/c/<i>/0/...            chunks: a few whole sequences each
    <field>__scale/...             float8 and int4 fields only: float32 per-row scales [num_seqs, *shape[:-1]]
    <field>__max/...               log8 fields only: float32 per-row maxima [num_seqs, *shape[:-1]]

Every chunk is written once, whole (a shard is written chunk by chunk as batches arrive), every chunk is written even when it equals the fill
value, and nothing time- or host-dependent goes into the files, so a rebuild is byte-identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.buffer import cpu
from zarr.core.metadata.v3 import ArrayV3Metadata

from lrc_offline.cache.compression import zarr_compressors
from lrc_offline.cache.dtypes import array_role, decode_fields, encode, stored_arrays
from lrc_offline.cache.schema import SCHEMA_VERSION, CacheFormatError, FieldSpec

__all__ = ["ShardSink", "write_to_dir", "read", "read_objects", "layout_problems", "layout_reads", "chunk_sequences"]

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


class ShardSink:
    """Writes one shard as a new Zarr v3 group at `path`, batch by batch (rows in order).

    Arrays are created with the shard's full shape up front; rows are buffered per array until a whole
    chunk is filled, which is then compressed and written: memory is one chunk per array, whatever the
    shard's size, and every chunk is written once, whole, so the bytes equal a whole-shard write.

    Args:
        path: Directory to create; it must not exist.
        specs: The cache's fields, in manifest order.
        first_sequence: Global index of the shard's first sequence (recorded in the group attributes).
        num_sequences: Rows the shard will hold.
    """

    def __init__(self, path: str | Path, specs: Sequence[FieldSpec], first_sequence: int, num_sequences: int) -> None:
        self.path, self.specs, self.num_sequences = Path(path), tuple(specs), num_sequences
        group = zarr.open_group(
            store=str(self.path),
            mode="w-",
            zarr_format=3,
            attributes={
                "lrc_offline_schema": SCHEMA_VERSION,
                "first_sequence": first_sequence,
                "num_sequences": num_sequences,
            },
        )
        self._arrays: dict[str, zarr.Array] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        self._written: dict[str, int] = {}
        for spec in self.specs:
            for name, dtype, shape in stored_arrays(spec):
                self._arrays[name] = group.create_array(
                    name,
                    shape=(num_sequences, *shape),
                    dtype=dtype,
                    chunks=(chunk_sequences(shape, np.dtype(dtype).itemsize, num_sequences), *shape),
                    compressors=zarr_compressors(spec.codec),
                    fill_value=0,
                    attributes={
                        "field": spec.name, "logical_dtype": spec.dtype, "codec": spec.codec, "role": array_role(name)
                    },
                    # A chunk equal to the fill value would otherwise be skipped; its absence would then be
                    # indistinguishable from a lost file, which verification must catch.
                    config={"write_empty_chunks": True},
                )
                self._pending[name], self._written[name] = [], 0

    def write(self, arrays: dict[str, torch.Tensor]) -> None:
        """Append rows: field name -> tensor [b, *spec.shape], already checked by `dtypes.check_input`."""
        for spec in self.specs:
            for name, array in encode(spec, arrays[spec.name]).items():
                self._pending[name].append(np.ascontiguousarray(array))
                self._flush(name, final=False)

    def _flush(self, name: str, final: bool) -> None:
        target = self._arrays[name]
        chunk = target.chunks[0]
        buffered = sum(a.shape[0] for a in self._pending[name])
        while buffered >= chunk or (final and buffered):
            rows = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else self._pending[name][0]
            take = min(chunk, buffered) if final else chunk
            lo = self._written[name]
            target[lo : lo + take] = rows[:take]
            self._written[name] += take
            self._pending[name] = [rows[take:]] if take < rows.shape[0] else []
            buffered -= take

    def close(self) -> dict[str, int]:
        """Write the last partial chunks; returns stored bytes per field (its value and scale chunks)."""
        for name in self._arrays:
            self._flush(name, final=True)
            assert self._written[name] == self.num_sequences, f"{name}: {self._written[name]} of {self.num_sequences} rows"
        return {spec.name: sum(_chunk_bytes(self.path / name) for name, _, _ in stored_arrays(spec)) for spec in self.specs}


    def abort(self) -> None:
        """Stop without finishing (nothing is open; the caller removes the directory)."""


def write_to_dir(
    path: str | Path, arrays: dict[str, torch.Tensor], specs: Sequence[FieldSpec], first_sequence: int
) -> dict[str, int]:
    """Write one whole shard as a new Zarr v3 group at `path` (see `ShardSink`).

    Returns:
        Stored bytes per field: the chunks of its value array and of any scale array.
    """
    sink = ShardSink(path, specs, first_sequence, int(next(iter(arrays.values())).shape[0]))
    sink.write(arrays)
    return sink.close()


def read(
    path: str | Path, specs: Sequence[FieldSpec], fields: Sequence[str] | None = None, first_sequence: int | None = None
) -> dict[str, torch.Tensor]:
    """Read a whole shard, decoded to logical dtypes (float8, int4, log8 -> float32).

    Args:
        path: The shard's ``.zarr`` directory.
        specs: The cache's fields.
        fields: Names to read (default: all).
        first_sequence: When given, the group's recorded first sequence must equal it.

    Raises:
        CacheFormatError: the group is missing, was written for other sequences, or an array does not
            match its spec; the message names the shard and the array.
    """
    return _read_group(str(path), str(path), specs, fields, first_sequence)


def read_objects(
    objects: dict[str, bytes], where: str, specs: Sequence[FieldSpec], fields: Sequence[str] | None = None,
    first_sequence: int | None = None,
) -> dict[str, torch.Tensor]:
    """`read` from a shard's objects held in memory (path inside the shard -> bytes), e.g. fetched whole
    from object storage and checked against the completion record; `where` names the shard in errors."""
    store = zarr.storage.MemoryStore({key: cpu.Buffer.from_bytes(data) for key, data in objects.items()}, read_only=True)
    return _read_group(store, where, specs, fields, first_sequence)


def layout_reads(name: str) -> bool:
    """Whether `layout_problems` reads the object `name` (a path inside the shard): array metadata only."""
    return name.endswith("zarr.json")


def layout_problems(
    listed: Collection[str], read: Callable[[str], bytes], where: str, specs: Sequence[FieldSpec],
    fields: Sequence[str] | None, first_sequence: int, num_sequences: int,
) -> list[str]:
    """What the shard's layout needs that its completion record does not name: the group's metadata, and
    for each array of `fields` (default: all) its metadata and every chunk of its grid.

    Zarr reads a chunk that is not there as the fill value (zeros), so a record that lost a chunk's
    entry, with or without its file, would otherwise train on zeros without a word. The chunk keys
    come from each array's own metadata (shape, chunk grid, key encoding), its shape checked against
    the manifest's.

    Args:
        listed: Paths inside the shard (``input_ids/zarr.json``, ...) its completion record names.
        read: Bytes of one of the listed objects (only those `layout_reads` selects are asked for),
            already checked against the record.
        where: The shard's name, for messages.
        first_sequence: Unused (the group's attributes carry it); kept for one signature across formats.

    Returns:
        One message per problem, each naming the object; [] when the layout is complete.
    """
    problems = []
    if "zarr.json" not in listed:
        problems.append(f"{where}/zarr.json: the group's metadata is not in the completion record")
    for spec in specs:
        if fields is not None and spec.name not in fields:
            continue
        for name, _, shape in stored_arrays(spec):
            meta = f"{name}/zarr.json"
            if meta not in listed:
                problems.append(f"{where}/{meta}: the array's metadata is not in the completion record")
                continue
            try:
                metadata = ArrayV3Metadata.from_dict(json.loads(read(meta)))
            except (ValueError, TypeError, KeyError) as err:  # JSON and zarr's own validation errors
                problems.append(f"{where}/{meta}: not Zarr v3 array metadata ({err})")
                continue
            expected = (num_sequences, *shape)
            if tuple(metadata.shape) != expected:
                problems.append(f"{where}/{meta}: shape {list(metadata.shape)}, the manifest needs {list(expected)}")
                continue
            problems += [
                f"{where}/{name}/{key}: chunk not in the completion record"
                for key in (metadata.encode_chunk_key(c) for c in metadata.chunk_grid.all_chunk_coords(metadata.shape))
                if f"{name}/{key}" not in listed
            ]
    return problems


def _read_group(
    store: Any, path: str, specs: Sequence[FieldSpec], fields: Sequence[str] | None, first_sequence: int | None
) -> dict[str, torch.Tensor]:
    try:
        group = zarr.open_group(store=store, mode="r", zarr_format=3)
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


def _load_arrays(group: zarr.Group, spec: FieldSpec, path: str) -> dict[str, np.ndarray]:
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
