"""A completion record is trusted only as far as it is whole: a record that does not name every file
the shard's layout needs, a damaged record, or a record gone since a run started never lets training
read zeros or less data than it says it did."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import pytest

from lrc_offline.cache import CacheReader, CorruptShardError, verify_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import BuildRunConfig, CacheConfig
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.reader import CacheDataset

try:  # moto's S3 server, as tests/test_object_storage.py runs it
    from test_object_storage import SMALL, _objects, bucket, s3_endpoint  # noqa: F401
except pytest.skip.Exception:
    SMALL = None

TRAIN = ["--no-progress", "train.steps=6", "train.batch_size=4", "train.log_every=1", "student.hidden_size=16",
         "student.init=random"]  # fmt: skip
RECORD = "shards/shard-00002.done.json"


def _build(out, fmt: str):
    build_cache(CacheConfig(seq_len=32, max_sequences=24, sequences_per_shard=8, topk=8, act_positions=4,
                            format=fmt, run=BuildRunConfig(batch_size=8)), out, progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    base = tmp_path_factory.mktemp("caches")
    return {fmt: _build(base / fmt, fmt) for fmt in ("zarr", "webdataset")}


def _copy(cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    return copy


def _edit_record(cache, edit) -> None:
    path = cache / RECORD
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _drop_entry(cache) -> str:
    """Remove the entry of shard 2's top-k ids chunk (Zarr) or of its tar from its record; returns its name."""
    files = json.loads((cache / RECORD).read_text())["files"]
    name = next((n for n in files if "/topk_ids/c/" in n), None) or next(iter(files))
    _edit_record(cache, lambda record: record["files"].pop(name))
    return name


def _train(cache, out, *extra) -> int:
    return train_main(["train", "--cache", str(cache), "--out", str(out), *TRAIN, *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- the record must name every file the layout needs -------------------------------------------------


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_a_record_missing_an_entry_is_a_corrupt_shard(caches, tmp_path, fmt, capsys):
    cache = _copy(caches[fmt], tmp_path)
    name = _drop_entry(cache)
    reader = CacheReader(cache)
    with pytest.raises(CorruptShardError, match="not in the completion record") as err:
        reader.read_shard(2)
    assert err.value.index == 2 and str(cache / name) in str(err.value)
    reader.read_shard(1)
    if fmt == "zarr":  # a read that does not need the chunk is unaffected
        reader.read_shard(2, ["input_ids"])
    assert "not in the completion record" in verify_cache(cache).bad[2]

    capsys.readouterr()
    assert _train(cache, tmp_path / "fail") == 2
    err = _one_line_error(capsys)
    assert str(cache / name) in err and "on_corrupt_shard=skip" in err
    assert not (tmp_path / "fail" / "student").exists()

    assert _train(cache, tmp_path / "skip", "train.on_corrupt_shard=skip") == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["corrupt_shards"] == [2] and summary["skipped_shards"] == []


def test_a_chunk_deleted_with_its_entry_is_a_corrupt_shard(caches, tmp_path):
    cache = _copy(caches["zarr"], tmp_path)
    name = _drop_entry(cache)
    (cache / name).unlink()
    report = verify_cache(cache)
    assert list(report.bad) == [2] and name.split("shards/")[1] in report.bad[2]
    with pytest.raises(CorruptShardError, match="topk_ids/c/0/0/0: chunk not in the completion record"):
        CacheReader(cache).read_shard(2)
    assert cache_main(["verify", str(cache)]) == 1


def test_a_tar_missing_a_member_is_a_corrupt_shard(caches, tmp_path):
    """A tar rewritten without the last sequence's top-k ids, its record updated to match: the checksums
    pass, the layout does not."""
    cache = _copy(caches["webdataset"], tmp_path)
    tar_path = cache / "shards" / "shard-00002.tar"
    lost = "0000000023.topk_ids.npy.blosc"
    out = io.BytesIO()
    with tarfile.open(tar_path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src:
            if member.name != lost:
                dst.addfile(member, src.extractfile(member))
    assert lost in tarfile.open(tar_path).getnames()
    tar_path.write_bytes(out.getvalue())
    _edit_record(cache, lambda record: record["files"].update({"shards/shard-00002.tar": {
        "bytes": len(out.getvalue()), "sha256": hashlib.sha256(out.getvalue()).hexdigest()}}))  # fmt: skip
    with pytest.raises(CorruptShardError, match=f"member '{lost}' missing"):
        CacheReader(cache).read_shard(2)
    assert lost in verify_cache(cache).bad[2]


def test_chunk_keys_come_from_each_arrays_grid(caches):
    """An array of three chunks needs all three: the keys follow its metadata's chunk grid."""
    cache = caches["zarr"]
    reader = CacheReader(cache)
    shard = cache / "shards" / "shard-00002.zarr"
    listed = {p.relative_to(shard).as_posix() for p in shard.rglob("*") if p.is_file()}
    objects = {name: (shard / name).read_bytes() for name in listed if name.endswith("zarr.json")}
    assert reader.layout_problems(2, listed, objects.__getitem__) == []
    meta = json.loads(objects["input_ids/zarr.json"])
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 3  # 8 rows: chunks 0, 1, 2
    objects["input_ids/zarr.json"] = json.dumps(meta).encode()
    problems = reader.layout_problems(2, listed, objects.__getitem__)
    assert problems == [f"{shard}/input_ids/c/{i}/0: chunk not in the completion record" for i in (1, 2)]
    assert reader.layout_problems(2, listed, objects.__getitem__, fields=["topk_ids"]) == []
    meta["shape"][0] = 7
    objects["input_ids/zarr.json"] = json.dumps(meta).encode()
    assert "the manifest needs [8, 32]" in reader.layout_problems(2, listed, objects.__getitem__)[0]


# ---- a damaged record is corruption, not incompleteness -----------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "missing_keys"])
def test_a_damaged_record_goes_through_on_corrupt_shard(caches, tmp_path, damage, capsys):
    cache = _copy(caches["zarr"], tmp_path)
    record = cache / RECORD
    if damage == "truncated":
        record.write_bytes(record.read_bytes()[:100])
    else:
        _edit_record(cache, lambda r: r.pop("files"))
    capsys.readouterr()
    assert _train(cache, tmp_path / "fail") == 2
    err = _one_line_error(capsys)
    assert str(record) in err and ("not valid JSON" if damage == "truncated" else "lacks keys ['files']") in err
    assert "on_corrupt_shard=skip" in err and not (tmp_path / "fail" / "student").exists()
    complete, damaged = CacheReader(cache).shard_status()
    assert complete == [0, 1] and list(damaged) == [2]
    with pytest.raises(CorruptShardError, match="completion record"):
        CacheReader(cache).read_shard(2)

    assert _train(cache, tmp_path / "skip", "train.on_corrupt_shard=skip") == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["corrupt_shards"] == [2] and summary["skipped_shards"] == []
    assert read_metrics(tmp_path / "skip" / "metrics.jsonl")[-1]["corrupt_shards"] == 1
    assert cache_main(["verify", str(cache)]) == 1


@pytest.mark.parametrize("name", ["shards/shard-00002.zarr/../../../outside", "/etc/hostname",
                                  "shards/shard-00002.zarr//zarr.json", "shards/shard-00002.zarr/./zarr.json"])
def test_a_record_naming_a_file_outside_its_shard_is_damaged(caches, tmp_path, name):
    """A record's file names are opened by the reader: one leading out of the cache (a device, a FIFO,
    another user's file) is a damaged record, refused before anything is read."""
    cache = _copy(caches["zarr"], tmp_path)
    (tmp_path / "outside").write_bytes(b"x" * 10)
    _edit_record(cache, lambda r: r["files"].update({name: {"bytes": 10, "sha256": "0" * 64}}))
    complete, damaged = CacheReader(cache).shard_status()
    assert complete == [0, 1] and list(damaged) == [2]
    with pytest.raises(CorruptShardError, match="malformed"):
        CacheReader(cache).read_shard(2)


def test_a_record_damaged_mid_run_is_skipped_on_resume_with_skip(caches, tmp_path):
    """With on_corrupt_shard=skip, a record damaged after the run started is skipped like any corrupt
    shard: the resume keeps its position and reads every other sequence."""
    cache = _copy(caches["zarr"], tmp_path)
    whole = [int(s["sequence_index"]) for s in CacheDataset(cache, seed=2, num_epochs=1)]
    first = CacheDataset(cache, seed=2, on_corrupt_shard="skip")
    stream = iter(first)
    head = [int(next(stream)["sequence_index"]) for _ in range(3)]
    (cache / RECORD).write_text("{")
    resumed = CacheDataset(cache, seed=2, num_epochs=1, on_corrupt_shard="skip")
    resumed.load_state_dict(first.state_dict())
    rest = [int(s["sequence_index"]) for s in resumed]
    assert head + rest == [i for i in whole if not 16 <= i < 24 or i in head]
    assert resumed.corrupt_shards == [2]


# ---- a record deleted: fresh runs skip the shard, resumed runs refuse ---------------------------------


def test_a_record_deleted_before_a_resume_is_refused(caches, tmp_path, capsys):
    cache = _copy(caches["zarr"], tmp_path)
    run = tmp_path / "run"
    assert _train(cache, run, "train.checkpoint_every=3") == 0
    (cache / RECORD).unlink()
    capsys.readouterr()
    assert train_main(["train", "--cache", str(cache), "--out", str(run), *TRAIN, "train.checkpoint_every=3",
                       "--resume", str(run / "checkpoints" / "step-000003")]) == 2  # fmt: skip
    err = _one_line_error(capsys)
    assert "shards [2] this run started with are no longer complete" in err and "lrc-cache build" in err

    # a fresh run on the cache as it is now trains on the complete shards, saying which it skipped
    assert _train(cache, tmp_path / "fresh", "train.checkpoint_every=3") == 0
    summary = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    assert summary["skipped_shards"] == [2] and summary["corrupt_shards"] == []


# ---- object storage ------------------------------------------------------------------------------------


@pytest.mark.skipif(SMALL is None, reason="needs boto3, moto and s3fs")
def test_a_chunk_missing_from_the_record_and_the_bucket_on_s3(bucket):
    import boto3

    url = f"s3://{bucket}/cache"
    assert cache_main(["build", "--out", url, "--no-progress", *SMALL]) == 0
    client = boto3.client("s3")
    key = f"cache/{RECORD}"
    record = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    name = next(n for n in sorted(record["files"]) if "/topk_ids/c/" in n)
    del record["files"][name]
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode())
    client.delete_object(Bucket=bucket, Key=f"cache/{name}")
    assert name not in _objects(bucket, "cache")
    with pytest.raises(CorruptShardError, match=f"{url}/{name}: chunk not in the completion record"):
        CacheReader(url).read_shard(2)
    assert "chunk not in the completion record" in verify_cache(url).bad[2]
