"""FSDP2 for the LRC student (`train.parallelism=fsdp2`): the frozen teacher and the trainable
projections sharded per layer, sharded checkpoints, a gathered export.

`shard_student` turns the teacher's tensors (buffers of the student, which FSDP2 would copy whole to
every rank) into frozen parameters and applies `torch.distributed.fsdp.fully_shard` to each decoder
layer (its teacher tensors, seven projections and two norms: one all-gather per layer and forward,
under which that layer's weights W^S = W^T P are generated), then to the root (embedding, final norm,
head). Every rank keeps 1/N of the teacher, of the projections and of their Adam moments.

`build_sharded_student` does it without the whole teacher or the whole student ever existing in one
process: the student is built on the meta device, sharded, and each process then reads only its rows
of each teacher tensor from the teacher's files (`teacher.slices`) and draws only its rows of the
random projections (the same numbers as the whole student's).

Checkpoints hold the trainable parameters and the optimiser through `torch.distributed.checkpoint`
(one file per rank plus its metadata, under `step-*/sharded/`), so they load on the same number of
processes exactly and on another number by resharding; they are read through `safe_load.load_dcp`,
which unpickles nothing that could run code. The export gathers the full trainable state to rank 0.
"""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)  # fmt: skip
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..config import StudentConfig
from ..student.lrc import LRCStudent, build_student, frozen_buffers_to_parameters, local_tensor, set_rows
from ..teacher.adapters import adapter_for
from ..teacher.slices import FileTeacher
from .safe_load import load_dcp

__all__ = ["is_sharded", "shard_student", "build_sharded_student", "teacher_bytes_held", "save_sharded", "load_sharded", "load_sharded_weights",
           "full_trainable_state", "SHARDED_DIR"]  # fmt: skip

SHARDED_DIR = "sharded"
"""A checkpoint's folder of `torch.distributed.checkpoint` files (FSDP2 runs)."""

_SHARDED = StateDictOptions(ignore_frozen_params=True)
_SHARDED_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # the teacher is not in it


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a single process not started by a launcher gets one of its own."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=30))  # fmt: skip


def shard_student(student: LRCStudent, device: torch.device) -> None:
    """Shard `student` in place over all processes (see the module docstring) and move each process's
    shards to `device` (the student may still be on the CPU: the whole teacher never has to fit one
    GPU). Call after the student's weights are final (PCA start) and before its optimiser is built:
    sharding replaces the parameters."""
    _ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in student.layers:
        frozen_buffers_to_parameters(layer.teacher)
        fully_shard(layer, mesh=mesh)
    frozen_buffers_to_parameters(student)
    fully_shard(student, mesh=mesh)


@torch.no_grad()
def build_sharded_student(teacher: FileTeacher, cfg: StudentConfig, device: torch.device) -> LRCStudent:
    """The student of `cfg` over `teacher`, sharded as `shard_student` shards it, each process holding
    only its rows of every tensor: its teacher rows read from the files, its projections' rows of the
    random init (`LRCStudent.init_random`, equal to the whole student's)."""
    student = build_student(teacher.model, cfg, device="meta")
    # The only real tensors so far, the rotary frequencies; `to_empty` below would drop their values.
    kept = {name: buffer.clone() for name, buffer in student.named_buffers() if not buffer.is_meta}
    shard_student(student, device)  # meta tensors stay meta: the shards are only laid out
    student.to_empty(device=device)
    for name, buffer in student.named_buffers():
        if name in kept:
            buffer.copy_(kept[name])
    params = dict(student.named_parameters())
    for name, key in student.teacher_tensor_names(teacher.adapter).items():
        set_rows(params[name], lambda first, end, key=key: teacher.read(key, (first, end)))
    student.init_random(cfg.init_std, cfg.seed)
    return student


def teacher_bytes_held(student: LRCStudent) -> int:
    """Bytes of teacher tensors this process holds in `student` (its shards when sharded)."""
    params = dict(student.named_parameters()) | dict(student.named_buffers())
    held = {}
    for name in student.teacher_tensor_names(adapter_for(student.teacher_config)):
        local = local_tensor(params[name])
        held[local.data_ptr()] = local.numel() * local.element_size()  # a tensor shared twice counts once
    return sum(held.values())


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def clip_grad_norm(student: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the sharded gradients to `max_norm` (over all ranks); the norm before clipping, a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(trainable(student), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_sharded(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable parameters and the optimiser state under `path`
    (collective: all ranks call it with the same path)."""
    state = {"model": get_model_state_dict(student, options=_SHARDED),
             "optim": get_optimizer_state_dict(student, optimizer, options=_SHARDED)}  # fmt: skip
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `save_sharded`'s files into the sharded `student` and its `optimizer`, on any number of
    processes (resharded where it differs from the saving run's).

    Raises:
        CheckpointError: a refused, damaged or missing file, or one that does not fit `student`.
    """
    state = {"model": get_model_state_dict(student, options=_SHARDED),
             "optim": get_optimizer_state_dict(student, optimizer, options=_SHARDED)}  # fmt: skip
    load_dcp(state, path)
    set_model_state_dict(student, state["model"], options=_SHARDED_LOAD)
    set_optimizer_state_dict(student, optimizer, state["optim"], options=_SHARDED_LOAD)


@torch.no_grad()
def load_sharded_weights(path: Path, student: LRCStudent) -> None:
    """Load the trainable parameters of `save_sharded`'s files into an unsharded `student`, in one
    process (export or evaluation from a checkpoint).

    Raises:
        CheckpointError: a refused, damaged or missing file, or one that does not fit `student`.
    """
    params = {name: p.detach() for name, p in student.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():  # that it reads in one process is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_dcp({"model": params}, path, no_dist=True)


def full_trainable_state(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable parameters gathered on rank 0, on the CPU (an empty dict on other ranks).
    Collective: all ranks call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(student, options=options)
