"""Checking a cache against its completion records, and summarising what it holds.

`verify_cache` re-reads every byte (sha256 of each file listed in each completion record), checks that
each record names every file the shard's layout needs (a Zarr chunk it does not name would read as
zeros) and flags files in a shard that no record lists, for the training shards and the held-out ones.
`inspect_cache` reads only the manifest and the records.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrc_offline.cache.dtypes import logical_itemsize
from lrc_offline.cache.records import read_record
from lrc_offline.cache.schema import CacheFormatError
from lrc_offline.cache.act_stats import activation_stats, layers_per_position
from lrc_offline.cache.manifest import HELDOUT
from lrc_offline.cache.store import CacheReader
from lrc_offline.storage import Location

__all__ = ["VerifyReport", "verify_cache", "inspect_cache"]


@dataclass
class VerifyReport:
    """Outcome of `verify_cache`."""

    num_shards: int
    """Shards the manifest declares."""
    complete: list[int] = field(default_factory=list)
    """Shards whose record exists and whose every file matches it."""
    missing: list[int] = field(default_factory=list)
    """Shards without a completion record (never built, or still being built)."""
    bad: dict[int, str] = field(default_factory=dict)
    """Shards whose record or files are damaged, with the first problem found."""
    heldout_num_shards: int = 0
    """Held-out shards the manifest declares (0: the cache has no held-out split)."""
    heldout_complete: list[int] = field(default_factory=list)
    """Held-out shards whose record exists and whose every file matches it."""
    heldout_missing: list[int] = field(default_factory=list)
    """Held-out shards without a completion record."""
    heldout_bad: dict[int, str] = field(default_factory=dict)
    """Held-out shards whose record or files are damaged, with the first problem found."""

    @property
    def ok(self) -> bool:
        """True when every shard, held-out ones included, is complete and intact."""
        return not (self.missing or self.bad or self.heldout_missing or self.heldout_bad)


def _check_shard(reader: CacheReader, index: int, record: dict[str, Any]) -> str | None:
    """First problem with shard `index` against its record, or None."""
    first, end = reader.shard_range(index)
    if (record["first_sequence"], record["num_sequences"]) != (first, end - first):
        return (
            f"record says {record['num_sequences']} sequences from {record['first_sequence']}, "
            f"manifest says [{first}, {end})"
        )
    prefix = reader.shard_name(index)
    listed = record["files"]
    if any(rel != prefix and not rel.startswith(prefix + "/") for rel in listed):
        return f"record lists files outside {prefix}"
    location = reader.location
    present = location.files(prefix)  # one listing: sizes of every object the shard has
    held = {}  # what the layout check reads (array metadata, or a whole tar): read once, hashed from memory
    for rel, info in sorted(listed.items()):
        if rel not in present:
            return f"missing file {rel}"
        if present[rel] != info["bytes"]:
            return f"size mismatch in {rel}: {present[rel]} bytes, record says {info['bytes']}"
        inside = rel[len(prefix) + 1:]
        if reader.layout_reads(inside):
            held[inside] = location.read_bytes(rel)
            digest = hashlib.sha256(held[inside]).hexdigest()
        else:
            digest = location.sha256(rel)
        if digest != info["sha256"]:
            return f"checksum mismatch in {rel}"
    problems = reader.layout_problems(index, [rel[len(prefix) + 1:] for rel in listed], held.__getitem__)
    if problems:
        return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    extra = sorted(set(present) - set(listed))
    if extra:
        return f"unexpected file {extra[0]} not in the completion record"
    return None


def verify_cache(root: str | Path | Location, storage_options: dict | None = None) -> VerifyReport:
    """Recompute every checksum of every complete shard of the cache at `root` (a directory or URL), and
    check that each completion record names every file its shard's layout needs.

    Files are streamed, except those the layout check reads (Zarr metadata, a WebDataset shard's whole
    tar: one shard in memory, as training holds it).

    Returns:
        A report listing complete, missing and bad shards (with the reason, naming the file), training and
        held-out apart.
    """
    reader = CacheReader(root, storage_options)
    report = VerifyReport(num_shards=reader.num_shards)
    _verify_split(reader, report.complete, report.missing, report.bad)
    if reader.manifest.heldout is not None:
        held = CacheReader(reader.location, split=HELDOUT)
        report.heldout_num_shards = held.num_shards
        _verify_split(held, report.heldout_complete, report.heldout_missing, report.heldout_bad)
    return report


def _verify_split(reader: CacheReader, complete: list[int], missing: list[int], bad: dict[int, str]) -> None:
    """Check every shard of `reader`'s split, filling in the three lists."""
    for index in range(reader.num_shards):
        try:
            record = read_record(reader.location, index, reader.manifest_digest, reader.prefix)
        except CacheFormatError as err:
            bad[index] = str(err)
            continue
        if record is None:
            missing.append(index)
            continue
        problem = _check_shard(reader, index, record)
        if problem is None:
            complete.append(index)
        else:
            bad[index] = problem


def _weighted_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted mean of each numeric stat over the records that report it."""
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for record in records:
        for key, value in record["stats"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                totals[key] = totals.get(key, 0.0) + value * record["num_tokens"]
                weights[key] = weights.get(key, 0) + record["num_tokens"]
    return {key: totals[key] / weights[key] for key in sorted(totals) if weights[key] > 0}


def inspect_cache(root: str | Path | Location, storage_options: dict | None = None) -> dict[str, Any]:
    """Summary of the cache at `root` from its manifest and completion records (no data is read).

    Returns:
        A JSON-ready dict: sequences and tokens (declared and complete), complete/total shards, stored
        bytes and bytes per token (total and per field), per-field compression ratio (bytes before
        compression / stored bytes; float8 and log8 count 1 byte per element, int4 half a byte, their per-row
        companions excluded), fingerprints,
        config, ``stats``: each numeric completion-record stat, token-weighted over complete shards,
        ``activations`` (None without activations): the fraction of sequences carrying them and the
        teacher targets' mean square per term and layer, at sink positions and elsewhere, and ``heldout``
        (None without a held-out split): its sequences, complete and total shards, stored bytes, whether
        it stores activations, its fields and its stats.
    """
    reader = CacheReader(root, storage_options)
    manifest = reader.manifest
    records = [reader.shard_record(i) for i in reader.complete_shards()]
    seq_len = manifest.config.seq_len
    complete_sequences = sum(r["num_sequences"] for r in records)
    complete_tokens = sum(r["num_tokens"] for r in records)
    stored_bytes = sum(info["bytes"] for r in records for info in r["files"].values())
    per_token = (lambda b: b / complete_tokens) if complete_tokens else (lambda b: None)
    fields = {}
    for spec in reader.fields:
        stored = sum(r["field_bytes"].get(spec.name, 0) for r in records)
        logical = complete_sequences * math.prod(spec.shape) * logical_itemsize(spec.dtype)
        fields[spec.name] = {
            "shape": list(spec.shape),
            "dtype": spec.dtype,
            "codec": spec.codec,
            "stored_bytes": stored,
            "logical_bytes": logical,
            "bytes_per_token": per_token(stored),
            "compression_ratio": logical / stored if stored else None,
        }
    return {
        "root": str(reader.root),
        "format": reader.format,
        "schema_version": manifest.schema_version,
        "sequences": manifest.num_sequences,
        "tokens": manifest.num_sequences * seq_len,
        "complete_sequences": complete_sequences,
        "complete_tokens": complete_tokens,
        "complete_shards": len(records),
        "total_shards": reader.num_shards,
        "stored_bytes": stored_bytes,
        "bytes_per_token": per_token(stored_bytes),
        "fields": fields,
        "fingerprints": dict(manifest.fingerprints),
        "config": manifest.config_dict(),
        "stats": _weighted_stats(records),
        "activations": _activation_summary(records, complete_sequences, manifest),
        "heldout": _heldout_summary(reader),
    }


def _heldout_summary(reader: CacheReader) -> dict[str, Any] | None:
    """The held-out split at a glance, from the manifest and its completion records."""
    if reader.manifest.heldout is None:
        return None
    held = CacheReader(reader.location, split=HELDOUT)
    records = [held.shard_record(i) for i in held.complete_shards()]
    return {
        "sequences": held.num_sequences,
        "tokens": held.num_sequences * reader.manifest.config.seq_len,
        "complete_sequences": sum(r["num_sequences"] for r in records),
        "complete_shards": len(records),
        "total_shards": held.num_shards,
        "stored_bytes": sum(info["bytes"] for r in records for info in r["files"].values()),
        "activations": reader.manifest.heldout.activations,
        "fields": [spec.name for spec in held.fields],
        "stats": _weighted_stats(records),
    }


def _activation_summary(records: list[dict[str, Any]], complete_sequences: int, manifest) -> dict[str, Any] | None:
    """Which fraction of the sequences carry activations, how many of the stored layers each position
    carries, and the teacher targets' mean square per term and layer at attention-sink positions and
    elsewhere (where massive activations show up)."""
    sums = activation_stats(records)
    if sums is None:
        return None
    num_layers = len(manifest.act_layers)
    out: dict[str, Any] = {"sequences": sums["sequences"],
                           "fraction": sums["sequences"] / complete_sequences if complete_sequences else None,
                           "layers_per_position": layers_per_position(num_layers, manifest.config.act_layer_fraction),
                           "stored_layers": num_layers,
                           "sink_positions": sums["sink_positions"], "other_positions": sums["other_positions"],
                           "mean_square": {}}  # fmt: skip
    for term in sums["other_sq"]:
        out["mean_square"][term] = {
            "sink": [v / max(sums["sink_positions"], 1) for v in sums["sink_sq"][term]],
            "other": [v / max(sums["other_positions"], 1) for v in sums["other_sq"][term]],
        }
    return out
