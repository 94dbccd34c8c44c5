"""Writing and reading whole shards of a cache, safely under crashes, retries and parallel workers.

A shard is complete exactly when its completion record exists. A writer builds the shard under a
temporary name, flushes it, checksums it, renames it into place and only then writes the record, so a
crash at any point leaves either no record (the shard is rebuilt) or a complete shard. Shard i holds
sequences [i * S, min((i + 1) * S, num_sequences)), so workers can build any subset independently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lrc_offline.cache import wds_shard, zarr_shard
from lrc_offline.cache.dtypes import check_input
from lrc_offline.cache.manifest import Manifest, create_manifest, read_manifest
from lrc_offline.cache.records import (
    SHARDS_DIR,
    file_digests,
    fsync_tree,
    read_record,
    record_path,
    remove_path,
    sha256_file,
    shard_name,
)
from lrc_offline.cache.schema import CacheFormatError, FieldSpec
from lrc_offline.fsutil import TMP_PREFIX, temp_path, write_json_atomic

__all__ = ["CacheMismatchError", "CacheWriter", "CacheReader", "clean_stale"]

_FORMATS = {"zarr": zarr_shard, "webdataset": wds_shard}
_SHARD_DATA = re.compile(r"^shard-(\d+)\.(?:zarr|tar)$")


class CorruptShardError(CacheFormatError):
    """A complete shard's data no longer matches its completion record (changed, truncated or missing)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"{message}; run `lrc-cache verify`, then rebuild the shard (delete it and its record, "
                         "rerun lrc-cache build) or train with train.on_corrupt_shard=skip")
        self.index = index


class CacheMismatchError(ValueError):
    """An existing cache was built with a different manifest than the one requested."""


class _Layout:
    """What writer and reader share: the manifest, its fields and the shard arithmetic."""

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        self.root = Path(root)
        self._use(manifest)

    def _use(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.fields: tuple[FieldSpec, ...] = manifest.fields
        self.num_shards: int = manifest.num_shards
        self.format: str = manifest.format
        self.manifest_digest: str = manifest.digest()
        self._shard_format = _FORMATS[self.format]

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_shards:
            raise IndexError(f"shard index {index!r} out of range: {self.root} has shards 0..{self.num_shards - 1}")

    def shard_range(self, index: int) -> tuple[int, int]:
        """[first, end) global sequence indices of shard `index`."""
        self._check_index(index)
        per_shard = self.manifest.sequences_per_shard
        return index * per_shard, min((index + 1) * per_shard, self.manifest.num_sequences)

    def shard_path(self, index: int) -> Path:
        """Where shard `index`'s data lives (a .zarr directory or a .tar file)."""
        return self.root / SHARDS_DIR / shard_name(index, self.format)

    def is_complete(self, index: int) -> bool:
        """Whether shard `index` has a readable completion record."""
        self._check_index(index)
        try:
            return read_record(self.root, index, self.manifest_digest) is not None
        except CacheFormatError:
            return False


class CacheWriter(_Layout):
    """Creates a cache (or joins one being built) and writes whole shards.

    Args:
        root: Cache directory (created if needed).
        manifest: From `make_manifest`. If the cache exists, its manifest must agree (then `self.manifest`
            is the existing one).

    Raises:
        CacheMismatchError: the existing cache was built with a different manifest.
        PermissionError, OSError: `root` cannot be created or written; the message names the path.
    """

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        if not isinstance(manifest, Manifest):
            raise TypeError(f"manifest must be a Manifest (from make_manifest), got {type(manifest).__name__}")
        super().__init__(root, manifest)
        shards = self.root / SHARDS_DIR
        try:
            shards.mkdir(parents=True, exist_ok=True)
            created = create_manifest(self.root, manifest)
        except OSError as err:
            raise type(err)(
                err.errno, f"cannot write the cache at {self.root} ({err.strerror}); choose a writable "
                "output directory or fix its permissions", str(err.filename or self.root)
            ) from err
        if not created:
            existing = read_manifest(self.root)
            differences = existing.differences(manifest)
            if differences:
                raise CacheMismatchError(
                    f"{self.root} already holds a cache built with a different configuration:\n  "
                    + "\n  ".join(differences)
                    + "\nUse another output directory, or delete this one to rebuild it."
                )
            # Agreeing up to run options, the schema version and config keys added since (at their
            # defaults): keep writing under the existing manifest, so its complete shards stay complete.
            self._use(existing)

    def write_shard(
        self, index: int, arrays: dict[str, torch.Tensor], stats: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write shard `index` from whole-shard arrays and mark it complete.

        Args:
            index: Shard index in [0, num_shards).
            arrays: Exactly the manifest's fields, each a CPU tensor [n, *spec.shape] in its logical
                dtype (n = the shard's sequence count; float8 fields take float32/bf16 values).
            stats: JSON-ready numbers about the shard (e.g. teacher_entropy_mean), kept in the record.

        Returns:
            The completion record.
        """
        first, end = self.shard_range(index)
        where = f"shard {index} of {self.root}"
        if not isinstance(arrays, dict):
            raise TypeError(f"{where}: arrays must be a dict of field name -> tensor")
        expected = [s.name for s in self.fields]
        missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"{where}: arrays must hold exactly the manifest's fields {expected}; "
                f"missing {missing}, unexpected {unknown}"
            )
        checked = {s.name: check_input(s, arrays[s.name], end - first, where) for s in self.fields}
        stats = dict(stats or {})
        try:
            json.dumps(stats)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: stats must be JSON-serialisable (use float()/int() on tensors): {err}") from err

        final = self.shard_path(index)
        tmp = temp_path(final)
        try:
            field_bytes = self._shard_format.write_to_dir(tmp, checked, self.fields, first)
            fsync_tree(tmp)
            files = file_digests(tmp, f"{SHARDS_DIR}/{final.name}")
            # The old record (if any) describes files about to be replaced: drop it first, so a crash
            # from here on leaves the shard incomplete rather than wrongly complete.
            record_path(self.root, index).unlink(missing_ok=True)
            self._replace(tmp, final)
        except BaseException:
            remove_path(tmp)
            raise
        record = {
            "index": index,
            "manifest": self.manifest_digest,
            "first_sequence": first,
            "num_sequences": end - first,
            "num_tokens": (end - first) * self.manifest.config.seq_len,
            "files": files,
            "field_bytes": field_bytes,
            "stats": stats,
        }
        write_json_atomic(record_path(self.root, index), record)
        return record

    @staticmethod
    def _replace(tmp: Path, final: Path) -> None:
        if final.is_dir():
            # A directory cannot be atomically replaced: move the stale one aside, then delete it.
            trash = temp_path(final)
            final.rename(trash)
            tmp.rename(final)
            remove_path(trash)
        else:
            tmp.replace(final)
        # No directory fsync here: writing the record fsyncs shards/, which makes this rename durable too.


class CacheReader(_Layout):
    """Reads a cache: its manifest, completion records and whole shards.

    Args:
        root: Cache directory.

    Raises:
        FileNotFoundError, CacheFormatError: see `read_manifest`.
    """

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, read_manifest(root))

    def complete_shards(self) -> list[int]:
        """Indices of shards with a completion record (not checksummed: see `verify_cache`)."""
        return [i for i in range(self.num_shards) if self.is_complete(i)]

    def shard_record(self, index: int) -> dict[str, Any]:
        """Completion record of shard `index`.

        Raises:
            CacheFormatError: the shard is not complete (no record) or its record is damaged.
        """
        self._check_index(index)
        record = read_record(self.root, index, self.manifest_digest)
        if record is None:
            raise CacheFormatError(
                f"shard {index} of {self.root} is not complete (no {record_path(self.root, index).name}); "
                "build it, or read only complete_shards()"
            )
        return record

    def read_shard(self, index: int, fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Fields of every sequence of shard `index`, each [n, *shape] in its logical dtype (float8 -> float32).

        The uint16 field sampled_counts comes back as torch.uint16, which supports few ops: call
        ``.long()`` or ``.float()`` first.
        """
        record = self.shard_record(index)
        names = self.manifest.field_names
        if fields is not None:
            unknown = [f for f in fields if f not in names]
            if unknown:
                raise KeyError(f"fields {unknown} are not in the cache at {self.root}; it holds {list(names)}")
        self._check_files(index, record, fields)
        return self._shard_format.read(self.shard_path(index), self.fields, fields, record["first_sequence"])

    def _check_files(self, index: int, record: dict[str, Any], fields: Sequence[str] | None) -> None:
        """Refuse a shard whose files (those `fields` are read from) differ from its completion record.

        A file missing or truncated would read as zeros (Zarr fill values) or fail obscurely; a changed
        byte would decode into wrong numbers. Sizes, then sha256 (read at ~1 GB/s, far faster than
        training consumes a shard), before anything is decoded.

        Raises:
            CorruptShardError: naming the shard and the file.
        """
        shard = shard_name(index, self.format)
        for rel, info in record["files"].items():
            parts = rel.split("/")  # shards/<shard>.zarr/<field>/... or shards/<shard>.tar
            if fields is not None and len(parts) > 3 and parts[2] not in fields:
                continue  # a Zarr array this read does not open
            path = self.root / rel
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise CorruptShardError(index, f"{path}: missing or resized since {shard} was written")
            if sha256_file(path) != info["sha256"]:
                raise CorruptShardError(index, f"{path}: content differs from the checksum {shard} was recorded with")

    def iter_sequences(
        self, shards: Sequence[int] | None = None, fields: Sequence[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Per-sequence dicts of fields (plus ``sequence_index``), reading one whole shard at a time.

        Args:
            shards: Shard indices in order (default: every shard; incomplete ones raise, so pass
                ``complete_shards()`` to read a partial cache).
            fields: Field names (default: all).
        """
        for index in range(self.num_shards) if shards is None else shards:
            data = self.read_shard(index, fields)
            first, end = self.shard_range(index)
            for i in range(end - first):
                sample: dict[str, Any] = {name: tensor[i] for name, tensor in data.items()}
                sample["sequence_index"] = first + i
                yield sample


def clean_stale(root: str | Path) -> int:
    """Remove a crashed build's leftovers: temporary entries and shard data without a completion record.

    Run it only while no worker is writing to this cache: another worker's work in progress looks
    exactly like a crashed one's.

    Returns:
        Number of entries removed.
    """
    root = Path(root)
    shards = root / SHARDS_DIR
    removed = 0
    for entry in sorted(root.glob(TMP_PREFIX + "*")):  # an interrupted manifest creation
        remove_path(entry)
        removed += 1
    if not shards.is_dir():
        return removed
    for entry in sorted(shards.iterdir()):
        match = _SHARD_DATA.match(entry.name)
        orphan = match is not None and not record_path(root, int(match.group(1))).exists()
        if entry.name.startswith(TMP_PREFIX) or orphan:
            remove_path(entry)
            removed += 1
    return removed
