"""Writing and reading whole shards of a cache, safely under crashes, retries and parallel workers.

A shard is complete exactly when its completion record exists. A writer builds the shard under a
temporary name, chunk by chunk as batches arrive (`ShardWriter`), flushes it, checksums it, renames it
into place and only then writes the record, so a crash at any point leaves either no record (the shard
is rebuilt) or a complete shard. Shard i holds sequences [i * S, min((i + 1) * S, num_sequences)), so
workers can build any subset independently. The held-out split (`Manifest.heldout`) is sharded, written,
read and checked the same way under its own names (``shards/heldout-*``): a writer or reader is made for
one split.

On object storage (an fsspec URL; see `lrc_offline.storage`) there is no rename. The shard is written
to a local staging directory, its data objects are uploaded under their final names, and the record is
created last with a conditional put: the same single commit (`storage.Staging.commit`, which does either).
Objects no record names (a crashed upload) are invisible to readers, overwritten by a rebuild and removed
by `clean_stale`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lrc_offline.cache import wds_shard, zarr_shard
from lrc_offline.cache.dtypes import check_input, stored_arrays
from lrc_offline.cache.manifest import TRAIN, Manifest, create_manifest, read_manifest
from lrc_offline.cache.records import (
    SHARDS_DIR,
    DamagedRecordError,
    file_digests,
    check_record,
    read_record,
    record_name,
    shard_name,
)
from lrc_offline.cache.schema import CacheFormatError, FieldSpec
from lrc_offline.fsutil import TMP_PREFIX, json_bytes
from lrc_offline.storage import Location, StorageError, as_location

__all__ = ["CacheMismatchError", "CacheWriter", "ShardWriter", "CacheReader", "clean_stale", "temporaries"]

_FORMATS = {"zarr": zarr_shard, "webdataset": wds_shard}
_SHARD_DATA = re.compile(r"^(shard|heldout)-(\d+)\.(?:zarr|tar)$")


class CorruptShardError(CacheFormatError):
    """A complete shard's data no longer matches its completion record (changed, truncated or missing)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"{message}; run `lrc-cache verify`, then rebuild the shard (delete it and its record, "
                         "rerun lrc-cache build) or train with train.on_corrupt_shard=skip")
        self.index = index


class CacheMismatchError(ValueError):
    """An existing cache was built with a different manifest than the one requested."""


class _Layout:
    """What writer and reader share: the manifest, the fields and the shard arithmetic of one split of the
    cache (`manifest.TRAIN`, the training sequences, or `manifest.HELDOUT`, the held-out ones)."""

    def __init__(self, root: Location, manifest: Manifest, split: str = TRAIN) -> None:
        self.location = self.root = root  # `root` is kept for messages: str() is the path or URL
        self.split = split
        self._use(manifest)

    def _use(self, manifest: Manifest) -> None:
        layout = manifest.split(self.split)
        self.manifest = manifest
        self.fields: tuple[FieldSpec, ...] = layout.fields
        self.num_shards: int = layout.num_shards
        self.num_sequences: int = layout.num_sequences
        """Sequences of this split."""
        self.sequences_per_shard: int = layout.sequences_per_shard
        self.prefix: str = layout.prefix
        self.format: str = manifest.format
        self.manifest_digest: str = manifest.digest()
        self._shard_format = _FORMATS[self.format]

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_shards:
            raise IndexError(f"{self.prefix} index {index!r} out of range: {self.root} has {self.prefix} shards "
                             f"0..{self.num_shards - 1}")  # fmt: skip

    def shard_range(self, index: int) -> tuple[int, int]:
        """[first, end) sequence indices (within the split) of shard `index`."""
        self._check_index(index)
        per_shard = self.sequences_per_shard
        return index * per_shard, min((index + 1) * per_shard, self.num_sequences)

    def shard_name(self, index: int) -> str:
        """Where shard `index`'s data lives (a .zarr directory or a .tar file), relative to the root."""
        return f"{SHARDS_DIR}/{shard_name(index, self.format, self.prefix)}"

    def record_name(self, index: int) -> str:
        """Shard `index`'s completion record, relative to the root."""
        return record_name(index, self.prefix)

    def is_complete(self, index: int, check_sizes: bool = False) -> bool:
        """Whether shard `index` has a readable completion record (and, with `check_sizes`, every file
        it lists is there at its recorded size: one listing, no data read).

        The size check is what a build runs before skipping a shard: two workers building the same
        shard at once, one killed half way through replacing the other's files, can leave a record
        beside files that are not all its own; the build then rebuilds the shard.
        """
        self._check_index(index)
        try:
            record = read_record(self.location, index, self.manifest_digest, self.prefix)
        except CacheFormatError:
            return False
        if record is None or not check_sizes:
            return record is not None
        present = self.location.files(self.shard_name(index))
        return all(present.get(rel) == info["bytes"] for rel, info in record["files"].items())


class CacheWriter(_Layout):
    """Creates a cache (or joins one being built) and writes whole shards of one of its splits.

    Args:
        root: Cache directory (created if needed) or fsspec URL.
        manifest: From `make_manifest`. If the cache exists, its manifest must agree (then `self.manifest`
            is the existing one).
        storage_options: For a URL: the fsspec filesystem's options (no secrets; see `lrc_offline.storage`).
        split: The shards written: `manifest.TRAIN` or `manifest.HELDOUT` (`heldout_writer`).

    Raises:
        CacheMismatchError: the existing cache was built with a different manifest.
        PermissionError, OSError: `root` cannot be created or written; the message names the path.
        StorageError: the URL cannot be reached or written (missing bucket, refused credentials).
    """

    def __init__(
        self, root: str | Path | Location, manifest: Manifest, storage_options: dict | None = None, split: str = TRAIN
    ) -> None:
        if not isinstance(manifest, Manifest):
            raise TypeError(f"manifest must be a Manifest (from make_manifest), got {type(manifest).__name__}")
        super().__init__(as_location(root, storage_options), manifest, split)
        try:
            self.location.make_folder(SHARDS_DIR)
            created = create_manifest(self.location, manifest)
        except StorageError:
            raise
        except OSError as err:
            raise type(err)(
                err.errno, f"cannot write the cache at {self.root} ({err.strerror}); choose a writable "
                "output directory or fix its permissions", str(err.filename or self.root)
            ) from err
        if not created:
            existing = read_manifest(self.location)
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

    def open_shard(self, index: int) -> ShardWriter:
        """A writer for shard `index` that takes its sequences batch by batch (see `ShardWriter`).

        Temporaries a killed worker left for this shard are removed first: the shard is incomplete, so
        whatever they held is about to be rewritten. Another live worker's (two workers building the same
        shard at once) are left alone: both write their own and the last rename stands.
        """
        self._check_index(index)
        self.remove_stale(index)
        return ShardWriter(self, index)

    def remove_stale(self, index: int) -> int:
        """Remove the temporaries of shard `index` and of its record that killed writers left (a killed
        write, or a replaced shard not yet deleted); a live writer's are kept (`fsutil.is_stale_temporary`).
        Returns how many were removed."""
        return self.location.remove_abandoned_temporaries(f"{SHARDS_DIR}/{self.prefix}-{index:05d}.")

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
        if isinstance(arrays, dict) and set(arrays) == {s.name for s in self.fields}:
            # whole-shard arrays: each must hold the shard's every sequence
            arrays = {s.name: check_input(s, arrays[s.name], end - first, f"shard {index} of {self.root}")
                      for s in self.fields}  # fmt: skip
        with self.open_shard(index) as shard:
            shard.write(arrays)
            return shard.commit(stats)


class ShardWriter:
    """One shard being written, batch by batch: ``write`` rows in order, then ``commit``.

    Data goes to the location's staging path (`storage.Location.staging`: chunk by chunk, so memory holds
    one chunk, not the shard); ``commit`` checksums it, places it under its final name and writes the
    completion record last. Used as a context manager, leaving without a commit (an error, Ctrl-C) removes
    the staged data.
    """

    def __init__(self, cache: CacheWriter, index: int) -> None:
        self.cache, self.index = cache, index
        self.first, self.end = cache.shard_range(index)
        self.where = f"{cache.prefix} {index} of {cache.root}"
        self.final = cache.shard_name(index)
        self._stage = cache.location.staging(self.final)
        self.written = 0
        try:
            num = self.end - self.first
            self._sink = cache._shard_format.ShardSink(self._stage.path, cache.fields, self.first, num)
        except BaseException:
            self._stage.close()
            raise
        self._done = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()

    def write(self, arrays: dict[str, torch.Tensor]) -> None:
        """Append the next rows: exactly the manifest's fields, each a CPU tensor [b, *spec.shape] in its
        logical dtype (float8 fields take float32/bf16 values)."""
        if not isinstance(arrays, dict):
            raise TypeError(f"{self.where}: arrays must be a dict of field name -> tensor")
        expected = [s.name for s in self.cache.fields]
        missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"{self.where}: arrays must hold exactly the manifest's fields {expected}; "
                f"missing {missing}, unexpected {unknown}"
            )
        first = arrays[expected[0]]
        rows = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else -1
        if rows < 0 or self.written + rows > self.end - self.first:
            raise ValueError(
                f"{self.where}: {max(rows, 0)} more sequences would exceed the shard's "
                f"{self.end - self.first} (after {self.written})"
            )
        checked = {s.name: check_input(s, arrays[s.name], rows, self.where) for s in self.cache.fields}
        self._sink.write(checked)
        self.written += rows

    def commit(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the shard and mark it complete; returns the completion record."""
        stats = dict(stats or {})
        try:
            json.dumps(stats)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.where}: stats must be JSON-serialisable (use float()/int() on tensors): {err}") from err
        num = self.end - self.first
        if self.written != num:
            raise ValueError(f"{self.where}: holds {self.written} sequences, expected {num}")
        location = self.cache.location
        name = self.cache.record_name(self.index)
        try:
            field_bytes = self._sink.close()
            record = {
                "index": self.index,
                "manifest": self.cache.manifest_digest,
                "first_sequence": self.first,
                "num_sequences": num,
                "num_tokens": num * self.cache.manifest.config.seq_len,
                "files": file_digests(self._stage.path, self.final),
                "field_bytes": field_bytes,
                "stats": stats,
            }
            # The old record (if any) describes files about to be replaced: drop it first, so a crash
            # from here on leaves the shard incomplete rather than wrongly complete.
            location.remove(name)
            body = json_bytes(record)
            # Two workers that built the same shard may commit at once. Another's record that names the
            # same files (a deterministic build) stands for ours; one that differs is replaced together
            # with its objects (see `Staging.commit`). A worker killed while its first upload overwrites a
            # shard another has just committed leaves that record beside mixed objects: readers refuse it
            # by checksum, and a build's `is_complete(check_sizes=True)` rebuilds it.
            standing = self._stage.commit(name, body, keep=lambda existing: self._same_files(existing, record))
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._stage.close()
        return record if standing == body else json.loads(standing)

    def _same_files(self, existing: bytes, record: dict[str, Any]) -> bool:
        """Whether `existing`, another writer's record of this shard, is valid and names `record`'s files."""
        try:
            cache = self.cache
            theirs = check_record(existing, self.index, cache.manifest_digest, cache.location, cache.prefix)
        except CacheFormatError:
            return False
        return theirs["files"] == record["files"]

    def abort(self) -> None:
        """Drop the shard being written (its staged data is removed; the shard stays incomplete)."""
        self._done = True
        try:
            self._sink.abort()
        finally:
            self._stage.close()


class CacheReader(_Layout):
    """Reads one split of a cache: its manifest, completion records and whole shards.

    Args:
        root: Cache directory or fsspec URL.
        storage_options: For a URL: the fsspec filesystem's options (no secrets; see `lrc_offline.storage`).
        split: `manifest.TRAIN` (the training shards) or `manifest.HELDOUT` (the held-out shards).

    Raises:
        FileNotFoundError, CacheFormatError, StorageError: see `read_manifest`; CacheFormatError also for
            the held-out split of a cache without one.
    """

    def __init__(self, root: str | Path | Location, storage_options: dict | None = None, split: str = TRAIN) -> None:
        location = as_location(root, storage_options)
        super().__init__(location, read_manifest(location), split)

    def complete_shards(self) -> list[int]:
        """Indices of shards with a valid completion record (not checksummed: see `verify_cache`)."""
        return self.shard_status()[0]

    def shard_status(self) -> tuple[list[int], dict[int, CorruptShardError]]:
        """(shards with a valid completion record, shards whose record exists but is damaged -> the error
        naming it): one listing of shards/, then the records found, read concurrently on object storage.

        A shard with no record is incomplete (never built, or being rebuilt: a writer removes the record
        first) and is in neither. A record is written whole and atomically, so one that does not parse or
        check was damaged after the fact: the shard is corrupt, not incomplete.
        """
        names = set(self.location.names(SHARDS_DIR))
        found = [i for i in range(self.num_shards) if self.record_name(i).split("/")[-1] in names]
        records = self.location.read_many([self.record_name(i) for i in found], missing_ok=True)
        complete, damaged = [], {}
        for i in found:
            if self.record_name(i) not in records:
                continue  # deleted since the listing (a worker is rebuilding the shard)
            try:
                check_record(records[self.record_name(i)], i, self.manifest_digest, self.location, self.prefix)
            except DamagedRecordError as err:
                damaged[i] = CorruptShardError(i, err.problem)
                continue
            complete.append(i)
        return complete, damaged

    def shard_record(self, index: int) -> dict[str, Any]:
        """Completion record of shard `index`.

        Raises:
            CacheFormatError: the shard is not complete (no record).
            CorruptShardError: its record is damaged (see `shard_status`).
        """
        self._check_index(index)
        try:
            record = read_record(self.location, index, self.manifest_digest, self.prefix)
        except DamagedRecordError as err:
            raise CorruptShardError(index, err.problem) from err
        if record is None:
            raise CacheFormatError(
                f"{self.prefix} {index} of {self.root} is not complete (no {self.record_name(index)}); "
                "build it, or read only complete_shards()"
            )
        return record

    def read_shard(self, index: int, fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Fields of every sequence of shard `index`, each [n, *shape] in its logical dtype (float8, int4 and
        log8 decode to float32).

        The uint16 field sampled_counts comes back as torch.uint16, which supports few ops: call
        ``.long()`` or ``.float()`` first.
        """
        record = self.shard_record(index)
        names = self.manifest.field_names
        if fields is not None:
            unknown = [f for f in fields if f not in names]
            if unknown:
                raise KeyError(f"fields {unknown} are not in the cache at {self.root}; it holds {list(names)}")
        objects = self._fetch_checked(index, record, fields)
        where = self.location.name_of(self.shard_name(index))
        return self._shard_format.read_objects(objects, where, self.fields, fields, record["first_sequence"])

    def _fetch_checked(self, index: int, record: dict[str, Any], fields: Sequence[str] | None) -> dict[str, bytes]:
        """The shard's objects (those `fields` are read from), each read once, whole, into memory and
        checked against the completion record; keyed by their path inside the shard ('' for a tar).

        A file missing or truncated would read as zeros (Zarr fill values) or fail obscurely; a changed
        byte would decode into wrong numbers. Sizes, then sha256 (~1 GB/s, far faster than training
        consumes a shard), then the layout: a record that does not name a file the shard needs (a chunk
        whose entry was lost, with or without its file) would pass the checksums and read as zeros.
        All before anything is decoded.

        Raises:
            CorruptShardError: naming the shard and the file.
        """
        shard = shard_name(index, self.format, self.prefix)
        prefix = self.shard_name(index)
        where, record_path = self.location.name_of(prefix), self.location.name_of(self.record_name(index))
        first, end = self.shard_range(index)
        if (record["first_sequence"], record["num_sequences"]) != (first, end - first):
            raise CorruptShardError(index, f"{record_path}: says {record['num_sequences']} sequences from "
                                    f"{record['first_sequence']}, the manifest [{first}, {end})")  # fmt: skip
        outside = [rel for rel in record["files"] if rel != prefix and not rel.startswith(prefix + "/")]
        if outside:
            raise CorruptShardError(index, f"{record_path}: names {outside[0]}, outside {where}")
        # A field is read from its value array and any per-row companion (``<field>__scale``, ...).
        arrays = None if fields is None else {
            name for spec in self.fields if spec.name in fields for name, _, _ in stored_arrays(spec)
        }
        wanted = {}
        for rel, info in record["files"].items():
            parts = rel.split("/")  # shards/<shard>.zarr/<array>/... or shards/<shard>.tar
            if arrays is not None and len(parts) > 3 and parts[2] not in arrays:
                continue  # a Zarr array this read does not open
            wanted[rel] = info
        try:
            names = sorted(wanted)
            objects = self.location.read_many(names, sizes=[wanted[rel]["bytes"] for rel in names])
        except FileNotFoundError as err:
            raise CorruptShardError(index, f"{err.filename}: missing or resized since {shard} was written") from err
        checked = {}
        for rel, data in objects.items():
            path = self.location.name_of(rel)
            if len(data) != wanted[rel]["bytes"]:
                raise CorruptShardError(index, f"{path}: resized since {shard} was written")
            if hashlib.sha256(data).hexdigest() != wanted[rel]["sha256"]:
                raise CorruptShardError(index, f"{path}: content differs from the checksum {shard} was recorded with")
            checked[rel[len(prefix) + 1:]] = data
        problems = self.layout_problems(index, checked, checked.__getitem__, fields)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CorruptShardError(index, f"{problems[0]}{more}")
        return checked

    def layout_reads(self, name: str) -> bool:
        """Whether `layout_problems` reads the object `name` (a path inside a shard)."""
        return self._shard_format.layout_reads(name)

    def layout_problems(
        self, index: int, listed: Collection[str], read: Callable[[str], bytes], fields: Sequence[str] | None = None
    ) -> list[str]:
        """What shard `index`'s layout needs (for `fields`, default all) that its completion record does not
        name: for Zarr the group's and every array's metadata and every chunk of each array's grid, for a
        WebDataset the tar and in it every sequence's member of every stored array. [] when complete.

        Args:
            listed: Paths inside the shard the record names ('' for a tar).
            read: Bytes of a listed object that `layout_reads` selects, already checked against the record.
        """
        first, end = self.shard_range(index)
        return self._shard_format.layout_problems(listed, read, self.location.name_of(self.shard_name(index)),
                                                  self.fields, fields, first, end - first)  # fmt: skip

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


def clean_stale(root: str | Path | Location, storage_options: dict | None = None, abandoned_only: bool = False) -> int:
    """Remove a crashed build's leftovers: temporary entries, shard data without a completion record, and
    objects inside a complete shard that its record does not name.

    Run it only while no worker is writing to this cache: another worker's shard data before its record
    looks exactly like a crashed one's. With `abandoned_only`, temporaries stay unless their writers are
    provably gone (`fsutil.is_stale_temporary`: a dead pid on this host, untouched for a day elsewhere).

    Returns:
        Number of entries (files, directories, or a shard's objects) removed.
    """
    location = as_location(root, storage_options)

    removed = 0
    for rel in temporaries(location):
        if not abandoned_only or location.is_abandoned_temporary(rel):
            location.remove(rel)
            removed += 1
    for entry in location.names(SHARDS_DIR):
        rel = f"{SHARDS_DIR}/{entry}"
        match = _SHARD_DATA.match(entry)
        if match is None:
            continue
        prefix, index = match.group(1), int(match.group(2))
        try:
            record = read_record(location, index, prefix=prefix)
        except CacheFormatError:
            continue  # a damaged record: the shard is rebuilt; its data stays until then
        if record is None:
            location.remove(rel)
            removed += 1
            continue
        unnamed = sorted(set(location.files(rel)) - set(record["files"]))
        for name in unnamed:
            location.remove(name)
        removed += bool(unnamed)
    return removed


def temporaries(root: str | Path | Location, storage_options: dict | None = None) -> list[str]:
    """Every work-in-progress entry (``.tmp-*``, see `fsutil.temp_path`) of the cache at `root`, relative to
    it: at the root (a manifest being created), in ``shards/`` (one shallow listing: a shard's many objects
    are one entry there) and at any depth in the root's other folders (a tokenised index, derived files)."""
    location = as_location(root, storage_options)
    top = location.names()
    found = {name for name in top if name.startswith(TMP_PREFIX)}
    found |= {f"{SHARDS_DIR}/{name}" for name in location.names(SHARDS_DIR) if name.startswith(TMP_PREFIX)}
    for folder in top:
        if folder == SHARDS_DIR or folder.startswith(TMP_PREFIX):
            continue
        for rel in location.files(folder):
            parts = rel.split("/")
            inner = next((k for k, part in enumerate(parts) if part.startswith(TMP_PREFIX)), None)
            if inner is not None:
                found.add("/".join(parts[: inner + 1]))
    return sorted(found)
