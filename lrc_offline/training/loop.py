"""The training loop, one for both teacher signals: setup -> train -> step -> finish.

A `BatchSource` supplies the batches (`lrc_offline.batch.Batch`): the cache reader
(`training.trainer.CacheSource`, offline) or the online reference's hooked teacher
(`lrc_offline.online.OnlineSource`, which lives outside `training/` because it runs the teacher's
forward). Everything else, the student, the PCA start, the optimiser, resume, metrics, held-out
evaluation, checkpoints and the export, is this module's, so "offline matches online step for step"
holds because both run this code.

Writes to `out_dir`: `config.json` (resolved), `metrics.jsonl`, `checkpoints/step-*/`, `student/`
(the exported HF checkpoint) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, gather_object
from tqdm.auto import tqdm

from ..batch import Batch
from ..config import ConfigError, StudentConfig, TrainConfig, TrainJobConfig, save_config, to_dict
from ..student.export import export_dtype, export_student
from ..student.init import EMBED_BLOCK_ROWS, SecondMoment, init_pca, pca_basis
from ..student.lrc import LRCStudent, build_student
from ..teacher.slices import FileTeacher
from .checkpoint import (check_resumable, load_checkpoint, read_checkpoint_state, resume_point, rotate_checkpoints,
                         save_checkpoint)  # fmt: skip
from .fsdp import build_sharded_student, clip_grad_norm, full_trainable_state, shard_student
from .heldout import HeldoutSet, TensorHeldout, evaluate_heldout, student_head_fn
from .metrics import (MetricsWriter, log_to_trackers, progress_line, read_metrics, start_trackers, stop_trackers,
                      tracker_names)  # fmt: skip
from .objective import lrc_loss
from .optim import build_optimizer
from .pca import fit_head_scale, head_scale_sequences
from .reader import batch_to_device
from .spikes import SpikeGuard, optimizer_step

__all__ = ["BatchSource", "Run", "make_accelerator", "setup", "train", "finish", "run_training"]

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Where a run's batches come from."""

    name: str
    """What the progress bar and the export's `trainer` record call this kind of run."""
    document_mask: bool
    """Whether the student sees each packed document alone, in training and held-out evaluation (the
    convention of the teacher signal: `train.document_mask` resolved by the source)."""

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Endless batches of `batch_size` sequences (host or device tensors), from the saved position: a
        generator, closed when the run ends."""

    def epoch(self) -> float:
        """Epochs handed out so far (fractional)."""

    def state_dict(self) -> dict[str, Any]:
        """This process's reading position (JSON-ready), saved in every checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one that does not fit. On the number of processes that
        saved it, `state` is this process's own; on another number, the first process's with
        ``all_processes`` added (every process's, in rank order): a source whose position is split between
        processes (the cache reader) continues from all of them, one whose position every process shares
        from its own."""

    def second_moment(self, cfg: StudentConfig, accelerator: Accelerator) -> tuple[SecondMoment, dict]:
        """The teacher residual stream's second moment for the PCA start, and a record of its origin."""

    def head_scale_batches(self, num: int, batch_size: int, device: torch.device) -> list[Batch]:
        """The first `num` training sequences with their teacher signal, for the PCA head-scale fit."""

    def counters(self) -> dict[str, int]:
        """Facts about the data read so far for every metrics line (e.g. corrupt shards skipped)."""

    def summary(self) -> dict[str, Any]:
        """Facts about the data for `summary.json` and the export (JSON-ready)."""


@dataclasses.dataclass
class Run:
    """Everything one run holds between setup and finish."""

    cfg: TrainJobConfig
    accelerator: Accelerator
    source: BatchSource
    student: LRCStudent
    model: torch.nn.Module
    """The student as prepared by `accelerate` (DDP-wrapped on several processes), or the sharded student
    itself (train.parallelism=fsdp2): what is called."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out_dir: Path
    tokenizer: Any
    clone_layers: list[int] | None
    teacher_ms: dict[str, torch.Tensor] | None
    heldout: HeldoutSet | None
    """The held-out sequences evaluated every `train.eval_every` steps (the cache's held-out split, with the
    teacher's signal), or None."""
    extra: dict[str, Any]
    """Saved in checkpoints and the export: the trainer (source) name, the data's facts, the init record."""
    start_step: int
    end_step: int
    resumed_from: Path | None
    teacher_model: torch.nn.Module | None = None
    """The teacher, for the export of a sharded student (rebuilt whole on rank 0)."""
    teacher_files: FileTeacher | None = None
    """A sharded student's teacher left in its files (each process read its rows): the export reads it
    from there a layer at a time."""
    start_tokens: int = 0
    """Training tokens before `start_step` (counted with the processes of the run that took them)."""
    metrics: MetricsWriter | None = None
    batches: Iterator[Batch] | None = None
    clone_sequences: int = 0
    """Sequences of this process and run that the clone loss saw (its coverage of the data)."""
    seen_sequences: int = 0
    spike_guard: SpikeGuard | None = None
    """Skips the steps of gradient spikes (`optim.skip_spikes`), or None."""
    last_record: dict = dataclasses.field(default_factory=dict)
    last_heldout: dict | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)


def make_accelerator(tc: TrainConfig) -> Accelerator:
    """CPU without a GPU (or with train.device=cpu); bf16 autocast on GPU with mixed_precision auto."""
    cpu = tc.device == "cpu" or not torch.cuda.is_available()
    bf16 = tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and not cpu)
    # The frozen teacher tensors are buffers of the student: identical on every rank, never to be
    # re-broadcast by DDP before each forward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # train.report_to's trackers. Their folder is the run directory, known only when they start
    # (`_open_metrics`); accelerate wants one now.
    trackers = tracker_names(tc.report_to)
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=[ddp],
                              log_with=trackers or None,
                              project_config=ProjectConfiguration(logging_dir=".") if trackers else None)  # fmt: skip
    if accelerator.distributed_type == DistributedType.FSDP:
        # accelerate's FSDP wraps the whole student, teacher buffers unsharded; lrc-train shards it
        # itself, per layer (training/fsdp.py).
        raise ConfigError("lrc-train shards the student itself: set train.parallelism=fsdp2 and launch with a "
                          "multi-process config such as train/accelerate/ddp_8gpu.yaml, not an accelerate "
                          "FSDP config")  # fmt: skip
    return accelerator


def _sharded(run: Run) -> bool:
    return run.cfg.train.parallelism == "fsdp2"


# ---- setup ------------------------------------------------------------------------------------------


def _pca_start(student: LRCStudent, source: BatchSource, cfg: TrainJobConfig, accelerator: Accelerator,
               files: FileTeacher | None = None) -> dict:  # fmt: skip
    """student.init=pca: the top principal directions of the teacher's residual stream, then the head's
    scale fitted to the objective's KD + CE on the first training sequences. A student sharded from the
    teacher's `files` reads the embedding from them for a tied head, a block of rows at a time."""
    moment, info = source.second_moment(cfg.student, accelerator)
    embed_blocks = None
    if files is not None:
        key = student.teacher_tensor_names(files.adapter)["teacher_embed"]
        embed_blocks = files.files.row_blocks(key, EMBED_BLOCK_ROWS, files.dtype)  # read only if it is used
    init_pca(student, pca_basis(moment, cfg.student.hidden_size), embed_blocks)
    num = head_scale_sequences(student, cfg)
    device = student.proj_embed.device  # a student to be sharded is still on the CPU
    batches = source.head_scale_batches(num, cfg.train.batch_size, device) if num else []
    info.update(fit_head_scale(student, batches, cfg, source.document_mask))
    return info


def _open_metrics(run: Run) -> MetricsWriter | None:
    """The metrics file of the main process: lines after a resumed checkpoint's step are dropped (they
    are redone); a fresh run with held-out text starts with where the init stands. Every line written
    from here on goes to the trackers too (the kept lines are in them already)."""
    if not run.accelerator.is_main_process:
        return None
    path = run.out_dir / "metrics.jsonl"
    kept = [r for r in read_metrics(path) if r["step"] <= run.start_step] if run.start_step and path.is_file() else []
    metrics = MetricsWriter(path)
    for record in kept:
        metrics.write(record)
    start_trackers(run.accelerator, run.out_dir, run.cfg.train.tracker_project, to_dict(run.cfg))
    metrics.on_write = lambda record: log_to_trackers(run.accelerator, record)
    return metrics


def _initial_heldout(run: Run) -> None:
    """A fresh run with held-out text starts its metrics with where the init stands."""
    if run.start_step == 0 and run.heldout is not None and run.cfg.train.eval_every:
        record = _evaluate(run)
        if run.metrics is not None:
            run.metrics.write({"step": 0, "tokens": 0, **record})


def setup(
    cfg: TrainJobConfig,
    source: BatchSource,
    teacher,
    out_dir: str | Path,
    accelerator: Accelerator,
    resume: str | Path = "auto",
    max_steps_this_run: int | None = None,
    clone_layers: list[int] | None = None,
    teacher_ms: dict[str, torch.Tensor] | None = None,
    heldout_ids: torch.Tensor | None = None,
    heldout: HeldoutSet | None = None,
) -> Run:
    """Save the resolved config, build the student (PCA start or checkpoint), the optimiser and the
    metrics file. `cfg` is resolved (no `auto` left); `teacher` is the loaded `Teacher`, or under
    train.parallelism=fsdp2 a `FileTeacher` whose tensors each process reads its shards of; the held-out
    sequences are `heldout` (e.g. a cache's held-out split), or token ids `heldout_ids` [N, T] (CE only)."""
    if heldout is None and heldout_ids is not None:
        heldout = TensorHeldout(heldout_ids)
    out_dir, tc = Path(out_dir), cfg.train
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
    torch.manual_seed(tc.seed)
    sharded = tc.parallelism == "fsdp2"
    files = teacher if isinstance(teacher, FileTeacher) else None
    assert files is None or sharded, "a teacher left in its files serves a sharded student only"
    if files is not None:  # sharded as it is built: each process reads its rows of the teacher
        student = build_sharded_student(files, cfg.student, accelerator.device)
    else:
        student = build_student(teacher.model, cfg.student)
        if not sharded:  # a sharded student moves to the device shard by shard (`shard_student`)
            student = student.to(accelerator.device)
    resumed_from = resume_point(resume, out_dir)
    init_info = {"kind": cfg.student.init}
    if cfg.student.init == "pca" and resumed_from is None:  # a resumed run takes its weights from the checkpoint
        init_info.update(_pca_start(student, source, cfg, accelerator, files))
    if sharded and files is None:  # before the optimiser: sharding replaces the parameters
        shard_student(student, accelerator.device)
    optimizer, scheduler = build_optimizer(student, cfg.optim, tc.steps)
    start_step = start_tokens = 0
    guard = (SpikeGuard(cfg.optim.skip_spikes, cfg.optim.spike_window, accelerator.device)
             if cfg.optim.skip_spikes else None)  # fmt: skip
    if resumed_from is not None:
        state = read_checkpoint_state(resumed_from)
        check_resumable(state, to_dict(cfg), resumed_from)
        load_checkpoint(resumed_from, student, optimizer, scheduler)
        init_info = state["extra"].get("init", init_info)
        if guard is not None and "spike_guard" in state["extra"]:  # a checkpoint from before the guard has none
            guard.load_state_dict(state["extra"]["spike_guard"])
        saved = state["reader"]
        if len(saved) == accelerator.num_processes:
            source.load_state_dict(saved[accelerator.process_index])
        else:  # the data order continues where the run stopped (`BatchSource.load_state_dict`)
            log.info("%s was saved by %d processes, now %d: the reading position is carried over",
                     resumed_from, len(saved), accelerator.num_processes)  # fmt: skip
            source.load_state_dict({**saved[0], "all_processes": saved})
        start_step = state["step"]
        # Checkpoints before `tokens` was saved: every step counted with the processes of the last run.
        start_tokens = state.get("tokens", start_step * _tokens_per_step(cfg.train, len(saved)))
    if tc.compile:
        student.compile_layers()
    student.checkpoint_layers(tc.activation_checkpointing)
    # A sharded student is not wrapped: FSDP2 works on the module itself.
    model, optimizer = (student, optimizer) if sharded else accelerator.prepare(student, optimizer)
    end_step = tc.steps if max_steps_this_run is None else min(tc.steps, start_step + max_steps_this_run)
    run = Run(cfg, accelerator, source, student, model, optimizer, scheduler, out_dir, teacher.tokenizer,
              clone_layers, teacher_ms, heldout, {"trainer": source.name, **source.summary(), "init": init_info},
              start_step, end_step, resumed_from, teacher_model=teacher.model, teacher_files=files)  # fmt: skip
    run.start_tokens = start_tokens
    run.spike_guard = guard
    run.metrics = _open_metrics(run)
    _initial_heldout(run)
    run.batches = source.batches(tc.batch_size)
    return run


# ---- one optimizer step -----------------------------------------------------------------------------


def _next_batch(run: Run, alpha: float) -> Batch:
    batch = next(run.batches)
    if batch.clone is not None and alpha > 0:  # counted on the host, before the copy: no device sync
        run.clone_sequences += batch.clone.num_present()
    run.seen_sequences += len(batch.input_ids)
    return batch_to_device(batch, run.accelerator.device)


def step(run: Run, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Optimizer step `index` (0-based): generate the student's weights (once, with train.generate_once),
    micro-batches (loss, backward), the backward of the generation (gradients synchronised once), clip,
    step (or skip the step of a gradient spike, `optim.skip_spikes`). Returns the loss parts averaged over
    micro-batches, the gradient norm before clipping and the clone weight used. Reads nothing back to the
    host but, with the spike guard and an optimizer that is not fused (the CPU's), its one flag: the
    caller reads the rest at log steps."""
    cfg, accelerator, num_micro = run.cfg, run.accelerator, run.cfg.train.grad_accum
    alpha = cfg.loss.alpha_at(index, cfg.train.steps)
    chunk_tokens = cfg.train.loss_chunk_tokens or None
    generated = leaves = None
    sharded = _sharded(run)
    # one micro-batch: the plain path generates once too; sharded: each layer generates under its all-gather
    if cfg.train.generate_once and num_micro > 1 and not sharded:
        with accelerator.autocast():
            generated = run.model(generate_weights=True)
        leaves = generated.detached()
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(num_micro):
        batch = _next_batch(run, alpha)
        # With generated weights no micro-batch touches a parameter: the gradients sync in their backward.
        sync = micro == num_micro - 1 and generated is None
        if sharded:  # gradients stay unsharded and local until the last micro-batch's reduce-scatter
            run.model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or sharded else accelerator.no_sync(run.model):
            with accelerator.autocast():
                loss, parts = lrc_loss(run.model, batch, cfg.loss, run.clone_layers, alpha=alpha,
                                       teacher_ms=run.teacher_ms, weights=leaves, chunk_tokens=chunk_tokens,
                                       document_mask=run.source.document_mask)  # fmt: skip
            accelerator.backward(loss / num_micro)
        for key, value in parts.items():
            parts_sum[key] = parts_sum[key] + value / num_micro if key in parts_sum else value / num_micro
    if generated is not None:
        generated.backward(leaves)
    max_norm = cfg.optim.grad_clip or float("inf")
    if sharded:
        grad_norm = clip_grad_norm(run.model, max_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    # the schedule and the data go on past a skipped step; the weights and AdamW's moments do not move
    optimizer_step(run.optimizer, run.spike_guard.check(grad_norm) if run.spike_guard is not None else None)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return parts_sum, grad_norm, alpha


# ---- the loop ---------------------------------------------------------------------------------------


def _heldout_record(result: dict[str, float]) -> dict[str, float]:
    """The metrics-line keys of an evaluation: heldout_ce, and with the teacher's signal heldout_kl (the KD
    term at loss.temperature) and heldout_top1 (agreement with the teacher's top-1)."""
    record = {"heldout_ce": result["ce"]}
    if "kl" in result:
        record.update(heldout_kl=result["kl"], heldout_top1=result["top1"])
    return record


def _evaluate(run: Run) -> dict[str, float]:
    """The student on the held-out sequences (`_heldout_record`'s keys). Every process evaluates its part
    and the sums are added over processes, so every process calls this at the same steps."""
    run.student.eval()
    with run.accelerator.autocast():
        result = evaluate_heldout(student_head_fn(run.student), run.heldout, run.cfg.train.batch_size,
                                  run.accelerator.device, temperature=run.cfg.loss.temperature,
                                  chunk_tokens=run.cfg.train.loss_chunk_tokens or 1024,
                                  collective=_sharded(run), document_mask=run.source.document_mask)  # fmt: skip
    run.student.train()
    run.last_heldout = result
    return _heldout_record(result)


def _record(run: Run, index: int, parts: dict, grad_norm, alpha: float, window: tuple[float, int]) -> dict:
    """The metrics line of step `index + 1`: parts averaged over processes, rates, coverage."""
    accelerator = run.accelerator
    names = sorted(parts)
    values = accelerator.reduce(torch.stack([parts[k] for k in names]), reduction="mean")
    tokens = _tokens_at(run, index + 1)
    record = {"step": index + 1, "tokens": tokens, **dict(zip(names, values)),
              "grad_norm": grad_norm, "lr": run.scheduler.get_last_lr()[0], "alpha": alpha,
              "clone_coverage": run.clone_sequences / max(run.seen_sequences, 1), "epoch": run.source.epoch(),
              **run.source.counters(),
              **({"skipped_steps": run.spike_guard.skipped} if run.spike_guard is not None else {}),
              "tokens_per_s": window[1] / max(time.perf_counter() - window[0], 1e-9)}  # fmt: skip
    if _evaluates(run, index):
        record.update(_evaluate(run))
    return record


def _evaluates(run: Run, index: int) -> bool:
    """Whether step `index + 1` evaluates the held-out set: every `eval_every` steps and at the last."""
    tc = run.cfg.train
    step = index + 1
    return run.heldout is not None and (step == tc.steps or bool(tc.eval_every and step % tc.eval_every == 0))


def _tokens_per_step(tc: TrainConfig, num_processes: int) -> int:
    return tc.batch_size * tc.grad_accum * tc.seq_len * num_processes


def _tokens_at(run: Run, step_done: int) -> int:
    """Training tokens after `step_done` steps: the steps of earlier runs as they counted them (each with
    its own number of processes), this run's with its own."""
    per_step = _tokens_per_step(run.cfg.train, run.accelerator.num_processes)
    return run.start_tokens + (step_done - run.start_step) * per_step


def _checkpoint(run: Run, step_done: int) -> None:
    state = run.source.state_dict()
    states = gather_object([state]) if run.accelerator.num_processes > 1 else [state]
    extra = run.extra if run.spike_guard is None else {**run.extra, "spike_guard": run.spike_guard.state_dict()}
    if _sharded(run) or run.accelerator.is_main_process:  # every rank writes its shards of a sharded student
        save_checkpoint(run.out_dir, step_done, run.student, run.optimizer, run.scheduler, states,
                        to_dict(run.cfg), extra, tokens=_tokens_at(run, step_done))  # fmt: skip
    if run.cfg.train.keep_checkpoints and run.accelerator.is_main_process:
        rotate_checkpoints(run.out_dir, run.cfg.train.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def train(run: Run, progress: bool = True) -> None:
    """Steps `run.start_step` .. `run.end_step`: log every `log_every` steps, evaluate (and log) every
    `eval_every`, checkpoint every `checkpoint_every` and at the last step."""
    tc = run.cfg.train
    bar = tqdm(total=tc.steps, initial=run.start_step, desc=run.source.name, unit="step",
               disable=not (progress and run.accelerator.is_main_process))  # fmt: skip
    began = time.perf_counter()
    window = (began, 0)
    for index in range(run.start_step, run.end_step):
        parts, grad_norm, alpha = step(run, index)
        window = (window[0], window[1] + _tokens_per_step(tc, run.accelerator.num_processes))
        bar.update(1)
        is_last = index + 1 == tc.steps
        if (index + 1) % tc.log_every == 0 or is_last or _evaluates(run, index):  # an evaluation gets its line
            record = _record(run, index, parts, grad_norm, alpha, window)
            if run.metrics is not None:
                run.last_record = run.metrics.write(record)
                bar.set_postfix(loss=f"{run.last_record['loss']:.3f}")
                if not progress:  # a batch job's log: a line per metrics line instead of a bar
                    per_step = (time.perf_counter() - began) / (index + 1 - run.start_step)
                    log.info(progress_line(run.last_record, tc.steps, per_step * (tc.steps - index - 1)))
            window = (time.perf_counter(), 0)
        if is_last or (tc.checkpoint_every and (index + 1) % tc.checkpoint_every == 0):
            _checkpoint(run, index + 1)
    bar.close()
    run.batches.close()  # here, not whenever the garbage collector gets to it: the reader's prefetch stops
    if run.metrics is not None:
        run.metrics.close()
    stop_trackers(run.accelerator)


# ---- finish -----------------------------------------------------------------------------------------


def finish(run: Run) -> dict[str, Any]:
    """The run's summary; after the last step, the exported student and `summary.json` too."""
    tc = run.cfg.train
    summary = {"final": run.last_record, "start_step": run.start_step, "end_step": run.end_step,
               "resumed_from": str(run.resumed_from) if run.resumed_from else None, **run.source.summary(),
               "clone_coverage": run.clone_sequences / max(run.seen_sequences, 1), "student_heldout": run.last_heldout,
               **(_heldout_record(run.last_heldout) if run.last_heldout else {}),
               "seconds": time.perf_counter() - run.started}  # fmt: skip
    if run.end_step < tc.steps:
        summary["stopped_early"] = True
        return summary
    student = _whole_student(run)  # collective for a sharded student
    if run.accelerator.is_main_process:
        info = {"steps": tc.steps, "tokens": run.last_record.get("tokens"), "heldout": run.last_heldout, **run.extra}
        summary["export"] = str(export_student(student, run.out_dir / "student", run.tokenizer, to_dict(run.cfg),
                                               dtype=export_dtype(run.cfg.export.dtype), extra_info=info,
                                               read_teacher=_teacher_reader(run)))  # fmt: skip
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.accelerator.wait_for_everyone()
    return summary


def _whole_student(run: Run) -> LRCStudent | None:
    """The trained student, unsharded, on the main process (None on the others): the student itself, or
    for a sharded one a copy rebuilt from the teacher on the CPU with the gathered trainable parameters."""
    if not _sharded(run):
        return run.student
    state = full_trainable_state(run.student)
    if not run.accelerator.is_main_process:
        return None
    # A teacher left in its files stays there (meta tensors in `whole`): the export reads it part by part.
    whole = build_student(run.teacher_model, run.cfg.student, device="cpu")
    with torch.no_grad():
        for name, param in whole.named_parameters():
            param.copy_(state[name])
    return whole


def _teacher_reader(run: Run):
    """For `export_student`: the whole student's teacher tensors read from the teacher's files (None when
    the student holds its teacher)."""
    files = run.teacher_files
    if files is None or not _sharded(run):
        return None
    keys = run.student.teacher_tensor_names(files.adapter)  # the whole student's names are the sharded one's
    return lambda name: files.read(keys[name])


def run_training(cfg: TrainJobConfig, source: BatchSource, teacher, out_dir: str | Path, accelerator: Accelerator,
                 progress: bool = True, **options) -> dict[str, Any]:  # fmt: skip
    """setup -> train -> finish; `options` are `setup`'s."""
    run = setup(cfg, source, teacher, out_dir, accelerator, **options)
    train(run, progress)
    return finish(run)
