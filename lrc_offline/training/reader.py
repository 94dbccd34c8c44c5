"""Streaming the cache into training: whole shards split across ranks and workers, shuffled in memory.

Rank r of w reads the complete shards r, r + w, r + 2w, ... (by position in the list of complete
shards), so the ranks of one job read disjoint shards and together read every complete sequence
exactly once per epoch. Shards are read whole (one decompression per shard, never per sequence) and
shuffled in memory: the shard order and each shard's sequence order are fixed by (seed, epoch).

The reading position is kept per shard, not per rank: a cursor `(epoch, offset)` for every shard, the
epoch it is being read in and how many of its sequences (in that epoch's order of the shard) have been
handed out. A rank's position is its shards' cursors (`state_dict`); the cursors of every rank together
are the whole job's position, which does not depend on how many ranks read it. So a run resumes on any
number of processes: each new rank takes the cursors of the shards it now reads (`load_state_dict` with
every old rank's state), reads the partly read ones from their offsets and skips those done, and every
sequence of an epoch is still read exactly once. A rank's epoch is the oldest epoch of its shards:
ranks whose shares differ in size (7 shards on 2 ranks, or a resume on another number of processes
with shards part read) drift apart by whole epochs of their own shards, never by a sequence read
twice or missed within a shard's epoch. On the same number of processes the order is that of an
uninterrupted run, sequence for sequence.

Resuming skips whole shards without reading them. That is exact when the dataset is iterated in the
training process (`num_workers=0`, the default path). With DataLoader workers each worker reads its
own share of the rank's shards and the main process's copy never advances, so `state_dict()` then
says nothing about the position; workers are for throughput only and refuse a mid-epoch resume.

Setting the environment variable ``LRC_SEQUENCE_LOG`` to a directory makes every reader append the
epoch and id of each sequence it hands out, in order, to ``rank-<r>-of-<w>.jsonl`` there: a debugging
aid that shows what a run, and a run resumed on another number of processes, read. A run killed
between checkpoints reads the sequences of its lost steps again after the resume, so they are logged
twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..batch import Batch
from ..cache import CacheReader, CorruptShardError
from ..storage import Location
from ..config import BuildRunConfig, ConfigError
from ..seeding import generator

__all__ = ["READER_STATE_VERSION", "SEQUENCE_LOG_ENV", "ReaderStateError", "CacheDataset", "stack_samples",
           "collate", "iter_batches", "batch_to_device"]

log = logging.getLogger(__name__)

READER_STATE_VERSION = 2
"""Version of `CacheDataset.state_dict()` (2: a cursor per shard). A version-1 state (a rank's epoch and count
of sequences, saved before) is converted on load; a state of any other version is refused."""

SEQUENCE_LOG_ENV = "LRC_SEQUENCE_LOG"
"""Environment variable: a directory to log every handed-out sequence's epoch and id to (module docstring)."""

Cursor = tuple[int, int]
"""A shard's reading position: (the epoch it is being read in, its sequences handed out in that epoch)."""


class ReaderStateError(ValueError):
    """A saved reading position does not fit this cache, seed or set of complete shards."""


class CacheDataset(IterableDataset):
    """Per-sequence dicts of a cache's fields (plus ``sequence_index``), in a seeded order, epoch after epoch.

    Args:
        cache_dir: Cache directory (holding ``manifest.json``) or URL (a `storage.Location`).
        rank: This process's rank.
        world_size: Number of processes reading the cache.
        seed: Seed of the shard and sequence order.
        num_epochs: Epochs to read before stopping (None: endless).
        fields: Fields to read (default: all the manifest's).
        on_corrupt_shard: A shard whose completion record exists but is damaged (found here), or whose
            data no longer matches its record (checked before decoding, when the shard is reached):
            `fail` raises `CorruptShardError`; `skip` logs it and reads on without it. A shard with no
            record is incomplete, not corrupt: it is left out with a warning either way (a cache
            still being built is read as far as it goes), but a resumed run refuses to lose one it
            started with (`load_state_dict`).
        sequence_log: Directory to log the handed-out sequences to (default: ``$LRC_SEQUENCE_LOG``, if set).

    Raises:
        ValueError: bad rank/world size, or this rank gets no complete shard.
        CorruptShardError: a damaged completion record, with on_corrupt_shard=fail.
    """

    def __init__(
        self,
        cache_dir: str | Path | Location,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_epochs: int | None = None,
        fields: list[str] | None = None,
        on_corrupt_shard: str = "fail",
        sequence_log: str | Path | None = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.reader = CacheReader(cache_dir)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_epochs, self.fields = num_epochs, fields
        self.on_corrupt_shard = on_corrupt_shard
        self.corrupt_shards: list[int] = []
        """Shards found corrupt while reading (and skipped), in the order found."""
        complete, damaged = self.reader.shard_status()
        if damaged and on_corrupt_shard == "fail":
            raise damaged[min(damaged)]
        # Shards with a damaged record stay in the order and are skipped when reached, like shards whose
        # data fails its checksums: the reading position (and a resume) does not depend on them.
        complete = sorted({*complete, *damaged})
        self.skipped_shards = sorted(set(range(self.reader.num_shards)) - set(complete))
        """Shards without a completion record (incomplete), left out of this run."""
        if self.skipped_shards:
            log.warning(
                "%s: %d of %d shards are incomplete and skipped: %s (finish them with `lrc-cache build`)",
                self.reader.root, len(self.skipped_shards), self.reader.num_shards, self.skipped_shards,
            )  # fmt: skip
        self.all_shards = complete
        """The shards all ranks together read (every rank's `shards`)."""
        self.shards = complete[rank::world_size]
        if not self.shards:
            raise ConfigError(
                f"{self.reader.root}: rank {rank} of {world_size} gets no shard: the cache has {len(complete)} "
                "complete shards; use fewer processes or build more shards"
            )
        for index in self.shards:
            if index in damaged:
                self._corrupt(damaged[index])
        self.shard_sizes = {i: self._size(i) for i in complete}
        self.num_complete_sequences = sum(self.shard_sizes.values())
        """Sequences all ranks together read per epoch."""
        self.num_sequences = sum(self.shard_sizes[i] for i in self.shards)
        """Sequences this rank reads per epoch."""
        self.cursors: dict[int, Cursor] = {shard: (0, 0) for shard in self.shards}
        """The reading position: a cursor per shard of this rank."""
        self.epoch, self.consumed = 0, 0
        """This rank's epoch (the oldest of its shards') and its sequences handed out in that epoch."""
        log_dir = sequence_log or os.environ.get(SEQUENCE_LOG_ENV)
        self.sequence_log = Path(log_dir) if log_dir else None

    def _size(self, shard: int) -> int:
        return len(range(*self.reader.shard_range(shard)))

    # ---- order ---------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        """This rank's shards in the epoch's order, each with the order of its local sequence offsets."""
        return self._order(self.shards, epoch)

    def _order(self, shards: list[int], epoch: int) -> list[tuple[int, torch.Tensor]]:
        """`shards` in the epoch's order, each with its sequence order. A shard's sequence order depends on
        (seed, epoch, shard) only, never on the rank layout: what makes a per-shard cursor mean the same
        sequences on any number of processes."""
        shard_perm = torch.randperm(len(shards), generator=generator(self.seed, epoch))
        order = []
        for position in shard_perm.tolist():
            shard = shards[position]
            local = torch.randperm(self._size(shard), generator=generator(self.seed, epoch, shard + 1))
            order.append((shard, local))
        return order

    def _read_epoch(self, epoch: int, worker: int, num_workers: int, log_file: IO[str] | None,
                    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        first_of_shard = {i: self.reader.shard_range(i)[0] for i in self.shards}
        plan = []  # (shard, local offsets still to hand out), skipping what a resumed run consumed
        for slot, (shard, local) in enumerate(self.epoch_order(epoch)):
            if slot % num_workers != worker:
                continue
            shard_epoch, offset = self.cursors[shard]
            if shard_epoch > epoch:  # handed out whole in this epoch before a resume
                continue
            # A cursor behind `epoch` is only a DataLoader worker's copy of a shard another worker read
            # last epoch (workers start at epoch boundaries): it starts from the beginning.
            plan.append((shard, local[offset if shard_epoch == epoch else 0 :]))
        # The next shard is read and decoded in a background thread while this one is handed out, so
        # the training step does not wait on decompression (two shards sit in memory at a time).
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            pending = pool.submit(self.reader.read_shard, plan[0][0], self.fields) if plan else None
            for index, (shard, offsets) in enumerate(plan):
                try:
                    data = pending.result()
                except CorruptShardError as err:
                    data = self._corrupt(err)
                if index + 1 < len(plan):
                    pending = pool.submit(self.reader.read_shard, plan[index + 1][0], self.fields)
                if data is None:  # skipped: its sequences count as handed out, so positions stay exact
                    self.consumed += len(offsets)
                    self.cursors[shard] = (epoch + 1, 0)
                    continue
                size = self.shard_sizes[shard]
                for done, offset in enumerate(offsets.tolist(), size - len(offsets) + 1):
                    sample = {name: tensor[offset] for name, tensor in data.items()}
                    sample["sequence_index"] = first_of_shard[shard] + offset
                    # Counted as handed out before the consumer gets it: a state saved after a batch
                    # names exactly the sequences of the batches taken.
                    self.cursors[shard] = (epoch, done) if done < size else (epoch + 1, 0)
                    self.consumed += 1
                    if log_file is not None:
                        log_file.write(json.dumps({"epoch": epoch, "sequence": sample["sequence_index"]}) + "\n")
                    yield sample
                self.cursors[shard] = (epoch + 1, 0)  # a shard without sequences too
        finally:
            # Never wait for the prefetch here: an abandoned iterator may be finalised by the garbage
            # collector on any thread, zarr's own I/O thread included, which the prefetch itself needs.
            pool.shutdown(wait=False, cancel_futures=True)

    def _corrupt(self, err: CorruptShardError) -> None:
        """on_corrupt_shard=fail: raise; skip: say so once per shard and read on without it."""
        if self.on_corrupt_shard == "fail":
            raise err
        if err.index not in self.corrupt_shards:
            log.error("skipping corrupt shard %d (train.on_corrupt_shard=skip): %s", err.index, err)
            self.corrupt_shards.append(err.index)
        return None

    def _consumed_in(self, epoch: int) -> int:
        """This rank's sequences handed out in `epoch` (whole shards already past it included)."""
        return sum(self.shard_sizes[shard] if shard_epoch > epoch else offset if shard_epoch == epoch else 0
                   for shard, (shard_epoch, offset) in self.cursors.items())  # fmt: skip

    def _open_log(self, worker: int, num_workers: int) -> IO[str] | None:
        if self.sequence_log is None:
            return None
        self.sequence_log.mkdir(parents=True, exist_ok=True)
        name = f"rank-{self.rank}-of-{self.world_size}" + (f"-worker-{worker}" if num_workers > 1 else "")
        return open(self.sequence_log / f"{name}.jsonl", "a", buffering=1)  # whole lines, even if killed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers > 1 and any(cursor != (self.epoch, 0) for cursor in self.cursors.values()):
            raise ReaderStateError(
                f"resuming mid-epoch ({self.consumed} sequences consumed) needs num_workers=0; "
                "DataLoader workers only start at an epoch boundary"
            )
        log_file = self._open_log(worker, num_workers)
        try:
            while self.num_epochs is None or self.epoch < self.num_epochs:
                yield from self._read_epoch(self.epoch, worker, num_workers, log_file)
                if set(self.shards) <= set(self.corrupt_shards):
                    raise CorruptShardError(self.shards[0], f"{self.reader.root}: every shard this rank reads "
                                            f"({self.shards}) is corrupt")  # fmt: skip
                self.epoch += 1
                self.consumed = self._consumed_in(self.epoch)
        finally:
            if log_file is not None:
                log_file.close()

    # ---- resume state --------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        manifest = self.reader.manifest
        return {"fingerprints": dict(manifest.fingerprints), "config": manifest.config_dict(),
                "num_sequences": manifest.num_sequences,
                "sequences_per_shard": manifest.sequences_per_shard}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """This rank's reading position (JSON-ready): version, cache identity, rank layout, seed, and the cursor
        of each of its shards."""
        return {
            "version": READER_STATE_VERSION,
            "cache": self._identity(),
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shards": list(self.shards),
            "cursors": [list(self.cursors[shard]) for shard in self.shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next sequence of each shard is its first one not handed out then.

        `state` is this rank's own `state_dict()` of a run on the same number of processes, or any state
        with ``all_processes``: every rank's state of a run on any number of processes, in rank order
        (`training.loop` passes that on a resume on another number of processes). The state names the
        shards the run started with: a resume refuses to run without one of them (its completion record
        deleted since) rather than train on less data than it says it did.

        Raises:
            ReaderStateError: a state of another version, or saved for another cache, seed or set of
                complete shards (naming the shards that are no longer complete); one rank's state for
                another rank or number of processes; not every rank's state of one run; a cursor out of range.
        """
        where = f"reader state for {self.reader.root}"
        together = "all_processes" in state
        states = state["all_processes"] if together else [state]
        if not isinstance(states, list) or not states or not all(isinstance(s, dict) for s in states):
            raise ReaderStateError(f"{where}: all_processes is not a list of states; pass every rank's state_dict()")
        states = [self._checked(s, where) for s in states]
        if together:
            cursors = self._merged(states, where)
        else:
            (state,) = states
            for key, fix in (("world_size", "load every process's state together (all_processes), as lrc-train "
                                            "does on a resume on another number of processes"),
                             ("rank", "resume each rank from its own state")):  # fmt: skip
                if state.get(key) != getattr(self, key):
                    raise ReaderStateError(f"{where}: {key} was {state.get(key)!r}, now {getattr(self, key)!r}; {fix}")
            self._check_not_lost(state["shards"], where)
            if state["shards"] != self.shards:
                raise ReaderStateError(f"{where}: shards was {state['shards']!r}, now {self.shards!r}; the set of "
                                       "complete shards changed; finish the run on the old set or start a new run")  # fmt: skip
            cursors = dict(zip(state["shards"], state["cursors"]))
        self.cursors = {shard: tuple(cursors[shard]) for shard in self.shards}
        self.epoch = min(shard_epoch for shard_epoch, _ in self.cursors.values())
        self.consumed = self._consumed_in(self.epoch)

    def _checked(self, state: dict[str, Any], where: str) -> dict[str, Any]:
        """`state` (version 1 converted) with its version, cache, seed, shards and cursors checked."""
        version = state.get("version")
        if version not in (1, READER_STATE_VERSION):
            raise ReaderStateError(
                f"{where}: version {version!r}, this lrc_offline reads versions 1 and {READER_STATE_VERSION}; "
                "resume with the lrc_offline that saved it, or start a new run"
            )
        state = {**state, "cache": _without_run_options(state.get("cache"))}
        for key, expected, fix in (("cache", self._identity(), "resume with the cache the run started from"),
                                   ("seed", self.seed, "resume with the same train.seed")):  # fmt: skip
            if state.get(key) != expected:
                raise ReaderStateError(f"{where}: {key} was {state.get(key)!r}, now {expected!r}; {fix}")
        shards = state.get("shards")
        if not (isinstance(shards, list) and all(_is_int(i) and 0 <= i < self.reader.num_shards for i in shards)):
            raise ReaderStateError(f"{where}: shards={shards!r} is not a list of this cache's shard indices")
        if version == 1:
            state = self._from_version_1(state, where)
        cursors = state.get("cursors")
        if not (isinstance(cursors, list) and len(cursors) == len(shards)
                and all(isinstance(c, list) and len(c) == 2 and all(map(_is_int, c)) for c in cursors)):  # fmt: skip
            raise ReaderStateError(f"{where}: cursors={cursors!r} is not one [epoch, offset] per shard of {shards}")
        for shard, (shard_epoch, offset) in zip(shards, cursors):
            if shard_epoch < 0 or not 0 <= offset < max(self._size(shard), 1):
                raise ReaderStateError(f"{where}: shard {shard}'s cursor [{shard_epoch}, {offset}] is out of range "
                                       f"(epoch >= 0, offset < its {self._size(shard)} sequences)")  # fmt: skip
        return state

    def _from_version_1(self, state: dict[str, Any], where: str) -> dict[str, Any]:
        """A version-1 state (the rank's epoch and its sequences handed out in it, in the epoch's order of its
        shards) as cursors: whole shards first, then part of one."""
        epoch, consumed = state.get("epoch"), state.get("consumed")
        total = sum(self._size(shard) for shard in state["shards"])
        if not (_is_int(epoch) and epoch >= 0 and _is_int(consumed) and 0 <= consumed <= total):
            raise ReaderStateError(f"{where}: epoch={epoch!r}, consumed={consumed!r} is outside epoch >= 0, "
                                   f"consumed in [0, {total}]")  # fmt: skip
        cursors = {}
        for shard, local in self._order(state["shards"], epoch):
            taken = min(consumed, len(local))
            consumed -= taken
            cursors[shard] = [epoch + 1, 0] if taken == len(local) else [epoch, taken]
        return {**state, "version": READER_STATE_VERSION, "cursors": [cursors[shard] for shard in state["shards"]]}

    def _merged(self, states: list[dict[str, Any]], where: str) -> dict[int, list[int]]:
        """Every shard's cursor from the states of every rank of one run, checked to be that: ranks 0..n-1 of
        n, each with its share of the same complete shards as now."""
        num = len(states)
        layout = [(s.get("rank"), s.get("world_size")) for s in states]
        if layout != [(rank, num) for rank in range(num)]:
            raise ReaderStateError(f"{where}: all_processes holds the states of (rank, world_size) {layout}, "
                                   f"not of ranks 0..{num - 1} of {num} in order; pass every rank's state of one run")
        saved = sorted(shard for s in states for shard in s["shards"])
        self._check_not_lost(saved, where)
        added = sorted(set(self.all_shards) - set(saved))
        if added:
            raise ReaderStateError(f"{where}: shards {added} completed after the run started; the set of complete "
                                   "shards changed; finish the run on the old set or start a new run")  # fmt: skip
        if saved != self.all_shards or any(s["shards"] != saved[rank::num] for rank, s in enumerate(states)):
            raise ReaderStateError(f"{where}: all_processes does not split the shards {self.all_shards} as ranks "
                                   f"0..{num - 1} of {num} read them; pass every rank's state of one run")  # fmt: skip
        return {shard: cursor for s in states for shard, cursor in zip(s["shards"], s["cursors"])}

    def _check_not_lost(self, saved: list[int], where: str) -> None:
        lost = [i for i in saved if i in self.skipped_shards]
        if lost:
            raise ReaderStateError(
                f"{where}: shards {lost} this run started with are no longer complete (no completion record "
                f"in {self.reader.location.name_of('shards')}); rebuild them (`lrc-cache build` with the cache's "
                "config builds exactly the missing shards) and resume, or start a new run in another --out"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _without_run_options(identity: Any) -> Any:
    """A saved cache identity without the build's run options, which states saved before cache schema 2
    carried inside its config (they never said which data was read)."""
    if isinstance(identity, dict) and isinstance(identity.get("config"), dict):
        run_keys = {f.name for f in dataclasses.fields(BuildRunConfig)}
        return identity | {"config": {k: v for k, v in identity.get("config").items() if k not in run_keys}}
    return identity


def stack_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-sequence samples stacked field by field ([B, *field shape]); uint16 counts widen to int32 (uint16
    supports few ops)."""
    fields = {}
    for name in samples[0]:
        if name == "sequence_index":
            fields[name] = torch.tensor([s[name] for s in samples], dtype=torch.int64)
            continue
        stacked = torch.stack([s[name] for s in samples])
        fields[name] = stacked.to(torch.int32) if stacked.dtype == torch.uint16 else stacked
    return fields


def collate(samples: list[dict[str, Any]]) -> Batch:
    """The batch of per-sequence samples, its keep mask and sink flags computed here, once."""
    return Batch.from_fields(stack_samples(samples))


def iter_batches(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[Batch]:
    """Batches of `batch_size` samples; pulls exactly one batch of samples per batch, so the dataset's
    position after a batch counts exactly the sequences handed out so far (a short tail is dropped)."""
    iterator = iter(samples)
    try:
        while True:
            chunk = []
            for sample in iterator:
                chunk.append(sample)
                if len(chunk) == batch_size:
                    break
            if len(chunk) < batch_size:
                return
            yield collate(chunk)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    """A batch's tensors onto `device` (`sequence_index` stays on the host); host tensors are pinned first on
    CUDA so the copy overlaps compute (tensors already on the device stay where they are)."""
    return (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)
