"""The main job end to end on the tiny preset: summary, plot, rerun reuses the cache."""

from __future__ import annotations

import json

from lrc_offline.config import CacheConfig, TrainJobConfig, apply_overrides, load_config
from lrc_offline.demo import PRESETS, run_demo


def test_demo_runs_end_to_end_and_reruns_from_the_cache(tmp_path):
    cache_file, train_file = PRESETS["tiny"]
    cache_cfg = apply_overrides(load_config(CacheConfig, cache_file), ["max_sequences=32", "sequences_per_shard=16"])
    train_cfg = apply_overrides(load_config(TrainJobConfig, train_file), ["train.steps=6", "train.log_every=2",
                                                                           "train.eval_every=2", "train.checkpoint_every=3"])  # fmt: skip
    first = run_demo(tmp_path, cache_cfg, train_cfg, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(first))
    # the exported student, loaded with plain transformers, scores the held-out text as the trainer did
    from lrc_offline.training.metrics import read_metrics

    last = [r for r in read_metrics(tmp_path / "train" / "metrics.jsonl") if "heldout_ce" in r][-1]
    assert abs(summary["heldout"]["student_ce"] - last["heldout_ce"]) < 1e-4
    assert summary["cache"]["bytes_per_token"] > 0 and summary["train"]["tokens_per_s"] > 0
    # the preset runs on the library's defaults, and the summary records what they resolved to
    ran = summary["config"]
    assert (ran["cache"]["act_dtype"], ran["cache"]["act_positions"]) == ("int4g", 16)
    assert ran["train"]["optim"]["warmup_steps"] == 3 and ran["train"]["optim"]["lr"] == 5e-5
    reference = summary["cache"]["bf16_every_layer"]
    assert reference["bytes_per_token"] > summary["cache"]["bytes_per_token"]
    assert isinstance(summary["sample"]["continuation"], str)
    assert (tmp_path / "loss_curve.png").stat().st_size > 5_000
    again = run_demo(tmp_path, cache_cfg, train_cfg, progress=False)
    assert again["cache"]["built_shards_this_run"] == 0 and again["cache"]["reused_shards"] == 2
    assert again["train"]["resumed_from_step"] == 6
    assert abs(again["heldout"]["student_ce"] - first["heldout"]["student_ce"]) < 1e-6


def test_demo_command_line_offers_the_presets(capsys):
    import pytest

    from lrc_offline.cli.demo import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--preset {smollm2,tiny}" in capsys.readouterr().out
