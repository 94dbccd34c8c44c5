"""Training checkpoints: everything needed to continue a run exactly, in `out/checkpoints/step-000123/`.

A checkpoint directory holds

    student.safetensors   the student's trainable parameters (the teacher's weights are never saved)
    trainer.pt            optimizer and scheduler state and RNG states: plain tensors and numbers,
                          loaded with `torch.load(weights_only=True)`
    state.json            version, step, tokens trained on, every rank's reader position, the resolved
                          config, extras

or, for a sharded student (`train.parallelism=fsdp2`), `sharded/` (`torch.distributed.checkpoint` files:
the trainable parameters and the optimizer state, one file per rank) in place of `student.safetensors`
and the optimizer state in `trainer.pt`.

It is written into a temporary sibling and renamed into place, so a directory named `step-*` is
always complete: a crash while saving leaves only a temporary directory, which `latest_checkpoint`
ignores. Its files are read only through `safe_load` (nothing in a checkpoint can run code when it is
loaded; a damaged file is a one-line `CheckpointError`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..config import TrainJobConfig, to_dict
from ..differences import differences
from ..fsutil import atomic_dir
from .fsdp import SHARDED_DIR, is_sharded, load_sharded, load_sharded_weights, save_sharded
from .safe_load import CheckpointError, load_safetensors_file, load_trainer_file

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "load_student_weights",
    "checkpoint_dir",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_state",
    "rng_state",
    "set_rng_state",
    "resume_point",
    "check_resumable",
    "rotate_checkpoints",
]

CHECKPOINT_VERSION = 1
"""Version of the checkpoint layout; a checkpoint of another version is refused."""

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_SAVE = re.compile(r"^\.step-(\d+)-")
"""A save in progress, or one a crash interrupted (`fsutil.atomic_dir`'s temporary sibling)."""
_TRASH_PREFIX = ".deleting-"
_STUDENT_FILE, _TRAINER_FILE, _STATE_FILE = "student.safetensors", "trainer.pt", "state.json"


RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_sequences",
                     "train.device", "train.mixed_precision", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.on_corrupt_shard", "train.report_to", "train.tracker_project", "export.dtype",
                     "train.compile", "train.loss_chunk_tokens", "train.generate_once", "train.storage_options",
                     "train.activation_checkpointing", "optim.warmup_steps", "optim.skip_spikes",
                     "optim.spike_window")  # fmt: skip
"""Config fields a resumed run may change; any other change would make the resumed run a different run."""


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """`out_dir/checkpoints/step-000123`."""
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step under `out_dir/checkpoints`, or None when there is none."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def rotate_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` (>= 1) checkpoints under `out_dir/checkpoints`, and the temporary
    directories of saves or deletions that a crash interrupted; returns what was deleted.

    Call it after a save completes, so the newest checkpoint is never deleted before its successor is
    complete. Each checkpoint is first renamed out of the `step-*` namespace (atomic), then removed: a
    kill -9 part way leaves a temporary directory for the next rotation, never a half-deleted `step-*`
    that a resume could pick.
    """
    assert keep >= 1, "keep the newest checkpoint at least"
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    newest = found[-1][0] if found else None
    deleted = []
    for _, path in found[:-keep]:
        trash = path.with_name(f"{_TRASH_PREFIX}{path.name}")
        os.replace(path, trash)
        deleted.append(path)
    for path in root.iterdir():
        stale_save = (m := _TEMP_SAVE.match(path.name)) and newest is not None and int(m.group(1)) <= newest
        if path.is_dir() and (path.name.startswith(_TRASH_PREFIX) or stale_save):
            shutil.rmtree(path, ignore_errors=True)
    return deleted


def rng_state() -> dict[str, Any]:
    """The torch CPU and CUDA generator states, as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (CUDA states are restored only where CUDA is present)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    reader_states: list[dict[str, Any]],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    tokens: int | None = None,
) -> Path:
    """Write the checkpoint of `step` (replacing one of the same step) and return its directory. A
    sharded student (FSDP2) is saved by every rank together (`_save_sharded`); a whole one by one process.

    Args:
        out_dir: Run directory; the checkpoint goes to `checkpoint_dir(out_dir, step)`.
        step: Optimizer steps taken.
        student: The unwrapped student; only its trainable parameters are saved.
        optimizer, scheduler: Their `state_dict()`s are saved.
        reader_states: Every rank's `CacheDataset.state_dict()`, in rank order.
        config: The resolved run config (JSON-ready).
        extra: More JSON-ready facts (e.g. the cache's fingerprints).
        tokens: Training tokens of the `step` steps (over all processes of the runs that took them).
    """
    final = checkpoint_dir(out_dir, step)
    facts = {"step": step, "tokens": tokens, "reader": reader_states, "config": config, "extra": extra or {}}
    if is_sharded(student):
        return _save_sharded(final, student, optimizer, scheduler, facts)
    with atomic_dir(final) as tmp:
        params = {name: p.detach().to("cpu").contiguous() for name, p in student.named_parameters()}
        save_file(params, str(tmp / _STUDENT_FILE))
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        _write_trainer_and_state(tmp, trainer, facts)
    return final


def _write_trainer_and_state(tmp: Path, trainer: dict, facts: dict[str, Any]) -> None:
    torch.save(trainer, tmp / _TRAINER_FILE)
    state = {"version": CHECKPOINT_VERSION, **{key: value for key, value in facts.items() if value is not None}}
    (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _save_sharded(final: Path, student, optimizer, scheduler, facts: dict[str, Any]) -> Path:
    """`save_checkpoint` of a sharded student, called by every rank: each writes its shards into one
    temporary directory that rank 0 completes (trainer.pt without the optimizer, state.json) and renames
    into place once every rank's files are written."""
    main = dist.get_rank() == 0
    with atomic_dir(final) if main else contextlib.nullcontext() as tmp:
        holder = [str(tmp) if main else None]
        dist.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])
        save_sharded(tmp / SHARDED_DIR, student, optimizer)  # returns once every rank's files are written
        if main:
            trainer = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
            _write_trainer_and_state(tmp, trainer, facts)
    dist.barrier()  # the other ranks return once rank 0 has renamed it into place
    return final


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """`state.json` of the checkpoint at `path`, with its version checked."""
    path = Path(path)
    state_file = path / _STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {_STATE_FILE}); pass a `step-*` directory")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_file}: not valid JSON ({err}); resume from an earlier checkpoint") from err
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{state_file}: checkpoint version {state.get('version')!r}, this lrc_offline reads version "
            f"{CHECKPOINT_VERSION}; resume with the lrc_offline that wrote it, or start a new run"
        )
    return state


def load_student_weights(path: str | Path, student: torch.nn.Module) -> dict[str, Any]:
    """Load only the trained parameters of a checkpoint into `student` (for export or evaluation).

    Returns:
        The checkpoint's `state.json`.

    Raises:
        CheckpointError: missing files, another version, or parameters that do not fit `student`.
    """
    path = Path(path)
    state = read_checkpoint_state(path)
    if (path / SHARDED_DIR).is_dir():
        load_sharded_weights(path / SHARDED_DIR, student)
        return state
    if not (path / _STUDENT_FILE).is_file():
        raise CheckpointError(f"{path} lacks {_STUDENT_FILE}; use an earlier checkpoint")
    params = load_safetensors_file(path / _STUDENT_FILE)
    own = dict(student.named_parameters())
    if set(params) != set(own) or any(params[n].shape != own[n].shape for n in own):
        raise CheckpointError(
            f"{path / _STUDENT_FILE} holds a student of another shape (missing {sorted(set(own) - set(params))}, "
            f"unexpected {sorted(set(params) - set(own))}); use the student config that saved it"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(params[name])
    return state


def load_checkpoint(
    path: str | Path,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into `student`, `optimizer` and `scheduler` (in place) and restore the RNG states.

    Returns:
        The checkpoint's `state.json` (step, reader states, config, extra); the caller restores the reader.

    Raises:
        CheckpointError: missing files, another version, or parameters that do not fit `student`.
    """
    path = Path(path)
    if not (path / _TRAINER_FILE).is_file():
        raise CheckpointError(f"{path} lacks {_TRAINER_FILE}; resume from an earlier checkpoint")
    if is_sharded(student) != (path / SHARDED_DIR).is_dir():
        raise CheckpointError(f"{path} holds a {'sharded' if (path / SHARDED_DIR).is_dir() else 'plain'} student; "
                              "resume with the train.parallelism that saved it")  # fmt: skip
    trainer = load_trainer_file(path / _TRAINER_FILE)
    needed = {"scheduler", "rng"} | (set() if is_sharded(student) else {"optimizer"})
    missing = sorted(needed - set(trainer)) if isinstance(trainer, dict) else sorted(needed)
    if missing:
        raise CheckpointError(f"{path / _TRAINER_FILE} lacks {missing}; resume from an earlier checkpoint")
    if is_sharded(student):
        state = read_checkpoint_state(path)
        load_sharded(path / SHARDED_DIR, student, optimizer)
    else:
        state = load_student_weights(path, student)
        optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    if restore_rng:
        set_rng_state(trainer["rng"])
    return state


def resume_point(resume: str | Path, out_dir: str | Path) -> Path | None:
    """The checkpoint to continue from: latest (`auto`), none (`never`) or a given `step-*` directory."""
    latest = latest_checkpoint(out_dir)
    if resume == "never":
        if latest is not None:
            raise CheckpointError(
                f"{out_dir} already holds checkpoints (latest {latest.name}) and resume='never'; "
                "use another out_dir, delete its checkpoints/, or pass resume='auto'"
            )
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={str(resume)!r} is neither 'auto', 'never' nor a checkpoint directory")
    return path


def check_resumable(state: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume from a checkpoint (its `state.json`) saved by a run with another configuration
    (beyond `RESUMABLE_CHANGES`). The number of processes may change: a whole student's parameters and
    optimizer state are every process's, a sharded one's are resharded on load, and the reading position
    is carried over (`training.reader`)."""
    lines = differences(state["config"], config, "in the checkpoint", "now", defaults=to_dict(TrainJobConfig()))
    changed = [line for line in lines if line.split(":")[0] not in RESUMABLE_CHANGES]
    if changed:
        raise CheckpointError(
            f"{path} was saved by a run with another configuration:\n  " + "\n  ".join(changed)
            + "\nResume with the same configuration, or start a new run in another out_dir."
        )
