"""Export options: export.dtype, generation_config.json, the model card, and `lrc-train export --teacher`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig

from lrc_offline.capture.build import build_cache
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import CacheConfig, ConfigError, ExportConfig
from lrc_offline.teacher.tiny import tiny_teacher, tiny_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run (held-out text, a checkpoint at step 2) exported in bfloat16, from a teacher directory."""
    root = tmp_path_factory.mktemp("export")
    teacher_dir = root / "teacher"
    tiny_teacher("llama").save_pretrained(teacher_dir)
    tiny_tokenizer().save_pretrained(teacher_dir)
    build_cache(CacheConfig(teacher=str(teacher_dir), seq_len=32, max_sequences=16, sequences_per_shard=8,
                            heldout_docs=3, topk=16, act_positions=8), root / "cache", progress=False)  # fmt: skip
    assert train_main(["train", "--cache", str(root / "cache"), "--out", str(root / "run"), "--no-progress",
                       "train.steps=3", "train.batch_size=4", "train.log_every=1", "train.eval_every=2",
                       "train.checkpoint_every=2", "train.eval_sequences=4", "student.hidden_size=16",
                       "export.dtype=bfloat16"]) == 0  # fmt: skip
    return root / "run"


def _weight_dtypes(export_dir) -> set[torch.dtype]:
    with safe_open(export_dir / "model.safetensors", "pt") as f:
        return {f.get_tensor(name).dtype for name in f.keys()}


def test_bfloat16_export_matches_the_float32_export(run, tmp_path):
    student = run / "student"
    assert _weight_dtypes(student) == {torch.bfloat16}
    assert json.loads((student / "config.json").read_text())["dtype"] == "bfloat16"
    checkpoint = run / "checkpoints" / "step-000003"
    assert train_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "fp32"),
                       "--dtype", "float32"]) == 0  # fmt: skip
    assert _weight_dtypes(tmp_path / "fp32") == {torch.float32}
    ids = torch.randint(0, 256, (2, 12))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")(input_ids=ids).logits
    half = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16)(input_ids=ids).logits.float()
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_generation_config_and_greedy_generation(run):
    student = run / "student"
    generation = GenerationConfig.from_pretrained(student)
    tokenizer = tiny_tokenizer()
    assert (generation.bos_token_id, generation.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= 7 and out[0, :3].tolist() == [1, 2, 3]


def test_model_card_states_the_facts(run):
    card = (run / "student" / "README.md").read_text()
    info = json.loads((run / "student" / "lrc_config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"`{run.parent / 'teacher'}`" in card and "| hidden size (d_S) | 16 (teacher: 64)" in card
    assert f"3 optimiser steps, {records[-1]['tokens']:,} tokens" in card
    assert f"cross-entropy {records[-1]['heldout_ce']:.4f} nats/token" in card
    for value in info["cache_fingerprints"].values():
        assert value in card
    assert "| weights dtype | bfloat16 |" in card and "lm_eval --model hf" in card


def test_export_with_another_teacher_path(run, tmp_path, capsys):
    """A checkpoint copied to a machine where its teacher sits elsewhere: --teacher names it there."""
    trained_from, elsewhere = run.parent / "teacher", tmp_path / "models" / "tiny-llama"
    shutil.copytree(trained_from, elsewhere)
    checkpoint = run / "checkpoints" / "step-000002"
    out = tmp_path / "exp"
    away = trained_from.rename(trained_from.with_name("teacher-away"))
    try:
        capsys.readouterr()
        assert train_main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
        assert f"teacher '{trained_from}'" in capsys.readouterr().err
        assert train_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--teacher", str(elsewhere)]) == 0
    finally:
        away.rename(trained_from)
    card = (out / "README.md").read_text()
    assert "2 optimiser steps" in card and "at step 2" in card  # tokens and held-out CE from the run's metrics
    assert _weight_dtypes(out) == {torch.bfloat16}  # the run's export.dtype
    capsys.readouterr()
    assert train_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "bad"),
                       "--teacher", "tiny-random:qwen2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "tiny-random:qwen2" in err and "fingerprints differ" in err and not (tmp_path / "bad").exists()


def test_export_dtype_is_checked():
    with pytest.raises(ConfigError, match="export.dtype"):
        ExportConfig(dtype="int8")
