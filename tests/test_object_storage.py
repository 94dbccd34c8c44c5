"""Caches on object storage, against a real S3 API: moto's S3 server on a free port, reached through
AWS_ENDPOINT_URL with dummy credentials, exactly as the code reaches any S3 endpoint. The bucket's
contents are read back with boto3, independently of our code."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from lrc_offline.cache import CacheMismatchError, CacheReader, CacheWriter, make_manifest, read_manifest, verify_cache  # noqa: E402
from lrc_offline.cli.cache import main as cache_main  # noqa: E402
from lrc_offline.cli.train import main as train_main  # noqa: E402
from lrc_offline.storage import Location, StorageError  # noqa: E402
from test_cache_format import FINGERPRINTS, GEOMETRY, NUM_SEQUENCES, make_cfg, random_arrays  # noqa: E402

SECRET = "lrc-test-secret-Q7f3a9c2e81b"
SMALL = ["seq_len=16", "max_sequences=32", "sequences_per_shard=4", "topk=4", "act_positions=4", "heldout_docs=2"]
TRAIN = ["--no-progress", "train.steps=2", "train.batch_size=4", "train.log_every=1", "train.eval_sequences=2",
         "student.hidden_size=16"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; the standard chain (environment variables) points every client at the server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "lrc-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"lrc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix/`, keyed by its path below it (read with boto3, not our code)."""
    client = boto3.client("s3")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_build_inspect_verify_train_from_s3(bucket, tmp_path, fmt, capsys, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    url = f"s3://{bucket}/cache"
    args = ["--no-progress", f"format={fmt}", *SMALL]
    assert cache_main(["build", "--out", url, *args]) == 0
    assert cache_main(["build", "--out", str(tmp_path / "local"), *args]) == 0
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()  # nothing fell back to a local path
    remote, local = _objects(bucket, "cache"), _local_files(tmp_path / "local")
    # every shard, record and index object is byte-identical to the local build; the manifest holds the
    # creation time, so it is compared by its digest (the contract)
    assert set(remote) == set(local) and len(remote) > 10
    assert {k: v for k, v in remote.items() if k != "manifest.json"} == {k: v for k, v in local.items() if k != "manifest.json"}
    assert read_manifest(url).digest() == read_manifest(tmp_path / "local").digest()

    capsys.readouterr()
    assert cache_main(["inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete_shards"] == info["total_shards"] == 8 and info["root"] == url
    assert cache_main(["verify", url, "--storage-options", json.dumps({"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})]) == 0
    assert "8/8 shards complete and verified" in capsys.readouterr().out

    run = tmp_path / "run"
    init = "student.init=pca" if fmt == "zarr" else "student.init=random"  # PCA: its basis is stored in the bucket
    assert train_main(["train", "--cache", url, "--out", str(run), *TRAIN, init]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cache"] == url and summary["sequences_per_epoch"] == 32
    if fmt == "zarr":
        derived = [k for k in _objects(bucket, "cache") if k.startswith(("pca/", "derived/"))]
        assert derived == ["derived/pca/second_moment-1024seq.safetensors"]
    # the exported student on the bucket's held-out split, with the endpoint passed as on the other commands
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    capsys.readouterr()
    options = json.dumps({"endpoint_url": endpoint})
    assert train_main(["eval", "--student", str(run / "student"), "--cache", url, "--json", "--max-sequences", "2",
                       "--storage-options", options]) == 0
    assert json.loads(capsys.readouterr().out)["student_ce"] == pytest.approx(summary["heldout_ce"], abs=1e-4)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)

    if fmt == "zarr":  # zarr itself opens a shard from the bucket, through its own fsspec store
        import zarr

        group = zarr.open_group(f"{url}/shards/shard-00001.zarr", mode="r",
                                storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})  # fmt: skip
        assert torch.equal(torch.from_numpy(group["input_ids"][:]), CacheReader(url).read_shard(1)["input_ids"])
    if fmt == "zarr":  # an export uploaded to the bucket: a plain HF folder, config.json last
        assert train_main(["export", "--checkpoint", str(run / "checkpoints" / "step-000002"),
                           "--out", f"s3://{bucket}/student"]) == 0  # fmt: skip
        exported = _objects(bucket, "student")
        assert {"config.json", "model.safetensors"} <= set(exported)
        assert json.loads(exported["config.json"]) == json.loads((run / "student" / "config.json").read_text())
        assert train_main(["export", "--checkpoint", str(run / "checkpoints" / "step-000002"),
                           "--out", f"s3://{bucket}/student"]) == 2  # fmt: skip  (refuses to overwrite)

    # the secret access key is in no object of the cache and no file of the run
    leaks = [k for k, v in remote.items() if SECRET.encode() in v]
    leaks += [str(p) for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []

    # one flipped byte in one object: verify exits 1 naming the shard and the object
    victim = max((k for k in remote if k.startswith("shards/shard-00003.") and not k.endswith(".done.json")), key=lambda k: len(remote[k]))
    data = bytearray(remote[victim])
    data[len(data) // 2] ^= 0xFF
    boto3.client("s3").put_object(Bucket=bucket, Key=f"cache/{victim}", Body=bytes(data))
    capsys.readouterr()
    assert cache_main(["verify", url]) == 1
    printed = capsys.readouterr().out
    assert f"BAD     shard 3: checksum mismatch in {victim}" in printed and "FAILED" in printed


def _build_process(url: str, endpoint: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lrc_offline.cli.cache", "build", "--out", url, "--no-progress",
               "seq_len=16", "max_sequences=64", "sequences_per_shard=4", "topk=4", "act_positions=4", "run.batch_size=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LRC_LOG_LEVEL": "WARNING", "AWS_ENDPOINT_URL": endpoint}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_while_building_to_s3_then_clean_and_rerun(bucket, s3_endpoint, tmp_path, capsys):
    """Three kill -9s of a build writing to S3 (after 2, 6 and 11 of 16 shards: at a random moment, then
    twice in the middle of a shard's upload), `clean`, then a complete rerun: the cache verifies and
    equals a clean build."""
    url = f"s3://{bucket}/cache"
    rng = random.Random(0)
    client = boto3.client("s3")
    for kill, target in enumerate((2, 6, 11)):
        process = _build_process(url, s3_endpoint)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            listed = client.list_objects_v2(Bucket=bucket, Prefix="cache/shards/", Delimiter="/")
            records = {c["Key"][len("cache/shards/"):-len(".done.json")] for c in listed.get("Contents", [])
                       if c["Key"].endswith(".done.json")}  # fmt: skip
            uploading = {p["Prefix"][len("cache/shards/"):-len(".zarr/")] for p in listed.get("CommonPrefixes", [])} - records
            # the first kill lands anywhere after `target` shards; the others as soon as a shard's data
            # objects are there before its record (mid-upload: the moment the commit protocol is for)
            if len(records) >= target and (kill == 0 or uploading):
                break
            time.sleep(0.005)
        if kill == 0:
            time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    report = verify_cache(url)
    assert report.complete and report.missing and not report.bad  # partial, never wrong
    before = _objects(bucket, "cache")
    assert cache_main(["clean", url]) == 0
    after = _objects(bucket, "cache")
    named = {name for key, value in after.items() if key.endswith(".done.json") for name in json.loads(value)["files"]}
    shard_objects = {k for k in after if k.startswith("shards/") and not k.endswith(".done.json")}
    assert shard_objects == named  # clean left only objects some record names
    assert set(after) < set(before)  # a killed upload left objects no record names, and clean removed them
    assert _build_process(url, s3_endpoint).wait(timeout=600) == 0
    assert verify_cache(url).ok
    assert cache_main(["build", "--out", str(tmp_path / "clean"), "--no-progress", "seq_len=16", "max_sequences=64",
                       "sequences_per_shard=4", "topk=4", "act_positions=4", "run.batch_size=2"]) == 0  # fmt: skip
    remote, local = _objects(bucket, "cache"), _local_files(tmp_path / "clean")
    assert {k: v for k, v in remote.items() if k != "manifest.json"} == {k: v for k, v in local.items() if k != "manifest.json"}


def test_user_errors_are_one_line_and_exit_2(bucket, tmp_path, monkeypatch, capsys):
    from moto import settings

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cache_main(["inspect", "s3://no-such-bucket-lrc/cache"]) == 2
    assert cache_main(["build", "--out", "s3://no-such-bucket-lrc/cache", "--no-progress", *SMALL]) == 2
    assert cache_main(["verify", "nosuchproto://bucket/cache"]) == 2
    assert cache_main(["inspect", f"s3://{bucket}/cache", "--storage-options", '{"secret": "x"}']) == 2
    assert train_main(["train", "--cache", "nosuchproto://bucket/cache", "--out", str(tmp_path / "r"), *TRAIN]) == 2
    assert cache_main(["build", "--out", f"s3://{bucket}/c", "--no-progress", 'run.storage_options={"secret_access_key": "x"}']) == 2
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks credentials
    assert cache_main(["inspect", f"s3://{bucket}/cache"]) == 2
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 7, errors
    assert "bucket does not exist" in errors[0] and "bucket does not exist" in errors[1]
    assert "unknown storage protocol 'nosuchproto'" in errors[2] and "may not hold credentials" in errors[3]
    assert "unknown storage protocol" in errors[4]
    assert "may not hold credentials" in errors[5] and "access refused" in errors[6]
    assert os.listdir(tmp_path) == []  # no folder named "s3:" or "nosuchproto:"
    assert not any(SECRET in e for e in errors)


def test_webdataset_reads_our_shards_from_s3(bucket):
    """The snippet of docs/cache_format.md: `webdataset` itself reads a cache's tars from the store."""
    import io

    import fsspec
    import numcodecs
    import numpy as np
    import webdataset as wds

    url = f"s3://{bucket}/cache"
    assert cache_main(["build", "--out", url, "--no-progress", "format=webdataset", *SMALL]) == 0
    # --- snippet (docs/cache_format.md)
    wds.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()

    def npy(data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data), allow_pickle=False)

    decoders = [wds.handle_extension("npy.blosc", lambda data: npy(numcodecs.Blosc().decode(data))),
                wds.handle_extension("npy.zst", lambda data: npy(numcodecs.Zstd().decode(data)))]  # fmt: skip
    reader = CacheReader(url)
    urls = [f"{url}/{reader.shard_name(i)}" for i in reader.complete_shards()]  # complete shards only
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode(*decoders))
    # --- end snippet
    assert len(samples) == 32 and samples[0]["__key__"] == "0000000000"
    # the default int4g activations come with their per-group scales as companion arrays
    assert sorted(k for k in samples[0] if not k.startswith("__"))[:4] == [
        "act_attn.npy.blosc", "act_attn__scale.npy.blosc", "act_input.npy.blosc", "act_input__scale.npy.blosc",
    ]
    first = reader.read_shard(0)
    assert np.array_equal(samples[1]["input_ids.npy.blosc"], first["input_ids"][1].numpy())
    assert np.array_equal(samples[31]["topk_ids.npy.blosc"], reader.read_shard(7)["topk_ids"][3].numpy())


def test_two_writers_of_one_shard_and_of_one_manifest(bucket):
    """Workers starting together create one manifest (a conditional put); two writing the same shard with
    different bytes end with one valid shard."""
    cfg = make_cfg(logit_mode="topk", activation_mode="none")
    manifests = [make_manifest(cfg, GEOMETRY, dict(FINGERPRINTS, teacher_weights=str(i)), NUM_SEQUENCES) for i in range(2)]
    url = f"s3://{bucket}/race"
    results: list[object] = [None, None]

    def open_writer(i: int) -> None:
        try:
            results[i] = CacheWriter(url, manifests[i])
        except CacheMismatchError as err:
            results[i] = err

    threads = [threading.Thread(target=open_writer, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(type(r).__name__ for r in results) == ["CacheMismatchError", "CacheWriter"]
    writer = next(r for r in results if isinstance(r, CacheWriter))

    def arrays(seed: int) -> dict[str, torch.Tensor]:
        first, end = writer.shard_range(0)
        return random_arrays(writer.fields, end - first, seed)

    for _ in range(3):
        workers = [threading.Thread(target=writer.write_shard, args=(0, arrays(seed))) for seed in (1, 2)]
        [t.start() for t in workers]
        [t.join() for t in workers]
        report = verify_cache(url)
        assert report.complete == [0] and not report.bad
        got = CacheReader(url).read_shard(0)
        assert any(all(torch.equal(got[k].float(), v.float()) for k, v in arrays(seed).items()) for seed in (1, 2))


def test_transient_errors_are_retried_and_persistent_ones_name_the_object(monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from lrc_offline import storage

    class Flaky(MemoryFileSystem):
        protocol = "flaky"
        failures = {"n": 0}

        def cat_file(self, path, *args, **kwargs):
            if self.failures["n"] > 0:
                self.failures["n"] -= 1
                # what s3fs raises for SlowDown and 503 responses
                raise OSError(errno.EBUSY, "Please reduce your request rate.")
            return super().cat_file(path, *args, **kwargs)

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    location = Location("flaky://bucket/x")
    location.write_bytes("object", b"payload")
    Flaky.failures["n"] = 2
    assert location.read_bytes("object") == b"payload"  # two 503s, then success
    Flaky.failures["n"] = storage.RETRIES
    with pytest.raises(StorageError, match="reading flaky://bucket/x/object: OSError: .*reduce your request rate"):
        location.read_bytes("object")
    with pytest.raises(FileNotFoundError, match="flaky://bucket/x/missing"):
        Location("flaky://bucket/x").read_bytes("missing")


def test_read_many_takes_sizes_and_empty_objects():
    location = Location(f"memory://lrc-{uuid.uuid4().hex[:8]}")
    location.write_bytes("empty", b"")
    location.write_bytes("full", b"xyz")
    assert location.read_many(["empty", "full"], sizes=[0, 3]) == {"empty": b"", "full": b"xyz"}
    assert location.read_many(["full"], sizes=[2]) == {"full": b"xy"}  # the caller's size check sees it
    assert location.read_many(["empty", "gone"], sizes=[0, 0], missing_ok=True) == {"empty": b""}
    with pytest.raises(FileNotFoundError) as err:
        location.read_many(["empty", "gone"], sizes=[0, 5])
    assert err.value.filename == f"{location}/gone"


def test_credentials_are_refused_wherever_they_would_be_saved(tmp_path):
    from lrc_offline.storage import check_storage_options

    for options in ({"secret": "x"}, {"account_key": "x"}, {"connection_string": "x"},
                    {"client_kwargs": {"aws_session_token": "x"}}, {"endpoint_url": "http://user:pw@host:9000"}):  # fmt: skip
        with pytest.raises(StorageError, match="may not hold credentials"):
            check_storage_options(options, "test")
    assert check_storage_options({"endpoint_url": "http://host:9000", "profile": "research"}, "test")
    with pytest.raises(StorageError, match="credentials in a URL"):
        Location("s3://user:pw@bucket/cache")
    # an upload into a local folder that does not exist yet (an export to file://)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "a.json").write_text("{}")
    Location(f"file://{tmp_path}/new/export").upload(tmp_path / "src", "")
    assert (tmp_path / "new" / "export" / "sub" / "a.json").read_text() == "{}"


def test_build_rebuilds_a_shard_whose_files_do_not_match_its_record(bucket):
    """A record beside objects of other sizes (a worker killed while overwriting a shard another had just
    committed): readers refuse it by checksum, and the next build rebuilds it instead of skipping it."""
    url = f"s3://{bucket}/cache"
    args = ["build", "--out", url, "--no-progress", *SMALL]
    assert cache_main(args) == 0
    before = _objects(bucket, "cache")
    victim = next(k for k in sorted(before) if k.startswith("shards/shard-00002.zarr/act_input/c/"))
    boto3.client("s3").put_object(Bucket=bucket, Key=f"cache/{victim}", Body=before[victim][:-7])
    assert list(verify_cache(url).bad) == [2]
    assert cache_main(args) == 0
    assert verify_cache(url).ok and _objects(bucket, "cache")[victim] == before[victim]
