"""Configuration dataclasses shared by both stages.

One root config per stage, made of per-part dataclasses. Every field carries a docstring under it,
which doubles as help text (`lrc-cache build --help-config`, `lrc-train train --help-config`; see
`config_help.py`). Presets are named functions; overrides are dotted ``key=value`` strings
(``cache.topk=32``). The resolved config is saved with every artifact (manifest, checkpoint, export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BuildRunConfig",
    "CacheConfig",
    "StudentConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "ExportConfig",
    "TrainJobConfig",
    "ConfigError",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "load_config",
    "save_config",
    "config_yaml",
]

LOGIT_MODES = ("topk", "sampled", "hidden", "none")
ACTIVATION_MODES = ("residual", "targets", "none")
FORMATS = ("zarr", "webdataset")
STORAGE_DTYPES = ("float32", "bfloat16", "float16", "float8", "int4", "int4g")
LOGPROB_DTYPES = ("float32", "float16", "bfloat16", "log8")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
CLONE_TERMS = ("q", "k", "v", "o", "gate", "up", "down")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A user's configuration is invalid; the message names the field and the fix."""


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not one of {list(choices)}")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_device(section: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ConfigError(f"{section}.{name}={value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def _check_storage_options(section: str, options: dict[str, Any]) -> None:
    from .storage import StorageError, check_storage_options

    try:
        check_storage_options(options, f"{section}.storage_options")
    except StorageError as err:
        raise ConfigError(str(err)) from None


def _check_positive(section: str, name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if (value < 0) if allow_zero else (value <= 0):
        raise ConfigError(f"{section}.{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class BuildRunConfig:
    """How one build process runs the teacher (stage 1): batch size, device, dtype and engine.

    Not part of the cache's contract: the manifest's ``config`` leaves it out and records the creating
    process's choice under ``build``, and workers of one cache may differ in it.
    """

    batch_size: int = 8
    """Sequences per teacher forward."""
    device: str = "auto"
    """Teacher device: auto (cuda if present), cpu, cuda[:N] or mps."""
    compute_dtype: str = "auto"
    """Teacher compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16."""
    backend: str = "hf"
    """Teacher backend: hf (transformers with hooks; every mode) or vllm (logit signals and
    activation_mode=residual or none; installed by ./setup_vllm.sh, see docs/vllm.md)."""
    write_queue: int = 2
    """Captured batches that may wait for the writer thread, which casts, compresses and writes them
    while the teacher runs the next batch (host memory: this many batches' fields)."""
    tensor_parallel_size: int = 1
    """Devices (processes) one teacher replica is split across by tensor parallelism, for a teacher larger
    than one device. backend=hf: launch with `torchrun --nproc-per-node N` (N a multiple of this size; each
    group of this many ranks is one build worker, whose rank 0 writes), the teacher loaded with transformers'
    tensor-parallel plan, each process reading only its slices of the weights; it must divide the teacher's
    attention and KV heads (docs/tensor_parallel.md). backend=vllm: vLLM's own tensor parallelism. The data
    written is the same as a one-device build's (float fields within rounding): workers of one cache may use
    different sizes."""
    vllm_tensor_parallel_size: int | None = None
    """Deprecated name of tensor_parallel_size (same meaning; a build warns); None: unset."""
    vllm_pipeline_parallel_size: int = 1
    """backend=vllm: pipeline stages one teacher replica is split across."""
    vllm_gpu_memory_utilization: float = 0.9
    """backend=vllm: fraction of each device's memory vLLM may take for weights and KV cache (on vLLM's
    CPU build, the fraction of the CPU memory node it reserves)."""
    vllm_enforce_eager: bool = True
    """backend=vllm: run without torch.compile and CUDA graphs; a build is prefill only, where they gain
    little and compiling costs minutes at start-up."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """For an --out URL (s3://bucket/prefix, gs://...): options of its fsspec filesystem, e.g.
    {endpoint_url: ..., profile: ..., client_kwargs: {region_name: ...}} for s3fs. No secrets (refused):
    credentials come from the standard chain (environment, AWS_ENDPOINT_URL, profile, instance role)."""

    def __post_init__(self) -> None:
        s = "cache.run"
        _check_positive(s, "batch_size", self.batch_size)
        _check_positive(s, "write_queue", self.write_queue)
        _check_choice(s, "compute_dtype", self.compute_dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice(s, "backend", self.backend, ("hf", "vllm"))
        _check_device(s, "device", self.device)
        _check_positive(s, "tensor_parallel_size", self.tensor_parallel_size)
        _check_positive(s, "vllm_tensor_parallel_size", self.vllm_tensor_parallel_size)
        alias = self.vllm_tensor_parallel_size
        # 1 was the old name's default (configs printed before the rename carry it): it asks for nothing.
        if alias not in (None, 1, self.tensor_parallel_size):
            if self.tensor_parallel_size != 1:
                raise ConfigError(f"{s}.vllm_tensor_parallel_size={alias} and {s}.tensor_parallel_size="
                                  f"{self.tensor_parallel_size} disagree: the first is the deprecated name of the "
                                  "second; set tensor_parallel_size alone")  # fmt: skip
            self.tensor_parallel_size = alias
        _check_positive(s, "vllm_pipeline_parallel_size", self.vllm_pipeline_parallel_size)
        _check_storage_options(s, self.storage_options)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"{s}.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must be in (0, 1]")


@dataclass
class CacheConfig:
    """What the teacher cache holds and how it is laid out (stage 1)."""

    teacher: str = "tiny-random:llama"
    """Teacher: a Hugging Face directory, a .gguf file, or a built-in name (tiny-random:llama, smollm2-135m)."""
    corpus: str = "tiny-text"
    """Corpus: text/JSONL/Parquet file, folder or glob, or a built-in name (wiki-en, tiny-text)."""
    text_field: str = "text"
    """Field holding the text in JSON Lines and Parquet corpora."""
    corpus_split: str = "train"
    """Corpus given as a dataset id (org/name, read from the local Hugging Face cache): the split."""
    corpus_config: str | None = None
    """Corpus given as a dataset id: the dataset's configuration (subset) name."""
    corpus_revision: str | None = None
    """Corpus given as a dataset id: the revision (branch, tag or commit) to read."""
    heldout_docs: int = 0
    """Number of documents kept apart from the training sequences (taken from the end of the corpus) for
    evaluation; the cache holds them as its held-out split (see heldout_sequences)."""
    heldout_sequences: int = 256
    """Cap on the held-out split: sequences packed from the held-out documents (as the training ones are),
    captured by the teacher like any shard and stored as held-out shards (shards/heldout-*), from which
    training evaluates without the corpus or a teacher forward. Needs heldout_docs >= 1; the documents
    may pack into fewer."""
    heldout_activations: bool = False
    """Store the activation fields in the held-out shards too (off: they hold the token ids and the logit
    signal, all held-out evaluation reads, and activations would cost their bytes for no metric)."""
    seq_len: int = 64
    """Tokens per packed sequence."""
    document_mask: bool = False
    """The teacher sees each packed document alone: its position ids restart at every document start and
    its attention stops at document boundaries (a block-diagonal causal mask), so a document's fields equal
    those of the document captured on its own. Training then masks the student the same way
    (train.document_mask=auto). Off (and in caches built before this option): the teacher attends across
    the documents packed into a sequence, with positions 0..seq_len-1. backend=hf only."""
    max_sequences: int | None = None
    """Cap on the number of packed sequences (None: the whole corpus)."""
    sequences_per_shard: int = 64
    """Packed sequences per shard; shard i holds sequences [i*S, (i+1)*S)."""
    format: str = "zarr"
    """Shard file format: zarr (one Zarr v3 group per shard) or webdataset (one tar per shard)."""
    logit_mode: str = "topk"
    """Logit signal: topk (ids + log-probs), sampled (ids + counts), hidden (final normed hidden state) or none."""
    topk: int = 64
    """k for logit_mode=topk."""
    temperature: float = 1.0
    """Temperature tau at which top-k log-probs and samples are taken (hidden mode is temperature-free)."""
    num_draws: int = 64
    """N, the number of teacher draws per token for logit_mode=sampled."""
    logprob_dtype: str = "float16"
    """Storage dtype of top-k log-probs: float16 by default (half of float32's bytes; the measured default of
    benchmarks/README.md), float32 for bit-exact log-probs, or log8 (lossy: 8-bit steps of 1/16 nat below the
    row max, which is kept exactly; docs/cache_format.md)."""
    activation_mode: str = "residual"
    """Clone-loss activations: residual (layer input and attention output), targets (all seven) or none."""
    act_layers: list[int] | None = None
    """Teacher layers whose activations are stored (None: every layer)."""
    act_positions: int | str = "auto"
    """P, token positions per sequence at which activations are stored (>= seq_len stores every position).
    auto: max(16, seq_len // 64), at most seq_len: 16 up to 1,024-token sequences, 32 at 2,048 (what the
    quality runs measured: 16 of 64 to 256 tokens; the production caches' 32 of 2,048), growing with the
    sequence beyond. The manifest records the resolved number."""
    include_sink: bool = True
    """Always include the attention sinks (position 0 and the other document starts, where the teacher has
    massive activations) among the sampled positions."""
    act_fraction: float = 1.0
    """Activation budget: the fraction of sequences that carry activations (a seeded choice per sequence;
    the others store zeros, flagged by act_present, and train without the clone loss)."""
    act_layer_fraction: float = 0.25
    """Per-position layer subset: each activation position stores ceil(f L) of the L stored layers, a
    seeded choice per sequence that covers every layer across the sequence's positions when P ceil(f L) >= L,
    and the sequence's start (position 0, the strongest attention sink) stores every layer (the others
    store zeros, flagged by act_layer_mask). The clone loss then sees every layer in every sequence, at
    about a fraction f of the activation bytes."""
    act_dtype: str = "int4g"
    """Storage dtype of activations and hidden states (float8 and int4 are lossy, with a per-row scale; int4
    quantises each row after a fixed random Hadamard rotation; int4g, the default, is int4 with a scale per
    64 rotated elements, 1/16 more bytes; docs/cache_format.md). With act_layer_fraction 0.25 and fp16
    log-probs it is the measured default: held-out CE within 0.1% of bf16 residuals at every layer, at a
    seventh of the bytes (benchmarks/README.md). bfloat16 or float32 for lossless activations (and for
    logit_mode=hidden, whose KD equals the full-vocabulary KL only from lossless hidden states)."""
    seed: int = 0
    """Seed for position sampling and sampled-KD draws; a rebuild with the same seed is identical."""
    run: BuildRunConfig = field(default_factory=BuildRunConfig)
    """How this build process runs the teacher; not part of what the cache holds (see BuildRunConfig)."""

    def __post_init__(self) -> None:
        s = "cache"
        _check_choice(s, "format", self.format, FORMATS)
        _check_choice(s, "logit_mode", self.logit_mode, LOGIT_MODES)
        _check_choice(s, "activation_mode", self.activation_mode, ACTIVATION_MODES)
        _check_choice(s, "logprob_dtype", self.logprob_dtype, LOGPROB_DTYPES)
        _check_choice(s, "act_dtype", self.act_dtype, STORAGE_DTYPES)
        if self.run.backend == "vllm" and self.activation_mode == "targets":
            raise ConfigError(
                "cache.run.backend=vllm cannot capture activation_mode=targets: vLLM fuses q/k/v and gate/up into "
                "single projections and the vLLM backend taps only each layer's input and attention output; set "
                "cache.activation_mode=residual (the same clone targets, recomputed at train time), or use "
                "cache.run.backend=hf"
            )
        if (self.run.backend == "vllm" and self.activation_mode == "residual" and self.heldout_docs
                and not self.heldout_activations):  # fmt: skip
            raise ConfigError(
                "cache.run.backend=vllm with activation_mode=residual captures the held-out split with activations "
                "too: set cache.heldout_activations=true, or cache.heldout_docs=0, or use cache.run.backend=hf"
            )
        if self.run.backend == "vllm" and self.document_mask:
            raise ConfigError(
                "cache.run.backend=vllm cannot capture cache.document_mask=true: the vLLM backend runs each packed "
                "sequence as one prompt, attending across its documents; use cache.run.backend=hf for a "
                "document-masked cache, or cache.document_mask=false"
            )
        if isinstance(self.act_positions, str) and self.act_positions != "auto":
            raise ConfigError(f"cache.act_positions={self.act_positions!r} must be a positive integer or auto")
        for name in ("seq_len", "sequences_per_shard", "topk", "num_draws"):
            _check_positive(s, name, getattr(self, name))
        if self.act_positions != "auto":
            _check_positive(s, "act_positions", self.act_positions)
        _check_positive(s, "max_sequences", self.max_sequences)
        _check_positive(s, "heldout_docs", self.heldout_docs, allow_zero=True)
        _check_positive(s, "heldout_sequences", self.heldout_sequences)
        if self.temperature <= 0:
            raise ConfigError(f"cache.temperature={self.temperature} must be > 0")
        if not 0 < self.act_fraction <= 1:
            raise ConfigError(f"cache.act_fraction={self.act_fraction} must be in (0, 1]")
        if not 0 < self.act_layer_fraction <= 1:
            raise ConfigError(f"cache.act_layer_fraction={self.act_layer_fraction} must be in (0, 1]")
        if self.seq_len < 2:
            raise ConfigError("cache.seq_len must be at least 2 (next-token targets need two tokens)")

    @property
    def num_act_positions(self) -> int:
        """P, the activation positions stored per sequence: act_positions with auto resolved, at most seq_len."""
        if self.act_positions == "auto":
            return min(self.seq_len, max(16, self.seq_len // 64))
        return min(self.act_positions, self.seq_len)

    def resolved(self) -> "CacheConfig":
        """This config with every `auto` choice made (act_positions): what a build runs and its manifest
        records. A number given stays as given (a manifest holds what was asked), auto becomes its number."""
        if self.act_positions != "auto":
            return self
        return dataclasses.replace(self, act_positions=self.num_act_positions)


@dataclass
class StudentConfig:
    """The LRC student: only the hidden size shrinks."""

    hidden_size: int = 32
    """d_S, the student's hidden size."""
    init: str = "auto"
    """Projection init: random (N(0, init_std), as in the paper), pca (top principal directions of the
    teacher's residual stream, from the cache's residual activations or, online, a short teacher pass), or
    auto: pca where residual activations are at hand, else random. On SmolLM2 the PCA start reached every
    held-out loss first (benchmarks/README.md)."""
    head: str = "auto"
    """Output head: auto (tied exactly when the teacher's is; on SmolLM2 at d_S 288 the tied PCA start
    ended 480 steps level with the untied one, seeds 0 and 1: docs/pca.md), tied (the head is the
    student's embedding E^S, as in the paper: needs a teacher with a tied head; with pca init the basis is
    rotated and the final-norm weight fitted so that the head comes closest to the untied one) or untied
    (its own W_lm P_lm: vocab x d_S more parameters in the export; with pca init it folds in the teacher's
    final-norm weight)."""
    pca_exclude_sink: bool = False
    """PCA init: leave document-start (attention-sink) positions out of the second moment."""
    pca_sequences: int = 1024
    """PCA init: sequences whose residual vectors (every cached layer and position) form the basis:
    the first ones of the cache, or of the short teacher pass when training online."""
    pca_calibrate_sequences: int = 32
    """PCA init: training sequences on which the head's scale (a logit temperature) is fitted to the
    objective's KD + CE, making up for the stream outside the basis (0 keeps the folded scale; skipped
    when d_S = d_T, where PCA is an exact rotation)."""
    init_std: float = 0.02
    """Standard deviation of the random projection init."""
    seed: int = 0
    """Seed of the projection init."""

    def __post_init__(self) -> None:
        _check_positive("student", "hidden_size", self.hidden_size)
        _check_choice("student", "init", self.init, ("auto", "random", "pca"))
        _check_choice("student", "head", self.head, ("auto", "tied", "untied"))
        _check_positive("student", "pca_sequences", self.pca_sequences)
        _check_positive("student", "pca_calibrate_sequences", self.pca_calibrate_sequences, allow_zero=True)


@dataclass
class LossConfig:
    """L = L_KD + beta * L_CE + alpha * L_clone."""

    alpha: float = 1.0
    """Weight of the clone loss (the paper uses 0.5 with its raw, unnormalised MSE sum; with the normalised
    mean, 1.0 is what benchmarks/README.md measured)."""
    beta: float = 1.0
    """Weight of the next-token cross-entropy."""
    kd_weight: float = 1.0
    """Weight of the KD term."""
    temperature: float = 1.0
    """KD temperature (no T^2 factor, as in the official code)."""
    clone_terms: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in CLONE_TERMS})
    """Per-term clone weights over q, k, v, o, gate, up, down."""
    clone_normalize: str | bool = "auto"
    """Measure each clone term (per layer) in units of its target's mean square, so massive activations do
    not dominate: batch (the batch's targets, detached, all rows pooled), cache (statistics recorded when
    the cache was built, fixed over training, attention-sink rows and the other rows each in units of
    their own class's mean square), auto (cache when the run has the statistics, else batch) or none (the
    paper's raw MSE). A batch's pooled mean square depends on which rows it holds: without a sink row for
    a layer it can be 300x smaller (SmolLM2-135M, a quarter of the layers per position), and some other
    tokens carry massive activations too; the cache's statistics do not move. true/false mean batch/none."""
    clone_reduce: str = "mean"
    """Combine clone terms over layers and terms by their mean or their sum."""
    clone_fn: str = "mse"
    """Clone error per element: mse, or huber (quadratic up to huber_delta, linear beyond)."""
    huber_delta: float = 1.0
    """Where huber turns linear, in units of the target's RMS when normalised (raw units otherwise)."""
    sink_weight: float = 1.0
    """Weight of the clone loss at attention-sink positions (document starts, where the teacher has massive
    activations) relative to other positions; 0 leaves them out."""
    alpha_schedule: str = "constant"
    """How alpha changes over training: constant, linear or cosine (alpha -> alpha_end over alpha_steps),
    or step (alpha for alpha_steps steps, then alpha_end)."""
    alpha_end: float = 0.0
    """alpha at the end of the schedule."""
    alpha_steps: int | None = None
    """Steps the alpha schedule spans (None: all of train.steps)."""
    o_space: str = "student"
    """Compare the o term in student space (paper, P_o^T a_T) or teacher space (official code)."""

    def __post_init__(self) -> None:
        _check_positive("loss", "alpha", self.alpha, allow_zero=True)
        _check_positive("loss", "beta", self.beta, allow_zero=True)
        _check_positive("loss", "kd_weight", self.kd_weight, allow_zero=True)
        _check_positive("loss", "temperature", self.temperature)
        _check_choice("loss", "clone_reduce", self.clone_reduce, ("mean", "sum"))
        if isinstance(self.clone_normalize, bool):
            self.clone_normalize = "batch" if self.clone_normalize else "none"
        _check_choice("loss", "clone_normalize", self.clone_normalize, ("auto", "batch", "cache", "none"))
        _check_choice("loss", "clone_fn", self.clone_fn, ("mse", "huber"))
        _check_choice("loss", "alpha_schedule", self.alpha_schedule, ("constant", "linear", "cosine", "step"))
        if not self.huber_delta > 0:
            raise ConfigError(f"loss.huber_delta={self.huber_delta} must be > 0")
        _check_positive("loss", "sink_weight", self.sink_weight, allow_zero=True)
        _check_positive("loss", "alpha_end", self.alpha_end, allow_zero=True)
        _check_positive("loss", "alpha_steps", self.alpha_steps)
        _check_choice("loss", "o_space", self.o_space, ("student", "teacher"))
        unknown = set(self.clone_terms) - set(CLONE_TERMS)
        if unknown:
            raise ConfigError(f"loss.clone_terms has unknown terms {sorted(unknown)}; use {list(CLONE_TERMS)}")
        for term, weight in self.clone_terms.items():
            _check_positive("loss", f"clone_terms.{term}", weight, allow_zero=True)

    def alpha_at(self, step: int, total_steps: int) -> float:
        """The clone-loss weight at optimiser step `step` (0-based) of `total_steps`."""
        if self.alpha_schedule == "constant":
            return self.alpha
        span = self.alpha_steps or total_steps
        if step >= span:
            return self.alpha_end
        if self.alpha_schedule == "step":
            return self.alpha
        frac = step / span
        if self.alpha_schedule == "cosine":
            frac = 0.5 * (1 - math.cos(math.pi * frac))
        return self.alpha + (self.alpha_end - self.alpha) * frac


@dataclass
class OptimConfig:
    """AdamW with linear warmup then linear decay."""

    lr: float | None = None
    """Peak learning rate. None: 1e-3 with random init, 5e-5 with pca init. Larger steps undo the PCA
    start at the peak rate, whatever the warmup: SmolLM2-135M -> 288, 480 steps of 8 x 64 tokens
    (benchmarks/README.md), at 1e-4 held-out CE rose 0.205 above its running minimum just after the peak
    with 60 warmup steps and 0.228 with 120 (its peak at step 120), where 5e-5 fell at every evaluation to
    step 180 and stood 0.23 lower there."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (beta1, beta2), each in [0, 1)."""
    warmup_steps: int | None = None
    """Linear warmup steps. None: max(min(F, train.steps // 2), train.steps // 50), with F = 60 under a pca
    start and 10 under a random one. A PCA start sits near the teacher, and AdamW's first steps at a full
    rate undo it: at lr 1e-4 with 10 warmup steps held-out CE rose from 6.5 to 8.3 by step 60 of 240, with
    60 none rose above 5.3 (benchmarks/README.md). A short run warms up over half its steps so that it
    still decays (the SmolLM2 demo, 40 steps: warmup 20 fell at every evaluation to 4.79; warmup 40 rose
    0.35 nats at its peak rate, and 60, which never reaches the peak, ended 0.1 above its minimum at 4.90).
    Long runs warm up over 2% of their steps (9,765 steps: 195). The resolved number is saved with the
    run's config."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak, in [0, 1]."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    skip_spikes: float = 4.0
    """Skip an optimizer step whose gradient norm (before clipping) exceeds this multiple of the median of
    the last `spike_window` steps' norms, and any step whose norm is not finite; 0 disables. A clip below
    the typical norm scales every step to the same norm, so a spike's step is as long as any other, in
    the direction of the few parameters that produced it (`lrc_offline.training.spikes`). Skipped steps
    are counted in the metrics (`skipped_steps`)."""
    spike_window: int = 50
    """How many recent steps' gradient norms `skip_spikes` takes the median over (>= 10)."""

    def __post_init__(self) -> None:
        if self.lr is not None:
            _check_positive("optim", "lr", self.lr)
        if self.warmup_steps is not None:
            _check_positive("optim", "warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("optim", "grad_clip", self.grad_clip, allow_zero=True)
        if self.skip_spikes and not self.skip_spikes > 1:
            raise ConfigError(f"optim.skip_spikes={self.skip_spikes} must be > 1 (a multiple of the median gradient "
                              "norm), or 0 to take every step")
        if self.spike_window < 10:
            raise ConfigError(f"optim.spike_window={self.spike_window} must be >= 10")
        _check_positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        self.betas = tuple(self.betas)
        # torch.optim.AdamW refuses these only once the run directory and its config.json exist
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")

    def resolved(self, init: str, steps: int) -> "OptimConfig":
        """This config with lr and warmup_steps made (see their docstrings) for a run of `steps` optimizer
        steps from a `init` (pca or random) start; values given stay as given."""
        assert init in ("pca", "random"), init
        lr = self.lr if self.lr is not None else (5e-5 if init == "pca" else 1e-3)
        warmup = self.warmup_steps
        if warmup is None:
            warmup = max(min(60 if init == "pca" else 10, steps // 2), steps // 50)
        return dataclasses.replace(self, lr=lr, warmup_steps=warmup)


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Optimiser steps."""
    batch_size: int = 8
    """Sequences per optimiser step (per process, before gradient accumulation)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    seq_len: int = 64
    """Tokens per sequence (online training; offline training takes the cache's)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    eval_every: int = 0
    """Evaluate held-out loss every N steps, each with a metrics line whatever log_every (0: only at the end)."""
    eval_sequences: int = 256
    """Held-out sequences per evaluation, at most: the first ones of the cache's held-out split
    (cache.heldout_sequences, 256 by default), or of the held-out documents packed from the corpus (online
    training, a cache built before held-out splits). Split between the processes of the run."""
    clone_positions: int | None = None
    """Online training: positions per sequence for the clone loss (None: every position; the sink is always in)."""
    document_mask: str | bool = "auto"
    """The student sees each packed document alone (positions restart at each document, no attention across
    documents), in training and held-out evaluation. auto: as the cache's teacher did (cache.document_mask;
    off for caches built before that option); online training: off. true or false set it; one the cache's
    teacher disagrees with (the student would learn contexts the teacher never saw, or the reverse) is
    refused unless train.allow_document_mask_mismatch=true. Online training runs the teacher masked too."""
    allow_document_mask_mismatch: bool = False
    """Train with a train.document_mask the cache's teacher disagrees with (see train.document_mask)."""
    seed: int = 0
    """Seed of data order and sampling."""
    device: str = "auto"
    """Device: auto (cuda if present), cpu, cuda[:N] or mps."""
    mixed_precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), no or bf16."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints (0 keeps every one); older ones are deleted once a newer one is
    complete."""
    on_corrupt_shard: str = "fail"
    """A cache shard whose data no longer matches its checksums (checked as it is read, before decoding):
    fail stops training with an error naming the shard and file; skip trains on without it (counted in
    metrics.jsonl as corrupt_shards and listed in summary.json)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """For a cache (and PCA basis) named by URL (s3://bucket/prefix, gs://...): options of its fsspec
    filesystem, e.g. {endpoint_url: ..., profile: ...} for s3fs. No secrets (refused): credentials come
    from the standard chain (environment, AWS_ENDPOINT_URL, profile, instance role)."""
    report_to: str = "none"
    """Experiment tracking through accelerate's trackers, beside metrics.jsonl: none, tensorboard (event
    files under <out>/tensorboard/), wandb (its run directory under <out>/wandb/; WANDB_MODE=offline
    keeps it local) or all (both). Every metric of metrics.jsonl is logged, at its step."""
    tracker_project: str = "lrc-offline"
    """Project name the trackers file the run under (the W&B project; TensorBoard's sub-folder)."""
    generate_once: bool = True
    """Generate the student's weights W^S = W^T P once per optimizer step, not once per micro-batch: the
    micro-batches run on a detached copy that accumulates its gradient, which then flows into P in one
    backward pass (and one gradient synchronisation under DDP). Same losses and gradients; with
    grad_accum > 1 the gradients are summed in another order (fp32 rounding). Only with grad_accum > 1:
    with one micro-batch the weights are generated once anyway, and each layer's W^S gradient flowing
    straight into P needs less memory than holding all of them (fp32) for the step (docs/scaling.md).
    Not under parallelism=fsdp2, where each layer generates its weights under its own all-gather."""
    loss_chunk_tokens: int = 1024
    """KD and CE fused with the output head, this many tokens at a time, so no [batch x seq x vocab]
    logits tensor exists in the step (peak extra memory ~3 x chunk x vocab fp32). 0: from the full
    logits (the reference path, bit for bit the unfused losses)."""
    compile: bool = False
    """Run the student's decoder layer through `torch.compile` (`LRCStudent.compile_layers`; the first
    step pays for the compilation)."""
    activation_checkpointing: bool = False
    """Each decoder layer keeps only its input for the backward pass and recomputes its activations and
    generated weights there: activation memory drops from every layer's to one layer's (plus each
    layer's input) for about one more forward of compute per step (docs/scaling.md: what makes a 70B
    teacher fit under fsdp2). Same losses and gradients."""
    parallelism: str = "ddp"
    """How processes share the student. ddp: every process holds the whole student, teacher included
    (the trainable projections are small). fsdp2: the teacher's weights, the projections and their Adam
    moments are sharded per layer over all processes (torch FSDP2), for teachers that do not fit one
    GPU beside their projections; checkpoints are sharded (torch.distributed.checkpoint). Both resume on
    another number of processes, the data order continuing where the run stopped. Launch either with a plain multi-process launcher (torchrun,
    accelerate launch --multi_gpu), not an accelerate FSDP config."""

    def __post_init__(self) -> None:
        _check_choice("train", "report_to", self.report_to, REPORT_TO)
        _check_positive("train", "loss_chunk_tokens", self.loss_chunk_tokens, allow_zero=True)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_sequences"):
            _check_positive("train", name, getattr(self, name))
        _check_positive("train", "eval_every", self.eval_every, allow_zero=True)
        _check_positive("train", "checkpoint_every", self.checkpoint_every, allow_zero=True)
        _check_positive("train", "clone_positions", self.clone_positions)
        if self.document_mask not in ("auto", True, False):
            raise ConfigError(f"train.document_mask={self.document_mask!r} must be auto, true or false")
        _check_choice("train", "mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _check_choice("train", "on_corrupt_shard", self.on_corrupt_shard, ("fail", "skip"))
        _check_choice("train", "parallelism", self.parallelism, ("ddp", "fsdp2"))
        _check_storage_options("train", self.storage_options)
        _check_positive("train", "keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        _check_device("train", "device", self.device)


@dataclass
class ExportConfig:
    """The exported student: a plain Hugging Face checkpoint with a generation config and a model card."""

    dtype: str = "float32"
    """dtype of the exported weights: float32, bfloat16 (what most serving stacks load) or float16."""

    def __post_init__(self) -> None:
        _check_choice("export", "dtype", self.dtype, EXPORT_DTYPES)


@dataclass
class TrainJobConfig:
    """Root config of `lrc-train` (and the online reference trainer)."""

    teacher: str | None = None
    """Teacher whose weights generate the student. None: offline training takes the cache's teacher
    (online training needs it set)."""
    corpus: str = "tiny-text"
    """Corpus for online training and its held-out evaluation (offline training reads the cache, and
    evaluates on the cache's held-out split)."""
    text_field: str = "text"
    """Field holding the text in JSON Lines and Parquet corpora."""
    heldout_docs: int = 0
    """Online training: documents kept apart for evaluation (taken from the end of the corpus). Offline
    training evaluates on the cache's held-out split; only for a cache built before held-out splits does it
    re-read held-out documents from the corpus (this count, or the cache's when 0)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def resolved(self, residual_available: bool) -> "TrainJobConfig":
        """This config with every `auto` training choice made from the data at hand: init (pca when
        `residual_available`), the learning rate and the warmup. The resolved config is what runs and is
        saved; `student.head=auto` is made by the teacher it is built from (the export's `lrc_config.json`
        records `tied`)."""
        init = self.student.init
        if init == "auto":
            init = "pca" if residual_available else "random"
        return dataclasses.replace(
            self,
            student=dataclasses.replace(self.student, init=init),
            optim=self.optim.resolved(init, self.train.steps),
        )


# ---------------------------------------------------------------------------------------------------
# dict round trip, files, dotted overrides
# ---------------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON/YAML value fits a field's type hint (ints are floats too; bools are not ints)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, hint: Any) -> Any:
    """`value` with numeric strings made floats where `hint` wants a float, else `value` unchanged.

    YAML 1.1 (PyYAML) reads `1e-4`, `1E5` or `2.5e3` (no dot, or no exponent sign) as strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if any(_matches(value, arg) for arg in args):
            return value
        for arg in args:
            coerced = _coerce(value, arg)
            if _matches(coerced, arg):
                return coerced
        return value
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        if origin is tuple and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return value
            return type(value)(_coerce(v, a) for v, a in zip(value, args))
        return type(value)(_coerce(v, args[0]) for v in value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _coerce(v, args[1]) for k, v in value.items()}
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a dict, refusing unknown keys with the path that holds them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}.{key}")
            continue
        value = _coerce(value, hint)
        if not _matches(value, hint):
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ConfigError(f"{where}.{key}={value!r} has the wrong type; expected {shown}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of `config` with dotted `key=value` overrides applied and validated."""
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; known: {sorted(node)}")
        node[parts[-1]] = _parse_value(raw)
    return from_dict(type(config), data)


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Load a JSON or YAML config file into `cls` (defaults when `path` is None), then apply overrides."""
    config = cls()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory, not a file; pass a YAML or JSON config file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _read_file(path)
        if data is None:
            log.warning("config file %s is empty: every key keeps its default (--help-config lists them)", path)
            data = {}
        config = from_dict(cls, data, str(path))
    return apply_overrides(config, list(overrides))


def _read_file(path: Path) -> Any:
    """A config file's data, None for an empty file (or YAML holding only comments); a syntax error
    is a ConfigError naming the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is no syntax error
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8 at byte {err.start}); pass a YAML or "
                          "JSON config") from None  # fmt: skip
    if not text.strip():
        return None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON at line {err.lineno}, column {err.colno}: "
                          f"{err.msg} (YAML files need a .yaml or .yml suffix)") from None  # fmt: skip


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as JSON."""
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def config_yaml(config: Any) -> str:
    """The config as YAML, in field order, that `load_config` reads back to an equal config."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
