"""`lrc-train`: train an LRC student from a teacher cache; the teacher's forward pass never runs.

The loop mirrors the online reference trainer (`lrc_offline.online`) step for step: same objective
(`lrc_loss`), optimiser and schedule; only the teacher signal comes from cache shards instead of a
hooked teacher forward. On top of it: ranks through `accelerate` (each reads its own shards), exact
resume from `out/checkpoints/step-*`, and a refusal to train on a cache built by another teacher.

Writes to `out_dir`: `config.json` (resolved), `metrics.jsonl`, `checkpoints/step-*/`, `student/`
(the exported HF checkpoint) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object
from tqdm.auto import tqdm

from ..cache import Manifest, read_manifest
from ..cache.act_stats import activation_stats, teacher_ms
from ..config import ConfigError, TrainConfig, TrainJobConfig, save_config, to_dict
from ..student.export import export_student
from ..student.init import init_pca, pca_basis
from ..student.lrc import LRCStudent, build_student
from ..teacher.fingerprint import teacher_fingerprints
from ..teacher.load import Teacher, load_teacher
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .evaluate import heldout_ce
from .metrics import MetricsWriter, read_metrics
from .objective import lrc_loss
from .optim import build_optimizer
from .pca import cache_second_moment, calibrate_head_from_cache
from .reader import CacheDataset, batch_to_device, iter_batches

__all__ = ["TeacherMismatchError", "train_from_cache", "check_teacher_matches_cache"]

log = logging.getLogger(__name__)

_TEACHER_KEYS = ("teacher_config", "teacher_weights", "tokenizer")
_RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_sequences",
                      "train.device", "train.mixed_precision")  # fmt: skip
"""Config fields a resumed run may change; any other change would make the resumed run a different run."""


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
    ours = teacher_fingerprints(model, tokenizer)
    theirs = fingerprints
    differ = [key for key in _TEACHER_KEYS if ours[key] != theirs.get(key)]
    if differ:
        raise TeacherMismatchError(
            f"{where} was built with teacher {built_with}, but training was "
            f"given teacher {teacher_name!r}; their fingerprints differ in {differ} "
            f"(cache {[theirs.get(k) for k in differ]}, given {[ours[k] for k in differ]}). "
            "Train with the cache's teacher, or build a cache with this one."
        )


def _resolve_teacher(cfg: TrainJobConfig, manifest: Manifest, teacher: str | None) -> str:
    """Explicit argument, else `cfg.teacher`, else the teacher the cache was built with."""
    return teacher or cfg.teacher or manifest.teacher_name


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


def _log_resolved(asked: TrainJobConfig, resolved: TrainJobConfig) -> TrainJobConfig:
    if asked != resolved:
        s = resolved.student
        log.info("auto settings: student.init=%s, student.head=%s, optim.lr=%g%s", s.init, s.head, resolved.optim.lr,
                 " (the untied head adds vocab x d_S parameters to the export)" if s.head == "untied" else "")  # fmt: skip
    return resolved


def _accelerator(tc: TrainConfig) -> Accelerator:
    """CPU without a GPU (or with train.device=cpu); bf16 autocast on GPU with mixed_precision auto."""
    cpu = tc.device == "cpu" or not torch.cuda.is_available()
    bf16 = tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and not cpu)
    # The frozen teacher tensors are buffers of the student: identical on every rank, never to be
    # re-broadcast by DDP before each forward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=[ddp])


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) and key != "clone_terms" else {name: value})
    return out


def _resume_from(resume: str | Path, out_dir: Path) -> Path | None:
    """The checkpoint to continue from: latest (`auto`), none (`never`) or a given `step-*` directory."""
    latest = latest_checkpoint(out_dir)
    if resume == "never":
        if latest is not None:
            raise CheckpointError(
                f"{out_dir} already holds checkpoints (latest {latest.name}) and resume='never'; "
                "use another out_dir, delete its checkpoints/, or pass resume='auto'"
            )
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={str(resume)!r} is neither 'auto', 'never' nor a checkpoint directory")
    return path


def _check_resumable(saved: dict, now: dict, path: Path) -> None:
    old, new = _flatten(saved), _flatten(now)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES]
    if changed:
        lines = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in changed]
        raise CheckpointError(
            f"{path} was saved by a run with another configuration:\n  " + "\n  ".join(lines)
            + "\nResume with the same configuration, or start a new run in another out_dir."
        )


def _heldout_ce(student: LRCStudent, ids: torch.Tensor, batch_size: int, device, accelerator) -> float:
    student.eval()
    with accelerator.autocast():
        result = heldout_ce(lambda x: student(x).logits_BTV, ids, batch_size, device)
    student.train()
    return result["ce"]


def _cache_normalisers(cfg: TrainJobConfig, act_sums, cache_dir, device) -> dict[str, torch.Tensor] | None:
    """loss.clone_normalize=cache: the teacher-space target mean squares recorded in the cache."""
    if cfg.loss.clone_normalize != "cache" or cfg.loss.alpha == 0:
        return None
    if act_sums is None:
        raise ConfigError(f"loss.clone_normalize=cache, but {cache_dir} holds no activation statistics (built "
                          "without activations, or by an older version); use loss.clone_normalize=batch")  # fmt: skip
    return {term: ms.to(device) for term, ms in teacher_ms(act_sums, cfg.loss.sink_weight).items()}


def _cache_act_fraction(act_sums, num_sequences: int) -> float | None:
    """Fraction of the cache's complete sequences that carry activations."""
    return None if act_sums is None else act_sums["sequences"] / max(num_sequences, 1)


class _DistributedStudent:
    """`lrc_loss` calls the student (which must go through the DDP wrapper so gradients sync) and reads
    its attributes (which only the wrapped module has)."""

    def __init__(self, wrapped: torch.nn.Module, module: LRCStudent):
        self._wrapped, self._module = wrapped, module

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def train_from_cache(
    cfg: TrainJobConfig,
    cache_dir: str | Path,
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
        cache_dir: A cache built by `lrc-cache build`; only its complete shards are read.
        out_dir: Run directory (see the module docstring).
        resume: `auto` continues from the latest checkpoint in `out_dir` (if any), `never` starts afresh
            (refusing an `out_dir` that has checkpoints), or a `step-*` directory to continue from.
        progress: Show a progress bar.
        max_steps_this_run: Stop after this many steps without a final checkpoint or export, as a
            killed job would (for time-limited jobs, make it a multiple of `checkpoint_every`).
        teacher: A loaded teacher, or the teacher to load; default `cfg.teacher`, else the cache's.
        heldout_ids: Packed held-out sequences [N, T]; when given, the student's held-out CE is logged
            every `train.eval_every` steps and at the end (see `lrc_offline.evaluation.heldout_sequences`).

    Raises:
        TeacherMismatchError: the teacher is not the one the cache was built with (checked before step 0).
        CheckpointError, ReaderStateError: the checkpoint does not fit this run.
    """
    start_time = time.perf_counter()
    out_dir, tc = Path(out_dir), cfg.train
    accelerator = _accelerator(tc)
    if accelerator.distributed_type == DistributedType.FSDP:
        # Checkpoints, export and held-out evaluation read the student's full parameters on rank 0;
        # under FSDP they are sharded. Refuse rather than save a shard or deadlock.
        raise ConfigError("lrc-train does not run under FSDP yet; launch with a DDP config such as "
                          "train/accelerate/ddp_8gpu.yaml (the trainable LRC parameters are small)")  # fmt: skip
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # ---- cache and teacher: refuse a teacher the cache was not built with ---------------------------
    manifest = read_manifest(cache_dir)
    if isinstance(teacher, Teacher):
        loaded, teacher_name = teacher, teacher.name
        loaded.model.to(device)
    else:
        teacher_name = _resolve_teacher(cfg, manifest, teacher)
        loaded = load_teacher(teacher_name, dtype="auto", device=device)
    check_teacher_matches_cache(loaded.model, loaded.tokenizer, teacher_name, manifest.fingerprints,
                                repr(manifest.teacher_name), f"the cache at {cache_dir}")  # fmt: skip
    seq_len = manifest.config.seq_len
    cfg = dataclasses.replace(cfg, teacher=teacher_name, train=dataclasses.replace(tc, seq_len=seq_len))
    cfg = _log_resolved(cfg, cfg.resolved(residual_available=manifest.has_residuals))
    tc = cfg.train
    clone_layers = manifest.act_layers
    _check_temperature(cfg, manifest, cache_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")

    # ---- data, student, optimiser, resume ------------------------------------------------------------
    dataset = CacheDataset(cache_dir, rank=rank, world_size=world, seed=tc.seed)
    act_sums = activation_stats([dataset.reader.shard_record(i) for i in dataset.reader.complete_shards()])
    normalisers = _cache_normalisers(cfg, act_sums, cache_dir, device)
    torch.manual_seed(tc.seed)
    student = build_student(loaded.model, cfg.student).to(device)
    init_info = {"kind": cfg.student.init}
    start_step, resumed_from = 0, _resume_from(resume, out_dir)
    if cfg.student.init == "pca" and resumed_from is None:  # a resumed run takes its weights from the checkpoint
        pca_args = (cache_dir, cfg.student.pca_exclude_sink, cfg.student.pca_sequences)
        if accelerator.is_main_process:  # one pass, stored beside the cache; the other ranks read it
            cache_second_moment(*pca_args)
        accelerator.wait_for_everyone()
        moment = cache_second_moment(*pca_args)
        init_pca(student, pca_basis(moment, cfg.student.hidden_size))
        init_info.update(source=f"cache {cache_dir}", vectors=moment.count, exclude_sink=cfg.student.pca_exclude_sink)
        init_info.update(calibrate_head_from_cache(student, dataset.reader, cfg, device))
    optimizer, scheduler = build_optimizer(student, cfg.optim, tc.steps)
    if resumed_from is not None:
        state = load_checkpoint(resumed_from, student, optimizer, scheduler)
        _check_resumable(state["config"], to_dict(cfg), resumed_from)
        init_info = state["extra"].get("init", init_info)
        if len(state["reader"]) != world:
            raise CheckpointError(f"{resumed_from} was saved by {len(state['reader'])} processes, now {world}; "
                                  "resume with the same number of processes")  # fmt: skip
        dataset.load_state_dict(state["reader"][rank])
        start_step = state["step"]
    model, optimizer = accelerator.prepare(student, optimizer)
    loss_student = student if model is student else _DistributedStudent(model, student)
    extra = {"cache": str(cache_dir), "cache_fingerprints": dict(manifest.fingerprints), "init": init_info}

    def checkpoint(step: int) -> None:
        states = gather_object([dataset.state_dict()]) if world > 1 else [dataset.state_dict()]
        if accelerator.is_main_process:
            save_checkpoint(out_dir, step, student, optimizer, scheduler, states, to_dict(cfg), extra)
        accelerator.wait_for_everyone()

    # ---- loop ------------------------------------------------------------------------------------------
    metrics = None
    if accelerator.is_main_process:
        old = out_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(old) if r["step"] <= start_step] if start_step and old.is_file() else []
        metrics = MetricsWriter(out_dir / "metrics.jsonl")
        for record in kept:  # steps after the checkpoint are redone: drop their lines
            metrics.write(record)
        if start_step == 0 and heldout_ids is not None and tc.eval_every:  # where the init starts from
            metrics.write({"step": 0, "tokens": 0,
                           "heldout_ce": _heldout_ce(student, heldout_ids, tc.batch_size, device, accelerator)})
    batches = iter_batches(dataset, tc.batch_size)
    tokens_per_step = tc.batch_size * tc.grad_accum * seq_len * world
    end_step = tc.steps if max_steps_this_run is None else min(tc.steps, start_step + max_steps_this_run)
    bar = tqdm(total=tc.steps, initial=start_step, desc="LRC from cache", unit="step",
               disable=not (progress and accelerator.is_main_process))  # fmt: skip
    window_start, window_tokens, last = time.perf_counter(), 0, {}
    clone_sequences = seen_sequences = 0  # this process, this run: the clone loss's coverage of the data
    for step in range(start_step, end_step):
        parts_sum: dict[str, torch.Tensor] = {}
        alpha = cfg.loss.alpha_at(step, tc.steps)
        for micro in range(tc.grad_accum):
            batch = next(batches)
            if "act_present" in batch:  # counted on the host, before the copy: no device sync
                clone_sequences += int(batch["act_present"].sum()) if alpha > 0 else 0
            elif "act_positions" in batch and alpha > 0:
                clone_sequences += len(batch["act_positions"])
            seen_sequences += len(batch["input_ids"])
            batch = batch_to_device(batch, device)
            sync = micro == tc.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, parts = lrc_loss(loss_student, batch, cfg.loss, clone_layers, alpha=alpha,
                                           teacher_ms=normalisers)  # fmt: skip
                accelerator.backward(loss / tc.grad_accum)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value / tc.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        bar.update(1)

        is_last = step + 1 == tc.steps
        if (step + 1) % tc.log_every == 0 or is_last:
            names = sorted(parts_sum)
            values = accelerator.reduce(torch.stack([parts_sum[k] for k in names]), reduction="mean")
            elapsed = time.perf_counter() - window_start
            record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, **dict(zip(names, values)),
                      "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "alpha": alpha,
                      "clone_coverage": clone_sequences / max(seen_sequences, 1),
                      "epoch": dataset.epoch + dataset.consumed / dataset.num_sequences,
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}  # fmt: skip
            if heldout_ids is not None and accelerator.is_main_process and (
                    is_last or (tc.eval_every and (step + 1) % tc.eval_every == 0)):
                record["heldout_ce"] = _heldout_ce(student, heldout_ids, tc.batch_size, device, accelerator)
            if metrics is not None:
                last = metrics.write(record)
                bar.set_postfix(loss=f"{last['loss']:.3f}")
            window_start, window_tokens = time.perf_counter(), 0
        if is_last or (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0):
            checkpoint(step + 1)
    bar.close()
    if metrics is not None:
        metrics.close()
    summary = {"final": last, "start_step": start_step, "end_step": end_step,
               "resumed_from": str(resumed_from) if resumed_from else None, "cache": str(cache_dir),
               "sequences_per_epoch": dataset.num_complete_sequences, "skipped_shards": dataset.skipped_shards,
               "clone_coverage": clone_sequences / max(seen_sequences, 1),
               "cache_act_fraction": _cache_act_fraction(act_sums, dataset.num_complete_sequences),
               "seconds": time.perf_counter() - start_time}  # fmt: skip
    if end_step < tc.steps:
        summary["stopped_early"] = True
        return summary

    # ---- export ----------------------------------------------------------------------------------------
    if accelerator.is_main_process:
        export_dir = export_student(student, out_dir / "student", loaded.tokenizer, to_dict(cfg),
                                    extra_info={"trainer": "offline", "steps": tc.steps, **extra})  # fmt: skip
        summary["export"] = str(export_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary
