"""`lrc-train`: train an LRC student from a teacher cache; the teacher's forward pass never runs.

The cache is one `BatchSource` of the training loop (`training.loop`); the online reference trainer
(`lrc_offline.online`) is the other, so both train with the same code. This module adds what only a
cache has: a refusal to train on a cache built by another teacher or at another temperature, the
student's document masking following the teacher's (`cache.document_mask`), the activation layers and
statistics it was built with, its shards split across ranks, and its held-out split, on which the
student is evaluated (`training.heldout`) without the corpus or a teacher forward.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..batch import Batch
from ..cache import Manifest, read_manifest
from ..cache.act_stats import activation_stats, teacher_ms
from ..config import ConfigError, StudentConfig, TrainConfig, TrainJobConfig
from ..student.init import SecondMoment
from ..teacher.fingerprint import teacher_fingerprints
from ..storage import Location, as_location
from ..teacher.load import Teacher, load_teacher, resolve_dtype
from ..teacher.slices import FileTeacher, file_fingerprints, open_file_teacher
from .heldout import CacheHeldout, HeldoutSet, TensorHeldout
from .loop import make_accelerator, run_training
from .pca import cache_head_scale_batches, cache_second_moment
from .reader import CacheDataset, iter_batches

__all__ = ["TeacherMismatchError", "CacheSource", "train_from_cache", "check_teacher_matches_cache",
           "resolve_document_mask"]

log = logging.getLogger(__name__)

_TEACHER_KEYS = ("teacher_config", "teacher_weights", "tokenizer")

WHOLE_TEACHER_ENV = "LRC_FSDP2_WHOLE_TEACHER"
"""Set to 1, a train.parallelism=fsdp2 run loads the whole teacher in every process and shards it after
(what every run did before the per-rank reads; kept to compare the two: benchmarks/fsdp_rss.py)."""


class TeacherMismatchError(ValueError):
    """The teacher given to the trainer is not the one the cache was built with."""


def check_teacher_matches_cache(
    model, tokenizer, teacher_name: str, fingerprints: dict[str, str], built_with: str, where: str
) -> None:
    """Refuse a teacher (or tokenizer) whose fingerprints differ from `fingerprints`, those recorded by
    `where` (e.g. "the cache at DIR") for the teacher `built_with` describes.

    Raises:
        TeacherMismatchError: naming both teachers and every fingerprint that differs.
    """
    _check_fingerprints(teacher_fingerprints(model, tokenizer), teacher_name, fingerprints, built_with, where)


def _check_fingerprints(ours: dict[str, str], teacher_name: str, fingerprints: dict[str, str], built_with: str,
                        where: str) -> None:  # fmt: skip
    differ = [key for key in _TEACHER_KEYS if ours[key] != fingerprints.get(key)]
    if differ:
        raise TeacherMismatchError(
            f"{where} was built with teacher {built_with}, but training was given teacher {teacher_name!r}; "
            f"their fingerprints differ in {differ} (cache {[fingerprints.get(k) for k in differ]}, given "
            f"{[ours[k] for k in differ]}). Train with the cache's teacher, or build a cache with this one."
        )


def _check_temperature(cfg: TrainJobConfig, manifest: Manifest, cache_dir) -> None:
    """Top-k log-probs and sampled draws were taken at the cache's temperature: KD must use the same one
    (a hidden-state cache recomputes exact logits and serves any temperature)."""
    built = manifest.config
    if built.logit_mode in ("topk", "sampled") and built.temperature != cfg.loss.temperature:
        raise ConfigError(
            f"the cache at {cache_dir} holds {built.logit_mode} signals taken at temperature "
            f"{built.temperature}, but loss.temperature={cfg.loss.temperature}; set loss.temperature="
            f"{built.temperature}, or build a cache at the temperature you want (or with logit_mode=hidden)"
        )


def resolve_document_mask(tc: TrainConfig, manifest: Manifest, cache_dir) -> bool:
    """Whether the student is document-masked (`train.document_mask`): as the cache's teacher was under
    auto; an explicit setting the cache's teacher disagrees with only under
    train.allow_document_mask_mismatch (the student then learns from a teacher that saw other contexts).

    Raises:
        ConfigError: an explicit train.document_mask the cache disagrees with, without the override.
    """
    built = manifest.document_mask
    if tc.document_mask == "auto" or tc.document_mask == built:
        return built
    seen = "each packed document alone" if built else "across the documents packed into a sequence"
    if not tc.allow_document_mask_mismatch:
        raise ConfigError(
            f"train.document_mask={str(tc.document_mask).lower()}, but the teacher of the cache at {cache_dir} "
            f"attended {seen} (cache.document_mask={str(built).lower()}); leave train.document_mask=auto, build "
            f"a cache with cache.document_mask={str(tc.document_mask).lower()}, or set "
            "train.allow_document_mask_mismatch=true to train so anyway"
        )
    log.warning("train.document_mask=%s on a cache whose teacher attended %s: the student and the teacher "
                "see different contexts (train.allow_document_mask_mismatch)", tc.document_mask, seen)  # fmt: skip
    return bool(tc.document_mask)


def _log_resolved(asked: TrainJobConfig, resolved: TrainJobConfig) -> TrainJobConfig:
    if asked != resolved:
        s = resolved.student
        log.info("auto settings: student.init=%s, student.head=%s%s, optim.lr=%g", s.init, s.head,
                 " (tied exactly when the teacher's is)" if s.head == "auto" else "", resolved.optim.lr)  # fmt: skip
    return resolved


class CacheSource:
    """Batches from a cache's complete shards: this rank's share, in a seeded order, epoch after epoch."""

    name = "offline"

    def __init__(self, cache_dir: str | Path | Location, manifest: Manifest, rank: int, world_size: int, cfg: TrainConfig):
        self.cache_dir, self.manifest = cache_dir, manifest
        self.document_mask = resolve_document_mask(cfg, manifest, cache_dir)
        self.dataset = CacheDataset(cache_dir, rank=rank, world_size=world_size, seed=cfg.seed,
                                    on_corrupt_shard=cfg.on_corrupt_shard)  # fmt: skip
        reader = self.dataset.reader
        self.act_sums = activation_stats([reader.shard_record(i) for i in reader.complete_shards()])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return iter_batches(self.dataset, batch_size)

    def epoch(self) -> float:
        return self.dataset.epoch + self.dataset.consumed / self.dataset.num_sequences

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

    def second_moment(self, cfg: StudentConfig, accelerator: Accelerator) -> tuple[SecondMoment, dict]:
        """One pass over the cached residuals, stored beside the cache by the main process; the other
        ranks read it."""
        args = (self.cache_dir, cfg.pca_exclude_sink, cfg.pca_sequences)
        if accelerator.is_main_process:
            cache_second_moment(*args)
        accelerator.wait_for_everyone()
        moment = cache_second_moment(*args)
        return moment, {"source": f"cache {self.cache_dir}", "vectors": moment.count, "exclude_sink": cfg.pca_exclude_sink}

    def head_scale_batches(self, num: int, batch_size: int, device: torch.device) -> list[Batch]:
        return cache_head_scale_batches(self.dataset.reader, num, batch_size, device)

    def teacher_ms(self, cfg: TrainJobConfig, device) -> dict[str, torch.Tensor] | None:
        """loss.clone_normalize=cache, or auto on a cache that has them: the teacher-space target mean squares
        recorded in the cache, sink and other positions apart."""
        mode = cfg.loss.clone_normalize
        if mode not in ("cache", "auto") or cfg.loss.alpha == 0 or (mode == "auto" and self.act_sums is None):
            return None
        if self.act_sums is None:
            raise ConfigError(f"loss.clone_normalize=cache, but {self.cache_dir} holds no activation statistics "
                              "(built without activations, or by an older version); use loss.clone_normalize=batch")  # fmt: skip
        return {term: ms.to(device) for term, ms in teacher_ms(self.act_sums).items()}

    def counters(self) -> dict[str, int]:
        return {"corrupt_shards": len(self.dataset.corrupt_shards)} if self.dataset.corrupt_shards else {}

    def summary(self) -> dict[str, Any]:
        num = self.dataset.num_complete_sequences
        return {"cache": str(self.cache_dir), "cache_fingerprints": self.manifest.fingerprints,
                "document_mask": self.document_mask, "sequences_per_epoch": num,
                "skipped_shards": self.dataset.skipped_shards,
                "corrupt_shards": list(self.dataset.corrupt_shards),
                "cache_act_fraction": None if self.act_sums is None else self.act_sums["sequences"] / max(num, 1)}  # fmt: skip


def train_from_cache(
    cfg: TrainJobConfig,
    cache_dir: str | Path | Location,
    out_dir: str | Path,
    resume: str | Path = "auto",
    progress: bool = True,
    max_steps_this_run: int | None = None,
    teacher: str | Teacher | None = None,
    heldout_ids: torch.Tensor | None = None,
) -> dict:
    """Train an LRC student from the cache at `cache_dir`; export it; return a summary.

    Args:
        cfg: The run config (`cfg.train.seq_len` is taken from the cache).
        cache_dir: A cache built by `lrc-cache build` (a directory or an fsspec URL, reached with
            ``cfg.train.storage_options``); only its complete shards are read.
        out_dir: Run directory (see `training.loop`).
        resume: `auto` continues from the latest checkpoint in `out_dir` (if any), `never` starts afresh
            (refusing an `out_dir` that has checkpoints), or a `step-*` directory to continue from.
        progress: Show a progress bar.
        max_steps_this_run: Stop after this many steps without a final checkpoint or export, as a
            killed job would (for time-limited jobs, make it a multiple of `checkpoint_every`).
        teacher: A loaded teacher, or the teacher to load; default `cfg.teacher`, else the cache's.
        heldout_ids: Packed held-out sequences [N, T] to evaluate on instead of the cache's held-out split
            (CE only; `lrc_offline.evaluation.heldout_sequences` packs them from a corpus, for a cache built
            before held-out splits). By default the cache's held-out split, if it has one, is evaluated
            every `train.eval_every` steps and at the end: heldout_ce, heldout_kl and heldout_top1. A
            document-masked student is evaluated document-masked (so on the split, not on bare ids).

    Raises:
        TeacherMismatchError: the teacher is not the one the cache was built with (checked before step 0).
        ConfigError: train.document_mask disagrees with the cache's teacher (see `resolve_document_mask`).
        CheckpointError, ReaderStateError: the checkpoint does not fit this run.
    """
    accelerator = make_accelerator(cfg.train)
    cache_dir = as_location(cache_dir, cfg.train.storage_options)
    manifest = read_manifest(cache_dir)
    teacher = _teacher(teacher or cfg.teacher or manifest.teacher_name, cfg.train, accelerator)
    where = f"the cache at {cache_dir}"
    if isinstance(teacher, FileTeacher):  # hashed from the files by one process, a block of rows at a time
        ours = [file_fingerprints(teacher) if accelerator.is_main_process else None]
        ours = broadcast_object_list(ours)[0] if accelerator.num_processes > 1 else ours[0]
        _check_fingerprints(ours, teacher.name, manifest.fingerprints, repr(manifest.teacher_name), where)
    else:
        check_teacher_matches_cache(teacher.model, teacher.tokenizer, teacher.name, manifest.fingerprints,
                                    repr(manifest.teacher_name), where)  # fmt: skip
    asked = dataclasses.replace(cfg, teacher=teacher.name,
                                train=dataclasses.replace(cfg.train, seq_len=manifest.config.seq_len))
    cfg = _log_resolved(asked, asked.resolved(residual_available=manifest.has_residuals))
    _check_temperature(cfg, manifest, cache_dir)
    source = CacheSource(cache_dir, manifest, accelerator.process_index, accelerator.num_processes, cfg.train)
    clone_layers = list(manifest.act_layers)
    heldout = _heldout_set(cache_dir, manifest, cfg.train, heldout_ids, accelerator, source.document_mask)
    return run_training(cfg, source, teacher, out_dir, accelerator, progress=progress, resume=resume,
                        max_steps_this_run=max_steps_this_run, clone_layers=clone_layers,
                        teacher_ms=source.teacher_ms(cfg, accelerator.device), heldout=heldout)  # fmt: skip


def _teacher(teacher: str | Teacher, tc: TrainConfig, accelerator: Accelerator) -> Teacher | FileTeacher:
    """The teacher to train from. Under train.parallelism=fsdp2 a teacher with safetensors files stays in
    them (each process reads its shards: `training.fsdp.build_sharded_student`); one without (a GGUF file,
    .bin files) or a loaded one is held whole, on the CPU, until it is sharded. Otherwise the whole
    teacher, on the training device."""
    sharded = tc.parallelism == "fsdp2"
    dtype = resolve_dtype("auto", accelerator.device)  # bfloat16 on accelerators, float32 on the CPU
    if isinstance(teacher, Teacher):
        if not sharded:
            teacher.model.to(accelerator.device)
        return teacher
    if sharded and os.environ.get(WHOLE_TEACHER_ENV) != "1":
        files = open_file_teacher(teacher, dtype)
        if files is not None:
            return files
        log.info("teacher %s has no safetensors files to read shards from: every process loads it whole", teacher)
    # A sharded student's teacher waits on the CPU: `shard_student` moves each process's shards.
    return load_teacher(teacher, dtype=dtype, device="cpu" if sharded else accelerator.device)


def _heldout_set(cache_dir: Location, manifest: Manifest, tc: TrainConfig, heldout_ids: torch.Tensor | None,
                 accelerator: Accelerator, document_mask: bool = False) -> HeldoutSet | None:  # fmt: skip
    """What the run evaluates on: the given token ids, else the first `train.eval_sequences` sequences of
    the cache's held-out split (None without one, or while none of its shards is complete). A
    document-masked student (`document_mask`) is evaluated document-masked, which needs the sequences'
    document starts: the cache's held-out split stores them, bare token ids do not (refused).

    Every rank evaluates its part of the same sequences, and all ranks or none evaluate (the sums are
    all-reduced): while a build still runs, a held-out shard may complete between two ranks' listings,
    so the ranks take the fewest complete sequences any of them sees."""
    if heldout_ids is not None:
        if document_mask:
            raise ConfigError(
                f"the student is document-masked (train.document_mask), but the held-out text given for {cache_dir} "
                "is token ids without their document starts; build the cache with cache.heldout_docs > 0 (its "
                "held-out split carries them), or set heldout_docs=0 to train without held-out evaluation"
            )
        return TensorHeldout(heldout_ids[: tc.eval_sequences])
    if manifest.heldout is None:
        return None
    heldout = CacheHeldout(cache_dir, tc.eval_sequences)
    fewest = accelerator.reduce(torch.tensor(-heldout.num_sequences, device=accelerator.device), "max")  # -min
    agreed = -int(fewest)
    if agreed < heldout.num_sequences:
        heldout = CacheHeldout(cache_dir, agreed)
    return heldout if agreed else None
