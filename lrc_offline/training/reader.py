"""Streaming the cache into training: whole shards split across ranks and workers, shuffled in memory.

Rank r of w reads the complete shards r, r + w, r + 2w, ... (by position in the list of complete
shards), so the ranks of one job read disjoint shards and together read every complete sequence
exactly once per epoch. Shards are read whole (one decompression per shard, never per sequence) and
shuffled in memory: the shard order and each shard's sequence order are fixed by (seed, epoch).

The reading position is `(epoch, consumed)`: how many of this rank's sequences of the current epoch
have been handed out. Resuming recomputes the epoch order and skips exactly `consumed` sequences,
skipping whole shards without reading them. That is exact when the dataset is iterated in the
training process (`num_workers=0`, the default path). With DataLoader workers each worker reads its
own share of the rank's shards and the main process's copy never advances, so `state_dict()` then
says nothing about the position; workers are for throughput only and refuse a mid-epoch resume.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..batch import Batch
from ..cache import CacheReader, CorruptShardError
from ..storage import Location
from ..config import BuildRunConfig, ConfigError
from ..seeding import generator

__all__ = ["READER_STATE_VERSION", "ReaderStateError", "CacheDataset", "stack_samples", "collate", "iter_batches",
           "batch_to_device"]

log = logging.getLogger(__name__)

READER_STATE_VERSION = 1
"""Version of `CacheDataset.state_dict()`; a state of another version is refused."""


class ReaderStateError(ValueError):
    """A saved reading position does not fit this cache, world size or seed."""


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
        self.shards = complete[rank::world_size]
        if not self.shards:
            raise ConfigError(
                f"{self.reader.root}: rank {rank} of {world_size} gets no shard: the cache has {len(complete)} "
                "complete shards; use fewer processes or build more shards"
            )
        for index in self.shards:
            if index in damaged:
                self._corrupt(damaged[index])
        self.num_complete_sequences = sum(len(range(*self.reader.shard_range(i))) for i in complete)
        """Sequences all ranks together read per epoch."""
        self.shard_sizes = {i: len(range(*self.reader.shard_range(i))) for i in self.shards}
        self.num_sequences = sum(self.shard_sizes.values())
        """Sequences this rank reads per epoch."""
        self.epoch, self.consumed = 0, 0

    # ---- order ---------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        """This rank's shards in the epoch's order, each with the order of its local sequence offsets."""
        shard_perm = torch.randperm(len(self.shards), generator=generator(self.seed, epoch))
        order = []
        for position in shard_perm.tolist():
            shard = self.shards[position]
            local = torch.randperm(self.shard_sizes[shard], generator=generator(self.seed, epoch, shard + 1))
            order.append((shard, local))
        return order

    def _read_epoch(self, epoch: int, skip: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        first_of_shard = {i: self.reader.shard_range(i)[0] for i in self.shards}
        plan = []  # (shard, local offsets still to hand out), skipping what a resumed run consumed
        for slot, (shard, local) in enumerate(self.epoch_order(epoch)):
            if slot % num_workers != worker:
                continue
            if skip >= len(local):
                skip -= len(local)
                continue
            plan.append((shard, local[skip:]))
            skip = 0
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
                    continue
                for offset in offsets.tolist():
                    sample = {name: tensor[offset] for name, tensor in data.items()}
                    sample["sequence_index"] = first_of_shard[shard] + offset
                    yield sample
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers > 1 and self.consumed:
            raise ReaderStateError(
                f"resuming mid-epoch ({self.consumed} sequences consumed) needs num_workers=0; "
                "DataLoader workers only start at an epoch boundary"
            )
        while self.num_epochs is None or self.epoch < self.num_epochs:
            for sample in self._read_epoch(self.epoch, self.consumed, worker, num_workers):
                self.consumed += 1
                yield sample
            if set(self.shards) <= set(self.corrupt_shards):
                raise CorruptShardError(self.shards[0], f"{self.reader.root}: every shard this rank reads "
                                        f"({self.shards}) is corrupt")  # fmt: skip
            self.epoch, self.consumed = self.epoch + 1, 0

    # ---- resume state --------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        manifest = self.reader.manifest
        return {"fingerprints": dict(manifest.fingerprints), "config": manifest.config_dict(),
                "num_sequences": manifest.num_sequences,
                "sequences_per_shard": manifest.sequences_per_shard}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The reading position (JSON-ready): version, cache identity, rank layout, seed, epoch, consumed."""
        return {
            "version": READER_STATE_VERSION,
            "cache": self._identity(),
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shards": list(self.shards),
            "epoch": self.epoch,
            "consumed": self.consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next sequence is the first one not consumed then.

        The state names the shards this rank started with: a resume refuses to run without one of them
        (its completion record deleted since) rather than train on less data than it says it did.

        Raises:
            ReaderStateError: the state has another version, or was saved for another cache, world size,
                rank, seed or set of complete shards (naming the shards that are no longer complete).
        """
        where = f"reader state for {self.reader.root}"
        if state.get("version") != READER_STATE_VERSION:
            raise ReaderStateError(
                f"{where}: version {state.get('version')!r}, this lrc_offline reads version {READER_STATE_VERSION}; "
                "resume with the lrc_offline that saved it, or start a new run"
            )
        expected = self.state_dict()
        state = {**state, "cache": _without_run_options(state.get("cache"))}
        for key, fix in (
            ("cache", "resume with the cache the run started from"),
            ("world_size", "resume with the same number of processes"),
            ("rank", "resume each rank from its own state"),
            ("seed", "resume with the same train.seed"),
        ):
            if state.get(key) != expected[key]:
                raise ReaderStateError(f"{where}: {key} was {state.get(key)!r}, now {expected[key]!r}; {fix}")
        saved = state.get("shards")
        lost = [i for i in saved if i in self.skipped_shards] if isinstance(saved, list) else []
        if lost:
            raise ReaderStateError(
                f"{where}: shards {lost} this run started with are no longer complete (no completion record "
                f"in {self.reader.location.name_of('shards')}); rebuild them (`lrc-cache build` with the cache's "
                "config builds exactly the missing shards) and resume, or start a new run in another --out"
            )
        if saved != expected["shards"]:
            raise ReaderStateError(f"{where}: shards was {saved!r}, now {expected['shards']!r}; the set of complete "
                                   "shards changed; finish the run on the old set or start a new run")  # fmt: skip
        if not 0 <= state["consumed"] <= self.num_sequences:
            raise ReaderStateError(f"{where}: consumed={state['consumed']} is outside [0, {self.num_sequences}]")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


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
