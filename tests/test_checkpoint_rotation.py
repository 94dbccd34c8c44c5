"""train.keep_checkpoints: only the newest N checkpoints stay, and no crash during rotation loses the
newest complete one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig
from lrc_offline.training import checkpoint as ckpt
from lrc_offline.training.checkpoint import latest_checkpoint, rotate_checkpoints
from lrc_offline.training.metrics import read_metrics


def _fake_run(tmp_path, steps):
    root = tmp_path / "checkpoints"
    for step in steps:
        (root / f"step-{step:06d}").mkdir(parents=True)
        (root / f"step-{step:06d}" / "state.json").write_text("{}")
    return root


def test_rotation_keeps_the_newest_and_clears_leftovers(tmp_path):
    root = _fake_run(tmp_path, [1, 2, 3, 4, 5])
    (root / ".step-000005-abc").mkdir()  # a save of step 5 interrupted (step 5 was saved again since)
    (root / ".step-000006-def").mkdir()  # a save of step 6 under way: not ours to remove
    (root / ".deleting-step-000000").mkdir()  # a deletion interrupted
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000001", "step-000002", "step-000003"]
    assert sorted(p.name for p in root.iterdir()) == [".step-000006-def", "step-000004", "step-000005"]


def test_a_crash_while_deleting_never_leaves_a_half_deleted_step_dir(tmp_path, monkeypatch):
    root = _fake_run(tmp_path, [10, 20, 30])

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, keep=1)
    assert latest_checkpoint(tmp_path).name == "step-000030"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-000030"]
    monkeypatch.undo()
    rotate_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000030"]


def _train(cache, out, extra=()):
    command = [sys.executable, "-m", "lrc_offline.cli.train", "train", "--cache", str(cache), "--out", str(out),
               "--no-progress", "train.steps=24", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=1",
               "train.keep_checkpoints=2", "student.hidden_size=16", "student.init=random", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LRC_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_during_training_with_rotation_loses_nothing(tmp_path):
    """Three kill -9s at moments when checkpoints are being saved and rotated, then a rerun to the end:
    the same metrics as an uninterrupted run, and only the newest two checkpoints left."""
    cache = tmp_path / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=16, sequences_per_shard=8, topk=8, act_positions=4), cache,
                progress=False)  # fmt: skip
    assert _train(cache, tmp_path / "whole").wait(timeout=600) == 0
    parts = tmp_path / "parts"
    for target in (4, 11, 17):
        process = _train(cache, parts)
        deadline = time.time() + 300
        while time.time() < deadline and not (parts / "checkpoints" / f"step-{target:06d}").exists():
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        latest = latest_checkpoint(parts)
        assert latest is not None and (latest / "state.json").is_file(), sorted((parts / "checkpoints").iterdir())
    assert _train(cache, parts).wait(timeout=600) == 0
    drop = ("tokens_per_s", "time")
    runs = [[{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run / "metrics.jsonl")]
            for run in (tmp_path / "whole", parts)]  # fmt: skip
    assert runs[0] == runs[1]
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step-000023", "step-000024"]
