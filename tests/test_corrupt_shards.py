"""A cache whose data changed after it was written is never trained on silently: the reader checks
every file it opens against the shard's completion record before decoding it."""

from __future__ import annotations

import json
import shutil

import pytest

from lrc_offline.cache import CacheReader, CorruptShardError, verify_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import BuildRunConfig, CacheConfig
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.reader import CacheDataset


@pytest.fixture(scope="module", params=["zarr", "webdataset"])
def clean_cache(tmp_path_factory, request):
    out = tmp_path_factory.mktemp(request.param) / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=24, sequences_per_shard=8, topk=8, act_positions=4,
                            format=request.param, run=BuildRunConfig(batch_size=8)), out, progress=False)  # fmt: skip
    return out


def _flip_topk_byte(cache, tmp_path, shard: int = 1):
    """A copy of `cache` with one byte of shard `shard`'s top-k ids changed (sizes unchanged)."""
    copy = tmp_path / "corrupt"
    shutil.copytree(cache, copy)
    files = json.loads((copy / "shards" / f"shard-{shard:05d}.done.json").read_text())["files"]
    name = next((n for n in files if "/topk_ids/c" in n), None) or next(iter(files))  # zarr chunk, or the tar
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return copy, name


def test_reader_refuses_a_changed_byte_before_decoding(clean_cache, tmp_path):
    corrupt, name = _flip_topk_byte(clean_cache, tmp_path)
    assert not verify_cache(corrupt).ok
    reader = CacheReader(corrupt)
    reader.read_shard(0)  # the other shards read as before
    with pytest.raises(CorruptShardError, match=f"{name.split('/')[-1]}.*checksum") as err:
        reader.read_shard(1)
    assert err.value.index == 1
    if "/topk_ids/" in name:  # a read that does not open the changed array is unaffected
        reader.read_shard(1, ["input_ids"])


def test_training_fails_naming_the_shard_or_skips_it(clean_cache, tmp_path, capsys):
    corrupt, name = _flip_topk_byte(clean_cache, tmp_path)
    common = ["--cache", str(corrupt), "--no-progress", "train.steps=6", "train.batch_size=4", "train.log_every=1",
              "student.hidden_size=16", "student.init=random"]  # fmt: skip
    capsys.readouterr()
    assert train_main(["train", "--out", str(tmp_path / "fail"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "on_corrupt_shard=skip" in err
    assert not (tmp_path / "fail" / "student").exists()

    assert train_main(["train", "--out", str(tmp_path / "skip"), *common, "train.on_corrupt_shard=skip"]) == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["corrupt_shards"] == [1]
    records = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert records[-1]["corrupt_shards"] == 1


def test_skipping_keeps_the_reading_position_exact(clean_cache, tmp_path):
    """Sequences of a skipped shard count as handed out: a resumed reader continues where it stopped."""
    corrupt, _ = _flip_topk_byte(clean_cache, tmp_path)
    whole = CacheDataset(corrupt, seed=3, num_epochs=2, on_corrupt_shard="skip")
    order = [int(s["sequence_index"]) for s in whole]
    assert len(order) == 2 * 16 and not any(8 <= i < 16 for i in order)
    first = CacheDataset(corrupt, seed=3, on_corrupt_shard="skip")
    iterator = iter(first)
    head = [int(next(iterator)["sequence_index"]) for _ in range(5)]
    resumed = CacheDataset(corrupt, seed=3, num_epochs=2, on_corrupt_shard="skip")
    resumed.load_state_dict(first.state_dict())
    assert head + [int(s["sequence_index"]) for s in resumed] == order


def test_a_rank_whose_every_shard_is_corrupt_stops(clean_cache, tmp_path):
    corrupt, _ = _flip_topk_byte(clean_cache, tmp_path, shard=0)
    dataset = CacheDataset(corrupt, rank=0, world_size=3, on_corrupt_shard="skip")  # rank 0 reads shard 0 only
    with pytest.raises(CorruptShardError, match="every shard"):
        next(iter(dataset))
