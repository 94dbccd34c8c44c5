"""`lrc-train plan`: docs/scaling.md's table is the plan's output, the CLI prints it for the 70B config from
a config.json alone, and bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lrc_offline.cli.train import main
from lrc_offline.training import plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_model  # noqa: E402

LLAMA31_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
               "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
               "num_hidden_layers": 80, "vocab_size": 128256, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}  # fmt: skip
"""config.json of meta-llama/Llama-3.1-70B (the fields the plan reads)."""


def _doc_table() -> list[str]:
    text = (ROOT / "docs" / "scaling.md").read_text()
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_docs_table_is_the_plans_output():
    table = memory_model.markdown(memory_model.doc_rows()).splitlines()
    assert _doc_table() == [line for line in table if line.startswith("| ")], "regenerate: python benchmarks/memory_model.py"


def test_cli_plans_the_70b_config_as_the_docs_say(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_70B))
    docs = [line.split(" | ") for line in _doc_table() if line.startswith("| Llama-3.1-70B")]
    for batch in memory_model.MICRO_BATCHES:
        assert main(["plan", str(ROOT / "train/llama31_70b_to_4096.yaml"), "--num-gpus", "8", "--json",
                     "--teacher-config", str(tmp_path / "config.json"), f"train.batch_size={batch}"]) == 0  # fmt: skip
        rows = json.loads(capsys.readouterr().out)
        ours = [r for r in docs if r[1] == f"{batch} x 2048"]
        assert len(rows) == len(ours) == len(plan.MODES)
        for row, doc in zip(rows, ours):
            assert ("FSDP2" in doc[2]) == (row["parallelism"] == "fsdp2") and ("ckpt" in doc[2]) == row["activation_checkpointing"]
            assert [f"{row['gpu_gib'][k]:.1f}" for k in memory_model.COLUMNS] == doc[3:9]
            assert f"{row['host_gib']['total']:.1f}" == doc[9]
    # the config's own mode is marked, and tokens/s follows from the GPU throughput
    assert main(["plan", str(ROOT / "train/llama31_70b_to_4096.yaml"), "--num-gpus", "8", "--gpu-tflops", "400",
                 "--teacher-config", str(tmp_path / "config.json")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| * FSDP2+ckpt |" in table and "tokens/s" in table and "8 GPUs on 1 host" in table


def test_plan_parts_and_scaling():
    geo = memory_model.RUNS[0][0]
    c = plan.fit_activations(bf16=True)
    one = plan.memory(geo, 1536, 1, 2048, c, world=1, fsdp=False)
    assert abs(one["total"] - sum(v for k, v in one.items() if k != "total")) < 1e-9
    sharded = [plan.memory(geo, 1536, 1, 2048, c, world=w, fsdp=True) for w in (2, 4)]
    assert sharded[1]["trainable_states"] == pytest.approx(sharded[0]["trainable_states"] / 2)
    cfg = memory_model.load_config(memory_model.TrainJobConfig, ROOT / memory_model.RUNS[0][1], [])
    rows = plan.plan(cfg, geo, 2048, num_gpus=16, num_hosts=2, gpu_tflops=400)
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] * 400e12 / row["flops_per_step"])
        assert row["tokens_per_step"] == 16 * cfg.train.batch_size * cfg.train.grad_accum * 2048
        share = 1 / 16 if row["parallelism"] == "fsdp2" else 1  # per-rank reads: 8 of 16 shards on a host
        assert row["host_gib"]["teacher_load"] == pytest.approx(8 * 2 * geo.teacher_params() * share / plan.GIB)
    ddp, fsdp = rows[0], rows[2]  # FSDP2 generates every layer's weights in every micro-batch
    assert fsdp["flops_per_step"] > ddp["flops_per_step"]


@pytest.mark.parametrize("args,words", [
    (["--num-gpus", "8", "--num-hosts", "3", "--teacher", "tiny-random:llama", "student.hidden_size=32"],
     ["--num-gpus 8", "--num-hosts 3"]),
    (["--num-gpus", "8", "--teacher", "tiny-random:llama"], ["student.hidden_size=4096", "64"]),
    (["--num-gpus", "8", "--teacher-config", "/nonexistent/config.json"], ["--teacher-config", "config.json"]),
    (["--num-gpus", "8"], ["teacher", "--teacher-config"]),
])  # fmt: skip
def test_bad_input_is_one_line(capsys, args, words):
    assert main(["plan", str(ROOT / "train/llama31_70b_to_4096.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
