"""Experiment tracking (train.report_to) and the log lines of a run without a progress bar."""

from __future__ import annotations

import logging
import math

import pytest

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, ConfigError, TrainConfig
from lrc_offline.training.metrics import read_metrics

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracking") / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=16, sequences_per_shard=8, heldout_docs=3, topk=16,
                            act_positions=8), out, progress=False)  # fmt: skip
    return out


def _train(cache, out, *overrides):
    from lrc_offline.cli.train import main as train_main

    args = ["train", "--cache", str(cache), "--out", str(out), "--no-progress", "train.steps=4", "train.batch_size=4",
            "train.log_every=2", "train.eval_every=2", "train.eval_sequences=4", "student.hidden_size=16", *overrides]
    assert train_main(args) == 0


def _tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """tag -> step -> value, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_jsonl(cache, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lrc_offline.training.loop"):
        _train(cache, run, "train.report_to=tensorboard")
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    scalars = _tensorboard_scalars(run / "tensorboard" / "lrc-offline")
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, {})[record["step"]] = value
    # every clone term, the held-out CE (step 0 included), lr, grad norm, rates and coverage
    assert {"loss", "kd", "ce", "clone", "clone/q", "clone/down", "lr", "grad_norm", "tokens_per_s",
            "heldout_ce", "clone_coverage"} <= set(expected)  # fmt: skip
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert set(scalars[tag]) == set(by_step), tag
        for step, value in by_step.items():  # TensorBoard stores float32
            assert math.isclose(scalars[tag][step], value, rel_tol=1e-6, abs_tol=1e-30), (tag, step)
    # --no-progress: a log line every log_every steps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 2/4 | loss ") and "ETA 0:00:" in lines[0]
    assert all(f" {word} " in lines[0] for word in ("lr", "tokens/s"))


def test_wandb_offline_writes_its_run_directory(cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # keep ~ clean
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var))
    run = tmp_path / "run"
    _train(cache, run, "train.report_to=all")
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    run_id = (run / "wandb_run_id").read_text().strip()
    assert offline_runs[0].name.endswith(run_id) and list(offline_runs[0].glob("*.wandb"))
    assert list((run / "tensorboard" / "lrc-offline").glob("events.out.tfevents.*"))


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to="mlflow")
