"""The cache manifest: what a cache holds, for which teacher, tokenizer and corpus, in which layout.

``manifest.json`` is written once, before any shard, and never changes. Every worker building shards
of the same cache must request an identical manifest (up to its creation time and library versions);
`manifest_differences` says how two manifests differ, in terms a user can act on.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from lrc_offline.cache.records import MANIFEST_NAME, temp_path
from lrc_offline.cache.schema import (
    SCHEMA_VERSION,
    CacheFormatError,
    FieldSpec,
    TeacherGeometry,
    cache_fields,
)
from lrc_offline.config import FORMATS, CacheConfig, to_dict

__all__ = [
    "FINGERPRINT_KEYS",
    "make_manifest",
    "manifest_differences",
    "validate_manifest",
    "read_manifest",
    "create_manifest",
]

FINGERPRINT_KEYS = ("teacher_config", "teacher_weights", "tokenizer", "corpus")
"""Fingerprints every manifest carries (strings computed by the capture code, e.g. sha256 hex)."""

_REQUIRED_KEYS = (
    "schema_version", "format", "config", "geometry", "fingerprints",
    "num_sequences", "sequences_per_shard", "num_shards", "fields",
)  # fmt: skip
_VOLATILE_KEYS = ("created", "versions")
"""Top-level keys that legitimately differ between workers of one cache."""
_RUN_KEYS = ("device", "vllm_tensor_parallel_size", "vllm_pipeline_parallel_size", "vllm_gpu_memory_utilization",
             "vllm_enforce_eager")  # fmt: skip
"""Config keys that say where and how a worker runs, not what it writes: ranks of one build may differ in them."""


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "zarr", "numcodecs", "numpy", "webdataset", "lrc-offline"):
        try:
            versions[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _json_ready(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} must be JSON-serialisable (plain numbers, strings, lists, dicts): {err}") from err


def make_manifest(
    cfg: CacheConfig,
    geometry: TeacherGeometry,
    fingerprints: dict[str, str],
    num_sequences: int,
    extra: dict | None = None,
) -> dict[str, Any]:
    """The manifest of a cache built with `cfg` for a teacher of `geometry`.

    Args:
        cfg: The resolved cache config (saved whole).
        geometry: The teacher's shapes.
        fingerprints: Strings identifying what produced the data; must hold FINGERPRINT_KEYS.
        num_sequences: Packed sequences in the whole cache (all shards).
        extra: Further JSON-ready facts the caller wants recorded and compared (e.g. packing details).

    Returns:
        A JSON-ready dict (see docs/cache_format.md).
    """
    if not isinstance(fingerprints, dict):
        raise TypeError(f"fingerprints must be a dict with keys {list(FINGERPRINT_KEYS)}")
    missing = [k for k in FINGERPRINT_KEYS if k not in fingerprints]
    if missing:
        raise ValueError(f"fingerprints lack {missing}; every cache records {list(FINGERPRINT_KEYS)}")
    bad = [k for k, v in fingerprints.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"fingerprints {bad} must be strings (e.g. sha256 hex digests)")
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences={num_sequences!r} must be a positive integer")
    if cfg.max_sequences is not None and num_sequences > cfg.max_sequences:
        raise ValueError(f"num_sequences={num_sequences} exceeds cache.max_sequences={cfg.max_sequences}")
    per_shard = cfg.sequences_per_shard
    return {
        "schema_version": SCHEMA_VERSION,
        "format": cfg.format,
        "config": to_dict(cfg),
        "geometry": geometry.to_dict(),
        "fingerprints": dict(fingerprints),
        "num_sequences": num_sequences,
        "sequences_per_shard": per_shard,
        "num_shards": math.ceil(num_sequences / per_shard),
        "fields": [spec.to_dict() for spec in cache_fields(cfg, geometry)],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _library_versions(),
        "extra": _json_ready(extra or {}, "manifest extra"),
    }


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        # Field lists compare field by field, so a message reads "fields.topk_ids.shape: ...".
        for item in value:
            _flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}.{item['name']}", out)
    else:
        out[prefix] = value


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of what a manifest says about the data (creation time, library versions, the build device
    and engine options left out). Every completion record carries it, so a shard is complete only for
    the manifest it was built under."""
    kept = {k: v for k, v in manifest.items() if k not in _VOLATILE_KEYS}
    kept["config"] = {k: v for k, v in kept.get("config", {}).items() if k not in _RUN_KEYS}
    return "sha256:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def manifest_differences(existing: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifests, ignoring creation time and library versions.

    Returns:
        Lines like ``"config.topk: 32 in the existing cache, 64 requested"``; empty when they agree.
    """
    flat_existing: dict[str, Any] = {}
    flat_requested: dict[str, Any] = {}
    for manifest, flat in ((existing, flat_existing), (requested, flat_requested)):
        kept = {k: v for k, v in manifest.items() if k not in _VOLATILE_KEYS}
        _flatten(_json_ready(kept, "manifest"), "", flat)
    # Where a worker runs does not change what it writes: ranks of one build may use different devices.
    for flat in (flat_existing, flat_requested):
        for key in _RUN_KEYS:
            flat.pop(f"config.{key}", None)
    absent = object()
    # A config key added to CacheConfig since the existing cache was built, requested at its default,
    # asks for what the old build did.
    defaults = {f"config.{k}": v for k, v in _json_ready(to_dict(CacheConfig()), "defaults").items()}
    lines = []
    for key in sorted(set(flat_existing) | set(flat_requested)):
        old, new = flat_existing.get(key, absent), flat_requested.get(key, absent)
        if old is absent and key in defaults and new == defaults[key]:
            continue
        if old != new:
            show = lambda v: "absent" if v is absent else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(old)} in the existing cache, {show(new)} requested")
    return lines


def validate_manifest(manifest: Any, where: str) -> list[FieldSpec]:
    """Check a manifest's structure and return its field specs.

    Raises:
        CacheFormatError: a key is missing, the schema is newer than supported, or values disagree.
    """
    if not isinstance(manifest, dict):
        raise CacheFormatError(f"{where}: the manifest must be a JSON object")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CacheFormatError(f"{where}: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise CacheFormatError(
            f"{where}: written with cache schema {version}, this lrc_offline reads up to {SCHEMA_VERSION}; "
            "upgrade lrc_offline to read it"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise CacheFormatError(f"{where}: manifest lacks keys {missing}")
    if manifest["format"] not in FORMATS:
        raise CacheFormatError(f"{where}: format {manifest['format']!r} is not one of {list(FORMATS)}")
    num, per_shard = manifest["num_sequences"], manifest["sequences_per_shard"]
    if not (isinstance(num, int) and isinstance(per_shard, int) and num >= 1 and per_shard >= 1):
        raise CacheFormatError(f"{where}: num_sequences and sequences_per_shard must be positive integers")
    if manifest["num_shards"] != math.ceil(num / per_shard):
        raise CacheFormatError(f"{where}: num_shards {manifest['num_shards']} != ceil({num} / {per_shard})")
    if not isinstance(manifest["fields"], list) or not manifest["fields"]:
        raise CacheFormatError(f"{where}: fields must be a non-empty list")
    specs = [FieldSpec.from_dict(f) for f in manifest["fields"]]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise CacheFormatError(f"{where}: field names repeat: {names}")
    return specs


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and validate ``<root>/manifest.json``.

    Raises:
        FileNotFoundError: `root` holds no manifest (not a cache, or its build never started).
        CacheFormatError: the manifest is not valid JSON, is newer than supported, or is malformed.
    """
    path = Path(root) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {root} is not a teacher cache, or its build never started (run `lrc-cache build`)"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise CacheFormatError(f"{path}: not valid JSON ({err}); restore the file or rebuild the cache") from err
    validate_manifest(manifest, str(path))
    return manifest


def create_manifest(root: Path, manifest: dict[str, Any]) -> bool:
    """Write ``<root>/manifest.json`` unless one exists; True when this call created it.

    Hard-linking a finished temporary file makes creation both atomic (no reader sees half a file)
    and exclusive (of many workers starting at once, exactly one creates it; the rest compare).
    """
    path = Path(root) / MANIFEST_NAME
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as file:
            file.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: fall back to an atomic but non-exclusive replace.
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
