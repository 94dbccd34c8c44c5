"""One shard as a WebDataset tar: one sample per sequence, one ``.npy`` member per stored array.

Members are named ``<key>.<array>.<suffix>`` with ``key = f"{global_sequence_index:010d}"``,
``array`` a field name (or a per-row companion: ``<field>__scale`` for float8 and int4, ``<field>__max``
for log8) and ``suffix`` ``npy``, ``npy.zst``
or ``npy.blosc`` depending on the field's codec (see `compression.py`). Each member holds that one
sequence's slice, so ``webdataset.WebDataset`` yields one sample per sequence and plain
``tarfile`` + ``numpy`` (+ ``numcodecs`` for compressed members) can read it.

Written with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644, USTAR headers) in sorted
member order, so a rebuild is byte-identical. Reading is defensive: no unpickling, no extraction to
disk, and any member that is not a regular file with a plain ``<key>.<known array>.<suffix>`` name is
refused with an error naming the tar and the member.
"""

from __future__ import annotations

import io
import math
import re
import tarfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrc_offline.cache.compression import compress_npy, decompress_npy, npy_suffix
from lrc_offline.cache.dtypes import decode_fields, encode, stored_arrays
from lrc_offline.cache.schema import CacheFormatError, FieldSpec

__all__ = ["KEY_DIGITS", "ShardSink", "member_name", "write_to_dir", "read", "read_objects", "layout_problems",
           "layout_reads"]

KEY_DIGITS = 10
"""Digits of a sample key (the global sequence index, zero-padded)."""

_MEMBER = re.compile(r"^(\d{%d})\.([A-Za-z0-9_]+)(\.npy(?:\.zst|\.blosc)?)$" % KEY_DIGITS)


def member_name(sequence_index: int, array_name: str, codec: str) -> str:
    """Tar member name of one sequence's slice of a stored array."""
    return f"{sequence_index:0{KEY_DIGITS}d}.{array_name}{npy_suffix(codec)}"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    info.type = tarfile.REGTYPE
    return info


class ShardSink:
    """Writes one shard as a new tar file at `path`, batch by batch: each row's members are compressed
    and appended as it arrives, so memory is one batch whatever the shard's size.

    Args:
        path: Tar file to create; it must not exist.
        specs: The cache's fields.
        first_sequence: Global index of the shard's first sequence (the first sample key).
        num_sequences: Rows the shard will hold.
    """

    def __init__(self, path: str | Path, specs: Sequence[FieldSpec], first_sequence: int, num_sequences: int) -> None:
        self.specs, self.num_sequences, self._next = tuple(specs), num_sequences, first_sequence
        self._first = first_sequence
        self._file = open(path, "xb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.field_bytes = {spec.name: 0 for spec in self.specs}

    def write(self, arrays: dict[str, torch.Tensor]) -> None:
        """Append rows: field name -> tensor [b, *spec.shape], already checked by `dtypes.check_input`."""
        encoded = {spec.name: encode(spec, arrays[spec.name]) for spec in self.specs}
        for i in range(int(next(iter(arrays.values())).shape[0])):
            # Sorted names within a fixed-width key give a globally sorted tar with each sample contiguous.
            members = sorted(
                (member_name(self._next, name, spec.codec), spec, array[i])
                for spec in self.specs
                for name, array in encoded[spec.name].items()
            )
            for name, spec, array in members:
                data = compress_npy(array, spec.codec)
                self._tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                self.field_bytes[spec.name] += len(data)
            self._next += 1

    def close(self) -> dict[str, int]:
        """Finish the tar; returns stored bytes per field (the sum of its members' sizes)."""
        assert self._next - self._first == self.num_sequences, f"{self._next - self._first} of {self.num_sequences} rows"
        self._tar.close()
        self._file.close()
        return self.field_bytes

    def abort(self) -> None:
        """Close the file without finishing it (the caller removes it)."""
        self._file.close()


def write_to_dir(
    path: str | Path, arrays: dict[str, torch.Tensor], specs: Sequence[FieldSpec], first_sequence: int
) -> dict[str, int]:
    """Write one whole shard as a new tar file at `path` (see `ShardSink`).

    Returns:
        Stored bytes per field: the sum of its members' sizes (tar headers not counted).
    """
    sink = ShardSink(path, specs, first_sequence, int(next(iter(arrays.values())).shape[0]))
    try:
        sink.write(arrays)
        return sink.close()
    except BaseException:
        sink.abort()
        raise


def _check_member(member: tarfile.TarInfo, where: str) -> None:
    name = member.name
    if name.startswith("/") or "/" in name or "\\" in name or ".." in name:
        raise CacheFormatError(f"{where}: refusing member with a path in its name (only flat names are written)")
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise CacheFormatError(f"{where}: refusing member that is not a regular file (link, directory or device)")


def read(
    path: str | Path, specs: Sequence[FieldSpec], fields: Sequence[str] | None = None, first_sequence: int | None = None
) -> dict[str, torch.Tensor]:
    """Read a whole shard, decoded to logical dtypes (float8, int4, log8 -> float32).

    Every member is checked (name, type, field, suffix) even when its field is not requested; only
    requested fields are decompressed.

    Args:
        path: The shard's tar file.
        specs: The cache's fields.
        fields: Names to read (default: all).
        first_sequence: When given, the first sample key must equal it.

    Raises:
        CacheFormatError: an unsafe, unknown, duplicate, missing or malformed member, or keys that are
            not one contiguous run; the message names the tar and the member.
    """
    try:
        file = open(path, "rb")
    except OSError as err:
        raise CacheFormatError(f"{path}: not a readable tar ({err})") from err
    with file:
        return _read_tar(file, str(path), specs, fields, first_sequence)


def read_objects(
    objects: dict[str, bytes], where: str, specs: Sequence[FieldSpec], fields: Sequence[str] | None = None,
    first_sequence: int | None = None,
) -> dict[str, torch.Tensor]:
    """`read` from the tar's bytes held in memory (``objects`` = {"": bytes}, as the cache reader fetches a
    shard whole from object storage and checks it); `where` names the shard in errors."""
    (data,) = objects.values()
    return _read_tar(io.BytesIO(data), where, specs, fields, first_sequence)


def layout_reads(name: str) -> bool:
    """Whether `layout_problems` reads the object `name` (a path inside the shard): the tar itself ('')."""
    return name == ""


def layout_problems(
    listed: Collection[str], read: Callable[[str], bytes], where: str, specs: Sequence[FieldSpec],
    fields: Sequence[str] | None, first_sequence: int, num_sequences: int,
) -> list[str]:
    """What the shard's layout needs that is not there: the tar named in its completion record, and in
    it a member for every sequence in [first_sequence, first_sequence + num_sequences) and every stored
    array of `fields` (default: all). Only the members' headers are read.

    Args:
        listed: Paths inside the shard its completion record names ('' for the tar itself).
        read: The tar's bytes, already checked against the record.
        where: The shard's name, for messages.

    Returns:
        One message per problem, each naming the tar (and the member); [] when the layout is complete.
    """
    if "" not in listed:
        return [f"{where}: the tar is not in the completion record"]
    try:
        with tarfile.open(fileobj=io.BytesIO(read("")), mode="r:") as tar:
            present = set(tar.getnames())
    except (tarfile.TarError, OSError) as err:
        return [f"{where}: not a readable tar ({err})"]
    arrays = [(name, spec.codec) for spec in specs if fields is None or spec.name in fields
              for name, _, _ in stored_arrays(spec)]  # fmt: skip
    needed = (member_name(key, name, codec) for key in range(first_sequence, first_sequence + num_sequences)
              for name, codec in arrays)  # fmt: skip
    return [f"{where}: member {member!r} missing" for member in needed if member not in present]


def _read_tar(
    file: Any, path: str, specs: Sequence[FieldSpec], fields: Sequence[str] | None, first_sequence: int | None
) -> dict[str, torch.Tensor]:
    stored = {name: (spec, dtype, shape) for spec in specs for name, dtype, shape in stored_arrays(spec)}
    wanted = {s.name for s in specs if fields is None or s.name in fields}
    present, values = _read_members(file, path, stored, wanted)
    keys = _sample_keys(path, present, set(stored), first_sequence)

    def load(spec: FieldSpec) -> dict[str, np.ndarray]:
        return {name: np.stack([values[name][k] for k in keys]) for name, _, _ in stored_arrays(spec)}

    return decode_fields(specs, fields, load, where=lambda spec: f"{path}: field {spec.name}")


def _read_members(
    file: Any, path: str, stored: dict[str, tuple[FieldSpec, np.dtype, tuple[int, ...]]], wanted: set[str]
) -> tuple[dict[int, set[str]], dict[str, dict[int, np.ndarray]]]:
    """Checks every member of the tar and decompresses those of the `wanted` fields.

    Returns:
        (key -> stored array names present for that sample, stored array name -> key -> array), the
        second for the wanted fields' arrays only.
    """
    present: dict[int, set[str]] = {}
    values: dict[str, dict[int, np.ndarray]] = {n: {} for n, (spec, _, _) in stored.items() if spec.name in wanted}
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                where = f"{path}: member {member.name!r}"
                key, name = _parse_member(member, where, stored)
                if name in present.setdefault(key, set()):
                    raise CacheFormatError(f"{where}: duplicate member")
                present[key].add(name)
                if name in values:
                    values[name][key] = _load_member(tar, member, where, *stored[name])
    except (tarfile.TarError, OSError) as err:
        raise CacheFormatError(f"{path}: not a readable tar ({err})") from err
    return present, values


def _parse_member(
    member: tarfile.TarInfo, where: str, stored: dict[str, tuple[FieldSpec, np.dtype, tuple[int, ...]]]
) -> tuple[int, str]:
    """(sample key, stored array name) of a member that is a flat regular file with a known array's name
    and the suffix of that field's codec."""
    _check_member(member, where)
    match = _MEMBER.match(member.name)
    if match is None:
        raise CacheFormatError(f"{where}: not a <{KEY_DIGITS}-digit key>.<field>.npy[.zst|.blosc] name")
    key, name, suffix = int(match.group(1)), match.group(2), match.group(3)
    if name not in stored:
        raise CacheFormatError(f"{where}: unknown field {name!r}; this cache stores {sorted(stored)}")
    spec = stored[name][0]
    if suffix != npy_suffix(spec.codec):
        raise CacheFormatError(
            f"{where}: field {spec.name} uses codec {spec.codec}, expected suffix {npy_suffix(spec.codec)}"
        )
    return key, name


def _load_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, where: str, spec: FieldSpec, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray:
    """One member's array, checked to hold `dtype` values of `shape`."""
    data = tar.extractfile(member).read()
    array = decompress_npy(data, spec.codec, math.prod(shape) * dtype.itemsize, where)
    if array.dtype != dtype or array.shape != shape:
        raise CacheFormatError(f"{where}: holds {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}")
    return array


def _sample_keys(path: str, present: dict[int, set[str]], stored: set[str], first_sequence: int | None) -> list[int]:
    """The tar's sample keys in order, checked to be one contiguous run from `first_sequence` (when
    given) with every stored array present for each."""
    keys = sorted(present)
    if not keys:
        raise CacheFormatError(f"{path}: the tar holds no samples")
    if keys != list(range(keys[0], keys[0] + len(keys))):
        raise CacheFormatError(f"{path}: sample keys are not contiguous ({len(keys)} from {keys[0]} to {keys[-1]})")
    if first_sequence is not None and keys[0] != first_sequence:
        raise CacheFormatError(
            f"{path}: first sample is {keys[0]}, expected {first_sequence}; the shard was moved or renamed"
        )
    for key in keys:
        missing = sorted(stored - present[key])
        if missing:
            raise CacheFormatError(f"{path}: sample {key:0{KEY_DIGITS}d} lacks members for {missing}")
    return keys
