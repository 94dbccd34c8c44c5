"""The on-disk cache format: schema, round trips, durability, verification and safe reading."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch

from lrc_offline.cache import (
    SCHEMA_VERSION,
    CacheFormatError,
    CacheMismatchError,
    CacheReader,
    CacheWriter,
    TeacherGeometry,
    act_layers,
    cache_fields,
    clean_stale,
    dequantize_float8,
    inspect_cache,
    Manifest,
    make_manifest,
    quantize_float8,
    read_manifest,
    verify_cache,
    wds_shard,
    zarr_shard,
)
from lrc_offline.config import BuildRunConfig, CacheConfig, to_dict

GEOMETRY = TeacherGeometry(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96, vocab_size=320
)
FINGERPRINTS = {"teacher_config": "tc", "teacher_weights": "tw", "tokenizer": "tok", "corpus": "corp"}
NUM_SEQUENCES = 7  # shards of 3, 3 and 1 sequences: the last shard is short
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float8": torch.float32}


def make_cfg(**overrides) -> CacheConfig:
    # The lossless codec of every layer (not the compact defaults): these tests check bit-exact round trips
    # and the fields' layout; the lossy codecs and the layer subset have their own tests (test_codecs.py).
    base = dict(seq_len=16, topk=8, num_draws=16, act_positions=4, sequences_per_shard=3, act_dtype="bfloat16",
                act_layer_fraction=1.0, logprob_dtype="float32")  # fmt: skip
    return CacheConfig(**{**base, **overrides})


def random_arrays(fields, num: int, seed: int) -> dict[str, torch.Tensor]:
    """Whole-shard arrays for `fields`, with bf16 special values so bit-exactness is really tested."""
    gen = torch.Generator().manual_seed(seed)
    arrays = {}
    for spec in fields:
        shape = (num, *spec.shape)
        if spec.dtype == "int32":
            # int64 input, as torch.topk returns: the writer narrows it after a range check.
            arrays[spec.name] = torch.randint(-1, GEOMETRY.vocab_size, shape, generator=gen)
        elif spec.dtype == "uint16":
            arrays[spec.name] = torch.randint(0, 2**16, shape, generator=gen).to(torch.uint16)
        else:
            values = torch.randn(shape, generator=gen) * 3
            if spec.dtype in ("bfloat16", "float16", "float32"):
                flat = values.view(-1)
                flat[:5] = torch.tensor([float("inf"), -0.0, 1e-40, -1e30 if spec.dtype != "float16" else -6e4, 0.0])
            arrays[spec.name] = values.to(TORCH_DTYPES[spec.dtype])
    return arrays


def build(root: Path, cfg: CacheConfig, seed: int = 0, shards=None) -> dict[int, dict[str, torch.Tensor]]:
    """Write the given shards (default all) of a cache; return the arrays written per shard."""
    writer = CacheWriter(root, make_manifest(cfg, GEOMETRY, FINGERPRINTS, NUM_SEQUENCES))
    written = {}
    for index in range(writer.num_shards) if shards is None else shards:
        first, end = writer.shard_range(index)
        written[index] = random_arrays(writer.fields, end - first, seed * 1000 + index)
        writer.write_shard(index, written[index], stats={"teacher_entropy_mean": float(index), "note": "x"})
    return written


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, name
    if expected.dtype in (torch.bfloat16, torch.float16):
        actual, expected = actual.view(torch.int16), expected.view(torch.int16)
    elif expected.dtype == torch.float32:
        actual, expected = actual.view(torch.int32), expected.view(torch.int32)
    elif expected.dtype == torch.uint16:
        actual, expected = actual.long(), expected.long()
    assert torch.equal(actual, expected.to(actual.dtype)), name


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------


def test_fields_follow_the_contract():
    cfg = make_cfg(logit_mode="sampled", activation_mode="targets", act_layers=[1], act_positions=40)
    shapes = {f.name: (f.shape, f.dtype) for f in cache_fields(cfg, GEOMETRY)}
    L, N, P = 16, 16, 16  # P is capped at seq_len
    assert shapes == {
        "input_ids": ((L,), "int32"),
        "position_ids": ((L,), "int32"),
        "sampled_ids": ((L, N), "int32"),
        "sampled_counts": ((L, N), "uint16"),
        "act_positions": ((P,), "int32"),
        "act_q": ((1, P, 64), "bfloat16"),
        "act_k": ((1, P, 32), "bfloat16"),
        "act_v": ((1, P, 32), "bfloat16"),
        "act_o": ((1, P, 64), "bfloat16"),
        "act_gate": ((1, P, 96), "bfloat16"),
        "act_up": ((1, P, 96), "bfloat16"),
        "act_down": ((1, P, 64), "bfloat16"),
    }
    hidden = cache_fields(make_cfg(logit_mode="hidden", activation_mode="none", act_dtype="float16"), GEOMETRY)
    assert [(f.name, f.shape, f.dtype) for f in hidden][-1] == ("hidden", (16, 64), "float16")
    assert [f.name for f in cache_fields(make_cfg(logit_mode="none", activation_mode="none"), GEOMETRY)] == [
        "input_ids",
        "position_ids",
    ]


@pytest.mark.parametrize("layers, message", [([2], "has 2 layers"), ([0, 0], "repeats"), ([], "activation_mode=none")])
def test_act_layers_are_validated(layers, message):
    with pytest.raises(CacheFormatError, match=message):
        act_layers(make_cfg(act_layers=layers), GEOMETRY)
    assert act_layers(make_cfg(act_layers=[1, 0]), GEOMETRY) == [0, 1]  # stored in ascending order


# ---------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------

# Storage dtypes rotate with the activation mode so every float dtype is exercised somewhere.
ACT_DTYPE = {"residual": "bfloat16", "targets": "float32", "none": "float16"}
LOGPROB_DTYPE = {"residual": "bfloat16", "targets": "float32", "none": "float16"}


@pytest.mark.parametrize("activation_mode", ["residual", "targets", "none"])
@pytest.mark.parametrize("logit_mode", ["topk", "sampled", "hidden", "none"])
@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_round_trip_is_exact(tmp_path, fmt, logit_mode, activation_mode):
    cfg = make_cfg(
        format=fmt,
        logit_mode=logit_mode,
        activation_mode=activation_mode,
        act_dtype=ACT_DTYPE[activation_mode],
        logprob_dtype=LOGPROB_DTYPE[activation_mode],
    )
    written = build(tmp_path, cfg)
    reader = CacheReader(tmp_path)
    assert reader.complete_shards() == [0, 1, 2]
    for index, arrays in written.items():
        read = reader.read_shard(index)
        assert set(read) == set(arrays)
        for name, expected in arrays.items():
            spec_dtype = next(f.dtype for f in reader.fields if f.name == name)
            if spec_dtype == "int32":
                expected = expected.to(torch.int32)
            assert_bit_equal(read[name], expected, name)
    # Per-sequence iteration sees every sequence once, in order, with the same values.
    sequences = list(reader.iter_sequences(fields=["input_ids"]))
    assert [s["sequence_index"] for s in sequences] == list(range(NUM_SEQUENCES))
    assert torch.equal(sequences[4]["input_ids"], written[1]["input_ids"][1].to(torch.int32))


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_float8_round_trip_within_documented_bound(tmp_path, fmt):
    cfg = make_cfg(format=fmt, act_dtype="float8", logit_mode="hidden")
    written = build(tmp_path, cfg)
    read = CacheReader(tmp_path).read_shard(0)
    for name in ("hidden", "act_input", "act_attn"):
        x, y = written[0][name], read[name]
        assert y.dtype == torch.float32 and y.shape == x.shape
        row_max = x.abs().amax(-1, keepdim=True)
        err = (y - x).abs()
        assert err.max() > 0  # lossy, as documented
        assert bool((err <= row_max / 28 * (1 + 1e-6)).all()), name
        assert bool((err <= 2**-4 * x.abs() + 2**-10 * row_max / 448 + 1e-6 * row_max).all()), name


def test_float8_bound_on_hard_rows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=gen) * torch.logspace(-30, 30, 512).unsqueeze(-1)
    x[0] = 0.0  # an all-zero row must survive (its scale is 1, not 0)
    x[1, 0] = 1e4  # a massive activation next to small values: those fall into subnormals
    x[2] = torch.linspace(-1, 1, 256) * 1e-3
    codes, scale = quantize_float8(x)
    assert codes.dtype == torch.uint8 and scale.shape == (512,)
    y = dequantize_float8(codes, scale)
    row_max = x.abs().amax(-1, keepdim=True)
    err = (y - x).abs()
    assert torch.equal(y[0], x[0])
    assert bool(torch.isfinite(y).all())
    assert bool((err <= row_max / 28 * (1 + 1e-6)).all())
    assert bool((err <= 2**-4 * x.abs() + 2**-10 * row_max / 448 + 1e-6 * row_max).all())
    # The bound is tight: values just above a power of two in the top binade do lose ~1/28 of the max.
    assert (err[1:] / row_max[1:]).max() > 0.02


# ---------------------------------------------------------------------------------------------------
# durability
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_rebuild_is_byte_identical(tmp_path, fmt):
    cfg = make_cfg(format=fmt, act_dtype="float8")
    build(tmp_path / "a", cfg, seed=3)
    build(tmp_path / "b", cfg, seed=3)
    first = all_files(tmp_path / "a" / "shards")
    assert len(first) > 3 and first == all_files(tmp_path / "b" / "shards")
    # Rebuilding a complete shard in place (replacing its data) gives the same bytes again.
    build(tmp_path / "a", cfg, seed=3, shards=[1])
    assert all_files(tmp_path / "a" / "shards") == first
    assert not any(name.startswith(".tmp-") for name in first)


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_crash_mid_shard_leaves_it_incomplete_and_a_rerun_completes_it(tmp_path, fmt, monkeypatch):
    cfg = make_cfg(format=fmt)
    module = zarr_shard if fmt == "zarr" else wds_shard
    real_encode = module.encode
    calls = []

    def crashing_encode(spec, tensor):
        calls.append(spec.name)
        if len(calls) == 3:  # two fields already on disk, the third never arrives
            raise SimulatedCrash("killed mid-shard")
        return real_encode(spec, tensor)

    monkeypatch.setattr(module, "encode", crashing_encode)
    with pytest.raises(SimulatedCrash):
        build(tmp_path, cfg, shards=[0])
    monkeypatch.setattr(module, "encode", real_encode)
    reader = CacheReader(tmp_path)
    assert not reader.is_complete(0) and reader.complete_shards() == []
    assert not (tmp_path / "shards" / "shard-00000.done.json").exists()
    with pytest.raises(CacheFormatError, match="not complete"):
        reader.read_shard(0)
    written = build(tmp_path, cfg, shards=[0])
    assert reader.complete_shards() == [0]
    assert torch.equal(reader.read_shard(0)["input_ids"], written[0]["input_ids"].to(torch.int32))


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_crash_before_the_record_and_clean_stale(tmp_path, fmt, monkeypatch):
    from lrc_offline import storage
    from lrc_offline.cache import store

    cfg = make_cfg(format=fmt)
    build(tmp_path, cfg, shards=[0])
    # A hard kill leaves work in progress behind: emulate it by disabling the cleanup.
    monkeypatch.setattr(storage, "remove_path", lambda path: None)
    monkeypatch.setattr(storage, "move_into_place", lambda tmp, final: _raise())
    with pytest.raises(SimulatedCrash):
        build(tmp_path, cfg, shards=[1])
    monkeypatch.undo()
    # Data renamed into place but killed before its record: present on disk, still not complete.
    write_bytes = storage.Location.write_bytes
    monkeypatch.setattr(storage.Location, "write_bytes", lambda self, rel, data, exclusive=False: _raise()
                        if rel.endswith(".done.json") else write_bytes(self, rel, data, exclusive))  # fmt: skip
    with pytest.raises(SimulatedCrash):
        build(tmp_path, cfg, shards=[2])
    monkeypatch.undo()
    shards = tmp_path / "shards"
    assert CacheReader(tmp_path).complete_shards() == [0]
    assert (shards / store.shard_name(2, fmt)).exists()
    assert sum(p.name.startswith(".tmp-") for p in shards.iterdir()) == 1
    assert clean_stale(tmp_path) == 2  # the temporary shard 1 and the record-less shard 2
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000.done.json", store.shard_name(0, fmt)]
    build(tmp_path, cfg, shards=[1, 2])
    assert verify_cache(tmp_path).ok


def _raise():
    raise SimulatedCrash("killed")


# ---------------------------------------------------------------------------------------------------
# verification and inspection
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_verify_names_a_corrupted_shard_and_missing_ones(tmp_path, fmt):
    build(tmp_path, make_cfg(format=fmt, logit_mode="topk"), shards=[0, 1])
    assert verify_cache(tmp_path).complete == [0, 1]
    shard = tmp_path / "shards" / ("shard-00001.zarr" if fmt == "zarr" else "shard-00001.tar")
    victim = shard / "topk_ids" / "c" / "0" / "0" / "0" if fmt == "zarr" else shard
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_cache(tmp_path)
    assert not report.ok
    assert report.complete == [0] and report.missing == [2] and list(report.bad) == [1]
    assert report.bad[1] == f"checksum mismatch in {victim.relative_to(tmp_path).as_posix()}"
    if fmt == "zarr":
        (shard / "stray").write_bytes(b"x")
        victim.unlink()
        assert "missing file" in verify_cache(tmp_path).bad[1]
        with pytest.raises(CacheFormatError, match="missing or resized"):
            CacheReader(tmp_path).read_shard(1)


def test_inspect_reports_sizes_ratios_and_weighted_stats(tmp_path):
    cfg = make_cfg(format="zarr", logit_mode="topk", act_dtype="bfloat16")
    build(tmp_path, cfg)
    info = inspect_cache(tmp_path)
    assert (info["complete_shards"], info["total_shards"]) == (3, 3)
    assert info["tokens"] == info["complete_tokens"] == NUM_SEQUENCES * 16
    assert info["fingerprints"] == FINGERPRINTS and info["config"]["topk"] == 8
    fields = info["fields"]
    assert list(fields) == [
        "input_ids", "position_ids", "topk_ids", "topk_logprobs", "act_positions", "act_input", "act_attn"
    ]  # fmt: skip
    for name, field in fields.items():
        assert field["bytes_per_token"] == pytest.approx(field["stored_bytes"] / info["complete_tokens"])
        assert field["compression_ratio"] == pytest.approx(field["logical_bytes"] / field["stored_bytes"])
    assert fields["act_input"]["logical_bytes"] == NUM_SEQUENCES * 2 * 4 * 64 * 2
    assert sum(f["stored_bytes"] for f in fields.values()) < info["stored_bytes"]  # metadata is extra
    assert info["bytes_per_token"] == pytest.approx(info["stored_bytes"] / info["complete_tokens"])
    # Shards of 3, 3, 1 sequences with entropies 0, 1, 2; the string stat is not averaged.
    assert info["stats"] == {"teacher_entropy_mean": pytest.approx((0 * 3 + 1 * 3 + 2 * 1) / 7)}


# ---------------------------------------------------------------------------------------------------
# manifests and user errors
# ---------------------------------------------------------------------------------------------------


def test_reopening_with_a_different_config_is_refused(tmp_path):
    build(tmp_path, make_cfg(topk=8), shards=[0])
    CacheWriter(tmp_path, make_manifest(make_cfg(topk=8), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES))  # same: fine
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter(tmp_path, make_manifest(make_cfg(topk=4), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES))
    assert "config.topk: 8 in the existing cache, 4 requested" in str(err.value)
    assert "fields.topk_ids.shape" in str(err.value)
    other = make_manifest(make_cfg(topk=8), GEOMETRY, {**FINGERPRINTS, "tokenizer": "new"}, NUM_SEQUENCES)
    assert read_manifest(tmp_path).differences(other) == [
        'fingerprints.tokenizer: "tok" in the existing cache, "new" requested'
    ]


def test_manifest_contents_and_read_errors(tmp_path):
    manifest = make_manifest(make_cfg(), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES, extra={"packing": "concat"})
    # Schema 3 only added encodings this cache does not use: it is written as 2, for older readers.
    assert manifest.schema_version == 2 < SCHEMA_VERSION and manifest.num_shards == math.ceil(7 / 3)
    assert {"torch", "zarr", "numcodecs"} <= set(manifest.versions)
    assert manifest.created.endswith("+00:00") and manifest.extra == {"packing": "concat"}
    reread = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert reread == manifest and reread.digest() == manifest.digest()
    with pytest.raises(ValueError, match="corpus"):
        make_manifest(make_cfg(), GEOMETRY, {k: v for k, v in FINGERPRINTS.items() if k != "corpus"}, 7)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest.to_dict(), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(CacheFormatError, match="upgrade lrc_offline"):
        CacheReader(tmp_path)


def test_manifest_api_and_volatile_run_options():
    cfg = make_cfg(act_layers=[1, 0], run=BuildRunConfig(batch_size=3, device="cpu", compute_dtype="float32"))
    manifest = make_manifest(cfg, GEOMETRY, FINGERPRINTS, NUM_SEQUENCES, extra={"teacher_name": "tiny"})
    assert manifest.field_names[:3] == ("input_ids", "position_ids", "topk_ids") and manifest.has_field("act_attn")
    assert manifest.has_residuals and not manifest.has_field("hidden")
    assert manifest.act_layers == [0, 1] and manifest.teacher_name == "tiny"
    assert make_manifest(make_cfg(), GEOMETRY, FINGERPRINTS, 7).teacher_name == "tiny-random:llama"
    data = manifest.to_dict()
    assert data["build"] == to_dict(cfg.run) and "run" not in data["config"] and "batch_size" not in data["config"]
    # The run options are volatile: not in the digest, not a difference.
    other = make_manifest(make_cfg(act_layers=[1, 0]), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES,
                          extra={"teacher_name": "tiny"})  # fmt: skip
    assert manifest.digest() == other.digest() and manifest.differences(other) == []
    assert manifest.digest() != make_manifest(make_cfg(topk=4), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES).digest()
    with pytest.raises(CacheFormatError, match="where.json: manifest lacks keys"):
        Manifest.from_dict({"schema_version": SCHEMA_VERSION}, "where.json")


def _old_digest(data: dict) -> str:
    """How schema 1 computed a manifest's digest (written out here, as the old code had it)."""
    run_keys = ("device", "vllm_tensor_parallel_size", "vllm_pipeline_parallel_size", "vllm_gpu_memory_utilization",
                "vllm_enforce_eager")  # fmt: skip
    kept = {k: v for k, v in data.items() if k not in ("created", "versions")}
    kept["config"] = {k: v for k, v in kept.get("config", {}).items() if k not in run_keys}
    return "sha256:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def test_a_schema_1_cache_still_reads_complete_and_takes_new_shards(tmp_path):
    cfg = make_cfg()
    written = build(tmp_path, cfg, shards=[0, 1])
    # Rewrite the cache as schema 1 left it: the run options inside config, no build, the old digest.
    data = json.loads((tmp_path / "manifest.json").read_text())
    data = {**data, "schema_version": 1, "config": {**data["config"], **data.pop("build")}}
    (tmp_path / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for index in (0, 1):
        record_file = tmp_path / "shards" / f"shard-{index:05d}.done.json"
        record_file.write_text(json.dumps({**json.loads(record_file.read_text()), "manifest": _old_digest(data)}))
    reader = CacheReader(tmp_path)
    assert reader.manifest.schema_version == 1 and reader.manifest.config.run.batch_size == 8
    assert reader.manifest.config == cfg and reader.complete_shards() == [0, 1]
    assert torch.equal(reader.read_shard(1)["topk_ids"], written[1]["topk_ids"].to(torch.int32))
    # A worker of this version joins the build: same contract, so it writes under the old manifest.
    build(tmp_path, make_cfg(run=BuildRunConfig(batch_size=2)), shards=[2])
    assert json.loads((tmp_path / "manifest.json").read_text()) == data
    assert CacheReader(tmp_path).complete_shards() == [0, 1, 2] and verify_cache(tmp_path).ok


def test_unwritable_root_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    root = blocker / "cache"
    with pytest.raises(OSError, match="cannot write the cache at .*a_file/cache"):
        CacheWriter(root, make_manifest(make_cfg(), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES))


def test_bad_shard_arrays_are_refused_with_clear_errors(tmp_path):
    writer = CacheWriter(tmp_path, make_manifest(make_cfg(logit_mode="sampled"), GEOMETRY, FINGERPRINTS, NUM_SEQUENCES))
    good = random_arrays(writer.fields, 3, seed=0)

    def attempt(**changes):
        arrays = {k: v for k, v in {**good, **changes}.items() if v is not None}
        writer.write_shard(0, arrays)

    with pytest.raises(ValueError, match=r"missing \['act_attn'\]"):
        attempt(act_attn=None)
    with pytest.raises(ValueError, match=r"unexpected \['topk_ids'\]"):
        attempt(topk_ids=good["input_ids"])
    with pytest.raises(ValueError, match=r"act_input has shape \(3, 2, 4, 32\), expected \(3, 2, 4, 64\)"):
        attempt(act_input=good["act_input"][..., :32])
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 16\), expected \(3, 16\)"):
        attempt(input_ids=good["input_ids"][:2])
    with pytest.raises(TypeError, match="act_attn must be torch.bfloat16"):
        attempt(act_attn=good["act_attn"].float())
    with pytest.raises(ValueError, match="sampled_counts has values in .* outside uint16"):
        attempt(sampled_counts=torch.full((3, 16, 16), -1))
    with pytest.raises(IndexError, match="shard index 3 out of range"):
        writer.write_shard(3, good)
    assert not writer.is_complete(0)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == []  # nothing half-written was left


def test_partial_cache_reading(tmp_path):
    build(tmp_path, make_cfg(), shards=[0, 2])
    reader = CacheReader(tmp_path)
    with pytest.raises(CacheFormatError, match="shard 1 .* is not complete"):
        list(reader.iter_sequences())
    partial = reader.iter_sequences(shards=reader.complete_shards(), fields=["input_ids"])
    assert [s["sequence_index"] for s in partial] == [0, 1, 2, 6]
    with pytest.raises(KeyError, match="topk_idz"):
        reader.read_shard(0, fields=["topk_idz"])


# ---------------------------------------------------------------------------------------------------
# reading without this package, and reading safely
# ---------------------------------------------------------------------------------------------------


def test_webdataset_and_plain_tools_read_a_shard(tmp_path):
    import webdataset

    written = build(tmp_path, make_cfg(format="webdataset", act_dtype="bfloat16"))
    tar_path = tmp_path / "shards" / "shard-00001.tar"
    samples = list(webdataset.WebDataset(str(tar_path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["0000000003", "0000000004", "0000000005"]
    assert "act_input.npy.blosc" in samples[0]
    raw = numcodecs.Blosc().decode(samples[1]["act_input.npy.blosc"])
    bits = np.load(io.BytesIO(bytes(raw)), allow_pickle=False)
    expected = written[1]["act_input"][1]
    assert torch.equal(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), expected)
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile("0000000003.input_ids.npy.blosc").read()
    ids = np.load(io.BytesIO(bytes(numcodecs.Blosc().decode(member))), allow_pickle=False)
    assert np.array_equal(ids, written[1]["input_ids"][0].numpy())


def test_plain_zarr_reads_a_shard(tmp_path):
    import zarr

    written = build(tmp_path, make_cfg(format="zarr", act_dtype="float8"))
    group = zarr.open_group(str(tmp_path / "shards" / "shard-00000.zarr"), mode="r")
    assert group.attrs["first_sequence"] == 0 and group["act_input"].attrs["logical_dtype"] == "float8"
    codes = torch.from_numpy(group["act_input"][:]).view(torch.float8_e4m3fn).float()
    values = codes * torch.from_numpy(group["act_input__scale"][:]).unsqueeze(-1)
    assert torch.allclose(values, written[0]["act_input"], rtol=0.07, atol=0.05)


MEMBER = "0000000000.input_ids.npy.blosc"


def _craft_tar(path: Path, add) -> Path:
    with tarfile.open(path, "w") as tar:
        add(tar)
    return path


def _member(tar, name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _pickled_member(tar):
    raw = io.BytesIO()
    np.save(raw, np.array([{"evil": 1}] * 16, dtype=object), allow_pickle=True)
    _member(tar, "0000000000.input_ids.npy.blosc", bytes(numcodecs.Blosc().encode(raw.getvalue())))


@pytest.mark.parametrize(
    "add, member, message",
    [
        (lambda t: _member(t, "../0000000000.input_ids.npy.blosc"), "../0000000000", "path in its name"),
        (lambda t: _member(t, "/etc/0000000000.input_ids.npy.blosc"), "/etc/", "path in its name"),
        (lambda t: _member(t, MEMBER, kind=tarfile.SYMTYPE, link="/etc/passwd"), MEMBER, "not a regular file"),
        (lambda t: _member(t, MEMBER, kind=tarfile.LNKTYPE, link="x"), MEMBER, "not a regular file"),
        (lambda t: _member(t, "0000000000.bogus.npy.blosc"), "bogus", "unknown field 'bogus'"),
        (lambda t: _member(t, "0000000000.input_ids.npy"), "0000000000.input_ids.npy", "expected suffix .npy.blosc"),
        (_pickled_member, "0000000000.input_ids", "not a valid .npy"),
    ],
    ids=["parent", "absolute", "symlink", "hardlink", "unknown-field", "wrong-suffix", "pickle"],
)
def test_unsafe_or_unknown_tar_members_are_refused(tmp_path, add, member, message):
    specs = cache_fields(make_cfg(format="webdataset"), GEOMETRY)
    tar = _craft_tar(tmp_path / "evil.tar", add)
    with pytest.raises(CacheFormatError, match=message) as err:
        wds_shard.read(tar, specs)
    assert str(tar) in str(err.value) and member in str(err.value)


def test_zarr_shard_with_a_foreign_codec_is_refused(tmp_path):
    build(tmp_path, make_cfg(format="zarr"), shards=[0])
    meta_path = tmp_path / "shards" / "shard-00000.zarr" / "input_ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].append({"name": "gzip", "configuration": {"level": 1}})
    meta_path.write_text(json.dumps(meta))
    specs = CacheReader(tmp_path).fields
    with pytest.raises(CacheFormatError, match=r"input_ids: refusing codecs \['gzip'\]"):
        zarr_shard.read(tmp_path / "shards" / "shard-00000.zarr", specs)


def test_a_manifest_without_keys_added_later_reads_with_the_values_its_build_used(tmp_path):
    """A cache built before `act_layer_fraction` (or `logprob_dtype`, `act_dtype`) existed stored every layer at
    every position, fp32 log-probs and bf16 activations: its manifest, lacking those keys, must read as that,
    not as today's compact defaults, and its shards stay complete."""
    from lrc_offline.capture.build import build_cache

    cfg = CacheConfig(max_sequences=8, sequences_per_shard=8, act_layer_fraction=1.0, logprob_dtype="float32",
                      act_dtype="bfloat16", act_positions=16)  # fmt: skip
    cache = tmp_path / "cache"
    build_cache(cfg, cache, progress=False)
    data = json.loads((cache / "manifest.json").read_text())
    for key in ("act_layer_fraction", "logprob_dtype", "act_dtype"):
        data["config"].pop(key)
    (cache / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    kept = {k: v for k, v in data.items() if k not in ("created", "versions", "build")}
    digest = "sha256:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    for record in (cache / "shards").glob("*.done.json"):
        record.write_text(json.dumps(json.loads(record.read_text()) | {"manifest": digest}))
    reader = CacheReader(cache)
    assert (reader.manifest.config.act_layer_fraction, reader.manifest.config.logprob_dtype,
            reader.manifest.config.act_dtype) == (1.0, "float32", "bfloat16")  # fmt: skip
    assert reader.complete_shards() == [0]
    assert CacheConfig().act_layer_fraction == 0.25  # the default it must not take
