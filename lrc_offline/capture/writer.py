"""The build's writer thread: casting, compressing and writing shards while the teacher runs.

The build loop hands each captured batch to `ShardPipeline` and goes on with the next forward; one
thread takes the batches from a bounded queue (`cache.run.write_queue` deep, so host memory holds at
most that many batches besides the one being captured) and writes them through `CacheWriter.open_shard`,
chunk by chunk. Compression (numcodecs blosc/zstd) releases the GIL, so on a GPU the device never waits
for it, and on a CPU it overlaps with the parts of the forward that do not use every core.

Completion records are still written last, by the thread, once a shard's every batch is on disk; an
error in the thread is raised in the build loop at its next hand-over, and leaving the pipeline (an
error, Ctrl-C) aborts the shard in progress after the shards already handed over are committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..cache import CacheWriter
from ..cache.store import ShardWriter

__all__ = ["ShardPipeline", "to_host", "host_ready"]

_STOP = ("stop",)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor`. From a CUDA device the copy goes into pinned memory without blocking the
    host (pageable copies block and run at a fraction of the bandwidth): call `host_ready` once a batch's
    copies are queued, and its returned function before reading them."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


def host_ready() -> Callable[[], None]:
    """After a batch's `to_host` copies: a function that returns once they have landed (an event recorded
    on the current CUDA stream behind them; the writer thread waits on it, not the teacher's loop)."""
    if not torch.cuda.is_initialized():
        return lambda: None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize


class ShardPipeline:
    """A writer thread fed with ``open(index)``, ``write(make_arrays)`` ... ``commit(stats)`` per shard.

    Args:
        writer: The cache being built.
        depth: Batches that may wait in the queue.
    """

    def __init__(self, writer: CacheWriter, depth: int = 2) -> None:
        self.writer = writer
        self.committed: list[int] = []
        """Shards committed so far, in order."""
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lrc-cache-writer", daemon=True)

    def __enter__(self) -> ShardPipeline:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop()
        if exc_type is None:
            self._raise()

    def open(self, index: int) -> None:
        """Start shard `index`."""
        self._put(("open", index))

    def write(self, make_arrays: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Append a batch to the open shard; `make_arrays` runs in the thread (e.g. the dtype casts)."""
        self._put(("write", make_arrays))

    def commit(self, stats: dict[str, Any]) -> None:
        """Finish the open shard and write its completion record."""
        self._put(("commit", stats))

    def finish(self) -> None:
        """Wait until everything handed over is written; raise the thread's error, if any."""
        self._stop()
        self._raise()

    def _put(self, item: tuple) -> None:
        self._raise()
        self._queue.put(item)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        shard: ShardWriter | None = None
        while True:
            item = self._queue.get()
            if item is _STOP:
                if shard is not None:
                    shard.abort()
                return
            if self._error is not None:
                continue  # drain, so the build loop never blocks on a full queue
            try:
                kind, arg = item
                if kind == "open":
                    shard = self.writer.open_shard(arg)
                elif kind == "write":
                    shard.write(arg())
                else:
                    record = shard.commit(arg)
                    self.committed.append(shard.index)
                    self.bytes_written += sum(f["bytes"] for f in record["files"].values())
                    shard = None
            except BaseException as err:  # noqa: BLE001 -- handed to the build loop
                self._error = err
                if shard is not None:
                    shard.abort()
                    shard = None
