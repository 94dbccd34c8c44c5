"""The online reference trainer: the official LRC recipe, teacher forward inside every step.

It is the baseline that training from the cache is measured against, in speed and in quality. It is
the training loop of `training.loop` fed by another batch source: a hooked teacher forward over the
packed corpus that yields the same batch as the cache reader, with the full teacher logits as its logit
signal and the seven clone targets at sampled positions. It lives outside `training/` because it runs
the teacher's forward pass, which offline training never does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .batch import Batch, CloneActivations, FullLogits
from .data import load_documents, pack_documents, split_heldout
from .capture.positions import sample_positions_batch
from .config import CLONE_TERMS, ConfigError, StudentConfig, TrainJobConfig
from .seeding import generator
from .student.init import SecondMoment
from .teacher.hooks import capture_teacher
from .teacher.load import Teacher, load_teacher
from .training.heldout import heldout_metrics
from .training.loop import make_accelerator, run_training

__all__ = ["OnlineSource", "teacher_batch", "train_online", "epoch_order"]

ONLINE_STATE_VERSION = 1
"""Version of `OnlineSource.state_dict()`."""


def epoch_order(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of the sequences, fixed by (seed, epoch)."""
    return torch.randperm(num_sequences, generator=generator(seed, epoch))


def teacher_batch(model, input_ids_BT: torch.Tensor, positions_BP: torch.Tensor | None = None) -> Batch:
    """The batch of one hooked teacher forward: the full logits and, at `positions_BP` (None: no clone
    loss), the seven clone targets of every layer."""
    captured = capture_teacher(model, input_ids_BT, positions_BP=positions_BP,
                               terms=CLONE_TERMS if positions_BP is not None else (), want_logits=True)  # fmt: skip
    clone = None
    if positions_BP is not None:
        clone = CloneActivations.build(positions_BP, {m: captured.acts[m].transpose(0, 1) for m in CLONE_TERMS})
    return Batch(input_ids_BT, signal=FullLogits(captured.logits_BTV), clone=clone)


class OnlineSource:
    """Batches of packed corpus sequences with the teacher's signal computed on the spot.

    Args:
        teacher: The loaded teacher (on the training device).
        input_ids_NT: The packed training sequences.
        cfg: The run config: batch order and clone positions follow `train.seed`; the clone targets are
            captured only when `loss.alpha` > 0, at `train.clone_positions` positions per sequence.
        device: Where the teacher runs.
        teacher_heldout: The teacher's own held-out metrics, for the summary.
    """

    name = "online"

    def __init__(self, teacher: Teacher, input_ids_NT: torch.Tensor, cfg: TrainJobConfig, device: torch.device,
                 teacher_heldout: dict | None = None):  # fmt: skip
        self.model, self.input_ids, self.device = teacher.model, input_ids_NT, device
        self.seed, self.seq_len, self.pass_batch_size = cfg.train.seed, cfg.train.seq_len, cfg.train.batch_size
        self.teacher_heldout = teacher_heldout
        self.num_clone_positions = cfg.train.clone_positions or cfg.train.seq_len
        self.use_clone = cfg.loss.alpha > 0
        self.num_sequences = input_ids_NT.shape[0]
        self.epoch_index, self.consumed = 0, 0

    def _index_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Index batches epoch after epoch, each epoch in its own seeded order, from the saved position."""
        while True:
            order = epoch_order(self.num_sequences, self.seed, self.epoch_index)
            for lo in range(self.consumed, self.num_sequences - batch_size + 1, batch_size):
                self.consumed = lo + batch_size
                yield order[lo : lo + batch_size]
            self.epoch_index, self.consumed = self.epoch_index + 1, 0

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for index in self._index_batches(batch_size):
            input_ids = self.input_ids[index].to(self.device).long()
            positions = None
            if self.use_clone:
                positions = sample_positions_batch(index.tolist(), self.seq_len, self.num_clone_positions,
                                                   self.seed).to(self.device)  # fmt: skip
            yield teacher_batch(self.model, input_ids, positions)

    def epoch(self) -> float:
        return self.epoch_index + self.consumed / self.num_sequences

    def state_dict(self) -> dict[str, Any]:
        return {"version": ONLINE_STATE_VERSION, "num_sequences": self.num_sequences, "seed": self.seed,
                "epoch": self.epoch_index, "consumed": self.consumed}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.state_dict()
        for key in ("version", "num_sequences", "seed"):
            if state.get(key) != expected[key]:
                raise ConfigError(f"the checkpoint's online data position has {key}={state.get(key)!r}, this run "
                                  f"{expected[key]!r}; resume with the corpus, seq_len and seed the run started with")  # fmt: skip
        self.epoch_index, self.consumed = int(state["epoch"]), int(state["consumed"])

    def second_moment(self, cfg: StudentConfig, accelerator: Accelerator) -> tuple[SecondMoment, dict]:
        """The residual-stream second moment from a short teacher pass over the first training sequences,
        pooled as from a cache: h and h + a (see training/pca.py)."""
        num = min(cfg.pca_sequences, self.num_sequences)
        moment = SecondMoment(self.model.config.hidden_size)
        positions = torch.arange(self.seq_len, device=self.device)
        keep = positions[1:] if cfg.pca_exclude_sink else positions
        for lo in range(0, num, self.pass_batch_size):
            ids = self.input_ids[lo : min(lo + self.pass_batch_size, num)].to(self.device).long()
            captured = capture_teacher(self.model, ids, positions_BP=keep.expand(ids.shape[0], -1),
                                       terms=("input", "attn"), want_logits=False)  # fmt: skip
            moment.update(captured.acts["input"])
            moment.update(captured.acts["input"] + captured.acts["attn"])
        return moment, {"source": f"teacher pass over {num} training sequences", "vectors": moment.count}

    def head_scale_batches(self, num: int, batch_size: int, device: torch.device) -> list[Batch]:
        """The first `num` training sequences with the teacher's full logits."""
        num = min(num, self.num_sequences)
        batches = []
        for lo in range(0, num, batch_size):
            ids = self.input_ids[lo : min(lo + batch_size, num)].to(device).long()
            with torch.no_grad():
                batches.append(Batch(ids, signal=FullLogits(self.model(input_ids=ids).logits)))
        return batches

    def counters(self) -> dict[str, int]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"train_sequences": self.num_sequences, "teacher_heldout": self.teacher_heldout}


def train_online(cfg: TrainJobConfig, out_dir: str | Path, progress: bool = True, resume: str | Path = "auto",
                 max_steps_this_run: int | None = None) -> dict:  # fmt: skip
    """Train an LRC student with the teacher run in every step; export it; return a summary.

    Writes to `out_dir` what `training.loop` writes; `summary.json` adds the teacher's held-out metrics.
    `resume` and `max_steps_this_run` are as in `training.trainer.train_from_cache`.
    """
    if cfg.teacher is None:
        raise ConfigError("online training runs the teacher: set teacher=<name or path>")
    if cfg.loss.alpha > 0 and cfg.loss.clone_normalize == "cache":
        raise ConfigError("loss.clone_normalize=cache reads statistics recorded in a cache; online training has "
                          "none: use loss.clone_normalize=batch")  # fmt: skip
    cfg = cfg.resolved(residual_available=True)  # the teacher is here: a short pass gives the PCA basis
    tc = cfg.train
    accelerator = make_accelerator(tc)
    torch.manual_seed(tc.seed)
    teacher = load_teacher(cfg.teacher, dtype="auto", device=accelerator.device)
    train_docs, heldout_docs = split_heldout(load_documents(cfg.corpus, cfg.text_field), cfg.heldout_docs)
    train = pack_documents(train_docs, teacher.tokenizer, tc.seq_len)
    heldout = pack_documents(heldout_docs, teacher.tokenizer, tc.seq_len, tc.eval_sequences) if heldout_docs else None
    if train.num_sequences < tc.batch_size:
        raise ConfigError(
            f"corpus {cfg.corpus!r} packs into {train.num_sequences} sequences, fewer than train.batch_size="
            f"{tc.batch_size}; lower the batch size or sequence length"
        )
    heldout_ids = None if heldout is None else heldout.input_ids
    teacher_heldout = None
    if heldout_ids is not None:
        with accelerator.autocast():
            teacher_heldout = heldout_metrics(lambda ids: teacher.model(input_ids=ids).logits, heldout_ids,
                                              tc.batch_size, accelerator.device)  # fmt: skip
    source = OnlineSource(teacher, train.input_ids, cfg, accelerator.device, teacher_heldout)
    return run_training(cfg, source, teacher, out_dir, accelerator, progress=progress, resume=resume,
                        max_steps_this_run=max_steps_this_run, heldout_ids=heldout_ids)  # fmt: skip
