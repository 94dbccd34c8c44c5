"""Cache layout on disk, durable writes, checksums and completion records.

A cache directory::

    manifest.json                   what the cache holds (see `manifest.py`)
    shards/shard-00000.zarr/        or shards/shard-00000.tar: the shard's data
    shards/shard-00000.done.json    completion record, written last: the shard is complete iff it exists
                                    (one that exists but does not parse or check is damage: the shard is corrupt)
    shards/heldout-00000.zarr/      a shard of the held-out split (`manifest.heldout`), with its record
    shards/heldout-00000.done.json  heldout-00000.done.json; built, read and verified like a training shard
    shards/.tmp-*                   work in progress of a running (or crashed) build; never read

The root is a local directory or an fsspec URL (see `lrc_offline.storage`); on object storage there is
no rename and no temporary: data objects are uploaded under their final names, and the record is still
the one commit (see `store.ShardWriter.commit`).

A completion record::

    {"index": 0, "manifest": "sha256:...", "first_sequence": 0, "num_sequences": 64, "num_tokens": 131072,
     "files": {"shards/shard-00000.zarr/zarr.json": {"bytes": 312, "sha256": "..."}, ...},
     "field_bytes": {"input_ids": 70021, ...}, "stats": {...}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lrc_offline.cache.schema import CacheFormatError
from lrc_offline.storage import Location, as_location

__all__ = [
    "MANIFEST_NAME",
    "SHARDS_DIR",
    "SHARD_PREFIXES",
    "shard_name",
    "record_name",
    "record_path",
    "file_digests",
    "sha256_file",
    "read_record",
    "check_record",
    "DamagedRecordError",
]

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
_SHARD_SUFFIX = {"zarr": ".zarr", "webdataset": ".tar"}
SHARD_PREFIXES = ("shard", "heldout")
"""File-name prefixes of the shards of a cache's splits: the training sequences, the held-out ones."""
_RECORD_KEYS = ("index", "manifest", "first_sequence", "num_sequences", "num_tokens", "files", "field_bytes", "stats")
_HASH_BLOCK = 1 << 20


class DamagedRecordError(CacheFormatError):
    """A completion record that exists but cannot be trusted: not JSON, keys missing or malformed, written
    under another manifest or for another shard. Unlike a missing record (a shard not built yet), this is
    damage: readers treat the shard as corrupt."""

    def __init__(self, index: int, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.index, self.problem = index, problem


def shard_name(index: int, fmt: str, prefix: str = "shard") -> str:
    """File or directory name of shard `index` in format `fmt` (zarr or webdataset); `prefix` names the
    split (`SHARD_PREFIXES`)."""
    return f"{prefix}-{index:05d}{_SHARD_SUFFIX[fmt]}"


def record_name(index: int, prefix: str = "shard") -> str:
    """Completion record of shard `index` (of the split `prefix` names), relative to the cache root."""
    return f"{SHARDS_DIR}/{prefix}-{index:05d}.done.json"


def record_path(root: Path, index: int) -> Path:
    """Completion record of shard `index` of the local cache at `root`."""
    return Path(root) / record_name(index)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_digests(path: Path, name: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a shard at `path`, keyed by its path as `name` (root-relative).

    `path` may be a temporary location: keys use `name`, the shard's final root-relative path, so the
    record describes the shard after it is renamed into place.
    """
    path = Path(path)
    if path.is_file():
        return {name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}}
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        files[f"{name}/{rel}"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return files


def read_record(
    root: Path | Location, index: int, manifest_digest: str | None = None, prefix: str = "shard"
) -> dict[str, Any] | None:
    """The completion record of shard `index` (of the split `prefix` names) of the cache at `root`, or None
    when the shard is not complete.

    Raises:
        DamagedRecordError: the record exists but is not valid JSON, lacks keys, has malformed ones, or
            (with `manifest_digest`) was written under another manifest.
    """
    root = as_location(root)
    try:
        data = root.read_bytes(record_name(index, prefix))
    except FileNotFoundError:
        return None
    return check_record(data, index, manifest_digest, root, prefix)


def check_record(
    data: bytes, index: int, manifest_digest: str | None, root: Location, prefix: str = "shard"
) -> dict[str, Any]:
    """Shard `index`'s completion record parsed from `data` and checked (see `read_record`)."""
    path = root.name_of(record_name(index, prefix))
    what = "shard" if prefix == "shard" else "held-out shard"
    fix = f"delete it and rebuild {what} {index}"
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRecordError(index, f"{path}: completion record is not valid JSON ({err})", fix) from err
    if not isinstance(record, dict) or any(key not in record for key in _RECORD_KEYS):
        missing = [key for key in _RECORD_KEYS if key not in record] if isinstance(record, dict) else list(_RECORD_KEYS)
        raise DamagedRecordError(index, f"{path}: completion record lacks keys {missing}", fix)
    wrong = _wrongly_typed(record)
    if wrong:
        raise DamagedRecordError(index, f"{path}: completion record has malformed {wrong}", fix)
    if manifest_digest is not None and record["manifest"] != manifest_digest:
        raise DamagedRecordError(
            index, f"{path}: {what} {index} was built under another manifest than {root.name_of(MANIFEST_NAME)} "
            "(was the manifest replaced?)", "delete the shard and its record and rebuild it"
        )
    if record["index"] != index:
        raise DamagedRecordError(index, f"{path}: completion record is for {what} {record['index']}, not {index}", fix)
    return record


def _wrongly_typed(record: dict[str, Any]) -> list[str]:
    """Keys of a parsed record whose values do not have the types the writer gives them."""
    wrong = [key for key in ("index", "first_sequence", "num_sequences", "num_tokens")
             if isinstance(record[key], bool) or not isinstance(record[key], int)]  # fmt: skip
    wrong += [key for key in ("field_bytes", "stats") if not isinstance(record[key], dict)]
    files = record["files"]
    if not isinstance(files, dict) or not all(
        isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
        and _plain_relative(name) for name, info in files.items()
    ):
        wrong.append("files")
    return wrong


def _plain_relative(name: str) -> bool:
    """A root-relative file name with no `..`, `.`, empty or absolute part: a record naming any other
    would make the reader open a file outside the cache (a device, a FIFO, another user's data)."""
    parts = name.split("/")
    return isinstance(name, str) and bool(name) and all(part not in ("", ".", "..") for part in parts) \
        and "\\" not in name
