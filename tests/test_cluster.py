"""Cluster templates that run (with a stand-in `sbatch`), and rank-0-only output under DDP (slow tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "cache_jobs" / "slurm").glob("*.sbatch")) + sorted((ROOT / "train" / "slurm").glob("*"))

FAKE_SBATCH = """#!/usr/bin/env bash
echo "$*" >> "$SBATCH_CALLS"
n=$(wc -l < "$SBATCH_CALLS")
echo "$((1000 + n));cluster-a"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """A stand-in `sbatch` on PATH that records its arguments; the submission directory is `tmp_path/sub`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    submit_dir = tmp_path / "sub"
    submit_dir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CALLS": str(calls),
           "CONFIG": "c.yaml", "OUT": "/scratch/out", "CACHE": "/scratch/cache"}  # fmt: skip

    def submit(script: str, *args: str, **extra_env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        done = subprocess.run([str(ROOT / script), *args], cwd=submit_dir, env={**env, **extra_env},
                              capture_output=True, text=True)  # fmt: skip
        return done, calls.read_text().splitlines()

    return submit, submit_dir


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_templates_are_valid_bash(path):
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_cache_submit_makes_logs_and_cancels_finalize_on_a_failed_task(fake_sbatch):
    submit, where = fake_sbatch
    done, calls = submit("cache_jobs/slurm/submit.sh", "--array=0-7")
    assert done.returncode == 0, done.stderr
    assert (where / "logs").is_dir()
    tokenize, build, finalize = calls
    assert tokenize.startswith("--parsable --export=ALL --array=0-7 ") and tokenize.endswith("tokenize_array.sbatch")
    assert "--dependency=afterok:1001 --kill-on-invalid-dep=yes" in build and "--array=0-7" in build
    assert build.endswith("build_array.sbatch")
    assert "--dependency=afterok:1002 --kill-on-invalid-dep=yes" in finalize and finalize.endswith("finalize.sbatch")


def test_cache_submit_takes_the_8_gpu_vllm_template(fake_sbatch):
    submit, _ = fake_sbatch
    done, calls = submit("cache_jobs/slurm/submit.sh", TEMPLATE="build_array_vllm8.sbatch")
    assert done.returncode == 0 and calls[1].endswith("build_array_vllm8.sbatch")
    header = (ROOT / "cache_jobs" / "slurm" / "build_array_vllm8.sbatch").read_text()
    assert "#SBATCH --gpus-per-task=8" in header and "#SBATCH --mem=0" in header
    done, _ = submit("cache_jobs/slurm/submit.sh", TEMPLATE="nope.sbatch")
    assert done.returncode == 2 and "no template" in done.stderr


def test_train_submit_makes_logs(fake_sbatch):
    submit, where = fake_sbatch
    done, calls = submit("train/slurm/submit.sh", "--nodes=4")
    assert done.returncode == 0, done.stderr
    assert (where / "logs").is_dir() and calls == [f"--export=ALL --nodes=4 {ROOT / 'train/slurm/multinode.sbatch'}"]


@pytest.mark.slow
def test_under_ddp_only_rank_0_prints_and_writes_the_sweep(tmp_path):
    from lrc_offline.capture.build import build_cache
    from lrc_offline.config import CacheConfig

    pytest.importorskip("tensorboard")
    cache = tmp_path / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=16, sequences_per_shard=4, topk=8, act_positions=4), cache,
                progress=False)  # fmt: skip
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        rank = os.environ["RANK"]
        sys.stdout = open({str(tmp_path)!r} + f"/stdout-{{rank}}.txt", "w")
        sys.stderr = open({str(tmp_path)!r} + f"/stderr-{{rank}}.txt", "w")
        from lrc_offline.cli.train import main
        code = main(["sweep", "--cache", {str(cache)!r}, "--out", {str(tmp_path / "sweep")!r}, "--hidden-sizes",
                     "8,16", "--no-progress", "train.steps=2", "train.batch_size=2", "train.log_every=1",
                     "train.device=cpu", "train.report_to=tensorboard"])
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    """))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    subprocess.run(torchrun, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = [(tmp_path / f"stdout-{r}.txt").read_text() for r in range(2)]
    err = [(tmp_path / f"stderr-{r}.txt").read_text() for r in range(2)]
    assert out[0].startswith("| d_S |") and out[1] == ""
    assert "step 2/2 | loss" in err[0] and "step 2/2" not in err[1]
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["hidden_size"] for r in rows] == [8, 16]
    for size in (8, 16):  # one TensorBoard writer (rank 0's) per run
        assert len(list((tmp_path / "sweep" / f"d{size}" / "tensorboard" / "lrc-offline").glob("events.*"))) == 1
