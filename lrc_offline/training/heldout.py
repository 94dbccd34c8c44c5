"""Held-out evaluation: the one evaluation code of the package.

- `evaluate_heldout` (stage 2): a student on held-out sequences with the teacher's signal read from the
  cache's held-out split (`CacheHeldout`): next-token CE, KL(teacher || student) computed from the cached
  signal by the function KD trains with, and top-1 agreement; every rank its part of the sequences, the
  sums added over ranks. No corpus is read and no teacher forward runs. Sequences without a teacher
  signal (`TensorHeldout`: held-out text packed from a corpus) give the CE alone.
- `heldout_metrics`: any logits function, and, against a teacher's logits function, KL and top-1 from
  the teacher's forward (`lrc-train eval --corpus`, the online trainer, the demo's final comparison).

Both evaluate document-masked when asked (`document_mask`, `position_ids_NT`): each packed document seen
alone, as a document-masked student trains and as a cache built with cache.document_mask holds the
teacher's signal.

KL is taken at the temperature given (the trainer's loss.temperature: its KD term on held-out data; a
top-k or sampled cache holds its signal at the cache's temperature, which training must use anyway). The
teacher's top-1 is its first top-k id (`topk`), the argmax of its head over the cached final hidden state
(`hidden`), or its most-drawn id (`sampled`: an estimate of the argmax from the cache's draws, ties to the
first listed; it misses where the teacher's top two are close and the draws few).

Legend: N sequences (or flattened tokens), B batch, T tokens, V vocabulary, S student hidden, D teacher
hidden, K top-k ids, C tokens in one chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .. import losses
from ..batch import Batch, HiddenSignal, SampledSignal, TopKSignal, logit_field_names
from ..cache import HELDOUT, CacheReader
from ..storage import Location
from .reader import batch_to_device, collate

__all__ = ["heldout_metrics", "HeldoutSet", "CacheHeldout", "TensorHeldout", "HeadFn", "student_head_fn",
           "rank_range", "heldout_sums", "heldout_results", "evaluate_heldout"]  # fmt: skip

log = logging.getLogger(__name__)

LogitsFn = Callable[..., torch.Tensor]
"""Input ids [B, T] (and, document-masked, position ids [B, T]) -> logits [B, T, V]."""
HeadFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""Input ids [B, T] -> (final normed hidden state [B, T, S], output head [V, S], the teacher's output head
[V, D] or None): a model's logits are hidden @ head.T, made a chunk of tokens at a time. A document-masked
evaluation (`heldout_sums(document_mask=True)`) calls it with position ids [B, T] too, a 0 starting each
packed document, each of which the model must then see alone."""

_SUMS = ("ce", "ce_tokens", "kl", "top1", "tokens", "sequences")
"""What `heldout_sums` adds up, in order."""


# ---- held-out sequences --------------------------------------------------------------------------------


class HeldoutSet(Protocol):
    """Held-out sequences, read a range at a time."""

    num_sequences: int
    seq_len: int
    has_signal: bool
    """Whether its batches carry the teacher's logit signal (KL and top-1 can be measured)."""

    def batches(self, first: int, end: int, batch_size: int) -> Iterator[Batch]:
        """Sequences [first, end) in batches of `batch_size` (the last may be shorter), on the host."""


class CacheHeldout:
    """A cache's held-out split (`shards/heldout-*`): token ids and the teacher's logit signal, shard by
    shard (the activation fields, if stored, are not read).

    Args:
        cache_dir: The cache (directory or `storage.Location`).
        max_sequences: Evaluate the first this many held-out sequences (None: all).

    Raises:
        CacheFormatError: the cache has no held-out split.
    """

    def __init__(self, cache_dir: str | Path | Location, max_sequences: int | None = None) -> None:
        self.reader = CacheReader(cache_dir, split=HELDOUT)
        complete = set(self.reader.complete_shards())
        leading = next((i for i in range(self.reader.num_shards) if i not in complete), self.reader.num_shards)
        wanted = self.reader.num_sequences if max_sequences is None else min(max_sequences, self.reader.num_sequences)
        available = self.reader.shard_range(leading - 1)[1] if leading else 0
        self.num_sequences = min(wanted, available)
        if self.num_sequences < wanted:
            log.warning("%s: held-out shard %d is not complete: evaluating on the first %d of %d held-out sequences "
                        "(finish the cache with lrc-cache build)", self.reader.root, leading, self.num_sequences,
                        wanted)  # fmt: skip
        self.seq_len = self.reader.manifest.config.seq_len
        self.fields = logit_field_names(spec.name for spec in self.reader.fields)
        self.has_signal = self.reader.manifest.config.logit_mode != "none"

    def batches(self, first: int, end: int, batch_size: int) -> Iterator[Batch]:
        """Made by the training reader's `collate`, as the training batches are."""
        samples: list[dict] = []
        per_shard = self.reader.sequences_per_shard
        for shard in range(first // per_shard, math.ceil(end / per_shard) if end > first else 0):
            data = self.reader.read_shard(shard, self.fields)
            lo, hi = self.reader.shard_range(shard)
            for index in range(max(first, lo), min(end, hi)):
                samples.append({name: tensor[index - lo] for name, tensor in data.items()} | {"sequence_index": index})
                if len(samples) == batch_size:
                    yield collate(samples)
                    samples = []
        if samples:
            yield collate(samples)


class TensorHeldout:
    """Held-out sequences given as token ids [N, T] (packed from a corpus): no teacher signal, CE only; with
    their position ids [N, T] (0 starts a document, as the packing gives them) they can be evaluated
    document-masked."""

    has_signal = False

    def __init__(self, input_ids_NT: torch.Tensor, position_ids_NT: torch.Tensor | None = None) -> None:
        assert position_ids_NT is None or position_ids_NT.shape == input_ids_NT.shape
        self.input_ids, self.position_ids = input_ids_NT, position_ids_NT
        self.num_sequences, self.seq_len = input_ids_NT.shape

    def batches(self, first: int, end: int, batch_size: int) -> Iterator[Batch]:
        for lo in range(first, end, batch_size):
            rows = slice(lo, min(lo + batch_size, end))
            position_ids = None if self.position_ids is None else self.position_ids[rows]
            yield Batch(self.input_ids[rows], position_ids=position_ids)


# ---- metrics from a cached signal -----------------------------------------------------------------------


def student_head_fn(student) -> HeadFn:
    """The `HeadFn` of an LRC student (`student.lrc.LRCStudent`, or one sharded in place); given position ids,
    document-masked as training masks it."""

    def head_fn(input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None):
        out = student(input_ids_BT, position_ids_BT=position_ids_BT, document_mask=position_ids_BT is not None,
                      logits=False)  # fmt: skip
        return out.hidden_BTS, out.head_weight_VS, out.teacher_head_VD

    return head_fn


def rank_range(num_sequences: int, rank: int, world_size: int) -> tuple[int, int]:
    """[first, end) of the held-out sequences rank `rank` of `world_size` evaluates: contiguous, sizes
    differing by at most one, together every sequence once."""
    return rank * num_sequences // world_size, (rank + 1) * num_sequences // world_size


def _teacher_top1(signal, teacher_CX: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """The teacher's top-1 id at the chunk's tokens (see the module docstring)."""
    match signal:
        case TopKSignal():
            return signal.ids.reshape(-1, signal.ids.shape[-1])[rows, 0].long()
        case HiddenSignal():
            return teacher_CX.argmax(-1)
        case SampledSignal():
            ids_NN = signal.ids.reshape(-1, signal.ids.shape[-1])[rows]
            counts_NN = signal.counts.reshape(-1, signal.counts.shape[-1])[rows]
            return ids_NN.gather(-1, counts_NN.argmax(-1, keepdim=True)).squeeze(-1).long()
    raise TypeError(f"no top-1 for a {type(signal).__name__} signal")


def _chunk_kl(signal, logits_1CV: torch.Tensor, rows: slice, teacher_head_VD, temperature: float):
    """KL(teacher || student) summed over the chunk's tokens, by the function KD trains with on this
    signal (each returns the mean over the chunk's tokens, all valid), and the teacher's logits for a
    hidden signal (its top-1), else None."""
    num = logits_1CV.shape[1]
    valid_1C = torch.ones((1, num), dtype=torch.bool, device=logits_1CV.device)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[rows][None]

    match signal:
        case TopKSignal():
            kl = losses.kl_topk(logits_1CV, flat(signal.ids), flat(signal.logprobs), valid_1C, temperature)
            return kl * num, None
        case SampledSignal():
            kl = losses.kd_sampled(logits_1CV, flat(signal.ids), flat(signal.counts), valid_1C, temperature)
            return kl * num, None
        case HiddenSignal():
            # The teacher's logits of the chunk, made once for the KL and the top-1: `kl_from_hidden`, which
            # training uses, is `kl_full` over these logits (made a chunk at a time for its backward).
            hidden_CD = flat(signal.hidden)[0].to(teacher_head_VD.dtype)  # as training feeds it
            teacher_CV = hidden_CD @ teacher_head_VD.T
            return losses.kl_full(logits_1CV, teacher_CV[None], valid_1C, temperature) * num, teacher_CV
    raise TypeError(f"no KL from a {type(signal).__name__} signal")


def _batch_sums(hidden_BTS: torch.Tensor, head_VS: torch.Tensor, batch: Batch, teacher_head_VD, temperature: float,
                chunk_tokens: int) -> torch.Tensor:  # fmt: skip
    """This batch's `_SUMS`, the logits made `chunk_tokens` tokens at a time in fp32 (no [B, T, V] tensor)."""
    ids_BT = batch.input_ids.long()
    num_seqs, num_tokens = ids_BT.shape
    vocab = head_VS.shape[0]
    # position t predicts token t + 1; the last position of each sequence predicts nothing
    targets_BT = torch.cat([ids_BT[:, 1:], torch.zeros_like(ids_BT[:, :1])], dim=1).clamp(0, vocab - 1)
    predicts_BT = torch.ones_like(ids_BT, dtype=torch.bool)
    predicts_BT[:, -1] = False
    hidden_NS, head_VS = hidden_BTS.reshape(-1, hidden_BTS.shape[-1]).float(), head_VS.float()
    targets_N, predicts_N = targets_BT.reshape(-1), predicts_BT.reshape(-1)
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=hidden_NS.device)
    signal = batch.signal
    for start in range(0, hidden_NS.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, hidden_NS.shape[0]))
        logits_CV = hidden_NS[rows] @ head_VS.T
        nll_C = F.cross_entropy(logits_CV, targets_N[rows], reduction="none")
        sums[0] += torch.where(predicts_N[rows], nll_C, 0.0).sum()
        if signal is not None:
            kl, teacher_CV = _chunk_kl(signal, logits_CV[None], rows, teacher_head_VD, temperature)
            sums[2] += kl
            sums[3] += (logits_CV.argmax(-1) == _teacher_top1(signal, teacher_CV, rows)).sum()
    sums[1] += num_seqs * (num_tokens - 1)
    sums[4] += num_seqs * num_tokens
    sums[5] += num_seqs
    return sums


@torch.no_grad()
def heldout_sums(
    head_fn: HeadFn,
    heldout: HeldoutSet,
    batch_size: int,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    collective: bool = False,
    document_mask: bool = False,
) -> torch.Tensor:
    """Rank `rank`'s part of the held-out sums (`rank_range`), to be added over ranks (`heldout_results`
    turns them into metrics).

    Args:
        head_fn: the model (see `HeadFn`), called on `device`.
        heldout: the held-out sequences.
        batch_size: sequences per forward.
        temperature: the KL's (both distributions softmax(logits / temperature); CE is at 1).
        chunk_tokens: tokens whose logits exist at once.
        rank, world_size: this process's place among those evaluating.
        collective: the forward is collective (a sharded student): every rank runs as many forwards as the
            rank with the most sequences, padding with forwards whose result is dropped.
        document_mask: each packed document is evaluated alone: `head_fn` gets the sequences' position ids
            (a document-masked student on a document-masked cache's held-out split).

    Raises:
        ValueError: `document_mask` on held-out sequences without position ids.

    Returns:
        float64 [6] on `device`: CE summed over predicted tokens, predicted tokens, KL summed over tokens,
        tokens where the top-1 ids agree, tokens, sequences.
    """
    device = torch.device(device)
    first, end = rank_range(heldout.num_sequences, rank, world_size)
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    forwards = 0
    for batch in heldout.batches(first, end, batch_size):
        batch = batch_to_device(batch, device)
        if document_mask and batch.position_ids is None:
            raise ValueError("document-masked held-out evaluation needs the sequences' position ids (their "
                             "document starts); these held-out sequences have none")  # fmt: skip
        args = (batch.input_ids.long(), batch.position_ids.long()) if document_mask else (batch.input_ids.long(),)
        hidden_BTS, head_VS, teacher_head_VD = head_fn(*args)  # under the caller's autocast
        with torch.autocast(device.type, enabled=False):  # the logits and metrics in fp32
            sums += _batch_sums(hidden_BTS, head_VS, batch, teacher_head_VD, temperature, chunk_tokens)
        forwards += 1
    if collective:
        most = math.ceil(math.ceil(heldout.num_sequences / world_size) / batch_size)
        for _ in range(most - forwards):
            pad_ids = torch.zeros((1, heldout.seq_len), dtype=torch.long, device=device)
            pad_positions = torch.arange(heldout.seq_len, device=device)[None]  # one document
            head_fn(*((pad_ids, pad_positions) if document_mask else (pad_ids,)))
    return sums


def heldout_results(sums: torch.Tensor, has_signal: bool) -> dict[str, float]:
    """Metrics from `heldout_sums` (added over ranks): ce (nats per predicted token), ppl, tokens
    (predicted), sequences, and with a teacher signal kl (mean per token) and top1 (agreement fraction)."""
    ce_sum, ce_tokens, kl_sum, top1_sum, tokens, sequences = sums.tolist()
    ce = ce_sum / max(ce_tokens, 1)
    out = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": int(ce_tokens), "sequences": int(sequences)}
    if has_signal:
        out.update(kl=kl_sum / max(tokens, 1), top1=top1_sum / max(tokens, 1))
    return out


def evaluate_heldout(
    head_fn: HeadFn,
    heldout: HeldoutSet,
    batch_size: int,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    collective: bool = False,
    document_mask: bool = False,
) -> dict[str, float]:
    """`heldout_results` of every rank's `heldout_sums`, added with `torch.distributed.all_reduce` when a
    process group is initialised (every rank must call it), else this process's alone (all sequences)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    sums = heldout_sums(head_fn, heldout, batch_size, device, temperature, chunk_tokens, rank, world_size, collective,
                        document_mask)  # fmt: skip
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    return heldout_results(sums, heldout.has_signal)


# ---- any logits function, against a teacher's forward ----------------------------------------------------


@torch.no_grad()
def heldout_metrics(
    logits_fn: LogitsFn,
    input_ids_NT: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    teacher_fn: LogitsFn | None = None,
    position_ids_NT: torch.Tensor | None = None,
) -> dict[str, float]:
    """Token-weighted metrics of `logits_fn` over held-out sequences.

    Args:
        logits_fn: maps input ids [B, T] on `device` to logits [B, T, V].
        input_ids_NT: held-out sequences.
        batch_size: sequences per forward.
        device: where the forwards run.
        teacher_fn: the teacher's logits function, to compare with (None: the model alone).
        position_ids_NT: the sequences' position ids (0 starts a document), for a document-masked
            evaluation: `logits_fn` and `teacher_fn` then take (input ids, position ids) and must see each
            packed document alone. None: they take the input ids alone.

    Returns:
        ce (nats per predicted token), ppl = exp(ce), tokens (predicted tokens); with `teacher_fn` also
        teacher_ce, teacher_ppl, kl (mean per token of KL(teacher || model) at temperature 1) and
        top1_agreement (fraction of positions where the argmaxes agree).
    """
    sums = {"ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "top1_agreement": 0.0}
    num_pred, num_pos = 0, 0
    for lo in range(0, input_ids_NT.shape[0], batch_size):
        ids = input_ids_NT[lo : lo + batch_size].to(device).long()
        args = (ids,) if position_ids_NT is None else (ids, position_ids_NT[lo : lo + batch_size].to(device).long())
        mask = torch.ones_like(ids, dtype=torch.bool)
        pred, pos = ids.shape[0] * (ids.shape[1] - 1), ids.numel()
        logits = logits_fn(*args).float()
        sums["ce"] += losses.cross_entropy_next(logits, ids, mask).item() * pred
        if teacher_fn is not None:
            t_logits = teacher_fn(*args).float()
            sums["teacher_ce"] += losses.cross_entropy_next(t_logits, ids, mask).item() * pred
            sums["kl"] += losses.kl_full(logits, t_logits, mask).item() * pos
            sums["top1_agreement"] += (logits.argmax(-1) == t_logits.argmax(-1)).float().sum().item()
        num_pred, num_pos = num_pred + pred, num_pos + pos
    ce = sums["ce"] / max(num_pred, 1)
    out = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": num_pred}
    if teacher_fn is not None:
        teacher_ce = sums["teacher_ce"] / max(num_pred, 1)
        out.update(teacher_ce=teacher_ce, teacher_ppl=math.exp(min(teacher_ce, 50.0)),
                   kl=sums["kl"] / max(num_pos, 1), top1_agreement=sums["top1_agreement"] / max(num_pos, 1))  # fmt: skip
    return out
