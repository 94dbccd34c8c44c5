"""The online reference trainer: the official LRC recipe, teacher forward inside every step.

It is the baseline that training from the cache is measured against, in speed and in quality, so it
uses the same objective (`training.objective.lrc_loss`), optimiser and schedule as the offline trainer;
only the source of the teacher signal differs (a hooked teacher forward here, cache shards there).
It lives outside `training/` because it runs the teacher's forward pass, which offline training never does.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .capture.corpus import load_documents, pack_documents, split_heldout
from .capture.positions import sample_positions_batch
from .config import CLONE_TERMS, ConfigError, TrainJobConfig, save_config, to_dict
from .student.export import export_student
from .student.init import SecondMoment, init_pca, pca_basis
from .student.lrc import build_student
from .teacher.hooks import capture_teacher
from .teacher.load import load_teacher, resolve_device
from .training.evaluate import heldout_ce
from .training.metrics import MetricsWriter
from .training.objective import lrc_loss
from .training.optim import build_optimizer
from .training.pca import fit_head_scale, head_scale_sequences

__all__ = ["train_online", "autocast_context", "epoch_order"]


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 autocast on accelerators (`auto` or `bf16`), plain fp32 on the CPU with `auto`."""
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type != "cpu")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_order(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of the sequences, fixed by (seed, epoch)."""
    return torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _batches(num_sequences: int, batch_size: int, seed: int):
    """Endless stream of index batches, epoch after epoch, each epoch in its own seeded order."""
    epoch = 0
    while True:
        order = epoch_order(num_sequences, seed, epoch)
        for lo in range(0, num_sequences - batch_size + 1, batch_size):
            yield order[lo : lo + batch_size]
        epoch += 1


def _pca_from_teacher(model, input_ids_NT: torch.Tensor, cfg: TrainJobConfig, device) -> dict:
    """The residual-stream second moment from a short teacher pass over the first training sequences."""
    num = min(cfg.student.pca_sequences, input_ids_NT.shape[0])
    moment = SecondMoment(model.config.hidden_size)
    positions = torch.arange(cfg.train.seq_len, device=device)
    for lo in range(0, num, cfg.train.batch_size):
        ids = input_ids_NT[lo : min(lo + cfg.train.batch_size, num)].to(device).long()
        keep = positions[1:] if cfg.student.pca_exclude_sink else positions
        captured = capture_teacher(model, ids, positions_BP=keep.expand(ids.shape[0], -1), terms=("input", "attn"),
                                   want_logits=False)  # fmt: skip
        moment.update(captured.acts["input"])  # as from a cache: h and h + a (see training/pca.py)
        moment.update(captured.acts["input"] + captured.acts["attn"])
    return {"moment": moment, "source": f"teacher pass over {num} training sequences", "vectors": moment.count}


def _calibrate_head(student, model, input_ids_NT: torch.Tensor, cfg: TrainJobConfig, device) -> dict:
    """The PCA head scale fitted as from a cache (training/pca.py), on the teacher's full logits."""
    num = min(head_scale_sequences(student, cfg), input_ids_NT.shape[0])
    if num == 0:
        return {"head_scale": 1.0}
    batches = []
    for lo in range(0, num, cfg.train.batch_size):
        ids = input_ids_NT[lo : min(lo + cfg.train.batch_size, num)].to(device).long()
        with torch.no_grad():
            batches.append({"input_ids": ids, "teacher_logits": model(input_ids=ids).logits})
    return fit_head_scale(student, batches, cfg)


def train_online(cfg: TrainJobConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train an LRC student with the teacher run in every step; export it; return a summary.

    Writes to `out_dir`: `config.json` (resolved), `metrics.jsonl` (one line per logged step),
    `student/` (the exported HF checkpoint) and `summary.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.resolved(residual_available=True)  # the teacher is here: a short pass gives the PCA basis
    save_config(cfg, out_dir / "config.json")
    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)

    # ---- teacher, data, student -----------------------------------------------------------------
    if cfg.teacher is None:
        raise ConfigError("online training runs the teacher: set teacher=<name or path>")
    teacher = load_teacher(cfg.teacher, dtype="auto", device=device)
    docs = load_documents(cfg.corpus, cfg.text_field)
    train_docs, heldout_docs = split_heldout(docs, cfg.heldout_docs)
    train = pack_documents(train_docs, teacher.tokenizer, tc.seq_len)
    heldout = pack_documents(heldout_docs, teacher.tokenizer, tc.seq_len, tc.eval_sequences) if heldout_docs else None
    if train.num_sequences < tc.batch_size:
        raise ConfigError(
            f"corpus {cfg.corpus!r} packs into {train.num_sequences} sequences, fewer than train.batch_size="
            f"{tc.batch_size}; lower the batch size or sequence length"
        )
    student = build_student(teacher.model, cfg.student).to(device)
    init_info = {"kind": cfg.student.init}
    if cfg.student.init == "pca":
        init_info.update(_pca_from_teacher(teacher.model, train.input_ids, cfg, device))
        init_pca(student, pca_basis(init_info.pop("moment"), cfg.student.hidden_size))
        init_info.update(_calibrate_head(student, teacher.model, train.input_ids, cfg, device))
    optimizer, scheduler = build_optimizer(student, cfg.optim, tc.steps)
    use_clone = cfg.loss.alpha > 0
    if use_clone and cfg.loss.clone_normalize == "cache":
        raise ConfigError("loss.clone_normalize=cache reads statistics recorded in a cache; online training has "
                          "none: use loss.clone_normalize=batch")  # fmt: skip
    clone_positions = tc.clone_positions or tc.seq_len

    def evaluate() -> dict:
        student.eval()
        with autocast_context(device, tc.mixed_precision):
            result = heldout_ce(lambda ids: student(ids).logits_BTV, heldout.input_ids, tc.batch_size, device)
        student.train()
        return result

    teacher_eval = None
    if heldout is not None:
        with autocast_context(device, tc.mixed_precision):
            teacher_eval = heldout_ce(lambda ids: teacher.model(input_ids=ids).logits, heldout.input_ids,
                                      tc.batch_size, device)  # fmt: skip

    # ---- loop -------------------------------------------------------------------------------------
    batches = _batches(train.num_sequences, tc.batch_size, tc.seed)
    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    tokens_per_step = tc.batch_size * tc.grad_accum * tc.seq_len
    bar = tqdm(total=tc.steps, desc="online LRC", unit="step", disable=not progress)
    window_start, window_tokens, last = time.perf_counter(), 0, {}
    for step in range(tc.steps):
        parts_sum: dict[str, torch.Tensor] = {}
        for _ in range(tc.grad_accum):
            index = next(batches)
            input_ids = train.input_ids[index].to(device).long()
            positions = None
            if use_clone:
                positions = sample_positions_batch(index.tolist(), tc.seq_len, clone_positions, tc.seed)
                positions = positions.to(device)
            captured = capture_teacher(
                teacher.model, input_ids, positions_BP=positions, terms=CLONE_TERMS if use_clone else (),
                want_logits=True,
            )  # fmt: skip
            batch = {"input_ids": input_ids, "teacher_logits": captured.logits_BTV}
            if use_clone:
                batch["act_positions"] = positions
                batch.update({f"act_{m}": captured.acts[m].transpose(0, 1) for m in CLONE_TERMS})
            with autocast_context(device, tc.mixed_precision):
                loss, parts = lrc_loss(student, batch, cfg.loss, alpha=cfg.loss.alpha_at(step, tc.steps))
            (loss / tc.grad_accum).backward()
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        bar.update(1)

        is_last = step + 1 == tc.steps
        if (step + 1) % tc.log_every == 0 or is_last:
            elapsed = time.perf_counter() - window_start
            record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, **parts_sum,
                      "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}  # fmt: skip
            if heldout is not None and (is_last or (tc.eval_every and (step + 1) % tc.eval_every == 0)):
                record["heldout_ce"] = evaluate()["ce"]
            last = metrics.write(record)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            window_start, window_tokens = time.perf_counter(), 0
    bar.close()
    metrics.close()

    # ---- export -------------------------------------------------------------------------------------
    export_dir = export_student(student, out_dir / "student", teacher.tokenizer, to_dict(cfg),
                                extra_info={"trainer": "online", "steps": tc.steps, "init": init_info})  # fmt: skip
    summary = {"final": last, "export": str(export_dir), "train_sequences": train.num_sequences,
               "teacher_heldout": teacher_eval, "student_heldout": evaluate() if heldout is not None else None}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
