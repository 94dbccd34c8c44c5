"""`lrc-cache build`: corpus -> tokenised index -> this worker's packed sequences -> one teacher forward
with hooks -> a writer thread -> cache shards, written chunk by chunk.

The teacher runs in `transformers` with hooks (`capture_batch`) or, with cache.run.backend=vllm, in vLLM
(`vllm_backend.VLLMCapture`, logit signals and residual activations); both return the same fields.

Shard i is a fixed slice of the packed corpus, so any shard can be built, rebuilt or verified on its
own: a rerun skips complete shards, several processes (a Slurm array, `accelerate launch`) split the
shards between them, and a rebuild with the same config is byte-identical. The held-out documents
(cache.heldout_docs) are packed by the same arithmetic into the cache's held-out split, whose shards
(`shards/heldout-*`) the teacher captures like any other, split between the processes the same way.
With cache.document_mask the teacher sees each packed document alone (`capture_batch`), held-out ones too.
With cache.run.tensor_parallel_size > 1 (backend hf, under torchrun) each group of that many processes is
one worker whose teacher is split between them; the group's rank 0 builds and writes, the others run the
same forwards (`tensor_parallel`).

Legend: B batch, T tokens (seq_len), P positions, L activation layers, D hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache import (
    HELDOUT,
    CacheWriter,
    Manifest,
    FieldSpec,
    TeacherGeometry,
    act_layers,
    cache_fields,
    make_manifest,
    num_act_positions,
)
from ..cache.act_stats import act_layer_mask, act_present, batch_act_sums, keep_mask, merge_act_sums, sink_flags
from ..cache.schema import ROW_CODED_DTYPES
from ..config import CLONE_TERMS, CacheConfig, ConfigError
from ..teacher.fingerprint import teacher_fingerprints
from ..teacher.hooks import RESIDUAL_TERMS, capture_teacher
from ..teacher.load import Teacher, load_teacher, prepare_tensor_parallel, resolve_device, resolve_dtype
from ..data import CorpusError, CorpusSpec
from ..data.index import PackedIndex, TokenIndex, my_units, open_heldout, open_index, tokenize_units
from ..storage import Location, as_location
from ..teacher.fingerprint import tokenizer_fingerprint
from .writer import ShardPipeline, host_ready, to_host
from .positions import sample_positions_batch
from .signals import logit_fields
from .tensor_parallel import Leader, TensorParallelLayout, follow, process_group, tensor_parallel_layout
from .vllm_backend import check_serves, open_vllm, require_vllm, vllm_version

__all__ = ["BuildReport", "build_cache", "tokenize_corpus", "corpus_spec", "teacher_geometry", "my_shards",
           "my_heldout_shards", "capture_batch"]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """What one build process did."""

    out: str
    num_shards: int
    built: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    heldout_built: list[int] = field(default_factory=list)
    """Held-out shards built (`shards/heldout-*`)."""
    heldout_skipped: list[int] = field(default_factory=list)
    """Held-out shards found complete and skipped."""
    tokens: int = 0
    """Tokens captured, held-out ones included."""
    seconds: float = 0.0
    follower: bool = False
    """A tensor-parallel follower: it ran its group's forwards and wrote nothing (its leader reports the
    shards; `num_shards` is then 0)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def teacher_geometry(config) -> TeacherGeometry:
    """The shapes a cache needs from a teacher config."""
    heads = config.num_attention_heads
    return TeacherGeometry(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
    )


def my_shards(num_shards: int, worker: int | None = None, num_workers: int | None = None) -> list[int]:
    """The shards worker `worker` of `num_workers` builds: I, I+N, I+2N, ...; all without a worker; shard I
    alone without a worker count (one worker per shard)."""
    if worker is None:
        return list(range(num_shards))
    if num_workers is None:
        if not 0 <= worker < num_shards:
            raise ConfigError(f"--worker-index {worker} is outside [0, {num_shards}) for this cache (one worker per "
                              "shard without --num-workers)")  # fmt: skip
        return [worker]
    if not 0 <= worker < num_workers:
        raise ConfigError(f"--worker-index {worker} must be in [0, --num-workers {num_workers})")
    return list(range(worker, num_shards, num_workers))


def my_heldout_shards(num_heldout_shards: int, worker: int | None = None, num_workers: int | None = None) -> list[int]:
    """The held-out shards worker `worker` of `num_workers` builds, split as `my_shards` splits the training
    shards: I, I+N, I+2N, ...; all without a worker; held-out shard I, if there is one, without a worker
    count (one worker per shard: together they build every held-out shard)."""
    if worker is None:
        return list(range(num_heldout_shards))
    if num_workers is None:
        return [worker] if worker < num_heldout_shards else []
    return list(range(worker, num_heldout_shards, num_workers))


@torch.no_grad()
def capture_batch(
    teacher: Teacher, cfg: CacheConfig, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor,
    sequence_indices: list[int], layers: list[int],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """Run the teacher on one batch; return the cache fields (CPU, logical dtypes) and summed stats
    (floats, plus ``act_stats``: see `lrc_offline.cache.act_stats`)."""
    device = next(teacher.model.parameters()).device
    ids = input_ids_BT.to(device).long()
    batch, tokens = ids.shape
    positions = None
    terms: tuple[str, ...] = ()
    if cfg.activation_mode != "none":
        positions = sample_positions_batch(
            sequence_indices, tokens, num_act_positions(cfg, tokens), cfg.seed, cfg.include_sink, position_ids_BT
        ).to(device)
        # The seven targets are gathered in residual mode too, for the statistics only (P positions: cheap).
        terms = (*RESIDUAL_TERMS, *CLONE_TERMS) if cfg.activation_mode == "residual" else CLONE_TERMS
    # cache.document_mask: the packing's position ids (restarting at each document) go to the teacher, whose
    # attention they split into one causal block per document; otherwise positions 0..T-1, one block.
    captured = capture_teacher(
        teacher.model, ids, positions_BP=positions, layers=layers, terms=terms,
        want_logits=cfg.logit_mode in ("topk", "sampled"), want_hidden=cfg.logit_mode == "hidden",
        position_ids_BT=position_ids_BT.to(device).long() if cfg.document_mask else None,
    )  # fmt: skip
    out = {"input_ids": input_ids_BT.to(torch.int32), "position_ids": position_ids_BT.to(torch.int32)}
    stats = {"tokens": float(batch * tokens)}
    if captured.logits_BTV is not None:
        fields, logit_stats = logit_fields(cfg, captured.logits_BTV, sequence_indices)
        out.update(fields)
        stats.update(logit_stats)
    if captured.hidden_BTD is not None:
        out["hidden"] = to_host(captured.hidden_BTD.float())
    if positions is not None:
        present_B = torch.tensor([act_present(cfg.seed, j, cfg.act_fraction) for j in sequence_indices])
        sink_BP = sink_flags(positions, position_ids_BT.to(device))
        stats["act_stats"] = batch_act_sums({m: captured.acts[m] for m in CLONE_TERMS}, sink_BP, present_B)
        out["act_positions"] = to_host(positions.to(torch.int32))
        names = {"input": "act_input", "attn": "act_attn"} if cfg.activation_mode == "residual" else {
            m: f"act_{m}" for m in CLONE_TERMS}  # fmt: skip
        layer_mask_BLP = None
        if cfg.act_layer_fraction < 1:
            start_BP = positions.cpu() == 0  # the sequence start carries every layer
            layer_mask_BLP = torch.stack([
                act_layer_mask(cfg.seed, j, len(layers), positions.shape[1], cfg.act_layer_fraction, start_P)
                for j, start_P in zip(sequence_indices, start_BP)])  # fmt: skip
            out["act_layer_mask"] = layer_mask_BLP.to(torch.uint8)
        # rows left as zeros: the activation budget's sequences, the layer subset's layers
        budget_B = present_B if cfg.act_fraction < 1 else None
        keep_BLP = keep_mask(budget_B, layer_mask_BLP, len(layers), positions.shape[1])
        keep_BLP1 = None if keep_BLP is None else keep_BLP[..., None].to(device)
        for term, name in names.items():
            acts_BLPW = captured.acts[term].transpose(0, 1).float()  # [B, L, P, W]
            out[name] = to_host(acts_BLPW if keep_BLP1 is None else acts_BLPW * keep_BLP1)
        if cfg.act_fraction < 1:
            out["act_present"] = present_B.to(torch.uint8)[:, None]
    return out, stats


def _storage_dtypes(
    arrays: dict[str, torch.Tensor], fields: tuple[FieldSpec, ...], ready: Callable[[], None] = lambda: None
) -> dict[str, torch.Tensor]:
    """Cast each field to the logical dtype the manifest declares (float8, int4 and log8 are coded by the
    store), once `ready` says the batch's copies from the device have landed."""
    ready()
    dtypes = {spec.name: spec.dtype for spec in fields}
    out = {}
    for name, value in arrays.items():
        dtype = dtypes[name]
        out[name] = value if dtype in ROW_CODED_DTYPES else value.to(getattr(torch, dtype))
    return out


def build_cache(
    cfg: CacheConfig,
    out: str | Path | Location,
    shard_index: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    teacher: Teacher | None = None,
) -> BuildReport:
    """Build (or complete) the cache at `out`.

    Args:
        cfg: what to capture and how to store it.
        out: cache directory or fsspec URL (s3://bucket/prefix; see `lrc_offline.storage`), reached with
            ``cfg.run.storage_options``.
        shard_index, num_workers: build a subset (see `my_shards`); None builds every shard. Under tensor
            parallelism: this group's place (`TensorParallelLayout.worker_split`); None: the launch's
            groups split the shards between them.
        progress: show a progress bar.
        teacher: an already loaded teacher (must be the one `cfg.teacher` names); loaded when None.

    Raises:
        CacheMismatchError: `out` holds a cache built with a different config (the message lists what differs).
        CorpusError, TeacherLoadError: bad corpus or teacher.
        CacheFormatError, ConfigError: the config does not fit the teacher (a layer it lacks, top-k beyond its
            vocabulary, a tensor-parallel size that does not divide its heads), the worker split is malformed,
            or a tensor-parallel build lacks its torchrun launch; raised before anything is written.
    """
    start = time.perf_counter()
    cfg = cfg.resolved()  # the manifest records act_positions=auto as its number
    out = as_location(out, cfg.run.storage_options)
    layout = tensor_parallel_layout(cfg.run)
    with contextlib.ExitStack() as group:
        if layout is not None:
            if teacher is None:  # before the group waits for all its ranks: a wrong size fails every rank now
                prepare_tensor_parallel(cfg.teacher, layout.size)
            group.enter_context(process_group(layout))
            if shard_index is None:
                shard_index, num_workers = layout.worker_split(None, None)
        teacher = _teacher_for(cfg, teacher, layout)
        _check_before_writing(cfg, teacher, shard_index, num_workers)
        # Under tensor parallelism a collective (the weights are gathered): every rank of the group, here.
        fingerprints = teacher_fingerprints(teacher.model, teacher.tokenizer)
        if layout is not None and not layout.leader:
            return _follow(cfg, teacher, layout, out, start)
        return _build(cfg, out, shard_index, num_workers, progress, teacher, fingerprints, layout, start)


def _follow(cfg: CacheConfig, teacher: Teacher, layout: TensorParallelLayout, out: Location, start: float) -> BuildReport:
    """A tensor-parallel follower's build: its group's forwards, nothing written."""
    layers = act_layers(cfg, teacher_geometry(teacher.config))
    capture = functools.partial(capture_batch, teacher, cfg, layers=layers)
    without = functools.partial(capture_batch, teacher, dataclasses.replace(cfg, activation_mode="none"), layers=layers)
    report = BuildReport(out=str(out), num_shards=0, follower=True)
    report.tokens = follow(layout, capture, without)
    report.seconds = time.perf_counter() - start
    return report


def _build(
    cfg: CacheConfig, out: Location, shard_index: int | None, num_workers: int | None, progress: bool,
    teacher: Teacher, fingerprints: dict[str, str], layout: TensorParallelLayout | None, start: float,
) -> BuildReport:  # fmt: skip
    """The build loop of one worker (a tensor-parallel group's leader included)."""
    created = not out.exists()
    packed, heldout, manifest, layers = _plan(cfg, teacher, out, shard_index, num_workers, fingerprints)
    try:
        shards = my_shards(manifest.num_shards, shard_index, num_workers)  # before any shard or manifest
    except ConfigError:
        if created:
            out.remove("")  # only the index was written: leave nothing behind
        raise
    writer = CacheWriter(out, manifest)
    report = BuildReport(out=str(out), num_shards=manifest.num_shards)
    todo = [i for i in shards if not writer.is_complete(i, check_sizes=True)]
    report.skipped = [i for i in shards if i not in todo]
    held_writer = _heldout_writer(cfg, writer)
    held_todo: list[int] = []
    if held_writer is not None:
        held_shards = my_heldout_shards(held_writer.num_shards, shard_index, num_workers)
        held_todo = [i for i in held_shards if not held_writer.is_complete(i, check_sizes=True)]
        report.heldout_skipped = [i for i in held_shards if i not in held_todo]
    total_tokens = sum(len(range(*writer.shard_range(i))) for i in todo) * cfg.seq_len
    if held_todo:
        total_tokens += sum(len(range(*held_writer.shard_range(i))) for i in held_todo) * cfg.seq_len
    bar = tqdm(total=total_tokens, desc="lrc-cache build", unit="tok", unit_scale=True, disable=not progress)
    with contextlib.ExitStack() as engine:
        if cfg.run.backend == "vllm" and (todo or held_todo):
            capture = held_capture = engine.enter_context(open_vllm(cfg, teacher)).capture
        else:
            held_cfg = _heldout_config(cfg, writer.manifest)
            capture = functools.partial(capture_batch, teacher, cfg, layers=layers)
            held_capture = functools.partial(capture_batch, teacher, held_cfg, layers=layers)
        lead = Leader(layout) if layout is not None else None
        if lead is not None:  # the followers run each batch's forward with the leader
            capture = lead.wrap(capture, activations=cfg.activation_mode != "none")
            held_capture = lead.wrap(held_capture, activations=held_cfg.activation_mode != "none")
        if held_todo:  # first: a cache still being built has its held-out split early
            held_pipeline = engine.enter_context(ShardPipeline(held_writer, cfg.run.write_queue))
            for index in held_todo:
                _capture_shard(held_capture, heldout, held_writer, held_pipeline, index, cfg, bar,
                               first_sequence=writer.manifest.num_sequences)  # fmt: skip
            held_pipeline.finish()
            report.heldout_built = list(held_pipeline.committed)
        # The teacher runs the next batch while the writer thread casts, compresses and writes this one.
        pipeline = engine.enter_context(ShardPipeline(writer, cfg.run.write_queue))
        for index in todo:
            _capture_shard(capture, packed, writer, pipeline, index, cfg, bar)
            done = pipeline.committed
            bar.set_postfix(shards=f"{len(done)}/{len(todo)}", written=f"{pipeline.bytes_written / 2**20:.1f}MiB")
        pipeline.finish()
        report.built = list(pipeline.committed)
        if lead is not None:
            lead.stop()
    report.tokens = sum(len(range(*writer.shard_range(i))) for i in report.built) * cfg.seq_len
    if report.heldout_built:
        report.tokens += sum(len(range(*held_writer.shard_range(i))) for i in report.heldout_built) * cfg.seq_len
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def corpus_spec(cfg: CacheConfig) -> CorpusSpec:
    """The corpus a cache config names."""
    return CorpusSpec(cfg.corpus, cfg.text_field, cfg.corpus_split, cfg.corpus_config, cfg.corpus_revision)


def tokenize_corpus(
    cfg: CacheConfig, out: str | Path | Location, tokenizer, worker: int | None = None, num_workers: int | None = None,
    all_missing: bool = False,
) -> TokenIndex:  # fmt: skip
    """Tokenise this worker's units of the corpus into the index under `out` (see `data.index`).

    Args:
        worker, num_workers: this worker's place in the split (unit u goes to worker u mod N); None: all.
        all_missing: afterwards, also tokenise every unit still missing (a build that finds the index
            incomplete does this, so a lone worker or a build without a tokenise phase still runs).

    Raises:
        CorpusError: bad corpus, or an index there built for another corpus or tokenizer. When this call
            created `out`, it is removed again: nothing half-written is left.
    """
    out = as_location(out, cfg.run.storage_options)
    created = not out.exists()
    try:
        index = TokenIndex.create(out, corpus_spec(cfg), tokenizer, tokenizer_fingerprint(tokenizer))
        units = my_units(len(index.units), worker, num_workers)
        if num_workers is None and worker is not None:  # a single shard: tokenise everything
            units = my_units(len(index.units), None, None)
        tokenize_units(index, tokenizer, units)
        missing = index.missing() if all_missing else []
        if missing:
            log.warning("the tokenised index lacks %d unit(s) of other workers; tokenising them here (run "
                        "`lrc-cache tokenize` as its own phase to split this work)", len(missing))  # fmt: skip
            tokenize_units(index, tokenizer, missing)
        return index
    except CorpusError:
        if created:
            out.remove("")
        raise


def _check_before_writing(cfg: CacheConfig, teacher: Teacher, worker: int | None, num_workers: int | None) -> None:
    """Refuse, before the index or anything else is written, what the config and the teacher's config
    alone show to be wrong: the fields (activation layers the teacher lacks, top-k beyond its vocabulary,
    ...) and a worker index outside the split. A --worker-index without --num-workers needs the shard
    count, known only once the corpus is tokenised: `build_cache` checks it then."""
    cache_fields(cfg, teacher_geometry(teacher.config))
    if num_workers is not None:
        my_shards(0, worker, num_workers)


def _heldout_writer(cfg: CacheConfig, writer: CacheWriter) -> CacheWriter | None:
    """The writer of the cache's held-out split; None without one (heldout_docs=0, or a cache begun
    before held-out splits were stored, whose build goes on without one: said once)."""
    if writer.manifest.heldout is None:
        if cfg.heldout_docs:
            log.warning("%s was begun before caches stored a held-out split: its %d held-out documents are not "
                        "captured (training re-reads them from the corpus); build into a new directory for a "
                        "held-out split in the cache", writer.root, cfg.heldout_docs)  # fmt: skip
        return None
    return CacheWriter(writer.location, writer.manifest, split=HELDOUT)


def _heldout_config(cfg: CacheConfig, manifest: Manifest) -> CacheConfig:
    """The config the held-out shards are captured with: without activations unless the split stores them."""
    if manifest.heldout is None or manifest.heldout.activations:
        return cfg
    return dataclasses.replace(cfg, activation_mode="none")


def _teacher_for(cfg: CacheConfig, teacher: Teacher | None, layout: TensorParallelLayout | None = None) -> Teacher:
    """The given teacher, else `cfg.teacher` loaded on the run's device and dtype (on the CPU for the
    vLLM backend: vLLM holds the weights that run; this copy fingerprints them and lends its final norm
    and head; split between the group's processes under tensor parallelism, each on its own device)."""
    run = cfg.run
    device = resolve_device(run.device) if layout is None else layout.device
    dtype = resolve_dtype(run.compute_dtype, device)
    if run.backend == "vllm":
        require_vllm()
        device = torch.device("cpu")
    size = 1 if layout is None else layout.size
    teacher = teacher or load_teacher(cfg.teacher, dtype=dtype, device=device, tensor_parallel_size=size)
    if run.backend == "vllm":
        check_serves(teacher)
    return teacher


def _plan(
    cfg: CacheConfig, teacher: Teacher, out: Location, worker: int | None, num_workers: int | None,
    fingerprints: dict[str, str],
) -> tuple[PackedIndex, PackedIndex | None, Manifest, list[int]]:  # fmt: skip
    """The packed corpus (from the tokenised index, tokenising what is missing), its packed held-out
    documents (None without), the manifest they and the teacher (its `fingerprints`) make, and the
    activation layers."""
    index = tokenize_corpus(cfg, out, teacher.tokenizer, worker, num_workers, all_missing=True)
    try:
        packed = open_index(index, cfg.seq_len, cfg.heldout_docs, cfg.max_sequences)
        heldout = None
        if cfg.heldout_docs:
            heldout = open_heldout(index, cfg.seq_len, cfg.heldout_docs, cfg.heldout_sequences)
    except CorpusError:
        if not out.files("shards") and not out.exists("manifest.json"):
            out.remove("")  # nothing but the index: leave nothing half-made
        raise
    geometry = teacher_geometry(teacher.config)
    layers = act_layers(cfg, geometry)
    fingerprints = {**fingerprints, "corpus": packed.fingerprint}
    extra = {
        "packing": {"num_documents": packed.num_documents, "num_tokens": packed.num_tokens,
                    "dropped_tokens": packed.dropped_tokens, "heldout_docs": packed.heldout_documents,
                    "bos_token_id": teacher.tokenizer.bos_token_id, "eos_token_id": teacher.tokenizer.eos_token_id},
        "backend": _backend_record(cfg.run.backend),
        "teacher_name": cfg.teacher,
        **({"teacher_revision": teacher.revision} if teacher.revision else {}),  # a Hub id's resolved commit
    }  # fmt: skip
    manifest = make_manifest(cfg, geometry, fingerprints, packed.num_sequences, extra,
                             heldout_sequences=0 if heldout is None else heldout.num_sequences)  # fmt: skip
    return packed, heldout, manifest, layers


def _capture_shard(capture, packed: PackedIndex, writer: CacheWriter, pipeline: ShardPipeline, index: int,
                   cfg: CacheConfig, bar, first_sequence: int = 0) -> None:  # fmt: skip
    """Capture shard `index` batch by batch, handing each batch to the writer thread; the shard's
    statistics go with its commit. A sequence's seeds (positions, draws) take its index plus
    `first_sequence` (a held-out split's: after every training sequence)."""
    first, end = writer.shard_range(index)
    input_ids, position_ids = packed.sequences(first, end)  # this shard's sequences only
    sums: dict[str, float] = {}
    act_sums = None
    pipeline.open(index)
    for lo in range(first, end, cfg.run.batch_size):
        hi = min(lo + cfg.run.batch_size, end)
        arrays, stats = capture(input_ids[lo - first : hi - first], position_ids[lo - first : hi - first],
                                list(range(first_sequence + lo, first_sequence + hi)))  # fmt: skip
        ready = host_ready()  # the batch's device-to-host copies are queued, not waited for
        pipeline.write(functools.partial(_storage_dtypes, arrays, writer.fields, ready))  # cast in the writer thread
        act_sums = merge_act_sums(act_sums, stats.pop("act_stats")) if "act_stats" in stats else act_sums
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.update((hi - lo) * cfg.seq_len)
    shard_stats = _shard_stats(sums)
    if act_sums is not None:
        shard_stats["act_stats"] = act_sums
    pipeline.commit(shard_stats)


def _backend_record(backend: str) -> dict[str, str]:
    """The backend and library versions that computed the teacher signal, for the manifest."""
    record = {"name": backend, "transformers": __import__("transformers").__version__}
    if backend == "vllm":
        record["vllm"] = vllm_version()
    return record


def _shard_stats(sums: dict[str, float]) -> dict[str, float]:
    tokens = max(sums.get("tokens", 0.0), 1.0)
    stats = {}
    for key, value in sums.items():
        if key.endswith("_sum"):
            stats[key[: -len("_sum")] + "_mean"] = value / tokens
    return stats
