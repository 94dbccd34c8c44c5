"""The online reference trainer: the official LRC recipe, teacher forward inside every step.

It is the baseline that training from the cache is measured against, in speed and in quality. It is
the training loop of `training.loop` fed by another batch source: a hooked teacher forward over the
packed corpus that yields the same batch as the cache reader, with the full teacher logits as its logit
signal and the seven clone targets at sampled positions. The corpus is packed as a cache build packs it:
tokenised once into an index in the run's directory (`<out>/index/`, reused on resume), from which each
batch's sequences are read, so memory does not grow with the corpus. It lives outside `training/`
because it runs the teacher's forward pass, which offline training never does.

With train.document_mask=true the teacher and the student both see each packed document alone (position
ids restarting at each document, no attention across documents), as a cache built with
cache.document_mask holds the teacher's signal; auto and false: neither does, as before that option.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .batch import Batch, CloneActivations, FullLogits
from .data import CorpusError, CorpusSpec
from .data.index import PackedIndex, TokenIndex, my_units, open_heldout, open_index, tokenize_units
from .capture.positions import sample_positions_batch
from .config import CLONE_TERMS, ConfigError, StudentConfig, TrainJobConfig
from .seeding import generator
from .student.init import SecondMoment
from .teacher.fingerprint import tokenizer_fingerprint
from .teacher.hooks import capture_teacher
from .teacher.load import Teacher, load_teacher
from .training.heldout import TensorHeldout, heldout_metrics
from .training.loop import make_accelerator, run_training

__all__ = ["OnlineSource", "teacher_batch", "train_online", "epoch_order", "online_sequences"]

ONLINE_STATE_VERSION = 1
"""Version of `OnlineSource.state_dict()`."""


def epoch_order(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of the sequences, fixed by (seed, epoch)."""
    return torch.randperm(num_sequences, generator=generator(seed, epoch))


def teacher_batch(model, input_ids_BT: torch.Tensor, positions_BP: torch.Tensor | None = None,
                  position_ids_BT: torch.Tensor | None = None) -> Batch:  # fmt: skip
    """The batch of one hooked teacher forward: the full logits and, at `positions_BP` (None: no clone
    loss), the seven clone targets of every layer. With `position_ids_BT` (restarting at each packed
    document), document-masked: the teacher sees each document alone, the batch carries the position ids
    and every document start is an attention sink; None: positions 0..T-1 and one causal block."""
    captured = capture_teacher(model, input_ids_BT, positions_BP=positions_BP,
                               terms=CLONE_TERMS if positions_BP is not None else (), want_logits=True,
                               position_ids_BT=position_ids_BT)  # fmt: skip
    clone = None
    if positions_BP is not None:
        clone = CloneActivations.build(positions_BP, {m: captured.acts[m].transpose(0, 1) for m in CLONE_TERMS},
                                       position_ids_BT)  # fmt: skip
    return Batch(input_ids_BT, position_ids=position_ids_BT, signal=FullLogits(captured.logits_BTV), clone=clone)


class OnlineSource:
    """Batches of packed corpus sequences with the teacher's signal computed on the spot.

    Args:
        teacher: The loaded teacher (on the training device).
        sequences: The packed training sequences (read batch by batch).
        cfg: The run config: batch order and clone positions follow `train.seed`; the clone targets are
            captured only when `loss.alpha` > 0, at `train.clone_positions` positions per sequence.
        device: Where the teacher runs.
        teacher_heldout: The teacher's own held-out metrics, for the summary.
    """

    name = "online"

    def __init__(self, teacher: Teacher, sequences: PackedIndex, cfg: TrainJobConfig, device: torch.device,
                 teacher_heldout: dict | None = None):  # fmt: skip
        self.model, self.sequences, self.device = teacher.model, sequences, device
        self.seed, self.seq_len, self.pass_batch_size = cfg.train.seed, cfg.train.seq_len, cfg.train.batch_size
        self.teacher_heldout = teacher_heldout
        self.num_clone_positions = cfg.train.clone_positions or cfg.train.seq_len
        self.use_clone = cfg.loss.alpha > 0
        self.document_mask = cfg.train.document_mask is True  # auto: off, as online training ran before the option
        self.num_sequences = sequences.num_sequences
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
            rows = [self.sequences.sequences(r, r + 1) for r in index.tolist()]  # read as `input_ids_at` reads
            input_ids = torch.cat([ids for ids, _ in rows]).to(self.device).long()
            position_ids = torch.cat([pos for _, pos in rows]).to(self.device).long() if self.document_mask else None
            positions = None
            if self.use_clone:  # document-masked: the document starts among the positions, as a cache build has them
                doc_positions = None if position_ids is None else position_ids.cpu()
                positions = sample_positions_batch(index.tolist(), self.seq_len, self.num_clone_positions, self.seed,
                                                   position_ids=doc_positions).to(self.device)  # fmt: skip
            yield teacher_batch(self.model, input_ids, positions, position_ids)

    def _read(self, first: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids of sequences [first, end) on `device`, and their position ids for the teacher (None
        without document masking: positions 0..T-1)."""
        input_ids, position_ids = self.sequences.sequences(first, end)
        return input_ids.to(device).long(), position_ids.to(device).long() if self.document_mask else None

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
            ids, position_ids = self._read(lo, min(lo + self.pass_batch_size, num), self.device)
            captured = capture_teacher(self.model, ids, positions_BP=keep.expand(ids.shape[0], -1),
                                       terms=("input", "attn"), want_logits=False,
                                       position_ids_BT=position_ids)  # fmt: skip
            moment.update(captured.acts["input"])
            moment.update(captured.acts["input"] + captured.acts["attn"])
        return moment, {"source": f"teacher pass over {num} training sequences", "vectors": moment.count}

    def head_scale_batches(self, num: int, batch_size: int, device: torch.device) -> list[Batch]:
        """The first `num` training sequences with the teacher's full logits."""
        num = min(num, self.num_sequences)
        batches = []
        for lo in range(0, num, batch_size):
            ids, position_ids = self._read(lo, min(lo + batch_size, num), device)
            with torch.no_grad():
                logits = self.model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
            batches.append(Batch(ids, position_ids=position_ids, signal=FullLogits(logits)))
        return batches

    def counters(self) -> dict[str, int]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"train_sequences": self.num_sequences, "document_mask": self.document_mask,
                "teacher_heldout": self.teacher_heldout}


def online_sequences(
    cfg: TrainJobConfig, tokenizer, out_dir: str | Path, accelerator: Accelerator | None = None
) -> tuple[PackedIndex, PackedIndex | None]:
    """The run's training sequences and held-out sequences (None without `heldout_docs`), packed from the
    tokenised index in `<out_dir>/index/` exactly as a cache build of the same corpus packs them. The
    corpus is tokenised on the first start (split between the processes of `accelerator`) and reused on
    resume.

    Raises:
        CorpusError: bad corpus, `heldout_docs` out of range, too little text for one sequence, or an index
            in `out_dir` tokenised from another corpus or with another tokenizer.
    """
    worker, num_workers = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    index = TokenIndex.create(out_dir, CorpusSpec(cfg.corpus, cfg.text_field), tokenizer,
                              tokenizer_fingerprint(tokenizer))  # fmt: skip
    tokenize_units(index, tokenizer, my_units(len(index.units), worker, num_workers))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    tokenize_units(index, tokenizer, index.missing())  # an output directory the processes do not share
    train = open_index(index, cfg.train.seq_len, cfg.heldout_docs)
    heldout = open_heldout(index, cfg.train.seq_len, cfg.heldout_docs, cfg.train.eval_sequences) \
        if cfg.heldout_docs else None  # fmt: skip
    return train, heldout


def train_online(cfg: TrainJobConfig, out_dir: str | Path, progress: bool = True, resume: str | Path = "auto",
                 max_steps_this_run: int | None = None) -> dict:  # fmt: skip
    """Train an LRC student with the teacher run in every step; export it; return a summary.

    Writes to `out_dir` what `training.loop` writes, and the corpus's tokenised index (`index/`);
    `summary.json` adds the teacher's held-out metrics. `resume` and `max_steps_this_run` are as in
    `training.trainer.train_from_cache`.
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
    created = not Path(out_dir).exists()
    try:
        train, heldout = online_sequences(cfg, teacher.tokenizer, out_dir, accelerator)
        if train.num_sequences < tc.batch_size:
            raise ConfigError(
                f"corpus {cfg.corpus!r} packs into {train.num_sequences} sequences, fewer than train.batch_size="
                f"{tc.batch_size}; lower the batch size or sequence length"
            )
    except (CorpusError, ConfigError):
        if created:  # nothing but the index there: leave no run directory behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    document_mask = tc.document_mask is True
    held, teacher_heldout = None, None
    if heldout is not None:
        ids, position_ids = heldout.sequences(0, heldout.num_sequences)
        held = TensorHeldout(ids, position_ids)  # the student is evaluated document-masked when it trains so
        with accelerator.autocast():
            # no KV cache: with one, `transformers` ignores the position ids' document boundaries
            teacher_heldout = heldout_metrics(
                lambda x, p=None: teacher.model(input_ids=x, position_ids=p, use_cache=False).logits, ids,
                tc.batch_size, accelerator.device, position_ids_NT=position_ids if document_mask else None)  # fmt: skip
    source = OnlineSource(teacher, train, cfg, accelerator.device, teacher_heldout)
    return run_training(cfg, source, teacher, out_dir, accelerator, progress=progress, resume=resume,
                        max_steps_this_run=max_steps_this_run, heldout=held)  # fmt: skip
