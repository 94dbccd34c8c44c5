"""Tensor-parallel capture: one teacher replica split across the processes of a torchrun launch, for a
teacher larger than one device (cache.run.tensor_parallel_size = N, backend hf).

    torchrun --nproc-per-node W -m lrc_offline.cli.cache build ... run.tensor_parallel_size=N

The W processes (W a multiple of N) form W/N groups of N consecutive ranks; each group is one build
worker, holding one copy of the teacher with its weights split N ways by `transformers`' tensor-parallel
plan (`teacher.load.load_teacher(..., tensor_parallel_size=N)`: each process reads only its slices of the
safetensors files). The groups split the shards between them as any workers do (`worker_split`), together
with a Slurm array's tasks or --worker-index/--num-workers when those are given.

Each group is its own torch.distributed world, over a prefix of torchrun's store (`process_group`):
`transformers` takes the whole world as its tensor-parallel mesh, and groups never need to talk to each
other. In a group, rank 0 (the leader) runs the build loop: it reads the sequences, decides what to
build, writes the shards. Its capture is wrapped (`Leader.wrap`) to broadcast each batch to the other
ranks (the followers, `follow`) before its own forward; the followers run the same forward (the
collectives of the split teacher need every rank) and write nothing. The hooks gather what a rank holds
only a slice of (`teacher.hooks`), so the leader's fields are the whole teacher's.

The data are those of a one-process build: the same token ids and integer fields, float fields equal up
to the order of the floating-point sums the split changes (tests/test_tensor_parallel_build.py states
the tolerance), the same teacher fingerprints, so the same manifest digest. The size is a run option,
recorded under the manifest's ``build`` and never compared: workers of one cache may use different sizes,
as they may use different batch sizes (which also change the order of sums).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch

from ..config import BuildRunConfig, ConfigError

__all__ = ["TensorParallelLayout", "tensor_parallel_layout", "process_group", "Leader", "follow"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_STORE_PREFIX = "lrc-offline-tp-group-"
_TIMEOUT = timedelta(hours=2)
"""How long a follower waits for its leader's next batch: the leader may first tokenise what the index
still lacks, which can take long (an `lrc-cache tokenize` phase before the build avoids it)."""


@dataclasses.dataclass(frozen=True)
class TensorParallelLayout:
    """This process's place in a tensor-parallel launch."""

    size: int
    """Processes per teacher replica (cache.run.tensor_parallel_size)."""
    rank: int
    """This process's rank in its group (0: the leader, which writes)."""
    group: int
    """Which group of this launch this process belongs to (global rank // size)."""
    num_groups: int
    """Groups in this launch (world size // size): the build workers it holds."""
    local_rank: int
    """torchrun's LOCAL_RANK: the accelerator this process uses."""

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where `transformers` puts this process's slices: its accelerator (cuda:LOCAL_RANK), else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def worker_split(self, worker: int | None, num_workers: int | None) -> tuple[int | None, int | None]:
        """This group's (worker index, worker count) among all build workers, given this launch's place
        (`worker` of `num_workers`: a Slurm array task or --worker-index/--num-workers; None: the launch is
        every worker). Launch I of N holding G groups: worker I*G + g of N*G."""
        if worker is None:
            return (self.group, self.num_groups) if self.num_groups > 1 else (None, None)
        if num_workers is None:
            if self.num_groups > 1:
                raise ConfigError(f"--worker-index {worker} without --num-workers builds shard {worker} alone, but this "
                                  f"launch holds {self.num_groups} tensor-parallel groups (world size / cache.run."
                                  f"tensor_parallel_size); give --num-workers N, or launch {self.size} processes")  # fmt: skip
            return worker, None
        return worker * self.num_groups + self.group, num_workers * self.num_groups


def tensor_parallel_layout(run: BuildRunConfig, env: Mapping[str, str] | None = None) -> TensorParallelLayout | None:
    """The layout of a tensor-parallel build (None without one: size 1, or the vLLM backend, which splits
    the teacher itself); refuses, before anything is loaded, a launch that cannot hold it.

    Raises:
        ConfigError: no torchrun environment, a world size that is not a multiple of the size, a group
            that would span nodes, or a device other than the one each process is given.
    """
    size = run.tensor_parallel_size
    if size == 1 or run.backend != "hf":
        return None
    env = os.environ if env is None else env
    missing = [name for name in _TORCHRUN_VARS if name not in env]
    if missing:
        raise ConfigError(f"cache.run.tensor_parallel_size={size} needs a torchrun launch ({', '.join(missing)} not "
                          f"set): torchrun --nproc-per-node {size} -m lrc_offline.cli.cache build ...")  # fmt: skip
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if world % size:
        raise ConfigError(f"cache.run.tensor_parallel_size={size} does not divide the launch's {world} processes; "
                          f"launch a multiple of {size} (torchrun --nproc-per-node {size})")  # fmt: skip
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    if per_node % size:
        raise ConfigError(f"cache.run.tensor_parallel_size={size} does not divide the {per_node} processes per node: "
                          "a group would span nodes; launch a multiple of it per node")  # fmt: skip
    layout = TensorParallelLayout(size=size, rank=rank % size, group=rank // size, num_groups=world // size,
                                  local_rank=int(env["LOCAL_RANK"]))  # fmt: skip
    if run.device != "auto" and torch.device(run.device) != layout.device:
        raise ConfigError(f"cache.run.device={run.device} with cache.run.tensor_parallel_size={size}: each process "
                          f"runs its slices on {layout.device} (cuda:LOCAL_RANK, or the CPU without GPUs); leave "
                          "cache.run.device=auto")  # fmt: skip
    return layout


@contextlib.contextmanager
def process_group(layout: TensorParallelLayout) -> Iterator[None]:
    """torch.distributed initialised as this process's group alone (its own world of `layout.size`
    ranks), destroyed on exit. A process group already initialised (a caller's) is used as it is."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != layout.size:
            raise ConfigError(f"torch.distributed is initialised with {dist.get_world_size()} processes, but cache.run."
                              f"tensor_parallel_size={layout.size} needs one group of {layout.size} per teacher; let "
                              "the build initialise it")  # fmt: skip
        yield
        return
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", timeout=_TIMEOUT))  # torchrun's store, shared by every group
    backend = "nccl" if layout.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(f"{_STORE_PREFIX}{layout.group}/", store),
                            rank=layout.rank, world_size=layout.size, timeout=_TIMEOUT)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


# A batch travels as a header [go, activations, B, T] (go 0: no more batches) and one int64 tensor
# [B, 2T+1]: the token ids, the position ids and the sequence indices.
_HEADER = 4


class Leader:
    """The leader's side: wraps its capture functions to send each batch to the followers first."""

    def __init__(self, layout: TensorParallelLayout) -> None:
        assert layout.leader
        self.device = layout.device

    def wrap(self, capture: Callable, activations: bool) -> Callable:
        """`capture` (input ids, position ids, sequence indices -> fields, stats), sending its batch first;
        `activations`: whether `capture` gathers activations (the followers run the same forward)."""

        def capture_and_send(input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor, sequence_indices: list[int]):
            batch, tokens = input_ids_BT.shape
            self._send(torch.tensor([1, int(activations), batch, tokens]))
            indices_B1 = torch.tensor(sequence_indices, dtype=torch.int64)[:, None]
            self._send(torch.cat([input_ids_BT.long(), position_ids_BT.long(), indices_B1], dim=1))
            return capture(input_ids_BT, position_ids_BT, sequence_indices)

        return capture_and_send

    def stop(self) -> None:
        """Tell the followers there is nothing more (after the last batch; a leader that fails instead exits
        and torchrun ends the whole launch)."""
        self._send(torch.zeros(_HEADER, dtype=torch.int64))

    def _send(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(tensor.to(self.device, torch.int64), src=0)


def follow(layout: TensorParallelLayout, capture: Callable, capture_without_activations: Callable) -> int:
    """The follower's side: run the forward of every batch the leader sends, until it says stop; returns
    the tokens captured. Nothing is kept or written: the leader holds the same fields."""
    import torch.distributed as dist

    assert not layout.leader
    tokens_done = 0
    while True:
        header = torch.empty(_HEADER, dtype=torch.int64, device=layout.device)
        dist.broadcast(header, src=0)
        go, activations, batch, tokens = header.tolist()
        if not go:
            return tokens_done
        payload_BX = torch.empty(batch, 2 * tokens + 1, dtype=torch.int64, device=layout.device)
        dist.broadcast(payload_BX, src=0)
        payload_BX = payload_BX.cpu()
        run: Callable[..., Any] = capture if activations else capture_without_activations
        run(payload_BX[:, :tokens], payload_BX[:, tokens : 2 * tokens], payload_BX[:, -1].tolist())
        tokens_done += batch * tokens
