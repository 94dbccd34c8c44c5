"""Plan a cache before building it: bytes per field and in all, shards, files and objects, the tokenised
index, and the teacher FLOPs of the build, from a cache config, the teacher's geometry and a token count.

Stored bytes are each field's bytes before compression (`cache_fields` and `dtypes.stored_arrays`: value
arrays and their scale or row-max companions) over a measured compression ratio, plus what the shard
format adds (Zarr: a small ``zarr.json`` per array; WebDataset: a compressed ``.npy`` header per member and
the tar's 512-byte blocks). Compression depends on the data, so the ratios are measurements that carry
their provenance (`CompressionRatios`): `SMOLLM2_RATIOS`, measured on SmolLM2-135M, ships with the code,
and `measure_ratios` reads a table off any built cache (its teacher, its corpus). Everything else (which
fields, shapes, layers, positions, chunks, shards) is computed from the config, never assumed.

Activation fields are costed per row that holds values: rows an activation budget (`act_fraction`) or a
per-position layer subset (`act_layer_fraction`) leaves as zeros compress to almost nothing, so a field's
ratio is measured over its rows with values and `kept_fraction` says how many a config keeps.

Legend: L seq_len, P activation positions per sequence, nl stored layers, m layers per position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lrc_offline.cache.act_stats import layers_per_position
from lrc_offline.cache.dtypes import stored_arrays
from lrc_offline.cache.schema import FieldSpec, TeacherGeometry, act_layers, cache_fields, num_act_positions
from lrc_offline.cache.zarr_shard import chunk_sequences
from lrc_offline.config import CacheConfig, ConfigError

__all__ = ["ROW_FIELDS", "RatioKey", "CompressionRatios", "SMOLLM2_RATIOS", "measure_ratios", "raw_bytes",
           "kept_fraction", "teacher_flops_per_token", "geometry_from_hf_config", "FieldPlan", "SplitPlan",
           "CachePlan", "plan_cache"]  # fmt: skip

ROW_FIELDS = ("act_input", "act_attn", "act_q", "act_k", "act_v", "act_o", "act_gate", "act_up", "act_down")
"""Activation fields whose rows an activation budget or a layer subset leaves as zeros."""

RatioKey = tuple[str, str, bool, bool]
"""(field, logical dtype, layer subset, sequence budget): the two flags say whether the ratio was measured on
a cache with act_layer_fraction < 1 and with act_fraction < 1 (False for fields other than `ROW_FIELDS`).
The rows that hold values compress a little differently there: a layer subset keeps every layer at each
sequence's start, whose massive activations make a larger share of the rows with values."""

# ---- format overheads (measured on the caches this package writes; bytes) ---------------------------------

ZARR_GROUP_JSON_BYTES = 146
"""A shard's group ``zarr.json`` (tiny-teacher caches: 146 bytes)."""
ZARR_ARRAY_JSON_BYTES = 830
"""One array's ``zarr.json``: 787-861 bytes on tiny-teacher caches (longer names and shapes, more bytes)."""
WDS_MEMBER_OVERHEAD_BYTES = 120
"""A WebDataset member is a whole ``.npy`` (128-byte header) compressed as a blosc frame: an all-zero array
of 1 to 4096 elements compresses to 109-135 bytes (`compression.compress_npy`), the header's share."""
TAR_BLOCK = 512
"""Tar member header, and the unit member data is padded to."""
TAR_RECORD = 10240
"""tarfile pads a finished archive (its 1,024-byte end marker included) to this multiple."""
RECORD_BASE_BYTES = 400
RECORD_FILE_BYTES = 145
RECORD_LAYER_BYTES = 280
"""A completion record: ~145 bytes per listed file (name, size, sha256), and with activations the
teacher targets' mean square per term and layer (~280 bytes a layer); measured on tiny-teacher records."""
MANIFEST_BYTES = 3600
"""``manifest.json``: 3.4-3.6 KB on tiny-teacher caches (config, geometry, field list, fingerprints)."""
INDEX_TOKEN_BYTES = 4
"""The tokenised index stores every corpus token as int32 (``index/part-*.tokens``)."""
INDEX_DOCUMENT_BYTES = 8
"""... and every document's start as int64 (``index/part-*.starts``)."""


@dataclass(frozen=True)
class CompressionRatios:
    """Measured compression ratios (bytes before compression / stored bytes, over the rows that hold values)
    of cache fields, each with its field's default codec (`schema.cache_fields`), and where they come from."""

    name: str
    """Short name of the measurement, shown next to each field it costs."""
    provenance: str
    """What was measured, on what, with which command."""
    ratios: Mapping[RatioKey, float]
    """(field, dtype, layer subset, sequence budget) -> ratio."""
    shard_format: str = "zarr"
    """The shard format measured: Zarr chunks hold many sequences, WebDataset members one, and a short
    sequence's member compresses worse (tiny teacher, 64-token sequences: bf16 activations 1.5x in members,
    2.5x in chunks); at production sizes (a member of 100 KB and more) the two agree."""

    def lookup(self, field: str, dtype: str, layer_subset: bool, budget: bool) -> float | None:
        """The ratio of `field` stored as `dtype` in a cache with (or without) a layer subset and an
        activation budget: the measurement of the same kind of cache, else one without a budget, else one
        of a cache keeping every row; None when this table never measured that field and dtype."""
        row = field in ROW_FIELDS
        for key in ((field, dtype, layer_subset and row, budget and row), (field, dtype, layer_subset and row, False),
                    (field, dtype, False, False)):  # fmt: skip
            if key in self.ratios:
                return self.ratios[key]
        return None

    def merged(self, other: CompressionRatios) -> CompressionRatios:
        """This table with `other`'s entries added (other's win where both measured a key)."""
        shard_format = self.shard_format if self.shard_format == other.shard_format else "mixed"
        return CompressionRatios(f"{self.name} + {other.name}", f"{self.provenance}; {other.provenance}",
                                 {**self.ratios, **other.ratios}, shard_format)  # fmt: skip


SMOLLM2_RATIOS = CompressionRatios(
    name="SmolLM2-135M",
    provenance=(
        "SmolLM2-135M-Instruct (built-in teacher smollm2-135m) on wiki-en: 32 sequences of 256 tokens per cache, "
        "16 activation positions, top-64 and 64 draws, Zarr shards, one cache per mode and storage dtype "
        "(python benchmarks/storage.py --out benchmarks/results/storage, its storage.json 'fields'; the "
        "layer-subset entries from caches with act_layer_fraction=0.25, the budget ones from act_fraction=0.25). "
        "Ids and log-probs compress alike across teachers; activations depend on the teacher"
    ),
    ratios={
        ("input_ids", "int32", False, False): 2.5654,
        ("position_ids", "int32", False, False): 57.287,
        ("topk_ids", "int32", False, False): 2.2063,
        ("topk_logprobs", "float16", False, False): 1.7367,
        ("topk_logprobs", "log8", False, False): 1.8612,
        ("sampled_ids", "int32", False, False): 4.7821,
        ("sampled_counts", "uint16", False, False): 13.556,
        ("hidden", "bfloat16", False, False): 1.3335,
        ("act_positions", "int32", False, False): 3.6835,
        ("act_present", "uint8", False, False): 0.6667,
        ("act_layer_mask", "uint8", False, False): 8.9250,
        ("act_input", "bfloat16", False, False): 1.3305,
        ("act_attn", "bfloat16", False, False): 1.3271,
        ("act_input", "float8", False, False): 1.1498,
        ("act_attn", "float8", False, False): 1.1454,
        ("act_input", "int4", False, False): 1.4124,
        ("act_attn", "int4", False, False): 1.2806,
        ("act_input", "int4g", False, False): 1.1694,
        ("act_attn", "int4g", False, False): 1.1473,
        ("act_input", "int4", True, False): 1.4701,
        ("act_attn", "int4", True, False): 1.2384,
        ("act_input", "int4g", True, False): 1.2133,
        ("act_attn", "int4g", True, False): 1.1209,
        ("act_input", "bfloat16", False, True): 1.1702,
        ("act_attn", "bfloat16", False, True): 1.1682,
        ("act_input", "int4", False, True): 1.4136,
        ("act_attn", "int4", False, True): 1.2810,
        ("act_q", "bfloat16", False, False): 1.3209,
        ("act_k", "bfloat16", False, False): 1.3216,
        ("act_v", "bfloat16", False, False): 1.3295,
        ("act_o", "bfloat16", False, False): 1.3271,
        ("act_gate", "bfloat16", False, False): 1.3640,
        ("act_up", "bfloat16", False, False): 1.3407,
        ("act_down", "bfloat16", False, False): 1.3285,
    },
)
"""The ratios of benchmarks/README.md's storage tables (the production job's 479 B/token among them). Not
measured there, so costed uncompressed (an upper bound) unless another table has them: float32 log-probs
and activations, float16 activations, hidden states in any dtype but bfloat16."""


def raw_bytes(spec: FieldSpec) -> int:
    """Bytes of one sequence of `spec` before compression: its value array and any companion array."""
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in stored_arrays(spec))


def kept_fraction(cfg: CacheConfig, geometry: TeacherGeometry) -> float:
    """The expected fraction of an activation field's rows that hold values in a cache built with `cfg`:
    the activation budget's share of sequences times the share of (layer, position) rows a layer subset
    keeps, m of nl at each position and all nl at the sequence's start (always sampled with include_sink
    or when every position is stored; else with probability P / L)."""
    if cfg.activation_mode == "none":
        return 1.0
    if cfg.act_layer_fraction >= 1:
        return cfg.act_fraction
    nl, P = len(act_layers(cfg, geometry)), num_act_positions(cfg, cfg.seq_len)
    m = layers_per_position(nl, cfg.act_layer_fraction)
    full = 1.0 if cfg.include_sink or P >= cfg.seq_len else P / cfg.seq_len
    return cfg.act_fraction * (full * nl + (P - full) * m) / (P * nl)


def teacher_flops_per_token(cfg: CacheConfig, geometry: TeacherGeometry) -> float:
    """Multiply-add FLOPs (2 per multiply-add) of the teacher's forward per token of a build with `cfg`: the
    layers' seven projections, attention over the causal prefix ((L + 1) / 2 keys on average, scores and
    values), and the output head when the logit signal needs the logits (topk, sampled). Norms, softmaxes
    and the top-k selection are left out (a few FLOPs per element, against thousands per weight)."""
    g = geometry
    q_w, kv_w = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    d, f = g.hidden_size, g.intermediate_size
    linear = 2 * (d * q_w + 2 * d * kv_w + q_w * d + 3 * d * f)
    attention = 2 * q_w * (cfg.seq_len + 1)
    head = 2 * d * g.vocab_size if cfg.logit_mode in ("topk", "sampled") else 0
    return g.num_layers * (linear + attention) + head


def geometry_from_hf_config(config: Mapping[str, Any], where: str = "the teacher's config.json") -> TeacherGeometry:
    """The shapes a cache needs from a Hugging Face ``config.json`` (as a dict); a multimodal config's
    ``text_config`` when the top level has no ``hidden_size``.

    Raises:
        ConfigError: a key the geometry needs is missing.
    """
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
               if not config.get(k)]  # fmt: skip
    if missing:
        raise ConfigError(f"{where} has no {', '.join(missing)}: pass the config.json of a decoder-only language "
                          "model (--teacher-config PATH)")  # fmt: skip
    heads = int(config["num_attention_heads"])
    return TeacherGeometry(
        hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
    )


def measure_ratios(root: Any, name: str | None = None, storage_options: dict | None = None) -> CompressionRatios:
    """The compression ratios of the cache at `root` (its training shards), per row holding values, as a
    table `plan_cache` can use for caches of the same teacher and corpus. WebDataset members' `.npy` header
    share is taken off first, so the ratios describe the data in either format."""
    import torch

    from lrc_offline.cache.store import CacheReader
    from lrc_offline.cache.verify import inspect_cache

    reader = CacheReader(root, storage_options)
    info = inspect_cache(reader.location)
    cfg = reader.manifest.config
    shards = reader.complete_shards()
    if not shards:
        raise ConfigError(f"cache {root} has no complete shard to measure; build one first (lrc-cache build)")
    sequences = info["complete_sequences"]
    kept = 1.0
    for flag in ("act_present", "act_layer_mask"):
        if any(spec.name == flag for spec in reader.fields):
            masks = [reader.read_shard(i, fields=[flag])[flag] for i in shards]
            kept *= float(torch.cat([m.flatten() for m in masks]).float().mean())
    subset, budget = cfg.act_layer_fraction < 1, cfg.act_fraction < 1
    ratios = {}
    for spec in reader.fields:
        stored = info["fields"][spec.name]["stored_bytes"]
        if reader.format == "webdataset":  # the members' header share, at least 1 byte of data a member
            members = sequences * len(stored_arrays(spec))
            stored = max(stored - members * WDS_MEMBER_OVERHEAD_BYTES, members)
        row = spec.name in ROW_FIELDS
        ratios[(spec.name, spec.dtype, subset and row, budget and row)] = (
            raw_bytes(spec) * sequences * (kept if row else 1.0) / stored)
    teacher = cfg.teacher
    return CompressionRatios(
        name=name or f"measured on {root}",
        provenance=f"measured on the cache at {root} (teacher {teacher}, corpus {cfg.corpus}, {sequences} sequences "
                   f"of {cfg.seq_len} tokens, {reader.format}; lrc_offline.cache.plan.measure_ratios)",
        ratios=ratios,
        shard_format=reader.format,
    )  # fmt: skip


@dataclass
class FieldPlan:
    """One cache field, planned."""

    name: str
    dtype: str
    codec: str
    raw_bytes_per_token: float
    """Bytes per token before compression, every row (value and companion arrays)."""
    kept_fraction: float
    """Share of its rows that hold values (1 but for activation fields)."""
    ratio: float | None
    """Compression ratio over the rows holding values; None: never measured, costed uncompressed."""
    ratio_source: str
    """The `CompressionRatios.name` the ratio came from ("unmeasured" for None)."""
    bytes_per_token: float
    """Stored bytes per token (WebDataset: its members with their .npy headers; tar blocks apart)."""


@dataclass
class SplitPlan:
    """The shards of one split (the training sequences, or the held-out split)."""

    num_sequences: int
    num_shards: int
    sequences_per_shard: int
    files_per_shard: int
    """Files (objects) of a full shard, its completion record apart."""
    num_files: int
    """Files of every shard, completion records included."""
    data_bytes: float
    """What `lrc-cache inspect` counts as stored bytes: every shard file (Zarr metadata and tar blocks too)."""
    record_bytes: float
    """The completion records."""


@dataclass
class CachePlan:
    """What a cache built with `config` for a teacher of `geometry` over `num_tokens` tokens will be."""

    config: CacheConfig
    geometry: TeacherGeometry
    num_tokens: int
    """Training tokens: num_sequences * seq_len."""
    fields: list[FieldPlan]
    train: SplitPlan
    heldout: SplitPlan | None
    index_bytes: float
    """The tokenised index: 4 bytes a token (training and held-out), 8 a document when their count is known."""
    index_documents: int | None
    """Documents counted in index_bytes (None: not known, their starts left out)."""
    flops_per_token: float
    ratios: tuple[CompressionRatios, ...]

    @property
    def bytes_per_token(self) -> float:
        """The training shards' stored bytes per token: what `lrc-cache inspect` reports of the built cache."""
        return self.train.data_bytes / self.num_tokens

    @property
    def total_bytes(self) -> float:
        """Everything the cache directory holds: shards, records, manifest and the index."""
        held = self.heldout.data_bytes + self.heldout.record_bytes if self.heldout else 0.0
        return self.train.data_bytes + self.train.record_bytes + held + MANIFEST_BYTES + self.index_bytes

    @property
    def num_objects(self) -> int:
        """Files of the cache outside its index: shard files, completion records and the manifest (the
        index adds 1 + 3 per corpus unit, which the corpus decides)."""
        return self.train.num_files + (self.heldout.num_files if self.heldout else 0) + 1

    @property
    def flops(self) -> float:
        """Teacher forward FLOPs of the build, held-out sequences included."""
        held = self.heldout.num_sequences if self.heldout else 0
        return self.flops_per_token * (self.train.num_sequences + held) * self.config.seq_len

    def gpu_hours(self, tflops: float) -> float:
        """GPU-hours of the teacher forward at `tflops` achieved TFLOP/s per GPU."""
        return self.flops / (tflops * 1e12) / 3600

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the config as its fields)."""
        out = dataclasses.asdict(self)
        out["ratios"] = [{"name": r.name, "provenance": r.provenance, "shard_format": r.shard_format}
                         for r in self.ratios]
        out.update(bytes_per_token=self.bytes_per_token, total_bytes=self.total_bytes, num_objects=self.num_objects,
                   flops=self.flops)  # fmt: skip
        return out


def _field_plans(cfg: CacheConfig, geometry: TeacherGeometry, ratios: Sequence[CompressionRatios]) -> list[FieldPlan]:
    subset, budget = cfg.act_layer_fraction < 1, cfg.act_fraction < 1
    kept_rows = kept_fraction(cfg, geometry)
    plans = []
    for spec in cache_fields(cfg, geometry):
        kept = kept_rows if spec.name in ROW_FIELDS else 1.0
        ratio, source = None, "unmeasured"
        for table in ratios:
            ratio = table.lookup(spec.name, spec.dtype, subset, budget)
            if ratio is not None:
                source = table.name
                break
        raw = raw_bytes(spec) / cfg.seq_len
        stored = raw * kept / (ratio or 1.0)
        if cfg.format == "webdataset":  # each array of each sequence is a member with its own .npy header
            stored += len(stored_arrays(spec)) * WDS_MEMBER_OVERHEAD_BYTES / cfg.seq_len
        plans.append(FieldPlan(spec.name, spec.dtype, spec.codec, raw, kept, ratio, source, stored))
    return plans


def _split_plan(cfg: CacheConfig, specs: list[FieldSpec], plans: list[FieldPlan], num_sequences: int,
                num_layers: int) -> SplitPlan:  # fmt: skip
    """Shards, files and bytes of `num_sequences` sequences of the fields `specs` (costed by `plans`)."""
    per_shard = cfg.sequences_per_shard
    num_shards = math.ceil(num_sequences / per_shard)
    full, rest = divmod(num_sequences, per_shard)
    sizes = [per_shard] * full + ([rest] if rest else [])
    by_name = {p.name: p for p in plans}
    stats = RECORD_LAYER_BYTES * num_layers if any(s.name in ROW_FIELDS for s in specs) else 0
    files = data = records = 0.0
    shard_files = []
    for n in sizes:
        if cfg.format == "zarr":
            count, size = 1, ZARR_GROUP_JSON_BYTES
            for spec in specs:
                size += n * cfg.seq_len * by_name[spec.name].bytes_per_token
                for _, dtype, shape in stored_arrays(spec):
                    count += 1 + math.ceil(n / chunk_sequences(shape, dtype.itemsize, n))
                    size += ZARR_ARRAY_JSON_BYTES
        else:  # one tar: per member a header block and its data padded to whole blocks
            count, size = 1, 2 * TAR_BLOCK
            for spec in specs:
                field = by_name[spec.name]
                for _, dtype, shape in stored_arrays(spec):
                    values = math.prod(shape) * dtype.itemsize * field.kept_fraction / (field.ratio or 1.0)
                    member = WDS_MEMBER_OVERHEAD_BYTES + values
                    size += n * (TAR_BLOCK + TAR_BLOCK * math.ceil(member / TAR_BLOCK))
            size = TAR_RECORD * math.ceil(size / TAR_RECORD)
        shard_files.append(count)
        files += count + 1
        data += size
        records += RECORD_BASE_BYTES + RECORD_FILE_BYTES * count + stats
    return SplitPlan(num_sequences, num_shards, per_shard, shard_files[0] if shard_files else 0, int(files), data,
                     records)  # fmt: skip


def plan_cache(
    cfg: CacheConfig,
    geometry: TeacherGeometry,
    num_tokens: int,
    ratios: Sequence[CompressionRatios] = (SMOLLM2_RATIOS,),
    document_tokens: float | None = None,
) -> CachePlan:
    """Plan the cache `cfg` describes for a teacher of `geometry` over `num_tokens` training tokens.

    Args:
        cfg: The cache config; every field, shape, dtype, fraction and the shard format come from it.
        geometry: The teacher's shapes (`geometry_from_hf_config`).
        num_tokens: Training tokens; whole sequences of cfg.seq_len are planned (a remainder is dropped, as
            packing drops it).
        ratios: Tables consulted in order for each field's compression ratio.
        document_tokens: Mean tokens per corpus document, for the index's document starts and the held-out
            documents' tokens (None: those are left out of the index size).

    Returns:
        The plan. The held-out split is planned at its cap (cfg.heldout_sequences); its documents may pack
        into fewer.
    """
    num_sequences = num_tokens // cfg.seq_len
    if num_sequences < 1:
        raise ConfigError(f"{num_tokens} tokens make no sequence of cache.seq_len={cfg.seq_len}; plan at least "
                          f"{cfg.seq_len} tokens")  # fmt: skip
    if cfg.max_sequences is not None and num_sequences > cfg.max_sequences:
        raise ConfigError(f"{num_tokens} tokens are {num_sequences} sequences, over cache.max_sequences="
                          f"{cfg.max_sequences}; plan fewer tokens or raise max_sequences (null: no cap)")  # fmt: skip
    ratios = tuple(ratios)
    plans = _field_plans(cfg, geometry, ratios)
    num_layers = len(act_layers(cfg, geometry)) if cfg.activation_mode != "none" else 0
    train = _split_plan(cfg, cache_fields(cfg, geometry), plans, num_sequences, num_layers)
    heldout = None
    if cfg.heldout_docs:
        held_cfg = cfg if cfg.heldout_activations else dataclasses.replace(cfg, activation_mode="none")
        held_specs = cache_fields(held_cfg, geometry)
        heldout = _split_plan(cfg, held_specs, plans, cfg.heldout_sequences, num_layers if held_cfg is cfg else 0)
    index_tokens = num_tokens
    documents = None
    if document_tokens is not None:
        documents = math.ceil(num_tokens / document_tokens) + cfg.heldout_docs
        index_tokens += cfg.heldout_docs * document_tokens
    index_bytes = INDEX_TOKEN_BYTES * index_tokens + INDEX_DOCUMENT_BYTES * (documents or 0)
    return CachePlan(cfg, geometry, num_sequences * cfg.seq_len, plans, train, heldout, index_bytes, documents,
                     teacher_flops_per_token(cfg, geometry), ratios)  # fmt: skip
