"""A run resumed on another number of processes continues the data order where it stopped.

The reading position is a cursor per shard (`training.reader`), so 2 -> 1 -> 2 processes read every
sequence of an epoch exactly once across the changes: first with the reader alone (fast), then through
`train_from_cache` under torchrun (gloo, CPU), with the sequences logged by `LRC_SEQUENCE_LOG`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.reader import SEQUENCE_LOG_ENV, CacheDataset, ReaderStateError

NUM_SEQ, PER_SHARD, SEQ_LEN = 48, 8, 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world-size") / "cache"
    cfg = CacheConfig(teacher="tiny-random:llama", corpus="tiny-text", seq_len=SEQ_LEN, max_sequences=NUM_SEQ,
                      sequences_per_shard=PER_SHARD, logit_mode="hidden", activation_mode="residual",
                      act_positions=8, act_dtype="float32")  # fmt: skip
    build_cache(cfg, root, progress=False)
    return root


def _take(datasets: list[CacheDataset], streams: list, num: int) -> list[tuple[int, int]]:
    """`num` sequences from every rank, as (epoch, id): what one run of `num` sequences per rank reads."""
    read = []
    for dataset, stream in zip(datasets, streams):
        for _ in range(num):
            sample = next(stream)
            read.append((dataset.epoch, int(sample["sequence_index"])))  # the epoch being read, while it is read
    return read


def _until_epoch(datasets: list[CacheDataset], epoch: int) -> list[tuple[int, int]]:
    """What the ranks read, a sequence each per turn (as steps do), until each is in `epoch`."""
    read, streams = [], [iter(d) for d in datasets]
    while min(d.epoch for d in datasets) < epoch:
        read += _take(datasets, streams, 1)
    return read


def _ranks(cache: Path, world_size: int, saved: list[dict] | None = None, **options) -> list[CacheDataset]:
    datasets = [CacheDataset(cache, rank=r, world_size=world_size, seed=4, **options) for r in range(world_size)]
    for dataset in datasets:
        if saved is not None:
            dataset.load_state_dict({**saved[0], "all_processes": json.loads(json.dumps(saved))})
    return datasets


def _assert_each_once_per_epoch(read: list[tuple[int, int]], epochs: int) -> None:
    for epoch in range(epochs):
        assert sorted(i for e, i in read if e == epoch) == list(range(NUM_SEQ)), epoch


# ---- the reader alone ------------------------------------------------------------------------------------


def test_reader_position_carries_over_two_one_two_processes(cache):
    two = _ranks(cache, 2)
    read = _take(two, [iter(d) for d in two], 5)  # part of each rank's first shard
    one = _ranks(cache, 1, [d.state_dict() for d in two])
    read += _take(one, [iter(d) for d in one], 13)  # finishes the two part-read shards, part of a third
    again = _ranks(cache, 2, [d.state_dict() for d in one])
    assert sum(d.num_sequences - d.consumed for d in again) == NUM_SEQ - 2 * 5 - 13
    read += _until_epoch(again, 2)
    _assert_each_once_per_epoch(read, epochs=2)

    # On the same number of processes the position is the one an uninterrupted run reaches.
    uninterrupted = _ranks(cache, 2)
    streams = [iter(d) for d in uninterrupted]
    _take(uninterrupted, streams, 7)
    resumed = _ranks(cache, 2)
    for dataset, before in zip(resumed, uninterrupted):
        dataset.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert _take(resumed, [iter(d) for d in resumed], 30) == _take(uninterrupted, streams, 30)


def test_version_1_state_is_converted(cache):
    """A rank's (epoch, consumed) of the reader before cursors continues exactly, on any number of processes."""
    whole = CacheDataset(cache, seed=4, num_epochs=2)
    order = [int(s["sequence_index"]) for s in whole]
    fresh = CacheDataset(cache, seed=4)
    old = {k: v for k, v in fresh.state_dict().items() if k != "cursors"} | {"version": 1, "epoch": 0, "consumed": 19}
    resumed = CacheDataset(cache, seed=4, num_epochs=2)
    resumed.load_state_dict(old)
    assert order[:19] + [int(s["sequence_index"]) for s in resumed] == order
    rest = _until_epoch(_ranks(cache, 2, [old]), 1)
    assert sorted(order[:19] + [i for e, i in rest if e == 0]) == list(range(NUM_SEQ))


def test_bad_states_are_refused(cache):
    ranks = _ranks(cache, 2)
    states = [d.state_dict() for d in ranks]
    target = CacheDataset(cache, seed=4)
    with pytest.raises(ReaderStateError, match="world_size was 2, now 1; load every process's state together"):
        target.load_state_dict(states[0])
    with pytest.raises(ReaderStateError, match=r"ranks 0..0 of 1"):
        target.load_state_dict({**states[0], "all_processes": states[:1]})
    with pytest.raises(ReaderStateError, match=r"not of ranks 0..1 of 2"):
        target.load_state_dict({**states[0], "all_processes": states[::-1]})
    with pytest.raises(ReaderStateError, match="seed was 5, now 4"):
        target.load_state_dict({**states[0], "all_processes": [states[0], {**states[1], "seed": 5}]})
    with pytest.raises(ReaderStateError, match="cursor .* out of range"):
        bad = {**states[1], "cursors": [[0, PER_SHARD]] + states[1]["cursors"][1:]}
        target.load_state_dict({**states[0], "all_processes": [states[0], bad]})
    with pytest.raises(ReaderStateError, match="not one \\[epoch, offset\\] per shard"):
        bad = {**states[1], "cursors": states[1]["cursors"][1:]}
        target.load_state_dict({**states[0], "all_processes": [states[0], bad]})
    with pytest.raises(ReaderStateError, match=r"shards \[5\] completed after the run started"):
        fewer = {**states[1], "shards": states[1]["shards"][:-1], "cursors": states[1]["cursors"][:-1]}
        target.load_state_dict({**states[0], "all_processes": [states[0], fewer]})
    with pytest.raises(ReaderStateError, match="does not split the shards"):
        swapped = [states[r] | {key: states[1 - r][key] for key in ("shards", "cursors")} for r in (0, 1)]
        target.load_state_dict({**states[0], "all_processes": swapped})
    with pytest.raises(ReaderStateError, match="version 3"):
        target.load_state_dict({**states[0], "all_processes": [states[0], {**states[1], "version": 3}]})


def test_sequence_log(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(SEQUENCE_LOG_ENV, str(tmp_path / "log"))
    dataset = CacheDataset(cache, rank=1, world_size=2, seed=4, num_epochs=1)
    read = [int(s["sequence_index"]) for s in dataset]
    lines = (tmp_path / "log" / "rank-1-of-2.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 0, "sequence": i} for i in read]


# ---- through lrc-train, 2 -> 1 -> 2 processes -----------------------------------------------------------

_RUN = """
import sys
from lrc_offline.config import OptimConfig, StudentConfig, TrainConfig, TrainJobConfig
from lrc_offline.training.trainer import train_from_cache
cfg = TrainJobConfig(student=StudentConfig(init="random"), optim=OptimConfig(lr=1e-2, warmup_steps=2),
                     train=TrainConfig(steps={steps}, batch_size=4, log_every=1, device="cpu", seed=4,
                                       parallelism=sys.argv[1], checkpoint_every=1))
train_from_cache(cfg, {cache!r}, sys.argv[2], progress=False, max_steps_this_run=int(sys.argv[3]) or None)
"""

STEPS = (1, 2, 8)
"""Steps of the three runs on 2, 1, 2 processes (4 sequences each per step): 2 x 4 + 8 = 16 of the 48 sequences
are read before the last run, which reads 64 more: the rest of epoch 0 however unevenly its ranks hold it."""


def _launch(script: Path, parallelism: str, out: Path, steps: int, processes: int, log_dir: Path) -> str:
    command = [sys.executable, str(script), parallelism, str(out), str(steps)]
    if processes > 1:  # --standalone: a free port, whatever else runs on this machine
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", SEQUENCE_LOG_ENV: str(log_dir)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _two_one_two(cache: Path, tmp_path: Path, parallelism: str) -> None:
    """Train 2 -> 1 -> 2 processes; every sequence of epoch 0 is read exactly once, the steps count on, the
    losses stay finite and nothing says the data order restarted."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_RUN.format(steps=sum(STEPS), cache=str(cache))))
    out, log_dir = tmp_path / "out", tmp_path / "sequence-log"
    stderr = ""
    for processes, steps in zip((2, 1, 2), (STEPS[0], STEPS[1], 0)):  # the last run goes to the end
        stderr += _launch(script, parallelism, out, steps, processes, log_dir)
    assert "data order" not in stderr and "restart" not in stderr
    read = [json.loads(line) for path in sorted(log_dir.glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert sorted(path.name for path in log_dir.glob("*.jsonl")) == ["rank-0-of-1.jsonl", "rank-0-of-2.jsonl",
                                                                     "rank-1-of-2.jsonl"]  # fmt: skip
    assert len(read) == 4 * (2 * STEPS[0] + STEPS[1] + 2 * STEPS[2])  # only what the steps took
    epoch0 = Counter(r["sequence"] for r in read if r["epoch"] == 0)
    assert sorted(epoch0) == list(range(NUM_SEQ)) and set(epoch0.values()) == {1}
    assert max(Counter(r["sequence"] for r in read if r["epoch"] == 1).values()) == 1

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, sum(STEPS) + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    per_process_step = 4 * SEQ_LEN
    assert records[-1]["tokens"] == per_process_step * (2 * STEPS[0] + STEPS[1] + 2 * STEPS[2])
    state = json.loads((out / "checkpoints" / f"step-{sum(STEPS):06d}" / "state.json").read_text())
    assert len(state["reader"]) == 2 and state["tokens"] == records[-1]["tokens"]


def test_ddp_resumed_on_one_then_two_processes_reads_each_sequence_once(cache, tmp_path):
    _two_one_two(cache, tmp_path, "ddp")


@pytest.mark.slow
def test_fsdp2_resumed_on_one_then_two_processes_reads_each_sequence_once(cache, tmp_path):
    """The sharded checkpoint (torch.distributed.checkpoint, resharded on load) carries the same position."""
    _two_one_two(cache, tmp_path, "fsdp2")
