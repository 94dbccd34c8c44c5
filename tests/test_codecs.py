"""The lossy int4, int4g and log8 encodings: exactly as documented, within their bounds, in both shard formats,
through a real capture, and refused by code that predates them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lrc_offline.cache import (
    CacheFormatError,
    CacheReader,
    CacheWriter,
    Manifest,
    dequantize_int4,
    dequantize_log8,
    make_manifest,
    quantize_int4,
    quantize_log8,
    read_manifest,
)
from lrc_offline.cache import manifest as manifest_mod
from lrc_offline.cache.quantize import (
    INT4G_GROUP,
    LOG8_STEP,
    dequantize_int4g,
    quantize_int4g,
    rotate,
    rotation_block,
    unrotate,
)
from lrc_offline.capture.build import build_cache
from lrc_offline.config import BuildRunConfig, CacheConfig, ConfigError
from lrc_offline.teacher.load import load_teacher

from test_cache_format import FINGERPRINTS, GEOMETRY  # noqa: E402  (the same tiny cache geometry)


def numpy_rotation(width: int) -> np.ndarray:
    """The int4 rotation as a [width, width] matrix, built from docs/cache_format.md with numpy only."""
    stream = b"".join(hashlib.sha256(f"lrc_offline int4 signs {width} {i}".encode()).digest()
                      for i in range(-(-width // 256)))  # fmt: skip
    signs = 1 - 2 * np.unpackbits(np.frombuffer(stream, np.uint8), bitorder="little")[:width].astype(np.float64)
    block = width & -width
    hadamard = np.array([[1.0]])
    while len(hadamard) < block:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    return np.kron(np.eye(width // block), hadamard / math.sqrt(block)) @ np.diag(signs)


def int4_rows(width: int, seed: int) -> torch.Tensor:
    """Rows at every scale, with the hard cases: zeros, a massive activation, constant and tiny rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, width, generator=gen) * torch.logspace(-20, 20, 256).unsqueeze(-1)
    x[0] = 0.0
    x[1] = torch.randn(width, generator=gen)
    x[1, 3] = 2000.0  # an attention sink: one channel three orders of magnitude above the rest
    x[2] = 1.0
    x[3] = torch.linspace(-1, 1, width) * 1e-3
    return x


@pytest.mark.parametrize("width", [576, 2048, 3072, 96, 7])
def test_the_rotation_is_the_documented_orthogonal_one(width):
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    expected = x.numpy() @ numpy_rotation(width).T
    assert rotation_block(width) == {576: 64, 2048: 2048, 3072: 1024, 96: 32, 7: 1}[width]
    np.testing.assert_allclose(rotate(x).numpy(), expected, atol=1e-4 * float(x.abs().max()))
    torch.testing.assert_close(unrotate(rotate(x)), x.float(), rtol=0, atol=1e-5 * float(x.abs().max()))


@pytest.mark.parametrize("width", [64, 576, 96, 7])
def test_int4_round_trip_within_documented_bound(width):
    x = int4_rows(width, seed=width)
    packed, scale = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (256, -(-width // 2)) and scale.shape == (256,)
    y = dequantize_int4(packed, scale, width)
    assert y.dtype == torch.float32 and torch.equal(y[0], x[0]) and bool(torch.isfinite(y).all())
    slack = 1e-5 * x.norm(dim=-1)  # float32 rounding of the two rotations
    row_err = (y - x).norm(dim=-1)
    assert bool((row_err <= math.sqrt(width) * scale / 2 + slack).all())
    block = rotation_block(width)
    assert bool(((y - x).abs().amax(-1) <= math.sqrt(block) * scale / 2 + slack).all())
    # Plain numpy decodes it: nibbles (low first) minus 8, times the scale, back through the transposed rotation.
    codes = np.stack([packed.numpy() & 15, packed.numpy() >> 4], -1).reshape(256, -1)[:, :width].astype(np.int64) - 8
    assert codes.min() >= -7 and codes.max() <= 7
    by_numpy = (codes * scale.numpy()[:, None].astype(np.float64)) @ numpy_rotation(width)
    np.testing.assert_allclose(by_numpy, y.numpy(), rtol=0, atol=1e-5 * float(x.abs().max()))


def test_int4_error_is_relative_to_the_rotated_row_max():
    x = torch.randn(512, 576, generator=torch.Generator().manual_seed(0))
    y = dequantize_int4(*quantize_int4(x), 576)
    relative = ((y - x).norm(dim=-1) / x.norm(dim=-1)).mean()
    # Gaussian rows: about sqrt(2 ln R) / (7 sqrt 12) = 0.15, well under the worst case sqrt(R) / 14 = 1.7.
    assert 0.08 < float(relative) < 0.16


def _recipe() -> dict:
    """The numpy decoders of docs/cache_format.md, executed."""
    doc = (Path(__file__).parents[1] / "docs" / "cache_format.md").read_text()
    namespace: dict = {}
    exec(doc.split("### Schema 3")[1].split("```python")[1].split("```")[0], namespace)
    return namespace


@pytest.mark.parametrize("width", [64, 576, 96, 7, 2048, 100])
def test_int4g_round_trip_within_documented_bound(width):
    x = int4_rows(width, seed=width)
    packed, scale = quantize_int4g(x)
    groups = -(-width // INT4G_GROUP)
    assert packed.dtype == torch.uint8 and packed.shape == (256, -(-width // 2))
    assert scale.dtype == torch.bfloat16 and scale.shape == (256, groups)
    y = dequantize_int4g(packed, scale, width)
    assert y.dtype == torch.float32 and torch.equal(y[0], x[0]) and bool(torch.isfinite(y).all())
    # The documented bound, from the rotated groups' maxima (the stored scales round them up).
    y_rot = torch.nn.functional.pad(rotate(x), (0, groups * INT4G_GROUP - width)).reshape(256, groups, INT4G_GROUP)
    exact = y_rot.abs().amax(-1) / 7
    assert bool((scale.float() >= exact).all()) and bool((scale.float() <= exact * (1 + 2**-7) + (exact == 0)).all())
    widths = torch.full((groups,), float(INT4G_GROUP))
    widths[-1] = width - (groups - 1) * INT4G_GROUP
    bound = (widths * scale.float().square()).sum(-1).sqrt() / 2
    slack = 1e-5 * x.norm(dim=-1)
    assert bool(((y - x).norm(dim=-1) <= bound + slack).all())
    int4_bound = math.sqrt(width) * quantize_int4(x)[1] / 2
    assert bool((bound <= int4_bound * (1 + 2**-7) + slack).all())
    # Plain numpy decodes it (docs/cache_format.md).
    bits = scale.view(torch.int16).numpy().view(np.uint16)
    by_numpy = _recipe()["int4g_decode"](packed.numpy(), bits, width)
    np.testing.assert_allclose(by_numpy, y.numpy(), rtol=0, atol=1e-5 * float(x.abs().max()))


def test_int4g_keeps_the_rest_of_a_sink_row():
    """A sink row (one massive channel over Gaussian channels), width 576 (9 blocks of 64): int4's one row
    scale is set by the massive channel's block; int4g's groups keep the other blocks' precision."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 576, generator=gen)
    x[:, 7] = 500.0
    rest = torch.ones(576, dtype=torch.bool)
    rest[:64] = False  # the block the massive channel is rotated into (H mixes within blocks of 64)

    def rest_error(y):
        return float(((y - x)[:, rest].norm(dim=-1) / x[:, rest].norm(dim=-1)).mean())

    int4, int4g = rest_error(dequantize_int4(*quantize_int4(x), 576)), rest_error(dequantize_int4g(*quantize_int4g(x), 576))
    assert int4g < 0.15 and int4 > 0.9, (int4, int4g)  # int4 rounds the other blocks to (almost) zero


def test_log8_round_trip_within_documented_bound():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 1000, generator=gen) * torch.linspace(0.5, 8, 300).unsqueeze(-1)
    x = torch.log_softmax(logits, -1).topk(64, -1).values  # descending, as topk_logprobs
    x[0, -5:] = -float("inf")
    codes, top = quantize_log8(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and torch.equal(top, x[:, 0])
    y = dequantize_log8(codes, top)
    assert torch.equal(y[:, 0], x[:, 0])  # the row max is kept exactly
    in_range = x >= top.unsqueeze(-1) - 255 * LOG8_STEP - LOG8_STEP / 2
    assert bool(((y - x).abs()[in_range] <= LOG8_STEP / 2 + 2e-6).all())
    assert (~in_range).any() and bool((y[~in_range] == top.unsqueeze(-1).expand_as(x)[~in_range] - 255 / 16).all())
    assert bool((y[~in_range] > x[~in_range]).all())
    # Plain numpy decodes it.
    np.testing.assert_array_equal(top.numpy()[:, None] - codes.numpy().astype(np.float32) / 16, y.numpy())


def _cfg(**overrides) -> CacheConfig:
    # The lossless codec of every layer (the defaults before the compact codec) unless a test names its own
    base = dict(seq_len=16, topk=8, act_positions=4, sequences_per_shard=3, act_dtype="bfloat16",
                logprob_dtype="float32", act_layer_fraction=1.0)  # fmt: skip
    return CacheConfig(**{**base, **overrides})


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("activation_mode,act_dtype", [("residual", "int4"), ("targets", "int4"), ("residual", "int4g")])
def test_int4_and_log8_round_trip_through_both_shard_formats(tmp_path, fmt, activation_mode, act_dtype):
    cfg = _cfg(format=fmt, activation_mode=activation_mode, act_dtype=act_dtype, logprob_dtype="log8")
    writer = CacheWriter(tmp_path, make_manifest(cfg, GEOMETRY, FINGERPRINTS, 5))
    gen = torch.Generator().manual_seed(1)
    written = {}
    for index in range(writer.num_shards):
        first, end = writer.shard_range(index)
        arrays = {}
        for spec in writer.fields:
            shape = (end - first, *spec.shape)
            if spec.dtype == "int32":
                arrays[spec.name] = torch.randint(0, 16, shape, generator=gen)
            elif spec.dtype == "log8":
                arrays[spec.name] = torch.log_softmax(torch.randn(*shape[:-1], 320, generator=gen) * 3, -1)[..., :8]
            else:
                arrays[spec.name] = (torch.randn(shape, generator=gen) * 3).to(torch.bfloat16)
        writer.write_shard(index, arrays)
        written[index] = arrays
    reader = CacheReader(tmp_path)
    assert reader.manifest.schema_version == {"int4": 3, "int4g": 4}[act_dtype] and reader.complete_shards() == [0, 1]
    act_names = [spec.name for spec in reader.fields if spec.dtype == act_dtype]
    assert act_names and {s.name for s in reader.fields if s.dtype == "log8"} == {"topk_logprobs"}
    for index, arrays in written.items():
        read = reader.read_shard(index)
        for name in act_names:
            x, y = arrays[name].float(), read[name]
            assert y.dtype == torch.float32 and y.shape == x.shape
            scale = rotate(x).abs().amax(-1) / 7  # the int4 row bound; int4g's is within it (x 1 + 2^-7)
            bound = math.sqrt(x.shape[-1]) * scale / 2 * (1 + 2**-7 + 1e-5)
            assert bool(((y - x).norm(dim=-1) <= bound).all()), name
            if act_dtype == "int4g":
                torch.testing.assert_close(y, dequantize_int4g(*quantize_int4g(x), x.shape[-1]), rtol=0, atol=0)
        x, y = arrays["topk_logprobs"], read["topk_logprobs"]
        assert y.dtype == torch.float32 and (y - x).abs().max() <= LOG8_STEP / 2 + 2e-6


def test_capture_writes_int4_and_log8_within_bounds(tmp_path):
    """A tiny random teacher, captured twice: float32 as the reference, int4 + log8 as the candidate."""
    teacher = load_teacher("tiny-random:llama")
    base = dict(seq_len=24, max_sequences=8, sequences_per_shard=8, topk=8, act_positions=6,
                run=BuildRunConfig(batch_size=4))  # fmt: skip
    build_cache(_cfg(**base, act_dtype="float32", logprob_dtype="float32"), tmp_path / "f32", progress=False,
                teacher=teacher)  # fmt: skip
    build_cache(_cfg(**base, act_dtype="int4", logprob_dtype="log8"), tmp_path / "q", progress=False, teacher=teacher)
    ref, got = CacheReader(tmp_path / "f32").read_shard(0), CacheReader(tmp_path / "q").read_shard(0)
    assert torch.equal(ref["act_positions"], got["act_positions"]) and torch.equal(ref["topk_ids"], got["topk_ids"])
    assert (got["topk_logprobs"] - ref["topk_logprobs"]).abs().max() <= LOG8_STEP / 2 + 2e-6
    sink_BP = ref["position_ids"].gather(1, ref["act_positions"].long()) == 0
    for name in ("act_input", "act_attn"):
        x, y = ref[name], got[name]  # [B, layers, P, d]
        scale = rotate(x).abs().amax(-1) / 7
        assert bool(((y - x).norm(dim=-1) <= math.sqrt(x.shape[-1]) * scale / 2 * (1 + 1e-5)).all()), name
        relative = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)  # [B, layers, P]
        sink = relative.transpose(1, 2)[sink_BP]
        other = relative.transpose(1, 2)[~sink_BP]
        assert sink.numel() and other.numel()
        # A random teacher has no massive activations: sinks and the rest lose about the same.
        assert float(sink.mean()) < 0.2 and float(other.mean()) < 0.2, (name, float(sink.mean()), float(other.mean()))


def test_new_encodings_need_schema_3_and_older_code_refuses_them(tmp_path, monkeypatch):
    plain = make_manifest(_cfg(), GEOMETRY, FINGERPRINTS, 5)
    assert plain.schema_version == 2  # nothing new in it: older code still reads it
    for overrides in (dict(act_dtype="int4"), dict(logprob_dtype="log8")):
        assert make_manifest(_cfg(**overrides), GEOMETRY, FINGERPRINTS, 5).schema_version == 3
    CacheWriter(tmp_path, make_manifest(_cfg(act_dtype="int4"), GEOMETRY, FINGERPRINTS, 5))
    assert read_manifest(tmp_path).fields[-1].dtype == "int4"
    # Code of schema 2 stops at the version, before it meets a dtype it does not know.
    monkeypatch.setattr(manifest_mod, "SCHEMA_VERSION", 2)
    with pytest.raises(CacheFormatError, match="written with cache schema 3, this lrc_offline reads up to 2"):
        CacheReader(tmp_path)
    monkeypatch.undo()
    # int4g needs schema 4; schema-3 code refuses it by its version.
    assert make_manifest(_cfg(act_dtype="int4g"), GEOMETRY, FINGERPRINTS, 5).schema_version == 4
    CacheWriter(tmp_path / "g", make_manifest(_cfg(act_dtype="int4g"), GEOMETRY, FINGERPRINTS, 5))
    monkeypatch.setattr(manifest_mod, "SCHEMA_VERSION", 3)
    with pytest.raises(CacheFormatError, match="written with cache schema 4, this lrc_offline reads up to 3"):
        CacheReader(tmp_path / "g")
    monkeypatch.undo()
    # A manifest claiming an older schema than its dtypes need is malformed.
    data = {**json.loads((tmp_path / "manifest.json").read_text()), "schema_version": 2}
    with pytest.raises(CacheFormatError, match="need schema 3"):
        Manifest.from_dict(data)
    with pytest.raises(ConfigError, match="logprob_dtype='int4'"):
        _cfg(logprob_dtype="int4")
    cfg = _cfg(logprob_dtype="log8", activation_mode="none")
    writer = CacheWriter(tmp_path / "b", make_manifest(cfg, GEOMETRY, FINGERPRINTS, 3))
    arrays = {name: torch.zeros(3, 16, dtype=torch.int32) for name in ("input_ids", "position_ids")}
    arrays |= {"topk_ids": torch.zeros(3, 16, 8, dtype=torch.int32), "topk_logprobs": torch.zeros(3, 16, 8)}
    arrays["topk_logprobs"][1, 2] = -float("inf")
    with pytest.raises(ValueError, match="log8 field topk_logprobs has a row of -inf only"):
        writer.write_shard(0, arrays)


def test_the_documented_numpy_recipe_decodes_a_plain_zarr_shard(tmp_path):
    import zarr

    namespace = _recipe()
    cfg = _cfg(act_dtype="int4", logprob_dtype="log8", act_positions=16)
    geometry = dataclasses.replace(GEOMETRY, hidden_size=576)  # 9 Hadamard blocks of 64
    writer = CacheWriter(tmp_path, make_manifest(cfg, geometry, FINGERPRINTS, 3))
    gen = torch.Generator().manual_seed(2)
    arrays = {spec.name: torch.randint(0, 16, (3, *spec.shape), generator=gen) for spec in writer.fields}
    arrays["topk_logprobs"] = torch.log_softmax(torch.randn(3, 16, 320, generator=gen), -1).topk(8).values
    arrays["act_input"] = torch.randn(3, 2, 16, 576, generator=gen)
    arrays["act_attn"] = torch.randn(3, 2, 16, 576, generator=gen)
    writer.write_shard(0, arrays)
    expected = CacheReader(tmp_path).read_shard(0)
    group = zarr.open_group(str(tmp_path / "shards" / "shard-00000.zarr"), mode="r")
    assert group["act_input"].attrs["logical_dtype"] == "int4"
    assert group["topk_logprobs__max"].attrs["role"] == "row_max"
    act = namespace["int4_decode"](group["act_input"][:], group["act_input__scale"][:], 576)
    np.testing.assert_allclose(act, expected["act_input"].numpy(), rtol=0, atol=1e-5)
    logprobs = namespace["log8_decode"](group["topk_logprobs"][:], group["topk_logprobs__max"][:])
    np.testing.assert_allclose(logprobs, expected["topk_logprobs"].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("act_dtype", ["int4", "int4g"])
def test_training_runs_from_an_int4_and_log8_cache(tmp_path, act_dtype):
    from lrc_offline.config import StudentConfig, TrainConfig, TrainJobConfig
    from lrc_offline.training.metrics import read_metrics
    from lrc_offline.training.trainer import train_from_cache

    build_cache(_cfg(max_sequences=8, sequences_per_shard=4, act_dtype=act_dtype, logprob_dtype="log8"),
                tmp_path / "c", progress=False)  # fmt: skip
    cfg = TrainJobConfig(student=StudentConfig(hidden_size=16), train=TrainConfig(steps=2, batch_size=4, log_every=1))
    train_from_cache(cfg, tmp_path / "c", tmp_path / "r", progress=False)
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and "clone" in r for r in records)


@pytest.mark.parametrize("act_dtype", ["float8", "int4", "int4g"])
def test_reading_some_fields_fetches_their_companion_arrays(tmp_path, act_dtype):
    build_cache(_cfg(max_sequences=4, sequences_per_shard=4, act_dtype=act_dtype, logprob_dtype="log8"),
                tmp_path / "c", progress=False)  # fmt: skip
    reader = CacheReader(tmp_path / "c")
    whole = reader.read_shard(0)
    for name in ("act_input", "topk_logprobs"):
        assert torch.equal(reader.read_shard(0, fields=[name])[name], whole[name])
