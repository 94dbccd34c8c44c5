"""Smoke runs of the benchmark scripts on the tiny teacher, so they keep working (the real runs are
documented in benchmarks/README.md and stay out of the test tier)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--teacher", "tiny-random:llama", "--corpus", "tiny-text"]


def _run(script: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCH / script), run_name="__main__")


def test_speed_train_smoke(tmp_path, monkeypatch):
    _run("speed_train.py", [*TINY, "--hidden-size", "16", "--configs", "2x32x1,1x32x2", "--chunk-tokens", "16",
                            "--rounds", "1", "--out", str(tmp_path)], monkeypatch)  # fmt: skip
    result = json.loads((tmp_path / "speed_train.json").read_text())
    assert [(r["batch_size"], r["grad_accum"]) for r in result["configs"]] == [(2, 1), (1, 2)]
    for row in result["configs"]:
        assert set(row["tokens_per_s"]) == {"offline", "offline-ref", "online", "plain", "plain-fused"}
        assert row["ratio_offline_vs_online"] > 0 and row["ratio_offline_vs_plain"] > 0
        assert set(row["peak_memory_mb"]) == set(row["tokens_per_s"])
    assert (tmp_path / "speed_train.png").is_file()


def test_fidelity_smoke(tmp_path, monkeypatch):
    _run("fidelity.py", [*TINY, "--heldout-docs", "3", "--sequences", "2", "--seq-len", "16", "--hidden-size", "64",
                         "--ks", "4,320", "--draws", "8", "--out", str(tmp_path)], monkeypatch)  # fmt: skip
    rows = json.loads((tmp_path / "fidelity.json").read_text())["students"]
    # k = vocab stores the whole distribution: only the fp16 storage rounding separates it from full KL
    assert rows["random init"]["topk k=320"]["angle_deg"] < 1.0
    assert rows["pca init"]["kl_full"] < 1e-4  # d_S = d_T: the PCA student is the teacher


def test_storage_smoke(tmp_path, monkeypatch):
    _run("storage.py", [*TINY, "--heldout-docs", "3", "--sequences", "4", "--seq-len", "32", "--act-positions", "8", "--out", str(tmp_path)],
         monkeypatch)  # fmt: skip
    table = json.loads((tmp_path / "storage.json").read_text())["table"]
    qwen = table["Qwen2.5-3B"]
    assert qwen["baseline: 7 targets at every position (bf16, raw)"] == 2_064_384  # ~2 MB/token (DESIGN)
    assert qwen["activations: residual, 8/32 positions"] < qwen["activations: targets, 8/32 positions"]
    # A quarter of Qwen's 36 layers a position: the activation bytes drop to about a quarter (the tiny
    # teacher's 2 layers keep 1 a position; its ratios are kept per row holding values; a 4-sequence
    # cache's fixed overheads add some).
    full, quarter = (qwen[f"cache: top-64 log8 + residual int4 at 32/2048{tail}"] - qwen["logits: topk k=64 (log8 log-probs)"]
                     for tail in ("", ", a quarter of the layers a position"))  # fmt: skip
    assert 0.2 * full < quarter < 0.4 * full


@pytest.mark.parametrize("variants", ["random,pca-untied-kd"])
def test_pca_init_smoke(tmp_path, monkeypatch, variants):
    _run("pca_init.py", [*TINY, "--heldout-docs", "3", "--cache-sequences", "16", "--heldout-sequences", "2",
                         "--sizes", "16,64", "--train-size", "16", "--steps", "2", "--eval-every", "1",
                         "--variants", variants, "--out", str(tmp_path)], monkeypatch)  # fmt: skip
    result = json.loads((tmp_path / "pca_init.json").read_text())
    full = result["step0"]["64"]["pca, untied head"]
    assert abs(full - result["teacher_heldout_ce"]) < 1e-3  # d_S = d_T: a rotation of the teacher
    assert set(result["curves"]) == {"random", "pca-untied-kd"}


def test_quality_smoke(tmp_path, monkeypatch):
    _run("quality.py", [*TINY, "--heldout-docs", "3", "--sequences", "16", "--steps", "2", "--eval-every", "1",
                        "--only", "a,b", "--out", str(tmp_path), "student.hidden_size=16"], monkeypatch)  # fmt: skip
    variants = json.loads((tmp_path / "quality.json").read_text())["variants"]
    assert set(variants) == {"(a) LRC online", "(b) LRC cache topk+residual P=16"}
    online, cached = (v["final_heldout_ce"] for v in variants.values())
    assert abs(online - cached) < 0.05 and (tmp_path / "quality.png").is_file()  # 2 warm-up steps barely move
    assert "(b) LRC cache topk+residual P=16" in (tmp_path / "quality.md").read_text()
    # Variants run in parallel into another folder merge into one table and plot.
    other = tmp_path / "other"
    other.mkdir()
    (other / "quality.json").write_text(json.dumps({"variants": {"(x) elsewhere": {
        "heldout": [[0, 9.0], [2, 8.0]], "final_heldout_ce": 8.0, "seconds": 1.0}}}))  # fmt: skip
    (tmp_path / "quality.png").unlink()
    _run("quality.py", ["--out", str(tmp_path), "--merge", str(other / "quality.json")], monkeypatch)
    merged = json.loads((tmp_path / "quality.json").read_text())["variants"]
    assert set(merged) == set(variants) | {"(x) elsewhere"} and (tmp_path / "quality.png").is_file()
    assert "| (x) elsewhere | 9.000 |" in (tmp_path / "quality.md").read_text()


def test_pca_pooling_smoke(tmp_path, monkeypatch):
    from lrc_offline.capture.build import build_cache
    from lrc_offline.config import CacheConfig

    build_cache(CacheConfig(corpus="tiny-text", heldout_docs=3, seq_len=32, max_sequences=8, topk=4), tmp_path / "c",
                progress=False)  # fmt: skip
    _run("pca_pooling.py", ["--cache", str(tmp_path / "c"), "--corpus", "tiny-text", "--heldout-docs", "3",
                            "--heldout-sequences", "2", "--sizes", "16,64", "--out", str(tmp_path / "r.json")],
         monkeypatch)  # fmt: skip
    rows = json.loads((tmp_path / "r.json").read_text())
    names = [r["variant"] for r in rows if r["hidden_size"] == 16]
    assert names[:3] == [f"basis from {b}, folded head scale" for b in ("h", "h + a", "both")] and len(names) == 8
    full = {r["variant"]: r["heldout_ce"] for r in rows if r["hidden_size"] == 64}
    rotations = [ce for name, ce in full.items() if not name.endswith(", tied") and "to CE" not in name]
    assert len(rotations) == 6 and max(rotations) - min(rotations) < 1e-3  # d_S = d_T: all the teacher exactly
    assert [r.get("head_scale") for r in rows if r["variant"].endswith("KD + CE, untied")][-1] == 1.0


def test_recipe_smoke_and_table(tmp_path, monkeypatch):
    _run("quality.py", [*TINY, "--recipe", "--heldout-docs", "3", "--sequences", "16", "--steps", "2",
                        "--eval-every", "1", "--only", "prod,kd", "--out", str(tmp_path),
                        "student.hidden_size=16", "train.checkpoint_every=1"], monkeypatch)  # fmt: skip
    runs = json.loads((tmp_path / "recipe.json").read_text())["runs"]
    assert set(runs) == {"prod-s0", "kd-s0"} and [s for s, _ in runs["prod-s0"]["heldout"]] == [0, 1, 2]
    assert (tmp_path / "recipe.png").is_file()
    # The table's numbers from hand-made curves, merged in: (i) rises 0.3 above its running minimum after
    # step 40 and reaches KD only's mean final (4.5) at step 60 of KD only's 80; (ii) ends 2% above (i).
    curves = {"prod-s0": ("prod", [[0, 6.0], [20, 5.0], [40, 4.8], [60, 4.5], [80, 4.4]]),
              "prod-s1": ("prod", [[0, 6.0], [20, 5.0], [40, 4.6], [60, 4.9], [80, 4.4]]),
              "kd-s0": ("kd", [[0, 6.0], [20, 5.2], [40, 5.0], [60, 8.0], [80, 4.4]]),
              "kd-s1": ("kd", [[0, 6.0], [20, 5.5], [40, 4.5], [60, 4.8], [80, 4.6]]),
              "bf16-s0": ("bf16", [[0, 6.0], [20, 5.0], [40, 4.7], [60, 4.6], [80, 4.488]]),
              "skip-s0": ("skip", [[0, 6.0], [20, 5.0], [40, 4.7], [60, 4.6], [80, 4.5]]),
              "kd-skip-s0": ("kd-skip", [[0, 6.0], [20, 5.2], [40, 4.9], [60, 4.8], [80, 4.7]])}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"setup": {"teacher": "tiny", "steps": 80, "only": "prod", "seeds": "0,1"},
                                 "runs": {name: {"variant": key, "label": f"({key})", "seed": int(name[-1]),
                                                 "heldout": curve} for name, (key, curve) in curves.items()}}))
    # Two runs cut off at step 40, merged from their folders: out of (i)'s means and ratio, listed apart.
    cut = {"prod-s2": [[0, 6.0], [20, 5.5], [40, 5.2]], "docmask-s0": [[0, 6.0], [20, 5.1], [40, 4.935]]}
    for name, curve in cut.items():
        (tmp_path / "cut" / name).mkdir(parents=True)
        (tmp_path / "cut" / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "heldout_ce": ce}) + "\n" + json.dumps({"step": s, "ce": 9.0}) + "\n"
                    for s, ce in curve))  # fmt: skip
    _run("quality.py", ["--recipe", "--out", str(tmp_path / "table"), "--merge", str(other),
                        str(tmp_path / "cut" / "prod-s2"), str(tmp_path / "cut" / "docmask-s0")], monkeypatch)  # fmt: skip
    table = (tmp_path / "table" / "recipe.md").read_text()
    assert json.loads((tmp_path / "table" / "recipe.json").read_text())["setup"] == {"teacher": "tiny", "steps": 80}
    assert "| (prod), seed 1 | 80 | 4.400 | 0.300 | 80 |" in table  # rise 4.9 - 4.6; 4.5 first reached at 80
    assert "| (prod), seed 0 | 80 | 4.400 | 0.000 | 60 |" in table
    assert "| (kd), seed 0 | 80 | 4.400 | 3.000 | 80 |" in table  # the spike above the running minimum 5.0
    assert "KD only's mean final held-out CE: 4.5000, after 80 steps." in table
    assert "(prod) reaches (kd)'s mean final CE 4.5000 at steps [60, 80]: 0.88 of (kd)'s 80 steps (mean over seeds)." in table
    assert "(kd)'s own curves first reach it at steps [80, 40]: (prod) takes 1.17 of those" in table
    # the spike-skipping pair against its own KD-only baseline (final 4.7): reached at 40 of 80 steps
    assert "(skip) reaches (kd-skip)'s mean final CE 4.7000 at steps [40]: 0.50 of (kd-skip)'s 80 steps" in table
    assert "(kd-skip) at step" not in table  # a KD-only baseline is not compared with (i)
    assert "(bf16) at step 80: 4.488 (seeds 0) against (i)'s 4.400 (seeds 0,1): +2.0%." in table
    assert "| (prod) (0,1) | 6.000 ±0.000 | 5.000 ±0.000 | 4.700 ±0.100 |" in table
    assert "| (i) default recipe, production cache, seed 2 (cut off at 40 of 80) | 40 | 5.200 | 0.000 | - |" in table
    assert ("(iv) document-masked cache and student, cut off, at step 40: 4.935 (seeds 0) against (i)'s 4.700 "
            "(seeds 0,1): +5.0%.") in table
