"""Loading a checkpoint never runs code from it, and a damaged one is a one-line error.

Each test copies a real checkpoint (a plain one, and a sharded one written by a `train.parallelism=fsdp2`
run in a subprocess, as in test_fsdp.py), plants a pickle whose loading would create a marker file or
cuts a file short, and runs a command that reads checkpoints: `lrc-train export --checkpoint`, or
`lrc-train train` resuming from it. Each must exit with status 2 and one line naming the file, and the
marker must not exist. (`lrc-train eval` reads exported students, not checkpoints.)
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrc_offline.capture.build import build_cache
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import CacheConfig

_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_STEP = Path("checkpoints") / "step-000001"
# One optimizer step, checkpointed; a resume asks for one more.
_TRAIN = ["--no-progress", "student.init=random", "student.hidden_size=16", "train.batch_size=2",
          "train.log_every=1", "train.checkpoint_every=1", "train.device=cpu"]  # fmt: skip
_OPEN = f"{open.__module__}.open"  # the global a pickle of `open` names


class _WritesMarker:
    """Unpickles into `open(path, "w")`: the file exists afterwards iff the pickle was run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety") / "cache"
    build_cache(CacheConfig(teacher="tiny-random:llama", corpus="tiny-text", seq_len=32, max_sequences=16,
                            sequences_per_shard=8, act_positions=8), root, progress=False)  # fmt: skip
    return root


def _train_command(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrc_offline.cli.train", "train", "--cache", str(cache), "--out", str(out),
            *_TRAIN, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sharded_run(cache, tmp_path_factory) -> Path:
    """A run directory whose step-1 checkpoint is sharded (a subprocess: FSDP2 leaves a process group)."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    subprocess.run(_train_command(cache, out, "train.steps=1", "train.parallelism=fsdp2"), check=True, env=_ENV,
                   timeout=600, capture_output=True)  # fmt: skip
    assert (out / _STEP / "sharded" / ".metadata").is_file()
    return out


@pytest.fixture(scope="module")
def plain_run(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "run"
    assert train_main(["train", "--cache", str(cache), "--out", str(out), *_TRAIN, "train.steps=1"]) == 0
    assert (out / _STEP / "trainer.pt").is_file()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _plant_in_metadata(checkpoint: Path, marker: Path) -> None:
    """A `.metadata` that still loads as before, plus one object whose unpickling writes `marker`."""
    file = checkpoint / "sharded" / ".metadata"
    metadata = pickle.loads(file.read_bytes())  # the file this test's own run wrote
    metadata.planner_data["extra"] = _WritesMarker(marker)
    file.write_bytes(pickle.dumps(metadata))


def _plant_in_optimizer_entry(checkpoint: Path, marker: Path) -> None:
    """Point the optimizer's learning-rate entry (a `torch.save`d value, not a tensor) at one whose loading
    writes `marker`, appended to the rank's data file."""
    metadata_file, data_file = checkpoint / "sharded" / ".metadata", checkpoint / "sharded" / "__0_0.distcp"
    metadata = pickle.loads(metadata_file.read_bytes())
    [info] = [info for index, info in metadata.storage_data.items() if index.fqn == "optim.param_groups.0.lr"]
    buffer = io.BytesIO()
    torch.save(_WritesMarker(marker), buffer)
    payload = buffer.getvalue()
    info.offset, info.length = data_file.stat().st_size, len(payload)
    with open(data_file, "ab") as out:
        out.write(payload)
    metadata_file.write_bytes(pickle.dumps(metadata))


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 10])


def _assert_one_line_error(status: int, stderr: str, *names: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status == 2 and "Traceback" not in stderr and len(errors) == 1, (status, stderr)
    assert stderr.strip().splitlines()[-1] == errors[0]
    for name in names:
        assert name in errors[0], (name, errors[0])


def _export(checkpoint: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = train_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    return status, capsys.readouterr().err


def _resume_in_a_subprocess(cache: Path, run: Path, resume: str) -> tuple[int, str]:
    done = subprocess.run(_train_command(cache, run, "train.steps=2", "train.parallelism=fsdp2", "--resume", resume),
                          env=_ENV, timeout=600, capture_output=True, text=True)  # fmt: skip
    return done.returncode, done.stderr


# ---- a pickle that would run code ---------------------------------------------------------------------


def test_export_refuses_sharded_metadata_that_would_run_code(sharded_run, tmp_path, capsys):
    run, marker = _copy(sharded_run, tmp_path), tmp_path / "marker"
    _plant_in_metadata(run / _STEP, marker)
    status, err = _export(run / _STEP, tmp_path, capsys)
    _assert_one_line_error(status, err, str(run / _STEP / "sharded" / ".metadata"), _OPEN, "refused")
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_sharded_resume_refuses_metadata_that_would_run_code(cache, sharded_run, tmp_path):
    run, marker = _copy(sharded_run, tmp_path), tmp_path / "marker"
    _plant_in_metadata(run / _STEP, marker)
    status, err = _resume_in_a_subprocess(cache, run, str(run / _STEP))
    _assert_one_line_error(status, err, ".metadata", _OPEN, "refused")
    assert not marker.exists() and not (run / "checkpoints" / "step-000002").exists()


def test_sharded_resume_refuses_an_optimizer_entry_that_would_run_code(cache, sharded_run, tmp_path):
    run, marker = _copy(sharded_run, tmp_path), tmp_path / "marker"
    _plant_in_optimizer_entry(run / _STEP, marker)
    status, err = _resume_in_a_subprocess(cache, run, "auto")
    _assert_one_line_error(status, err, "__0_0.distcp", _OPEN, "refused")
    assert not marker.exists() and not (run / "checkpoints" / "step-000002").exists()


def test_plain_resume_refuses_a_trainer_file_that_would_run_code(cache, plain_run, tmp_path, capsys):
    run, marker = _copy(plain_run, tmp_path), tmp_path / "marker"
    trainer = torch.load(run / _STEP / "trainer.pt", weights_only=True)
    torch.save({**trainer, "optimizer": _WritesMarker(marker)}, run / _STEP / "trainer.pt")
    capsys.readouterr()
    status = train_main(["train", "--cache", str(cache), "--out", str(run), *_TRAIN, "train.steps=2"])
    _assert_one_line_error(status, capsys.readouterr().err, "trainer.pt", _OPEN, "refused")
    assert not marker.exists() and not (run / "checkpoints" / "step-000002").exists()


# ---- a file cut short ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["student.safetensors", "sharded/.metadata", "sharded/__0_0.distcp"])
def test_export_of_a_truncated_checkpoint_is_a_one_line_error(plain_run, sharded_run, tmp_path, capsys, name):
    run = _copy(sharded_run if name.startswith("sharded/") else plain_run, tmp_path)
    _truncate(run / _STEP / name)
    status, err = _export(run / _STEP, tmp_path, capsys)
    _assert_one_line_error(status, err, str(run / _STEP / name), "truncated", "use an earlier checkpoint")


def test_resume_from_a_truncated_trainer_file_is_a_one_line_error(cache, plain_run, tmp_path, capsys):
    run = _copy(plain_run, tmp_path)
    _truncate(run / _STEP / "trainer.pt")
    capsys.readouterr()
    status = train_main(["train", "--cache", str(cache), "--out", str(run), *_TRAIN, "train.steps=2"])
    _assert_one_line_error(status, capsys.readouterr().err, str(run / _STEP / "trainer.pt"), "truncated",
                           "use an earlier checkpoint")  # fmt: skip
