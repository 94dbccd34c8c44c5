"""An exported student runs in EleutherAI's lm-evaluation-harness (`lm_eval --model hf`) on a task built
from local files, with no network (slow tier: the harness starts in about 20 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lrc_offline.capture.build import build_cache
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import CacheConfig

pytestmark = pytest.mark.slow

ROWS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"], "answer": 0},
]

TASK = """task: lrc_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_export_runs_in_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    build_cache(CacheConfig(seq_len=32, max_sequences=16, sequences_per_shard=8, topk=16, act_positions=8),
                tmp_path / "cache", progress=False)  # fmt: skip
    assert train_main(["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress",
                       "train.steps=2", "train.batch_size=4", "student.hidden_size=16", "export.dtype=bfloat16"]) == 0
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (tasks / "lrc_local_mc.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    student = tmp_path / "run" / "student"
    # the command README.md documents
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={student},dtype=bfloat16",
               "--tasks", "lrc_local_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
               "--output_path", str(tmp_path / "lm-eval"), "--log_samples"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"]["lrc_local_mc"]["acc,none"] <= 1.0
    samples = [json.loads(line) for line in next((tmp_path / "lm-eval").rglob("samples_lrc_local_mc_*.jsonl")).open()]
    assert len(samples) == len(ROWS)
    assert all(len(s["filtered_resps"]) == len(ROWS[s["doc_id"]]["choices"]) for s in samples)
