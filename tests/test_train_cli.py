"""`lrc-train` end to end on a tiny cache: train, sweep, eval, export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrc_offline.capture.build import build_cache
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import CacheConfig
from lrc_offline.training.metrics import read_metrics


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=24, sequences_per_shard=8, heldout_docs=3, topk=16,
                            act_positions=8), out, progress=False)  # fmt: skip
    return out


COMMON = ["--no-progress", "train.steps=4", "train.batch_size=4", "train.log_every=1", "train.eval_sequences=4"]


def test_train_eval_and_export(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["train", "--cache", str(cache), "--out", str(run), *COMMON, "student.hidden_size=16",
                       "train.checkpoint_every=2"]) == 0  # fmt: skip
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "heldout_ce" in records[-1]
    assert (run / "checkpoints" / "step-000002").is_dir() and (run / "student" / "config.json").is_file()
    capsys.readouterr()
    assert train_main(["eval", "--student", str(run / "student"), "--cache", str(cache), "--json",
                       "--max-sequences", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["tokens"] > 0 and 0.0 <= metrics["top1_agreement"] <= 1.0 and metrics["kl"] > 0
    # the student's held-out CE as trained equals what plain transformers gives for the export
    assert abs(metrics["student_ce"] - records[-1]["heldout_ce"]) < 1e-4
    assert train_main(["export", "--checkpoint", str(run / "checkpoints" / "step-000004"), "--out",
                       str(tmp_path / "exp")]) == 0  # fmt: skip
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    b = AutoModelForCausalLM.from_pretrained(run / "student")
    ids = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_sweep_over_three_sizes_writes_table_and_plot(cache, tmp_path):
    out = tmp_path / "sweep"
    assert train_main(["sweep", "--cache", str(cache), "--out", str(out), "--hidden-sizes", "8,16,24", *COMMON]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["hidden_size"] for r in rows] == [8, 16, 24] and all(r["heldout_ce"] > 0 for r in rows)
    assert (out / "sweep.md").read_text().count("\n") == 5
    assert (out / "sweep.png").stat().st_size > 10_000
    for size in (8, 16, 24):
        assert AutoModelForCausalLM.from_pretrained(out / f"d{size}" / "student").config.hidden_size == size


def test_user_errors_exit_2(cache, tmp_path, capsys):
    assert train_main(["sweep", "--cache", str(cache), "--out", str(tmp_path / "s"), "--hidden-sizes", "8,x"]) == 2
    assert train_main(["train", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert train_main(["train", "--cache", str(cache), "--out", str(tmp_path / "r"), "teacher=tiny-random:qwen2"]) == 2
    err = capsys.readouterr().err
    assert "hidden-sizes" in err and "manifest" in err and "tiny-random:qwen2" in err


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("logit_mode, act_mode", [("topk", "residual"), ("sampled", "targets"), ("hidden", "none")])
def test_training_runs_from_every_format_and_mode(tmp_path, fmt, logit_mode, act_mode):
    from lrc_offline.config import StudentConfig, TrainConfig, TrainJobConfig
    from lrc_offline.training.trainer import train_from_cache

    build_cache(CacheConfig(format=fmt, logit_mode=logit_mode, activation_mode=act_mode, seq_len=16,
                            max_sequences=8, sequences_per_shard=4, topk=8, num_draws=8, act_positions=4),
                tmp_path / "c", progress=False)  # fmt: skip
    cfg = TrainJobConfig(student=StudentConfig(hidden_size=16), train=TrainConfig(steps=2, batch_size=4, log_every=1))
    train_from_cache(cfg, tmp_path / "c", tmp_path / "r", progress=False)
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "kd" in records[0] and ("clone" in records[0]) == (act_mode != "none")


def test_review_guards(cache, tmp_path, capsys):
    from lrc_offline.cli.cache import main as cache_main

    # KD at another temperature than the cached top-k log-probs is refused before step 0
    assert train_main(["train", "--cache", str(cache), "--out", str(tmp_path / "t"), *COMMON,
                       "loss.temperature=2.0"]) == 2  # fmt: skip
    assert "temperature" in capsys.readouterr().err
    # wrong types and worker flags are one-line errors; a bad shard index leaves nothing behind
    assert train_main(["train", "--cache", str(cache), "--out", str(tmp_path / "t"), "train.steps=abc"]) == 2
    assert cache_main(["build", "--out", str(tmp_path / "c"), "--no-progress", "--num-workers", "2"]) == 2
    assert cache_main(["build", "--out", str(tmp_path / "c"), "--no-progress", "--worker-index", "99",
                       "max_sequences=4", "seq_len=16"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "wrong type" in err and "--worker-index" in err and not (tmp_path / "c").exists()
    # exporting a checkpoint with another teacher than the one it was trained from is refused
    run = tmp_path / "run"
    assert train_main(["train", "--cache", str(cache), "--out", str(run), *COMMON, "student.hidden_size=8"]) == 0
    state_file = run / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["teacher"] = "tiny-random:mistral"
    state_file.write_text(json.dumps(state))
    assert train_main(["export", "--checkpoint", str(state_file.parent), "--out", str(tmp_path / "e")]) == 2
    assert "teacher_weights" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_unsorted_act_layers_compare_the_right_layers(tmp_path):
    from lrc_offline.config import LossConfig
    from lrc_offline.student.lrc import LRCStudent
    from lrc_offline.teacher.load import load_teacher
    from lrc_offline.training.objective import lrc_loss
    from lrc_offline.training.reader import CacheDataset, iter_batches

    teacher = load_teacher("tiny-random:llama")
    parts = {}
    for layers in ([0, 1], [1, 0]):
        out = tmp_path / str(layers)
        build_cache(CacheConfig(seq_len=16, max_sequences=4, sequences_per_shard=4, act_layers=layers, topk=8,
                                act_dtype="float32"), out, progress=False, teacher=teacher)  # fmt: skip
        batch = next(iter_batches(CacheDataset(out, seed=0), 4))
        student = LRCStudent(teacher.model, 16, seed=0)
        _, parts[str(layers)] = lrc_loss(student, batch, LossConfig(), clone_layers=layers)
    for key in parts["[0, 1]"]:
        torch.testing.assert_close(parts["[1, 0]"][key], parts["[0, 1]"][key])
